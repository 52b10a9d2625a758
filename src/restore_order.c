/*
 * restore_order.c — a parallel restore loads child rows before their parents.
 *
 * The foreign keys between the extension's tables exist before any data is
 * loaded (CREATE EXTENSION makes them), and pg_restore -j loads the data of
 * extension tables in any order: the archive gives each TABLE DATA item a
 * dependency on its table only.  A child table loaded before its parent
 * would fail its foreign key.
 *
 * So in restore mode (restore.c) a row whose parent row is not there yet is
 * held in nocrm.restore_held instead of inserted (nocrm_restore_hold, a
 * BEFORE ROW trigger), and at the end of every restore-mode INSERT or COPY
 * into these tables the held rows whose parents are all there are inserted
 * (nocrm_restore_complete, an AFTER STATEMENT trigger), repeatedly, until
 * none moves.  The foreign keys check every row as usual.
 *
 * Loads run concurrently, so a row held by one load may wait for a parent
 * loaded by another that has not committed yet.  The ends of the loads are
 * therefore serialized by an advisory lock held to commit: whichever of the
 * two ends second sees the other's rows and moves the held ones.  After the
 * last load nothing is held (pg_dump's data are one consistent snapshot).
 *
 * The application's foreign keys to these tables are made after the data
 * (post-data), but pg_restore -j makes one as soon as its own table's data
 * are in, not waiting for the extension's: in restore mode the ALTER TABLE
 * waits (nocrm_restore_fk_wait, an event trigger) until the referenced
 * table is loaded (nocrm.restore_loaded) and none of its rows is held.
 */
#include "nocrm.h"

#include "access/htup_details.h"
#include "catalog/pg_attribute.h"
#include "commands/event_trigger.h"
#include "commands/trigger.h"
#include "catalog/namespace.h"
#include "nodes/parsenodes.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "nodes/pg_list.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"

PG_FUNCTION_INFO_V1(nocrm_restore_hold);
PG_FUNCTION_INFO_V1(nocrm_restore_complete);
PG_FUNCTION_INFO_V1(nocrm_load_held_rows);
PG_FUNCTION_INFO_V1(nocrm_restore_fk_wait);

/* An ALTER TABLE gives up waiting after this long with no COPY into the extension's tables. */
#define FK_WAIT_STALLED_MS	10000
#define FK_WAIT_POLL_MS		100

/* One foreign key of a table to another table of the extension. */
typedef struct ParentKey
{
	Oid			conoid;
	Oid			confrelid;
	int			nkeys;
	AttrNumber	conkey[INDEX_MAX_KEYS];
	AttrNumber	confkey[INDEX_MAX_KEYS];
} ParentKey;

/*
 * Parent keys seen present, per foreign key of one integer column: most
 * child rows refer to a few parents (users, pipelines) or come grouped by
 * parent (tags by lead), so most checks need no lookup.  Only decides
 * whether to hold a row: the foreign key still checks it.  Per transaction.
 */
#define SEEN_SLOTS	1024

/* The existence check of each foreign key's parent row, by constraint. */
typedef struct ParentPlan
{
	Oid			conoid;
	SPIPlanPtr	plan;
	bool		cacheable;		/* one int2/int4/int8 column */
	LocalTransactionId seen_lxid;
	int64	   *seen;			/* SEEN_SLOTS keys, valid where seen_valid */
	bool	   *seen_valid;
} ParentPlan;

static ParentPlan *parent_plans = NULL;
static int	nparent_plans = 0;
static int	maxparent_plans = 0;
static SPIPlanPtr plan_hold = NULL;
static bool completing = false;
static bool holding = false;	/* the hold's own INSERT into restore_held is no load */

/* The table's foreign keys to other tables of its schema (copied: SPI may rebuild the relcache). */
static List *
parent_keys(Relation rel)
{
	List	   *out = NIL;
	ListCell   *lc;
	Oid			nsp = RelationGetNamespace(rel);

	foreach(lc, RelationGetFKeyList(rel))
	{
		ForeignKeyCacheInfo *fk = lfirst_node(ForeignKeyCacheInfo, lc);
		ParentKey  *pk;

		/* a self-reference is checked at the end of the load's own statement */
		if (fk->confrelid == RelationGetRelid(rel) || get_rel_namespace(fk->confrelid) != nsp)
			continue;
		pk = palloc(sizeof(ParentKey));
		pk->conoid = fk->conoid;
		pk->confrelid = fk->confrelid;
		pk->nkeys = fk->nkeys;
		memcpy(pk->conkey, fk->conkey, sizeof(pk->conkey));
		memcpy(pk->confkey, fk->confkey, sizeof(pk->confkey));
		out = lappend(out, pk);
	}
	return out;
}

static char *
qualified_name(Oid relid)
{
	return quote_qualified_identifier(get_namespace_name(get_rel_namespace(relid)), get_rel_name(relid));
}

static ParentPlan *
parent_plan(Oid relid, ParentKey *pk)
{
	StringInfoData sql;
	Oid			types[INDEX_MAX_KEYS];
	SPIPlanPtr	plan;
	ParentPlan *pp;

	for (int i = 0; i < nparent_plans; i++)
		if (parent_plans[i].conoid == pk->conoid)
			return &parent_plans[i];

	initStringInfo(&sql);
	appendStringInfo(&sql, "SELECT 1 FROM ONLY %s p WHERE ", qualified_name(pk->confrelid));
	for (int i = 0; i < pk->nkeys; i++)
	{
		appendStringInfo(&sql, "%sp.%s = $%d", i > 0 ? " AND " : "",
						 quote_identifier(get_attname(pk->confrelid, pk->confkey[i], false)), i + 1);
		types[i] = get_atttype(relid, pk->conkey[i]);
	}
	appendStringInfoString(&sql, " LIMIT 1");
	plan = SPI_prepare(sql.data, pk->nkeys, types);
	if (plan == NULL || SPI_keepplan(plan) != 0)
		elog(ERROR, "preparing the parent check \"%s\" failed", sql.data);
	if (nparent_plans == maxparent_plans)
	{
		maxparent_plans = Max(16, maxparent_plans * 2);
		parent_plans = parent_plans
			? repalloc(parent_plans, maxparent_plans * sizeof(ParentPlan))
			: MemoryContextAlloc(TopMemoryContext, maxparent_plans * sizeof(ParentPlan));
	}
	pp = &parent_plans[nparent_plans++];
	memset(pp, 0, sizeof(*pp));
	pp->conoid = pk->conoid;
	pp->plan = plan;
	pp->cacheable = pk->nkeys == 1 &&
		(types[0] == INT8OID || types[0] == INT4OID || types[0] == INT2OID);
	if (pp->cacheable)
	{
		pp->seen = MemoryContextAlloc(TopMemoryContext, SEEN_SLOTS * sizeof(int64));
		pp->seen_valid = MemoryContextAllocZero(TopMemoryContext, SEEN_SLOTS * sizeof(bool));
	}
	return pp;
}

static int64
key_value(Datum d, Oid type)
{
	return type == INT8OID ? DatumGetInt64(d) : type == INT4OID ? DatumGetInt32(d) : DatumGetInt16(d);
}

/* Is every parent row this row refers to there (visible now)? */
static bool
parents_present(Relation rel, HeapTuple tuple, List *keys)
{
	TupleDesc	desc = RelationGetDescr(rel);
	ListCell   *lc;

	foreach(lc, keys)
	{
		ParentKey  *pk = lfirst(lc);
		Datum		args[INDEX_MAX_KEYS];
		bool		anynull = false;
		int			ret;

		ParentPlan *pp;
		int64		key = 0;
		int			slot = 0;

		for (int i = 0; i < pk->nkeys && !anynull; i++)
			args[i] = heap_getattr(tuple, pk->conkey[i], desc, &anynull);
		if (anynull)
			continue;			/* MATCH SIMPLE: no parent needed */
		pp = parent_plan(RelationGetRelid(rel), pk);
		if (pp->cacheable)
		{
			if (pp->seen_lxid != MyProc->lxid)
			{
				memset(pp->seen_valid, 0, SEEN_SLOTS * sizeof(bool));
				pp->seen_lxid = MyProc->lxid;
			}
			key = key_value(args[0], TupleDescAttr(desc, pk->conkey[0] - 1)->atttypid);
			slot = (int) ((uint64) key % SEEN_SLOTS);
			if (pp->seen_valid[slot] && pp->seen[slot] == key)
				continue;
		}
		ret = SPI_execute_plan(pp->plan, args, NULL, false, 1);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "checking a parent row failed: %s", SPI_result_code_string(ret));
		if (SPI_processed == 0)
			return false;
		if (pp->cacheable)
		{
			pp->seen[slot] = key;
			pp->seen_valid[slot] = true;
		}
	}
	return true;
}

/* The owner of the extension's tables does the holding and moving. */
static void
as_owner(Relation rel, Oid *save_user, int *save_sec)
{
	GetUserIdAndSecContext(save_user, save_sec);
	SetUserIdAndSecContext(rel->rd_rel->relowner,
						   *save_sec | SECURITY_LOCAL_USERID_CHANGE | SECURITY_NOFORCE_RLS);
}

/* BEFORE INSERT FOR EACH ROW: in restore mode, hold a row whose parent is missing. */
Datum
nocrm_restore_hold(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	Relation	rel;
	HeapTuple	tuple;
	List	   *keys;
	Oid			save_user;
	int			save_sec;
	bool		present;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_BEFORE(td->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(td->tg_event) || !TRIGGER_FIRED_BY_INSERT(td->tg_event))
		elog(ERROR, "nocrm_restore_hold: not called as a BEFORE INSERT row trigger");
	tuple = td->tg_trigtuple;
	if (!nocrm_restoring())
		return PointerGetDatum(tuple);

	rel = td->tg_relation;
	keys = parent_keys(rel);
	if (keys == NIL)
		return PointerGetDatum(tuple);

	as_owner(rel, &save_user, &save_sec);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	present = parents_present(rel, tuple, keys);
	if (!present)
	{
		Oid			types[2] = {OIDOID, TEXTOID};
		Datum		args[2];
		Datum		row = heap_copy_tuple_as_datum(tuple, RelationGetDescr(rel));
		int			ret;

		if (plan_hold == NULL)
		{
			plan_hold = SPI_prepare("INSERT INTO nocrm.restore_held (tbl, row) VALUES ($1::regclass, $2)",
									2, types);
			if (plan_hold == NULL || SPI_keepplan(plan_hold) != 0)
				elog(ERROR, "preparing the hold of a restored row failed");
		}
		args[0] = ObjectIdGetDatum(RelationGetRelid(rel));
		args[1] = CStringGetTextDatum(OidOutputFunctionCall(F_RECORD_OUT, row));
		holding = true;
		PG_TRY();
		{
			ret = SPI_execute_plan(plan_hold, args, NULL, false, 0);
		}
		PG_FINALLY();
		{
			holding = false;
		}
		PG_END_TRY();
		if (ret != SPI_OK_INSERT)
			elog(ERROR, "holding a restored row failed: %s", SPI_result_code_string(ret));
	}
	SPI_finish();
	SetUserIdAndSecContext(save_user, save_sec);
	return present ? PointerGetDatum(tuple) : PointerGetDatum(NULL);
}

/*
 * The statement that inserts the held rows of one table whose parents are
 * all there, removing them from nocrm.restore_held.
 */
static char *
move_sql(Oid relid)
{
	Relation	rel = RelationIdGetRelation(relid);
	TupleDesc	desc;
	List	   *keys;
	ListCell   *lc;
	StringInfoData cols,
				vals,
				cond,
				sql;
	char	   *name;
	char	   *row;

	if (!RelationIsValid(rel))
		return NULL;			/* dropped since it was held */
	desc = RelationGetDescr(rel);
	keys = parent_keys(rel);
	name = qualified_name(relid);
	row = psprintf("(h.row::%s)", name);

	initStringInfo(&cols);
	initStringInfo(&vals);
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (att->attisdropped || att->attgenerated)
			continue;
		appendStringInfo(&cols, "%s%s", cols.len ? ", " : "", quote_identifier(NameStr(att->attname)));
		appendStringInfo(&vals, "%s(m.r).%s", vals.len ? ", " : "", quote_identifier(NameStr(att->attname)));
	}

	initStringInfo(&cond);
	foreach(lc, keys)
	{
		ParentKey  *pk = lfirst(lc);

		appendStringInfoString(&cond, " AND (");
		for (int i = 0; i < pk->nkeys; i++)
			appendStringInfo(&cond, "%s.%s IS NULL OR ", row,
							 quote_identifier(get_attname(relid, pk->conkey[i], false)));
		appendStringInfo(&cond, "EXISTS (SELECT 1 FROM ONLY %s p WHERE ", qualified_name(pk->confrelid));
		for (int i = 0; i < pk->nkeys; i++)
			appendStringInfo(&cond, "%sp.%s = %s.%s", i > 0 ? " AND " : "",
							 quote_identifier(get_attname(pk->confrelid, pk->confkey[i], false)), row,
							 quote_identifier(get_attname(relid, pk->conkey[i], false)));
		appendStringInfoString(&cond, "))");
	}
	RelationClose(rel);

	initStringInfo(&sql);
	appendStringInfo(&sql,
					 "WITH moved AS (DELETE FROM nocrm.restore_held h WHERE h.tbl::oid = %u%s RETURNING %s AS r)"
					 " INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM moved m",
					 relid, cond.data, row, name, cols.data, vals.data);
	return sql.data;
}

/*
 * Inserts the held rows whose parents are there, until none moves; returns
 * how many rows are still held.  The caller is connected to SPI.
 */
static int64
complete(void)
{
	int64		left;
	bool		progress;
	int			ret;

	/* to commit: a load ending after this one sees what this one moved or held */
	ret = SPI_execute("SELECT pg_catalog.pg_advisory_xact_lock('nocrm.restore_held'::regclass::oid::integer, 0)",
					  false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "locking the held rows failed: %s", SPI_result_code_string(ret));

	completing = true;
	PG_TRY();
	{
		do
		{
			SPITupleTable *tables;
			uint64		n;

			progress = false;
			ret = SPI_execute("SELECT DISTINCT tbl::oid FROM nocrm.restore_held", false, 0);
			if (ret != SPI_OK_SELECT)
				elog(ERROR, "reading the held rows failed: %s", SPI_result_code_string(ret));
			tables = SPI_tuptable;
			n = SPI_processed;
			for (uint64 i = 0; i < n; i++)
			{
				bool		isnull;
				Oid			relid = DatumGetObjectId(SPI_getbinval(tables->vals[i], tables->tupdesc, 1, &isnull));
				char	   *sql = move_sql(relid);

				if (sql == NULL)
					continue;
				ret = SPI_execute(sql, false, 0);
				if (ret != SPI_OK_INSERT)
					elog(ERROR, "loading held rows failed: %s", SPI_result_code_string(ret));
				if (SPI_processed > 0)
					progress = true;
			}
		} while (progress);
	}
	PG_FINALLY();
	{
		completing = false;
	}
	PG_END_TRY();

	ret = SPI_execute("SELECT count(*) FROM nocrm.restore_held", false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "counting the held rows failed: %s", SPI_result_code_string(ret));
	{
		bool		isnull;

		left = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	}
	return left;
}

/* AFTER INSERT FOR EACH STATEMENT: in restore mode, load the held rows that can be. */
Datum
nocrm_restore_complete(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	Oid			save_user;
	int			save_sec;
	int64		left;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_AFTER(td->tg_event) ||
		!TRIGGER_FIRED_FOR_STATEMENT(td->tg_event))
		elog(ERROR, "nocrm_restore_complete: not called as an AFTER statement trigger");
	if (completing || holding || !nocrm_restoring())
		return PointerGetDatum(NULL);

	as_owner(td->tg_relation, &save_user, &save_sec);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	{
		Oid			types[1] = {OIDOID};
		Datum		args[1] = {ObjectIdGetDatum(RelationGetRelid(td->tg_relation))};
		int			ret;

		ret = SPI_execute_with_args("INSERT INTO nocrm.restore_loaded (tbl) VALUES ($1::regclass)"
									" ON CONFLICT DO NOTHING", 1, types, args, NULL, false, 0);
		if (ret != SPI_OK_INSERT)
			elog(ERROR, "marking a table loaded failed: %s", SPI_result_code_string(ret));
	}
	left = complete();
	SPI_finish();
	SetUserIdAndSecContext(save_user, save_sec);
	if (left > 0)
		ereport(NOTICE,
				(errmsg("%lld restored rows wait in nocrm.restore_held for their parent rows",
						(long long) left),
				 errdetail("A parallel restore loads the tables of nocrm_automation in any order; each row is inserted once the rows it refers to are loaded."),
				 errhint("If the restore is over, the dump lacked those parent rows: see SELECT * FROM nocrm.restore_held.")));
	return PointerGetDatum(NULL);
}

/*
 * nocrm.load_held_rows(): the same by hand, e.g. after loading a missing
 * parent table.  Declared with SET check_function_bodies = off, so the rows
 * it inserts are restored rows (restore.c).
 */
Datum
nocrm_load_held_rows(PG_FUNCTION_ARGS)
{
	int64		left;

	if (!nocrm_restoring())
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("only a role that may restore nocrm_automation's tables can load held rows"),
				 errdetail("Restoring needs superuser or INSERT on nocrm.lead_history.")));
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	left = complete();
	SPI_finish();
	PG_RETURN_INT64(left);
}

/*
 * Waits until the restore has loaded table relid: its load has committed
 * and none of its rows is held.  Gives up (the foreign key then fails as
 * without the wait) when no COPY into the extension's tables has run for
 * FK_WAIT_STALLED_MS: its load may never come (a partial restore), or
 * every pg_restore worker waits here.
 */
static void
wait_loaded(Oid relid, Oid fkrel)
{
	Oid			types[1] = {OIDOID};
	Datum		args[1] = {ObjectIdGetDatum(relid)};
	TimestampTz last_progress = GetCurrentTimestamp();

	for (;;)
	{
		bool		isnull;
		bool		loaded,
					copying;
		int			ret;

		ret = SPI_execute_with_args("SELECT EXISTS (SELECT 1 FROM nocrm.restore_loaded WHERE tbl::oid = $1)"
									"   AND NOT EXISTS (SELECT 1 FROM nocrm.restore_held WHERE tbl::oid = $1),"
									" EXISTS (SELECT 1 FROM pg_catalog.pg_stat_progress_copy p"
									"          JOIN pg_catalog.pg_class c ON c.oid = p.relid"
									"         WHERE c.relnamespace = 'nocrm'::regnamespace AND p.pid <> pg_catalog.pg_backend_pid())",
									1, types, args, NULL, false, 1);
		if (ret != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "reading the restore's progress failed: %s", SPI_result_code_string(ret));
		loaded = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		copying = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
		if (loaded)
			return;
		if (copying)
			last_progress = GetCurrentTimestamp();
		else if (TimestampDifferenceExceeds(last_progress, GetCurrentTimestamp(), FK_WAIT_STALLED_MS))
		{
			ereport(NOTICE,
					(errmsg("foreign key of %s: %s is not loaded yet, not waiting any longer",
							get_rel_name(fkrel), qualified_name(relid)),
					 errdetail("No load into the tables of nocrm_automation has run for %d s.",
							   FK_WAIT_STALLED_MS / 1000)));
			return;
		}
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 FK_WAIT_POLL_MS, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/*
 * ddl_command_start of ALTER TABLE: in restore mode, a foreign key added to
 * a table of the extension waits for that table's data, when the table it
 * is added to has rows to check.
 */
Datum
nocrm_restore_fk_wait(PG_FUNCTION_ARGS)
{
	EventTriggerData *trigdata;
	AlterTableStmt *stmt;
	ListCell   *lc;
	Oid			nsp;
	bool		connected = false;

	if (!CALLED_AS_EVENT_TRIGGER(fcinfo))
		elog(ERROR, "nocrm_restore_fk_wait: not called as an event trigger");
	trigdata = (EventTriggerData *) fcinfo->context;
	if (IsBinaryUpgrade || !IsA(trigdata->parsetree, AlterTableStmt) || !nocrm_restoring())
		PG_RETURN_VOID();
	stmt = (AlterTableStmt *) trigdata->parsetree;
	nsp = get_namespace_oid("nocrm", true);
	foreach(lc, stmt->cmds)
	{
		AlterTableCmd *cmd = lfirst_node(AlterTableCmd, lc);
		Constraint *con;
		Oid			pkrel;

		if (cmd->subtype != AT_AddConstraint || !IsA(cmd->def, Constraint))
			continue;
		con = (Constraint *) cmd->def;
		if (con->contype != CONSTR_FOREIGN || con->skip_validation || con->pktable == NULL)
			continue;
		pkrel = RangeVarGetRelid(con->pktable, NoLock, true);
		if (!OidIsValid(pkrel) || get_rel_namespace(pkrel) != nsp)
			continue;
		if (!connected)
		{
			Oid			fkrel = RangeVarGetRelid(stmt->relation, NoLock, true);
			int			ret;

			if (!OidIsValid(fkrel))
				break;
			if (SPI_connect() != SPI_OK_CONNECT)
				elog(ERROR, "SPI_connect failed");
			connected = true;
			/* an empty table (a schema-only restore) has nothing to check: no wait */
			ret = SPI_execute(psprintf("SELECT 1 FROM ONLY %s LIMIT 1", qualified_name(fkrel)), true, 1);
			if (ret != SPI_OK_SELECT)
				elog(ERROR, "reading %s failed: %s", get_rel_name(fkrel), SPI_result_code_string(ret));
			if (SPI_processed == 0)
				break;
		}
		wait_loaded(pkrel, RangeVarGetRelid(stmt->relation, NoLock, true));
	}
	if (connected)
		SPI_finish();
	PG_RETURN_VOID();
}
