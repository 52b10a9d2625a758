/*
 * explain.c — nocrm.explain(lead_id, event, target): for every automation
 * and stage trigger listening to an event, would it fire on this lead now,
 * and if not, why not.  Changes nothing.
 *
 * It compiles and matches rules with the engine's own code (definition.c,
 * rules.c, stages.c), so its answer is the engine's answer.
 */
#include "nocrm.h"

#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/tuplestore.h"

PG_FUNCTION_INFO_V1(nocrm_explain);
PG_FUNCTION_INFO_V1(nocrm_describe_sender);

typedef struct ExplainOut
{
	Tuplestorestate *store;
	TupleDesc	desc;
} ExplainOut;

static void
emit(ExplainOut *out, const char *kind, int32 id, const char *name, bool would,
	 const char *reason, Jsonb *conditions, Datum actions, bool actions_null)
{
	Datum		values[7];
	bool		nulls[7] = {false, false, false, false, reason == NULL, conditions == NULL,
	actions_null};

	values[0] = CStringGetTextDatum(kind);
	values[1] = Int32GetDatum(id);
	values[2] = CStringGetTextDatum(name ? name : "");
	values[3] = BoolGetDatum(would);
	values[4] = reason ? CStringGetTextDatum(reason) : (Datum) 0;
	values[5] = conditions ? JsonbPGetDatum(conditions) : (Datum) 0;
	values[6] = actions;
	tuplestore_putvalues(out->store, out->desc, values, nulls);
}

/*
 * The event as explain pretends it happened: target resolved like a rule's,
 * and the lead changed as the event says, since the engine checks
 * conditions on the lead after the change.
 */
static void
build_event(RaisedEvent *ev, LeadState *lead, const char *event, const char *target)
{
	memset(ev, 0, sizeof(*ev));
	ev->event = nocrm_event_from_name(event);
	if (ev->event == EV_COUNT)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown event \"%s\"", event),
				 errhint(NOCRM_EVENT_HINT)));
	if ((ev->event == EV_STATUS_CHANGED || ev->event == EV_STEP_CHANGED) && target == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("event %s needs a target", event),
				 errhint("Give the status or step it changes to, e.g. nocrm.explain(7, '%s', '%s').",
						 event, ev->event == EV_STATUS_CHANGED ? "won" : "Preventivo")));
	if (ev->event == EV_STATUS_CHANGED)
	{
		ev->to_status = nocrm_status_bit(target);
		if (ev->to_status == 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("unknown status \"%s\"", target),
					 errhint("Statuses are todo, standby, won, lost, cancelled.")));
		lead->status = ev->to_status;
		lead->status_text = pstrdup(target);
	}
	else if (ev->event == EV_STEP_CHANGED)
	{
		bool		found;

		/* A step name means that step of the lead's pipeline. */
		ev->to_step = strspn(target, "0123456789") == strlen(target) && strlen(target) <= 18
			? nocrm_lookup_id("SELECT id FROM nocrm.steps WHERE id = $1",
							  Int64GetDatum(strtoll(target, NULL, 10)), INT8OID, &found)
			: nocrm_lookup_id(psprintf("SELECT id FROM nocrm.steps WHERE name = $1 AND pipeline_id %s",
									   lead->has_pipeline
									   ? psprintf("= %lld", (long long) lead->pipeline_id)
									   : "IS NULL"),
							  CStringGetTextDatum(target), TEXTOID, &found);
		if (!found)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("lead %lld's pipeline has no step \"%s\"", (long long) lead->id, target),
					 errhint("Give a step of the lead's pipeline, by name or id.")));
		lead->step_id = ev->to_step;
		lead->has_step = true;
	}
	else if (ev->event == EV_ASSIGNED || ev->event == EV_UNASSIGNED)
	{
		/* an owner change (stage triggers tell it from a creation by the old value) */
		ev->old_value = nocrm_jsonb_int_pair("user_id", lead->owner_id, !lead->has_owner);
		if (ev->event == EV_UNASSIGNED)
			lead->has_owner = false;
		else if (target != NULL)
		{
			bool		found;

			lead->owner_id = strspn(target, "0123456789") == strlen(target) && strlen(target) <= 18
				? nocrm_lookup_id("SELECT id FROM nocrm.users WHERE id = $1",
								  Int64GetDatum(strtoll(target, NULL, 10)), INT8OID, &found)
				: nocrm_lookup_id("SELECT id FROM nocrm.users WHERE lower(email) = lower($1)",
								  CStringGetTextDatum(target), TEXTOID, &found);
			if (!found)
				ereport(ERROR,
						(errcode(ERRCODE_UNDEFINED_OBJECT),
						 errmsg("unknown user \"%s\"", target),
						 errhint("Give the new owner's id or email.")));
			lead->has_owner = true;
		}
	}
	else if (target != NULL && (ev->event == EV_ANY_UPDATE || ev->event == EV_CONTENT_CHANGED))
		ev->new_value = nocrm_jsonb_pair(target, NULL);	/* the field that changes */
	if (target != NULL && ev->event != EV_STATUS_CHANGED && ev->event != EV_STEP_CHANGED &&
		ev->event != EV_ASSIGNED && ev->event != EV_ANY_UPDATE && ev->event != EV_CONTENT_CHANGED)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("event %s takes no target", event)));
}

static Datum
describe(int32 automation_id, Datum actions, int64 lead_id, const char *event, bool *isnull)
{
	Oid			types[4] = {INT4OID, JSONBOID, INT8OID, TEXTOID};
	Datum		args[4] = {Int32GetDatum(automation_id), actions, Int64GetDatum(lead_id),
	CStringGetTextDatum(event)};
	int			ret;

	ret = SPI_execute_with_args("SELECT nocrm.describe_actions($1, $2, $3, $4)",
								4, types, args, NULL, false, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "describing actions failed: %s", SPI_result_code_string(ret));
	return SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, isnull);
}

/* The column explain's lead.any_update / content_has_changed target changes. */
static const char *
changed_column(RaisedEvent *ev)
{
	JsonbIterator *it;
	JsonbValue	v;

	if (ev->new_value == NULL)
		return NULL;
	it = JsonbIteratorInit(&ev->new_value->root);
	while (JsonbIteratorNext(&it, &v, true) != WJB_DONE)
		if (v.type == jbvString)
			return pnstrdup(v.val.string.val, v.val.string.len);
	return NULL;
}

/* A date rule's pending firing for the lead: {"next_firing": due_at or null}. */
static Jsonb *
with_next_firing(Jsonb *conditions, int32 automation_id, int64 lead_id)
{
	Oid			types[3] = {INT4OID, INT8OID, JSONBOID};
	Datum		args[3] = {Int32GetDatum(automation_id), Int64GetDatum(lead_id),
	JsonbPGetDatum(conditions)};
	bool		isnull;
	int			ret;

	ret = SPI_execute_with_args("SELECT $3 || jsonb_build_object('next_firing',"
								" (SELECT min(due_at) FROM nocrm.date_firings"
								"   WHERE automation_id = $1 AND lead_id = $2 AND state = 'pending'))",
								3, types, args, NULL, true, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "reading date firings failed: %s", SPI_result_code_string(ret));
	return DatumGetJsonbPCopy(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

static void
explain_automations(ExplainOut *out, LeadState *lead, RaisedEvent *ev, const char *event)
{
	Oid			types[1] = {TEXTOID};
	Datum		args[1] = {CStringGetTextDatum(event)};
	SPITupleTable *rows;
	uint64		n;
	int			ret;

	Rule	   *stopper = NULL;

	ret = SPI_execute_with_args(psprintf("SELECT %s, enabled FROM nocrm.automations"
										 " WHERE event = $1 ORDER BY %s",
										 nocrm_rule_columns(), NOCRM_RULE_ORDER),
								1, types, args, NULL, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading automations failed: %s", SPI_result_code_string(ret));
	rows = SPI_tuptable;
	n = SPI_processed;
	for (uint64 i = 0; i < n; i++)
	{
		HeapTuple	tup = rows->vals[i];
		bool		isnull;
		int32		id = DatumGetInt32(SPI_getbinval(tup, rows->tupdesc, 1, &isnull));
		char	   *name = SPI_getvalue(tup, rows->tupdesc, 2);
		Datum		actions_json = SPI_getbinval(tup, rows->tupdesc, 6, &isnull);
		bool		test_mode = DatumGetBool(SPI_getbinval(tup, rows->tupdesc, 7, &isnull));
		bool		enabled = DatumGetBool(SPI_getbinval(tup, rows->tupdesc, NOCRM_RULE_NCOLUMNS + 1, &isnull));
		char	   *error = NULL;
		Rule	   *rule = nocrm_compile_stored(tup, rows->tupdesc, &error);
		Jsonb	   *conditions = NULL;
		const char *failed = NULL;
		const char *reason = NULL;
		bool		target_ok = true;
		Datum		described;
		bool		described_null;

		if (rule)
		{
			RaisedEvent probe = *ev;

			/* the target check alone: conditions are reported one by one */
			target_ok = nocrm_rule_matches_target(rule, &probe);
			conditions = nocrm_conditions_report(rule, lead, changed_column(ev), &failed);
			if (rule->event == EV_DATE_REACHED)
				conditions = with_next_firing(conditions, id, lead->id);
		}
		if (!enabled)
			reason = "disabled";
		else if (rule == NULL)
			reason = psprintf("broken: %s", error);
		else if (!target_ok)
			reason = psprintf("its target is %s", SPI_getvalue(tup, rows->tupdesc, 4));
		else if (failed)
			reason = psprintf("condition %s does not hold", failed);
		else if (!nocrm_automations_enabled)
			reason = "nocrm.automations_enabled is off";
		else if (stopper)
			reason = psprintf("automation %d \"%s\" before it stops processing (stop_processing)",
							  stopper->id, stopper->name);
		else if (nocrm_chain_contains(id))
			reason = "loop stop: it already ran in this chain";
		else if (nocrm_chain_depth() >= nocrm_max_chain_depth)
			reason = psprintf("loop stop: chain depth limit %d reached (nocrm.max_chain_depth)",
							  nocrm_max_chain_depth);
		else if (!lead->deleted && !nocrm_enrollment_admits(rule, lead->id, false, &reason))
			;
		else if (test_mode)
			reason = "test mode: it would only record what it would do";
		if (reason == NULL && rule->stop_processing)
			stopper = rule;

		described = describe(id, actions_json, lead->id, event, &described_null);
		emit(out, "automation", id, name, reason == NULL, reason, conditions,
			 described, described_null);
	}
}

static void
explain_stage_triggers(ExplainOut *out, LeadState *lead, RaisedEvent *ev)
{
	int			n;
	StageVerdict *verdicts = nocrm_stage_verdicts(lead, ev, &n);

	for (int i = 0; i < n; i++)
	{
		JsonbParseState *state = NULL;
		Jsonb	   *move;

		pushJsonbValue(&state, WJB_BEGIN_ARRAY, NULL);
		{
			Jsonb	   *obj = nocrm_jsonb_int_pair("move_to_step_id", verdicts[i].step_id, false);
			JsonbValue	v;

			v.type = jbvBinary;
			v.val.binary.data = &obj->root;
			v.val.binary.len = VARSIZE(obj) - VARHDRSZ;
			pushJsonbValue(&state, WJB_ELEM, &v);
		}
		move = JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_ARRAY, NULL));
		emit(out, "stage_trigger", verdicts[i].id, verdicts[i].name, verdicts[i].would_move,
			 verdicts[i].reason, NULL, JsonbPGetDatum(move), false);
	}
}

/* nocrm.explain(lead_id, event, target) */
Datum
nocrm_explain(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	ExplainOut	out;
	LeadState	lead;
	RaisedEvent ev;
	char	   *event;
	char	   *target;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("lead_id and event must not be null")));
	event = text_to_cstring(PG_GETARG_TEXT_PP(1));
	target = PG_ARGISNULL(2) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(2));

	InitMaterializedSRF(fcinfo, 0);
	out.store = rsinfo->setResult;
	out.desc = rsinfo->setDesc;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (!nocrm_lead_fetch(PG_GETARG_INT64(0), &lead))
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("lead %lld does not exist", (long long) PG_GETARG_INT64(0))));
	build_event(&ev, &lead, event, target);
	if (ev.event == EV_DELETED)
		lead.deleted = true;
	explain_automations(&out, &lead, &ev, event);
	if (nocrm_automations_enabled)
		explain_stage_triggers(&out, &lead, &ev);
	SPI_finish();
	return (Datum) 0;
}

/* A string member of an action, or NULL. */
static char *
action_string(Jsonb *action, const char *key)
{
	JsonbValue	k;
	JsonbValue *v;

	if (!JB_ROOT_IS_OBJECT(action))
		return NULL;
	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	v = findJsonbValueFromContainer(&action->root, JB_FOBJECT, &k);
	return v && v->type == jbvString ? pnstrdup(v->val.string.val, v->val.string.len) : NULL;
}

/*
 * nocrm.describe_sender(action, lead_id): the From and Reply-To an email of
 * send_email or notify would carry for the lead now, as the engine chooses
 * them (actions.c), with "sender" saying why, as the history records it.
 * {} for an action without "from" or "reply_to".
 */
Datum
nocrm_describe_sender(PG_FUNCTION_ARGS)
{
	Jsonb	   *action = PG_GETARG_JSONB_P(0);
	char	   *from = action_string(action, "from");
	char	   *reply_to = action_string(action, "reply_to");
	LeadState	lead;
	bool		have_lead;
	Jsonb	   *payload;
	const char *detail = NULL;
	Oid			types[2] = {JSONBOID, TEXTOID};
	Datum		args[2];
	char		nulls[2] = {' ', ' '};
	Datum		result;
	bool		isnull;
	int			ret;

	if (from == NULL && reply_to == NULL)
		PG_RETURN_JSONB_P(DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum("{}"))));
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	have_lead = !PG_ARGISNULL(1) && nocrm_lead_fetch(PG_GETARG_INT64(1), &lead);
	payload = nocrm_sender_choice(from && strcmp(from, "owner") == 0,
								  reply_to && strcmp(reply_to, "owner") == 0,
								  reply_to && strcmp(reply_to, "owner") != 0 ? reply_to : NULL,
								  have_lead && lead.has_owner, have_lead ? lead.owner_id : 0, &detail);
	args[0] = payload ? JsonbPGetDatum(payload) : (Datum) 0;
	nulls[0] = payload ? ' ' : 'n';
	args[1] = CStringGetTextDatum(detail ? detail : "");
	/* without "from" in the payload the drain sends from nocrm.mail_from */
	ret = SPI_execute_with_args("SELECT jsonb_build_object('from', current_setting('nocrm.mail_from', true))"
								"       || coalesce($1, '{}') || jsonb_build_object('sender', $2)",
								2, types, args, nulls, true, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "describing the sender failed: %s", SPI_result_code_string(ret));
	result = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	result = SPI_datumTransfer(result, false, -1);
	SPI_finish();
	PG_RETURN_DATUM(result);
}
