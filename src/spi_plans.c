/*
 * spi_plans.c — prepared SPI plans kept for the life of the backend, and
 * the other small caches the modules above share the making of.
 */
#include "nocrm.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "access/table.h"
#include "catalog/namespace.h"
#include "storage/bufmgr.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "utils/datum.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/syscache.h"

/*
 * Kept plans are generic, built with the table sizes of their first run.  A
 * plan built while nocrm.leads or nocrm.tags was nearly empty (a new CRM, a
 * fresh import) scans them sequentially; kept, every lookup of a bulk
 * statement would read the whole table.  So plans belong to an epoch, and
 * the epoch moves on each time one of those tables has grown fourfold:
 * the next use of each plan prepares it again.  Replaced plans may still
 * be running further up the stack; they are freed at transaction end.
 */
#define GROWTH_CHECK_ROWS	1024	/* rows between size checks */
#define GROWTH_FACTOR		4
#define MIN_TRACKED_BLOCKS	8

typedef struct KeptPlan
{
	SPIPlanPtr *slot;
	uint64		epoch;
} KeptPlan;

static KeptPlan kept[64];
static int	nkept = 0;
static uint64 plan_epoch = 1;
static List *retired_plans = NIL;	/* in TopMemoryContext */
static BlockNumber epoch_blocks[2];
static int	rows_since_check = 0;

static KeptPlan *
kept_plan(SPIPlanPtr *slot)
{
	for (int i = 0; i < nkept; i++)
		if (kept[i].slot == slot)
			return &kept[i];
	if (nkept >= lengthof(kept))
		elog(ERROR, "too many kept plans");
	kept[nkept].slot = slot;
	kept[nkept].epoch = 0;
	return &kept[nkept++];
}

/* Frees the plans replaced during the transaction; none can be running now. */
void
nocrm_plans_xact_end(void)
{
	ListCell   *lc;

	foreach(lc, retired_plans)
		SPI_freeplan((SPIPlanPtr) lfirst(lc));
	list_free(retired_plans);
	retired_plans = NIL;
}

/*
 * Whether nocrm.<table> exists: tables that came with a later version are
 * missing while a new library runs on an older schema.  Asked on every pick
 * and commit, so the answers are kept until pg_class changes.  table must be
 * a string literal (the pointer is kept).
 */
typedef struct KnownTable
{
	const char *name;
	bool		exists;
} KnownTable;

static KnownTable known_tables[16];
static int	nknown = 0;

static void
forget_known_tables(Datum arg, int cacheid, uint32 hashvalue)
{
	nknown = 0;
}

bool
nocrm_table_exists(const char *table)
{
	static bool callback_registered = false;
	Oid			nsp;
	bool		exists;

	for (int i = 0; i < nknown; i++)
		if (strcmp(known_tables[i].name, table) == 0)
			return known_tables[i].exists;
	if (!callback_registered)
	{
		CacheRegisterSyscacheCallback(RELNAMENSP, forget_known_tables, (Datum) 0);
		callback_registered = true;
	}
	nsp = get_namespace_oid("nocrm", true);
	exists = OidIsValid(nsp) && OidIsValid(get_relname_relid(table, nsp));
	if (nknown < lengthof(known_tables))
	{
		known_tables[nknown].name = table;
		known_tables[nknown].exists = exists;
		nknown++;
	}
	return exists;
}

static BlockNumber
blocks_of(const char *table)
{
	Oid			relid = get_relname_relid(table, get_namespace_oid("nocrm", false));
	Relation	rel;
	BlockNumber blocks;

	if (!OidIsValid(relid))
		return 0;
	rel = table_open(relid, AccessShareLock);
	blocks = RelationGetNumberOfBlocks(rel);
	table_close(rel, AccessShareLock);
	return blocks;
}

/*
 * Called for each row the triggers handle: every GROWTH_CHECK_ROWS rows,
 * checks whether leads or tags outgrew the sizes the plans were built for.
 */
void
nocrm_plans_note_row(void)
{
	const char *tables[2] = {"leads", "tags"};

	if (++rows_since_check < GROWTH_CHECK_ROWS)
		return;
	rows_since_check = 0;
	for (int t = 0; t < 2; t++)
	{
		BlockNumber blocks = blocks_of(tables[t]);

		if (blocks >= MIN_TRACKED_BLOCKS &&
			blocks >= (BlockNumber) GROWTH_FACTOR * Max(epoch_blocks[t], MIN_TRACKED_BLOCKS / GROWTH_FACTOR))
		{
			plan_epoch++;
			epoch_blocks[0] = blocks_of(tables[0]);
			epoch_blocks[1] = blocks_of(tables[1]);
			elog(DEBUG1, "nocrm: nocrm.%s has %u blocks, kept plans are prepared again",
				 tables[t], blocks);
			return;
		}
	}
}

/*
 * Returns the plan in *slot, preparing and keeping it on first use (and
 * again in a new epoch).  A kept plan is revalidated by the plan cache when
 * the tables it uses change.
 */
SPIPlanPtr
nocrm_plan(SPIPlanPtr *slot, const char *sql, int nargs, Oid *argtypes)
{
	KeptPlan   *k = kept_plan(slot);

	if (*slot != NULL && k->epoch != plan_epoch)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		retired_plans = lappend(retired_plans, *slot);
		MemoryContextSwitchTo(old);
		*slot = NULL;
	}
	if (*slot == NULL)
	{
		/*
		 * Generic from the start: these statements run once per row, and a
		 * custom plan per execution costs more than the statement itself.
		 */
		SPIPlanPtr	plan = SPI_prepare_cursor(sql, nargs, argtypes, CURSOR_OPT_GENERIC_PLAN);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed for \"%s\": %s",
				 sql, SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "SPI_keepplan failed");
		*slot = plan;
		k->epoch = plan_epoch;
	}
	return *slot;
}

/*
 * Runs a one-argument query returning one bigint column, unplanned; used for
 * name lookups while compiling rules, where plans would not be reused.
 * Not read-only: a trigger must see the rows its own statement wrote.
 */
int64
nocrm_lookup_id(const char *sql, Datum arg, Oid argtype, bool *found)
{
	char		nulls = ' ';
	int			ret;
	bool		isnull;
	Datum		d;
	MemoryContext caller = CurrentMemoryContext;

	ret = SPI_execute_with_args(sql, 1, &argtype, &arg, &nulls, false, 2);
	/* SPI returns in its procedure context; callers may be building a cache. */
	MemoryContextSwitchTo(caller);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "lookup failed: %s", SPI_result_code_string(ret));
	if (SPI_processed != 1)
	{
		*found = false;
		return 0;
	}
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	*found = !isnull;
	return isnull ? 0 : DatumGetInt64(d);
}

/*
 * Runs a kept plan that returns at most one row and takes its first column
 * as a bigint.  False when there is no row (or the value is NULL).
 */
bool
nocrm_plan_int64(SPIPlanPtr plan, Datum *args, const char *nulls, int64 *value)
{
	int			ret = SPI_execute_plan(plan, args, nulls, false, 1);
	bool		isnull;
	Datum		d;

	if (ret != SPI_OK_SELECT && ret != SPI_OK_INSERT_RETURNING &&
		ret != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "automation query failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		return false;
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	*value = isnull ? 0 : DatumGetInt64(d);
	return !isnull;
}

/* Does a column hold the same value in both tuples (NULLs equal)? */
bool
nocrm_column_equal(HeapTuple a, HeapTuple b, TupleDesc desc, int attno)
{
	Form_pg_attribute att = TupleDescAttr(desc, attno - 1);
	bool		anull,
				bnull;
	Datum		ad = heap_getattr(a, attno, desc, &anull);
	Datum		bd = heap_getattr(b, attno, desc, &bnull);

	if (anull || bnull)
		return anull == bnull;
	return datum_image_eq(ad, bd, att->attbyval, att->attlen);
}

/* Runs a kept plan that must succeed with the given SPI result code. */
void
nocrm_exec_plan(SPIPlanPtr plan, Datum *args, const char *nulls, int expected, const char *what)
{
	int			ret = SPI_execute_plan(plan, args, nulls, false, 0);

	if (ret != expected)
		elog(ERROR, "%s: %s", what, SPI_result_code_string(ret));
}

/*
 * Runs body(arg) in an internal subtransaction, in the caller's memory
 * context.  NULL when it committed; else it was rolled back and its error
 * is returned, copied into errcxt (NULL: the caller's context).  The
 * caller decides what a cancel means (most rethrow it: ReThrowError).
 */
ErrorData *
nocrm_in_subtransaction(void (*body) (void *arg), void *arg, MemoryContext errcxt)
{
	MemoryContext oldcontext = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	ErrorData  *edata = NULL;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcontext);
	PG_TRY();
	{
		body(arg);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(errcxt ? errcxt : oldcontext);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
	}
	PG_END_TRY();
	return edata;
}

/* A hash table keyed by the first keysize bytes of its entries, in cxt. */
HTAB *
nocrm_blob_hash(const char *name, long nelem, Size keysize, Size entrysize, MemoryContext cxt)
{
	HASHCTL		ctl;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = keysize;
	ctl.entrysize = entrysize;
	ctl.hcxt = cxt;
	return hash_create(name, nelem, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
}
