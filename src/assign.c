/*
 * assign.c — choosing the assignee of group assignment (round robin and
 * balanced are picked in group_pick.c, random here), and keeping the
 * group counters.
 *
 * Increments are kept in memory and written once per member, just before
 * the transaction commits: a bulk INSERT does not rewrite the same counter
 * row per lead.  A commit never waits for another's counter row: when
 * that row is locked (its holder is committing too), the increment goes to
 * nocrm.assignment_increments instead, folded into the row by the next
 * commit that gets it, or by the drain.  Picks add the pending increments
 * and the unfolded ones to what the counter row says.
 */
#include "nocrm.h"
#include "groups.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

PG_FUNCTION_INFO_V1(nocrm_flush_assignments_trigger);

/* One not yet written increment of a counter row, by subtransaction. */
typedef struct PendingIncrement
{
	int32		automation_id;
	int32		action_no;
	int64		user_id;
	SubTransactionId subid;
	int64		delta;
} PendingIncrement;

static PendingIncrement *pending = NULL;
static int	npending = 0;
static int	maxpending = 0;

static SPIPlanPtr plan_random;

/* The pending increments of this group as a bigint[] indexed by position. */
static Datum
pending_by_position(Rule *rule, RuleAction *action)
{
	Datum	   *elems = palloc0(sizeof(Datum) * action->nusers);

	for (int i = 0; i < npending; i++)
	{
		PendingIncrement *p = &pending[i];

		if (p->automation_id != rule->id || p->action_no != action->action_no)
			continue;
		for (int pos = 0; pos < action->nusers; pos++)
			if (action->users[pos] == p->user_id)
				elems[pos] = Int64GetDatum(DatumGetInt64(elems[pos]) + p->delta);
	}
	return PointerGetDatum(construct_array(elems, action->nusers, INT8OID,
										   sizeof(int64), FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}

static bool
pick(SPIPlanPtr *slot, const char *sql, Rule *rule, RuleAction *action, bool anyone,
	 int64 *user_id)
{
	Oid			types[5] = {INT4OID, INT4OID, INT8ARRAYOID, BOOLOID, BOOLOID};
	Datum		args[5] = {Int32GetDatum(rule->id), Int32GetDatum(action->action_no),
		pending_by_position(rule, action), BoolGetDatum(anyone),
	BoolGetDatum(action->only_working_hours)};

	nocrm_plan(slot, sql, 5, types);
	return nocrm_plan_int64(*slot, args, NULL, user_id);
}

/* Records an increment, merged with an earlier one of the same subtransaction. */
static void
bump(int32 automation_id, int32 action_no, int64 user_id, int64 delta)
{
	SubTransactionId subid = GetCurrentSubTransactionId();

	for (int i = 0; i < npending; i++)
	{
		PendingIncrement *p = &pending[i];

		if (p->automation_id == automation_id && p->action_no == action_no &&
			p->user_id == user_id && p->subid == subid)
		{
			p->delta += delta;
			return;
		}
	}
	if (npending == maxpending)
	{
		maxpending = Max(16, maxpending * 2);
		pending = pending
			? repalloc(pending, sizeof(PendingIncrement) * maxpending)
			: MemoryContextAlloc(TopMemoryContext, sizeof(PendingIncrement) * maxpending);
	}
	pending[npending].automation_id = automation_id;
	pending[npending].action_no = action_no;
	pending[npending].user_id = user_id;
	pending[npending].subid = subid;
	pending[npending].delta = delta;
	npending++;
}

/*
 * Takes back an increment: a lead whose owner was picked before its row was
 * written, but whose row never was (INSERT ... ON CONFLICT DO NOTHING, a
 * later BEFORE trigger that skipped it).
 */
void
nocrm_assign_refund(int32 automation_id, int32 action_no, int64 user_id)
{
	bump(automation_id, action_no, user_id, -1);
}

static int
increment_order(const void *a, const void *b)
{
	const PendingIncrement *x = a,
			   *y = b;

	if (x->automation_id != y->automation_id)
		return x->automation_id < y->automation_id ? -1 : 1;
	if (x->action_no != y->action_no)
		return x->action_no < y->action_no ? -1 : 1;
	if (x->user_id != y->user_id)
		return x->user_id < y->user_id ? -1 : 1;
	return 0;
}

/* One member's key, $1 automation, $2 action, $3 user */
#define MEMBER_KEY(t) \
	t ".automation_id = $1 AND " t ".action_no = $2 AND " t ".user_id = $3"

/*
 * Adds $4 to a member's count if no one holds the counter row: it is
 * locked and gets the increment plus the increments folded from
 * nocrm.assignment_increments (those committed so far: a later one stays
 * for the next fold).  Updates nothing if someone holds it, or if the
 * member is gone (removed from the group meanwhile): ADD_TO_INCREMENTS
 * then records the increment, or nothing.  (Two statements, so that the
 * usual commit starts no INSERT, nor its table's statement trigger.)
 * Under READ COMMITTED the UPDATE finds the row's latest version, the one
 * locked.
 */
#define ADD_TO_COUNTER \
	"WITH mine AS (SELECT FROM nocrm.assignment_counters c WHERE " MEMBER_KEY("c") \
	"               FOR NO KEY UPDATE SKIP LOCKED)," \
	"     folded AS (DELETE FROM nocrm.assignment_increments i" \
	"                 WHERE " MEMBER_KEY("i") " AND EXISTS (SELECT FROM mine)" \
	"                RETURNING i.delta)" \
	" UPDATE nocrm.assignment_counters c" \
	"    SET assigned = c.assigned + $4 + coalesce((SELECT sum(delta) FROM folded), 0)::bigint" \
	"  WHERE " MEMBER_KEY("c") " AND EXISTS (SELECT FROM mine)"

/*
 * The increment recorded to be folded later: when the counter row is held,
 * and always under REPEATABLE READ or SERIALIZABLE, where a counter row
 * updated since the snapshot cannot be locked without a serialization
 * failure.
 */
#define ADD_TO_INCREMENTS \
	"INSERT INTO nocrm.assignment_increments (automation_id, action_no, user_id, delta)" \
	" SELECT $1, $2, $3, $4" \
	"  WHERE EXISTS (SELECT FROM nocrm.assignment_counters c WHERE " MEMBER_KEY("c") ")"

/* Before 1.3's schema: the counter row, waiting for its holder. */
#define ADD_TO_COUNTER_WAITING \
	"UPDATE nocrm.assignment_counters c SET assigned = c.assigned + $4 WHERE " MEMBER_KEY("c")

/*
 * Writes the pending increments, one statement per member, in key order:
 * on an older schema, whose UPDATEs wait, two committers then queue up
 * instead of deadlocking.  (A statement of its own per member is cheaper
 * than one set-based statement: there are a few members, and that plan's
 * start-up cost is paid by every transaction.)
 */
static void
flush_pending(void)
{
	static SPIPlanPtr plan_counter = NULL,
				plan_increments = NULL,
				plan_waiting = NULL;
	Oid			types[4] = {INT4OID, INT4OID, INT8OID, INT8OID};
	PendingIncrement *todo = palloc(sizeof(PendingIncrement) * Max(npending, 1));
	int			n = npending;
	SPIPlanPtr	plan;

	memcpy(todo, pending, sizeof(PendingIncrement) * n);
	npending = 0;
	if (n == 0)
		return;
	qsort(todo, n, sizeof(PendingIncrement), increment_order);
	if (!nocrm_table_exists("assignment_increments"))
		plan = nocrm_plan(&plan_waiting, ADD_TO_COUNTER_WAITING, 4, types);
	else
	{
		(void) nocrm_plan(&plan_increments, ADD_TO_INCREMENTS, 4, types);
		plan = IsolationUsesXactSnapshot() ? plan_increments
			: nocrm_plan(&plan_counter, ADD_TO_COUNTER, 4, types);
	}
	for (int i = 0; i < n;)
	{
		Datum		args[4] = {Int32GetDatum(todo[i].automation_id), Int32GetDatum(todo[i].action_no),
		Int64GetDatum(todo[i].user_id), 0};
		int64		delta = 0;
		int			first = i;

		/* one member's increments of several subtransactions, merged */
		for (; i < n && increment_order(&todo[first], &todo[i]) == 0; i++)
			delta += todo[i].delta;
		if (delta == 0)
			continue;
		args[3] = Int64GetDatum(delta);
		nocrm_exec_plan(plan, args, NULL, plan == plan_increments ? SPI_OK_INSERT : SPI_OK_UPDATE,
						"updating assignment counters failed");
		if (plan == plan_counter && SPI_processed == 0)	/* held by another transaction */
			nocrm_exec_plan(plan_increments, args, NULL, SPI_OK_INSERT,
							"updating assignment counters failed");
	}
}

/*
 * The drain's part: folds the increments of every counter row no one
 * holds, and drops those whose member is gone.  Returns the rows folded.
 */
int64
nocrm_assign_fold_increments(void)
{
	static SPIPlanPtr plan = NULL;
	int64		folded = 0;

	if (!nocrm_table_exists("assignment_increments"))
		return 0;
	nocrm_plan(&plan,
			   "WITH mine AS (SELECT c.automation_id, c.action_no, c.user_id"
			   "                FROM nocrm.assignment_counters c"
			   "               WHERE EXISTS (SELECT FROM nocrm.assignment_increments i"
			   "                              WHERE i.automation_id = c.automation_id"
			   "                                AND i.action_no = c.action_no AND i.user_id = c.user_id)"
			   "               FOR NO KEY UPDATE OF c SKIP LOCKED),"
			   "     folded AS (DELETE FROM nocrm.assignment_increments i USING mine m"
			   "                 WHERE i.automation_id = m.automation_id AND i.action_no = m.action_no"
			   "                   AND i.user_id = m.user_id"
			   "                RETURNING i.automation_id, i.action_no, i.user_id, i.delta),"
			   "     gone AS (DELETE FROM nocrm.assignment_increments i"
			   "               WHERE NOT EXISTS (SELECT FROM nocrm.assignment_counters c"
			   "                                  WHERE c.automation_id = i.automation_id"
			   "                                    AND c.action_no = i.action_no AND c.user_id = i.user_id)),"
			   "     sums AS (SELECT automation_id, action_no, user_id, sum(delta) AS delta, count(*) AS n"
			   "                FROM folded GROUP BY 1, 2, 3),"
			   "     counted AS (UPDATE nocrm.assignment_counters c SET assigned = c.assigned + s.delta::bigint"
			   "                   FROM sums s"
			   "                  WHERE c.automation_id = s.automation_id AND c.action_no = s.action_no"
			   "                    AND c.user_id = s.user_id)"
			   " SELECT coalesce(sum(n), 0)::bigint FROM sums",
			   0, NULL);
	(void) nocrm_plan_int64(plan, NULL, NULL, &folded);
	return folded;
}

/*
 * AFTER ... FOR EACH STATEMENT on the tables whose triggers run actions:
 * write the statement's batched rows.  Statements run by actions themselves
 * (inside a chain) leave them to the outermost statement.
 */
Datum
nocrm_flush_assignments_trigger(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "nocrm_flush_assignments_trigger: not called as a trigger");
	/* attached to nocrm's own tables only; a write to tags may stale the tag set */
	if (strcmp(RelationGetRelationName(((TriggerData *) fcinfo->context)->tg_relation), "tags") == 0 &&
		nocrm_tagset_tags_written())
		return PointerGetDatum(NULL);	/* the batch itself: its writer goes on */
	nocrm_flush_writes();
	return PointerGetDatum(NULL);
}

/*
 * Ends the outermost statement: the buffered history, run log,
 * notification and queue rows are written, and group picks held for the
 * statement let go.
 * Called by the statement trigger, and by fire_trigger() and delayed
 * actions, which have none.  Inside a chain it waits for the outer end.
 */
void
nocrm_flush_writes(void)
{
	if (nocrm_chain_depth() > 0)
		return;
	nocrm_group_statement_end();
	nocrm_buffers_flush();
}

/*
 * Just before commit (or PREPARE): the transaction's increments, as the
 * extension owner (the committing user may not write the counters).  A
 * transaction that dropped the extension has nothing left to count.
 */
void
nocrm_assign_pre_commit(void)
{
	OwnerContext owner;

	if (npending == 0)
		return;
	if (!nocrm_table_exists("assignment_counters"))
	{
		npending = 0;
		return;
	}
	PushActiveSnapshot(GetTransactionSnapshot());
	nocrm_owner_enter(&owner);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	flush_pending();
	SPI_finish();
	nocrm_owner_leave(&owner);
	PopActiveSnapshot();
}

/* Increments of an aborted (sub)transaction never happened. */
void
nocrm_assign_subxact_abort(SubTransactionId subid)
{
	int			kept = 0;

	for (int i = 0; i < npending; i++)
		if (pending[i].subid < subid)
			pending[kept++] = pending[i];
	npending = kept;
	/* counts kept in memory may include the aborted picks */
	nocrm_group_subxact_abort();
}

void
nocrm_assign_subxact_commit(SubTransactionId subid, SubTransactionId parent)
{
	for (int i = 0; i < npending; i++)
		if (pending[i].subid == subid)
			pending[i].subid = parent;
}

void
nocrm_assign_xact_end(void)
{
	npending = 0;
	nocrm_group_xact_end();
}

static bool
pick_counted(Rule *rule, RuleAction *action, bool anyone, int64 *user_id)
{
	if (!nocrm_group_pick_held(rule, action, anyone, user_id) &&
		!nocrm_group_pick(rule, action, anyone, pending_by_position(rule, action), user_id))
		return false;
	bump(rule->id, action->action_no, *user_id, 1);
	return true;
}

/*
 * The member to assign when the group's members are held in memory (a bulk
 * statement's round robin): no query, so no SPI or owner switch needed.
 */
bool
nocrm_pick_assignee_held(Rule *rule, RuleAction *action, int64 *user_id)
{
	if (!nocrm_group_pick_held(rule, action, false, user_id))
		return false;
	bump(rule->id, action->action_no, *user_id, 1);
	return true;
}

/* Weighted draw: the smallest -ln(U)/weight wins with probability weight/total. */
static bool
pick_random(Rule *rule, RuleAction *action, bool anyone, int64 *user_id)
{
	return pick(&plan_random,
				"SELECT c.user_id" MEMBERS("nocrm.assignment_counters", "c", "u")
				" ORDER BY -ln(1.0 - random()) / c.weight LIMIT 1",
				rule, action, anyone, user_id);
}

static bool
pick_once(Rule *rule, RuleAction *action, bool anyone, int64 *user_id)
{
	return action->kind == ACT_ASSIGN_RANDOM
		? pick_random(rule, action, anyone, user_id)
		: pick_counted(rule, action, anyone, user_id);
}

/*
 * The member to assign, or *found = false when nobody is available.  With
 * the fallback "anyone", unavailable (absent, off hours, capped) but active
 * members are tried next; *fallback tells it happened.
 */
int64
nocrm_pick_assignee(Rule *rule, RuleAction *action, LeadState *lead, bool *found,
					bool *fallback)
{
	int64		user_id = 0;

	*fallback = false;
	*found = pick_once(rule, action, false, &user_id);
	if (!*found && action->assign_anyway)
	{
		*found = pick_once(rule, action, true, &user_id);
		*fallback = *found;
	}
	return user_id;
}
