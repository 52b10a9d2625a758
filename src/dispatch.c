/*
 * dispatch.c — runs the automations for raised events, as the Butler.
 *
 * Actions change leads through ordinary SQL, so their changes raise events
 * of their own and fire the triggers again, nested inside the action.  The
 * chain of automations currently running is kept here: it makes the Butler
 * the actor, bounds the depth, and stops a rule from re-firing on a change
 * its own chain made.
 */
#include "nocrm.h"

#include "access/xact.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/fmgrprotos.h"
#include "utils/timestamp.h"

#define MAX_CHAIN 101			/* nocrm.max_chain_depth is at most 100 */

static int32 chain[MAX_CHAIN];
static int	chain_len = 0;

/*
 * The run being recorded: its actions' outcomes, as a JSON array in the
 * making (in run_context, which outlives the actions' SPI calls).
 */
typedef struct RunOutcomes
{
	JsonbParseState *state;
	MemoryContext context;
	int			nactions;
} RunOutcomes;

static RunOutcomes *run_outcomes = NULL;

/* The person whose change started the current chain. */
static int64 root_actor = -1;
static bool root_actor_given = false;
static int64 given_root_actor = -1;

static SPIPlanPtr plan_describe;

/* The last nocrm.actor value resolved, so each row need not look it up. */
static char *actor_text = NULL;
static int64 actor_id = -1;
static uint64 actor_generation = 0;

static void
dispatch_xact_callback(XactEvent event, void *arg)
{
	/* A backstop: every path that buffers rows flushes them itself. */
	if ((event == XACT_EVENT_PRE_COMMIT || event == XACT_EVENT_PRE_PREPARE) &&
		nocrm_buffered_rows() > 0)
	{
		elog(WARNING, "nocrm: %d buffered rows written at commit", nocrm_buffered_rows());
		PushActiveSnapshot(GetTransactionSnapshot());
		nocrm_buffers_flush();
		PopActiveSnapshot();
	}
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_COMMIT ||
		event == XACT_EVENT_PARALLEL_ABORT || event == XACT_EVENT_PREPARE)
	{
		chain_len = 0;
		nocrm_rules_reset_pins();
		nocrm_assign_xact_end();
		nocrm_preassign_xact_end();
		nocrm_buffers_xact_end();
		nocrm_plans_xact_end();
	}
}

static void
dispatch_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						  SubTransactionId parentSubid, void *arg)
{
	if (event == SUBXACT_EVENT_ABORT_SUB)
	{
		nocrm_assign_subxact_abort(mySubid);
		nocrm_preassign_subxact_abort(mySubid);
		nocrm_buffers_subxact_abort(mySubid);
	}
	else if (event == SUBXACT_EVENT_COMMIT_SUB)
		nocrm_assign_subxact_commit(mySubid, parentSubid);
}

void
nocrm_dispatch_init(void)
{
	RegisterXactCallback(dispatch_xact_callback, NULL);
	RegisterSubXactCallback(dispatch_subxact_callback, NULL);
}

int
nocrm_chain_depth(void)
{
	return chain_len;
}

/* Top of the chain: an automation id, or minus a stage trigger id. */
int32
nocrm_chain_automation(void)
{
	return chain_len > 0 ? chain[chain_len - 1] : 0;
}

void
nocrm_chain_push(int32 id)
{
	if (chain_len >= MAX_CHAIN)
		elog(ERROR, "automation chain too deep");
	chain[chain_len++] = id;
}

/*
 * Enters the chain as automation id (or stage trigger -id); the first to
 * enter notes whose change started it, for the run log.
 */
void
nocrm_chain_enter(int32 id)
{
	if (chain_len == 0)
	{
		root_actor = root_actor_given ? given_root_actor : nocrm_current_actor();
		root_actor_given = false;
	}
	nocrm_chain_push(id);
}

/* For a delayed action: the person whose change queued it (-1: unknown). */
void
nocrm_set_root_actor(int64 actor)
{
	root_actor_given = true;
	given_root_actor = actor;
}

/* The person whose change started the current chain, or the current actor. */
int64
nocrm_root_actor(void)
{
	return chain_len > 0 ? root_actor : nocrm_current_actor();
}

void
nocrm_chain_pop(void)
{
	Assert(chain_len > 0);
	chain_len--;
}

bool
nocrm_chain_contains(int32 id)
{
	for (int i = 0; i < chain_len; i++)
		if (chain[i] == id)
			return true;
	return false;
}

/*
 * The actor of the current change: the Butler inside an automation's chain,
 * else the user named by nocrm.actor, else -1 (unknown).
 */
int64
nocrm_current_actor(void)
{
	bool		found;
	int64		id;
	const char *text = nocrm_actor ? nocrm_actor : "";

	if (chain_len > 0)
		return BUTLER_ID;
	if (text[0] == '\0')
		return -1;
	/* Valid until the setting or nocrm.users changes (the rule cache's signal). */
	if (actor_text != NULL && strcmp(actor_text, text) == 0 &&
		actor_generation == nocrm_rules_generation())
		return actor_id;

	if (strspn(text, "0123456789") == strlen(text) && strlen(text) < 19)
		id = nocrm_lookup_id("SELECT id FROM nocrm.users WHERE id = $1",
							 Int64GetDatum(strtoll(text, NULL, 10)), INT8OID, &found);
	else
		id = nocrm_lookup_id("SELECT id FROM nocrm.users WHERE lower(email) = lower($1)",
							 CStringGetTextDatum(text), TEXTOID, &found);
	if (!found)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("nocrm.actor names an unknown user: \"%s\"", text),
				 errdetail("The setting must be the id or email of a row in nocrm.users."),
				 errhint("SET nocrm.actor to a user's id or email, or RESET nocrm.actor.")));
	if (id == BUTLER_ID)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("nocrm.actor cannot be The Butler"),
				 errdetail("Only automations act as The Butler, so history can tell people from automations."),
				 errhint("SET nocrm.actor to the human user making the change.")));

	if (actor_text)
		pfree(actor_text);
	actor_text = MemoryContextStrdup(TopMemoryContext, text);
	actor_id = id;
	actor_generation = nocrm_rules_generation();
	return id;
}

/* Can nocrm_current_actor() answer without SPI? */
bool
nocrm_actor_known(void)
{
	const char *text = nocrm_actor ? nocrm_actor : "";

	return chain_len > 0 || text[0] == '\0' ||
		(actor_text != NULL && strcmp(actor_text, text) == 0 &&
		 actor_generation == nocrm_rules_generation());
}

/* "key": value (a jsonb, or null) into an object being built */
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
	run_outcomes->nactions++;
	MemoryContextSwitchTo(old);
}

/*
 * One row of nocrm.automation_runs.  id > 0 is an automation, < 0 a stage
 * trigger.  Recorded unless nocrm.history is none.
 */
void
nocrm_runlog_record(int32 id, LeadState *lead, RaisedEvent *ev, const char *event,
					const char *outcome, const char *actions, int nactions, const char *detail)
{
	record_run_as(id, lead, ev, event, outcome,
				  actions ? DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(actions))) : NULL,
				  nactions, detail, nocrm_root_actor());
}

static WriteBuffer runs_buffer = {
	.what = "recording an automation run failed",
	.sql = "INSERT INTO nocrm.automation_runs (automation_id, stage_trigger_id, lead_id, event,"
	"  mode, outcome, change, actor_id, chain_depth, actions, detail, nactions, created_at)"
	" SELECT r.automation_id, r.stage_trigger_id, r.lead_id, r.event, r.mode, r.outcome,"
	"        r.change, r.actor_id, r.chain_depth, r.actions, r.detail, r.nactions, r.created_at"
	"   FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) WITH ORDINALITY"
	"        AS r(automation_id, stage_trigger_id, lead_id, event, mode, outcome, change,"
	"             actor_id, chain_depth, actions, detail, nactions, created_at, ord)"
	"  ORDER BY r.ord",
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

	if (nocrm_history_level == HISTORY_NONE)
		return;
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
	values[8] = Int32GetDatum(chain_len + 1);
	values[9] = actions ? JsonbPGetDatum(actions)
		: DirectFunctionCall1(jsonb_in, CStringGetDatum("[]"));
	values[10] = detail ? CStringGetTextDatum(detail) : (Datum) 0;
	nulls[10] = detail == NULL;
	values[11] = Int32GetDatum(nactions);
	values[12] = TimestampTzGetDatum(GetCurrentTimestamp());
	nocrm_buffer_row(&runs_buffer, values, nulls);
}

static void
log_stop(LeadState *lead, Rule *rule, RaisedEvent *ev, const char *why)
{
	if (nocrm_history_level == HISTORY_NONE)
		return;
	nocrm_history(lead->id, "automation.stopped", rule->id, NULL, NULL,
				  psprintf("automation %d \"%s\" not run for %s: %s",
						   rule->id, rule->name, nocrm_event_names[ev->event], why));
	nocrm_runlog_record(rule->id, lead, ev, nocrm_event_names[ev->event], "stopped",
						NULL, 0, why);
}

/* Test mode: what the actions would do, described, instead of doing it. */
static void
describe_instead(Rule *rule, LeadState *lead, RaisedEvent *ev)
{
	Oid			types[4] = {INT4OID, JSONBOID, INT8OID, TEXTOID};
	Datum		args[4] = {Int32GetDatum(rule->id), JsonbPGetDatum(rule->actions_json),
		Int64GetDatum(lead->id), CStringGetTextDatum(nocrm_event_names[ev->event])};
	bool		isnull;
	int			ret;

	nocrm_plan(&plan_describe, "SELECT nocrm.describe_actions($1, $2, $3, $4)::text", 4, types);
	ret = SPI_execute_plan(plan_describe, args, NULL, false, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "describing actions failed: %s", SPI_result_code_string(ret));
	nocrm_runlog_record(rule->id, lead, ev, nocrm_event_names[ev->event], "test",
						TextDatumGetCString(SPI_getbinval(SPI_tuptable->vals[0],
														  SPI_tuptable->tupdesc, 1, &isnull)),
						rule->nactions, "test mode: nothing was done");
}

/*
 * The rule's assign action found the lead already given the owner it chose
 * before the row was written: record it, and raise what the UPDATE would
 * have raised, inside this rule's chain.
 */
static void
assigned_before_insert(Rule *rule, RuleAction *action, LeadState *lead, int64 user_id,
					   bool fallback)
{
	LeadState	assigned = *lead;
	RaisedEvent events[2];

	nocrm_record_assignment(rule, action, lead, user_id, fallback);
	assigned.has_owner = true;
	assigned.owner_id = user_id;
	assigned.latest_locked = true;
	memset(events, 0, sizeof(events));
	events[0].event = EV_ASSIGNED;
	events[1].event = EV_ANY_UPDATE;
	for (int i = 0; i < 2; i++)
	{
		events[i].old_value = nocrm_jsonb_int_pair("user_id", 0, true);
		events[i].new_value = nocrm_jsonb_int_pair("user_id", user_id, false);
	}
	nocrm_dispatch(&assigned, events, 2);
	/* the lead as the rule leaves it, unless something wrote it since */
	lead->has_owner = true;
	lead->owner_id = user_id;
}

static void
run_action(Rule *rule, RuleAction *action, LeadState *lead, RaisedEvent *ev)
{
	int64		user_id;
	bool		fallback;

	if (action == &rule->actions[0] && nocrm_preassign_any() &&
		nocrm_preassign_take(lead->id, rule->id, action->action_no, &user_id, &fallback))
		assigned_before_insert(rule, action, lead, user_id, fallback);
	else
		nocrm_run_action(rule, action, lead, ev);
}

/*
 * Runs actions [first, last) of a rule as the Butler, inside the chain, and
 * records the run with each action's outcome.
 */
static void
run_actions_logged(Rule *rule, RuleAction *actions, int nactions, LeadState *lead,
				   RaisedEvent *ev)
{
	RunOutcomes outcomes;
	RunOutcomes *outer = run_outcomes;
	int64		actor;
	Jsonb	   *recorded;

	outcomes.state = NULL;
	outcomes.context = CurrentMemoryContext;
	outcomes.nactions = 0;
	pushJsonbValue(&outcomes.state, WJB_BEGIN_ARRAY, NULL);
	run_outcomes = &outcomes;
	nocrm_rules_pin();
	nocrm_chain_enter(rule->id);
	actor = root_actor;			/* still the chain's person once we have left it */
	PG_TRY();
	{
		for (int i = 0; i < nactions; i++)
		{
			CHECK_FOR_INTERRUPTS();
			run_action(rule, &actions[i], lead, ev);
		}
	}
	PG_FINALLY();
	{
		chain_len--;
		nocrm_rules_unpin();
		run_outcomes = outer;
	}
	PG_END_TRY();
	recorded = JsonbValueToJsonb(pushJsonbValue(&outcomes.state, WJB_END_ARRAY, NULL));
	record_run_as(rule->id, lead, ev, nocrm_event_names[ev->event], "fired",
				  recorded, outcomes.nactions, NULL, actor);
}

static void
run_rule(Rule *rule, LeadState *lead, RaisedEvent *ev)
{
	if (rule->test_mode)
		describe_instead(rule, lead, ev);
	else
		run_actions_logged(rule, rule->actions, rule->nactions, lead, ev);
}

/*
 * Runs one action as the given automation, outside any event: used for
 * delayed actions when they fall due.  Its changes chain as usual.
 */
void
nocrm_run_as_automation(Rule *rule, RuleAction *action, LeadState *lead, RaisedEvent *ev)
{
	run_actions_logged(rule, action, 1, lead, ev);
	/* No outer statement will write round-robin counts for us. */
	nocrm_flush_writes();
}

/*
 * Has an automation already undone or replaced what this event reports?
 * E.g. a lead inserted without owner and assigned by a lead.creation rule is
 * no longer unassigned: its lead.unassigned is dropped, the assignment
 * raised lead.assigned of its own.
 */
static bool
superseded(RaisedEvent *ev, LeadState *then, LeadState *now)
{
	switch (ev->event)
	{
		case EV_STATUS_CHANGED:
			return now->status != then->status;
		case EV_STEP_CHANGED:
			return now->has_step != then->has_step || now->step_id != then->step_id;
		case EV_ASSIGNED:
		case EV_UNASSIGNED:
			return now->has_owner != then->has_owner || now->owner_id != then->owner_id;
		default:
			return false;
	}
}

/* The lead read again, as the rules are to see it (preassign.c). */
static bool
refetch(int64 lead_id, LeadState *lead, bool lock)
{
	if (!(lock ? nocrm_lead_fetch_locked(lead_id, lead) : nocrm_lead_fetch(lead_id, lead)))
		return false;
	nocrm_preassign_hide_owner(lead);
	return true;
}

/*
 * Stage triggers go after an event's automations, on the lead as it is
 * then.  Returns whether the lead must be read again.
 */
static bool
run_stage_triggers(LeadState *lead, LeadState **current, LeadState *changed_lead,
				   RaisedEvent *ev, bool stale, bool *locked)
{
	if (lead->deleted || !nocrm_stage_triggers_exist())
		return stale;
	if (!stale && !*locked && lead->latest_locked)
		*locked = true;
	else if (stale || !*locked)
	{
		if (!refetch(lead->id, changed_lead, !*locked))
			return false;
		*locked = true;
		*current = changed_lead;
	}
	return nocrm_stage_triggers(*current, ev, NULL);
}

/*
 * Records each event and runs the rules listening to it.  Events are
 * handled in the order given, rules for one event in id order.  Once a rule
 * has run, the lead is read again, so later rules see its changes.
 */
void
nocrm_dispatch(LeadState *lead, RaisedEvent *events, int nevents)
{
	LeadState	changed_lead;
	LeadState  *current = lead;
	bool		stale = false;
	bool		locked = false;	/* we hold the lead's row lock and read it since */

	for (int e = 0; e < nevents; e++)
	{
		RaisedEvent *ev = &events[e];
		Rule	  **rules;
		int			nrules;

		if (stale)
		{
			if (!refetch(lead->id, &changed_lead, false))
				return;			/* an automation deleted it */
			current = &changed_lead;
			stale = false;
		}
		if (superseded(ev, lead, current))
			continue;

		if (nocrm_history_level == HISTORY_ALL)
			nocrm_history(lead->id, nocrm_event_names[ev->event], nocrm_chain_automation(),
						  ev->old_value, ev->new_value, ev->detail);
		else if (chain_len == 0)
			(void) nocrm_current_actor();	/* a bad nocrm.actor is an error either way */

		if (!nocrm_automations_enabled)
			continue;

		rules = nocrm_rules_for_change(ev, &nrules);
		if (nrules == 0)
		{
			stale = run_stage_triggers(lead, &current, &changed_lead, ev, stale, &locked);
			continue;
		}

		/*
		 * Judge conditions on the lead's latest committed version, holding
		 * its row lock, so a concurrent change cannot slip in between the
		 * check and the actions.
		 */
		if (!locked && !lead->deleted && lead->latest_locked && !stale)
			locked = true;
		else if (!locked && !lead->deleted)
		{
			if (!refetch(lead->id, &changed_lead, true))
				return;			/* deleted meanwhile */
			current = &changed_lead;
			locked = true;
			stale = false;
		}

		nocrm_rules_pin();
		PG_TRY();
		{
			for (int r = 0; r < nrules; r++)
			{
				Rule	   *rule = rules[r];

				if (stale)
				{
					if (!refetch(lead->id, &changed_lead, false))
						break;
					current = &changed_lead;
					stale = false;
				}
				if (!nocrm_rule_matches(rule, current, ev))
					continue;
				if (nocrm_chain_contains(rule->id))
					log_stop(current, rule, ev, "it already ran in this chain");
				else if (chain_len >= nocrm_max_chain_depth)
					log_stop(current, rule, ev,
							 psprintf("chain depth limit %d reached (nocrm.max_chain_depth)",
									  nocrm_max_chain_depth));
				else
				{
					uint64		writes = nocrm_lead_write_count();

					/* the rule's own copy: an assignment made before the insert updates it */
					if (current == lead)
					{
						changed_lead = *lead;
						current = &changed_lead;
					}
					run_rule(rule, current, ev);
					if (nocrm_lead_write_count() != writes)
						stale = !lead->deleted;
				}
			}
		}
		PG_FINALLY();
		{
			nocrm_rules_unpin();
		}
		PG_END_TRY();
		stale = run_stage_triggers(lead, &current, &changed_lead, ev, stale, &locked);
	}
}
