/*
 * gate.c — whether a row change can matter at all, decided before anything
 * is queued.
 *
 * The event triggers are created WHEN (nocrm.*_wanted(...)).  A change that
 * no history row, automation or stage trigger can care about never enters
 * the after-trigger queue: it costs one call of these functions, with no
 * SPI.  The answer is conservative: tag conditions, lead.content_has_changed
 * and lead.any_update count as "maybe", and the event trigger decides for
 * real.  Answers are memoized per lead shape (status, owner, pipeline, step
 * before and after), so a bulk statement scans the rules once.
 */
#include "nocrm.h"

#include "common/hashfn.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"

PG_FUNCTION_INFO_V1(nocrm_lead_insert_wanted);
PG_FUNCTION_INFO_V1(nocrm_lead_update_wanted);
PG_FUNCTION_INFO_V1(nocrm_lead_delete_wanted);
PG_FUNCTION_INFO_V1(nocrm_child_event_wanted);
PG_FUNCTION_INFO_V1(nocrm_gate_counters);

#define NO_VALUE		PG_INT64_MIN	/* a NULL column in a GateKey */
#define MEMO_SIZE		64

/* What the gate reads of one version of a lead (NO_VALUE for NULL). */
typedef struct LeadSide
{
	int64		status;			/* status bit, 0 for none */
	int64		owner;
	int64		pipeline;
	int64		step;
} LeadSide;

typedef struct GateKey
{
	int64		op;				/* 'I', 'U', 'D' */
	LeadSide	old;
	LeadSide	new;
} GateKey;

/*
 * Events whose rules with field conditions or groups might match, judged per
 * row (their fields are not in the key): bit e, or EV_COUNT + e for the
 * *.changed.to an INSERT raises for on_creation rules.
 */
typedef uint32 WhereEvents;

typedef struct MemoEntry
{
	bool		used;
	bool		wanted;
	WhereEvents where;
	GateKey		key;
} MemoEntry;

/* Per-backend decisions, for nocrm.gate_counters(). */
typedef enum GateKind
{
	GATE_LEAD_INSERT,
	GATE_LEAD_UPDATE,
	GATE_LEAD_DELETE,
	GATE_CHILD,
	GATE_COUNT
} GateKind;

static const char *const gate_names[GATE_COUNT] = {
	"lead insert", "lead update", "lead delete", "tag, comment or email"
};
static int64 passed[GATE_COUNT];
static int64 skipped[GATE_COUNT];

static bool
count(GateKind kind, bool wanted)
{
	if (wanted)
		passed[kind]++;
	else
		skipped[kind]++;
	return wanted;
}

static MemoEntry memo[MEMO_SIZE];
static bool row_rules_wanted = true;	/* see nocrm_gate_row_rules_wanted() */
static uint64 memo_generation = 0;
static bool memo_primed = false;

/*
 * Loads what the gate and the BEFORE trigger read (rules when asked, steps
 * and stage triggers) unless loaded: as the extension owner, since the
 * caller may be an agent who cannot read the rules.
 */
void
nocrm_gate_caches_ready(bool rules)
{
	bool		need_rules = rules && !nocrm_rules_loaded();
	OwnerContext owner;

	if (!need_rules && nocrm_places_loaded())
		return;
	nocrm_owner_enter(&owner);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (need_rules)
	{
		int			n;

		(void) nocrm_rules_for_event(EV_CREATION, &n);
	}
	(void) nocrm_stage_triggers_exist();
	SPI_finish();
	nocrm_owner_leave(&owner);
}

/* A bad nocrm.actor is an error whether or not anything listens. */
static void
check_actor(void)
{
	OwnerContext owner;

	if (nocrm_chain_depth() > 0 || nocrm_actor_known())
		return;
	nocrm_owner_enter(&owner);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	(void) nocrm_current_actor();
	SPI_finish();
	nocrm_owner_leave(&owner);
}

static int64
arg_int64(FunctionCallInfo fcinfo, int n)
{
	return PG_ARGISNULL(n) ? NO_VALUE : PG_GETARG_INT64(n);
}

static int64
arg_status(FunctionCallInfo fcinfo, int n)
{
	text	   *t;
	char		buf[16];
	int			len;

	if (PG_ARGISNULL(n))
		return 0;
	t = PG_GETARG_TEXT_PP(n);
	len = VARSIZE_ANY_EXHDR(t);
	if (len >= (int) sizeof(buf))
		return 0;
	memcpy(buf, VARDATA_ANY(t), len);
	buf[len] = '\0';
	return nocrm_status_bit(buf);
}

static void
lead_of(LeadState *lead, LeadSide *side)
{
	memset(lead, 0, sizeof(LeadState));
	lead->status = (int) side->status;
	lead->has_owner = side->owner != NO_VALUE;
	lead->owner_id = side->owner;
	lead->has_pipeline = side->pipeline != NO_VALUE;
	lead->pipeline_id = side->pipeline;
	lead->has_step = side->step != NO_VALUE;
	lead->step_id = side->step;
}

static bool
event_may_match(NocrmEvent event, bool at_creation, LeadState *lead, int to_status, int64 to_step,
				WhereEvents *where)
{
	RaisedEvent ev;
	Rule	  **rules;
	int			n;

	memset(&ev, 0, sizeof(ev));
	ev.event = event;
	ev.at_creation = at_creation;
	ev.to_status = to_status;
	ev.to_step = to_step;
	rules = nocrm_rules_for_change(&ev, &n);
	for (int i = 0; i < n; i++)
		if (nocrm_rule_matches_target(rules[i], &ev) && nocrm_columns_may_match(rules[i], lead))
		{
			if (rules[i]->where == NULL)
				return true;
			*where |= (WhereEvents) 1 << (event + (at_creation ? EV_COUNT : 0));
		}
	return false;
}

/* The rule and stage trigger scan behind a memo entry. */
static bool
lead_change_matters(GateKey *k, WhereEvents *where)
{
	LeadState	lead;

	if (k->op == 'D')
	{
		lead_of(&lead, &k->old);
		lead.deleted = true;
	}
	else
		lead_of(&lead, &k->new);

	if ((k->new.pipeline != NO_VALUE && nocrm_stage_triggers_in_pipeline(k->new.pipeline)) ||
		(k->old.pipeline != NO_VALUE && nocrm_stage_triggers_in_pipeline(k->old.pipeline)))
		return true;

	switch (k->op)
	{
		case 'I':
			return event_may_match(EV_CREATION, false, &lead, 0, 0, where) ||
				event_may_match(EV_STATUS_CHANGED, true, &lead, (int) k->new.status, 0, where) ||
				(k->new.step != NO_VALUE &&
				 event_may_match(EV_STEP_CHANGED, true, &lead, 0, k->new.step, where)) ||
				event_may_match(lead.has_owner ? EV_ASSIGNED : EV_UNASSIGNED, false, &lead, 0, 0, where);
		case 'D':
			return event_may_match(EV_DELETED, false, &lead, 0, 0, where);
		default:
			if (k->old.status != k->new.status &&
				event_may_match(EV_STATUS_CHANGED, false, &lead, (int) k->new.status, 0, where))
				return true;
			if (k->new.step != NO_VALUE && k->new.step != k->old.step &&
				event_may_match(EV_STEP_CHANGED, false, &lead, 0, k->new.step, where))
				return true;
			if (k->new.owner != NO_VALUE && k->new.owner != k->old.owner &&
				event_may_match(EV_ASSIGNED, false, &lead, 0, 0, where))
				return true;
			if (k->new.owner == NO_VALUE && k->old.owner != NO_VALUE &&
				event_may_match(EV_UNASSIGNED, false, &lead, 0, 0, where))
				return true;
			/* Which other columns changed is the trigger's business. */
			return event_may_match(EV_CONTENT_CHANGED, false, &lead, 0, 0, where) ||
				event_may_match(EV_ANY_UPDATE, false, &lead, 0, 0, where);
	}
}

/* Does anything listen before we even look at the rules? */
static bool
everything_matters(void)
{
	return nocrm_history_level == HISTORY_ALL;
}

/* The rules with field conditions the memo left open, on the row itself. */
static bool
where_row_matters(GateKey *k, WhereEvents where, TupleTableSlot *oldslot,
				  TupleTableSlot *newslot)
{
	LeadState	lead;

	lead_of(&lead, k->op == 'D' ? &k->old : &k->new);
	lead.deleted = k->op == 'D';
	for (int b = 0; b < 2 * EV_COUNT; b++)
	{
		RaisedEvent ev;

		if (!(where & ((WhereEvents) 1 << b)))
			continue;
		memset(&ev, 0, sizeof(ev));
		ev.event = (NocrmEvent) (b % EV_COUNT);
		ev.at_creation = b >= EV_COUNT;
		ev.to_status = (int) k->new.status;
		ev.to_step = k->new.step;
		if (nocrm_where_row_may_match(&ev, &lead, oldslot, newslot))
			return true;
	}
	return false;
}

static bool
lead_wanted(GateKey *k, TupleTableSlot *oldslot, TupleTableSlot *newslot, bool history_counts)
{
	MemoEntry  *entry;
	bool		wanted;
	WhereEvents where = 0;

	if (history_counts && everything_matters())
		return true;
	if (!nocrm_automations_enabled)
	{
		check_actor();
		return false;
	}
	nocrm_gate_caches_ready(true);
	if (!memo_primed || memo_generation != nocrm_rules_generation())
	{
		memset(memo, 0, sizeof(memo));
		memo_generation = nocrm_rules_generation();
		memo_primed = true;
	}
	entry = &memo[hash_bytes((const unsigned char *) k, sizeof(GateKey)) % MEMO_SIZE];
	if (entry->used && memcmp(&entry->key, k, sizeof(GateKey)) == 0)
	{
		wanted = entry->wanted;
		where = entry->where;
	}
	else
	{
		wanted = lead_change_matters(k, &where);
		entry->used = true;
		entry->key = *k;
		entry->wanted = wanted;
		entry->where = where;
	}
	if (!wanted && where != 0)
		wanted = (oldslot == NULL && newslot == NULL) ||	/* no row to judge: maybe */
			where_row_matters(k, where, oldslot, newslot);
	/* a date rule's column set or changed: the trigger schedules it */
	if (!wanted && k->op != 'D' && nocrm_date_rules_exist())
		wanted = (oldslot == NULL && newslot == NULL) || nocrm_dates_row_changed(oldslot, newslot);
	if (!wanted)
		check_actor();
	return wanted;
}

static const LeadSide no_lead = {0, NO_VALUE, NO_VALUE, NO_VALUE};

/* Read from the slot in place: most rows go no further than the gate. */
static void
side_from_slot(TupleTableSlot *slot, const LeadAttnums *cols, LeadSide *side)
{
	int			attnos[4] = {cols->status, cols->user_id, cols->pipeline_id, cols->step_id};
	int64	   *fields[4] = {&side->status, &side->owner, &side->pipeline, &side->step};

	for (int i = 0; i < 4; i++)
	{
		bool		isnull;
		Datum		d = slot_getattr(slot, attnos[i], &isnull);

		if (i == 0)
			*fields[i] = isnull ? 0 : nocrm_status_bit(TextDatumGetCString(d));
		else
			*fields[i] = isnull ? NO_VALUE : DatumGetInt64(d);
	}
}

/* The four values from arguments first, first + stride, first + 2 stride, ... */
static void
side_from_args(FunctionCallInfo fcinfo, int first, int stride, LeadSide *side)
{
	side->status = arg_status(fcinfo, first);
	side->owner = arg_int64(fcinfo, first + stride);
	side->pipeline = arg_int64(fcinfo, first + 2 * stride);
	side->step = arg_int64(fcinfo, first + 3 * stride);
}

static bool
gate(char op, const LeadSide *old, const LeadSide *new, TupleTableSlot *oldslot,
	 TupleTableSlot *newslot, bool history_counts)
{
	GateKey		k;
	bool		wanted;

	memset(&k, 0, sizeof(k));
	k.op = op;
	k.old = *old;
	k.new = *new;
	wanted = lead_wanted(&k, oldslot, newslot, history_counts);
	/* the counters count rows queued for events, which history alone does */
	if (history_counts)
		(void) count(op == 'I' ? GATE_LEAD_INSERT : op == 'U' ? GATE_LEAD_UPDATE : GATE_LEAD_DELETE,
					 wanted);
	return wanted;
}

/* The lead gate for one row of a statement (the statement trigger's loop). */
bool
nocrm_lead_row_wanted(char op, TupleTableSlot *oldslot, TupleTableSlot *newslot,
					  const LeadAttnums *cols)
{
	LeadSide	old = no_lead,
				new = no_lead;

	if (oldslot)
		side_from_slot(oldslot, cols, &old);
	if (newslot)
		side_from_slot(newslot, cols, &new);
	if (!gate(op, &old, &new, oldslot, newslot, true))
		return false;
	/* wanted for history alone: no rule needs to be judged for it */
	row_rules_wanted = !everything_matters() || gate(op, &old, &new, oldslot, newslot, false);
	return true;
}

/*
 * Does a rule or stage trigger care about the row the statement trigger is
 * dispatching?  False only for a row that nocrm.history = all alone wants.
 */
bool
nocrm_gate_row_rules_wanted(void)
{
	return row_rules_wanted;
}

/* The statement trigger is done with its row: events raised elsewhere are judged in full. */
void
nocrm_gate_row_done(void)
{
	row_rules_wanted = true;
}

/* nocrm.lead_insert_wanted(status, user_id, pipeline_id, step_id) */
Datum
nocrm_lead_insert_wanted(PG_FUNCTION_ARGS)
{
	LeadSide	new;

	side_from_args(fcinfo, 0, 1, &new);
	PG_RETURN_BOOL(gate('I', &no_lead, &new, NULL, NULL, true));
}

/* nocrm.lead_delete_wanted(status, user_id, pipeline_id, step_id) of the old row */
Datum
nocrm_lead_delete_wanted(PG_FUNCTION_ARGS)
{
	LeadSide	old;

	side_from_args(fcinfo, 0, 1, &old);
	PG_RETURN_BOOL(gate('D', &old, &no_lead, NULL, NULL, true));
}

/*
 * nocrm.lead_update_wanted(old_status, new_status, old_user_id, new_user_id,
 * old_pipeline_id, new_pipeline_id, old_step_id, new_step_id)
 */
Datum
nocrm_lead_update_wanted(PG_FUNCTION_ARGS)
{
	LeadSide	old,
				new;

	side_from_args(fcinfo, 0, 2, &old);
	side_from_args(fcinfo, 1, 2, &new);
	PG_RETURN_BOOL(gate('U', &old, &new, NULL, NULL, true));
}

/*
 * nocrm.child_event_wanted(event, author): for rows of tags, comments and
 * emails, whose lead is not at hand.  A comment by the Butler outside an
 * automation is wanted: the trigger refuses it.
 */
static bool
child_wanted(FunctionCallInfo fcinfo)
{
	NocrmEvent	event;

	/* A restored row queues nothing (restore.c). */
	if (nocrm_restoring())
		return false;
	if (!PG_ARGISNULL(1) && PG_GETARG_INT64(1) == BUTLER_ID && nocrm_chain_depth() == 0)
		return true;
	if (everything_matters())
		return true;
	if (!nocrm_automations_enabled)
	{
		check_actor();
		return false;
	}
	event = nocrm_event_from_name(text_to_cstring(PG_GETARG_TEXT_PP(0)));
	if (event == EV_COUNT)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown event \"%s\"", text_to_cstring(PG_GETARG_TEXT_PP(0))),
				 errhint("The events are listed in the reference, section Events.")));
	nocrm_gate_caches_ready(true);
	if (nocrm_event_listened(event))
		return true;
	check_actor();
	return false;
}

/*
 * Does anything record or listen to the event: full history, a rule on it,
 * or a stage trigger?  Needs the caches loaded.
 */
bool
nocrm_event_listened(NocrmEvent event)
{
	int			n;

	if (everything_matters())
		return true;
	(void) nocrm_rules_for_event(event, &n);
	return n > 0 || nocrm_stage_triggers_exist();
}

Datum
nocrm_child_event_wanted(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(count(GATE_CHILD, child_wanted(fcinfo)));
}

/*
 * nocrm.gate_counters(reset): this backend's gate decisions since it
 * started (or the last reset): rows passed to the event triggers, and rows
 * skipped because nothing could care.
 */
Datum
nocrm_gate_counters(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	bool		reset = !PG_ARGISNULL(0) && PG_GETARG_BOOL(0);

	InitMaterializedSRF(fcinfo, 0);
	for (int g = 0; g < GATE_COUNT; g++)
	{
		Datum		values[3];
		bool		nulls[3] = {false, false, false};

		values[0] = CStringGetTextDatum(gate_names[g]);
		values[1] = Int64GetDatum(passed[g]);
		values[2] = Int64GetDatum(skipped[g]);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	if (reset)
	{
		memset(passed, 0, sizeof(passed));
		memset(skipped, 0, sizeof(skipped));
	}
	return (Datum) 0;
}
