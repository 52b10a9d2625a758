/*
 * rules.c — the per-backend rule cache, its invalidation, the validation
 * trigger on nocrm.automations, and condition matching.
 *
 * Rules are compiled once per backend and kept by event, so a row whose
 * event no rule listens to costs one array lookup.  Any write to a table a
 * compiled rule depends on sends a relcache invalidation for
 * nocrm.automations: this backend drops its cache at the next command, every
 * other backend when the writer commits.
 */
#include "nocrm.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "access/htup_details.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/syscache.h"
#include "executor/tuptable.h"
#include "catalog/pg_class.h"

PG_FUNCTION_INFO_V1(nocrm_automation_validate_trigger);
PG_FUNCTION_INFO_V1(nocrm_rules_changed_trigger);
PG_FUNCTION_INFO_V1(nocrm_check_automation);

static MemoryContext rules_context = NULL;
static bool rules_valid = false;
static uint64 rules_generation = 0;
static Oid	automations_relid = InvalidOid;
static Oid	leads_relid = InvalidOid;

/*
 * A dispatch holds pointers into the current rule set while actions run,
 * and an action's nested change may reload the cache.  Rule sets replaced
 * while pinned are kept until the last pin goes.
 */
static int	pin_count = 0;
static List *retired_contexts = NIL;

typedef struct EventRules
{
	int			nrules;
	Rule	  **rules;
} EventRules;

static EventRules by_event[EV_COUNT];

/*
 * The *.changed.to rules by target, by position and id: a change to one status or
 * step meets only the rules that name it, however many name others.
 */
#define NSTATUS_BITS 5
static EventRules by_status[NSTATUS_BITS];	/* by status bit number */
static int64 *by_step_keys = NULL;	/* sorted target steps, a rule per entry */
static Rule **by_step_rules = NULL;
static int	nby_step = 0;
static bool on_creation[EV_COUNT];	/* an enabled rule of the event has on_creation */

/*
 * Rules with field conditions or groups, per event, for the gate: by guard
 * (fieldcmp.c's index), and those without one, judged one by one.
 */
typedef struct WhereRules
{
	int			nrules;
	FieldIndex *index;
	int			nunguarded;
	Rule	  **unguarded;
} WhereRules;
static WhereRules where_rules[EV_COUNT];
static void **where_probe;		/* room for every guarded rule's payloads */
static int	where_probe_size;

static void
rules_relcache_callback(Datum arg, Oid relid)
{
	/*
	 * Field conditions hold values typed by the columns of nocrm.leads:
	 * compile again after an ALTER TABLE of it (or anything that
	 * invalidates it, such as VACUUM's statistics: rare, and cheap).
	 */
	if (relid == InvalidOid || relid == automations_relid ||
		(OidIsValid(leads_relid) && relid == leads_relid))
	{
		rules_valid = false;
		rules_generation++;
		/* The extension may have been dropped and created again. */
		automations_relid = InvalidOid;
		leads_relid = InvalidOid;
	}
}

static void
free_retired(void)
{
	ListCell   *lc;

	foreach(lc, retired_contexts)
		MemoryContextDelete((MemoryContext) lfirst(lc));
	list_free(retired_contexts);
	retired_contexts = NIL;
}

void
nocrm_rules_pin(void)
{
	pin_count++;
}

void
nocrm_rules_unpin(void)
{
	Assert(pin_count > 0);
	if (--pin_count == 0 && retired_contexts != NIL)
		free_retired();
}

/* At transaction end no dispatch can be running. */
void
nocrm_rules_reset_pins(void)
{
	pin_count = 0;
	free_retired();
}

/* Bumped whenever users, pipelines, steps, templates or automations change. */
uint64
nocrm_rules_generation(void)
{
	return rules_generation;
}

void
nocrm_rules_init(void)
{
	CacheRegisterRelcacheCallback(rules_relcache_callback, (Datum) 0);
}

Oid
nocrm_automations_relid(void)
{
	if (!OidIsValid(automations_relid))
	{
		Oid			nsp = get_namespace_oid("nocrm", false);

		automations_relid = get_relname_relid("automations", nsp);
		leads_relid = get_relname_relid("leads", nsp);
		if (!OidIsValid(automations_relid))
			elog(ERROR, "table nocrm.automations is missing");
	}
	return automations_relid;
}

/* The extension's owner: the owner of nocrm.automations. */
Oid
nocrm_extension_owner(void)
{
	static Oid	owner_of = InvalidOid;
	static Oid	owner = InvalidOid;
	Oid			relid = nocrm_automations_relid();

	if (owner_of != relid)
	{
		HeapTuple	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));

		if (!HeapTupleIsValid(tup))
			elog(ERROR, "cache lookup failed for relation %u", relid);
		owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
		ReleaseSysCache(tup);
		owner_of = relid;
	}
	return owner;
}

/* Can rules be read without SPI? */
bool
nocrm_rules_loaded(void)
{
	return rules_valid;
}

/* A stored rule's columns, and the rule compiled from them. */
typedef struct StoredRule
{
	HeapTuple	tuple;
	TupleDesc	desc;
	int32		id;
	char	   *name;
	char	   *event;
	char	   *target;
	Jsonb	   *conditions;
	Jsonb	   *actions;
	Rule	   *rule;
} StoredRule;

static void
compile_stored(void *arg)
{
	StoredRule *c = arg;
	bool		isnull;

	c->rule = nocrm_compile_rule(c->id, c->name, c->event, c->target, c->conditions, c->actions);
	c->rule->actions_json = c->actions;
	c->rule->test_mode = DatumGetBool(SPI_getbinval(c->tuple, c->desc, 7, &isnull));
	c->rule->position = DatumGetInt32(SPI_getbinval(c->tuple, c->desc, 8, &isnull));
	c->rule->stop_processing = DatumGetBool(SPI_getbinval(c->tuple, c->desc, 9, &isnull));
	c->rule->once_per_lead = DatumGetBool(SPI_getbinval(c->tuple, c->desc, 10, &isnull));
	{
		Datum		every = SPI_getbinval(c->tuple, c->desc, 11, &isnull);

		c->rule->has_min_interval = !isnull;
		if (!isnull)
			c->rule->at_most_every = *DatumGetIntervalP(every);
	}
	c->rule->on_creation = DatumGetBool(SPI_getbinval(c->tuple, c->desc, 12, &isnull));
	c->rule->date_offset = *DatumGetIntervalP(SPI_getbinval(c->tuple, c->desc, 13, &isnull));
}

/*
 * Compiles one stored rule (columns of nocrm_rule_columns()).  A rule that no longer resolves gives NULL: with
 * *error set when error is given, else after a warning.
 */
Rule *
nocrm_compile_stored(HeapTuple tuple, TupleDesc desc, char **error)
{
	bool		isnull;
	StoredRule	c;
	ErrorData  *edata;

	c.tuple = tuple;
	c.desc = desc;
	c.id = DatumGetInt32(SPI_getbinval(tuple, desc, 1, &isnull));
	c.name = SPI_getvalue(tuple, desc, 2);
	c.event = SPI_getvalue(tuple, desc, 3);
	c.target = SPI_getvalue(tuple, desc, 4);
	c.conditions = DatumGetJsonbPCopy(SPI_getbinval(tuple, desc, 5, &isnull));
	c.actions = DatumGetJsonbPCopy(SPI_getbinval(tuple, desc, 6, &isnull));
	c.rule = NULL;

	/*
	 * What a rule names (a user, a step) can disappear after the rule was
	 * written.  That must not break every change to every lead, so the
	 * compile runs in a subtransaction and a failure only skips the rule.
	 */
	edata = nocrm_in_subtransaction(compile_stored, &c, NULL);
	if (edata == NULL)
		return c.rule;
	if (edata->sqlerrcode == ERRCODE_QUERY_CANCELED)
		ReThrowError(edata);	/* a cancel is not a broken rule */
	if (error)
		*error = pstrdup(edata->message);
	else
		ereport(WARNING,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("automation %d \"%s\" is skipped: %s", c.id, c.name, edata->message),
				 edata->detail ? errdetail("%s", edata->detail) : 0,
				 errhint("Fix it with nocrm.update_automation() or disable it.")));
	FreeErrorData(edata);
	return NULL;
}

/*
 * The select list nocrm_compile_stored reads.  Before ALTER EXTENSION
 * UPDATE to 1.3 the options columns do not exist yet: their defaults.
 */
const char *
nocrm_rule_columns(void)
{
	bool		has_options = get_attnum(nocrm_automations_relid(), "on_creation") != InvalidAttrNumber;

	return has_options
		? "id, name, event, target, conditions, actions, mode = 'test', position, stop_processing,"
		" once_per_lead, at_most_every, on_creation, date_offset"
		: "id, name, event, target, conditions, actions, mode = 'test', 0 AS position, false, false,"
		" NULL::interval, false, '0'::interval";
}

static Jsonb *
copy_jsonb(Jsonb *j)
{
	return j ? (Jsonb *) nocrm_copy_bytes(j, VARSIZE(j)) : NULL;
}

/* A compiled rule copied into the current context, without compile garbage. */
static Rule *
rule_copy(Rule *src)
{
	Rule	   *r = nocrm_copy_bytes(src, sizeof(Rule));

	r->name = nocrm_copy_string(src->name);
	r->target_steps = nocrm_copy_bytes(src->target_steps, sizeof(int64) * src->ntarget_steps);
	nocrm_copy_condition_keys(r, src);
	r->guard = r->where ? nocrm_where_guard(r->where) : NULL;
	r->where_reads_tags = r->where && nocrm_where_reads_tags(r->where);
	r->actions_json = copy_jsonb(src->actions_json);
	r->actions = nocrm_copy_bytes(src->actions, sizeof(RuleAction) * src->nactions);
	for (int i = 0; i < src->nactions; i++)
	{
		RuleAction *a = &r->actions[i];
		RuleAction *from = &src->actions[i];

		a->users = nocrm_copy_bytes(from->users, sizeof(int64) * from->nusers);
		if (from->tags != (Datum) 0)
			a->tags = PointerGetDatum(nocrm_copy_bytes(DatumGetPointer(from->tags),
												 VARSIZE(DatumGetPointer(from->tags))));
		a->status = nocrm_copy_string(from->status);
		a->step_name = nocrm_copy_string(from->step_name);
		a->text = nocrm_copy_string(from->text);
		a->template_name = nocrm_copy_string(from->template_name);
		a->to = nocrm_copy_string(from->to);
		a->reply_to = nocrm_copy_string(from->reply_to);
		a->url = nocrm_copy_string(from->url);
		a->field = nocrm_copy_string(from->field);
		a->sql = nocrm_copy_string(from->sql);
		a->task_notes = nocrm_copy_string(from->task_notes);
		a->due_field = nocrm_copy_string(from->due_field);
		a->definition = copy_jsonb(from->definition);
	}
	return r;
}

typedef struct StepEntry
{
	int64		step_id;
	int			order;			/* the rule's place in id order */
	Rule	   *rule;
} StepEntry;

static int
compare_step_entries(const void *a, const void *b)
{
	const StepEntry *x = a,
			   *y = b;

	if (x->step_id != y->step_id)
		return x->step_id < y->step_id ? -1 : 1;
	return x->order - y->order;
}

/* Builds by_status and by_step from by_event, in the current (cache) context. */
static void
index_targets(void)
{
	EventRules *status_rules = &by_event[EV_STATUS_CHANGED];
	EventRules *step_rules = &by_event[EV_STEP_CHANGED];
	StepEntry  *entries;
	int			n = 0;

	for (int b = 0; b < NSTATUS_BITS; b++)
	{
		by_status[b].rules = palloc(sizeof(Rule *) * (status_rules->nrules + 1));
		by_status[b].nrules = 0;
		for (int i = 0; i < status_rules->nrules; i++)
			if (status_rules->rules[i]->target_status & (1 << b))
				by_status[b].rules[by_status[b].nrules++] = status_rules->rules[i];
	}

	for (int i = 0; i < step_rules->nrules; i++)
		n += step_rules->rules[i]->ntarget_steps;
	entries = palloc(sizeof(StepEntry) * (n + 1));
	n = 0;
	for (int i = 0; i < step_rules->nrules; i++)
		for (int t = 0; t < step_rules->rules[i]->ntarget_steps; t++)
		{
			entries[n].step_id = step_rules->rules[i]->target_steps[t];
			entries[n].order = i;
			entries[n++].rule = step_rules->rules[i];
		}
	qsort(entries, n, sizeof(StepEntry), compare_step_entries);
	by_step_keys = palloc(sizeof(int64) * (n + 1));
	by_step_rules = palloc(sizeof(Rule *) * (n + 1));
	nby_step = 0;
	for (int i = 0; i < n; i++)
	{
		/* a rule naming one step twice appears once */
		if (i > 0 && entries[i].step_id == entries[i - 1].step_id &&
			entries[i].rule == entries[i - 1].rule)
			continue;
		by_step_keys[nby_step] = entries[i].step_id;
		by_step_rules[nby_step++] = entries[i].rule;
	}
	pfree(entries);
}

/* Builds where_rules from by_event, in the current (cache) context. */
static void
index_where(void)
{
	for (int e = 0; e < EV_COUNT; e++)
	{
		EventRules *er = &by_event[e];
		WhereRules *wr = &where_rules[e];
		const FieldCond **guards = palloc(sizeof(FieldCond *) * (er->nrules + 1));
		void	  **payloads = palloc(sizeof(void *) * (er->nrules + 1));
		int			nguards = 0;

		wr->unguarded = palloc(sizeof(Rule *) * (er->nrules + 1));
		for (int i = 0; i < er->nrules; i++)
		{
			Rule	   *rule = er->rules[i];

			if (rule->where == NULL)
				continue;
			wr->nrules++;
			if (rule->guard)
			{
				guards[nguards] = rule->guard;
				payloads[nguards++] = rule;
				where_probe_size += Max(rule->guard->nvalues, 1);
			}
			else
				wr->unguarded[wr->nunguarded++] = rule;
		}
		if (nguards > 0)
			wr->index = nocrm_field_index_build(nguards, guards, payloads);
	}
	where_probe = palloc(sizeof(void *) * (where_probe_size + 1));
}

static void
load_rules(void)
{
	int			ret;
	int			counts[EV_COUNT] = {0};
	Rule	  **all;
	uint64		n;

	if (rules_context != NULL)
	{
		if (pin_count > 0)
		{
			MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

			retired_contexts = lappend(retired_contexts, rules_context);
			MemoryContextSwitchTo(old);
		}
		else
			MemoryContextDelete(rules_context);
	}
	rules_context = AllocSetContextCreate(CacheMemoryContext,
										  "nocrm rule cache",
										  ALLOCSET_DEFAULT_SIZES);
	memset(by_event, 0, sizeof(by_event));
	memset(by_status, 0, sizeof(by_status));
	memset(on_creation, 0, sizeof(on_creation));
	memset(where_rules, 0, sizeof(where_rules));
	where_probe = NULL;
	where_probe_size = 0;
	by_step_keys = NULL;
	by_step_rules = NULL;
	nby_step = 0;

	/* Invalidations that arrive while we read must not be lost. */
	rules_valid = true;
	nocrm_automations_relid();

	ret = SPI_execute(psprintf("SELECT %s FROM nocrm.automations WHERE enabled ORDER BY %s",
							   nocrm_rule_columns(), NOCRM_RULE_ORDER),
					  true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading automations failed: %s", SPI_result_code_string(ret));

	{
		SPITupleTable *tuptable = SPI_tuptable;
		MemoryContext oldcontext;

		MemoryContext scratch = AllocSetContextCreate(CurrentMemoryContext,
													  "nocrm rule compile",
													  ALLOCSET_DEFAULT_SIZES);

		n = SPI_processed;
		oldcontext = MemoryContextSwitchTo(rules_context);
		all = palloc0(sizeof(Rule *) * (n + 1));
		for (uint64 i = 0; i < n; i++)
		{
			Rule	   *compiled;

			/* Compiling leaves garbage; only the compact copy is kept. */
			MemoryContextSwitchTo(scratch);
			compiled = nocrm_compile_stored(tuptable->vals[i], tuptable->tupdesc, NULL);
			MemoryContextSwitchTo(rules_context);
			all[i] = compiled ? rule_copy(compiled) : NULL;
			MemoryContextReset(scratch);
			if (all[i])
			{
				counts[all[i]->event]++;
				on_creation[all[i]->event] |= all[i]->on_creation;
			}
		}
		MemoryContextDelete(scratch);
		for (int e = 0; e < EV_COUNT; e++)
		{
			by_event[e].rules = palloc(sizeof(Rule *) * (counts[e] + 1));
			by_event[e].nrules = 0;
		}
		for (uint64 i = 0; i < n; i++)
			if (all[i])
			{
				EventRules *er = &by_event[all[i]->event];

				er->rules[er->nrules++] = all[i];
			}
		index_targets();
		index_where();
		MemoryContextSwitchTo(oldcontext);
		SPI_freetuptable(tuptable);
		elog(DEBUG1, "nocrm: loaded " UINT64_FORMAT " automations", n);
	}
}

/*
 * Does an enabled on_creation rule await this *.changed.to of a lead being
 * created?  Then the INSERT raises it.  Needs an SPI connection.
 */
bool
nocrm_rules_on_creation(RaisedEvent *ev)
{
	int			n;
	Rule	  **rules = nocrm_rules_for_change(ev, &n);

	if (!on_creation[ev->event])
		return false;
	for (int i = 0; i < n; i++)
		if (rules[i]->on_creation)
			return true;
	return false;
}

/* An enabled rule by id, or NULL.  Needs an SPI connection. */
Rule *
nocrm_rule_by_id(int32 id)
{
	for (int e = 0; e < EV_COUNT; e++)
	{
		int			n;
		Rule	  **rules = nocrm_rules_for_event((NocrmEvent) e, &n);

		for (int i = 0; i < n; i++)
			if (rules[i]->id == id)
				return rules[i];
	}
	return NULL;
}

/*
 * The enabled rules for an event, by position and id.  A reload connects to
 * SPI itself: an invalidation (a concurrent ANALYZE of nocrm.leads) can
 * arrive after the caller's own connection ended, and reading through a
 * connection the caller does not own (a PL/pgSQL function's, whose INSERT
 * is running this trigger) would free that statement's executor state.
 */
Rule	  **
nocrm_rules_for_event(NocrmEvent event, int *nrules)
{
	if (!rules_valid)
	{
		PG_TRY();
		{
			if (SPI_connect() != SPI_OK_CONNECT)
				elog(ERROR, "SPI_connect failed");
			load_rules();
			SPI_finish();
		}
		PG_CATCH();
		{
			rules_valid = false;
			PG_RE_THROW();
		}
		PG_END_TRY();
	}
	*nrules = by_event[event].nrules;
	return by_event[event].rules;
}

/*
 * The enabled rules that can match this raised event, by position and id: for
 * *.changed.to, only those whose target names the new status or step.
 * Needs an SPI connection.
 */
Rule	  **
nocrm_rules_for_change(RaisedEvent *ev, int *nrules)
{
	Rule	  **rules = nocrm_rules_for_event(ev->event, nrules);

	if (ev->event == EV_STATUS_CHANGED)
	{
		for (int b = 0; b < NSTATUS_BITS; b++)
			if (ev->to_status == (1 << b))
			{
				*nrules = by_status[b].nrules;
				return by_status[b].rules;
			}
		*nrules = 0;
	}
	else if (ev->event == EV_STEP_CHANGED)
	{
		int			lo = 0,
					hi = nby_step;

		/* the first entry for the step, then its run */
		while (lo < hi)
		{
			int			mid = lo + (hi - lo) / 2;

			if (by_step_keys[mid] < ev->to_step)
				lo = mid + 1;
			else
				hi = mid;
		}
		for (hi = lo; hi < nby_step && by_step_keys[hi] == ev->to_step; hi++)
			;
		*nrules = hi - lo;
		return by_step_rules + lo;
	}
	return rules;
}

static bool
int64_in(int64 value, const int64 *list, int n)
{
	for (int i = 0; i < n; i++)
		if (list[i] == value)
			return true;
	return false;
}

/* Tags of the lead among the given ones: how many it has. */
static int
count_tags(int64 lead_id, const char **tags, int ntags)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {INT8OID, TEXTARRAYOID};
	Datum		args[2];
	Datum	   *elems = palloc(sizeof(Datum) * ntags);
	bool		isnull;
	int			ret;

	nocrm_tagset_settle();
	for (int i = 0; i < ntags; i++)
		elems[i] = CStringGetTextDatum(tags[i]);
	args[0] = Int64GetDatum(lead_id);
	args[1] = PointerGetDatum(construct_array(elems, ntags, TEXTOID, -1, false, TYPALIGN_INT));
	nocrm_plan(&plan,
			   "SELECT count(*) FROM nocrm.tags WHERE lead_id = $1 AND name = ANY ($2)",
			   2, types);
	ret = SPI_execute_plan(plan, args, NULL, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading tags failed: %s", SPI_result_code_string(ret));
	return (int) DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
											 SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * Does the rule apply to this event on this lead?  Cheap checks first; tags
 * need a query, so they come last.
 */
static bool conditions_hold(Rule *rule, LeadState *lead, WhereInput *in);

bool
nocrm_rule_matches(Rule *rule, LeadState *lead, RaisedEvent *ev)
{
	WhereInput	in = {WHERE_EVENT, lead, ev};

	/* The target belongs to the event; the conditions to the lead as it is now. */
	return nocrm_rule_matches_target(rule, ev) && conditions_hold(rule, lead, &in);
}

/* Is the event's change the one the rule's *.changed.to target names? */
bool
nocrm_rule_matches_target(Rule *rule, RaisedEvent *ev)
{
	if (ev->at_creation && !rule->on_creation)
		return false;
	if (rule->event == EV_STATUS_CHANGED && !(ev->to_status & rule->target_status))
		return false;
	if (rule->event == EV_STEP_CHANGED &&
		!int64_in(ev->to_step, rule->target_steps, rule->ntarget_steps))
		return false;
	return true;
}

/* Condition keys, cheap checks first, tags (a query) last. */
typedef enum CondKey
{
	COND_STATUS,
	COND_OWNER,
	COND_PIPELINE,
	COND_STEP,
	COND_HAS_TAG,
	COND_LACKS_TAG,
	COND_COUNT
} CondKey;

static const char *const cond_names[COND_COUNT] = {
	"status", "owner", "pipeline", "step", "has_tag", "lacks_tag"
};

static bool
cond_applies(Rule *rule, CondKey key)
{
	switch (key)
	{
		case COND_STATUS:
			return rule->status_mask != 0;
		case COND_OWNER:
			return rule->unassigned_only || rule->nowners > 0;
		case COND_PIPELINE:
			return rule->npipelines > 0;
		case COND_STEP:
			return rule->nsteps > 0;
		case COND_HAS_TAG:
			return rule->nhas_tags > 0;
		case COND_LACKS_TAG:
			return rule->nlacks_tags > 0;
		case COND_COUNT:
			break;
	}
	return false;
}

static bool
cond_holds(Rule *rule, LeadState *lead, CondKey key)
{
	switch (key)
	{
		case COND_STATUS:
			return (lead->status & rule->status_mask) != 0;
		case COND_OWNER:
			if (rule->unassigned_only)
				return !lead->has_owner;
			return lead->has_owner && int64_in(lead->owner_id, rule->owners, rule->nowners);
		case COND_PIPELINE:
			return lead->has_pipeline &&
				int64_in(lead->pipeline_id, rule->pipelines, rule->npipelines);
		case COND_STEP:
			return lead->has_step && int64_in(lead->step_id, rule->steps, rule->nsteps);
		case COND_HAS_TAG:
			/* a deleted lead has no tags left */
			return !lead->deleted &&
				count_tags(lead->id, rule->has_tags, rule->nhas_tags) == rule->nhas_tags;
		case COND_LACKS_TAG:
			return lead->deleted ||
				count_tags(lead->id, rule->lacks_tags, rule->nlacks_tags) == 0;
		case COND_COUNT:
			break;
	}
	return false;
}

/*
 * Could the rule's conditions hold on this lead?  Judges the lead's own
 * columns only; tag conditions count as "maybe".  Needs no SPI.
 */
bool
nocrm_columns_may_match(Rule *rule, LeadState *lead)
{
	for (int k = COND_STATUS; k <= COND_STEP; k++)
		if (cond_applies(rule, (CondKey) k) && !cond_holds(rule, lead, (CondKey) k))
			return false;
	return true;
}

/* Nested condition keys, all of them (tags by query). */
static Truth
keys_hold(Rule *keys, WhereInput *in)
{
	for (int k = 0; k < COND_COUNT; k++)
		if (cond_applies(keys, (CondKey) k) && !cond_holds(keys, in->lead, (CondKey) k))
		{
			if (in->failed == NULL)
				in->failed = cond_names[k];
			return TRUTH_FALSE;
		}
	return TRUTH_TRUE;
}

static Truth keys_may_hold(Rule *keys, WhereInput *in);

static Datum
slot_field(void *slot, AttrNumber attnum, bool *isnull)
{
	return slot_getattr((TupleTableSlot *) slot, attnum, isnull);
}

static bool
where_may_match(Rule *rule, RaisedEvent *ev, WhereInput *in)
{
	return nocrm_rule_matches_target(rule, ev) && nocrm_columns_may_match(rule, in->lead) &&
		nocrm_where_eval(rule->where, in) != TRUTH_FALSE;
}

/*
 * For the gate: could a rule of the event with field conditions or groups
 * match this row (in its slots)?  Only the rules whose guard the row
 * passes, and those without a guard, are judged.  Needs the rules loaded.
 */
bool
nocrm_where_row_may_match(RaisedEvent *ev, LeadState *lead, TupleTableSlot *oldslot,
						  TupleTableSlot *newslot)
{
	WhereRules *wr = &where_rules[ev->event];
	WhereInput	in = {WHERE_GATE, lead, ev, newslot, oldslot, NULL, keys_may_hold};

	for (int i = 0; i < wr->nunguarded; i++)
		if (where_may_match(wr->unguarded[i], ev, &in))
			return true;
	if (wr->index)
	{
		int			n = nocrm_field_index_probe(wr->index, slot_field, newslot ? newslot : oldslot,
												where_probe, where_probe_size);

		for (int i = 0; i < n; i++)
			if (where_may_match((Rule *) where_probe[i], ev, &in))
				return true;
	}
	return false;
}

/* Nested condition keys in the gate: the lead's columns; tags are maybe. */
static Truth
keys_may_hold(Rule *keys, WhereInput *in)
{
	if (!nocrm_columns_may_match(keys, in->lead))
		return TRUTH_FALSE;
	return keys->nhas_tags > 0 || keys->nlacks_tags > 0 ? TRUTH_MAYBE : TRUTH_TRUE;
}

/*
 * Columns first, then the field conditions and groups, then tags (queries).
 * in->failed names the first that did not hold.
 */
static bool
conditions_hold(Rule *rule, LeadState *lead, WhereInput *in)
{
	in->keys = keys_hold;
	for (int k = COND_STATUS; k <= COND_STEP; k++)
		if (cond_applies(rule, (CondKey) k) && !cond_holds(rule, lead, (CondKey) k))
		{
			in->failed = cond_names[k];
			return false;
		}
	if (rule->where && nocrm_where_eval(rule->where, in) != TRUTH_TRUE)
	{
		in->failed = psprintf("where (%s)", in->failed ? in->failed : "?");
		return false;
	}
	for (int k = COND_HAS_TAG; k <= COND_LACKS_TAG; k++)
		if (cond_applies(rule, (CondKey) k) && !cond_holds(rule, lead, (CondKey) k))
		{
			in->failed = cond_names[k];
			return false;
		}
	return true;
}

/*
 * The rule's conditions on the lead, as it is now, when a delayed action is
 * due ("changed" conditions count as held: the change was the reason).
 */
bool
nocrm_conditions_hold(Rule *rule, LeadState *lead)
{
	WhereInput	in = {WHERE_RECHECK, lead};

	return conditions_hold(rule, lead, &in);
}

/*
 * Every condition of the rule with the lead's value and whether it held:
 * {"status": {"lead": "todo", "held": false}, ...}.  *failed names the first
 * that did not hold (the one the engine stops at), or NULL.
 */
Jsonb *
nocrm_conditions_report(Rule *rule, LeadState *lead, const char *changed_column,
						const char **failed)
{
	JsonbParseState *state = NULL;

	*failed = NULL;
	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	for (int k = 0; k < COND_COUNT; k++)
	{
		bool		held;
		JsonbValue	b;
		char	   *value = NULL;

		/* judged where the engine judges it: after the columns, before tags */
		if (k == COND_HAS_TAG && rule->where)
		{
			WhereInput	in = {WHERE_EXPLAIN, lead, NULL, NULL, NULL, changed_column, keys_hold};

			held = nocrm_where_eval(rule->where, &in) == TRUTH_TRUE;
			if (!held && *failed == NULL)
				*failed = psprintf("where (%s)", in.failed ? in.failed : "?");
			nocrm_jsonb_key(&state, "where");
			pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
			nocrm_jsonb_put_string(&state, "failed", held ? NULL : in.failed);
			nocrm_jsonb_key(&state, "held");
			b.type = jbvBool;
			b.val.boolean = held;
			pushJsonbValue(&state, WJB_VALUE, &b);
			pushJsonbValue(&state, WJB_END_OBJECT, NULL);
		}

		if (!cond_applies(rule, (CondKey) k))
			continue;
		held = cond_holds(rule, lead, (CondKey) k);
		if (!held && *failed == NULL)
			*failed = cond_names[k];
		switch ((CondKey) k)
		{
			case COND_STATUS:
				value = (char *) lead->status_text;
				break;
			case COND_OWNER:
				value = lead->has_owner ? psprintf("%lld", (long long) lead->owner_id) : NULL;
				break;
			case COND_PIPELINE:
				value = lead->has_pipeline ? psprintf("%lld", (long long) lead->pipeline_id) : NULL;
				break;
			case COND_STEP:
				value = lead->has_step ? psprintf("%lld", (long long) lead->step_id) : NULL;
				break;
			case COND_HAS_TAG:
			case COND_LACKS_TAG:
				value = psprintf("%d of %d named tags",
								 k == COND_HAS_TAG
								 ? (lead->deleted ? 0 : count_tags(lead->id, rule->has_tags, rule->nhas_tags))
								 : (lead->deleted ? 0 : count_tags(lead->id, rule->lacks_tags, rule->nlacks_tags)),
								 k == COND_HAS_TAG ? rule->nhas_tags : rule->nlacks_tags);
				break;
			case COND_COUNT:
				break;
		}
		nocrm_jsonb_key(&state, cond_names[k]);
		pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
		nocrm_jsonb_put_string(&state, "lead", value);
		nocrm_jsonb_key(&state, "held");
		b.type = jbvBool;
		b.val.boolean = held;
		pushJsonbValue(&state, WJB_VALUE, &b);
		pushJsonbValue(&state, WJB_END_OBJECT, NULL);
	}
	return JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_OBJECT, NULL));
}

static char *
trigger_text(HeapTuple tuple, TupleDesc desc, const char *col)
{
	return SPI_getvalue(tuple, desc, SPI_fnumber(desc, col));
}

static bool
columns_differ(HeapTuple a, HeapTuple b, TupleDesc desc, const char *col)
{
	return !nocrm_column_equal(a, b, desc, SPI_fnumber(desc, col));
}

/*
 * on_creation only on *.changed.to; once_per_lead and at_most_every: a
 * positive interval, not both.
 */
static void
check_options(HeapTuple tuple, TupleDesc desc, const char *name, const char *event)
{
	bool		isnull;
	bool		once,
				on_creation;
	Datum		every;
	Interval	zero = {0};

	if (SPI_fnumber(desc, "on_creation") <= 0)
		return;					/* a 1.2 table, before ALTER EXTENSION UPDATE */
	once = DatumGetBool(SPI_getbinval(tuple, desc, SPI_fnumber(desc, "once_per_lead"), &isnull));
	on_creation = DatumGetBool(SPI_getbinval(tuple, desc, SPI_fnumber(desc, "on_creation"), &isnull));
	every = SPI_getbinval(tuple, desc, SPI_fnumber(desc, "at_most_every"), &isnull);

	{
		bool		offset_null;
		Datum		offset = SPI_getbinval(tuple, desc, SPI_fnumber(desc, "date_offset"), &offset_null);

		if (!offset_null && event && strcmp(event, "lead.date.reached") != 0 &&
			!DatumGetBool(DirectFunctionCall2(interval_eq, offset, IntervalPGetDatum(&zero))))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("date_offset of automation \"%s\" needs the lead.date.reached event", name),
					 errdetail("Its event is %s.", event),
					 errhint("date_offset says when a date rule fires: e.g. '-3 days' before its date column.")));
		if (!offset_null)
		{
			Interval	limit = {0, 0, 100 * MONTHS_PER_YEAR};
			Interval   *neg = DatumGetIntervalP(DirectFunctionCall1(interval_um,
																	IntervalPGetDatum(&limit)));

			if (DatumGetBool(DirectFunctionCall2(interval_gt, offset, IntervalPGetDatum(&limit))) ||
				DatumGetBool(DirectFunctionCall2(interval_lt, offset, IntervalPGetDatum(neg))))
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("date_offset of automation \"%s\" must be within 100 years", name),
						 errdetail("It is %s.", DatumGetCString(DirectFunctionCall1(interval_out, offset)))));
		}
	}
	if (on_creation && event &&
		strcmp(event, "lead.status.changed.to") != 0 && strcmp(event, "lead.step.changed.to") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("on_creation of automation \"%s\" needs a lead.status.changed.to or lead.step.changed.to event", name),
				 errdetail("Its event is %s.", event),
				 errhint("For leads as they are created, use the lead.creation event.")));
	if (isnull)
		return;
	if (once)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("automation \"%s\" cannot be both once_per_lead and at_most_every", name),
				 errdetail("once_per_lead runs it once for a lead, ever; at_most_every %s runs it again after that long.",
						   DatumGetCString(DirectFunctionCall1(interval_out, every))),
				 errhint("Set one of them: clear at_most_every or set once_per_lead to false.")));
	if (DatumGetBool(DirectFunctionCall2(interval_le, every, IntervalPGetDatum(&zero))))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("at_most_every of automation \"%s\" must be a positive interval", name),
				 errdetail("It is %s.", DatumGetCString(DirectFunctionCall1(interval_out, every))),
				 errhint("E.g. '7 days'; NULL for no limit.")));
}

/*
 * BEFORE INSERT OR UPDATE ON nocrm.automations: refuse a bad definition with
 * a precise error, whatever way it is written (function or plain SQL).
 * Renaming or disabling does not re-check, so a rule broken by a later
 * change elsewhere can still be switched off.
 */
Datum
nocrm_automation_validate_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	HeapTuple	tuple;
	TupleDesc	desc;
	bool		conditions_null,
				actions_null,
				enabled_null;
	Datum		conditions,
				actions;
	char	   *name,
			   *event;
	bool		check = true;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_BEFORE(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(trigdata->tg_event))
		elog(ERROR, "nocrm_automation_validate_trigger: must be fired before, for each row");

	tuple = TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event)
		? trigdata->tg_newtuple : trigdata->tg_trigtuple;
	desc = trigdata->tg_relation->rd_att;

	/*
	 * A restore loads rules the source accepted, maybe before the pipelines,
	 * users and templates they name (restore.c).
	 */
	if (nocrm_restoring())
		return PointerGetDatum(tuple);

	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
	{
		HeapTuple	old = trigdata->tg_trigtuple;
		bool		enabling = columns_differ(old, tuple, desc, "enabled") &&
			DatumGetBool(SPI_getbinval(tuple, desc, SPI_fnumber(desc, "enabled"), &enabled_null));

		check = enabling ||
			columns_differ(old, tuple, desc, "event") ||
			columns_differ(old, tuple, desc, "target") ||
			columns_differ(old, tuple, desc, "conditions") ||
			columns_differ(old, tuple, desc, "actions");
	}

	conditions = SPI_getbinval(tuple, desc, SPI_fnumber(desc, "conditions"), &conditions_null);
	actions = SPI_getbinval(tuple, desc, SPI_fnumber(desc, "actions"), &actions_null);
	name = trigger_text(tuple, desc, "name");
	event = trigger_text(tuple, desc, "event");

	if (name)
		check_options(tuple, desc, name, event);

	/* NULLs are the NOT NULL constraints' to report, after this trigger. */
	if (check && !conditions_null && !actions_null && name && event)
	{
		Rule	   *rule;

		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		rule = nocrm_compile_rule(0, name, event, trigger_text(tuple, desc, "target"),
								  DatumGetJsonbP(conditions), DatumGetJsonbP(actions));
		/* said when the rule is written, not when it is checked again */
		nocrm_calendar_check_rule(rule->name, rule->actions, rule->nactions);
		SPI_finish();
	}

	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
	{
		int			attno = SPI_fnumber(desc, "updated_at");
		Datum		now = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
		bool		null = false;

		tuple = heap_modify_tuple_by_cols(tuple, desc, 1, &attno, &now, &null);
	}
	return PointerGetDatum(tuple);
}

/*
 * nocrm.check_automation(name, event, target, conditions, actions): the
 * validation of a definition, callable on its own (by apps before saving,
 * and by the reference checks that guard renames and deletes).
 */
Datum
nocrm_check_automation(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(4))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("name, event and actions of an automation must not be null")));
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	nocrm_compile_rule(0, text_to_cstring(PG_GETARG_TEXT_PP(0)),
					   text_to_cstring(PG_GETARG_TEXT_PP(1)),
					   PG_ARGISNULL(2) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(2)),
					   PG_ARGISNULL(3) ? DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum("{}")))
					   : PG_GETARG_JSONB_P(3),
					   PG_GETARG_JSONB_P(4));
	SPI_finish();
	PG_RETURN_VOID();
}

/*
 * AFTER ... FOR EACH STATEMENT on the tables rules depend on: invalidate
 * every backend's rule cache, transactionally.
 */
Datum
nocrm_rules_changed_trigger(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "nocrm_rules_changed_trigger: not called as a trigger");
	CacheInvalidateRelcacheByRelid(nocrm_automations_relid());
	return PointerGetDatum(NULL);
}

/*
 * The extension owner's rights with a pinned search_path, entered only
 * around the rare SPI work (a cache reload) of functions that run as the
 * caller on every row.  SECURITY DEFINER would pay for the switch on every
 * call.  Errors need no cleanup: (sub)transaction abort restores both.
 */
void
nocrm_owner_enter(OwnerContext *ctx)
{
	GetUserIdAndSecContext(&ctx->saved_userid, &ctx->saved_sec_context);
	SetUserIdAndSecContext(nocrm_extension_owner(),
						   ctx->saved_sec_context | SECURITY_LOCAL_USERID_CHANGE);
	ctx->guc_nest_level = NewGUCNestLevel();
	(void) set_config_option("search_path", "pg_catalog, pg_temp", PGC_USERSET,
							 PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
}

void
nocrm_owner_leave(OwnerContext *ctx)
{
	AtEOXact_GUC(true, ctx->guc_nest_level);
	SetUserIdAndSecContext(ctx->saved_userid, ctx->saved_sec_context);
}
