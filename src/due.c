/*
 * due.c — date rules that fell due (nocrm.date_firings, scheduled by
 * dates.c) fired: through the partial index on due_at, never a scan of the
 * leads; each as the Butler, judged on the lead as it is then.
 */
#include "nocrm.h"

#include "access/xact.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(nocrm_fire_due_date_rules);


typedef struct DueFiring
{
	int32		automation_id;
	int64		lead_id;
	TimestampTz date_value;
	const char *why;			/* fire()'s reason to skip, NULL when it fired */
} DueFiring;

static void
skip_recorded(Rule *rule, LeadState *lead, RaisedEvent *ev, const char *why)
{
	if (nocrm_history_level != HISTORY_NONE)
		nocrm_history(lead->id, "automation.skipped", rule->id, NULL, ev->new_value,
					  psprintf("automation %d \"%s\" not run for lead.date.reached: %s",
							   rule->id, rule->name, why));
	nocrm_runlog_record(rule->id, lead, ev, "lead.date.reached", "skipped", NULL, 0, why);
	nocrm_flush_writes();
}

/* One firing, the rule pinned (its SPI work may reload the cache); NULL when it ran. */
static const char *
fire_pinned(DueFiring *due, Rule *rule)
{
	LeadState	lead;
	RaisedEvent ev;
	const char *why = NULL;

	if (rule->event != EV_DATE_REACHED)
		return "the automation is no longer a date rule";
	if (!nocrm_lead_fetch_locked(due->lead_id, &lead))
		return "the lead was deleted";
	memset(&ev, 0, sizeof(ev));
	ev.event = EV_DATE_REACHED;
	ev.new_value = nocrm_jsonb_pair("date", timestamptz_to_str(due->date_value));
	if (!nocrm_automations_enabled)
		why = "nocrm.automations_enabled is off";
	else if (!nocrm_rule_matches(rule, &lead, &ev))
		why = "its conditions do not hold";
	else
		(void) nocrm_enrollment_admits(rule, lead.id, !rule->test_mode, &why);
	if (why)
	{
		skip_recorded(rule, &lead, &ev, why);
		return why;
	}
	nocrm_run_rule_alone(rule, &lead, &ev);
	return NULL;
}

static const char *
fire(DueFiring *due)
{
	Rule	   *rule = nocrm_rule_by_id(due->automation_id);
	const char *why;

	if (rule == NULL)
		return "the automation is disabled, or no longer compiles";
	nocrm_rules_pin();
	PG_TRY();
	{
		why = fire_pinned(due, rule);
	}
	PG_FINALLY();
	{
		nocrm_rules_unpin();
	}
	PG_END_TRY();
	return why;
}

static void
record(DueFiring *due, const char *state, const char *detail)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[5] = {INT4OID, INT8OID, TIMESTAMPTZOID, TEXTOID, TEXTOID};
	Datum		args[5] = {Int32GetDatum(due->automation_id), Int64GetDatum(due->lead_id),
		TimestampTzGetDatum(due->date_value), CStringGetTextDatum(state),
	detail ? CStringGetTextDatum(detail) : (Datum) 0};
	char		nulls[5] = {' ', ' ', ' ', ' ', detail ? ' ' : 'n'};

	nocrm_plan(&plan,
			   "UPDATE nocrm.date_firings SET state = $4, done_at = clock_timestamp(), detail = $5"
			   " WHERE automation_id = $1 AND lead_id = $2 AND date_value = $3", 5, types);
	nocrm_exec_plan(plan, args, nulls, SPI_OK_UPDATE, "recording a date firing");
}

static void
fire_one(void *arg)
{
	DueFiring  *due = arg;

	due->why = fire(due);
}

/*
 * Fires up to max due firings, oldest first, each in a subtransaction of
 * its own (a failing rule is recorded 'failed' with its error, the others
 * go on).  Rows another drain holds are skipped.  Returns how many were
 * handled.  Needs an SPI connection; runs as the extension owner's drain.
 */
int
nocrm_fire_due_dates(int max)
{
	static SPIPlanPtr plan_due = NULL;
	Oid			types[1] = {INT4OID};
	Datum		args[1] = {Int32GetDatum(max)};
	DueFiring  *due;
	uint64		n;
	int			ret;

	if (max <= 0 || !nocrm_date_rules_exist())
		return 0;
	nocrm_plan(&plan_due,
			   "SELECT automation_id, lead_id, date_value FROM nocrm.date_firings"
			   " WHERE state = 'pending' AND due_at <= now()"
			   " ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED", 1, types);
	ret = SPI_execute_plan(plan_due, args, NULL, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading due date rules failed: %s", SPI_result_code_string(ret));
	n = SPI_processed;
	due = palloc(sizeof(DueFiring) * (n + 1));
	for (uint64 i = 0; i < n; i++)
	{
		HeapTuple	t = SPI_tuptable->vals[i];
		TupleDesc	d = SPI_tuptable->tupdesc;
		bool		isnull;

		due[i].automation_id = DatumGetInt32(SPI_getbinval(t, d, 1, &isnull));
		due[i].lead_id = DatumGetInt64(SPI_getbinval(t, d, 2, &isnull));
		due[i].date_value = DatumGetTimestampTz(SPI_getbinval(t, d, 3, &isnull));
	}
	SPI_freetuptable(SPI_tuptable);

	for (uint64 i = 0; i < n; i++)
	{
		ErrorData  *edata;

		CHECK_FOR_INTERRUPTS();
		due[i].why = NULL;
		edata = nocrm_in_subtransaction(fire_one, &due[i], NULL);
		if (edata == NULL)
			record(&due[i], due[i].why ? "skipped" : "fired", due[i].why);
		else
		{
			AlertFailure f = {due[i].automation_id, due[i].lead_id, 0, "date",
			edata->message, false};

			if (edata->sqlerrcode == ERRCODE_QUERY_CANCELED)
				ReThrowError(edata);	/* the drain was cancelled: the firing stays pending */
			record(&due[i], "failed", edata->message);
			nocrm_alerts_note(1, &f);
			FreeErrorData(edata);
		}
	}
	return (int) n;
}

/* nocrm.fire_due_date_rules(max integer DEFAULT 100): what the drain does each round. */
Datum
nocrm_fire_due_date_rules(PG_FUNCTION_ARGS)
{
	int			max = PG_ARGISNULL(0) ? 100 : PG_GETARG_INT32(0);
	int			n;

	if (max < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max must not be negative")));
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	n = nocrm_fire_due_dates(max);
	SPI_finish();
	PG_RETURN_INT32(n);
}
