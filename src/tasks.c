/*
 * tasks.c — the create_task action: a row of nocrm.tasks for the lead, as
 * the Butler, with its assignee (the owner, a user, or a group picked by
 * the group assignment code), its due time (from now or from a date column
 * of the lead, moved into the assignee's working hours when asked) and its
 * title and notes with their placeholders filled in.
 *
 * The INSERT raises task.created through the trigger on nocrm.tasks
 * (task_events.c), nested inside this action's chain like any change.
 */
#include "nocrm.h"

#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"

/* Placeholders can make a title long: cut, whole characters only (the column allows 1000). */
#define MAX_RENDERED_TITLE 1000

static SPIPlanPtr plan_next_id,
			plan_insert,
			plan_working_time,
			plan_user_active;

static void
log_action(Rule *rule, RuleAction *action, LeadState *lead, Jsonb *new_value, const char *detail)
{
	nocrm_runlog_action(action, NULL, new_value, detail);
	if (nocrm_history_level != HISTORY_NONE)
		nocrm_history(lead->id, "action.create_task", rule->id, NULL, new_value, detail);
}

static void
note(StringInfo detail, const char *text)
{
	if (detail->len > 0)
		appendStringInfoString(detail, "; ");
	appendStringInfoString(detail, text);
}

static bool
user_active(int64 user_id)
{
	Oid			types[1] = {INT8OID};
	Datum		args[1] = {Int64GetDatum(user_id)};
	int64		one;

	nocrm_plan(&plan_user_active, "SELECT 1::bigint FROM nocrm.users WHERE id = $1 AND active",
			   1, types);
	return nocrm_plan_int64(plan_user_active, args, NULL, &one);
}

/* The assignee as the action says, false for none (*detail says why). */
static bool
assignee(Rule *rule, RuleAction *action, LeadState *lead, int64 *user_id, StringInfo detail)
{
	if (action->group_kind != ACT_ASSIGN)
	{
		/* the group code picks by the action's kind: give it the group's */
		RuleAction	group = *action;
		bool		found,
					fallback;

		group.kind = action->group_kind;
		*user_id = nocrm_pick_assignee(rule, &group, lead, &found, &fallback);
		if (!found)
			note(detail, "no available user in the group: the task has no assignee");
		else if (fallback)
			note(detail, "nobody available: fallback \"anyone\" applies");
		return found;
	}
	if (action->user_id == USER_IS_OWNER)
	{
		if (!lead->has_owner)
		{
			note(detail, "the lead has no owner: the task has no assignee");
			return false;
		}
		*user_id = lead->owner_id;
		return true;
	}
	if (!user_active(action->user_id))
	{
		note(detail, psprintf("user %lld is inactive: the task has no assignee",
							  (long long) action->user_id));
		return false;
	}
	*user_id = action->user_id;
	return true;
}

/* A date, timestamp or timestamptz value (or a domain over one) as timestamptz. */
static TimestampTz
as_timestamptz(Datum value, Oid typid)
{
	switch (getBaseType(typid))
	{
		case DATEOID:
			return DatumGetTimestampTz(DirectFunctionCall1(date_timestamptz, value));
		case TIMESTAMPOID:
			return DatumGetTimestampTz(DirectFunctionCall1(timestamp_timestamptz, value));
		case TIMESTAMPTZOID:
			return DatumGetTimestampTz(value);
		default:
			elog(ERROR, "create_task: column type %u is not a date or time", typid);
	}
	return 0;					/* keep compiler quiet */
}

/* When the task is due; false for no due date (*detail says why). */
static bool
due_time(RuleAction *action, LeadState *lead, bool has_assignee, int64 user_id,
		 TimestampTz *due, StringInfo detail)
{
	TimestampTz base;

	if (action->due_kind == TASK_DUE_NONE)
		return false;
	if (action->due_kind == TASK_DUE_NOW)
		base = GetCurrentTransactionStartTimestamp();
	else
	{
		TupleDesc	desc;
		HeapTuple	row = nocrm_lead_row(lead, &desc);
		int			attnum = row ? SPI_fnumber(desc, action->due_field) : SPI_ERROR_NOATTRIBUTE;
		bool		isnull = true;
		Datum		value = 0;

		if (attnum > 0)
			value = heap_getattr(row, attnum, desc, &isnull);
		else
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("create_task: nocrm.leads has no column %s", quote_identifier(action->due_field)),
					 errhint("Change the automation's \"due\".")));
		if (isnull)
		{
			note(detail, psprintf("%s is empty: the task has no due date", action->due_field));
			return false;
		}
		base = as_timestamptz(value, TupleDescAttr(desc, attnum - 1)->atttypid);
	}
	*due = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval, TimestampTzGetDatum(base),
												   IntervalPGetDatum(&action->due_offset)));
	if (action->due_working_hours && has_assignee && !TIMESTAMP_NOT_FINITE(*due))
	{
		Oid			types[2] = {INT8OID, TIMESTAMPTZOID};
		Datum		args[2] = {Int64GetDatum(user_id), TimestampTzGetDatum(*due)};
		int			ret;
		bool		isnull;
		Datum		moved;

		/* the owner working-hours function, whatever calendar it consults */
		nocrm_plan(&plan_working_time, "SELECT nocrm.next_working_time($1, $2)", 2, types);
		ret = SPI_execute_plan(plan_working_time, args, NULL, true, 1);
		if (ret != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "create_task: next_working_time failed: %s", SPI_result_code_string(ret));
		moved = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
		if (!isnull && DatumGetTimestampTz(moved) != *due)
		{
			*due = DatumGetTimestampTz(moved);
			note(detail, "due moved into the assignee's working hours");
		}
	}
	else if (action->due_working_hours && !has_assignee)
		note(detail, "no assignee whose working hours apply");
	return true;
}

/* Title or notes with their placeholders filled in, as of now. */
static const char *
render(Rule *rule, LeadState *lead, RaisedEvent *ev, const char *text, bool has_assignee,
	   int64 user_id, int max)
{
	JsonbParseState *state = NULL;
	Jsonb	   *payload;
	char	   *out;
	int			len;

	if (strstr(text, "{{") == NULL)
		return text;
	/* the lead at hand is the lead now (nocrm_create_task): most titles need no query */
	if (nocrm_placeholders_lead_local(text))
		out = nocrm_render_lead_local(text, lead, nocrm_event_names[ev->event], rule->name);
	else
	{
		/* {{user.*}} is the assignee */
		pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
		if (has_assignee)
			nocrm_jsonb_put_int64(&state, "user_id", user_id);
		payload = JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_OBJECT, NULL));
		out = nocrm_render(text, nocrm_template_context(Int64GetDatum(lead->id), false,
														JsonbPGetDatum(payload), false,
														Int32GetDatum(rule->id), false,
														CStringGetTextDatum(nocrm_event_names[ev->event]),
														false, false));
	}
	len = strlen(out);
	if (max > 0 && len > max)
		out[pg_mbcliplen(out, len, max)] = '\0';
	/* placeholders that were all empty: the text as written rather than nothing */
	if (strspn(out, " \t\r\n") == strlen(out))
		return text;
	return out;
}

void
nocrm_create_task(Rule *rule, RuleAction *action, LeadState *lead, RaisedEvent *ev)
{
	LeadState	current;
	StringInfoData detail;
	int64		user_id = 0;
	bool		has_assignee;
	TimestampTz due = 0;
	bool		has_due;
	const char *title;
	const char *notes;
	int64		task_id;
	Jsonb	   *created;
	bool		isnull;

	/* the lead as of now: an earlier action of the rule may have changed it */
	current = *lead;
	if (action != &rule->actions[0] && !nocrm_lead_fetch(lead->id, &current))
	{
		log_action(rule, action, lead, NULL, "skipped: the lead was deleted");
		return;
	}
	initStringInfo(&detail);
	has_assignee = assignee(rule, action, &current, &user_id, &detail);
	has_due = due_time(action, &current, has_assignee, user_id, &due, &detail);
	title = render(rule, &current, ev, action->text, has_assignee, user_id, MAX_RENDERED_TITLE);
	notes = action->task_notes
		? render(rule, &current, ev, action->task_notes, has_assignee, user_id, 0) : NULL;

	/* The id first: the action is logged before the task.created it causes. */
	{
		Oid			types[4] = {TEXTOID, INT8OID, TIMESTAMPTZOID, INT4OID};
		Datum		args[4] = {CStringGetTextDatum(title), Int64GetDatum(user_id),
			TimestampTzGetDatum(due), Int32GetDatum(rule->id)};
		char		nulls[4] = {' ', has_assignee ? ' ' : 'n', has_due ? ' ' : 'n', ' '};
		int			ret;

		nocrm_plan(&plan_next_id,
				   "SELECT s.id, jsonb_build_object('task_id', s.id, 'title', $1, 'assignee_id', $2,"
				   "                                'due_at', $3)"
				   "  FROM (SELECT nextval('nocrm.tasks_id_seq') AS id) s",
				   4, types);
		ret = SPI_execute_plan(plan_next_id, args, nulls, false, 1);
		if (ret != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "create_task: no task id: %s", SPI_result_code_string(ret));
		task_id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		created = DatumGetJsonbPCopy(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2,
												   &isnull));
	}
	log_action(rule, action, lead, created, detail.len > 0 ? detail.data : NULL);

	{
		Oid			types[7] = {INT8OID, INT8OID, INT8OID, TEXTOID, TEXTOID, TIMESTAMPTZOID, INT4OID};
		Datum		args[7] = {Int64GetDatum(task_id), Int64GetDatum(lead->id), Int64GetDatum(user_id),
			CStringGetTextDatum(title), notes ? CStringGetTextDatum(notes) : (Datum) 0,
		TimestampTzGetDatum(due), Int32GetDatum(rule->id)};
		char		nulls[7] = {' ', ' ', has_assignee ? ' ' : 'n', ' ', notes ? ' ' : 'n',
		has_due ? ' ' : 'n', ' '};

		/* the rule's version now: what the action ran under is in rule_versions */
		nocrm_plan(&plan_insert,
				   "INSERT INTO nocrm.tasks (id, lead_id, assignee_id, title, notes, due_at, created_by,"
				   "                         automation_id, rule_version)"
				   " VALUES ($1, $2, $3, $4, $5, $6, 0, $7,"
				   "         (SELECT max(v.version) FROM nocrm.rule_versions v"
				   "           WHERE v.kind = 'automation' AND v.object_id = $7))",
				   7, types);
		nocrm_exec_plan(plan_insert, args, nulls, SPI_OK_INSERT, "create_task: inserting the task");
	}
}
