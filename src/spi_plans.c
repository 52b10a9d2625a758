/*
 * spi_plans.c — prepared SPI plans kept for the life of the backend.
 */
#include "nocrm.h"

#include "access/htup_details.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "utils/datum.h"
#include "utils/guc.h"

/*
 * Returns the plan in *slot, preparing and keeping it on first use.  A kept
 * plan is revalidated by the plan cache when the tables it uses change.
 */
SPIPlanPtr
nocrm_plan(SPIPlanPtr *slot, const char *sql, int nargs, Oid *argtypes)
{
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
 * The extension owner's rights with a pinned search_path, entered only
 * around the rare SPI work (a cache reload) of functions that run as the
 * caller on every row.  SECURITY DEFINER would pay for the switch on every
 * call.  Errors need no cleanup: (sub)transaction abort restores both.
 */
void
nocrm_owner_enter(OwnerContext *ctx)
{
	GetUserIdAndSecContext(&ctx->saved_userid, &ctx->saved_sec_context);
	SetUserIdAndSecContext(nocrm_extension_owner(),
						   ctx->saved_sec_context | SECURITY_LOCAL_USERID_CHANGE);
	ctx->guc_nest_level = NewGUCNestLevel();
	(void) set_config_option("search_path", "pg_catalog, pg_temp", PGC_USERSET,
							 PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
}

void
nocrm_owner_leave(OwnerContext *ctx)
{
	AtEOXact_GUC(true, ctx->guc_nest_level);
	SetUserIdAndSecContext(ctx->saved_userid, ctx->saved_sec_context);
}
