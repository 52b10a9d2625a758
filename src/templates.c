/*
 * templates.c — email templates: {{placeholder}} checking when a template is
 * saved, and rendering.
 *
 * Rendering substitutes text only, in one pass: a value that itself contains
 * "{{...}}" is copied as it is, never expanded again, and nothing from a
 * lead is ever evaluated.
 */
#include "nocrm.h"

#include "commands/trigger.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "access/htup_details.h"
#include "funcapi.h"
#include "utils/builtins.h"

PG_FUNCTION_INFO_V1(nocrm_template_validate_trigger);
PG_FUNCTION_INFO_V1(nocrm_render_template);
PG_FUNCTION_INFO_V1(nocrm_render_text);
PG_FUNCTION_INFO_V1(nocrm_template_context_sql);

static const char *const placeholders[] = {
	"lead.id", "lead.title", "lead.amount", "lead.status", "lead.probability",
	"lead.description", "lead.contact_email", "lead.pipeline", "lead.step",
	"lead.next_action_at", "lead.created_at",
	"owner.name", "owner.email",
	"butler.name", "butler.email",
	"user.name", "user.email",
	"automation.name", "event", "message",
	NULL
};

#define PLACEHOLDER_LIST "lead.id, lead.title, lead.amount, lead.status, lead.probability, " \
	"lead.description, lead.contact_email, lead.pipeline, lead.step, lead.next_action_at, " \
	"lead.created_at, owner.name, owner.email, butler.name, butler.email, user.name, " \
	"user.email, automation.name, event and message"

static bool
known_placeholder(const char *name, int len)
{
	for (int i = 0; placeholders[i]; i++)
		if (strlen(placeholders[i]) == len && strncmp(placeholders[i], name, len) == 0)
			return true;
	return false;
}

/*
 * Finds the next "{{ name }}" at or after *pos.  Returns false at the end.
 * Sets the placeholder's span [start, end) and its trimmed name.
 */
static bool
next_placeholder(const char *text, const char **pos, const char **start,
				 const char **end, const char **name, int *namelen, bool *unclosed)
{
	const char *open = strstr(*pos, "{{");
	const char *close;

	*unclosed = false;
	if (open == NULL)
		return false;
	close = strstr(open + 2, "}}");
	if (close == NULL)
	{
		*unclosed = true;
		*start = open;
		return false;
	}
	*start = open;
	*end = close + 2;
	*name = open + 2;
	while (**name == ' ')
		(*name)++;
	*namelen = close - *name;
	while (*namelen > 0 && (*name)[*namelen - 1] == ' ')
		(*namelen)--;
	*pos = *end;
	return true;
}

/*
 * The first unknown placeholder in text, or NULL; *unclosed tells of a "{{"
 * without "}}".  Used for rule messages, which take the same placeholders.
 */
char *
nocrm_unknown_placeholder(const char *text, bool *unclosed)
{
	const char *pos = text;
	const char *start,
			   *end,
			   *name;
	int			namelen;

	while (next_placeholder(text, &pos, &start, &end, &name, &namelen, unclosed))
		if (!known_placeholder(name, namelen))
			return pnstrdup(name, namelen);
	return NULL;
}

/* Placeholders the lead's own row and the rule answer, without a query. */
enum
{
	LOCAL_LEAD_ID, LOCAL_LEAD_TITLE, LOCAL_LEAD_STATUS, LOCAL_LEAD_CONTACT_EMAIL, LOCAL_EVENT,
	LOCAL_AUTOMATION_NAME
};
static const char *const lead_local_placeholders[] = {
	[LOCAL_LEAD_ID] = "lead.id",
	[LOCAL_LEAD_TITLE] = "lead.title",
	[LOCAL_LEAD_STATUS] = "lead.status",
	[LOCAL_LEAD_CONTACT_EMAIL] = "lead.contact_email",
	[LOCAL_EVENT] = "event",
	[LOCAL_AUTOMATION_NAME] = "automation.name",
	NULL
};

/* The index of a placeholder in lead_local_placeholders, or -1. */
static int
lead_local_index(const char *name, int namelen)
{
	for (int i = 0; lead_local_placeholders[i]; i++)
		if (strlen(lead_local_placeholders[i]) == namelen &&
			strncmp(lead_local_placeholders[i], name, namelen) == 0)
			return i;
	return -1;
}

/* Does the text use only lead_local_placeholders (or none)? */
bool
nocrm_placeholders_lead_local(const char *text)
{
	const char *pos = text;
	const char *start,
			   *end,
			   *name;
	int			namelen;
	bool		unclosed;

	while (next_placeholder(text, &pos, &start, &end, &name, &namelen, &unclosed))
		if (lead_local_index(name, namelen) < 0)
			return false;
	return true;
}

static void
check_template_text(const char *template_name, const char *field, const char *text)
{
	const char *pos = text;
	const char *start,
			   *end,
			   *name;
	int			namelen;
	bool		unclosed;

	while (next_placeholder(text, &pos, &start, &end, &name, &namelen, &unclosed))
		if (!known_placeholder(name, namelen))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("unknown placeholder {{%.*s}} in the %s of template \"%s\"",
							namelen, name, field, template_name),
					 errdetail("Placeholders are %s.", PLACEHOLDER_LIST),
					 errhint("Check the spelling, e.g. {{lead.title}}.")));
	if (unclosed)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unclosed placeholder in the %s of template \"%s\"", field, template_name),
				 /* quote at most 20 bytes, whole characters only */
				 errdetail("\"{{\" at \"%.*s\" has no matching \"}}\".",
						   pg_mbcliplen(start, strlen(start), 20), start),
				 errhint("Close it, e.g. {{lead.title}}.")));
}

/* BEFORE INSERT OR UPDATE ON nocrm.email_templates */
Datum
nocrm_template_validate_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	HeapTuple	tuple;
	TupleDesc	desc;
	char	   *name,
			   *subject,
			   *body;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_BEFORE(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(trigdata->tg_event))
		elog(ERROR, "nocrm_template_validate_trigger: must be fired before, for each row");
	tuple = TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event)
		? trigdata->tg_newtuple : trigdata->tg_trigtuple;
	/* A restore loads templates the source accepted (restore.c). */
	if (nocrm_restoring())
		return PointerGetDatum(tuple);
	desc = trigdata->tg_relation->rd_att;
	name = SPI_getvalue(tuple, desc, SPI_fnumber(desc, "name"));
	subject = SPI_getvalue(tuple, desc, SPI_fnumber(desc, "subject"));
	body = SPI_getvalue(tuple, desc, SPI_fnumber(desc, "body"));
	if (name == NULL || subject == NULL || body == NULL)
		return PointerGetDatum(tuple);	/* NOT NULL reports it */

	check_template_text(name, "subject", subject);
	check_template_text(name, "body", body);
	if (strpbrk(subject, "\r\n") != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the subject of template \"%s\" contains a line break", name),
				 errdetail("A subject is one header line."),
				 errhint("Remove the line break.")));
	return PointerGetDatum(tuple);
}

/* Appends the value of placeholder name (nothing for a missing or null one). */
typedef void (*PlaceholderWriter) (StringInfo out, const char *name, int namelen, void *arg);

static char *
render_with(const char *text, PlaceholderWriter write_value, void *arg)
{
	StringInfoData out;
	const char *pos = text;
	const char *copied = text;
	const char *start,
			   *end,
			   *name;
	int			namelen;
	bool		unclosed;

	initStringInfo(&out);
	while (next_placeholder(text, &pos, &start, &end, &name, &namelen, &unclosed))
	{
		appendBinaryStringInfo(&out, copied, start - copied);
		copied = end;
		write_value(&out, name, namelen, arg);
	}
	appendStringInfoString(&out, copied);
	return out.data;
}

static void
write_from_context(StringInfo out, const char *name, int namelen, void *arg)
{
	Jsonb	   *context = (Jsonb *) arg;
	JsonbValue *v;

	v = context ? getKeyJsonValueFromContainer(&context->root, name, namelen, NULL) : NULL;
	if (v == NULL || v->type == jbvNull)
		return;
	if (v->type == jbvString)
		appendBinaryStringInfo(out, v->val.string.val, v->val.string.len);
	else if (v->type == jbvNumeric)
		appendStringInfoString(out,
							   DatumGetCString(DirectFunctionCall1(numeric_out,
																   NumericGetDatum(v->val.numeric))));
	else if (v->type == jbvBool)
		appendStringInfoString(out, v->val.boolean ? "true" : "false");
}

/*
 * Renders a template against a context object mapping placeholder names to
 * values ({"lead.title": "ACME", ...}).  Missing or null values render as
 * empty text.
 */
char *
nocrm_render(const char *text, Jsonb *context)
{
	/* Only an object maps names to values; anything else renders placeholders empty. */
	if (context && (!JB_ROOT_IS_OBJECT(context) || JB_ROOT_IS_SCALAR(context)))
		context = NULL;
	return render_with(text, write_from_context, context);
}

typedef struct LeadLocal
{
	LeadState  *lead;
	const char *event;
	const char *automation;
} LeadLocal;

/* the value of one of lead_local_placeholders */
static void
write_lead_local(StringInfo out, const char *name, int namelen, void *arg)
{
	LeadLocal  *l = (LeadLocal *) arg;
	const char *value = NULL;

	switch (lead_local_index(name, namelen))
	{
		case LOCAL_LEAD_ID:
			appendStringInfo(out, INT64_FORMAT, l->lead->id);
			return;
		case LOCAL_LEAD_TITLE:
			value = l->lead->title;
			break;
		case LOCAL_LEAD_STATUS:
			value = l->lead->status_text;
			break;
		case LOCAL_LEAD_CONTACT_EMAIL:
			value = l->lead->contact_email;
			break;
		case LOCAL_EVENT:
			value = l->event;
			break;
		case LOCAL_AUTOMATION_NAME:
			value = l->automation;
			break;
	}
	if (value)
		appendStringInfoString(out, value);
}

/*
 * A text that uses only lead_local_placeholders, rendered from the lead
 * state at hand: no query, and no context object built per row.
 */
char *
nocrm_render_lead_local(const char *text, LeadState *lead, const char *event,
						const char *automation)
{
	LeadLocal	l = {lead, event, automation};

	return render_with(text, write_lead_local, &l);
}

/* nocrm.render_template(template, lead_id, message): (subject, body) */
Datum
nocrm_render_template(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	Datum		values[2];
	bool		nulls[2] = {false, false};
	Oid			types[3] = {TEXTOID, INT8OID, TEXTOID};
	Datum		args[3];
	char		argnulls[3] = {' ', ' ', ' '};
	int			ret;
	bool		isnull;
	char	   *subject,
			   *body;
	Jsonb	   *context;
	HeapTuple	result;
	MemoryContext caller = CurrentMemoryContext;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("template name must not be null")));
	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "render_template must return a row");
	desc = BlessTupleDesc(desc);

	args[0] = PG_GETARG_DATUM(0);
	args[1] = PG_ARGISNULL(1) ? (Datum) 0 : PG_GETARG_DATUM(1);
	argnulls[1] = PG_ARGISNULL(1) ? 'n' : ' ';
	args[2] = PG_ARGISNULL(2) ? (Datum) 0 : PG_GETARG_DATUM(2);
	argnulls[2] = PG_ARGISNULL(2) ? 'n' : ' ';

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ret = SPI_execute_with_args("SELECT t.subject, t.body,"
								"       nocrm.template_context($2, jsonb_build_object('message', $3), NULL, NULL)"
								"  FROM nocrm.email_templates t WHERE t.name = $1",
								3, types, args, argnulls, true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading template failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("template \"%s\" does not exist", TextDatumGetCString(args[0])),
				 errhint("See nocrm.email_templates.")));
	subject = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	body = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
	context = DatumGetJsonbP(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull));
	/* The result must outlive SPI_finish. */
	MemoryContextSwitchTo(caller);
	values[0] = CStringGetTextDatum(nocrm_render(subject, context));
	values[1] = CStringGetTextDatum(nocrm_render(body, context));
	result = heap_form_tuple(desc, values, nulls);
	SPI_finish();
	PG_RETURN_DATUM(HeapTupleGetDatum(result));
}

/* nocrm.render(template text, context jsonb) */
Datum
nocrm_render_text(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(nocrm_render(text_to_cstring(PG_GETARG_TEXT_PP(0)),
												  PG_ARGISNULL(1) ? NULL : PG_GETARG_JSONB_P(1))));
}

/*
 * The values a template can use: the lead as it is now (or the snapshot a
 * deleted lead's payload carries in "lead"), its pipeline, step and owner,
 * the Butler, the notified user (payload "user_id"), the automation and the
 * message.  A kept plan: notify runs this for every lead a rule notifies
 * about.  Needs an SPI connection; NULL arguments are passed as nulls.
 * Actions pass read_only = false, to see what earlier actions just wrote.
 */
Jsonb *
nocrm_template_context(Datum lead_id, bool lead_null, Datum payload, bool payload_null,
					   Datum automation_id, bool automation_null, Datum event, bool event_null,
					   bool read_only)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[4] = {INT8OID, JSONBOID, INT4OID, TEXTOID};
	Datum		args[4] = {lead_id, payload, automation_id, event};
	char		nulls[4] = {lead_null ? 'n' : ' ', payload_null ? 'n' : ' ',
		automation_null ? 'n' : ' ', event_null ? 'n' : ' '};
	MemoryContext caller = CurrentMemoryContext;
	bool		isnull;
	Jsonb	   *context;

	nocrm_plan(&plan,
			   "SELECT pg_catalog.jsonb_build_object("
			   "  'lead.id', coalesce((x.lead ->> 'id')::bigint, $1),"
			   "  'lead.title', coalesce(x.lead ->> 'title', $2 ->> 'lead_title'),"
			   "  'lead.amount', x.lead -> 'amount', 'lead.status', x.lead ->> 'status',"
			   "  'lead.probability', x.lead -> 'probability',"
			   "  'lead.description', x.lead ->> 'description', 'lead.contact_email', x.lead ->> 'contact_email',"
			   "  'lead.pipeline', p.name, 'lead.step', s.name,"
			   "  'lead.next_action_at', x.lead ->> 'next_action_at', 'lead.created_at', x.lead ->> 'created_at',"
			   "  'owner.name', o.name, 'owner.email', o.email,"
			   "  'butler.name', b.name, 'butler.email', b.email,"
			   "  'user.name', u.name, 'user.email', u.email,"
			   "  'automation.name', a.name, 'event', $4,"
			   "  'message', $2 ->> 'message')"
			   " FROM (SELECT coalesce((SELECT pg_catalog.to_jsonb(l) FROM nocrm.leads l WHERE l.id = $1),"
			   "                       CASE WHEN pg_catalog.jsonb_typeof($2 -> 'lead') = 'object'"
			   "                            THEN $2 -> 'lead' END) AS lead) AS x"
			   " LEFT JOIN nocrm.pipelines p ON p.id = (x.lead ->> 'pipeline_id')::bigint"
			   " LEFT JOIN nocrm.steps s ON s.id = (x.lead ->> 'step_id')::bigint"
			   " LEFT JOIN nocrm.users o ON o.id = (x.lead ->> 'user_id')::bigint"
			   " LEFT JOIN nocrm.users b ON b.is_butler"
			   " LEFT JOIN nocrm.users u ON u.id = ($2 ->> 'user_id')::bigint"
			   " LEFT JOIN nocrm.automations a ON a.id = $3",
			   4, types);
	if (SPI_execute_plan(plan, args, nulls, read_only, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "building the template context failed");
	MemoryContextSwitchTo(caller);
	context = DatumGetJsonbPCopy(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
											   &isnull));
	return context;
}

/* nocrm.template_context(lead_id, payload, automation_id, event) */
Datum
nocrm_template_context_sql(PG_FUNCTION_ARGS)
{
	MemoryContext caller = CurrentMemoryContext;
	Jsonb	   *context;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	context = nocrm_template_context(PG_GETARG_DATUM(0), PG_ARGISNULL(0),
									 PG_ARGISNULL(1) ? (Datum) 0 : PG_GETARG_DATUM(1), PG_ARGISNULL(1),
									 PG_ARGISNULL(2) ? (Datum) 0 : PG_GETARG_DATUM(2), PG_ARGISNULL(2),
									 PG_ARGISNULL(3) ? (Datum) 0 : PG_GETARG_DATUM(3), PG_ARGISNULL(3),
									 true);
	MemoryContextSwitchTo(caller);
	context = DatumGetJsonbPCopy(JsonbPGetDatum(context));
	SPI_finish();
	PG_RETURN_JSONB_P(context);
}
