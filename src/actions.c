/*
 * actions.c — running one action of a rule, as the Butler.
 *
 * Lead changes go through plain SQL on nocrm.leads/tags/comments, so they
 * raise their own events (chaining) and obey every constraint.  Emails,
 * mobile pushes and delayed actions are written to nocrm.queue in the same
 * transaction; a rollback leaves nothing behind.
 */
#include "nocrm.h"

#include "common/hashfn.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"

#include "catalog/dependency.h"
#include "catalog/namespace.h"
#include "catalog/pg_collation.h"
#include "commands/async.h"
#include "commands/sequence.h"
#include "mb/pg_wchar.h"
#include "storage/proc.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

/* A rendered notify message is cut here (pg_notify payloads stop at 8000 bytes). */
#define MAX_RENDERED_MESSAGE 4000

/* One kept plan per statement an action runs. */
static SPIPlanPtr plan_assign,
			plan_user_active,
			plan_tags_to_change,
			plan_add_tags,
			plan_remove_tags,
			plan_add_tags_quietly,
			plan_remove_tags_quietly,
			plan_set_status,
			plan_find_step,
			plan_move_step,
			plan_comment,
			plan_notify_payload,
			plan_enqueue,
			plan_webhook_payload,
			plan_sender;

static const char *
action_event(RuleAction *action)
{
	return psprintf("action.%s", nocrm_action_names[action->kind]);
}

static void
action_history(Rule *rule, RuleAction *action, LeadState *lead,
			   Jsonb *old_value, Jsonb *new_value, const char *detail)
{
	nocrm_runlog_action(action, old_value, new_value, detail);
	if (nocrm_history_level != HISTORY_NONE)
		nocrm_history(lead->id, action_event(action), rule->id, old_value, new_value, detail);
}

/* Runs a kept plan that returns at most one row; returns its first column. */
static bool
exec_one(SPIPlanPtr plan, Datum *args, const char *nulls, Datum *result, bool *isnull)
{
	int			ret = SPI_execute_plan(plan, args, nulls, false, 0);

	if (ret < 0)
		elog(ERROR, "automation statement failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0 || SPI_tuptable == NULL)
		return false;
	if (result)
		*result = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, isnull);
	return true;
}

static bool lead_is_current(Rule *rule, RuleAction *action, LeadState *lead);

/*
 * The lead as it is now: the dispatcher's state for a rule's first action,
 * else read again.  False if it is gone.
 */
static bool
lead_now(Rule *rule, RuleAction *action, LeadState *lead, LeadState *current)
{
	if (lead_is_current(rule, action, lead))
	{
		*current = *lead;
		return true;
	}
	return nocrm_lead_fetch(lead->id, current);
}

bool
nocrm_user_is_active(int64 user_id)
{
	Oid			types[1] = {INT8OID};
	Datum		args[1] = {Int64GetDatum(user_id)};

	nocrm_plan(&plan_user_active,
			   "SELECT 1 FROM nocrm.users WHERE id = $1 AND active", 1, types);
	return exec_one(plan_user_active, args, NULL, NULL, NULL);
}

/* Sets the owner; history records old and new owner. */
static void
assign_to(Rule *rule, RuleAction *action, LeadState *lead, int64 user_id)
{
	Oid			types[2] = {INT8OID, INT8OID};
	Datum		args[2] = {Int64GetDatum(lead->id), Int64GetDatum(user_id)};
	LeadState	current;

	if (!lead_now(rule, action, lead, &current))
		return;
	if (current.has_owner && current.owner_id == user_id)
	{
		action_history(rule, action, lead, NULL, NULL,
					   psprintf("user %lld already owns the lead", (long long) user_id));
		return;
	}
	/* The action is logged before the change, so it precedes the events it causes. */
	action_history(rule, action, lead,
				   nocrm_jsonb_int_pair("user_id", current.owner_id, !current.has_owner),
				   nocrm_jsonb_int_pair("user_id", user_id, false), NULL);
	nocrm_plan(&plan_assign,
			   "UPDATE nocrm.leads SET user_id = $2 WHERE id = $1", 2, types);
	(void) exec_one(plan_assign, args, NULL, NULL, NULL);
}

/*
 * An owner written into a new lead's row before the rule ran (preassign.c):
 * what the action would have recorded had it made the change itself.
 */
void
nocrm_record_assignment(Rule *rule, RuleAction *action, LeadState *lead, int64 user_id,
						bool fallback)
{
	if (fallback)
		action_history(rule, action, lead, NULL, NULL,
					   "nobody available: fallback \"anyone\" applies");
	action_history(rule, action, lead, nocrm_jsonb_int_pair("user_id", 0, true),
				   nocrm_jsonb_int_pair("user_id", user_id, false), NULL);
}

/*
 * Does the action, run now, neither change the lead (or anything that
 * raises an event) nor read its owner?  Such actions may run before a rule
 * that assigns the lead without seeing the owner it will get.
 */
bool
nocrm_action_leaves_lead_alone(RuleAction *action)
{
	if (action->respect_working_hours)
		return false;			/* waits for the owner's hours */
	if (action->delayed)
		return action->business_unit == BUSINESS_NONE;	/* queued (a business delay reads the owner's hours) */
	switch (action->kind)
	{
		case ACT_NOTIFY:
			return action->user_id != USER_IS_OWNER && action->text_lead_local;
		case ACT_SEND_EMAIL:
			return true;		/* rendered by the drain, from the lead as it is then */
		default:
			return false;
	}
}

/* The action's tags without repeats, in their first order. */
static ArrayType *
distinct_tags(RuleAction *action, int *n, Datum **names)
{
	Datum	   *elems;
	bool	   *nulls;
	int			nelems,
				kept = 0;

	deconstruct_array(DatumGetArrayTypeP(action->tags), TEXTOID, -1, false, TYPALIGN_INT,
					  &elems, &nulls, &nelems);
	for (int i = 0; i < nelems; i++)
	{
		bool		seen = nulls[i];

		for (int j = 0; j < kept && !seen; j++)
			seen = DatumGetBool(DirectFunctionCall2Coll(texteq, C_COLLATION_OID, elems[j], elems[i]));
		if (!seen)
			elems[kept++] = elems[i];
	}
	*n = kept;
	*names = elems;
	return construct_array(elems, kept, TEXTOID, -1, false, TYPALIGN_INT);
}

/*
 * Tags changed in one statement that tells which of them changed, for when
 * the change raises no event: then nothing can come between the change and
 * its log row.  Repeats are dropped and the order restored here, in C: the
 * statement is a plain INSERT (or DELETE) ... RETURNING, run once per lead.
 */
/*
 * add_tags for a lead of a bulk statement whose tags are loaded (tagset.c):
 * decided in memory, written with the statement's other tags.  False when
 * the lead takes the per-lead statement.
 */
static bool
add_tags_in_bulk(Rule *rule, RuleAction *action, LeadState *lead)
{
	Datum	   *names;
	int			n;
	JsonbParseState *state = NULL;
	int			added = 0;

	if (lead->deleted || !nocrm_tagset_covers(lead->id))
		return false;
	(void) distinct_tags(action, &n, &names);
	for (int i = 0; i < n; i++)
		if (!nocrm_tagset_fits(TextDatumGetCString(names[i])))
			return false;
	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	nocrm_jsonb_key(&state, "tags");
	pushJsonbValue(&state, WJB_BEGIN_ARRAY, NULL);
	for (int i = 0; i < n; i++)
	{
		char	   *tag = TextDatumGetCString(names[i]);
		JsonbValue	v;

		if (nocrm_tagset_present(lead->id, tag, false))
			continue;
		nocrm_tagset_add(lead->id, names[i]);
		v.type = jbvString;
		v.val.string.val = tag;
		v.val.string.len = strlen(tag);
		pushJsonbValue(&state, WJB_ELEM, &v);
		added++;
	}
	pushJsonbValue(&state, WJB_END_ARRAY, NULL);
	if (added == 0)
		action_history(rule, action, lead, NULL, NULL, "the lead already has these tags");
	else
		action_history(rule, action, lead, NULL,
					   JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_OBJECT, NULL)), NULL);
	return true;
}

static void
change_tags_quietly(Rule *rule, RuleAction *action, LeadState *lead, bool add)
{
	Oid			types[2] = {INT8OID, TEXTARRAYOID};
	Datum		args[2];
	Datum	   *names;
	int			n;
	int			ret;
	uint64		nchanged;
	JsonbParseState *state = NULL;
	Jsonb	   *changed;

	args[0] = Int64GetDatum(lead->id);
	args[1] = PointerGetDatum(distinct_tags(action, &n, &names));
	if (add)
		nocrm_plan(&plan_add_tags_quietly,
				   "INSERT INTO nocrm.tags (lead_id, name) SELECT $1, unnest($2::text[])"
				   " ON CONFLICT DO NOTHING RETURNING name",
				   2, types);
	else
		nocrm_plan(&plan_remove_tags_quietly,
				   "DELETE FROM nocrm.tags WHERE lead_id = $1 AND name = ANY ($2) RETURNING name",
				   2, types);
	ret = SPI_execute_plan(add ? plan_add_tags_quietly : plan_remove_tags_quietly, args, NULL,
						   false, 0);
	if (ret != (add ? SPI_OK_INSERT_RETURNING : SPI_OK_DELETE_RETURNING))
		elog(ERROR, "changing tags failed: %s", SPI_result_code_string(ret));
	nchanged = SPI_processed;
	if (nchanged == 0)
	{
		action_history(rule, action, lead, NULL, NULL,
					   add ? "the lead already has these tags" : "the lead has none of these tags");
		return;
	}
	/* {"tags": [the changed ones, in the action's order]} */
	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	nocrm_jsonb_key(&state, "tags");
	pushJsonbValue(&state, WJB_BEGIN_ARRAY, NULL);
	for (int i = 0; i < n; i++)
		for (uint64 r = 0; r < nchanged; r++)
		{
			bool		isnull;
			Datum		name = SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1, &isnull);

			if (!isnull && DatumGetBool(DirectFunctionCall2Coll(texteq, C_COLLATION_OID, name, names[i])))
			{
				JsonbValue	v;
				char	   *tag = TextDatumGetCString(names[i]);

				v.type = jbvString;
				v.val.string.val = tag;
				v.val.string.len = strlen(tag);
				pushJsonbValue(&state, WJB_ELEM, &v);
				break;
			}
		}
	pushJsonbValue(&state, WJB_END_ARRAY, NULL);
	changed = JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_OBJECT, NULL));
	action_history(rule, action, lead, add ? NULL : changed, add ? changed : NULL, NULL);
}

static void
change_tags(Rule *rule, RuleAction *action, LeadState *lead)
{
	Oid			types[3] = {INT8OID, TEXTARRAYOID, BOOLOID};
	bool		add = action->kind == ACT_ADD_TAGS;
	Datum		args[3] = {Int64GetDatum(lead->id), action->tags, BoolGetDatum(!add)};
	Datum		tags,
				changed;
	bool		isnull;

	/* the tag triggers' WHEN clause (nocrm.child_event_wanted) asks the same */
	if (!nocrm_event_listened(EV_ANY_UPDATE))
	{
		if (add && add_tags_in_bulk(rule, action, lead))
			return;
		nocrm_tagset_settle();
		change_tags_quietly(rule, action, lead, add);
		return;
	}
	nocrm_tagset_settle();

	/*
	 * Work out which tags change first, so the log row precedes the tag
	 * events it causes.
	 */
	nocrm_plan(&plan_tags_to_change,
			   "SELECT array_agg(t.name ORDER BY t.ord),"
			   "       jsonb_build_object('tags', jsonb_agg(t.name ORDER BY t.ord))"
			   "  FROM (SELECT DISTINCT ON (name) name, ord"
			   "          FROM unnest($2::text[]) WITH ORDINALITY AS u(name, ord)"
			   "         ORDER BY name, ord) t"
			   " WHERE EXISTS (SELECT 1 FROM nocrm.tags g WHERE g.lead_id = $1 AND g.name = t.name) = $3",
			   3, types);
	(void) exec_one(plan_tags_to_change, args, NULL, &tags, &isnull);
	if (isnull)
	{
		action_history(rule, action, lead, NULL, NULL,
					   add ? "the lead already has these tags" : "the lead has none of these tags");
		return;
	}
	changed = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
	action_history(rule, action, lead, add ? NULL : DatumGetJsonbP(changed),
				   add ? DatumGetJsonbP(changed) : NULL, NULL);

	args[1] = tags;
	if (add)
		nocrm_plan(&plan_add_tags,
				   "INSERT INTO nocrm.tags (lead_id, name) SELECT $1, unnest($2::text[])"
				   " ON CONFLICT DO NOTHING",
				   2, types);
	else
		nocrm_plan(&plan_remove_tags,
				   "DELETE FROM nocrm.tags WHERE lead_id = $1 AND name = ANY ($2)",
				   2, types);
	(void) exec_one(add ? plan_add_tags : plan_remove_tags, args, NULL, NULL, NULL);
}

/*
 * set_field's statements, prepared once per statement text (a delayed
 * action's definition may differ from its rule's current one).
 */
typedef struct SetFieldPlan
{
	uint32		key;			/* hash of the text */
	char	   *sql;
	SPIPlanPtr	plan;
} SetFieldPlan;

static HTAB *set_field_plans = NULL;

static SPIPlanPtr
set_field_plan(RuleAction *action)
{
	uint32		key = hash_bytes((const unsigned char *) action->sql, strlen(action->sql));
	SetFieldPlan *entry;
	bool		found;
	Oid			types[1] = {INT8OID};

	if (set_field_plans == NULL)
		set_field_plans = nocrm_blob_hash("nocrm set_field plans", 64, sizeof(uint32),
										  sizeof(SetFieldPlan), TopMemoryContext);
	entry = hash_search(set_field_plans, &key, HASH_ENTER, &found);
	if (found && strcmp(entry->sql, action->sql) != 0)
	{
		/* another statement with the same hash: this one takes the slot */
		SPI_freeplan(entry->plan);
		pfree(entry->sql);
		found = false;
	}
	if (!found)
	{
		entry->plan = NULL;
		entry->sql = MemoryContextStrdup(TopMemoryContext, action->sql);
	}
	if (entry->plan == NULL)
		nocrm_plan(&entry->plan, action->sql, 1, types);
	return entry->plan;
}

/* set_field: one UPDATE of the column, only when its value changes. */
static void
set_field(Rule *rule, RuleAction *action, LeadState *lead)
{
	Datum		args[1] = {Int64GetDatum(lead->id)};
	SPIPlanPtr	plan = set_field_plan(action);
	int			ret = SPI_execute_plan(plan, args, NULL, false, 0);
	bool		isnull;

	if (ret != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "set_field failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
	{
		action_history(rule, action, lead, NULL, NULL,
					   psprintf("%s already has that value", action->field));
		return;
	}
	action_history(rule, action, lead,
				   DatumGetJsonbPCopy(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)),
				   DatumGetJsonbPCopy(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull)),
				   NULL);
}

static void
set_status(Rule *rule, RuleAction *action, LeadState *lead)
{
	Oid			types[2] = {INT8OID, TEXTOID};
	Datum		args[2] = {Int64GetDatum(lead->id), CStringGetTextDatum(action->status)};
	LeadState	current;

	if (!lead_now(rule, action, lead, &current))
		return;
	if (strcmp(current.status_text, action->status) == 0)
	{
		action_history(rule, action, lead, NULL, NULL,
					   psprintf("status is already %s", action->status));
		return;
	}
	action_history(rule, action, lead,
				   nocrm_jsonb_pair("status", current.status_text),
				   nocrm_jsonb_pair("status", action->status), NULL);
	nocrm_plan(&plan_set_status,
			   "UPDATE nocrm.leads SET status = $2 WHERE id = $1", 2, types);
	(void) exec_one(plan_set_status, args, NULL, NULL, NULL);
}

static void
set_step(Rule *rule, RuleAction *action, LeadState *lead)
{
	LeadState	current;
	Oid			types[3] = {INT8OID, INT8OID, TEXTOID};
	Datum		args[3];
	char		nulls[3] = {' ', ' ', ' '};
	Datum		step;
	bool		isnull;

	if (!lead_now(rule, action, lead, &current))
		return;
	/* By id: that step, in whatever pipeline.  By name: within the lead's pipeline. */
	args[0] = Int64GetDatum(current.pipeline_id);
	nulls[0] = current.has_pipeline ? ' ' : 'n';
	args[1] = Int64GetDatum(action->step_id);
	nulls[1] = action->step_id ? ' ' : 'n';
	args[2] = action->step_name ? CStringGetTextDatum(action->step_name) : (Datum) 0;
	nulls[2] = action->step_name ? ' ' : 'n';
	nocrm_plan(&plan_find_step,
			   "SELECT id FROM nocrm.steps"
			   " WHERE CASE WHEN $2 IS NOT NULL THEN id = $2"
			   "            ELSE pipeline_id = $1 AND name = $3 END",
			   3, types);
	if (!exec_one(plan_find_step, args, nulls, &step, &isnull))
	{
		action_history(rule, action, lead, NULL, NULL,
					   psprintf("skipped: %s has no step \"%s\"",
								current.has_pipeline ? "the lead's pipeline" : "a lead in no pipeline",
								action->step_name));
		return;
	}
	if (current.has_step && current.step_id == DatumGetInt64(step))
	{
		action_history(rule, action, lead, NULL, NULL, "the lead is already at that step");
		return;
	}
	action_history(rule, action, lead,
				   nocrm_jsonb_int_pair("step_id", current.step_id, !current.has_step),
				   nocrm_jsonb_int_pair("step_id", DatumGetInt64(step), false), NULL);
	args[0] = Int64GetDatum(lead->id);
	args[1] = step;
	nocrm_plan(&plan_move_step,
			   "UPDATE nocrm.leads l SET step_id = s.id, pipeline_id = s.pipeline_id"
			   "  FROM nocrm.steps s WHERE l.id = $1 AND s.id = $2",
			   2, types);
	(void) exec_one(plan_move_step, args, NULL, NULL, NULL);
}

static void
add_comment(Rule *rule, RuleAction *action, LeadState *lead)
{
	Oid			types[2] = {INT8OID, TEXTOID};
	Datum		args[2] = {Int64GetDatum(lead->id), CStringGetTextDatum(action->text)};

	action_history(rule, action, lead, NULL, nocrm_jsonb_pair("comment", action->text), NULL);
	nocrm_plan(&plan_comment,
			   "INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES ($1, 0, $2)",
			   2, types);
	(void) exec_one(plan_comment, args, NULL, NULL, NULL);
}

/*
 * The identity sequence of table nocrm.<relname>'s id, looked up again if
 * the extension was re-created.  *seq and *for_automations are the caller's
 * cache.
 */
static Oid
id_sequence(const char *relname, Oid *seq, Oid *for_automations)
{
	if (*for_automations != nocrm_automations_relid())
	{
		Oid			rel = get_relname_relid(relname, get_namespace_oid("nocrm", false));

		if (!OidIsValid(rel))
			elog(ERROR, "table nocrm.%s is missing", relname);
		*seq = getIdentitySequence(rel, 1, false);
		*for_automations = nocrm_automations_relid();
	}
	return *seq;
}

static WriteBuffer queue_buffer = {
	.what = "queueing work for the drain failed",
	.table = "queue",
	.direct = true,
	.columns = {"id", "kind", "automation_id", "action_no", "lead_id", "event", "recipient", "payload",
	"run_at", "actor_id"},
	.ncols = 10,
	.types = {INT8OID, TEXTOID, INT4OID, INT4OID, INT8OID, TEXTOID, TEXTOID, JSONBOID,
	TIMESTAMPTZOID, INT8OID},
};

/*
 * A queue row whose run_at and payload need no query: its id now, its row
 * with the statement's other batched writes (the drain only sees committed
 * rows, so it cannot tell).
 */
static int64
enqueue_batched(Rule *rule, RuleAction *action, LeadState *lead, RaisedEvent *ev,
				const char *kind, const char *recipient, Jsonb *payload, TimestampTz run_at,
				int64 actor)
{
	static Oid	for_automations = InvalidOid;
	static Oid	seq = InvalidOid;
	int64		id = nextval_internal(id_sequence("queue", &seq, &for_automations), false);
	Datum		values[10] = {Int64GetDatum(id), CStringGetTextDatum(kind), Int32GetDatum(rule->id),
		Int32GetDatum(action->action_no), Int64GetDatum(lead->id),
		CStringGetTextDatum(nocrm_event_names[ev->event]),
		recipient ? CStringGetTextDatum(recipient) : (Datum) 0, JsonbPGetDatum(payload),
		TimestampTzGetDatum(run_at),
	Int64GetDatum(actor)};
	bool		nulls[10] = {false, false, false, false, false, false, recipient == NULL, false,
	false, actor < 0};

	nocrm_buffer_row(&queue_buffer, values, nulls);
	return id;
}

/*
 * When a queue row is due: now, or after run_after (plain or business time,
 * on the owner's hours or the company calendar), then with
 * respect_working_hours at the owner's (no owner: the company's) next
 * working time.  The owner as of now: an earlier action of the same rule may
 * have set it.  *plain: a business delay found no calendar to count on.
 */
static TimestampTz
due_time(RuleAction *action, LeadState *lead, Interval *run_after, bool *plain)
{
	TimestampTz run_at = GetCurrentTransactionStartTimestamp();
	bool		business = run_after && action->business_unit != BUSINESS_NONE;
	LeadState	current;
	LeadState  *owner = lead;

	*plain = false;
	if (!business && !action->respect_working_hours)
	{
		if (run_after)
			run_at = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
															 TimestampTzGetDatum(run_at),
															 IntervalPGetDatum(run_after)));
		return run_at;
	}
	if (!lead->deleted && nocrm_lead_fetch(lead->id, &current))
		owner = &current;
	if (business)
		run_at = nocrm_business_due(owner->has_owner, owner->owner_id, run_at,
									action->business_unit, action->business_amount, plain);
	else if (run_after)
		run_at = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
														 TimestampTzGetDatum(run_at),
														 IntervalPGetDatum(run_after)));
	if (action->respect_working_hours)
		run_at = nocrm_next_working_time(owner->has_owner, owner->owner_id, run_at);
	return run_at;
}

/*
 * Writes a queue row for the drain and returns its id.  run_after NULL means
 * now; *plain as due_time() says (may be NULL).
 */
static int64
enqueue(Rule *rule, RuleAction *action, LeadState *lead, RaisedEvent *ev,
		const char *kind, const char *recipient, Jsonb *payload, Interval *run_after, bool *plain)
{
	Oid			types[10] = {TEXTOID, INT4OID, INT4OID, INT8OID, TEXTOID, TEXTOID,
	JSONBOID, TIMESTAMPTZOID, INT8OID, JSONBOID};
	Datum		args[10];
	char		nulls[10];
	int64		actor = nocrm_root_actor();
	bool		plain_time;
	TimestampTz run_at = due_time(action, lead, run_after, &plain_time);
	Datum		result;
	bool		isnull;

	if (plain)
		*plain = plain_time;
	/* the commit wakes the background worker (wake.c) */
	nocrm_wake_note_queued();
	if (lead->snapshot == NULL)
		return enqueue_batched(rule, action, lead, ev, kind, recipient, payload, run_at, actor);

	/* a deleted lead travels with the item, for its placeholders */
	nocrm_plan(&plan_enqueue,
			   "INSERT INTO nocrm.queue (kind, automation_id, action_no, lead_id, event,"
			   " recipient, payload, run_at, actor_id)"
			   " VALUES ($1, $2, $3, $4, $5, $6,"
			   "         CASE WHEN $7 ? 'lead' THEN $7 ELSE $7 || jsonb_build_object('lead', $10) END,"
			   "         $8, $9)"
			   " RETURNING id",
			   10, types);
	memset(nulls, ' ', sizeof(nulls));
	args[0] = CStringGetTextDatum(kind);
	args[1] = Int32GetDatum(rule->id);
	args[2] = Int32GetDatum(action->action_no);
	args[3] = Int64GetDatum(lead->id);
	args[4] = CStringGetTextDatum(nocrm_event_names[ev->event]);
	args[5] = recipient ? CStringGetTextDatum(recipient) : (Datum) 0;
	nulls[5] = recipient ? ' ' : 'n';
	args[6] = JsonbPGetDatum(payload);
	args[7] = TimestampTzGetDatum(run_at);
	args[8] = Int64GetDatum(actor);
	nulls[8] = actor < 0 ? 'n' : ' ';
	args[9] = JsonbPGetDatum(lead->snapshot);
	(void) exec_one(plan_enqueue, args, nulls, &result, &isnull);
	return DatumGetInt64(result);
}

static Jsonb *
queued_json(int64 queue_id)
{
	return nocrm_jsonb_int_pair("queue_id", queue_id, false);
}

/* {"template": ..., "to": ..., "lead_id": ...} and friends, built in SQL-free C. */
static Jsonb *
payload_json(const char *const *keys, const char *const *values, int n)
{
	JsonbParseState *state = NULL;

	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	for (int i = 0; i < n; i++)
	{
		JsonbValue	k,
					v;

		k.type = jbvString;
		k.val.string.val = (char *) keys[i];
		k.val.string.len = strlen(keys[i]);
		pushJsonbValue(&state, WJB_KEY, &k);
		if (values[i] == NULL)
			v.type = jbvNull;
		else
		{
			v.type = jbvString;
			v.val.string.val = (char *) values[i];
			v.val.string.len = strlen(values[i]);
		}
		pushJsonbValue(&state, WJB_VALUE, &v);
	}
	return JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_OBJECT, NULL));
}

static void notify_in_bulk(WriteBuffer *buf);

static WriteBuffer notifications_buffer = {
	.what = "writing notifications failed",
	.before_write = notify_in_bulk,
	.table = "notifications",
	.direct = true,
	.columns = {"id", "user_id", "lead_id", "automation_id", "message"},
	.ncols = 5,
	.types = {INT8OID, INT8OID, INT8OID, INT4OID, TEXTOID},
};

static Oid
notifications_sequence(void)
{
	static Oid	for_automations = InvalidOid;
	static Oid	seq = InvalidOid;

	return id_sequence("notifications", &seq, &for_automations);
}

/*
 * A transaction sends its first NOTIFY_EACH notifications one NOTIFY each;
 * after that, one NOTIFY per user and batch of writes.  A bulk statement
 * would otherwise queue a NOTIFY per lead: memory until commit (about
 * 400 bytes each) and a flood for every listener.
 */
#define NOTIFY_EACH		1000

static LocalTransactionId notify_xact = InvalidLocalTransactionId;
static int	notified_each = 0;
static int64 bulk_from_id = PG_INT64_MAX;	/* ids from here on go in bulk */

/* {"user_id" : u, "count" : n, "first_id" : a, "last_id" : b, "bulk" : true} per user */
static void
notify_in_bulk(WriteBuffer *buf)
{
	int			n = 0;
	int64	   *users = palloc(sizeof(int64) * buf->n);

	if (notify_xact != MyProc->lxid)
		return;
	for (int r = 0; r < buf->n; r++)
	{
		int64		id = DatumGetInt64(buf->values[r * buf->ncols]);
		int64		user = DatumGetInt64(buf->values[r * buf->ncols + 1]);
		bool		seen = false;

		if (id < bulk_from_id)
			continue;
		for (int u = 0; u < n && !seen; u++)
			seen = users[u] == user;
		if (!seen)
			users[n++] = user;
	}
	for (int u = 0; u < n; u++)
	{
		int64		count = 0,
					first = PG_INT64_MAX,
					last = 0;

		for (int r = 0; r < buf->n; r++)
		{
			int64		id = DatumGetInt64(buf->values[r * buf->ncols]);

			if (id < bulk_from_id || DatumGetInt64(buf->values[r * buf->ncols + 1]) != users[u])
				continue;
			count++;
			first = Min(first, id);
			last = Max(last, id);
		}
		nocrm_relay_notify(psprintf("{\"user_id\" : " INT64_FORMAT ", \"count\" : " INT64_FORMAT
							  ", \"first_id\" : " INT64_FORMAT ", \"last_id\" : " INT64_FORMAT
							  ", \"bulk\" : true}", users[u], count, first, last));
	}
}

/*
 * A browser notification: its id now, its row with the next batch of
 * writes, its NOTIFY at commit (as pg_notify would send it; in bulk after
 * the first NOTIFY_EACH of the transaction).
 */
static int64
browser_notification(int64 user_id, int64 lead_id, int32 automation_id, const char *message)
{
	int64		id = nextval_internal(notifications_sequence(), false);
	Datum		values[5] = {Int64GetDatum(id), Int64GetDatum(user_id), Int64GetDatum(lead_id),
	Int32GetDatum(automation_id), CStringGetTextDatum(message)};
	bool		nulls[5] = {false, false, false, false, false};
	int			len = strlen(message);
	bool		truncated = pg_mbstrlen(message) > 1000;
	StringInfoData payload;

	if (notify_xact != MyProc->lxid)
	{
		notify_xact = MyProc->lxid;
		notified_each = 0;
		bulk_from_id = PG_INT64_MAX;
	}
	if (notified_each >= NOTIFY_EACH)
	{
		bulk_from_id = Min(bulk_from_id, id);
		nocrm_buffer_row(&notifications_buffer, values, nulls);
		return id;
	}
	notified_each++;
	nocrm_buffer_row(&notifications_buffer, values, nulls);

	initStringInfo(&payload);
	appendStringInfo(&payload, "{\"id\" : " INT64_FORMAT ", \"user_id\" : " INT64_FORMAT
					 ", \"lead_id\" : " INT64_FORMAT ", \"automation_id\" : %d, \"message\" : ",
					 id, user_id, lead_id, automation_id);
	escape_json(&payload, truncated ? pnstrdup(message, pg_mbcharcliplen(message, len, 1000))
				: message);
	appendStringInfo(&payload, ", \"truncated\" : %s}", truncated ? "true" : "false");
	nocrm_relay_notify(payload.data);
	return id;
}

/* Every placeholder value, from the lead as it is in the table now (one query). */
static Jsonb *
full_context(Rule *rule, LeadState *lead, RaisedEvent *ev, int64 user_id)
{
	JsonbParseState *state = NULL;
	Jsonb	   *payload;

	/* payload {"user_id": user, "lead": snapshot of a deleted lead} */
	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	nocrm_jsonb_put_int64(&state, "user_id", user_id);
	if (lead->snapshot)
		nocrm_jsonb_put_jsonb(&state, "lead", lead->snapshot);
	payload = JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_OBJECT, NULL));
	return nocrm_template_context(Int64GetDatum(lead->id), false, JsonbPGetDatum(payload), false,
								  Int32GetDatum(rule->id), false,
								  CStringGetTextDatum(nocrm_event_names[ev->event]), false,
								  false);
}

/*
 * Is the lead state the dispatcher passed still the lead's row?  Only for
 * a rule's first action: the dispatcher re-reads the lead between rules,
 * and any earlier action (even a tag, through a chained automation) may
 * have changed it since.
 */
static bool
lead_is_current(Rule *rule, RuleAction *action, LeadState *lead)
{
	return !lead->deleted && rule->nactions > 0 && action == &rule->actions[0];
}

/* The notify message with its {{placeholders}} filled in, as of now. */
static const char *
render_message(Rule *rule, RuleAction *action, LeadState *lead, RaisedEvent *ev, int64 user_id)
{
	char	   *message;
	int			len;

	if (strstr(action->text, "{{") == NULL)
		return action->text;
	/* the placeholders the lead's own columns answer: what most messages use */
	if (lead_is_current(rule, action, lead) && action->text_lead_local)
		message = nocrm_render_lead_local(action->text, lead, nocrm_event_names[ev->event],
										  rule->name);
	else
		message = nocrm_render(action->text, full_context(rule, lead, ev, user_id));
	/* Lead data can make it long: keep it within a pg_notify payload, whole characters only. */
	len = strlen(message);
	if (len > MAX_RENDERED_MESSAGE)
		message[pg_mbcliplen(message, len, MAX_RENDERED_MESSAGE)] = '\0';
	return message;
}

static Jsonb *sender_payload(Rule *rule, RuleAction *action, LeadState *lead, const char **detail);
static Jsonb *with_sender(Jsonb *payload, Jsonb *sender);

static void
notify(Rule *rule, RuleAction *action, LeadState *lead, RaisedEvent *ev)
{
	int64		user_id = action->user_id;
	LeadState	current;
	const char *message;

	if (user_id == USER_IS_OWNER)
	{
		if (!lead->deleted && nocrm_lead_fetch(lead->id, &current))
			lead = &current;
		if (!lead->has_owner)
		{
			action_history(rule, action, lead, NULL, NULL, "skipped: the lead has no owner");
			return;
		}
		user_id = lead->owner_id;
	}
	else if (user_id == USER_IS_ASSIGNEE)
	{
		/* the task event's {"assignee_id": ...} */
		JsonbValue *v = ev->new_value
			? getKeyJsonValueFromContainer(&ev->new_value->root, "assignee_id", 11, NULL) : NULL;

		if (v == NULL || v->type != jbvNumeric)
		{
			action_history(rule, action, lead, NULL, NULL, "skipped: the task has no assignee");
			return;
		}
		user_id = DatumGetInt64(DirectFunctionCall1(numeric_int8, NumericGetDatum(v->val.numeric)));
	}

	message = render_message(rule, action, lead, ev, user_id);

	if (action->channels & CHANNEL_BROWSER)
	{
		int64		id = browser_notification(user_id, lead->id, rule->id, message);

		action_history(rule, action, lead, NULL,
					   nocrm_jsonb_int_pair("notification_id", id, false), "browser");
	}
	for (int ch = CHANNEL_EMAIL; ch <= CHANNEL_MOBILE; ch <<= 1)
	{
		const char *channel = ch == CHANNEL_EMAIL ? "email" : "mobile";
		Oid			types[5] = {INT8OID, TEXTOID, TEXTOID, INT8OID, TEXTOID};
		Datum		args[5] = {Int64GetDatum(user_id), CStringGetTextDatum(channel),
			CStringGetTextDatum(message), Int64GetDatum(lead->id),
		CStringGetTextDatum(lead->title)};
		Datum		payload;
		bool		isnull;
		char	   *email;
		int64		id;

		if (!(action->channels & ch))
			continue;
		nocrm_plan(&plan_notify_payload,
				   "SELECT jsonb_build_object('channel', $2, 'user_id', u.id, 'user_email', u.email,"
				   "                          'message', $3, 'lead_id', $4, 'lead_title', $5),"
				   "       u.email"
				   "  FROM nocrm.users u WHERE u.id = $1",
				   5, types);
		if (!exec_one(plan_notify_payload, args, NULL, &payload, &isnull))
			continue;			/* the user was deleted since the rule was loaded */
		email = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
		if (ch == CHANNEL_EMAIL && email == NULL)
		{
			action_history(rule, action, lead, NULL, NULL,
						   psprintf("skipped email: user %lld has no email", (long long) user_id));
			continue;
		}
		if (ch == CHANNEL_EMAIL)
		{
			const char *detail;
			Jsonb	   *p = DatumGetJsonbPCopy(payload);
			Jsonb	   *sender;

			/* the owner's query replaces SPI_tuptable: keep what we read first */
			email = pstrdup(email);
			sender = sender_payload(rule, action, lead, &detail);
			id = enqueue(rule, action, lead, ev, channel, email, with_sender(p, sender), NULL, NULL);
			action_history(rule, action, lead, NULL, queued_json(id),
						   detail ? psprintf("email; %s", detail) : channel);
			continue;
		}
		id = enqueue(rule, action, lead, ev, channel, psprintf("%lld", (long long) user_id),
					 DatumGetJsonbP(payload), NULL, NULL);
		action_history(rule, action, lead, NULL, queued_json(id), channel);
	}
}

/*
 * From and Reply-To of an email as the action's "from" and "reply_to" ask,
 * with the lead's owner as of now: payload keys "from", "from_name",
 * "reply_to", "reply_to_name" (none: nocrm.mail_from, as before).  *detail
 * says what was chosen and why, for the history row.  The owner's address
 * goes into From only when an admin set users.sender_verified; otherwise
 * From stays nocrm.mail_from and the owner becomes Reply-To.
 */
static Jsonb *
sender_payload(Rule *rule, RuleAction *action, LeadState *lead, const char **detail)
{
	LeadState	current;

	*detail = NULL;
	if (!action->from_owner && !action->reply_to_owner && !action->reply_to)
		return NULL;
	if (lead_now(rule, action, lead, &current))
		lead = &current;		/* a deleted lead: the owner it had */
	return nocrm_sender_choice(action->from_owner, action->reply_to_owner, action->reply_to,
							   lead->has_owner, lead->owner_id, detail);
}

/*
 * The choice itself, for a lead owned by owner_id (has_owner): also what
 * explain and describe_actions() show (nocrm.describe_sender()).
 */
Jsonb *
nocrm_sender_choice(bool from_owner, bool reply_to_owner, const char *reply_to_address,
					bool has_owner, int64 owner_id, const char **detail)
{
	const char *keys[4];
	const char *values[4];
	int			n = 0;
	char	   *email = NULL,
			   *name = NULL;
	bool		verified = false,
				active = false,
				found = false;
	const char *why = NULL;		/* the owner cannot be used: why */
	const char *reply_to = reply_to_address;
	const char *reply_to_name = NULL;
	StringInfoData d;

	if (from_owner || reply_to_owner)
	{
		if (!has_owner)
			why = "the lead has no owner";
		else
		{
			Oid			types[1] = {INT8OID};
			Datum		args[1] = {Int64GetDatum(owner_id)};

			nocrm_plan(&plan_sender,
					   "SELECT u.email, coalesce(u.sender_name, u.name), u.sender_verified, u.active"
					   "  FROM nocrm.users u WHERE u.id = $1", 1, types);
			found = exec_one(plan_sender, args, NULL, NULL, NULL);
			if (found)
			{
				HeapTuple	tup = SPI_tuptable->vals[0];
				TupleDesc	desc = SPI_tuptable->tupdesc;
				bool		isnull;

				email = SPI_getvalue(tup, desc, 1);
				name = SPI_getvalue(tup, desc, 2);
				verified = DatumGetBool(SPI_getbinval(tup, desc, 3, &isnull));
				active = DatumGetBool(SPI_getbinval(tup, desc, 4, &isnull));
			}
			if (!found)
				why = psprintf("owner %lld no longer exists", (long long) owner_id);
			else if (!active)
				why = psprintf("owner %lld is inactive", (long long) owner_id);
			else if (email == NULL || nocrm_address_problem(email) != NULL)
				why = psprintf("owner %lld has no usable email", (long long) owner_id);
		}
	}

	initStringInfo(&d);
	if (from_owner && why == NULL && verified)
	{
		keys[n] = "from";
		values[n++] = email;
		keys[n] = "from_name";
		values[n++] = name;
		appendStringInfo(&d, "From the owner <%s>", email);
	}
	else if (from_owner)
	{
		appendStringInfoString(&d, "From nocrm.mail_from: ");
		if (why)
			appendStringInfoString(&d, why);
		else
		{
			appendStringInfo(&d, "owner %lld is not a verified sender (users.sender_verified)",
							 (long long) owner_id);
			/* replies still reach the owner */
			if (reply_to == NULL)
			{
				reply_to = email;
				reply_to_name = name;
				appendStringInfo(&d, "; Reply-To the owner <%s>", email);
			}
		}
	}
	if (reply_to_owner && !(from_owner && why == NULL))
	{
		if (d.len > 0)
			appendStringInfoString(&d, "; ");
		if (why)
			appendStringInfo(&d, "no Reply-To: %s", why);
		else
		{
			reply_to = email;
			reply_to_name = name;
			appendStringInfo(&d, "Reply-To the owner <%s>", email);
		}
	}
	if (reply_to_address && reply_to == reply_to_address)
	{
		if (d.len > 0)
			appendStringInfoString(&d, "; ");
		appendStringInfo(&d, "Reply-To <%s>", reply_to_address);
	}
	if (reply_to)
	{
		keys[n] = "reply_to";
		values[n++] = reply_to;
		if (reply_to_name)
		{
			keys[n] = "reply_to_name";
			values[n++] = reply_to_name;
		}
	}
	*detail = d.data;
	return n > 0 ? payload_json(keys, values, n) : NULL;
}

static Jsonb *
with_sender(Jsonb *payload, Jsonb *sender)
{
	if (sender == NULL)
		return payload;
	return DatumGetJsonbP(DirectFunctionCall2(jsonb_concat, JsonbPGetDatum(payload),
											  JsonbPGetDatum(sender)));
}

static void
send_email(Rule *rule, RuleAction *action, LeadState *lead, RaisedEvent *ev)
{
	const char *to = action->to ? action->to : lead->contact_email;
	const char *keys[2] = {"template", "to"};
	const char *values[2] = {action->template_name, to};
	const char *detail;
	Jsonb	   *sender;
	int64		id;

	if (to == NULL || to[0] == '\0')
	{
		action_history(rule, action, lead, NULL, NULL,
					   "skipped: the lead has no contact_email and the action no \"to\"");
		return;
	}
	sender = sender_payload(rule, action, lead, &detail);
	id = enqueue(rule, action, lead, ev, "email", to,
				 with_sender(payload_json(keys, values, 2), sender), NULL, NULL);
	action_history(rule, action, lead, NULL, queued_json(id), detail);
}

/* Queues a signed POST of the lead and event; the drain sends it. */
static void
webhook(Rule *rule, RuleAction *action, LeadState *lead, RaisedEvent *ev)
{
	Oid			types[5] = {INT8OID, TEXTOID, INT4OID, TEXTOID, JSONBOID};
	Datum		args[5] = {Int64GetDatum(lead->id),
		CStringGetTextDatum(nocrm_event_names[ev->event]), Int32GetDatum(rule->id),
		CStringGetTextDatum(lead->title ? lead->title : ""),
	lead->snapshot ? JsonbPGetDatum(lead->snapshot) : (Datum) 0};
	char		nulls[5] = {' ', ' ', ' ', ' ', lead->snapshot ? ' ' : 'n'};
	Datum		payload;
	bool		isnull;
	int64		id;

	/* The lead as it is now, or what is left of it after lead.deleted. */
	nocrm_plan(&plan_webhook_payload,
			   "SELECT jsonb_build_object("
			   "  'event', $2, 'automation_id', $3,"
			   "  'automation', (SELECT name FROM nocrm.automations WHERE id = $3),"
			   "  'occurred_at', now(),"
			   "  'lead', coalesce((SELECT to_jsonb(l) FROM nocrm.leads l WHERE l.id = $1),"
			   "                   $5 || jsonb_build_object('deleted', true),"
			   "                   jsonb_build_object('id', $1, 'title', $4, 'deleted', true)),"
			   "  'tags', coalesce((SELECT jsonb_agg(t.name ORDER BY t.name)"
			   "                      FROM nocrm.tags t WHERE t.lead_id = $1), '[]'))",
			   5, types);
	(void) exec_one(plan_webhook_payload, args, nulls, &payload, &isnull);
	id = enqueue(rule, action, lead, ev, "webhook", action->url, DatumGetJsonbP(payload), NULL, NULL);
	action_history(rule, action, lead, NULL, queued_json(id), NULL);
}

/*
 * Is the lead's owner within working hours and not away right now?  With
 * no owner, is the company open (always, without a company calendar)?
 * *owned: the lead has an owner.
 */
static bool
owner_working(LeadState *lead, bool *owned)
{
	LeadState	current;
	TimestampTz now = GetCurrentTransactionStartTimestamp();

	*owned = true;
	/* the owner as of now: an earlier action of the same rule may have set it */
	if (lead->deleted || !nocrm_lead_fetch(lead->id, &current))
		return true;
	*owned = current.has_owner;
	return nocrm_next_working_time(current.has_owner, current.owner_id, now) <= now;
}

void
nocrm_run_action(Rule *rule, RuleAction *action, LeadState *lead, RaisedEvent *ev)
{
	bool		owned = true;

	if (action->delayed || (action->respect_working_hours && !owner_working(lead, &owned)))
	{
		bool		plain = false;
		int64		id = enqueue(rule, action, lead, ev, "action", NULL, action->definition,
								 action->delayed ? &action->delay : NULL, &plain);

		action_history(rule, action, lead, NULL, queued_json(id),
					   !action->delayed ? (owned ? "waits for the owner's working hours"
										   : "waits for the company's business hours")
					   : plain ? "delayed in plain time: no calendar applies"
					   : "delayed");
		return;
	}

	/* what reads or writes the lead (and user triggers there) sees the waiting tags */
	if (action->kind != ACT_ADD_TAGS && action->kind != ACT_NOTIFY &&
		action->kind != ACT_SEND_EMAIL)
		nocrm_tagset_settle();
	switch (action->kind)
	{
		case ACT_ASSIGN:
			if (!nocrm_user_is_active(action->user_id))
				action_history(rule, action, lead, NULL, NULL,
							   psprintf("skipped: user %lld is inactive",
										(long long) action->user_id));
			else
				assign_to(rule, action, lead, action->user_id);
			break;
		case ACT_ASSIGN_ROUND_ROBIN:
		case ACT_ASSIGN_RANDOM:
		case ACT_ASSIGN_BALANCED:
			{
				bool		found;
				bool		fallback;
				int64		user_id = nocrm_pick_assignee(rule, action, lead, &found, &fallback);

				if (!found)
					action_history(rule, action, lead, NULL, NULL,
								   "skipped: no available user in the group");
				else
				{
					if (fallback)
						action_history(rule, action, lead, NULL, NULL,
									   "nobody available: fallback \"anyone\" applies");
					assign_to(rule, action, lead, user_id);
				}
				break;
			}
		case ACT_ADD_TAGS:
		case ACT_REMOVE_TAGS:
			change_tags(rule, action, lead);
			break;
		case ACT_SET_STATUS:
			set_status(rule, action, lead);
			break;
		case ACT_SET_STEP:
			set_step(rule, action, lead);
			break;
		case ACT_COMMENT:
			add_comment(rule, action, lead);
			break;
		case ACT_NOTIFY:
			notify(rule, action, lead, ev);
			break;
		case ACT_SEND_EMAIL:
			send_email(rule, action, lead, ev);
			break;
		case ACT_WEBHOOK:
			webhook(rule, action, lead, ev);
			break;
		case ACT_SET_FIELD:
			set_field(rule, action, lead);
			break;
		case ACT_CREATE_TASK:
			nocrm_create_task(rule, action, lead, ev);
			break;
		case ACT_COUNT:
			elog(ERROR, "unexpected action kind");
	}
}
