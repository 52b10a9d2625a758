/*
 * enrollment.c — once_per_lead and at_most_every: may an automation run for
 * this lead now?  One row per (automation, lead) in
 * nocrm.automation_enrollments.  Its primary key settles two transactions
 * firing the same rule for the same lead (the second waits for the first),
 * and a run that rolls back takes its row with it.
 */
#include "nocrm.h"

#include "utils/builtins.h"
#include "utils/timestamp.h"

static SPIPlanPtr plan_enroll;
static SPIPlanPtr plan_last_run;

static Datum
interval_arg(Rule *rule, char *null)
{
	*null = rule->has_min_interval ? ' ' : 'n';
	return rule->has_min_interval ? IntervalPGetDatum(&rule->at_most_every) : (Datum) 0;
}

static const char *
refusal(Rule *rule)
{
	if (!rule->has_min_interval)
		return "it already ran for this lead (once_per_lead)";
	return psprintf("it ran for this lead less than %s ago (at_most_every)",
					DatumGetCString(DirectFunctionCall1(interval_out,
														IntervalPGetDatum(&rule->at_most_every))));
}

/*
 * Whether the rule may run for the lead now; when it may and record is set,
 * the run is written down.  *why says why not.
 */
bool
nocrm_enrollment_admits(Rule *rule, int64 lead_id, bool record, const char **why)
{
	Oid			types[3] = {INT4OID, INT8OID, INTERVALOID};
	Datum		args[3];
	char		nulls[3] = {' ', ' ', ' '};
	int64		found;
	bool		admitted;

	*why = NULL;
	if (!rule->once_per_lead && !rule->has_min_interval)
		return true;
	args[0] = Int32GetDatum(rule->id);
	args[1] = Int64GetDatum(lead_id);
	args[2] = interval_arg(rule, &nulls[2]);
	if (record)
	{
		nocrm_plan(&plan_enroll,
				   "INSERT INTO nocrm.automation_enrollments AS e (automation_id, lead_id)"
				   " VALUES ($1, $2)"
				   " ON CONFLICT (automation_id, lead_id) DO UPDATE"
				   "   SET last_run_at = now(), runs = e.runs + 1"
				   "   WHERE $3 IS NOT NULL AND e.last_run_at <= now() - $3"
				   " RETURNING 1::bigint", 3, types);
		admitted = nocrm_plan_int64(plan_enroll, args, nulls, &found);
	}
	else
	{
		nocrm_plan(&plan_last_run,
				   "SELECT 1::bigint FROM nocrm.automation_enrollments e"
				   " WHERE e.automation_id = $1 AND e.lead_id = $2"
				   "   AND ($3 IS NULL OR e.last_run_at > now() - $3)", 3, types);
		admitted = !nocrm_plan_int64(plan_last_run, args, nulls, &found);
	}
	if (!admitted)
		*why = refusal(rule);
	return admitted;
}
