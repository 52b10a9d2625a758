/*
 * stages.c — Bitrix24-style stage triggers: a trigger on a step moves a lead
 * of that pipeline to the step when its condition happens.
 *
 * After the automations of an event have run, the enabled triggers of the
 * lead's pipeline that match the event are collected.  A move backward (to
 * a lower position) needs allow_backward; such skips are logged.  Of the
 * allowed moves the one to the furthest step wins, ties to the lowest
 * trigger id.  The move is an UPDATE by the Butler, so it raises
 * lead.step.changed.to and chains like any action; a trigger joins the
 * chain (as -id), so it never re-fires on its own move and counts toward
 * nocrm.max_chain_depth.
 */
#include "nocrm.h"

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

PG_FUNCTION_INFO_V1(nocrm_fire_trigger);

typedef enum StageKind
{
	SK_OWNER_CHANGED,
	SK_FIELD_CHANGED,
	SK_STATUS_CHANGED,
	SK_TAG_ADDED,
	SK_COMMENT_ADDED,
	SK_EMAIL_RECEIVED,
	SK_CUSTOM,
	SK_UNKNOWN
} StageKind;

static const char *const kind_names[] = {
	"owner_changed", "field_changed", "status_changed", "tag_added",
	"comment_added", "email_received", "custom"
};

typedef struct StageTrigger
{
	int32		id;
	int64		step_id;
	int64		pipeline_id;
	int			position;
	StageKind	kind;
	char	   *param;			/* field, status, tag or code; NULL = any */
	bool		allow_backward;
	char	   *name;
} StageTrigger;

typedef struct StepPlace
{
	int64		step_id;		/* first: the sort key */
	int64		pipeline_id;
	int			position;
} StepPlace;

/* A pipeline's first step: where a lead given only a pipeline starts. */
typedef struct PipelineStart
{
	int64		pipeline_id;	/* first: the sort key */
	int64		step_id;
} PipelineStart;

static MemoryContext stage_context = NULL;
static StageTrigger *triggers = NULL;
static int	ntriggers = 0;
static StepPlace *places = NULL;
static int	nplaces = 0;			/* sorted by step_id */
static PipelineStart *starts = NULL;
static int	nstarts = 0;			/* sorted by pipeline_id */
static uint64 loaded_generation = 0;
static bool loaded = false;

static SPIPlanPtr plan_move;

static StageKind
kind_from_name(const char *name)
{
	for (int i = 0; i < SK_UNKNOWN; i++)
		if (strcmp(kind_names[i], name) == 0)
			return (StageKind) i;
	return SK_UNKNOWN;
}

/* Runs one read-only query of the loader; its rows stay in SPI_tuptable. */
static uint64
load_query(const char *sql, const char *what)
{
	int			ret = SPI_execute(sql, true, 0);

	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading %s failed: %s", what, SPI_result_code_string(ret));
	return SPI_processed;
}

/* A column of a row of SPI_tuptable, known not null. */
static Datum
cell(uint64 row, int col)
{
	bool		isnull;

	return SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, col, &isnull);
}

/* Loads enabled triggers and step positions; steps and triggers are small. */
static void
load(void)
{
	MemoryContext old;

	if (stage_context == NULL)
		stage_context = AllocSetContextCreate(CacheMemoryContext, "nocrm stage triggers",
											  ALLOCSET_SMALL_SIZES);
	MemoryContextReset(stage_context);
	triggers = NULL;
	places = NULL;
	starts = NULL;
	ntriggers = nplaces = nstarts = 0;
	loaded = false;
	loaded_generation = nocrm_rules_generation();

	ntriggers = (int) load_query("SELECT t.id, t.step_id, s.pipeline_id, s.position, t.kind,"
								 "       coalesce(t.params ->> 'field', t.params ->> 'status',"
								 "                t.params ->> 'tag', t.params ->> 'code'),"
								 "       t.allow_backward, t.name"
								 "  FROM nocrm.stage_triggers t JOIN nocrm.steps s ON s.id = t.step_id"
								 " WHERE t.enabled ORDER BY t.id", "stage triggers");
	old = MemoryContextSwitchTo(stage_context);
	triggers = palloc0(sizeof(StageTrigger) * (ntriggers + 1));
	for (int i = 0; i < ntriggers; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;

		triggers[i].id = DatumGetInt32(cell(i, 1));
		triggers[i].step_id = DatumGetInt64(cell(i, 2));
		triggers[i].pipeline_id = DatumGetInt64(cell(i, 3));
		triggers[i].position = DatumGetInt32(cell(i, 4));
		triggers[i].kind = kind_from_name(SPI_getvalue(tup, desc, 5));
		triggers[i].param = SPI_getvalue(tup, desc, 6);
		triggers[i].allow_backward = DatumGetBool(cell(i, 7));
		triggers[i].name = SPI_getvalue(tup, desc, 8);
	}
	MemoryContextSwitchTo(old);

	nplaces = (int) load_query("SELECT id, position, pipeline_id FROM nocrm.steps ORDER BY id", "steps");
	old = MemoryContextSwitchTo(stage_context);
	places = palloc0(sizeof(StepPlace) * (nplaces + 1));
	for (int i = 0; i < nplaces; i++)
	{
		places[i].step_id = DatumGetInt64(cell(i, 1));
		places[i].position = DatumGetInt32(cell(i, 2));
		places[i].pipeline_id = DatumGetInt64(cell(i, 3));
	}
	MemoryContextSwitchTo(old);

	nstarts = (int) load_query("SELECT DISTINCT ON (pipeline_id) pipeline_id, id FROM nocrm.steps"
							   " ORDER BY pipeline_id, position, id", "first steps");
	old = MemoryContextSwitchTo(stage_context);
	starts = palloc0(sizeof(PipelineStart) * (nstarts + 1));
	for (int i = 0; i < nstarts; i++)
	{
		starts[i].pipeline_id = DatumGetInt64(cell(i, 1));
		starts[i].step_id = DatumGetInt64(cell(i, 2));
	}
	MemoryContextSwitchTo(old);
	loaded = true;
}

/*
 * Through a connection of its own: the generation can move after the
 * caller's connection ended (see nocrm_rules_for_event).
 */
static void
ensure_loaded(void)
{
	if (!loaded || loaded_generation != nocrm_rules_generation())
	{
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		load();
		SPI_finish();
	}
}

/* Can steps and triggers be read without SPI? */
bool
nocrm_places_loaded(void)
{
	return loaded && loaded_generation == nocrm_rules_generation();
}

/* bsearch on arrays of structs whose first field is their int64 sort key */
static int
compare_leading_int64(const void *key, const void *element)
{
	int64		a = *(const int64 *) key;
	int64		b = *(const int64 *) element;

	return a < b ? -1 : a > b ? 1 : 0;
}

static StepPlace *
place_of(int64 step_id)
{
	ensure_loaded();
	return bsearch(&step_id, places, nplaces, sizeof(StepPlace), compare_leading_int64);
}

/* The pipeline of a step; false for an unknown step. */
bool
nocrm_step_pipeline(int64 step_id, int64 *pipeline_id)
{
	StepPlace  *p = place_of(step_id);

	if (p)
		*pipeline_id = p->pipeline_id;
	return p != NULL;
}

/* The first step (lowest position) of a pipeline; false if it has none. */
bool
nocrm_first_step(int64 pipeline_id, int64 *step_id)
{
	PipelineStart *start;

	ensure_loaded();
	start = bsearch(&pipeline_id, starts, nstarts, sizeof(PipelineStart), compare_leading_int64);
	if (start)
		*step_id = start->step_id;
	return start != NULL;
}

/* Does any enabled stage trigger sit on a step of this pipeline? */
bool
nocrm_stage_triggers_in_pipeline(int64 pipeline_id)
{
	ensure_loaded();
	for (int i = 0; i < ntriggers; i++)
		if (triggers[i].pipeline_id == pipeline_id)
			return true;
	return false;
}

/* Are there any enabled stage triggers at all? */
bool
nocrm_stage_triggers_exist(void)
{
	ensure_loaded();
	return ntriggers > 0;
}

static int
position_of(int64 step_id)
{
	StepPlace  *p = place_of(step_id);

	return p ? p->position : -1;
}

static bool
json_has_key(Jsonb *obj, const char *key)
{
	return obj != NULL && JB_ROOT_IS_OBJECT(obj) &&
		getKeyJsonValueFromContainer(&obj->root, key, strlen(key), NULL) != NULL;
}

static bool
json_string_is(Jsonb *obj, const char *key, const char *value)
{
	JsonbValue *v;

	if (obj == NULL || !JB_ROOT_IS_OBJECT(obj))
		return false;
	v = getKeyJsonValueFromContainer(&obj->root, key, strlen(key), NULL);
	return v && v->type == jbvString && v->val.string.len == strlen(value) &&
		strncmp(v->val.string.val, value, v->val.string.len) == 0;
}

/* Did a lead column other than its place in the pipeline change? */
static bool
field_changed(RaisedEvent *ev, const char *field)
{
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;

	if (ev->new_value == NULL || !JB_ROOT_IS_OBJECT(ev->new_value))
		return false;
	if (field)
		return json_has_key(ev->new_value, field);
	it = JsonbIteratorInit(&ev->new_value->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
		if (tok == WJB_KEY &&
			!(v.val.string.len == 7 && strncmp(v.val.string.val, "step_id", 7) == 0) &&
			!(v.val.string.len == 11 && strncmp(v.val.string.val, "pipeline_id", 11) == 0))
			return true;
	return false;
}

static bool
trigger_matches(StageTrigger *t, RaisedEvent *ev, const char *custom_code)
{
	if (custom_code)
		return t->kind == SK_CUSTOM && strcmp(t->param, custom_code) == 0;
	switch (t->kind)
	{
		case SK_OWNER_CHANGED:
			/* a change of owner, not the owner a lead is created with */
			return (ev->event == EV_ASSIGNED || ev->event == EV_UNASSIGNED) &&
				ev->old_value != NULL;
		case SK_FIELD_CHANGED:
			return ev->event == EV_ANY_UPDATE && ev->detail == NULL &&
				field_changed(ev, t->param);
		case SK_STATUS_CHANGED:
			return ev->event == EV_STATUS_CHANGED &&
				(t->param == NULL || nocrm_status_bit(t->param) == ev->to_status);
		case SK_TAG_ADDED:
			return ev->event == EV_ANY_UPDATE && ev->detail != NULL &&
				strcmp(ev->detail, "tag added") == 0 &&
				(t->param == NULL || json_string_is(ev->new_value, "tag", t->param));
		case SK_COMMENT_ADDED:
			return ev->event == EV_COMMENTED;
		case SK_EMAIL_RECEIVED:
			return ev->event == EV_EMAIL_RECEIVED;
		case SK_CUSTOM:
		case SK_UNKNOWN:
			return false;
	}
	return false;
}

static void
log_trigger(int64 lead_id, const char *event, int32 trigger_id, Jsonb *old_value,
			Jsonb *new_value, const char *detail)
{
	if (nocrm_history_level != HISTORY_NONE)
		nocrm_history(lead_id, event, -trigger_id, old_value, new_value, detail);
}

static const char *
run_event(RaisedEvent *ev, const char *custom_code)
{
	return custom_code ? psprintf("custom:%s", custom_code) : nocrm_event_names[ev->event];
}

/* What to do about one matching trigger, decided before anything is written. */
typedef struct Decision
{
	int32		id;
	const char *name;
	int64		step_id;
	int			position;
	const char *skip;			/* why not, or NULL */
} Decision;

/*
 * The decisions for every matching trigger of the lead's pipeline, and the
 * winner (index, or -1).  Writes nothing.
 */
static Decision *
decide(LeadState *lead, RaisedEvent *ev, const char *custom_code, int *ndecisions, int *winner)
{
	Decision   *decisions;
	int			n = 0;
	int			current;

	*winner = -1;
	*ndecisions = 0;
	if (lead->deleted || !lead->has_pipeline || !lead->has_step)
		return NULL;
	ensure_loaded();
	if (ntriggers == 0)
		return NULL;

	/* Copy what matters first: writing history may reload the cache. */
	current = position_of(lead->step_id);
	decisions = palloc(sizeof(Decision) * ntriggers);
	for (int i = 0; i < ntriggers; i++)
	{
		StageTrigger *t = &triggers[i];
		Decision   *d;

		if (t->pipeline_id != lead->pipeline_id || t->step_id == lead->step_id ||
			!trigger_matches(t, ev, custom_code))
			continue;
		d = &decisions[n++];
		d->id = t->id;
		d->name = t->name ? pstrdup(t->name) : NULL;
		d->step_id = t->step_id;
		d->position = t->position;
		d->skip = NULL;
		if (t->position < current && !t->allow_backward)
			d->skip = "the step is behind the lead's and allow_backward is off";
		else if (nocrm_chain_contains(-t->id))
			d->skip = "it already moved the lead in this chain";
		else if (nocrm_chain_depth() >= nocrm_max_chain_depth)
			d->skip = psprintf("chain depth limit %d reached (nocrm.max_chain_depth)",
							   nocrm_max_chain_depth);
		else if (*winner < 0 || d->position > decisions[*winner].position)
			*winner = n - 1;
	}
	*ndecisions = n;
	return decisions;
}

/* For explain(): each matching trigger, whether it would move the lead, why not. */
StageVerdict *
nocrm_stage_verdicts(LeadState *lead, RaisedEvent *ev, int *n)
{
	int			winner;
	Decision   *decisions = decide(lead, ev, NULL, n, &winner);
	StageVerdict *out = palloc0(sizeof(StageVerdict) * (*n + 1));

	for (int i = 0; i < *n; i++)
	{
		out[i].id = decisions[i].id;
		out[i].name = decisions[i].name;
		out[i].step_id = decisions[i].step_id;
		out[i].would_move = i == winner;
		out[i].reason = decisions[i].skip ? decisions[i].skip
			: i == winner ? NULL
			: psprintf("trigger %d moves the lead further", decisions[winner].id);
	}
	return out;
}

/*
 * Runs the stage triggers of the lead's pipeline for an event (or, with
 * custom_code, for nocrm.fire_trigger).  Returns whether the lead moved.
 */
bool
nocrm_stage_triggers(LeadState *lead, RaisedEvent *ev, const char *custom_code)
{
	int			n;
	int			winner;
	Decision   *decisions = decide(lead, ev, custom_code, &n, &winner);
	bool		moved = false;

	for (int i = 0; i < n; i++)
		if (decisions[i].skip)
		{
			log_trigger(lead->id, "trigger.skipped", decisions[i].id,
						nocrm_jsonb_int_pair("step_id", lead->step_id, false),
						nocrm_jsonb_int_pair("step_id", decisions[i].step_id, false),
						decisions[i].skip);
			nocrm_runlog_record(-decisions[i].id, lead, ev, run_event(ev, custom_code),
								"skipped", NULL, 0, decisions[i].skip);
		}

	if (winner >= 0)
	{
		Decision   *d = &decisions[winner];
		Oid			types[2] = {INT8OID, INT8OID};
		Datum		args[2] = {Int64GetDatum(lead->id), Int64GetDatum(d->step_id)};
		int			ret;

		nocrm_tagset_settle();
		nocrm_plan(&plan_move, "UPDATE nocrm.leads SET step_id = $2 WHERE id = $1", 2, types);
		nocrm_chain_enter(-d->id);
		PG_TRY();
		{
			/* Logged inside the chain: the Butler moves the lead. */
			log_trigger(lead->id, "trigger.fired", d->id,
						nocrm_jsonb_int_pair("step_id", lead->step_id, false),
						nocrm_jsonb_int_pair("step_id", d->step_id, false),
						custom_code ? psprintf("custom code %s", custom_code)
						: psprintf("on %s", nocrm_event_names[ev->event]));
			ret = SPI_execute_plan(plan_move, args, NULL, false, 0);
			if (ret != SPI_OK_UPDATE)
				elog(ERROR, "moving the lead failed: %s", SPI_result_code_string(ret));
		}
		PG_FINALLY();
		{
			nocrm_chain_pop();
		}
		PG_END_TRY();
		moved = true;
		nocrm_runlog_record(-d->id, lead, ev, run_event(ev, custom_code), "fired",
							psprintf("[{\"no\": 1, \"type\": \"move\", \"result\": {\"step_id\": %lld},"
									 " \"before\": {\"step_id\": %lld}}]",
									 (long long) d->step_id, (long long) lead->step_id),
							1, NULL);
	}
	return moved;
}

/* nocrm.fire_trigger(lead_id, code): an outside system reports a condition. */
Datum
nocrm_fire_trigger(PG_FUNCTION_ARGS)
{
	int64		lead_id;
	char	   *code;
	LeadState	lead;
	bool		moved = false;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("lead_id and code must not be null")));
	lead_id = PG_GETARG_INT64(0);
	code = text_to_cstring(PG_GETARG_TEXT_PP(1));

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (!nocrm_lead_fetch(lead_id, &lead))
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("lead %lld does not exist", (long long) lead_id)));
	if (nocrm_history_level == HISTORY_ALL)
		nocrm_history(lead_id, "custom_trigger", 0, NULL, nocrm_jsonb_pair("code", code), NULL);
	if (nocrm_automations_enabled)
		moved = nocrm_stage_triggers(&lead, NULL, code);
	nocrm_flush_writes();
	SPI_finish();
	PG_RETURN_BOOL(moved);
}
