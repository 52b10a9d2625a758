/*
 * direct_insert.c — batches of rows into the extension's own record tables
 * (lead_history, automation_runs) without an INSERT statement.
 *
 * A bulk statement writes two or more record rows per lead.  Through SQL
 * each row pays the executor (a function scan over the unnested arrays, a
 * tuplestore, a projection) and a WAL record of its own; here the rows go
 * to the table access method's multi-insert, as COPY FROM does: one WAL
 * record per page, then each row's index entries and constraint checks.
 *
 * Only in a read-write transaction, for a plain table whose rows need
 * nothing the executor would add: no row-level security, no trigger other
 * than the restore-order ones when no restore runs (both are no-ops then),
 * no deferred unique index, no generated column, and the caller's columns
 * of the types it gives.  Other
 * columns get their defaults (identity, clock_timestamp(), a column a user
 * added with a default).  Anything else returns false and the caller writes
 * the rows with SQL, as before.
 *
 * What a flush would otherwise look up again (the columns, the defaults and
 * CHECK constraints as planned expressions, whether the table qualifies) is
 * kept per table until its relcache entry is invalidated: a one-lead
 * transaction pays only for its rows.
 */
#include "nocrm.h"

#include "access/table.h"
#include "access/tableam.h"
#include "access/heapam.h"
#include "access/xact.h"
#include "access/genam.h"
#include "catalog/namespace.h"
#include "catalog/pg_trigger.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "optimizer/optimizer.h"
#include "parser/parse_func.h"
#include "rewrite/rewriteHandler.h"
#include "utils/lsyscache.h"
#include "utils/inval.h"
#include "utils/memutils.h"
#include "utils/rel.h"

#define SLOTS_PER_BATCH	1000	/* as COPY FROM's buffer */
#define CACHED_TABLES	4

/* What a table's rows need, for one caller's columns. */
typedef struct TableShape
{
	const char *table;			/* the caller's (static) name; NULL = free */
	Oid			relid;
	bool		valid;
	bool		direct;			/* false: use SQL */
	bool		restore_triggers;	/* no-ops unless a restore runs */
	MemoryContext context;
	AttrNumber	colattr[WRITEBUF_MAX_COLS];
	int			natts;
	Expr	  **defaults;		/* per attribute, planned; NULL = none/given */
	int			nchecks;
	Expr	  **checks;			/* planned, in the order of constr->check */
} TableShape;

static TableShape shapes[CACHED_TABLES];
static bool callback_registered = false;

static void
shapes_invalidate(Datum arg, Oid relid)
{
	for (int i = 0; i < CACHED_TABLES; i++)
		if (shapes[i].table && (relid == InvalidOid || shapes[i].relid == relid))
			shapes[i].valid = false;
}

static Oid
restore_function(const char *name)
{
	return LookupFuncName(list_make2(makeString("nocrm"), makeString(pstrdup(name))), 0, NULL, true);
}

/*
 * Whether only the restore-order triggers fire on an INSERT (*restore set
 * when there are any); false when any other does.
 */
static bool
only_restore_triggers(Relation rel, bool *restore)
{
	TriggerDesc *td = rel->trigdesc;
	Oid			hold,
				complete;

	*restore = false;
	if (td == NULL)
		return true;
	hold = restore_function("restore_hold");
	complete = restore_function("restore_complete");
	for (int i = 0; i < td->numtriggers; i++)
	{
		Trigger    *t = &td->triggers[i];

		if (!TRIGGER_FOR_INSERT(t->tgtype))
			continue;
		if (!OidIsValid(t->tgfoid) || (t->tgfoid != hold && t->tgfoid != complete))
			return false;
		*restore = true;
	}
	return true;
}

static bool
indexes_immediate(Relation rel)
{
	List	   *indexes = RelationGetIndexList(rel);
	ListCell   *lc;
	bool		ok = true;

	foreach(lc, indexes)
	{
		Relation	index = index_open(lfirst_oid(lc), AccessShareLock);

		if (!index->rd_index->indimmediate)
			ok = false;
		index_close(index, AccessShareLock);
		if (!ok)
			break;
	}
	list_free(indexes);
	return ok;
}

/* Fills shape for rel and the caller's columns; shape->direct false if it does not qualify. */
static void
shape_build(TableShape *shape, Relation rel, int ncols, const char *const *names, const Oid *types)
{
	TupleDesc	desc = RelationGetDescr(rel);
	TupleConstr *constr = desc->constr;
	bool	   *given;
	MemoryContext old;

	if (shape->context)
		MemoryContextReset(shape->context);
	else
		shape->context = AllocSetContextCreate(CacheMemoryContext, "nocrm direct insert",
											   ALLOCSET_SMALL_SIZES);
	shape->relid = RelationGetRelid(rel);
	shape->valid = true;
	shape->direct = false;
	if (rel->rd_rel->relkind != RELKIND_RELATION || rel->rd_rel->relrowsecurity ||
		!only_restore_triggers(rel, &shape->restore_triggers) || !indexes_immediate(rel))
		return;

	old = MemoryContextSwitchTo(shape->context);
	given = palloc0(sizeof(bool) * desc->natts);
	for (int c = 0; c < ncols; c++)
	{
		AttrNumber	a = get_attnum(shape->relid, names[c]);

		if (a <= 0 || TupleDescAttr(desc, a - 1)->atttypid != types[c] ||
			TupleDescAttr(desc, a - 1)->attgenerated)
			goto out;
		shape->colattr[c] = a;
		given[a - 1] = true;
	}
	shape->natts = desc->natts;
	shape->defaults = palloc0(sizeof(Expr *) * desc->natts);
	for (int a = 1; a <= desc->natts; a++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, a - 1);
		Node	   *def;

		if (att->attisdropped || given[a - 1])
			continue;
		if (att->attgenerated)
			goto out;
		def = build_column_default(rel, a);
		if (def != NULL)
			shape->defaults[a - 1] = expression_planner((Expr *) def);
	}
	shape->nchecks = constr ? constr->num_check : 0;
	shape->checks = palloc0(sizeof(Expr *) * Max(shape->nchecks, 1));
	for (int i = 0; i < shape->nchecks; i++)
		shape->checks[i] = expression_planner((Expr *) stringToNode(constr->check[i].ccbin));
	shape->direct = true;
out:
	MemoryContextSwitchTo(old);
}

static TableShape *
shape_of(const char *table, Relation rel, int ncols, const char *const *names, const Oid *types)
{
	TableShape *shape = NULL;

	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(shapes_invalidate, (Datum) 0);
		callback_registered = true;
	}
	for (int i = 0; i < CACHED_TABLES && shape == NULL; i++)
		if (shapes[i].table == table)
			shape = &shapes[i];
	for (int i = 0; i < CACHED_TABLES && shape == NULL; i++)
		if (shapes[i].table == NULL)
		{
			shape = &shapes[i];
			shape->table = table;
		}
	if (shape == NULL)
		return NULL;
	if (!shape->valid || shape->relid != RelationGetRelid(rel))
		shape_build(shape, rel, ncols, names, types);
	return shape;
}

/* Inserts the slots, then their index entries. */
static void
insert_batch(ResultRelInfo *rri, EState *estate, TupleTableSlot **slots, int n,
			 CommandId cid, BulkInsertState bistate)
{
	table_multi_insert(rri->ri_RelationDesc, slots, n, cid, 0, bistate);
	for (int i = 0; i < n; i++)
	{
		if (rri->ri_NumIndices > 0)
			ExecInsertIndexTuples(rri, slots[i], estate, false, false, NULL, NIL);
		ExecClearTuple(slots[i]);
	}
}

/*
 * Writes nrows rows (values/nulls: nrows x ncols, row-major) into
 * nocrm.<table> (columns names, of element types types).  table must be a
 * static string: it keys the cache.  False, with nothing written, when the
 * table needs the executor.
 */
bool
nocrm_direct_insert(const char *table, int ncols, const char *const *names, const Oid *types,
					int nrows, const Datum *values, const bool *nulls)
{
	Oid			relid = get_relname_relid(table, get_namespace_oid("nocrm", false));
	Relation	rel;
	TableShape *shape;
	EState	   *estate;
	ResultRelInfo *rri;
	RangeTblEntry *rte;
	ExprState **defaults;
	TupleTableSlot **slots;
	ExprContext *econtext;
	BulkInsertState bistate = NULL;
	MemoryContext old;
	CommandId	cid;
	int			nslots = Min(nrows, SLOTS_PER_BATCH);
	int			inbatch = 0;

	/* INSERT refuses these with the right error */
	if (!OidIsValid(relid) || ncols > WRITEBUF_MAX_COLS || nrows == 0 || XactReadOnly ||
		IsInParallelMode())
		return false;
	rel = table_open(relid, RowExclusiveLock);
	shape = shape_of(table, rel, ncols, names, types);
	if (shape == NULL || !shape->direct || (shape->restore_triggers && nocrm_restoring()))
	{
		table_close(rel, NoLock);
		return false;
	}

	estate = CreateExecutorState();
	rte = makeNode(RangeTblEntry);
	rte->rtekind = RTE_RELATION;
	rte->relid = relid;
	rte->relkind = rel->rd_rel->relkind;
	rte->rellockmode = RowExclusiveLock;
	ExecInitRangeTable(estate, list_make1(rte));
	rri = makeNode(ResultRelInfo);
	ExecInitResultRelation(estate, rri, 1);
	ExecOpenIndices(rri, false);	/* closed by ExecCloseResultRelations */

	old = MemoryContextSwitchTo(estate->es_query_cxt);
	defaults = palloc0(sizeof(ExprState *) * shape->natts);
	for (int a = 0; a < shape->natts; a++)
		if (shape->defaults[a])
			defaults[a] = ExecInitExpr(shape->defaults[a], NULL);
	/* ExecConstraints would parse and plan each CHECK again */
	if (shape->nchecks > 0)
	{
		rri->ri_ConstraintExprs = palloc(sizeof(ExprState *) * shape->nchecks);
		for (int i = 0; i < shape->nchecks; i++)
			rri->ri_ConstraintExprs[i] = ExecInitExpr(shape->checks[i], NULL);
	}
	MemoryContextSwitchTo(old);

	slots = palloc(sizeof(TupleTableSlot *) * nslots);
	for (int i = 0; i < nslots; i++)
		slots[i] = table_slot_create(rel, &estate->es_tupleTable);
	econtext = GetPerTupleExprContext(estate);
	if (nrows > SLOTS_PER_BATCH)
		bistate = GetBulkInsertState();
	/* the rows are this command's; the next one sees them (as after SPI) */
	cid = GetCurrentCommandId(true);

	for (int r = 0; r < nrows; r++)
	{
		TupleTableSlot *slot = slots[inbatch];

		ExecClearTuple(slot);
		for (int a = 0; a < shape->natts; a++)
		{
			slot->tts_isnull[a] = true;
			slot->tts_values[a] = (Datum) 0;
			if (defaults[a] != NULL)
				slot->tts_values[a] = ExecEvalExpr(defaults[a], econtext, &slot->tts_isnull[a]);
		}
		for (int c = 0; c < ncols; c++)
		{
			slot->tts_values[shape->colattr[c] - 1] = values[r * ncols + c];
			slot->tts_isnull[shape->colattr[c] - 1] = nulls[r * ncols + c];
		}
		ExecStoreVirtualTuple(slot);
		ExecMaterializeSlot(slot);
		ResetPerTupleExprContext(estate);
		if (rel->rd_att->constr)
			ExecConstraints(rri, slot, estate);
		if (++inbatch == SLOTS_PER_BATCH)
		{
			CHECK_FOR_INTERRUPTS();
			insert_batch(rri, estate, slots, inbatch, cid, bistate);
			inbatch = 0;
		}
	}
	if (inbatch > 0)
		insert_batch(rri, estate, slots, inbatch, cid, bistate);

	if (bistate)
		FreeBulkInsertState(bistate);
	ExecResetTupleTable(estate->es_tupleTable, false);
	ExecCloseResultRelations(estate);
	ExecCloseRangeTableRelations(estate);
	FreeExecutorState(estate);
	table_close(rel, NoLock);
	CommandCounterIncrement();
	return true;
}
