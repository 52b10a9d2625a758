/*
 * assign.c — choosing the assignee of round-robin, random and balanced
 * assignment, and keeping the group counters.
 *
 * Round robin is picked in round_robin.c.  Balanced takes the member with
 * the fewest open leads whose counter row no one else has locked (SKIP
 * LOCKED), and waits for one if all are taken; random draws by weight.
 *
 * Increments are kept in memory and written once per member, not once per
 * lead: a bulk INSERT would otherwise rewrite the same counter row per row.
 * Picks add the pending increments to what the table says.  Balanced
 * increments are written at the end of the outermost statement (its rows
 * are locked since the pick anyway); round-robin ones just before commit,
 * in key order, so their row locks last only for the commit itself.
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
#include "utils/resowner.h"
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
	bool		at_commit;		/* round robin: written just before commit */
} PendingIncrement;

static PendingIncrement *pending = NULL;
static int	npending = 0;
static int	maxpending = 0;

static SPIPlanPtr plan_balanced_try,
			plan_balanced_wait,
			plan_random;

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
	pending[npending].at_commit = action->kind == ACT_ASSIGN_ROUND_ROBIN;
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
	/* written when the increment it takes back is */
	for (int i = 0; i < npending; i++)
		if (pending[i].automation_id == automation_id && pending[i].action_no == action_no &&
			pending[i].user_id == user_id)
			action.kind = pending[i].at_commit ? ACT_ASSIGN_ROUND_ROBIN : ACT_ASSIGN_BALANCED;
	bump(&rule, &action, user_id, -1);
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

/*
 * Writes the pending increments of one kind (round robin's at commit, or
 * the others) to nocrm.assignment_counters: one UPDATE per member, in key
 * order, so two transactions committing increments of the same members
 * queue up instead of deadlocking.  (A statement of its own per member is
 * cheaper than one set-based UPDATE: there are a few members, and that
 * plan's start-up cost is paid by every transaction.)
 */
static void
flush_pending(bool at_commit)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[4] = {INT4OID, INT4OID, INT8OID, INT8OID};
	PendingIncrement *todo = palloc(sizeof(PendingIncrement) * Max(npending, 1));
	int			n = 0,
				kept = 0;

	for (int i = 0; i < npending; i++)
	{
		if (pending[i].at_commit == at_commit)
			todo[n++] = pending[i];
		else
			pending[kept++] = pending[i];
	}
	npending = kept;
	if (n == 0)
		return;
	qsort(todo, n, sizeof(PendingIncrement), increment_order);
	nocrm_plan(&plan,
			   "UPDATE nocrm.assignment_counters SET assigned = assigned + $4"
			   " WHERE automation_id = $1 AND action_no = $2 AND user_id = $3",
			   4, types);
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
		nocrm_exec_plan(plan, args, NULL, SPI_OK_UPDATE, "updating assignment counters failed");
	}
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
	bool		others = false;

	if (nocrm_chain_depth() > 0)
		return;
	nocrm_rr_statement_end();
	for (int i = 0; i < npending && !others; i++)
		others = !pending[i].at_commit;
	if (others)
	{
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		flush_pending(false);
		SPI_finish();
	}
	nocrm_buffers_flush();
}

/*
 * Just before commit (or PREPARE): the round-robin increments, as the
 * extension owner (the committing user may not write the counters).  A
 * transaction that dropped the extension has nothing left to count.
 */
void
nocrm_assign_pre_commit(void)
{
	OwnerContext owner;
	Oid			nsp;

	if (npending == 0)
		return;
	nsp = get_namespace_oid("nocrm", true);
	if (!OidIsValid(nsp) || !OidIsValid(get_relname_relid("assignment_counters", nsp)))
	{
		npending = 0;
		return;
	}
	PushActiveSnapshot(GetTransactionSnapshot());
	nocrm_owner_enter(&owner);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	flush_pending(true);
	flush_pending(false);		/* a backstop: statement ends write these */
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
	nocrm_rr_subxact_abort();
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
	nocrm_rr_xact_end();
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
		found = pick(&plan_balanced_try,
					 "SELECT c.user_id" MEMBERS("c", "u") BALANCED_ORDER
					 " FOR UPDATE OF c SKIP LOCKED LIMIT 1",
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
pick_balanced(Rule *rule, RuleAction *action, bool anyone, int64 *user_id)
{
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
		if (!pick(&plan_balanced_wait,
				  "SELECT c.user_id" MEMBERS("c", "u") BALANCED_ORDER " LIMIT 1",
				  rule, action, anyone, &busy))
			return false;		/* nobody available */
		wait_for_member(rule, action, busy);
	}
	bump(rule, action, *user_id, 1);
	return true;
}

static bool
pick_round_robin(Rule *rule, RuleAction *action, bool anyone, int64 *user_id)
{
	if (!nocrm_rr_pick(rule, action, anyone, pending_by_position(rule, action), user_id))
		return false;
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
	switch (action->kind)
	{
		case ACT_ASSIGN_RANDOM:
			return pick_random(rule, action, anyone, user_id);
		case ACT_ASSIGN_BALANCED:
			return pick_balanced(rule, action, anyone, user_id);
		default:
			return pick_round_robin(rule, action, anyone, user_id);
	}
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
