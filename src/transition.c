/*
 * transition.c — reading a statement trigger's transition tables with read
 * pointers of our own, so several readers (old and new rows, a look-ahead)
 * can walk one tuplestore side by side.
 */
#include "nocrm.h"

#include "executor/executor.h"
#include "executor/tuptable.h"
#include "utils/tuplestore.h"

/* A reader of a transition table from its first row; NULL for no table. */
TupleTableSlot *
nocrm_transition_reader(Tuplestorestate *table, TupleDesc desc, int *readptr)
{
	if (table == NULL)
		return NULL;
	*readptr = tuplestore_alloc_read_pointer(table, EXEC_FLAG_REWIND);
	tuplestore_select_read_pointer(table, *readptr);
	tuplestore_rescan(table);
	return MakeSingleTupleTableSlot(desc, &TTSOpsMinimalTuple);
}

/* The reader's next row into slot; false at the end. */
bool
nocrm_transition_next(Tuplestorestate *table, int readptr, TupleTableSlot *slot)
{
	tuplestore_select_read_pointer(table, readptr);
	return tuplestore_gettupleslot(table, true, false, slot);
}
