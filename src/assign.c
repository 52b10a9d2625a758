/*
 * assign.c — choosing the assignee of round-robin, random and balanced
 * assignment.
 *
 * Round robin must stay fair across concurrent sessions without one lock
 * held to commit by every insert.  Each group member has a counter row; a
 * transaction takes the member with the lowest committed count (ties by list
 * position) whose row no one else has locked (SKIP LOCKED), and increments
 * it.  The row lock lasts to commit, so up to one in-flight assignment per
 * lowest member runs at once.  If every lowest member is taken, the
 * transaction waits for one of them rather than pick a member ahead of the
 * rotation: a rollback could otherwise leave counts two apart.  A rollback
 * undoes the increment, so the member it would have used comes up next.
 *
 * Increments are kept in memory and written once per member at the end of
 * the outermost statement (an AFTER STATEMENT trigger), not once per lead:
 * a bulk INSERT would otherwise rewrite the same counter row per row and
 * make every later pick walk all those row versions.  Picks add the pending
 * increments to what the table says.
 *
 * A statement that assigns many leads in one group (a bulk INSERT) tries,
 * after a few picks, to lock every available member's row at once (SKIP
 * LOCKED, never waiting).  Holding them all, no other transaction can move
 * a count, so the rest of the statement's picks are made in memory with
 * the same rule (lowest count per weight, ties by position): the same
 * member the query would have chosen, without a query per lead.
 */
#include "nocrm.h"

#include "access/xact.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/memutils.h"
#include "utils/resowner.h"

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

static SPIPlanPtr plan_rr_try,
			plan_rr_wait,
			plan_balanced_try,
			plan_balanced_wait,
			plan_random,
			plan_lock_all,
			plan_count_available;

/* Picks a group makes by query in one statement before it tries to lock all members. */
#define PICKS_BEFORE_LOCK_ALL	8
#define MAX_GROUP_MEMOS			16

/*
 * A round-robin group of the current statement: its picks so far and, once
 * this transaction holds every available member's counter row, the members'
 * counts (committed + pending), so the next picks need no query.
 */
typedef struct GroupMemo
{
	int32		automation_id;
	int32		action_no;
	int			picks;
	bool		tried_lock_all;
	bool		in_memory;
	int			nmembers;
	int64	   *user_ids;		/* available members, by position */
	int32	   *weights;
	int64	   *counts;
} GroupMemo;

static GroupMemo group_memos[MAX_GROUP_MEMOS];
static int	ngroup_memos = 0;
static MemoryContext memo_context = NULL;

/*
 * Parameters of every group query: $1 automation, $2 action, $3 pending
 * increments by position, $4 ignore availability (fallback "anyone"),
 * $5 only members within their working hours.
 *
 * A member is available when active and, unless $4, not absent now, within
 * working hours if $5, and under their cap of open leads.
 */
#define OPEN_LEADS(c) \
	"(SELECT count(*) FROM nocrm.leads l WHERE l.user_id = " c ".user_id" \
	" AND l.status IN ('todo', 'standby'))"

#define AVAILABLE(c, u) \
	" " u ".active AND ($4 OR (" \
	"  NOT EXISTS (SELECT 1 FROM nocrm.absences a WHERE a.user_id = " u ".id" \
	"              AND now() >= a.starts_at AND now() < a.ends_at)" \
	"  AND (NOT $5" \
	"       OR NOT EXISTS (SELECT 1 FROM nocrm.working_hours w WHERE w.user_id = " u ".id)" \
	"       OR EXISTS (SELECT 1 FROM nocrm.working_hours w WHERE w.user_id = " u ".id" \
	"                  AND w.weekday = extract(isodow FROM now() AT TIME ZONE " u ".timezone)" \
	"                  AND (now() AT TIME ZONE " u ".timezone)::time >= w.starts" \
	"                  AND (now() AT TIME ZONE " u ".timezone)::time < w.ends))" \
	"  AND (" c ".cap IS NULL OR " OPEN_LEADS(c) " < " c ".cap)))"

#define MEMBERS(c, u) \
	" FROM nocrm.assignment_counters " c " JOIN nocrm.users " u " ON " u ".id = " c ".user_id" \
	" WHERE " c ".automation_id = $1 AND " c ".action_no = $2 AND" AVAILABLE(c, u)

/* Assignments so far, pending ones included, per unit of weight. */
#define LOAD(c) \
	"((" c ".assigned + coalesce(($3::bigint[])[" c ".position + 1], 0))::numeric / " c ".weight)"

#define LOWEST_LOAD \
	" AND " LOAD("c") " = (SELECT min" LOAD("c2") MEMBERS("c2", "u2") ")"

#define BALANCED_ORDER \
	" ORDER BY " OPEN_LEADS("c") "::numeric / c.weight, " LOAD("c") ", c.position"

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
bump(Rule *rule, RuleAction *action, int64 user_id, int64 delta)
{
	SubTransactionId subid = GetCurrentSubTransactionId();

	for (int i = 0; i < npending; i++)
	{
		PendingIncrement *p = &pending[i];

		if (p->automation_id == rule->id && p->action_no == action->action_no &&
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
	pending[npending].automation_id = rule->id;
	pending[npending].action_no = action->action_no;
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
	RuleAction	action;
	Rule		rule;

	memset(&rule, 0, sizeof(rule));
	memset(&action, 0, sizeof(action));
	rule.id = automation_id;
	action.action_no = action_no;
	bump(&rule, &action, user_id, -1);
}

/* Counts held in memory are good for one statement and its own locks. */
static void
forget_group_memos(void)
{
	ngroup_memos = 0;
	if (memo_context)
		MemoryContextReset(memo_context);
}

static GroupMemo *
group_memo(Rule *rule, RuleAction *action)
{
	GroupMemo  *m;

	for (int i = 0; i < ngroup_memos; i++)
		if (group_memos[i].automation_id == rule->id &&
			group_memos[i].action_no == action->action_no)
			return &group_memos[i];
	if (ngroup_memos == MAX_GROUP_MEMOS)
		return NULL;
	m = &group_memos[ngroup_memos++];
	memset(m, 0, sizeof(GroupMemo));
	m->automation_id = rule->id;
	m->action_no = action->action_no;
	return m;
}

/* The member with the lowest count per weight, ties by position. */
static int64
pick_in_memory(GroupMemo *m)
{
	int			best = 0;

	for (int i = 1; i < m->nmembers; i++)
	{
		/* counts[i] / weights[i] < counts[best] / weights[best], exactly */
		if ((int128) m->counts[i] * m->weights[best] <
			(int128) m->counts[best] * m->weights[i])
			best = i;
	}
	m->counts[best]++;
	return m->user_ids[best];
}

/*
 * Locks every available member's counter row if no one else holds one, and
 * loads their counts.  Never waits: another transaction holding a member
 * means we go on with one query per pick.  Groups with caps (open leads
 * change with every assignment) stay on the query.
 */
static void
try_lock_all(Rule *rule, RuleAction *action, GroupMemo *m)
{
	Oid			types[5] = {INT4OID, INT4OID, INT8ARRAYOID, BOOLOID, BOOLOID};
	Datum		args[5] = {Int32GetDatum(rule->id), Int32GetDatum(action->action_no),
		pending_by_position(rule, action), BoolGetDatum(false), BoolGetDatum(false)};
	MemoryContext oldcontext = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	bool		complete = false;
	int64		available = 0;

	m->tried_lock_all = true;
	nocrm_plan(&plan_lock_all,
			   "SELECT c.user_id, c.weight,"
			   "       c.assigned + coalesce(($3::bigint[])[c.position + 1], 0), c.cap IS NOT NULL"
			   MEMBERS("c", "u") " ORDER BY c.position FOR UPDATE OF c SKIP LOCKED",
			   5, types);
	nocrm_plan(&plan_count_available, "SELECT count(*)" MEMBERS("c", "u"), 5, types);
	if (!nocrm_plan_int64(plan_count_available, args, NULL, &available) || available == 0)
		return;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcontext);
	PG_TRY();
	{
		int			ret = SPI_execute_plan(plan_lock_all, args, NULL, false, 0);
		uint64		n = SPI_processed;
		bool		capped = false;

		if (ret != SPI_OK_SELECT)
			elog(ERROR, "locking a group's counters failed: %s", SPI_result_code_string(ret));
		for (uint64 r = 0; r < n; r++)
		{
			bool		isnull;

			capped |= DatumGetBool(SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc,
												 4, &isnull));
		}
		if (n == (uint64) available && !capped)
		{
			if (memo_context == NULL)
				memo_context = AllocSetContextCreate(TopMemoryContext, "nocrm group counts",
													 ALLOCSET_SMALL_SIZES);
			m->nmembers = (int) n;
			m->user_ids = MemoryContextAlloc(memo_context, sizeof(int64) * n);
			m->weights = MemoryContextAlloc(memo_context, sizeof(int32) * n);
			m->counts = MemoryContextAlloc(memo_context, sizeof(int64) * n);
			for (uint64 r = 0; r < n; r++)
			{
				HeapTuple	row = SPI_tuptable->vals[r];
				TupleDesc	desc = SPI_tuptable->tupdesc;
				bool		isnull;

				m->user_ids[r] = DatumGetInt64(SPI_getbinval(row, desc, 1, &isnull));
				m->weights[r] = DatumGetInt32(SPI_getbinval(row, desc, 2, &isnull));
				m->counts[r] = DatumGetInt64(SPI_getbinval(row, desc, 3, &isnull));
			}
			complete = true;
		}
	}
	PG_CATCH();
	{
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
		PG_RE_THROW();
	}
	PG_END_TRY();
	/* keep the locks only if they are all of them: a partial set would just hold others up */
	if (complete)
		ReleaseCurrentSubTransaction();
	else
		RollbackAndReleaseCurrentSubTransaction();
	MemoryContextSwitchTo(oldcontext);
	CurrentResourceOwner = oldowner;
	m->in_memory = complete;
}

/* Writes the pending increments to nocrm.assignment_counters. */
static void
flush_pending(void)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[4] = {INT4ARRAYOID, INT4ARRAYOID, INT8ARRAYOID, INT8ARRAYOID};
	Datum	   *cols[4];
	Datum		args[4];
	int			n = npending;

	for (int c = 0; c < 4; c++)
		cols[c] = palloc(sizeof(Datum) * n);
	for (int i = 0; i < n; i++)
	{
		cols[0][i] = Int32GetDatum(pending[i].automation_id);
		cols[1][i] = Int32GetDatum(pending[i].action_no);
		cols[2][i] = Int64GetDatum(pending[i].user_id);
		cols[3][i] = Int64GetDatum(pending[i].delta);
	}
	args[0] = PointerGetDatum(construct_array(cols[0], n, INT4OID, 4, true, TYPALIGN_INT));
	args[1] = PointerGetDatum(construct_array(cols[1], n, INT4OID, 4, true, TYPALIGN_INT));
	args[2] = PointerGetDatum(construct_array(cols[2], n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	args[3] = PointerGetDatum(construct_array(cols[3], n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));

	nocrm_plan(&plan,
			   "UPDATE nocrm.assignment_counters c SET assigned = c.assigned + d.delta"
			   "  FROM (SELECT a, n, u, sum(d) AS delta"
			   "          FROM unnest($1::int[], $2::int[], $3::bigint[], $4::bigint[]) AS x(a, n, u, d)"
			   "         GROUP BY a, n, u) d"
			   " WHERE c.automation_id = d.a AND c.action_no = d.n AND c.user_id = d.u",
			   4, types);
	nocrm_exec_plan(plan, args, NULL, SPI_OK_UPDATE, "updating assignment counters failed");
	npending = 0;
}

/*
 * AFTER ... FOR EACH STATEMENT on the tables whose triggers run actions:
 * write the statement's increments.  Statements run by actions themselves
 * (inside a chain) leave them to the outermost statement.
 */
Datum
nocrm_flush_assignments_trigger(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "nocrm_flush_assignments_trigger: not called as a trigger");
	nocrm_flush_writes();
	return PointerGetDatum(NULL);
}

/*
 * Writes what waits for the end of the outermost statement: counter
 * increments, and the buffered history, run log and notification rows.
 * Called by the statement trigger, and by fire_trigger() and delayed
 * actions, which have none.  Inside a chain it waits for the outer end.
 */
void
nocrm_flush_writes(void)
{
	if (nocrm_chain_depth() > 0)
		return;
	forget_group_memos();
	if (npending > 0)
	{
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		flush_pending();
		SPI_finish();
	}
	nocrm_buffers_flush();
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
	/* the aborted subtransaction may have held the member locks the counts rely on */
	forget_group_memos();
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
	forget_group_memos();
}

/*
 * Waits until another transaction lets go of a member's counter row, without
 * keeping the lock: the lock is taken in a subtransaction that is then
 * rolled back.  A waiter that kept rows it locked while looking could hold
 * what another waiter needs (a deadlock seen under 8 concurrent clients).
 */
static void
wait_for_member(Rule *rule, RuleAction *action, int64 user_id)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[3] = {INT4OID, INT4OID, INT8OID};
	Datum		args[3] = {Int32GetDatum(rule->id), Int32GetDatum(action->action_no),
	Int64GetDatum(user_id)};
	MemoryContext oldcontext = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;

	nocrm_plan(&plan,
			   "SELECT 1 FROM nocrm.assignment_counters"
			   " WHERE automation_id = $1 AND action_no = $2 AND user_id = $3 FOR UPDATE",
			   3, types);
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcontext);
	PG_TRY();
	{
		nocrm_exec_plan(plan, args, NULL, SPI_OK_SELECT, "waiting for an assignment counter");
	}
	PG_CATCH();
	{
		/* errors (cancel, deadlock) go up; the subtransaction goes with them */
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
		PG_RE_THROW();
	}
	PG_END_TRY();
	RollbackAndReleaseCurrentSubTransaction();
	MemoryContextSwitchTo(oldcontext);
	CurrentResourceOwner = oldowner;
}

/*
 * One attempt to lock a free lowest member.  Rows the attempt locked and
 * then rejected (their count moved under us) would stay locked; when it
 * finds nobody its subtransaction is rolled back, so a transaction that
 * goes on to wait holds no counter row.
 */
static bool
try_pick(Rule *rule, RuleAction *action, bool anyone, int64 *user_id)
{
	MemoryContext oldcontext = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	bool		found = false;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcontext);
	PG_TRY();
	{
		found = action->kind == ACT_ASSIGN_BALANCED
			? pick(&plan_balanced_try,
				   "SELECT c.user_id" MEMBERS("c", "u") BALANCED_ORDER
				   " FOR UPDATE OF c SKIP LOCKED LIMIT 1",
				   rule, action, anyone, user_id)
			: pick(&plan_rr_try,
				   "SELECT c.user_id" MEMBERS("c", "u") LOWEST_LOAD
				   " ORDER BY c.position FOR UPDATE OF c SKIP LOCKED LIMIT 1",
				   rule, action, anyone, user_id);
	}
	PG_CATCH();
	{
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
		PG_RE_THROW();
	}
	PG_END_TRY();
	if (found)
		ReleaseCurrentSubTransaction();
	else
		RollbackAndReleaseCurrentSubTransaction();
	MemoryContextSwitchTo(oldcontext);
	CurrentResourceOwner = oldowner;
	return found;
}

static bool
pick_counted(Rule *rule, RuleAction *action, bool anyone, int64 *user_id)
{
	bool		balanced = action->kind == ACT_ASSIGN_BALANCED;
	GroupMemo  *memo = NULL;

	if (!balanced && !anyone && !action->only_working_hours)
		memo = group_memo(rule, action);
	if (memo && !memo->in_memory && !memo->tried_lock_all &&
		++memo->picks > PICKS_BEFORE_LOCK_ALL)
		try_lock_all(rule, action, memo);
	if (memo && memo->in_memory)
	{
		*user_id = pick_in_memory(memo);
		bump(rule, action, *user_id, 1);
		return true;
	}

	for (;;)
	{
		int64		busy;

		CHECK_FOR_INTERRUPTS();
		if (try_pick(rule, action, anyone, user_id))
			break;

		/*
		 * Every candidate is in another transaction's hands: wait for the
		 * first of them to commit or roll back, then look again with a new
		 * snapshot (it may no longer be the lowest).
		 */
		if (!(balanced
			  ? pick(&plan_balanced_wait,
					 "SELECT c.user_id" MEMBERS("c", "u") BALANCED_ORDER " LIMIT 1",
					 rule, action, anyone, &busy)
			  : pick(&plan_rr_wait,
					 "SELECT c.user_id" MEMBERS("c", "u") LOWEST_LOAD
					 " ORDER BY c.position LIMIT 1",
					 rule, action, anyone, &busy)))
			return false;		/* nobody available */
		wait_for_member(rule, action, busy);
	}
	bump(rule, action, *user_id, 1);
	return true;
}

/* Weighted draw: the smallest -ln(U)/weight wins with probability weight/total. */
static bool
pick_random(Rule *rule, RuleAction *action, bool anyone, int64 *user_id)
{
	return pick(&plan_random,
				"SELECT c.user_id" MEMBERS("c", "u")
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
