/*
 * alerts.c — the failures the drain met, handed to nocrm.record_failures()
 * in the transaction that records them: it counts them per automation,
 * raises the alerts (dead letters, failing and disabled automations) and
 * disables an automation at nocrm.auto_disable_failures.
 *
 * An alert is never worth an outcome: the call runs in a subtransaction,
 * and an error in it (a lock wait past lock_timeout, a broken template)
 * only costs that round's alerts, with a WARNING.
 */
#include "nocrm.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"

static SPIPlanPtr plan_record_failures;

static Datum
int_array(Datum *values, bool *nulls, int n, Oid type)
{
	int			dims[1] = {n};
	int			lbs[1] = {1};

	if (type == INT4OID)
		return PointerGetDatum(construct_md_array(values, nulls, 1, dims, lbs, INT4OID, 4, true,
												  TYPALIGN_INT));
	return PointerGetDatum(construct_md_array(values, nulls, 1, dims, lbs, INT8OID, 8,
											  FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}

static Datum
text_array(Datum *values, bool *nulls, int n)
{
	int			dims[1] = {n};
	int			lbs[1] = {1};

	return PointerGetDatum(construct_md_array(values, nulls, 1, dims, lbs, TEXTOID, -1, false,
											  TYPALIGN_INT));
}

/* nocrm.record_failures(args[0..5]), in its subtransaction. */
static void
record_failures(void *arg)
{
	Oid			types[6] = {INT4ARRAYOID, INT8ARRAYOID, INT8ARRAYOID, TEXTARRAYOID,
	TEXTARRAYOID, BOOLARRAYOID};

	nocrm_plan(&plan_record_failures,
			   "SELECT nocrm.record_failures($1, $2, $3, $4, $5, $6)", 6, types);
	nocrm_exec_plan(plan_record_failures, (Datum *) arg, NULL, SPI_OK_SELECT,
					"recording failures for the alerts failed");
	SPI_freetuptable(SPI_tuptable);
}

/*
 * Records n failures.  Needs an SPI connection; changes nothing the caller
 * has done if it fails.  A cancel is passed on.
 */
void
nocrm_alerts_note(int n, const AlertFailure *f)
{
	Datum		args[6];
	Datum	   *automations = palloc(sizeof(Datum) * n);
	bool	   *automation_nulls = palloc(sizeof(bool) * n);
	Datum	   *leads = palloc(sizeof(Datum) * n);
	bool	   *lead_nulls = palloc(sizeof(bool) * n);
	Datum	   *queue = palloc(sizeof(Datum) * n);
	bool	   *queue_nulls = palloc(sizeof(bool) * n);
	Datum	   *kinds = palloc(sizeof(Datum) * n);
	bool	   *kind_nulls = palloc0(sizeof(bool) * n);
	Datum	   *errors = palloc(sizeof(Datum) * n);
	bool	   *error_nulls = palloc(sizeof(bool) * n);
	Datum	   *dead = palloc(sizeof(Datum) * n);
	ErrorData  *edata;

	/* before ALTER EXTENSION UPDATE to 1.3 there is nothing to record them in */
	if (n <= 0 || !nocrm_table_exists("alerts"))
		return;
	for (int i = 0; i < n; i++)
	{
		automations[i] = Int32GetDatum(f[i].automation_id);
		automation_nulls[i] = f[i].automation_id <= 0;
		leads[i] = Int64GetDatum(f[i].lead_id);
		lead_nulls[i] = f[i].lead_id <= 0;
		queue[i] = Int64GetDatum(f[i].queue_id);
		queue_nulls[i] = f[i].queue_id <= 0;
		kinds[i] = CStringGetTextDatum(f[i].kind);
		errors[i] = f[i].error ? CStringGetTextDatum(f[i].error) : (Datum) 0;
		error_nulls[i] = f[i].error == NULL;
		dead[i] = BoolGetDatum(f[i].dead);
	}
	args[0] = int_array(automations, automation_nulls, n, INT4OID);
	args[1] = int_array(leads, lead_nulls, n, INT8OID);
	args[2] = int_array(queue, queue_nulls, n, INT8OID);
	args[3] = text_array(kinds, kind_nulls, n);
	args[4] = text_array(errors, error_nulls, n);
	args[5] = PointerGetDatum(construct_array(dead, n, BOOLOID, 1, true, TYPALIGN_CHAR));

	edata = nocrm_in_subtransaction(record_failures, args, NULL);
	if (edata != NULL)
	{
		if (edata->sqlerrcode == ERRCODE_QUERY_CANCELED)
			ReThrowError(edata);
		ereport(WARNING,
				(errmsg("nocrm: %d failures were not recorded for the alerts: %s", n, edata->message),
				 errdetail("The outcomes of the queue items are recorded; only their alerts are missing."),
				 errhint("See nocrm.dead_letters and nocrm.queue.last_error.")));
		FreeErrorData(edata);
	}
}

/*
 * Old failures go with the run log, a small batch per call.  Before ALTER
 * EXTENSION UPDATE to 1.3 the table does not exist yet: nothing to do.
 */
void
nocrm_alerts_prune(int retention_seconds)
{
	static SPIPlanPtr plan_prune;
	Oid			types[1] = {INT4OID};
	Datum		args[1] = {Int32GetDatum(retention_seconds)};

	if (!nocrm_table_exists("automation_failures"))
		return;
	nocrm_plan(&plan_prune,
			   "DELETE FROM nocrm.automation_failures WHERE id IN ("
			   "  SELECT id FROM nocrm.automation_failures"
			   "   WHERE failed_at < now() - make_interval(secs => $1)"
			   "   ORDER BY failed_at LIMIT 1000 FOR UPDATE SKIP LOCKED)",
			   1, types);
	nocrm_exec_plan(plan_prune, args, NULL, SPI_OK_DELETE, "pruning failures failed");
}
