/*
 * group_pick.c — round-robin and balanced picks across concurrent sessions,
 * without holding a lock that others wait for until commit.
 *
 * A pick is a short critical section per group, under a lock of our own
 * (an advisory lock of a kind SQL's pg_advisory_* cannot name), held only
 * while picking: count each member's claims in flight in other
 * transactions, read the committed counts, take the member with the lowest
 * (committed + in flight + this transaction's unwritten) per weight, ties
 * by list position (balanced: the fewest open leads + in flight per weight
 * first), and claim it.  A claim is a share lock on the member,
 * held to the end of the transaction; nobody ever waits for one, others
 * only count them.  A rollback drops the claim with the pick, so the member
 * comes up next again.  The increments themselves are written at commit
 * (assign.c).
 *
 * Claims are counted before the committed counts are read: a transaction
 * that commits in between is counted twice (its member is passed over
 * once), never missed.
 *
 * A statement that picks many leads in one round-robin group keeps the
 * group's lock after a few picks, to its end, and picks in memory: no other
 * pick in the group can happen meanwhile, so the counts it loaded stay
 * exact.  (Not balanced: whether a lead stays open is not known here.)
 */
#include "nocrm.h"
#include "groups.h"

#include "access/xact.h"
#include "miscadmin.h"
#include "storage/lock.h"
#include "utils/memutils.h"
#include "utils/resowner.h"

/* locktag_field4 of our locks; pg_advisory_* use 1 and 2 */
#define LOCK_KIND_GROUP		0x4E47
#define LOCK_KIND_MEMBER	0x4E4D

/* Picks a group makes one by one in a statement before it keeps the group's lock. */
#define PICKS_BEFORE_HOLDING	8
#define MAX_HELD_GROUPS			16

static SPIPlanPtr member_plans[4][2];

/* A group's available members, by position, as one pick sees them. */
typedef struct Members
{
	int			n;
	int64	   *user_ids;
	int32	   *positions;
	int32	   *weights;
	int64	   *counts;			/* committed + unwritten + in flight */
	int64	   *flying;			/* claims in flight elsewhere */
	int64	   *open;			/* balanced: open leads + in flight; else NULL */
} Members;

/* A group whose lock this statement holds, with its members' counts. */
typedef struct HeldGroup
{
	int32		automation_id;
	int32		action_no;
	int			picks;			/* one by one so far in this statement */
	bool		held;			/* we hold the group lock, members below are exact */
	Members		members;		/* in groups_context */
} HeldGroup;

static HeldGroup groups[MAX_HELD_GROUPS];
static int	ngroups = 0;
static MemoryContext groups_context = NULL;

static void
group_tag(LOCKTAG *tag, int32 automation_id, int32 action_no)
{
	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId, (uint32) automation_id,
						 ((uint32) action_no << 16) | 0xFFFF, LOCK_KIND_GROUP);
}

static void
member_tag(LOCKTAG *tag, int32 automation_id, int32 action_no, int32 position)
{
	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId, (uint32) automation_id,
						 ((uint32) action_no << 16) | ((uint32) position & 0xFFFF),
						 LOCK_KIND_MEMBER);
}

/*
 * The group lock belongs to the top transaction, so a subtransaction that
 * commits or aborts in the middle of a statement holding it does not move
 * or drop it; it is always released here, or at transaction end.
 */
static void
group_lock(int32 automation_id, int32 action_no, bool acquire)
{
	LOCKTAG		tag;
	ResourceOwner save = CurrentResourceOwner;

	group_tag(&tag, automation_id, action_no);
	CurrentResourceOwner = TopTransactionResourceOwner;
	PG_TRY();
	{
		if (acquire)
			(void) LockAcquire(&tag, ExclusiveLock, false, false);
		else
			(void) LockRelease(&tag, ExclusiveLock, false);
	}
	PG_FINALLY();
	{
		CurrentResourceOwner = save;
	}
	PG_END_TRY();
}

/* Claims in flight on a member, in other transactions. */
static int
claims_elsewhere(int32 automation_id, int32 action_no, int32 position)
{
	LOCKTAG		tag;
	int			n = 0;

	member_tag(&tag, automation_id, action_no, position);
	(void) GetLockConflicts(&tag, ExclusiveLock, &n);
	return n;
}

/* Our claim on a member, to the end of the (sub)transaction that made it. */
static void
claim(int32 automation_id, int32 action_no, int32 position)
{
	LOCKTAG		tag;

	member_tag(&tag, automation_id, action_no, position);
	if (!LockHeldByMe(&tag, ShareLock))
		(void) LockAcquire(&tag, ShareLock, false, true);
}

static HeldGroup *
group_of(Rule *rule, RuleAction *action)
{
	HeldGroup  *g;

	for (int i = 0; i < ngroups; i++)
		if (groups[i].automation_id == rule->id && groups[i].action_no == action->action_no)
			return &groups[i];
	if (ngroups == MAX_HELD_GROUPS)
		return NULL;
	g = &groups[ngroups++];
	memset(g, 0, sizeof(HeldGroup));
	g->automation_id = rule->id;
	g->action_no = action->action_no;
	return g;
}

/* Is a/wa below b/wb, exactly? */
/* a/wa compared with b/wb, exactly: -1, 0 or 1 */
static int
compare_load(int64 a, int32 wa, int64 b, int32 wb)
{
	int128		x = (int128) a * wb,
				y = (int128) b * wa;

	return x < y ? -1 : x > y ? 1 : 0;
}

/*
 * The member to pick: the fewest open leads per weight first (balanced,
 * open != NULL), then the lowest count per weight (committed + in flight +
 * unwritten), then the lowest count without the claims in flight (a claim
 * may yet roll back: of two members that look level, the one behind in
 * fact goes first), then the list position (the first).
 */
static int
lowest(int n, const int64 *counts, const int64 *inflight, const int64 *open,
	   const int32 *weights)
{
	int			best = 0;

	for (int i = 1; i < n; i++)
	{
		int			c = open ? compare_load(open[i], weights[i], open[best], weights[best]) : 0;

		if (c == 0)
			c = compare_load(counts[i], weights[i], counts[best], weights[best]);
		if (c == 0 && inflight)
			c = compare_load(counts[i] - inflight[i], weights[i],
							 counts[best] - inflight[best], weights[best]);
		if (c < 0)
			best = i;
	}
	return best;
}

/* each member query's columns before the open count */
#define MEMBER_COUNTS \
	"SELECT c.user_id, c.position, c.weight," \
	"       c.assigned + coalesce(($3::bigint[])[c.position + 1], 0),"

/* The member queries: any time, open tasks, open leads, any time without
 * caps; each on a schema without and with nocrm.group_counts (1.3). */
#define MEMBER_QUERY(open, members) MEMBER_COUNTS open members " ORDER BY c.position"
#define ANY_TIME_OPEN	"       NULL::bigint"
#define TASKS_OPEN		"       CASE WHEN $6 THEN " OPEN_TASKS("c") " END"
#define LEADS_OPEN		"       CASE WHEN $6 THEN " OPEN_LEADS("c") " END"
#define OLD_COUNTERS	"nocrm.assignment_counters"
#define COUNTERS		"nocrm.group_counts"

static const char *const member_queries[4][2] = {
	{MEMBER_QUERY(ANY_TIME_OPEN, MEMBERS_ANY_TIME(OLD_COUNTERS, "c", "u")),
	MEMBER_QUERY(ANY_TIME_OPEN, MEMBERS_ANY_TIME(COUNTERS, "c", "u"))},
	{MEMBER_QUERY(TASKS_OPEN, MEMBERS(OLD_COUNTERS, "c", "u")),
	MEMBER_QUERY(TASKS_OPEN, MEMBERS(COUNTERS, "c", "u"))},
	{MEMBER_QUERY(LEADS_OPEN, MEMBERS(OLD_COUNTERS, "c", "u")),
	MEMBER_QUERY(LEADS_OPEN, MEMBERS(COUNTERS, "c", "u"))},
	{MEMBER_QUERY(ANY_TIME_OPEN, MEMBERS_UNCAPPED(OLD_COUNTERS, "c", "u")),
	MEMBER_QUERY(ANY_TIME_OPEN, MEMBERS_UNCAPPED(COUNTERS, "c", "u"))},
};

/*
 * The available members with their counts, inside the group's critical
 * section: committed (folded and waiting) + unwritten + in flight; a claim
 * in flight is also a lead in flight, so for balanced it counts as open
 * too.  Allocated in the current memory context.
 */
static void
read_members(Rule *rule, RuleAction *action, bool anyone, Datum pending, const int64 *inflight,
			 Members *m)
{
	bool		balanced = action->kind == ACT_ASSIGN_BALANCED;
	bool		tasks = action->group_kind != ACT_ASSIGN;	/* a create_task group */
	Oid			types[6] = {INT4OID, INT4OID, INT8ARRAYOID, BOOLOID, BOOLOID, BOOLOID};
	Datum		args[6] = {Int32GetDatum(rule->id), Int32GetDatum(action->action_no), pending,
		BoolGetDatum(anyone), BoolGetDatum(action->only_working_hours),
	BoolGetDatum(balanced)};
	/* (tasks balance by their own statement: nocrm.tasks is not there before 1.3) */
	int			kind = (!balanced && !action->only_working_hours) ? (action->capped ? 0 : 3)
		: tasks ? 1 : 2;
	int			with_increments = nocrm_table_exists("assignment_increments") ? 1 : 0;
	SPIPlanPtr	plan;
	int			ret;

	plan = nocrm_plan(&member_plans[kind][with_increments], member_queries[kind][with_increments],
					  6, types);
	ret = SPI_execute_plan(plan, args, NULL, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading a group's members failed: %s", SPI_result_code_string(ret));
	m->n = (int) SPI_processed;
	m->user_ids = palloc(sizeof(int64) * Max(m->n, 1));
	m->positions = palloc(sizeof(int32) * Max(m->n, 1));
	m->weights = palloc(sizeof(int32) * Max(m->n, 1));
	m->counts = palloc(sizeof(int64) * Max(m->n, 1));
	m->flying = palloc(sizeof(int64) * Max(m->n, 1));
	m->open = balanced ? palloc(sizeof(int64) * Max(m->n, 1)) : NULL;
	for (int r = 0; r < m->n; r++)
	{
		HeapTuple	row = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		int32		position = DatumGetInt32(SPI_getbinval(row, desc, 2, &isnull));

		m->user_ids[r] = DatumGetInt64(SPI_getbinval(row, desc, 1, &isnull));
		m->positions[r] = position;
		m->weights[r] = DatumGetInt32(SPI_getbinval(row, desc, 3, &isnull));
		m->flying[r] = position >= 0 && position < action->nusers ? inflight[position] : 0;
		m->counts[r] = DatumGetInt64(SPI_getbinval(row, desc, 4, &isnull)) + m->flying[r];
		if (m->open)
		{
			Datum		o = SPI_getbinval(row, desc, 5, &isnull);

			m->open[r] = (isnull ? 0 : DatumGetInt64(o)) + m->flying[r];
		}
	}
}

/* A copy in groups_context, for picks in memory until the statement ends. */
static void
keep_members(HeldGroup *g, const Members *m)
{
	if (groups_context == NULL)
		groups_context = AllocSetContextCreate(TopMemoryContext, "nocrm group counts",
											   ALLOCSET_SMALL_SIZES);
	g->members = *m;
	g->members.user_ids = MemoryContextAlloc(groups_context, sizeof(int64) * m->n);
	g->members.positions = MemoryContextAlloc(groups_context, sizeof(int32) * m->n);
	g->members.weights = MemoryContextAlloc(groups_context, sizeof(int32) * m->n);
	g->members.counts = MemoryContextAlloc(groups_context, sizeof(int64) * m->n);
	g->members.flying = MemoryContextAlloc(groups_context, sizeof(int64) * m->n);
	g->members.open = NULL;		/* round robin only */
	memcpy(g->members.user_ids, m->user_ids, sizeof(int64) * m->n);
	memcpy(g->members.positions, m->positions, sizeof(int32) * m->n);
	memcpy(g->members.weights, m->weights, sizeof(int32) * m->n);
	memcpy(g->members.counts, m->counts, sizeof(int64) * m->n);
	memcpy(g->members.flying, m->flying, sizeof(int64) * m->n);
}

/* Takes the lowest member and claims it; returns its index. */
static int
take(Rule *rule, RuleAction *action, Members *m)
{
	int			best = lowest(m->n, m->counts, m->flying, m->open, m->weights);

	m->counts[best]++;
	claim(rule->id, action->action_no, m->positions[best]);
	return best;
}

/* The group a pick may hold for the statement: round robin, any time, not "anyone". */
static HeldGroup *
holdable_group(Rule *rule, RuleAction *action, bool anyone)
{
	if (anyone || action->only_working_hours || action->kind != ACT_ASSIGN_ROUND_ROBIN)
		return NULL;
	return group_of(rule, action);
}

/*
 * A pick from the members held in memory for the rest of the statement,
 * which needs no query: false when the group is not held.
 */
bool
nocrm_group_pick_held(Rule *rule, RuleAction *action, bool anyone, int64 *user_id)
{
	HeldGroup  *g = holdable_group(rule, action, anyone);

	if (g == NULL || !g->held)
		return false;
	*user_id = g->members.user_ids[take(rule, action, &g->members)];
	return true;
}

/*
 * Picks the next member of a round-robin or balanced group and claims it;
 * false if nobody is available.  pending: this transaction's unwritten increments
 * by position (bigint[]).  The caller records the increment, and has tried
 * nocrm_group_pick_held first.
 */
bool
nocrm_group_pick(Rule *rule, RuleAction *action, bool anyone, Datum pending, int64 *user_id)
{
	HeldGroup  *g = holdable_group(rule, action, anyone);
	Members		m;
	bool		keep = false;

	group_lock(rule->id, action->action_no, true);
	PG_TRY();
	{
		int64	   *inflight = palloc0(sizeof(int64) * Max(action->nusers, 1));

		for (int pos = 0; pos < action->nusers; pos++)
			inflight[pos] = claims_elsewhere(rule->id, action->action_no, pos);
		read_members(rule, action, anyone, pending, inflight, &m);
		if (m.n > 0)
		{
			*user_id = m.user_ids[take(rule, action, &m)];
			/* caps count open leads, which each assignment changes: no picks in memory */
			keep = g && !action->capped && ++g->picks > PICKS_BEFORE_HOLDING;
			if (keep)
			{
				keep_members(g, &m);
				g->held = true;
			}
		}
	}
	PG_CATCH();
	{
		group_lock(rule->id, action->action_no, false);
		PG_RE_THROW();
	}
	PG_END_TRY();
	if (!keep)
		group_lock(rule->id, action->action_no, false);
	return m.n > 0;
}

/* End of the outermost statement: let the other sessions pick again. */
void
nocrm_group_statement_end(void)
{
	for (int i = 0; i < ngroups; i++)
		if (groups[i].held)
			group_lock(groups[i].automation_id, groups[i].action_no, false);
	ngroups = 0;
	if (groups_context)
		MemoryContextReset(groups_context);
}

/* A subtransaction rolled back: the counts in memory may count its picks. */
void
nocrm_group_subxact_abort(void)
{
	nocrm_group_statement_end();
}

/* The transaction's end released every lock. */
void
nocrm_group_xact_end(void)
{
	ngroups = 0;
	if (groups_context)
		MemoryContextReset(groups_context);
}
