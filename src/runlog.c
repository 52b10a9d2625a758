/*
 * runlog.c — nocrm.automation_runs: one row per firing of an automation or
 * stage trigger, test-mode run, loop stop or refused move, with the
 * outcomes of the actions of a firing collected while they run.
 */
#include "nocrm.h"

#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/timestamp.h"

/* The firing running: its actions counted, their outcomes (if logged) a JSON array in the making. */
static RunOutcomes *run_outcomes = NULL;

/*
 * Whether a run is recorded (nocrm.run_log).  With nocrm.history = actions
 * the action.* and trigger.fired rows of lead_history already say what each
 * firing did, so by default only the runs they don't show are logged.
 */
static bool
run_logged(bool fired)
{
	int			level = nocrm_run_log_level;

	if (level == RUN_LOG_AUTO)
		level = nocrm_history_level == HISTORY_ALL ? RUN_LOG_ALL
			: nocrm_history_level == HISTORY_ACTIONS ? RUN_LOG_EXCEPTIONS
			: RUN_LOG_NONE;
	return level == RUN_LOG_ALL || (level == RUN_LOG_EXCEPTIONS && !fired);
}

/*
 * Starts counting a firing's actions and, unless fired runs are not
 * logged, collecting their outcomes, in the caller's memory context (which
 * must outlive the actions' SPI calls).  Returns the run it interrupts, for
 * nocrm_runlog_resume.
 */
RunOutcomes *
nocrm_runlog_begin(RunOutcomes *outcomes)
{
	RunOutcomes *outer = run_outcomes;

	outcomes->state = NULL;
	outcomes->context = CurrentMemoryContext;
	outcomes->nactions = 0;
	if (run_logged(true))
		pushJsonbValue(&outcomes->state, WJB_BEGIN_ARRAY, NULL);
	run_outcomes = outcomes;
	return outer;
}

/* Back to collecting for the run that was interrupted (also after an error). */
void
nocrm_runlog_resume(RunOutcomes *outer)
{
	run_outcomes = outer;
}

static void record_run_as(int32 id, LeadState *lead, RaisedEvent *ev, const char *event,
						  const char *outcome, Jsonb *actions, int nactions,
						  const char *detail, int64 actor);

/* Adds one action's outcome to the run being recorded. */
void
nocrm_runlog_action(RuleAction *action, Jsonb *old_value, Jsonb *new_value, const char *detail)
{
	MemoryContext old;

	if (run_outcomes == NULL)
		return;
	run_outcomes->nactions++;
	if (run_outcomes->state == NULL)	/* counted, not logged */
		return;
	old = MemoryContextSwitchTo(run_outcomes->context);
	pushJsonbValue(&run_outcomes->state, WJB_BEGIN_OBJECT, NULL);
	nocrm_jsonb_put_int64(&run_outcomes->state, "no", action->action_no + 1);
	nocrm_jsonb_put_string(&run_outcomes->state, "type", nocrm_action_names[action->kind]);
	if (new_value || old_value)
		nocrm_jsonb_put_jsonb(&run_outcomes->state, "result", new_value ? new_value : old_value);
	if (new_value && old_value)
		nocrm_jsonb_put_jsonb(&run_outcomes->state, "before", old_value);
	if (detail)
		nocrm_jsonb_put_string(&run_outcomes->state, "detail", detail);
	pushJsonbValue(&run_outcomes->state, WJB_END_OBJECT, NULL);
	MemoryContextSwitchTo(old);
}

/*
 * One row of nocrm.automation_runs.  id > 0 is an automation, < 0 a stage
 * trigger.  Recorded as nocrm.run_log says; a firing is counted in any case.
 */
void
nocrm_runlog_record(int32 id, LeadState *lead, RaisedEvent *ev, const char *event,
					const char *outcome, const char *actions, int nactions, const char *detail)
{
	bool		fired = strcmp(outcome, "fired") == 0;

	if (fired)
		nocrm_count_firing(id, nactions);
	if (!run_logged(fired))
		return;
	record_run_as(id, lead, ev, event, outcome,
				  actions ? DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(actions))) : NULL,
				  nactions, detail, nocrm_root_actor());
}

static WriteBuffer runs_buffer = {
	.what = "recording an automation run failed",
	.table = "automation_runs",
	.columns = {"automation_id", "stage_trigger_id", "lead_id", "event", "mode", "outcome", "change",
	"actor_id", "chain_depth", "actions", "detail", "nactions", "created_at"},
	.direct = true,
	.ncols = 13,
	.types = {INT4OID, INT4OID, INT8OID, TEXTOID, TEXTOID, TEXTOID, JSONBOID, INT8OID, INT4OID,
	JSONBOID, TEXTOID, INT4OID, TIMESTAMPTZOID},
};

static void
record_run_as(int32 id, LeadState *lead, RaisedEvent *ev, const char *event,
			  const char *outcome, Jsonb *actions, int nactions, const char *detail,
			  int64 actor)
{
	Datum		values[13];
	bool		nulls[13];

	memset(nulls, false, sizeof(nulls));
	values[0] = Int32GetDatum(id);
	nulls[0] = id <= 0;
	values[1] = Int32GetDatum(-id);
	nulls[1] = id >= 0;
	values[2] = Int64GetDatum(lead->id);
	values[3] = CStringGetTextDatum(event);
	values[4] = CStringGetTextDatum(strcmp(outcome, "test") == 0 ? "test" : "live");
	values[5] = CStringGetTextDatum(outcome);
	if (ev && (ev->old_value || ev->new_value))
	{
		JsonbParseState *state = NULL;

		pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
		nocrm_jsonb_put_jsonb(&state, "old", ev->old_value);
		nocrm_jsonb_put_jsonb(&state, "new", ev->new_value);
		values[6] = JsonbPGetDatum(JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_OBJECT, NULL)));
	}
	else
		nulls[6] = true;
	values[7] = Int64GetDatum(actor);
	nulls[7] = actor < 0;
	values[8] = Int32GetDatum(nocrm_chain_depth() + 1);
	values[9] = actions ? JsonbPGetDatum(actions)
		: DirectFunctionCall1(jsonb_in, CStringGetDatum("[]"));
	values[10] = detail ? CStringGetTextDatum(detail) : (Datum) 0;
	nulls[10] = detail == NULL;
	values[11] = Int32GetDatum(nactions);
	values[12] = TimestampTzGetDatum(GetCurrentTimestamp());
	nocrm_buffer_row(&runs_buffer, values, nulls);
}

/* The firing whose outcomes were collected in outcomes, as recorded by actor. */
void
nocrm_runlog_fired(int32 id, LeadState *lead, RaisedEvent *ev, RunOutcomes *outcomes,
				   int64 actor)
{
	Jsonb	   *recorded;

	nocrm_count_firing(id, outcomes->nactions);
	if (outcomes->state == NULL)	/* not collected: fired runs are not logged */
		return;
	recorded = JsonbValueToJsonb(pushJsonbValue(&outcomes->state, WJB_END_ARRAY, NULL));
	record_run_as(id, lead, ev, nocrm_event_names[ev->event], "fired",
				  recorded, outcomes->nactions, NULL, actor);
}
