/*
 * dispatch.c — runs the automations for raised events, as the Butler: for
 * each event its history row, the matching rules in id order (each inside
 * the chain, chain.c, with its run recorded, runlog.c), then the event's
 * stage triggers.  Also runs delayed actions when they fall due, and resets
 * the per-transaction state of the modules below at transaction end.
 *
 * Actions change leads through ordinary SQL, so their changes raise events
 * of their own and come back here, nested inside the action.
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

static SPIPlanPtr plan_describe;

static void
dispatch_xact_callback(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_PRE_COMMIT || event == XACT_EVENT_PRE_PREPARE)
		nocrm_assign_pre_commit();
	/* A backstop: every path that buffers rows flushes them itself. */
	if ((event == XACT_EVENT_PRE_COMMIT || event == XACT_EVENT_PRE_PREPARE) &&
		nocrm_buffered_rows() > 0)
	{
		elog(WARNING, "nocrm: %d buffered rows written at commit", nocrm_buffered_rows());
		PushActiveSnapshot(GetTransactionSnapshot());
		nocrm_buffers_flush();
		PopActiveSnapshot();
	}
	/* after the flush, whose notifications may add payloads */
	if (event == XACT_EVENT_PRE_COMMIT || event == XACT_EVENT_PRE_PREPARE)
		nocrm_relay_pre_commit(event == XACT_EVENT_PRE_PREPARE);
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_COMMIT ||
		event == XACT_EVENT_PARALLEL_ABORT || event == XACT_EVENT_PREPARE)
	{
		nocrm_chain_reset();
		nocrm_rules_reset_pins();
		nocrm_assign_xact_end();
		nocrm_preassign_xact_end();
		nocrm_buffers_xact_end();
		nocrm_tagset_xact_end();
		nocrm_plans_xact_end();
		nocrm_wake_xact_end(event == XACT_EVENT_COMMIT);
		nocrm_relay_xact_end(event == XACT_EVENT_COMMIT);
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
		nocrm_tagset_subxact_abort();
		nocrm_relay_subxact_abort(mySubid);
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

static void
log_stop(LeadState *lead, Rule *rule, RaisedEvent *ev, const char *why)
{
	if (nocrm_history_level != HISTORY_NONE)
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
	events[0].old_value = events[1].old_value = nocrm_jsonb_int_pair("user_id", 0, true);
	events[0].new_value = events[1].new_value = nocrm_jsonb_int_pair("user_id", user_id, false);
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

	if (action == &rule->actions[0] &&
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
	RunOutcomes *outer = nocrm_runlog_begin(&outcomes);
	int64		actor;

	nocrm_rules_pin();
	nocrm_chain_enter(rule->id);
	actor = nocrm_root_actor();	/* still the chain's person once we have left it */
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
		nocrm_chain_pop();
		nocrm_rules_unpin();
		nocrm_runlog_resume(outer);
	}
	PG_END_TRY();
	nocrm_runlog_fired(rule->id, lead, ev, &outcomes, actor);
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
 * Runs one rule for a lead outside any change (a date rule falling due,
 * dates.c), as the Butler, with no person behind it; its writes flushed.
 */
void
nocrm_run_rule_alone(Rule *rule, LeadState *lead, RaisedEvent *ev)
{
	nocrm_set_root_actor(-1);
	run_rule(rule, lead, ev);
	nocrm_flush_writes();
}

/*
 * Runs an action that was queued with a delay, now that it is due.  Returns
 * NULL when it ran, or why it was not run (the item is then cancelled).
 * The action runs as it was queued, as its automation, outside any event;
 * its changes chain as usual.  The automation's current conditions are
 * checked again unless the action says "recheck": false.
 */
static const char *
run_delayed(int32 automation_id, int action_no, int64 lead_id,
			const char *event, Jsonb *definition, int64 actor)
{
	static SPIPlanPtr plan_automation_exists = NULL;
	Rule	   *rule = nocrm_rule_by_id(automation_id);
	LeadState	lead;
	RaisedEvent ev;
	RuleAction *action;

	if (rule == NULL)
	{
		Oid			types[1] = {INT4OID};
		Datum		args[1] = {Int32GetDatum(automation_id)};
		int64		found;

		nocrm_plan(&plan_automation_exists,
				   "SELECT 1::bigint FROM nocrm.automations WHERE id = $1", 1, types);
		return nocrm_plan_int64(plan_automation_exists, args, NULL, &found)
			? "the automation is disabled" : "the automation was deleted";
	}
	if (!nocrm_lead_fetch(lead_id, &lead))
		return "the lead was deleted";
	action = nocrm_compile_action(rule->name, rule->event, definition, action_no);
	action->delayed = false;
	if (action->recheck && !nocrm_conditions_hold(rule, &lead))
		return "its conditions no longer hold";

	memset(&ev, 0, sizeof(ev));
	ev.event = nocrm_event_from_name(event);
	if (ev.event == EV_COUNT)
		ev.event = rule->event;
	nocrm_set_root_actor(actor);
	run_actions_logged(rule, action, 1, &lead, &ev);
	return NULL;
}

const char *
nocrm_run_delayed(int32 automation_id, int action_no, int64 lead_id,
				  const char *event, Jsonb *definition, int64 actor)
{
	const char *why = run_delayed(automation_id, action_no, lead_id, event, definition, actor);

	/* No statement trigger follows a delayed action: write its rows now. */
	nocrm_flush_writes();
	return why;
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
	/* a lead created at a step was not moved there: triggers watch moves */
	if (lead->deleted || ev->at_creation || !nocrm_stage_triggers_exist())
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
 * handled in the order given, rules for one event by position and id; a
 * rule that ran with stop_processing ends that event's rules.  Once a rule
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
		Rule	   *stopped_by = NULL;
		const char *why;

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
		else if (nocrm_chain_depth() == 0)
			(void) nocrm_current_actor();	/* a bad nocrm.actor is an error either way */

		if (!nocrm_automations_enabled)
			continue;
		/* a row the gate let through for its history only: no rule can match */
		if (nocrm_chain_depth() == 0 && !nocrm_gate_row_rules_wanted())
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
				if (stopped_by)
					log_stop(current, rule, ev,
							 psprintf("automation %d \"%s\" before it stops processing (stop_processing)",
									  stopped_by->id, stopped_by->name));
				else if (nocrm_chain_contains(rule->id))
					log_stop(current, rule, ev, "it already ran in this chain");
				else if (nocrm_chain_depth() >= nocrm_max_chain_depth)
					log_stop(current, rule, ev,
							 psprintf("chain depth limit %d reached (nocrm.max_chain_depth)",
									  nocrm_max_chain_depth));
				else if (!lead->deleted &&
						 !nocrm_enrollment_admits(rule, current->id, !rule->test_mode, &why))
					log_stop(current, rule, ev, why);
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
					/* a rule in test mode changes nothing, not even who runs next */
					if (rule->stop_processing && !rule->test_mode)
						stopped_by = rule;
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
