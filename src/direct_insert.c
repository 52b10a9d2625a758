/*
 * direct_insert.c — batches of rows into the extension's own tables
 * (lead_history, automation_runs, notifications, queue, bulk tags) without
 * an INSERT statement.
 *
 * A bulk statement writes two or more record rows per lead.  Through SQL
 * each row pays the executor (a function scan over the unnested arrays, a
 * tuplestore, a projection) and a WAL record of its own; here the rows go
 * to the table access method's multi-insert, as COPY FROM does: one WAL
 * record per page, then each row's index entries and constraint checks.
 *
 * Only in a read-write transaction, for a plain table whose rows need
 * nothing the executor would add: no row-level security, no INSERT trigger
 * but the restore-order ones when no restore runs (no-ops then), the
 * checks of immediate single-column integer foreign keys and those the
 * buffer names as doing nothing for its rows, no deferred unique index, no
 * generated column, and the caller's columns of the types it gives.  A
 * foreign key is checked once per batch and distinct key, by the query
 * RI_FKey_check_ins runs per row (the referenced rows locked FOR KEY
 * SHARE, as the owner of their table); a key it does not find sends the
 * batch to INSERT, which raises the constraint's own error.  Other columns
 * get their defaults (identity, clock_timestamp(), a column a user added
 * with a default).  Anything else returns -1 and the caller writes the
 * rows with SQL, as before.
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
#include "access/xlog.h"
#include "access/genam.h"
#include "catalog/namespace.h"
#include "catalog/pg_trigger.h"
#include "executor/spi.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "optimizer/optimizer.h"
#include "parser/parse_func.h"
#include "rewrite/rewriteHandler.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/inval.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/syscache.h"

#define SLOTS_PER_BATCH	1000	/* as COPY FROM's buffer */
#define CACHED_TABLES	8	/* as many as there are write buffers */
#define MAX_FOREIGN_KEYS 4

/* A foreign key whose per-row check trigger the batch replaces. */
typedef struct ForeignKeyCheck
{
	Oid			constraint;
	int			col;			/* the caller's column */
	Oid			keytype;		/* INT4OID or INT8OID */
	Oid			pkrelid;		/* the referenced table */
	SPIPlanPtr	plan;			/* $1 keys[] -> how many exist, locked */
} ForeignKeyCheck;

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
	int			nfks;
	ForeignKeyCheck fks[MAX_FOREIGN_KEYS];
	/* slots kept from flush to flush, on a copy of the descriptor (no pin) */
	TupleDesc	slotdesc;
	int			nslots;
	TupleTableSlot *slots[SLOTS_PER_BATCH];
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
nocrm_function(const char *name)
{
	return LookupFuncName(list_make2(makeString("nocrm"), makeString(pstrdup(name))), 0, NULL, true);
}

/*
 * Whether the batch can stand in for every INSERT trigger: the
 * restore-order ones (shape->restore_triggers), the immediate foreign key
 * checks (their constraints into shape->fks) and those the buffer says do
 * nothing for its rows.  False when any other trigger fires.
 */
static bool
known_insert_triggers(Relation rel, TableShape *shape, const WriteBuffer *buf)
{
	TriggerDesc *td = rel->trigdesc;
	Oid			hold,
				complete;
	Oid			quiet[lengthof(buf->quiet_triggers)];

	shape->restore_triggers = false;
	shape->nfks = 0;
	if (td == NULL)
		return true;
	hold = nocrm_function("restore_hold");
	complete = nocrm_function("restore_complete");
	for (int q = 0; q < lengthof(quiet); q++)
		quiet[q] = buf->quiet_triggers[q] ? nocrm_function(buf->quiet_triggers[q]) : InvalidOid;
	for (int i = 0; i < td->numtriggers; i++)
	{
		Trigger    *t = &td->triggers[i];
		bool		is_quiet = false;

		if (!TRIGGER_FOR_INSERT(t->tgtype))
			continue;
		for (int q = 0; q < lengthof(quiet); q++)
			is_quiet |= OidIsValid(quiet[q]) && t->tgfoid == quiet[q];
		if (is_quiet)
			continue;
		if (OidIsValid(t->tgfoid) && (t->tgfoid == hold || t->tgfoid == complete))
			shape->restore_triggers = true;
		else if (t->tgfoid == F_RI_FKEY_CHECK_INS && !t->tgdeferrable &&
				 shape->nfks < MAX_FOREIGN_KEYS)
		{
			shape->fks[shape->nfks].plan = NULL;
			shape->fks[shape->nfks++].constraint = t->tgconstraint;
		}
		else
			return false;
	}
	return true;
}

/* Plans fk's check; false if the key is not one the batch can check. */
static bool
foreign_key_plan(ForeignKeyCheck *fk, Relation rel, const TableShape *shape, int ncols)
{
	ListCell   *lc;
	ForeignKeyCacheInfo *info = NULL;
	char	   *sql;
	Oid			argtype;

	foreach(lc, RelationGetFKeyList(rel))
		if (((ForeignKeyCacheInfo *) lfirst(lc))->conoid == fk->constraint)
			info = lfirst(lc);
	if (info == NULL || info->nkeys != 1 || get_rel_relkind(info->confrelid) != RELKIND_RELATION)
		return false;
	fk->col = -1;
	for (int c = 0; c < ncols; c++)
		if (shape->colattr[c] == info->conkey[0])
			fk->col = c;
	if (fk->col < 0)
		return false;
	fk->keytype = get_atttype(shape->relid, info->conkey[0]);
	if ((fk->keytype != INT4OID && fk->keytype != INT8OID) ||
		get_atttype(info->confrelid, info->confkey[0]) != fk->keytype)
		return false;
	fk->pkrelid = info->confrelid;
	sql = psprintf("SELECT pg_catalog.count(*) FROM (SELECT 1 FROM ONLY %s x WHERE %s"
				   " OPERATOR(pg_catalog.=) ANY ($1) FOR KEY SHARE OF x) s",
				   quote_qualified_identifier(get_namespace_name(get_rel_namespace(info->confrelid)),
											  get_rel_name(info->confrelid)),
				   quote_identifier(get_attname(info->confrelid, info->confkey[0], false)));
	argtype = get_array_type(fk->keytype);
	fk->plan = SPI_prepare(sql, 1, &argtype);
	if (fk->plan == NULL)
		elog(ERROR, "SPI_prepare failed for \"%s\": %s", sql, SPI_result_code_string(SPI_result));
	SPI_keepplan(fk->plan);
	return true;
}

/*
 * Whether every referenced row of the batch exists; locks them FOR KEY
 * SHARE, as the per-row checks would.  One query per key, for its
 * distinct values.
 */
static bool
foreign_keys_present(const TableShape *shape, int ncols, int nrows, const Datum *values,
					 const bool *nulls)
{
	for (int f = 0; f < shape->nfks; f++)
	{
		const ForeignKeyCheck *fk = &shape->fks[f];
		int64	   *keys = palloc(sizeof(int64) * nrows);
		Datum	   *elems;
		Datum		arg;
		int			n = 0,
					distinct = 0;
		HeapTuple	tup;
		Oid			pkowner,
					save_userid;
		int			save_sec;
		bool		isnull;
		int64		found;

		for (int r = 0; r < nrows; r++)
		{
			Datum		v = values[r * ncols + fk->col];

			if (!nulls[r * ncols + fk->col])
				keys[n++] = fk->keytype == INT8OID ? DatumGetInt64(v) : DatumGetInt32(v);
		}
		if (n == 0)
			continue;
		qsort(keys, n, sizeof(int64), nocrm_int64_cmp);
		elems = palloc(sizeof(Datum) * n);
		for (int i = 0; i < n; i++)
			if (i == 0 || keys[i] != keys[i - 1])
				elems[distinct++] = fk->keytype == INT8OID ? Int64GetDatum(keys[i])
					: Int32GetDatum((int32) keys[i]);
		arg = PointerGetDatum(construct_array(elems, distinct, fk->keytype,
											  fk->keytype == INT8OID ? 8 : 4, true,
											  fk->keytype == INT8OID ? TYPALIGN_DOUBLE : TYPALIGN_INT));
		/* its owner now, as RI_FKey_check_ins takes it (an owner change of
		 * that table invalidates nothing here) */
		tup = SearchSysCache1(RELOID, ObjectIdGetDatum(fk->pkrelid));
		if (!HeapTupleIsValid(tup))
			elog(ERROR, "cache lookup failed for relation %u", fk->pkrelid);
		pkowner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
		ReleaseSysCache(tup);
		GetUserIdAndSecContext(&save_userid, &save_sec);
		SetUserIdAndSecContext(pkowner, save_sec | SECURITY_LOCAL_USERID_CHANGE |
							   SECURITY_NOFORCE_RLS);
		if (SPI_execute_plan(fk->plan, &arg, NULL, false, 1) != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "checking foreign key %u failed", fk->constraint);
		SetUserIdAndSecContext(save_userid, save_sec);
		found = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		SPI_freetuptable(SPI_tuptable);
		if (found != distinct)
			return false;
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
shape_build(TableShape *shape, Relation rel, const WriteBuffer *buf)
{
	int			ncols = buf->ncols;
	TupleDesc	desc = RelationGetDescr(rel);
	TupleConstr *constr = desc->constr;
	bool	   *given;
	MemoryContext old;

	for (int f = 0; f < shape->nfks; f++)
		if (shape->fks[f].plan)
			SPI_freeplan(shape->fks[f].plan);
	shape->nfks = 0;
	shape->nslots = 0;			/* their memory goes with the context */
	shape->slotdesc = NULL;
	if (shape->context)
		MemoryContextReset(shape->context);
	else
		shape->context = AllocSetContextCreate(CacheMemoryContext, "nocrm direct insert",
											   ALLOCSET_SMALL_SIZES);
	shape->relid = RelationGetRelid(rel);
	shape->valid = true;
	shape->direct = false;
	if (rel->rd_rel->relkind != RELKIND_RELATION || rel->rd_rel->relrowsecurity ||
		!known_insert_triggers(rel, shape, buf) || !indexes_immediate(rel))
	{
		shape->nfks = 0;
		return;
	}

	old = MemoryContextSwitchTo(shape->context);
	given = palloc0(sizeof(bool) * desc->natts);
	for (int c = 0; c < ncols; c++)
	{
		AttrNumber	a = get_attnum(shape->relid, buf->columns[c]);

		if (a <= 0 || TupleDescAttr(desc, a - 1)->atttypid != buf->types[c] ||
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
	for (int f = 0; f < shape->nfks; f++)
		if (!foreign_key_plan(&shape->fks[f], rel, shape, ncols))
			goto out;
	shape->direct = true;
out:
	MemoryContextSwitchTo(old);
}

static TableShape *
shape_of(const WriteBuffer *buf, Relation rel)
{
	const char *table = buf->table;
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
		shape_build(shape, rel, buf);
	return shape;
}

/* The shape's first n slots, made on first use. */
static TupleTableSlot **
shape_slots(TableShape *shape, Relation rel, int n)
{
	MemoryContext old = MemoryContextSwitchTo(shape->context);

	if (shape->slotdesc == NULL)
		shape->slotdesc = CreateTupleDescCopy(RelationGetDescr(rel));
	for (; shape->nslots < n; shape->nslots++)
		shape->slots[shape->nslots] = MakeSingleTupleTableSlot(shape->slotdesc,
															   table_slot_callbacks(rel));
	MemoryContextSwitchTo(old);
	for (int i = 0; i < n; i++)
		ExecClearTuple(shape->slots[i]);	/* a failed flush may have left one */
	return shape->slots;
}

/* Rows a unique index already had, left out of the table again. */
typedef struct Conflicts
{
	int			n;
	int		   *rows;			/* the caller's row numbers */
	ItemPointerData *tids;		/* where they were put */
} Conflicts;

/*
 * Inserts the slots (rows first..first+n-1), then their index entries.
 * With conflicts, a unique index entry that another row already has (or
 * may have: its writer is in progress) is noted instead of raised.
 */
static void
insert_batch(ResultRelInfo *rri, EState *estate, TupleTableSlot **slots, int n, int first,
			 CommandId cid, BulkInsertState bistate, Conflicts *conflicts)
{
	table_multi_insert(rri->ri_RelationDesc, slots, n, cid, 0, bistate);
	for (int i = 0; i < n; i++)
	{
		if (rri->ri_NumIndices > 0)
		{
			bool		conflict = false;

			list_free(ExecInsertIndexTuples(rri, slots[i], estate, false, conflicts != NULL,
											&conflict, NIL));
			if (conflict)
			{
				conflicts->rows[conflicts->n] = first + i;
				conflicts->tids[conflicts->n++] = slots[i]->tts_tid;
			}
		}
		ExecClearTuple(slots[i]);
	}
}

/*
 * Writes buf's first nrows rows into nocrm.<buf->table>.  Returns -1, with
 * nothing written, when the table needs the executor.  Otherwise the number
 * of rows left for the caller's INSERT ... ON CONFLICT DO NOTHING, their
 * numbers in retry (nrows long; used only with buf->skip_conflicts): the
 * rows a unique index already had, or may have once another transaction
 * ends.  The INSERT waits for that, as ON CONFLICT does.  They are rare:
 * the caller only buffers rows it believes new.
 */
int
nocrm_direct_insert(WriteBuffer *buf, int nrows, int *retry)
{
	Oid			relid = get_relname_relid(buf->table, get_namespace_oid("nocrm", false));
	int			ncols = buf->ncols;
	const Datum *values = buf->values;
	const bool *nulls = buf->nulls;
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
	Conflicts	conflicts = {0, retry, NULL};
	int			nslots = Min(nrows, SLOTS_PER_BATCH);
	int			inbatch = 0;

	/* INSERT refuses these with the right error */
	if (!OidIsValid(relid) || ncols > WRITEBUF_MAX_COLS || nrows == 0 || XactReadOnly ||
		IsInParallelMode())
		return -1;
	/*
	 * A row taken out again is a decoded insert and delete: a subscriber
	 * holding the other transaction's row would stop on the insert.  ON
	 * CONFLICT's speculative insertion decodes as nothing.
	 */
	if (buf->skip_conflicts && XLogLogicalInfoActive())
		return -1;
	rel = table_open(relid, RowExclusiveLock);
	shape = shape_of(buf, rel);
	if (shape == NULL || !shape->direct || (shape->restore_triggers && nocrm_restoring()) ||
		!foreign_keys_present(shape, ncols, nrows, values, nulls))
	{
		table_close(rel, NoLock);
		return -1;
	}
	if (buf->skip_conflicts)
		conflicts.tids = palloc(sizeof(ItemPointerData) * nrows);

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

	slots = shape_slots(shape, rel, nslots);
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
		if (++inbatch == SLOTS_PER_BATCH || r == nrows - 1)
		{
			CHECK_FOR_INTERRUPTS();
			insert_batch(rri, estate, slots, inbatch, r + 1 - inbatch, cid, bistate,
						 buf->skip_conflicts ? &conflicts : NULL);
			inbatch = 0;
		}
	}

	if (bistate)
		FreeBulkInsertState(bistate);
	ExecResetTupleTable(estate->es_tupleTable, false);
	ExecCloseResultRelations(estate);
	ExecCloseRangeTableRelations(estate);
	FreeExecutorState(estate);
	CommandCounterIncrement();
	/* visible to this command now: gone again, for the INSERT to decide */
	for (int i = 0; i < conflicts.n; i++)
		simple_heap_delete(rel, &conflicts.tids[i]);
	if (conflicts.n > 0)
		CommandCounterIncrement();
	table_close(rel, NoLock);
	return conflicts.n;
}
