/*
 * preassign.c — a new lead's owner, decided before its row is written.
 *
 * An assignment made after the INSERT is a second UPDATE of the row just
 * written: its own foreign key checks, row version, WAL and trigger run.
 * When the first lead.creation rule that would assign a new lead can be
 * judged from the new row alone, the BEFORE ROW trigger picks the owner and
 * writes it into the row.  The choice waits here until the statement's
 * events run that rule, which then records the assignment and raises
 * lead.assigned and lead.any_update as the UPDATE would have, with the
 * Butler as actor (see dispatch.c).  Until then the lead is shown to the
 * rules as the unassigned lead it was.
 *
 * Only when nothing before that rule could tell the difference: every
 * earlier matching creation rule's actions leave the lead alone and do not
 * read its owner (nocrm_action_leaves_lead_alone), no condition needs a
 * query (a new lead has no tags yet), and the rule's assignment runs now.
 */
#include "nocrm.h"

#include "access/xact.h"
#include "commands/trigger.h"
#include "miscadmin.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

static HTAB *preassigned = NULL;

#define STATE_GONE	'x'			/* PreAssignment.state of a forgotten entry */

/*
 * What the choices of one rule in one statement and subtransaction share,
 * kept once: a bulk insert's million entries point to one of these.
 */
typedef struct Making
{
	int32		automation_id;
	int32		action_no;
	SubTransactionId subid;
	const void *statement;		/* the INSERT's active snapshot, to tell statements apart */
} Making;

static Making *makings = NULL;	/* in TopMemoryContext */
static uint32 nmakings = 0;
static uint32 makings_cap = 0;

/* The Making of a choice made now by rule's first action. */
static uint32
making_now(Rule *rule)
{
	Making		now;

	now.automation_id = rule->id;
	now.action_no = rule->actions[0].action_no;
	now.subid = GetCurrentSubTransactionId();
	now.statement = ActiveSnapshotSet() ? (const void *) GetActiveSnapshot() : NULL;
	for (uint32 i = nmakings; i-- > 0 && nmakings - i <= 4;)	/* the latest few */
		if (makings[i].automation_id == now.automation_id && makings[i].action_no == now.action_no &&
			makings[i].subid == now.subid && makings[i].statement == now.statement)
			return i;
	if (nmakings == makings_cap)
	{
		makings_cap = makings_cap ? makings_cap * 2 : 8;
		makings = makings ? repalloc(makings, sizeof(Making) * makings_cap)
			: MemoryContextAlloc(TopMemoryContext, sizeof(Making) * makings_cap);
	}
	makings[nmakings] = now;
	return nmakings++;
}

#define MADE(entry)	(&makings[(entry)->made])

/*
 * The entry found last, and the newest.  Each row looks its entry up several
 * times, and a statement's events reach its rows in the order they were
 * inserted: most lookups are the last entry or the one made after it.  The
 * order is a singly linked hint (a million-row insert keeps a million
 * entries): an entry forgotten stays readable, marked gone, in the table's
 * memory until it is destroyed, and a link to it is never taken.
 */
static PreAssignment *last_found = NULL;
static PreAssignment *newest = NULL;
static long npreassigned = 0;
static SubTransactionId max_subid = InvalidSubTransactionId;

static void
ensure_table(void)
{
	if (preassigned)
		return;
	preassigned = nocrm_blob_hash("nocrm pre-assigned leads", 1024, sizeof(int64),
								  sizeof(PreAssignment), TopMemoryContext);
}

/* Keeps a choice until the statement's events reach the row. */
static void
remember(int64 lead_id, Rule *rule, int64 user_id, bool fallback)
{
	PreAssignment *entry;
	bool		exists;

	ensure_table();
	if (npreassigned == 0)
		nmakings = 0;			/* no entry points to them any more */
	entry = hash_search(preassigned, &lead_id, HASH_ENTER, &exists);
	if (exists && entry->state == 'p')
		nocrm_assign_refund(MADE(entry)->automation_id, MADE(entry)->action_no, entry->user_id);
	if (!exists)
	{
		npreassigned++;
		entry->next = NULL;
		if (newest)
			newest->next = entry;
		newest = entry;
	}
	entry->made = making_now(rule);
	entry->user_id = user_id;
	entry->fallback = fallback;
	entry->state = 'p';
	max_subid = Max(max_subid, MADE(entry)->subid);
}

/* The rule's conditions on a lead that is being inserted, without a query. */
static bool
holds_on_new_row(Rule *rule, LeadState *lead)
{
	return rule->nhas_tags == 0 && nocrm_columns_may_match(rule, lead);
}

static bool
assigns_now(RuleAction *action)
{
	switch (action->kind)
	{
		case ACT_ASSIGN:
		case ACT_ASSIGN_ROUND_ROBIN:
		case ACT_ASSIGN_RANDOM:
		case ACT_ASSIGN_BALANCED:
			return !action->delayed && !action->respect_working_hours;
		default:
			return false;
	}
}

static bool
rule_leaves_lead_alone(Rule *rule)
{
	if (rule->test_mode)
		return false;			/* its description reads the lead as it is */
	if (rule->stop_processing)
		return false;			/* the assigning rule after it would not run */
	for (int i = 0; i < rule->nactions; i++)
		if (!nocrm_action_leaves_lead_alone(&rule->actions[i]))
			return false;
	return true;
}

/* The owner of an assign action, or false when it would skip. */
static bool
choose(Rule *rule, RuleAction *action, LeadState *lead, int64 *user_id, bool *fallback)
{
	bool		found;

	*fallback = false;
	if (action->kind == ACT_ASSIGN)
	{
		*user_id = action->user_id;
		return nocrm_user_is_active(action->user_id);
	}
	*user_id = nocrm_pick_assignee(rule, action, lead, &found, fallback);
	return found;
}

/* Does any creation rule assign with its first action?  Kept per rule set. */
static bool
some_rule_assigns(Rule **rules, int nrules)
{
	static uint64 generation = 0;
	static bool known = false;
	static bool assigns = false;

	if (!known || generation != nocrm_rules_generation())
	{
		assigns = false;
		for (int r = 0; r < nrules && !assigns; r++)
			assigns = rules[r]->nactions > 0 && !rules[r]->test_mode &&
				assigns_now(&rules[r]->actions[0]);
		generation = nocrm_rules_generation();
		known = true;
	}
	return assigns;
}

/* The rule that assigns the new lead now, if one may (no query needed). */
static Rule *
deciding_rule(Rule **rules, int nrules, LeadState *lead)
{
	for (int r = 0; r < nrules; r++)
	{
		Rule	   *rule = rules[r];

		if (!holds_on_new_row(rule, lead))
			continue;
		/* field conditions and groups are judged after the insert: maybe */
		if (rule->where)
		{
			if (!rule_leaves_lead_alone(rule))
				return NULL;
			continue;
		}
		if (rule->nactions > 0 && !rule->test_mode && assigns_now(&rule->actions[0]))
			return rule;
		if (!rule_leaves_lead_alone(rule))
			return NULL;
	}
	return NULL;
}

/*
 * Will the INSERT's event trigger run?  Not when disabled, nor under
 * session_replication_role = replica: then no rule runs, and none may have
 * chosen an owner.
 */
static bool
lead_events_trigger_enabled(Relation rel)
{
	TriggerDesc *td = rel->trigdesc;

	if (td == NULL)
		return false;
	for (int i = 0; i < td->numtriggers; i++)
	{
		Trigger    *t = &td->triggers[i];

		if (strcmp(t->tgname, "nocrm_lead_events_insert") != 0)
			continue;
		if (SessionReplicationRole == SESSION_REPLICATION_ROLE_REPLICA)
			return t->tgenabled == TRIGGER_FIRES_ON_REPLICA || t->tgenabled == TRIGGER_FIRES_ALWAYS;
		return t->tgenabled == TRIGGER_FIRES_ON_ORIGIN || t->tgenabled == TRIGGER_FIRES_ALWAYS;
	}
	return false;
}

/*
 * Called by the BEFORE ROW trigger of an INSERT on rel with the new row
 * (already placed in its pipeline): the owner to write into it, if a rule
 * decides it now.
 */
bool
nocrm_preassign_row(LeadState *lead, Relation rel, int64 *user_id)
{
	OwnerContext owner;
	Rule	  **rules;
	Rule	   *rule;
	bool		fallback = false;
	bool		found = false;
	int			nrules;

	if (!nocrm_automations_enabled || lead->has_owner || nocrm_chain_depth() > 0 ||
		nocrm_max_chain_depth < 1)
		return false;
	nocrm_gate_caches_ready(true);
	rules = nocrm_rules_for_event(EV_CREATION, &nrules);
	if (nrules == 0 || !some_rule_assigns(rules, nrules) ||
		(rule = deciding_rule(rules, nrules, lead)) == NULL ||
		!lead_events_trigger_enabled(rel))
		return false;

	if (nocrm_pick_assignee_held(rule, &rule->actions[0], user_id))
	{
		remember(lead->id, rule, *user_id, false);
		return true;
	}
	nocrm_owner_enter(&owner);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	nocrm_rules_pin();
	PG_TRY();
	{
		found = choose(rule, &rule->actions[0], lead, user_id, &fallback);
		if (found)
			remember(lead->id, rule, *user_id, fallback);
	}
	PG_FINALLY();
	{
		nocrm_rules_unpin();
	}
	PG_END_TRY();
	SPI_finish();
	nocrm_owner_leave(&owner);
	return found;
}

bool
nocrm_preassign_any(void)
{
	return npreassigned > 0;
}

PreAssignment *
nocrm_preassigned(int64 lead_id)
{
	if (npreassigned == 0)
		return NULL;
	if (last_found && last_found->lead_id == lead_id)
		return last_found;
	if (last_found && last_found->next && last_found->next->lead_id == lead_id &&
		last_found->next->state != STATE_GONE)
		return last_found = last_found->next;
	return last_found = hash_search(preassigned, &lead_id, HASH_FIND, NULL);
}

static void
forget(PreAssignment *entry)
{
	int64		lead_id = entry->lead_id;

	entry->state = STATE_GONE;	/* for links to it: the memory is reused later */
	if (newest == entry)
		newest = NULL;			/* the next choice starts a new chain */
	last_found = NULL;
	(void) hash_search(preassigned, &lead_id, HASH_REMOVE, NULL);
}

/*
 * The statement's events have reached the inserted row.  If the row does
 * not carry the chosen owner (a later BEFORE trigger set another), the rule
 * will not assign it: the turn is given back.
 */
void
nocrm_preassign_seen(LeadState *lead)
{
	PreAssignment *entry = nocrm_preassigned(lead->id);

	if (entry == NULL || entry->state != 'p')
		return;
	if (lead->has_owner && lead->owner_id == entry->user_id)
	{
		entry->state = 's';
		return;
	}
	nocrm_assign_refund(MADE(entry)->automation_id, MADE(entry)->action_no, entry->user_id);
	forget(entry);
	npreassigned--;
}

/* Shows a lead whose assigning rule has not run yet as it was inserted: unassigned. */
void
nocrm_preassign_hide_owner(LeadState *lead)
{
	PreAssignment *entry = nocrm_preassigned(lead->id);

	if (entry && entry->state != 't' && lead->has_owner && lead->owner_id == entry->user_id)
	{
		lead->has_owner = false;
		lead->owner_id = 0;
	}
}

/* The rule has come to its assign action: the owner it already has. */
bool
nocrm_preassign_take(int64 lead_id, int32 automation_id, int32 action_no,
					 int64 *user_id, bool *fallback)
{
	PreAssignment *entry = nocrm_preassigned(lead_id);

	if (entry == NULL || entry->state == 't' || MADE(entry)->automation_id != automation_id ||
		MADE(entry)->action_no != action_no)
		return false;
	entry->state = 't';
	*user_id = entry->user_id;
	*fallback = entry->fallback;
	return true;
}

/*
 * End of an INSERT statement's events.  A choice for a row its statement
 * never wrote (skipped by ON CONFLICT, or by another BEFORE trigger) gives
 * its round-robin turn back.  A statement is told by its active snapshot,
 * the same for its BEFORE ROW and AFTER STATEMENT triggers and alive until
 * both have run: a choice made under another one belongs to an outer INSERT
 * still running (a user's trigger inserting leads), and stays.
 */
void
nocrm_preassign_statement_end(void)
{
	HASH_SEQ_STATUS seq;
	PreAssignment *entry;
	const void *statement;

	if (npreassigned == 0)
		return;
	statement = ActiveSnapshotSet() ? (const void *) GetActiveSnapshot() : NULL;
	hash_seq_init(&seq, preassigned);
	while ((entry = hash_seq_search(&seq)) != NULL)
	{
		if (entry->state == 'p' && MADE(entry)->statement != statement)
			continue;
		if (entry->state == 'p')
			nocrm_assign_refund(MADE(entry)->automation_id, MADE(entry)->action_no, entry->user_id);
		else if (entry->state == 's')
			elog(DEBUG1, "nocrm: lead " INT64_FORMAT " kept the owner automation %d chose for it",
				 entry->lead_id, MADE(entry)->automation_id);
		forget(entry);
		npreassigned--;
	}
}

/*
 * Subtransaction ids grow with time, so an aborted subtransaction's choices
 * (its own and its children's) are those with an id at least its own.
 */
void
nocrm_preassign_subxact_abort(SubTransactionId subid)
{
	HASH_SEQ_STATUS seq;
	PreAssignment *entry;

	if (npreassigned == 0 || max_subid < subid)
		return;
	hash_seq_init(&seq, preassigned);
	while ((entry = hash_seq_search(&seq)) != NULL)
		if (MADE(entry)->subid >= subid)
		{
			forget(entry);
			npreassigned--;
		}
}

void
nocrm_preassign_xact_end(void)
{
	if (preassigned && npreassigned > 0)
	{
		hash_destroy(preassigned);
		preassigned = NULL;
		last_found = NULL;
		newest = NULL;
	}
	npreassigned = 0;
	nmakings = 0;
	max_subid = InvalidSubTransactionId;
}
