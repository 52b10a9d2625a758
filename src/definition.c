/*
 * definition.c — checking an automation's definition and compiling it into
 * a Rule: event, target, conditions and actions with every name resolved.
 *
 * The same code validates a definition when it is written (errors reach the
 * user) and compiles it when the rule cache loads.
 */
#include "nocrm.h"

#include "utils/builtins.h"
#include "utils/formatting.h"
#include "utils/lsyscache.h"
#include "utils/typcache.h"
#include "utils/syscache.h"
#include "access/htup_details.h"
#include "catalog/pg_attribute.h"
#include "utils/datetime.h"
#include "utils/timestamp.h"

const char *const nocrm_event_names[EV_COUNT] = {
	[EV_CREATION] = "lead.creation",
	[EV_STATUS_CHANGED] = "lead.status.changed.to",
	[EV_STEP_CHANGED] = "lead.step.changed.to",
	[EV_ASSIGNED] = "lead.assigned",
	[EV_UNASSIGNED] = "lead.unassigned",
	[EV_CONTENT_CHANGED] = "lead.content_has_changed",
	[EV_ANY_UPDATE] = "lead.any_update",
	[EV_COMMENTED] = "lead.commented",
	[EV_EMAIL_RECEIVED] = "lead.email.received",
	[EV_DELETED] = "lead.deleted",
	[EV_DATE_REACHED] = "lead.date.reached",
	[EV_TASK_CREATED] = "task.created",
	[EV_TASK_COMPLETED] = "task.completed",
	[EV_TASK_OVERDUE] = "task.overdue",
};

const char *const nocrm_action_names[ACT_COUNT] = {
	[ACT_ASSIGN] = "assign",
	[ACT_ASSIGN_ROUND_ROBIN] = "assign_round_robin",
	[ACT_ASSIGN_RANDOM] = "assign_random",
	[ACT_ASSIGN_BALANCED] = "assign_balanced",
	[ACT_ADD_TAGS] = "add_tags",
	[ACT_REMOVE_TAGS] = "remove_tags",
	[ACT_SET_STATUS] = "set_status",
	[ACT_SET_STEP] = "set_step",
	[ACT_COMMENT] = "comment",
	[ACT_NOTIFY] = "notify",
	[ACT_SEND_EMAIL] = "send_email",
	[ACT_WEBHOOK] = "webhook",
	[ACT_SET_FIELD] = "set_field",
	[ACT_CREATE_TASK] = "create_task",
};

/* Arguments each action accepts besides "type" and "delay"; first ones required. */
#define MAX_OPTIONAL_ARGS 6
static const struct
{
	const char *required[2];
	const char *optional[MAX_OPTIONAL_ARGS];
}			action_args[ACT_COUNT] = {
	[ACT_ASSIGN] = {{"user"}, {NULL}},
	[ACT_ASSIGN_ROUND_ROBIN] = {{"users"}, {"only_working_hours", "fallback"}},
	[ACT_ASSIGN_RANDOM] = {{"users"}, {"only_working_hours", "fallback"}},
	[ACT_ASSIGN_BALANCED] = {{"users"}, {"only_working_hours", "fallback"}},
	[ACT_ADD_TAGS] = {{"tags"}, {NULL}},
	[ACT_REMOVE_TAGS] = {{"tags"}, {NULL}},
	[ACT_SET_STATUS] = {{"status"}, {NULL}},
	[ACT_SET_STEP] = {{"step"}, {NULL}},
	[ACT_COMMENT] = {{"body"}, {NULL}},
	[ACT_NOTIFY] = {{"user", "message"}, {"channels", "from", "reply_to"}},
	[ACT_SEND_EMAIL] = {{"template"}, {"to", "from", "reply_to"}},
	[ACT_WEBHOOK] = {{"url"}, {NULL}},
	[ACT_SET_FIELD] = {{"field", "value"}, {NULL}},
	[ACT_CREATE_TASK] = {{"title"}, {"assignee", "users", "due", "notes", "only_working_hours", "fallback"}},
};

#define STATUS_LIST "todo, standby, won, lost, cancelled"
#define ACTION_TYPES "Types are assign, assign_round_robin, assign_random, assign_balanced, add_tags, remove_tags, set_status, set_step, comment, notify, send_email, webhook, set_field and create_task."

#define MAX_MESSAGE_BYTES 4000
#define MAX_LIST_LENGTH 1000		/* users, tags, statuses... in one list */
#define MAX_DELAY "10 years"

/* Where in the definition we are, for error details. */
typedef struct DefContext
{
	const char *automation;
	const char *where;			/* "conditions.owner", "action 2 (notify)" ... */
} DefContext;

static void invalid(DefContext *cx, const char *msg, const char *hint) pg_attribute_noreturn();

static void
invalid(DefContext *cx, const char *msg, const char *hint)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid automation \"%s\": %s", cx->automation, msg),
			 errdetail("The problem is in %s.", cx->where),
			 hint ? errhint("%s", hint) : 0));
}

static void
unknown_object(DefContext *cx, const char *kind, const char *name, const char *hint)
{
	ereport(ERROR,
			(errcode(ERRCODE_UNDEFINED_OBJECT),
			 errmsg("invalid automation \"%s\": unknown %s %s", cx->automation, kind, name),
			 errdetail("The problem is in %s.", cx->where),
			 errhint("%s", hint)));
}

NocrmEvent
nocrm_event_from_name(const char *name)
{
	for (int i = 0; i < EV_COUNT; i++)
		if (strcmp(nocrm_event_names[i], name) == 0)
			return (NocrmEvent) i;
	return EV_COUNT;
}

static char *
jstring(JsonbValue *v)
{
	return pnstrdup(v->val.string.val, v->val.string.len);
}

/* A string of nothing but white space? */
static bool
blank(JsonbValue *v)
{
	for (int i = 0; i < v->val.string.len; i++)
		if (!strchr(" \t\r\n", v->val.string.val[i]))
			return false;
	return true;
}

/* A JSON value as text for messages: strings quoted, numbers as written. */
static char *
jdisplay(JsonbValue *v)
{
	if (v->type == jbvString)
		return quote_literal_cstr(jstring(v));
	if (v->type == jbvNumeric)
		return DatumGetCString(DirectFunctionCall1(numeric_out,
												   NumericGetDatum(v->val.numeric)));
	return pstrdup("(value)");
}

/* Any JSON value as JSON text (for describing a condition). */
static char *
jtext(JsonbValue *v)
{
	if (v->type == jbvBinary)
		return JsonbToCString(NULL, v->val.binary.data, v->val.binary.len);
	return JsonbToCString(NULL, &JsonbValueToJsonb(v)->root, -1);
}

static const char *
jtype(JsonbValue *v)
{
	switch (v->type)
	{
		case jbvNull:
			return "null";
		case jbvString:
			return "a string";
		case jbvNumeric:
			return "a number";
		case jbvBool:
			return "a boolean";
		case jbvBinary:
			return JsonContainerIsArray(v->val.binary.data) ? "an array" : "an object";
		default:
			return "a value";
	}
}

/*
 * The elements of a "one value or a list" argument.  Scalars give one
 * element; an array gives its elements (non-empty); nested arrays are refused.
 */
static JsonbValue *
jlist(DefContext *cx, JsonbValue *v, int *n)
{
	JsonbValue *out;

	if (v->type == jbvBinary && JsonContainerIsArray(v->val.binary.data))
	{
		JsonbContainer *c = v->val.binary.data;
		int			size = JsonContainerSize(c);

		if (size == 0)
			invalid(cx, "an empty list", "Give at least one value.");
		if (size > MAX_LIST_LENGTH)
			invalid(cx, psprintf("a list of %d values, more than %d", size, MAX_LIST_LENGTH),
					"Split the rule, or use fewer values.");
		out = palloc(sizeof(JsonbValue) * size);
		for (int i = 0; i < size; i++)
		{
			JsonbValue *e = getIthJsonbValueFromContainer(c, i);

			if (e->type == jbvBinary)
				invalid(cx, psprintf("list element %d is %s", i + 1, jtype(e)),
						"List elements are strings or numbers.");
			out[i] = *e;
		}
		*n = size;
		return out;
	}
	if (v->type == jbvBinary)
		invalid(cx, "an object where a value or a list was expected",
				"Give one value, or a list of values in [ ].");
	out = palloc(sizeof(JsonbValue));
	out[0] = *v;
	*n = 1;
	return out;
}

/* A list of strings, duplicates dropped (["B2B", "B2B"] means "B2B"). */
static char **
string_list(DefContext *cx, JsonbValue *v, int *n, const char *what)
{
	int			nitems;
	JsonbValue *items = jlist(cx, v, &nitems);
	char	  **out = palloc(sizeof(char *) * nitems);

	*n = 0;
	for (int i = 0; i < nitems; i++)
	{
		bool		dup = false;

		if (items[i].type != jbvString)
			invalid(cx, psprintf("%s must be strings, not %s", what, jtype(&items[i])),
					strcmp(what, "channels") == 0 ? "Channels are browser, email and mobile."
					: "Write e.g. \"B2B\" or [\"B2B\", \"Priority\"].");
		if (blank(&items[i]))
			invalid(cx, psprintf("%s must not be empty", what), "Remove the empty value.");
		out[*n] = jstring(&items[i]);
		for (int j = 0; j < *n && !dup; j++)
			dup = strcmp(out[j], out[*n]) == 0;
		if (!dup)
			(*n)++;
	}
	return out;
}

static int
status_value(DefContext *cx, JsonbValue *v)
{
	int			bit;

	if (v->type != jbvString)
		invalid(cx, psprintf("a status must be a string, not %s", jtype(v)),
				"Statuses are " STATUS_LIST ".");
	bit = nocrm_status_bit(jstring(v));
	if (bit == 0)
		invalid(cx, psprintf("unknown status %s", jdisplay(v)),
				"Statuses are " STATUS_LIST ".");
	return bit;
}

/* An id written as a JSON number: a whole number that fits a bigint. */
static Datum
json_id(DefContext *cx, JsonbValue *v, const char *what)
{
	char	   *text = jdisplay(v);

	if (strspn(text, "0123456789") != strlen(text) || strlen(text) > 18)
		invalid(cx, psprintf("%s is not a valid %s id", text, what),
				"Ids are positive whole numbers, as in the id column.");
	return DirectFunctionCall1(numeric_int8, NumericGetDatum(v->val.numeric));
}

/* A user given by id (number) or email (string). */
static int64
resolve_user(DefContext *cx, JsonbValue *v)
{
	bool		found;
	int64		id;

	if (v->type == jbvNumeric)
	{
		id = nocrm_lookup_id("SELECT id FROM nocrm.users WHERE id = $1",
							 json_id(cx, v, "user"), INT8OID, &found);
	}
	else if (v->type == jbvString)
		id = nocrm_lookup_id("SELECT id FROM nocrm.users WHERE lower(email) = lower($1)",
							 CStringGetTextDatum(jstring(v)), TEXTOID, &found);
	else
	{
		invalid(cx, psprintf("a user must be an id (number) or an email (string), not %s",
							 jtype(v)), "Write e.g. 7 or \"anna@example.com\".");
		return 0;				/* keep compiler quiet */
	}
	if (!found)
		unknown_object(cx, "user", jdisplay(v),
					   "Name users by their id or email in nocrm.users.");
	return id;
}

static int64 *
resolve_users(DefContext *cx, JsonbValue *v, int *n, bool allow_dups)
{
	JsonbValue *items = jlist(cx, v, n);
	int64	   *ids = palloc(sizeof(int64) * *n);

	for (int i = 0; i < *n; i++)
	{
		ids[i] = resolve_user(cx, &items[i]);
		for (int j = 0; j < i && !allow_dups; j++)
			if (ids[j] == ids[i])
				invalid(cx, psprintf("user %s is listed twice", jdisplay(&items[i])),
						"List each user once.");
	}
	return ids;
}

static int64
resolve_pipeline(DefContext *cx, JsonbValue *v)
{
	bool		found;
	int64		id;

	if (v->type == jbvNumeric)
		id = nocrm_lookup_id("SELECT id FROM nocrm.pipelines WHERE id = $1",
							 json_id(cx, v, "pipeline"), INT8OID, &found);
	else if (v->type == jbvString)
		id = nocrm_lookup_id("SELECT id FROM nocrm.pipelines WHERE name = $1",
							 CStringGetTextDatum(jstring(v)), TEXTOID, &found);
	else
	{
		invalid(cx, psprintf("a pipeline must be a name or an id, not %s", jtype(v)),
				"Write e.g. \"Vendite\" or 1.");
		return 0;
	}
	if (!found)
		unknown_object(cx, "pipeline", jdisplay(v), "See nocrm.pipelines.");
	return id;
}

/* Every step a name or id stands for (a name may exist in several pipelines). */
static void
resolve_steps(DefContext *cx, JsonbValue *v, int64 **ids, int *n)
{
	Oid			argtype;
	Datum		arg;
	char		nulls = ' ';
	int			ret;
	int			base = *n;
	MemoryContext caller = CurrentMemoryContext;

	if (v->type == jbvNumeric)
	{
		argtype = INT8OID;
		arg = json_id(cx, v, "step");
		ret = SPI_execute_with_args("SELECT id FROM nocrm.steps WHERE id = $1",
									1, &argtype, &arg, &nulls, false, 0);
	}
	else if (v->type == jbvString)
	{
		argtype = TEXTOID;
		arg = CStringGetTextDatum(jstring(v));
		ret = SPI_execute_with_args("SELECT id FROM nocrm.steps WHERE name = $1 ORDER BY id",
									1, &argtype, &arg, &nulls, false, 0);
	}
	else
	{
		invalid(cx, psprintf("a step must be a name or an id, not %s", jtype(v)),
				"Write e.g. \"Preventivo\" or 3.");
		return;
	}
	/* SPI leaves us in its own context; the ids belong to the caller's. */
	MemoryContextSwitchTo(caller);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "step lookup failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		unknown_object(cx, "step", jdisplay(v), "See nocrm.steps.");
	*n += SPI_processed;
	*ids = *ids ? repalloc(*ids, sizeof(int64) * *n) : palloc(sizeof(int64) * *n);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		bool		isnull;

		(*ids)[base + i] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i],
													   SPI_tuptable->tupdesc, 1, &isnull));
	}
}

static void
check_template(DefContext *cx, JsonbValue *v)
{
	bool		found;

	if (v->type != jbvString)
		invalid(cx, psprintf("template must be a template name, not %s", jtype(v)),
				"Name a row of nocrm.email_templates, e.g. \"quote_followup\".");
	nocrm_lookup_id("SELECT 1::bigint FROM nocrm.email_templates WHERE name = $1",
					CStringGetTextDatum(jstring(v)), TEXTOID, &found);
	if (!found)
		unknown_object(cx, "template", jdisplay(v),
					   "Create it first: INSERT INTO nocrm.email_templates (name, subject, body).");
}

/* A positive interval, e.g. "2 hours" or "P1D", parsed without throwing. */
static void
parse_interval(DefContext *cx, JsonbValue *v, Interval *out, const char *what)
{
	char	   *str;
	char		workbuf[256];
	char	   *field[MAXDATEFIELDS];
	int			ftype[MAXDATEFIELDS];
	int			nf;
	int			dtype = 0;
	int			dterr;
	struct pg_itm_in itm_in;
	if (v->type != jbvString)
		invalid(cx, psprintf("%s must be an interval string such as \"2 hours\", not %s",
							 what, jtype(v)),
				psprintf("Write the %s as text, e.g. \"30 minutes\".", what));
	str = jstring(v);
	memset(&itm_in, 0, sizeof(itm_in));
	dterr = ParseDateTime(str, workbuf, sizeof(workbuf), field, ftype, MAXDATEFIELDS, &nf);
	if (dterr == 0)
		dterr = DecodeInterval(field, ftype, nf, INTERVAL_FULL_RANGE, &dtype, &itm_in);
	if (dterr == DTERR_BAD_FORMAT)
	{
		memset(&itm_in, 0, sizeof(itm_in));
		dterr = DecodeISO8601Interval(str, &dtype, &itm_in);
	}
	if (dterr != 0 || dtype != DTK_DELTA || itmin2interval(&itm_in, out) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_DATETIME_FORMAT),
				 errmsg("invalid automation \"%s\": bad %s %s", cx->automation, what,
						quote_literal_cstr(str)),
				 errdetail("The problem is in %s.", cx->where),
				 errhint("Write the %s as a PostgreSQL interval, e.g. \"30 minutes\", \"2 hours\" or \"%s\".",
						 what, strcmp(what, "delay") == 0 || strcmp(what, "due") == 0 ? "3 days" : "-3 days")));
}

static void
parse_delay(DefContext *cx, JsonbValue *v, RuleAction *a)
{
	Interval	zero = {0};
	Interval   *out = &a->delay;
	char	   *str;
	const char *problem;

	/* "2 business hours": counted on the owner's or the company's calendar (calendar.c) */
	if (v->type == jbvString &&
		nocrm_business_parse((str = jstring(v)), &a->business_unit, &a->business_amount, &problem))
	{
		if (problem)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_DATETIME_FORMAT),
					 errmsg("invalid automation \"%s\": bad delay %s: %s", cx->automation,
							quote_literal_cstr(str), problem),
					 errdetail("The problem is in %s.", cx->where),
					 errhint("Write a business delay as \"2 business hours\", \"90 business minutes\" or \"3 business days\".")));
		if (a->business_amount < 1)
			invalid(cx, psprintf("delay %s is not positive", quote_literal_cstr(str)),
					"Leave the delay out to run the action at once.");
		if (a->business_amount > nocrm_business_max(a->business_unit))
			invalid(cx, psprintf("delay %s is longer than %s", quote_literal_cstr(str), MAX_DELAY),
					"Use a shorter delay.");
		return;
	}
	a->business_unit = BUSINESS_NONE;
	parse_interval(cx, v, out, "delay");
	str = jstring(v);
	if (!DatumGetBool(DirectFunctionCall2(interval_gt, IntervalPGetDatum(out),
										  IntervalPGetDatum(&zero))))
		invalid(cx, psprintf("delay %s is not positive", quote_literal_cstr(str)),
				"Leave the delay out to run the action at once.");
	/* now() + delay must stay a timestamp, whatever the lead does later */
	if (DatumGetBool(DirectFunctionCall2(interval_gt, IntervalPGetDatum(out),
										 DirectFunctionCall3(interval_in,
															 CStringGetDatum(MAX_DELAY),
															 ObjectIdGetDatum(InvalidOid),
															 Int32GetDatum(-1)))))
		invalid(cx, psprintf("delay %s is longer than %s", quote_literal_cstr(str), MAX_DELAY),
				"Use a shorter delay.");
}

static void
check_channels(DefContext *cx, JsonbValue *v, int *mask)
{
	int			n;
	char	  **names = string_list(cx, v, &n, "channels");

	*mask = 0;
	for (int i = 0; i < n; i++)
	{
		if (strcmp(names[i], "browser") == 0)
			*mask |= CHANNEL_BROWSER;
		else if (strcmp(names[i], "email") == 0)
			*mask |= CHANNEL_EMAIL;
		else if (strcmp(names[i], "mobile") == 0)
			*mask |= CHANNEL_MOBILE;
		else
			invalid(cx, psprintf("unknown channel %s", quote_literal_cstr(names[i])),
					"Channels are browser, email and mobile.");
	}
}

static bool
is_key(const char *key, const char *const *list, int n)
{
	for (int i = 0; i < n; i++)
		if (list[i] && strcmp(list[i], key) == 0)
			return true;
	return false;
}

static Datum
text_array(char **items, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * n);

	for (int i = 0; i < n; i++)
		d[i] = CStringGetTextDatum(items[i]);
	return PointerGetDatum(construct_array(d, n, TEXTOID, -1, false, TYPALIGN_INT));
}

static bool
event_changes_lead_forbidden(NocrmEvent event, ActionKind kind)
{
	return event == EV_DELETED && kind != ACT_NOTIFY && kind != ACT_SEND_EMAIL &&
		kind != ACT_WEBHOOK;
}

static bool
optional_bool(DefContext *cx, JsonbValue *v, const char *what, bool dflt)
{
	if (v == NULL)
		return dflt;
	if (v->type != jbvBool)
		invalid(cx, psprintf("%s must be true or false, not %s", what, jtype(v)),
				psprintf("Write \"%s\": true, or leave it out.", what));
	return v->val.boolean;
}

/* A whole number in [min, max] written as a JSON number. */
static int
json_int(DefContext *cx, JsonbValue *v, const char *what, int min, int max)
{
	char	   *text;
	long		n;

	if (v->type != jbvNumeric)
		invalid(cx, psprintf("%s must be a number, not %s", what, jtype(v)),
				psprintf("Write e.g. \"%s\": %d.", what, Max(min, 2)));
	text = jdisplay(v);
	n = strtol(text, NULL, 10);
	if (strspn(text, "0123456789") != strlen(text) || strlen(text) > 9 || n < min || n > max)
		invalid(cx, psprintf("%s %s is not a whole number from %d to %d", what, text, min, max),
				psprintf("Write e.g. \"%s\": %d.", what, Max(min, 2)));
	return (int) n;
}

/*
 * The members of an assignment group: users, or objects
 * {"user": u, "weight": w, "cap": c} (weight 1..1000, cap = most open leads).
 * Weights and caps live in nocrm.assignment_counters; here they are checked.
 */
static void
group_members(DefContext *cx, JsonbValue *users, RuleAction *a)
{
	JsonbContainer *list = users->val.binary.data;
	int			n = JsonContainerSize(list);

	if (n == 0)
		invalid(cx, "an empty list", "Give at least one user.");
	if (n > MAX_LIST_LENGTH)
		invalid(cx, psprintf("a group of %d users, more than %d", n, MAX_LIST_LENGTH),
				"Split the group.");
	a->users = palloc(sizeof(int64) * n);
	a->nusers = n;
	for (int i = 0; i < n; i++)
	{
		JsonbValue *e = getIthJsonbValueFromContainer(list, i);
		JsonbValue *who = e;

		if (e->type == jbvBinary && !JsonContainerIsArray(e->val.binary.data))
		{
			JsonbIterator *it = JsonbIteratorInit(e->val.binary.data);
			JsonbValue	k,
						v;
			JsonbIteratorToken tok;

			who = NULL;
			while ((tok = JsonbIteratorNext(&it, &k, true)) != WJB_DONE)
			{
				char	   *key;

				if (tok != WJB_KEY)
					continue;
				key = jstring(&k);
				(void) JsonbIteratorNext(&it, &v, true);
				if (strcmp(key, "user") == 0)
					who = getKeyJsonValueFromContainer(e->val.binary.data, "user", 4, NULL);
				else if (strcmp(key, "weight") == 0)
					(void) json_int(cx, &v, "weight", 1, 1000);
				else if (strcmp(key, "cap") == 0)
				{
					(void) json_int(cx, &v, "cap", 1, 1000000);
					a->capped = true;
				}
				else
					invalid(cx, psprintf("unknown member key %s", quote_literal_cstr(key)),
							"A member is a user, or {\"user\": ..., \"weight\": 2, \"cap\": 20}.");
			}
			if (who == NULL)
				invalid(cx, "a member object needs \"user\"",
						"Write e.g. {\"user\": \"anna@example.com\", \"weight\": 2}.");
		}
		a->users[i] = resolve_user(cx, who);
		for (int j = 0; j < i; j++)
			if (a->users[j] == a->users[i])
				invalid(cx, psprintf("user %s is listed twice", jdisplay(who)),
						"List each user once.");
	}
}

/* Points error details at one argument of an action. */
static JsonbValue *
action_arg(DefContext *cx, JsonbContainer *c, int no, ActionKind kind, const char *key)
{
	cx->where = psprintf("action %d (%s), argument \"%s\"", no + 1, nocrm_action_names[kind], key);
	return getKeyJsonValueFromContainer(c, key, strlen(key), NULL);
}

static void compile_set_field(DefContext *cx, JsonbValue *field, JsonbValue *value, RuleAction *a);
static void compile_create_task(DefContext *cx, JsonbContainer *c, int no, NocrmEvent event,
								RuleAction *a);

static bool
is_string(JsonbValue *v, const char *s)
{
	return v->type == jbvString && v->val.string.len == (int) strlen(s) &&
		strncmp(v->val.string.val, s, v->val.string.len) == 0;
}

/*
 * "from": "owner" and "reply_to": "owner" or an address, of send_email and
 * of notify's email channel.  The owner is read when the email is queued.
 */
static void
compile_sender(DefContext *cx, JsonbContainer *c, int no, NocrmEvent event, RuleAction *a)
{
	JsonbValue *from = action_arg(cx, c, no, a->kind, "from");
	JsonbValue *reply_to;

	if (from)
	{
		if (!is_string(from, "owner"))
			invalid(cx, from->type == jbvString ? psprintf("unknown from %s", jdisplay(from)) :
					psprintf("from must be \"owner\", not %s", jtype(from)),
					"Write \"from\": \"owner\" to send from the lead owner's address (when users.sender_verified), or leave it out to send from nocrm.mail_from.");
		a->from_owner = true;
	}
	reply_to = action_arg(cx, c, no, a->kind, "reply_to");
	if (reply_to)
	{
		if (reply_to->type != jbvString)
			invalid(cx, psprintf("reply_to must be \"owner\" or an email address, not %s", jtype(reply_to)),
					"Write \"reply_to\": \"owner\" or \"reply_to\": \"sales@acme.example\".");
		if (is_string(reply_to, "owner"))
			a->reply_to_owner = true;
		else
		{
			a->reply_to = jstring(reply_to);
			if (nocrm_address_problem(a->reply_to) != NULL)
				invalid(cx, psprintf("reply_to %s is not \"owner\" and cannot be used as an address: %s",
									 quote_literal_cstr(a->reply_to), nocrm_address_problem(a->reply_to)),
						"Write \"reply_to\": \"owner\", or one address as user@domain, without name, brackets or line breaks.");
		}
	}
	if ((a->from_owner || a->reply_to_owner) && event == EV_UNASSIGNED)
		invalid(cx, psprintf("%s \"owner\" on lead.unassigned: the lead has no owner then",
							 a->from_owner ? "from" : "reply_to"),
				"Leave it out, or name an address in \"reply_to\".");
	if ((from || reply_to) && a->kind == ACT_NOTIFY && !(a->channels & CHANNEL_EMAIL))
		invalid(cx, psprintf("%s applies only to notify's email channel", from ? "from" : "reply_to"),
				"Add \"email\" to \"channels\", or leave it out.");
}

static void
compile_action(DefContext *cx, NocrmEvent event, JsonbValue *def, int no, RuleAction *a)
{
	JsonbContainer *c;
	JsonbValue *type;
	JsonbIterator *it;
	JsonbValue	k;
	JsonbIteratorToken tok;
	int			kind = -1;

	cx->where = psprintf("action %d", no + 1);
	if (def->type != jbvBinary || JsonContainerIsArray(def->val.binary.data) ||
		JsonContainerIsScalar(def->val.binary.data))
		invalid(cx, psprintf("an action must be an object, not %s", jtype(def)),
				"Write each action as {\"type\": \"add_tags\", \"tags\": [\"B2B\"]}.");
	c = def->val.binary.data;

	type = getKeyJsonValueFromContainer(c, "type", 4, NULL);
	if (type == NULL)
		invalid(cx, "the action has no \"type\"",
				ACTION_TYPES);
	if (type->type != jbvString)
		invalid(cx, psprintf("an action type must be a string, not %s", jtype(type)),
				"Write e.g. \"type\": \"add_tags\".");
	for (int i = 0; i < ACT_COUNT; i++)
			if (strlen(nocrm_action_names[i]) == type->val.string.len &&
				strncmp(nocrm_action_names[i], type->val.string.val, type->val.string.len) == 0)
				kind = i;
	if (kind < 0)
		invalid(cx, psprintf("unknown action type %s", jdisplay(type)),
				ACTION_TYPES);

	memset(a, 0, sizeof(RuleAction));
	a->kind = (ActionKind) kind;
	a->action_no = no;
	a->definition = JsonbValueToJsonb(def);
	cx->where = psprintf("action %d (%s)", no + 1, nocrm_action_names[kind]);

	if (event_changes_lead_forbidden(event, a->kind))
		invalid(cx, psprintf("action %s cannot run on lead.deleted: the lead is gone",
							 nocrm_action_names[kind]),
				"On lead.deleted use notify, send_email or webhook.");

	/* Every key must be known: a misspelt argument is an error, not a silent default. */
	it = JsonbIteratorInit(c);
	while ((tok = JsonbIteratorNext(&it, &k, true)) != WJB_DONE)
	{
		char	   *key;

		if (tok != WJB_KEY)
			continue;
		key = jstring(&k);
		if (strcmp(key, "type") != 0 && strcmp(key, "delay") != 0 && strcmp(key, "recheck") != 0 &&
			strcmp(key, "respect_working_hours") != 0 &&
			!is_key(key, action_args[kind].required, 2) &&
			!is_key(key, action_args[kind].optional, MAX_OPTIONAL_ARGS))
		{
			StringInfoData takes;

			initStringInfo(&takes);
			appendStringInfo(&takes, "%s takes %s", nocrm_action_names[kind],
							 action_args[kind].required[0]);
			if (action_args[kind].required[1])
				appendStringInfo(&takes, ", %s", action_args[kind].required[1]);
			for (int i = 0; i < MAX_OPTIONAL_ARGS && action_args[kind].optional[i]; i++)
				appendStringInfo(&takes, "%s%s", i == 0 ? " and optionally " : ", ",
								 action_args[kind].optional[i]);
			invalid(cx, psprintf("unknown argument %s for action %s",
								 quote_literal_cstr(key), nocrm_action_names[kind]),
					psprintf("%s.", takes.data));
		}
	}
	for (int i = 0; i < 2; i++)
	{
		const char *req = action_args[kind].required[i];

		if (req && getKeyJsonValueFromContainer(c, req, strlen(req), NULL) == NULL)
			invalid(cx, psprintf("action %s needs %s", nocrm_action_names[kind],
								 quote_literal_cstr(req)),
					psprintf("Add \"%s\" to the action.", req));
	}

	{
		JsonbValue *delay = action_arg(cx, c, no, a->kind, "delay");

		JsonbValue *recheck;

		if (delay && delay->type != jbvNull)
		{
			parse_delay(cx, delay, a);
			a->delayed = true;
			if (event == EV_DELETED)
				invalid(cx, "a delayed action cannot run on lead.deleted: the lead will be gone",
						"Run it at once (leave \"delay\" out).");
		}
		a->respect_working_hours = optional_bool(cx, action_arg(cx, c, no, a->kind,
																 "respect_working_hours"),
												 "respect_working_hours", false);
		a->recheck = true;
		recheck = action_arg(cx, c, no, a->kind, "recheck");
		if (recheck)
		{
			if (recheck->type != jbvBool)
				invalid(cx, psprintf("recheck must be true or false, not %s", jtype(recheck)),
						"Write \"recheck\": false to run the action whatever the lead looks like then.");
			if (!a->delayed)
				invalid(cx, "recheck only applies to a delayed action",
						"Add a \"delay\", or leave \"recheck\" out.");
			a->recheck = recheck->val.boolean;
		}
	}

	switch (a->kind)
	{
		case ACT_ASSIGN:
			a->user_id = resolve_user(cx, action_arg(cx, c, no, a->kind, "user"));
			break;
		case ACT_ASSIGN_ROUND_ROBIN:
		case ACT_ASSIGN_RANDOM:
		case ACT_ASSIGN_BALANCED:
			{
				JsonbValue *users = action_arg(cx, c, no, a->kind, "users");

				JsonbValue *fallback;

				if (!(users->type == jbvBinary && JsonContainerIsArray(users->val.binary.data)))
					invalid(cx, psprintf("users must be an array of users, not %s", jtype(users)),
							"Write e.g. \"users\": [\"anna@example.com\", 7].");
				group_members(cx, users, a);
				a->only_working_hours =
					optional_bool(cx, action_arg(cx, c, no, a->kind, "only_working_hours"),
								  "only_working_hours", false);
				fallback = action_arg(cx, c, no, a->kind, "fallback");
				if (fallback)
				{
					if (fallback->type == jbvString && fallback->val.string.len == 6 &&
						strncmp(fallback->val.string.val, "anyone", 6) == 0)
						a->assign_anyway = true;
					else if (!(fallback->type == jbvString && fallback->val.string.len == 10 &&
							   strncmp(fallback->val.string.val, "unassigned", 10) == 0))
						invalid(cx, psprintf("unknown fallback %s", jdisplay(fallback)),
								"Fallbacks are \"unassigned\" (leave the lead unassigned and log it) and \"anyone\" (assign among all members anyway).");
				}
				break;
			}
		case ACT_ADD_TAGS:
		case ACT_REMOVE_TAGS:
			{
				char	  **tags = string_list(cx, action_arg(cx, c, no, a->kind, "tags"),
											   &a->ntags, "tags");

				a->tags = text_array(tags, a->ntags);
				break;
			}
		case ACT_SET_STATUS:
			{
				JsonbValue *st = action_arg(cx, c, no, a->kind, "status");

				status_value(cx, st);
				a->status = jstring(st);
				break;
			}
		case ACT_SET_STEP:
			{
				JsonbValue *st = action_arg(cx, c, no, a->kind, "step");
				int64	   *ids = NULL;
				int			n = 0;

				resolve_steps(cx, st, &ids, &n);
				if (st->type == jbvNumeric)
					a->step_id = ids[0];
				else
					a->step_name = jstring(st);
				break;
			}
		case ACT_COMMENT:
			{
				JsonbValue *b = action_arg(cx, c, no, a->kind, "body");

				if (b->type != jbvString || blank(b))
					invalid(cx, "body must be a non-empty string", "Write the comment's text.");
				a->text = jstring(b);
				break;
			}
		case ACT_NOTIFY:
			{
				JsonbValue *u = action_arg(cx, c, no, a->kind, "user");
				JsonbValue *m;
				JsonbValue *ch;

				if (u->type == jbvString && u->val.string.len == 5 &&
					strncmp(u->val.string.val, "owner", 5) == 0)
				{
					if (event == EV_UNASSIGNED)
						invalid(cx, "notify \"owner\" on lead.unassigned has nobody to notify",
								"Name a user instead.");
					a->user_id = USER_IS_OWNER;
				}
				else if (is_string(u, "assignee"))
				{
					/* the event says who: a queued action has no event values */
					if (event != EV_TASK_CREATED && event != EV_TASK_COMPLETED && event != EV_TASK_OVERDUE)
						invalid(cx, psprintf("notify \"assignee\" needs a task event, not %s",
											 nocrm_event_names[event]),
								"Use it on task.created, task.completed or task.overdue; elsewhere name a user or \"owner\".");
					if (a->delayed || a->respect_working_hours)
						invalid(cx, psprintf("notify \"assignee\" cannot be %s",
											 a->delayed ? "delayed" : "held for working hours"),
								"Run it at once, or name a user or \"owner\".");
					a->user_id = USER_IS_ASSIGNEE;
				}
				else
					a->user_id = resolve_user(cx, u);
				m = action_arg(cx, c, no, a->kind, "message");
				if (m->type != jbvString || blank(m))
					invalid(cx, "message must be a non-empty string", "Write the notification's text.");
				/* It travels in a pg_notify payload, which is limited to 8000 bytes. */
				if (m->val.string.len > MAX_MESSAGE_BYTES)
					invalid(cx, psprintf("message is %d bytes long, more than %d",
										 m->val.string.len, MAX_MESSAGE_BYTES),
							"Shorten the message; link to the lead for details.");
				a->text = jstring(m);
				{
					bool		unclosed;
					char	   *unknown = nocrm_unknown_placeholder(a->text, &unclosed);

					if (unknown)
						invalid(cx, psprintf("unknown placeholder {{%s}} in message", unknown),
								"Placeholders are those of email templates, e.g. {{lead.title}} or {{owner.name}}.");
					if (unclosed)
						invalid(cx, "unclosed placeholder in message", "Close it, e.g. {{lead.title}}.");
				}
				a->text_lead_local = nocrm_placeholders_lead_local(a->text);
				a->channels = CHANNEL_BROWSER;
				ch = action_arg(cx, c, no, a->kind, "channels");
				if (ch)
					check_channels(cx, ch, &a->channels);
				compile_sender(cx, c, no, event, a);
				break;
			}
		case ACT_SEND_EMAIL:
			{
				JsonbValue *template = action_arg(cx, c, no, a->kind, "template");
				JsonbValue *to;

				check_template(cx, template);
				a->template_name = jstring(template);
				to = action_arg(cx, c, no, a->kind, "to");
				if (to)
				{
					if (to->type != jbvString || memchr(to->val.string.val, '@', to->val.string.len) == NULL)
						invalid(cx, "to must be an email address",
								"Leave \"to\" out to write to the lead's contact_email.");
					a->to = jstring(to);
					if (strpbrk(a->to, "\r\n<>,; \t") != NULL)
						invalid(cx, psprintf("to %s is not a single email address",
											 quote_literal_cstr(a->to)),
								"Give one address, without name, brackets or line breaks.");
					if (nocrm_address_problem(a->to) != NULL)
						invalid(cx, psprintf("to %s cannot be sent to: %s",
											 quote_literal_cstr(a->to),
											 nocrm_address_problem(a->to)),
								"Give one address as user@domain; a non-ASCII domain must fit IDNA (labels of at most 63 characters once encoded).");
				}
				compile_sender(cx, c, no, event, a);
				break;
			}
		case ACT_SET_FIELD:
			compile_set_field(cx, action_arg(cx, c, no, a->kind, "field"),
							  action_arg(cx, c, no, a->kind, "value"), a);
			break;
		case ACT_CREATE_TASK:
			compile_create_task(cx, c, no, event, a);
			break;
		case ACT_WEBHOOK:
			{
				JsonbValue *url = action_arg(cx, c, no, a->kind, "url");

				if (url->type != jbvString)
					invalid(cx, psprintf("url must be a string, not %s", jtype(url)), NULL);
				a->url = jstring(url);
				if ((strncmp(a->url, "http://", 7) != 0 && strncmp(a->url, "https://", 8) != 0) ||
					strpbrk(a->url, " \t\r\n") != NULL || strlen(a->url) > 2000)
					invalid(cx, psprintf("url %s is not an http(s) URL", quote_literal_cstr(a->url)),
							"Write e.g. \"https://hooks.example.com/crm\".");
				break;
			}
		case ACT_COUNT:
			break;
	}
}

/*
 * Compiles one action on its own: a delayed action is run from the
 * definition it was queued with, which may differ from the automation's
 * current one.
 */
RuleAction *
nocrm_compile_action(const char *automation, NocrmEvent event, Jsonb *definition, int action_no)
{
	DefContext	cx = {automation, "action"};
	RuleAction *a = palloc0(sizeof(RuleAction));
	JsonbValue	v;

	v.type = jbvBinary;
	v.val.binary.data = &definition->root;
	v.val.binary.len = VARSIZE(definition) - VARHDRSZ;
	compile_action(&cx, event, &v, action_no, a);
	return a;
}

/* One of today's condition keys into the rule; false if key is not one. */
static bool
compile_key(DefContext *cx, const char *key, JsonbValue *v, Rule *rule)
{
	int			n;

	if (strcmp(key, "has_tag") == 0)
		rule->has_tags = (const char **) string_list(cx, v, &rule->nhas_tags, "tags");
	else if (strcmp(key, "lacks_tag") == 0)
		rule->lacks_tags = (const char **) string_list(cx, v, &rule->nlacks_tags, "tags");
	else if (strcmp(key, "status") == 0)
	{
		JsonbValue *items = jlist(cx, v, &n);

		for (int i = 0; i < n; i++)
			rule->status_mask |= status_value(cx, &items[i]);
	}
	else if (strcmp(key, "owner") == 0)
	{
		if (v->type == jbvNull)
			rule->unassigned_only = true;
		else
			rule->owners = resolve_users(cx, v, &rule->nowners, true);
	}
	else if (strcmp(key, "pipeline") == 0)
	{
		JsonbValue *items = jlist(cx, v, &n);

		rule->pipelines = palloc(sizeof(int64) * n);
		rule->npipelines = n;
		for (int i = 0; i < n; i++)
			rule->pipelines[i] = resolve_pipeline(cx, &items[i]);
	}
	else if (strcmp(key, "step") == 0)
	{
		JsonbValue *items = jlist(cx, v, &n);

		for (int i = 0; i < n; i++)
			resolve_steps(cx, &items[i], &rule->steps, &rule->nsteps);
	}
	else
		return false;
	return true;
}

#define MAX_CONDITION_DEPTH 8
#define CONDITION_KEYS "has_tag, lacks_tag, status, owner, pipeline, step, any, all, not, and field with op and value"

static const char *const op_aliases[][2] = {
	{"==", "="}, {"<>", "!="}, {"eq", "="}, {"ne", "!="}, {"lt", "<"}, {"le", "<="},
	{"gt", ">"}, {"ge", ">="},
};

static FieldOp
field_op(DefContext *cx, JsonbValue *v)
{
	char	   *name;

	if (v == NULL || v->type != jbvString)
		invalid(cx, "a field condition needs \"op\", a string",
				"Operators: =, !=, <, <=, >, >=, between, in, not_in, is_empty, is_not_empty, contains, starts_with, changed.");
	name = jstring(v);
	for (int i = 0; i < lengthof(op_aliases); i++)
		if (strcmp(name, op_aliases[i][0]) == 0)
			name = (char *) op_aliases[i][1];
	for (int i = 0; i < FOP_COUNT; i++)
		if (strcmp(name, nocrm_field_op_names[i]) == 0)
			return (FieldOp) i;
	invalid(cx, psprintf("unknown operator %s", quote_literal_cstr(name)),
			"Operators: =, !=, <, <=, >, >=, between, in, not_in, is_empty, is_not_empty, contains, starts_with, changed.");
	return FOP_COUNT;
}

/* A JSON value as the column's type, or now() + offset for {"now": "-3 days"}. */
static void
field_value(DefContext *cx, FieldCond *f, JsonbValue *v, FieldValue *out)
{
	Oid			base = getBaseType(f->typid);
	bool		is_time = base == DATEOID || base == TIMESTAMPOID || base == TIMESTAMPTZOID;
	char	   *str;
	Oid			input,
				ioparam;
	MemoryContext oldcontext = CurrentMemoryContext;

	memset(out, 0, sizeof(*out));
	if (v->type == jbvBinary && JsonContainerIsObject(v->val.binary.data))
	{
		JsonbValue *offset = getKeyJsonValueFromContainer(v->val.binary.data, "now", 3, NULL);

		if (!is_time || offset == NULL || offset->type != jbvString ||
			JsonContainerSize(v->val.binary.data) != 1)
			invalid(cx, psprintf("column %s (%s) takes a %s, not an object", f->column,
								 format_type_be(f->typid), is_time ? "date or {\"now\": \"<interval>\"}" : "value"),
					is_time ? "E.g. {\"now\": \"-3 days\"} means three days before the time it is checked." : NULL);
		out->relative = true;
		parse_interval(cx, offset, &out->offset, "offset from now");
		{
			Interval	limit = {0, 0, 100 * MONTHS_PER_YEAR};
			Datum		neg = DirectFunctionCall1(interval_um, IntervalPGetDatum(&limit));

			if (DatumGetBool(DirectFunctionCall2(interval_gt, IntervalPGetDatum(&out->offset),
												 IntervalPGetDatum(&limit))) ||
				DatumGetBool(DirectFunctionCall2(interval_lt, IntervalPGetDatum(&out->offset), neg)))
				invalid(cx, "an offset from now must be within 100 years", NULL);
		}
		return;
	}
	if (v->type == jbvNull)
		invalid(cx, psprintf("a null value for column %s", f->column),
				"Use \"op\": \"is_empty\" or \"is_not_empty\" for NULL.");
	if (v->type == jbvBinary)
		invalid(cx, psprintf("column %s (%s) takes a value, not %s", f->column,
							 format_type_be(f->typid), jtype(v)), NULL);
	str = v->type == jbvString ? jstring(v)
		: v->type == jbvBool ? pstrdup(v->val.boolean ? "true" : "false")
		: DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(v->val.numeric)));
	if (is_time && (pg_strcasecmp(str, "now") == 0 || pg_strcasecmp(str, "today") == 0 ||
					pg_strcasecmp(str, "tomorrow") == 0 || pg_strcasecmp(str, "yesterday") == 0))
		invalid(cx, psprintf("%s would be frozen at the time the rule is written", quote_literal_cstr(str)),
				"Write {\"now\": \"0 days\"}, {\"now\": \"-1 day\"}...: judged when the rule runs.");
	getTypeInputInfo(f->typid, &input, &ioparam);
	PG_TRY();
	{
		out->value = OidInputFunctionCall(input, str, ioparam, -1);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldcontext);
		edata = CopyErrorData();
		FlushErrorState();
		invalid(cx, psprintf("%s is not a valid %s for column %s: %s", quote_literal_cstr(str),
							 format_type_be(f->typid), f->column, edata->message),
				NULL);
	}
	PG_END_TRY();
}

static bool
event_has_old_version(NocrmEvent event)
{
	return event == EV_STATUS_CHANGED || event == EV_STEP_CHANGED || event == EV_ASSIGNED ||
		event == EV_UNASSIGNED || event == EV_CONTENT_CHANGED || event == EV_ANY_UPDATE;
}

/* The column of nocrm.leads a definition names, typed; 42703 if there is none. */
static void
lead_column(DefContext *cx, const char *name, FieldCond *f, const char *hint)
{
	memset(f, 0, sizeof(*f));
	if (!nocrm_field_cond_init(f, nocrm_leads_relid(), name))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("invalid automation \"%s\": nocrm.leads has no column %s", cx->automation,
						quote_identifier(name)),
				 errdetail("The problem is in %s.", cx->where),
				 errhint("%s", hint)));
}

/* {"field": "amount", "op": ">", "value": 1000} and friends. */
static void
compile_field(DefContext *cx, JsonbContainer *obj, NocrmEvent event, FieldCond *f)
{
	JsonbValue *field = getKeyJsonValueFromContainer(obj, "field", 5, NULL);
	JsonbValue *value = getKeyJsonValueFromContainer(obj, "value", 5, NULL);
	JsonbValue *values = getKeyJsonValueFromContainer(obj, "values", 6, NULL);
	JsonbValue *from = getKeyJsonValueFromContainer(obj, "from", 4, NULL);
	JsonbValue *to = getKeyJsonValueFromContainer(obj, "to", 2, NULL);
	JsonbValue *items;
	int			n;

	if (field == NULL || field->type != jbvString)
		invalid(cx, "a field condition needs \"field\", a column name of nocrm.leads",
				"Write e.g. {\"field\": \"amount\", \"op\": \">\", \"value\": 1000}.");
	cx->where = psprintf("%s (field %s)", cx->where, quote_literal_cstr(jstring(field)));
	lead_column(cx, jstring(field), f,
				"Conditions may name any column of nocrm.leads, including ones you added.");
	f->op = field_op(cx, getKeyJsonValueFromContainer(obj, "op", 2, NULL));
	f->text = psprintf("%s %s%s%s", f->column, nocrm_field_op_names[f->op],
					   value || values ? " " : "", value || values ? jtext(values ? values : value) : "");

	if (f->op != FOP_CHANGED && (from || to))
		invalid(cx, "\"from\" and \"to\" belong to \"op\": \"changed\"", NULL);
	if (f->op != FOP_IN && f->op != FOP_NOT_IN && values)
		invalid(cx, "\"values\" belongs to \"op\": \"in\" or \"not_in\"", NULL);
	if (value && values)
		invalid(cx, "give \"value\" or \"values\", not both", NULL);
	switch (f->op)
	{
		case FOP_EMPTY:
		case FOP_NOT_EMPTY:
		case FOP_CHANGED:
			if (value || values)
				invalid(cx, psprintf("\"op\": \"%s\" takes no value", nocrm_field_op_names[f->op]),
						f->op == FOP_CHANGED ? "Use \"from\" and \"to\" for the old and new value." : NULL);
			break;
		case FOP_IN:
		case FOP_NOT_IN:
			if (!values && !value)
				invalid(cx, "\"in\" and \"not_in\" need \"values\", a list", NULL);
			items = jlist(cx, values ? values : value, &n);
			if (n > MAX_LIST_LENGTH)
				invalid(cx, psprintf("more than %d values", MAX_LIST_LENGTH), NULL);
			f->nvalues = n;
			f->values = palloc0(sizeof(FieldValue) * n);
			for (int i = 0; i < n; i++)
				field_value(cx, f, &items[i], &f->values[i]);
			break;
		case FOP_BETWEEN:
			if (!value || value->type != jbvBinary || !JsonContainerIsArray(value->val.binary.data) ||
				JsonContainerSize(value->val.binary.data) != 2)
				invalid(cx, "\"between\" needs \"value\": [low, high]", NULL);
			/* elements may be {"now": ...}: not a jlist */
			f->nvalues = 2;
			f->values = palloc0(sizeof(FieldValue) * 2);
			field_value(cx, f, getIthJsonbValueFromContainer(value->val.binary.data, 0), &f->values[0]);
			field_value(cx, f, getIthJsonbValueFromContainer(value->val.binary.data, 1), &f->values[1]);
			break;
		default:
			if (!value)
				invalid(cx, psprintf("\"op\": \"%s\" needs a \"value\"", nocrm_field_op_names[f->op]), NULL);
			f->nvalues = 1;
			f->values = palloc0(sizeof(FieldValue));
			if ((f->op == FOP_CONTAINS || f->op == FOP_STARTS_WITH) && !f->is_text)
				invalid(cx, psprintf("\"%s\" needs a text column; %s is %s", nocrm_field_op_names[f->op],
									 f->column, format_type_be(f->typid)), NULL);
			if ((f->op == FOP_CONTAINS || f->op == FOP_STARTS_WITH) && value->type != jbvString)
				invalid(cx, psprintf("\"%s\" needs a string value", nocrm_field_op_names[f->op]), NULL);
			field_value(cx, f, value, &f->values[0]);
			if (f->op == FOP_CONTAINS || f->op == FOP_STARTS_WITH)
				f->needle = str_tolower(value->val.string.val, value->val.string.len, f->collation);
			break;
	}
	if (f->op != FOP_EMPTY && f->op != FOP_NOT_EMPTY && f->op != FOP_CHANGED &&
		f->op != FOP_CONTAINS && f->op != FOP_STARTS_WITH && !OidIsValid(f->type->cmp_proc))
		invalid(cx, psprintf("column %s (%s) cannot be compared", f->column, format_type_be(f->typid)),
				"Its type has no ordering; use is_empty, is_not_empty or changed.");
	if (f->op == FOP_BETWEEN && !f->values[0].relative && !f->values[1].relative &&
		DatumGetInt32(FunctionCall2Coll(&f->type->cmp_proc_finfo, f->collation,
										f->values[0].value, f->values[1].value)) > 0)
		invalid(cx, "\"between\" needs its low value first", NULL);
	if (f->op == FOP_CHANGED)
	{
		if (!event_has_old_version(event))
			invalid(cx, psprintf("\"changed\" needs an event that updates the lead, not %s",
								 nocrm_event_names[event]),
					"Use it with lead.any_update, lead.content_has_changed, lead.status.changed.to, lead.step.changed.to, lead.assigned or lead.unassigned.");
		f->has_from = from != NULL;
		f->has_to = to != NULL;
		f->from_null = from && from->type == jbvNull;
		f->to_null = to && to->type == jbvNull;
		if (from && !f->from_null)
			field_value(cx, f, from, &f->from);
		if (to && !f->to_null)
			field_value(cx, f, to, &f->to);
	}
}

/* Columns set_field leaves to the engine or to their own actions. */
static const char *const managed_columns[][2] = {
	{"id", NULL}, {"created_at", NULL}, {"updated_at", NULL}, {"closed_at", NULL},
	{"status", "set_status"}, {"user_id", "assign"}, {"pipeline_id", "set_step"}, {"step_id", "set_step"},
};

static bool
column_not_null(Oid relid, AttrNumber attnum)
{
	HeapTuple	tup = SearchSysCache2(ATTNUM, ObjectIdGetDatum(relid), Int16GetDatum(attnum));
	bool		notnull;

	if (!HeapTupleIsValid(tup))
		return false;
	notnull = ((Form_pg_attribute) GETSTRUCT(tup))->attnotnull;
	ReleaseSysCache(tup);
	return notnull;
}

/* A constant, or now() + offset, as SQL text of the column's type. */
static char *
value_sql(DefContext *cx, FieldCond *f, JsonbValue *v)
{
	FieldValue	fv;
	Oid			output;
	bool		varlena;

	field_value(cx, f, v, &fv);
	if (fv.relative)
		return psprintf("(now() + %s::interval)::%s",
						quote_literal_cstr(DatumGetCString(DirectFunctionCall1(interval_out,
																			   IntervalPGetDatum(&fv.offset)))),
						format_type_be(f->typid));
	getTypeOutputInfo(f->typid, &output, &varlena);
	return psprintf("%s::%s", quote_literal_cstr(OidOutputFunctionCall(output, fv.value)),
					format_type_be(f->typid));
}

/*
 * {"type": "set_field", "field": col, "value": ...}: the value a constant
 * (typed by the column), null, {"now": interval}, or {"field": other} with
 * an optional "plus" or "times".  The UPDATE is built and type-checked
 * here, once; it changes the row only when the value differs.
 */
static void
compile_set_field(DefContext *cx, JsonbValue *field, JsonbValue *value, RuleAction *a)
{
	FieldCond	f;
	char	   *expr;
	char	   *type;
	char	   *col;
	MemoryContext oldcontext = CurrentMemoryContext;

	if (field->type != jbvString)
		invalid(cx, psprintf("field must be a column name, not %s", jtype(field)), NULL);
	lead_column(cx, jstring(field), &f,
				"set_field sets any column of nocrm.leads, including ones you added.");
	for (int i = 0; i < lengthof(managed_columns); i++)
		if (strcmp(f.column, managed_columns[i][0]) == 0)
			invalid(cx, psprintf("set_field cannot set %s", f.column),
					managed_columns[i][1]
					? psprintf("Use the %s action.", managed_columns[i][1])
					: "The engine keeps it.");
	if (get_attgenerated(nocrm_leads_relid(), f.attnum))
		invalid(cx, psprintf("column %s is generated", f.column), NULL);
	a->field = f.column;
	cx->where = psprintf("action %d (set_field), argument \"value\"", a->action_no + 1);
	col = (char *) quote_identifier(f.column);
	type = format_type_be(f.typid);

	if (value->type == jbvNull)
	{
		if (column_not_null(nocrm_leads_relid(), f.attnum))
			invalid(cx, psprintf("column %s is NOT NULL: it cannot be cleared", f.column), NULL);
		expr = pstrdup("NULL");
	}
	else if (value->type == jbvBinary && JsonContainerIsObject(value->val.binary.data) &&
			 getKeyJsonValueFromContainer(value->val.binary.data, "field", 5, NULL))
	{
		JsonbContainer *o = value->val.binary.data;
		JsonbValue *from = getKeyJsonValueFromContainer(o, "field", 5, NULL);
		JsonbValue *plus = getKeyJsonValueFromContainer(o, "plus", 4, NULL);
		JsonbValue *times = getKeyJsonValueFromContainer(o, "times", 5, NULL);
		FieldCond	src;

		memset(&src, 0, sizeof(src));
		if (from->type != jbvString || !nocrm_field_cond_init(&src, nocrm_leads_relid(), jstring(from)))
			invalid(cx, "\"value\": {\"field\": ...} names no column of nocrm.leads", NULL);
		if ((plus && times) || JsonContainerSize(o) != 1 + (plus != NULL) + (times != NULL))
			invalid(cx, "a computed value is {\"field\": column} with at most one of \"plus\" and \"times\"",
					"E.g. {\"field\": \"amount\", \"times\": 0.1} or {\"field\": \"next_action_at\", \"plus\": \"3 days\"}.");
		if ((plus && plus->type != jbvString && plus->type != jbvNumeric) ||
			(times && times->type != jbvNumeric))
			invalid(cx, "\"plus\" takes a number or an interval, \"times\" a number", NULL);
		expr = psprintf("l.%s", quote_identifier(src.column));
		if (plus)
			expr = psprintf("(%s + %s)", expr, plus->type == jbvString
							? psprintf("%s::interval", quote_literal_cstr(jstring(plus)))
							: DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(plus->val.numeric))));
		if (times)
			expr = psprintf("(%s * %s)", expr,
							DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(times->val.numeric))));
	}
	else
		expr = value_sql(cx, &f, value);

	/* Type-checked now: the statement must plan. */
	PG_TRY();
	{
		SPIPlanPtr	plan = SPI_prepare(psprintf("SELECT (%s)::%s FROM nocrm.leads l", expr, type), 0, NULL);

		if (plan == NULL)
			elog(ERROR, "%s", SPI_result_code_string(SPI_result));
		SPI_freeplan(plan);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldcontext);
		edata = CopyErrorData();
		FlushErrorState();
		invalid(cx, psprintf("the value cannot be stored in %s (%s): %s", f.column, type, edata->message),
				NULL);
	}
	PG_END_TRY();

	a->sql = psprintf("WITH old AS (SELECT l.%s AS v FROM nocrm.leads l WHERE l.id = $1 FOR UPDATE)"
					  " UPDATE nocrm.leads l SET %s = (%s)::%s FROM old"
					  " WHERE l.id = $1 AND l.%s IS DISTINCT FROM (%s)::%s"
					  " RETURNING jsonb_build_object(%s, old.v), jsonb_build_object(%s, l.%s)",
					  col, col, expr, type, col, expr, type,
					  quote_literal_cstr(f.column), quote_literal_cstr(f.column), col);
}

#define MAX_TASK_TITLE_BYTES 1000
#define MAX_TASK_NOTES_BYTES 10000

/* A task's title or notes: a non-empty string whose placeholders exist. */
static const char *
task_text(DefContext *cx, JsonbValue *v, const char *what, int max)
{
	bool		unclosed;
	char	   *text;
	char	   *unknown;

	if (v->type != jbvString || blank(v))
		invalid(cx, psprintf("%s must be a non-empty string", what),
				strcmp(what, "title") == 0 ? "Write e.g. \"title\": \"Call {{lead.title}}\"." : NULL);
	if (v->val.string.len > max)
		invalid(cx, psprintf("%s is %d bytes long, more than %d", what, v->val.string.len, max),
				"Shorten it.");
	text = jstring(v);
	unknown = nocrm_unknown_placeholder(text, &unclosed);
	if (unknown)
		invalid(cx, psprintf("unknown placeholder {{%s}} in %s", unknown, what),
				"Placeholders are those of email templates, e.g. {{lead.title}} or {{owner.name}}.");
	if (unclosed)
		invalid(cx, psprintf("unclosed placeholder in %s", what), "Close it, e.g. {{lead.title}}.");
	return text;
}

/*
 * {"type": "create_task", "title": ..., "notes": ..., "assignee": "owner" |
 * user | "round_robin" | "balanced" | "random" (with "users"), "due":
 * interval | {"field": date column, "offset": interval}}.  The group is
 * the one assign_* actions have (counters, weights, caps, fallback).
 */
static void
compile_create_task(DefContext *cx, JsonbContainer *c, int no, NocrmEvent event, RuleAction *a)
{
	JsonbValue *assignee = action_arg(cx, c, no, a->kind, "assignee");
	JsonbValue *users = action_arg(cx, c, no, a->kind, "users");
	JsonbValue *due = action_arg(cx, c, no, a->kind, "due");
	JsonbValue *v;

	a->text = task_text(cx, action_arg(cx, c, no, a->kind, "title"), "title", MAX_TASK_TITLE_BYTES);
	v = action_arg(cx, c, no, a->kind, "notes");
	if (v)
		a->task_notes = task_text(cx, v, "notes", MAX_TASK_NOTES_BYTES);

	/* who: the owner unless told otherwise */
	a->group_kind = ACT_ASSIGN;
	a->user_id = USER_IS_OWNER;
	cx->where = psprintf("action %d (create_task), argument \"assignee\"", no + 1);
	if (assignee && assignee->type == jbvString && !is_string(assignee, "owner") &&
		memchr(assignee->val.string.val, '@', assignee->val.string.len) == NULL)
	{
		if (is_string(assignee, "round_robin"))
			a->group_kind = ACT_ASSIGN_ROUND_ROBIN;
		else if (is_string(assignee, "balanced"))
			a->group_kind = ACT_ASSIGN_BALANCED;
		else if (is_string(assignee, "random"))
			a->group_kind = ACT_ASSIGN_RANDOM;
		else
			invalid(cx, psprintf("unknown assignee %s", jdisplay(assignee)),
					"An assignee is \"owner\", a user (id or email), or \"round_robin\", \"balanced\" or \"random\" among \"users\".");
	}
	else if (assignee && !is_string(assignee, "owner"))
		a->user_id = resolve_user(cx, assignee);
	if (a->user_id == USER_IS_OWNER && a->group_kind == ACT_ASSIGN && event == EV_UNASSIGNED)
		invalid(cx, "a task for the owner on lead.unassigned: the lead has no owner then",
				"Name a user or a group as \"assignee\".");
	if (a->group_kind != ACT_ASSIGN)
	{
		JsonbValue *fallback;

		cx->where = psprintf("action %d (create_task), argument \"users\"", no + 1);
		if (users == NULL)
			invalid(cx, psprintf("assignee %s needs \"users\"", jdisplay(assignee)),
					"Add e.g. \"users\": [\"anna@example.com\", 7].");
		if (!(users->type == jbvBinary && JsonContainerIsArray(users->val.binary.data)))
			invalid(cx, psprintf("users must be an array of users, not %s", jtype(users)),
					"Write e.g. \"users\": [\"anna@example.com\", 7].");
		group_members(cx, users, a);
		a->only_working_hours = optional_bool(cx, action_arg(cx, c, no, a->kind, "only_working_hours"),
											  "only_working_hours", false);
		fallback = action_arg(cx, c, no, a->kind, "fallback");
		if (fallback && is_string(fallback, "anyone"))
			a->assign_anyway = true;
		else if (fallback && !is_string(fallback, "unassigned"))
			invalid(cx, psprintf("unknown fallback %s", jdisplay(fallback)),
					"Fallbacks are \"unassigned\" (create the task with no assignee and log it) and \"anyone\" (pick among all members anyway).");
	}
	else
	{
		static const char *const group_only[] = {"users", "only_working_hours", "fallback"};

		for (int i = 0; i < lengthof(group_only); i++)
			if (action_arg(cx, c, no, a->kind, group_only[i]))
				invalid(cx, psprintf("%s applies only to a group assignee", group_only[i]),
						"Write \"assignee\": \"round_robin\", \"balanced\" or \"random\" with \"users\", or leave it out.");
	}

	/* when: from now, from a date column of the lead, or never */
	a->due_kind = TASK_DUE_NONE;
	cx->where = psprintf("action %d (create_task), argument \"due\"", no + 1);
	if (due && due->type == jbvString)
	{
		Interval	zero = {0};

		parse_interval(cx, due, &a->due_offset, "due");
		if (DatumGetBool(DirectFunctionCall2(interval_lt, IntervalPGetDatum(&a->due_offset),
											 IntervalPGetDatum(&zero))))
			invalid(cx, psprintf("due %s is in the past", quote_literal_cstr(jstring(due))),
					"Give how long after the task is created it is due, e.g. \"2 days\"; or {\"field\": \"next_action_at\", \"offset\": \"-1 day\"}.");
		if (DatumGetBool(DirectFunctionCall2(interval_gt, IntervalPGetDatum(&a->due_offset),
											 DirectFunctionCall3(interval_in, CStringGetDatum(MAX_DELAY),
																 ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1)))))
			invalid(cx, psprintf("due %s is later than %s", quote_literal_cstr(jstring(due)), MAX_DELAY),
					"Give a due time within " MAX_DELAY ".");
		a->due_kind = TASK_DUE_NOW;
	}
	else if (due && due->type == jbvBinary && JsonContainerIsObject(due->val.binary.data))
	{
		JsonbContainer *o = due->val.binary.data;
		JsonbValue *field = getKeyJsonValueFromContainer(o, "field", 5, NULL);
		JsonbValue *offset = getKeyJsonValueFromContainer(o, "offset", 6, NULL);
		FieldCond	f;
		Oid			base;

		if (field == NULL || field->type != jbvString ||
			JsonContainerSize(o) != 1 + (offset != NULL))
			invalid(cx, "a due date from the lead is {\"field\": column, \"offset\": interval}",
					"E.g. {\"field\": \"next_action_at\", \"offset\": \"-1 day\"}; the offset may be left out.");
		lead_column(cx, jstring(field), &f,
					"The field of \"due\" is a date, timestamp or timestamptz column of nocrm.leads.");
		base = getBaseType(f.typid);
		if (base != DATEOID && base != TIMESTAMPOID && base != TIMESTAMPTZOID)
			invalid(cx, psprintf("column %s is %s, not a date or time", f.column, format_type_be(f.typid)),
					"The field of \"due\" is a date, timestamp or timestamptz column of nocrm.leads.");
		a->due_field = f.column;
		if (offset)
			parse_interval(cx, offset, &a->due_offset, "offset");
		a->due_kind = TASK_DUE_FIELD;
	}
	else if (due && due->type != jbvNull)
		invalid(cx, psprintf("due must be an interval or {\"field\": ..., \"offset\": ...}, not %s", jtype(due)),
				"E.g. \"due\": \"2 days\" or \"due\": {\"field\": \"next_action_at\", \"offset\": \"-1 day\"}.");

	/*
	 * respect_working_hours moves the due time into the assignee's working
	 * time; the task itself is made at once.
	 */
	a->due_working_hours = a->respect_working_hours;
	a->respect_working_hours = false;
	if (a->due_working_hours && a->due_kind == TASK_DUE_NONE)
	{
		cx->where = psprintf("action %d (create_task), argument \"respect_working_hours\"", no + 1);
		invalid(cx, "respect_working_hours needs a \"due\" to move into working hours",
				"Add \"due\", or leave respect_working_hours out.");
	}
}

static bool
field_key(const char *key)
{
	return strcmp(key, "field") == 0 || strcmp(key, "op") == 0 || strcmp(key, "value") == 0 ||
		strcmp(key, "values") == 0 || strcmp(key, "from") == 0 || strcmp(key, "to") == 0;
}

static CondNode *compile_node(DefContext *cx, JsonbContainer *obj, NocrmEvent event, int depth,
							  Rule *top);

/* "any" / "all": a non-empty list of condition objects. */
static void
compile_group(DefContext *cx, JsonbValue *v, NocrmEvent event, int depth, CondNode *node)
{
	const char *where = cx->where;
	JsonbValue *items;
	int			n;

	if (v->type != jbvBinary || !JsonContainerIsArray(v->val.binary.data) ||
		JsonContainerSize(v->val.binary.data) == 0)
		invalid(cx, "\"any\" and \"all\" take a non-empty list of conditions",
				"Write e.g. {\"any\": [{\"has_tag\": \"vip\"}, {\"field\": \"amount\", \"op\": \">\", \"value\": 1000}]}.");
	n = JsonContainerSize(v->val.binary.data);
	items = palloc(sizeof(JsonbValue) * n);
	for (int i = 0; i < n; i++)
		items[i] = *getIthJsonbValueFromContainer(v->val.binary.data, i);
	if (n > MAX_LIST_LENGTH)
		invalid(cx, psprintf("more than %d conditions in one list", MAX_LIST_LENGTH), NULL);
	node->nchildren = n;
	node->children = palloc0(sizeof(CondNode) * n);
	for (int i = 0; i < n; i++)
	{
		cx->where = psprintf("%s[%d]", where, i);
		if (items[i].type != jbvBinary || !JsonContainerIsObject(items[i].val.binary.data))
			invalid(cx, psprintf("a condition must be an object, not %s", jtype(&items[i])), NULL);
		node->children[i] = *compile_node(cx, items[i].val.binary.data, event, depth + 1, NULL);
	}
	cx->where = where;
}

/*
 * A condition object: its keys all hold (AND).  Today's keys go into *top
 * when given (the top level: the rule itself, for the gate and cache), else
 * into a CN_KEYS child.  Returns NULL when only such keys were at the top.
 */
static CondNode *
compile_node(DefContext *cx, JsonbContainer *obj, NocrmEvent event, int depth, Rule *top)
{
	const char *where = cx->where;
	CondNode   *node = palloc0(sizeof(CondNode));
	CondNode   *children = palloc0(sizeof(CondNode) * 5);
	int			n = 0;
	Rule	   *keys = top ? top : palloc0(sizeof(Rule));
	bool		has_keys = false,
				has_field = false;
	JsonbIterator *it;
	JsonbValue	k,
				v;
	JsonbIteratorToken tok;

	if (depth > MAX_CONDITION_DEPTH)
		invalid(cx, psprintf("conditions nest deeper than %d levels", MAX_CONDITION_DEPTH), NULL);
	if (top == NULL && JsonContainerSize(obj) == 0)
		invalid(cx, "an empty condition object", "Remove it, or write a condition.");

	it = JsonbIteratorInit(obj);
	while ((tok = JsonbIteratorNext(&it, &k, true)) != WJB_DONE)
	{
		char	   *key;

		if (tok != WJB_KEY)
			continue;
		key = jstring(&k);
		tok = JsonbIteratorNext(&it, &v, true);
		cx->where = psprintf("%s.%s", where, key);
		if (compile_key(cx, key, &v, keys))
			has_keys = true;
		else if (field_key(key))
			has_field = true;
		else if (strcmp(key, "any") == 0 || strcmp(key, "all") == 0)
		{
			children[n].kind = key[1] == 'n' ? CN_ANY : CN_ALL;
			compile_group(cx, &v, event, depth, &children[n++]);
		}
		else if (strcmp(key, "not") == 0)
		{
			if (v.type != jbvBinary || !JsonContainerIsObject(v.val.binary.data))
				invalid(cx, "\"not\" takes one condition object",
						"Write e.g. {\"not\": {\"has_tag\": \"vip\"}}.");
			children[n].kind = CN_NOT;
			children[n].nchildren = 1;
			children[n].children = compile_node(cx, v.val.binary.data, event, depth + 1, NULL);
			n++;
		}
		else
			invalid(cx, psprintf("unknown condition %s", quote_literal_cstr(key)),
					"Conditions are " CONDITION_KEYS ".");
	}
	cx->where = where;
	if (has_field)
	{
		children[n].kind = CN_FIELD;
		compile_field(cx, obj, event, &children[n].field);
		n++;
	}
	if (has_keys && top == NULL)
	{
		children[n].kind = CN_KEYS;
		children[n++].keys = keys;
	}
	if (n == 0)
		return NULL;
	if (n == 1)
		return &children[0];
	node->kind = CN_ALL;
	node->nchildren = n;
	node->children = children;
	return node;
}

static void
compile_conditions(DefContext *cx, Jsonb *conditions, Rule *rule)
{
	cx->where = "conditions";
	if (!JB_ROOT_IS_OBJECT(conditions) || JB_ROOT_IS_SCALAR(conditions))
		invalid(cx, "conditions must be a JSON object",
				"Write e.g. {\"pipeline\": \"Vendite\", \"has_tag\": [\"B2B\"]}, or {} for none.");
	rule->where = compile_node(cx, &conditions->root, rule->event, 1, rule);
}

/* lead.date.reached: the target names a date or time column of nocrm.leads. */
static void
date_target(DefContext *cx, const char *target, Rule *rule)
{
	FieldCond	f;
	Oid			base;

	if (target == NULL || target[0] == '\0')
		invalid(cx, "event lead.date.reached needs a target: the date column",
				"E.g. target => 'next_action_at', with date_offset => '-3 days' for three days before it.");
	lead_column(cx, target, &f,
				"The target of lead.date.reached is a date, timestamp or timestamptz column.");
	base = getBaseType(f.typid);
	if (base != DATEOID && base != TIMESTAMPOID && base != TIMESTAMPTZOID)
		invalid(cx, psprintf("column %s is %s, not a date or time", target, format_type_be(f.typid)),
				"The target of lead.date.reached is a date, timestamp or timestamptz column.");
	rule->date_attnum = f.attnum;
	rule->date_typid = f.typid;
}

/*
 * Checks a definition and returns the compiled rule, in CurrentMemoryContext.
 * Any problem raises an error.  Must be called inside an SPI connection.
 */
Rule *
nocrm_compile_rule(int32 id, const char *name, const char *event,
				   const char *target, Jsonb *conditions, Jsonb *actions)
{
	Rule	   *rule = palloc0(sizeof(Rule));
	DefContext	cx = {name, "event"};
	int			nactions;

	rule->id = id;
	rule->name = pstrdup(name);
	rule->event = nocrm_event_from_name(event);
	if (rule->event == EV_COUNT)
		invalid(&cx, psprintf("unknown event %s", quote_literal_cstr(event)),
				NOCRM_EVENT_HINT);

	cx.where = "target";
	if (rule->event == EV_STATUS_CHANGED || rule->event == EV_STEP_CHANGED)
	{
		JsonbValue	tv;

		if (target == NULL || target[0] == '\0')
			invalid(&cx, psprintf("event %s needs a target", event),
					rule->event == EV_STATUS_CHANGED
					? "Give the status it changes to, e.g. target => 'won'."
					: "Give the step it changes to, e.g. target => 'Preventivo'.");
		tv.type = jbvString;
		tv.val.string.val = (char *) target;
		tv.val.string.len = strlen(target);
		if (rule->event == EV_STATUS_CHANGED)
			rule->target_status = status_value(&cx, &tv);
		else
		{
			/* A target of digits is a step id, anything else a step name. */
			if (strspn(target, "0123456789") == strlen(target) && strlen(target) <= 18)
			{
				tv.type = jbvNumeric;
				tv.val.numeric = DatumGetNumeric(DirectFunctionCall3(numeric_in,
																	 CStringGetDatum(target),
																	 ObjectIdGetDatum(InvalidOid),
																	 Int32GetDatum(-1)));
			}
			resolve_steps(&cx, &tv, &rule->target_steps, &rule->ntarget_steps);
		}
	}
	else if (rule->event == EV_DATE_REACHED)
		date_target(&cx, target, rule);
	else if (target != NULL)
		invalid(&cx, psprintf("event %s takes no target", event),
				"Only lead.status.changed.to, lead.step.changed.to and lead.date.reached have a target; filter with conditions instead.");

	compile_conditions(&cx, conditions, rule);

	cx.where = "actions";
	if (!JB_ROOT_IS_ARRAY(actions) || JB_ROOT_IS_SCALAR(actions))
		invalid(&cx, "actions must be a JSON array",
				"Write e.g. [{\"type\": \"add_tags\", \"tags\": [\"B2B\"]}].");
	nactions = JB_ROOT_COUNT(actions);
	if (nactions == 0)
		invalid(&cx, "an automation needs at least one action",
				"Write e.g. [{\"type\": \"add_tags\", \"tags\": [\"B2B\"]}].");
	rule->nactions = nactions;
	rule->actions = palloc0(sizeof(RuleAction) * nactions);
	for (int i = 0; i < nactions; i++)
		compile_action(&cx, rule->event, getIthJsonbValueFromContainer(&actions->root, i),
					   i, &rule->actions[i]);
	return rule;
}
