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
 */
#include "nocrm.h"

#include "miscadmin.h"
#include "utils/array.h"

static SPIPlanPtr plan_rr_try,
			plan_rr_wait,
			plan_balanced_try,
			plan_balanced_wait,
			plan_bump,
			plan_random;

#define ACTIVE_MEMBERS \
	" FROM nocrm.assignment_counters c JOIN nocrm.users u ON u.id = c.user_id AND u.active" \
	" WHERE c.automation_id = $1 AND c.action_no = $2"

#define LOWEST_COUNT \
	" AND c.assigned = (SELECT min(c2.assigned) FROM nocrm.assignment_counters c2" \
	"                   JOIN nocrm.users u2 ON u2.id = c2.user_id AND u2.active" \
	"                   WHERE c2.automation_id = $1 AND c2.action_no = $2)"

#define OPEN_LEADS \
	"(SELECT count(*) FROM nocrm.leads l WHERE l.user_id = c.user_id" \
	" AND l.status IN ('todo', 'standby'))"

static bool
pick(SPIPlanPtr *slot, const char *sql, Rule *rule, RuleAction *action, int64 *user_id)
{
	Oid			types[2] = {INT4OID, INT4OID};
	Datum		args[2] = {Int32GetDatum(rule->id), Int32GetDatum(action->action_no)};
	int			ret;
	bool		isnull;

	nocrm_plan(slot, sql, 2, types);
	ret = SPI_execute_plan(*slot, args, NULL, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "choosing an assignee failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		return false;
	*user_id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
										   1, &isnull));
	return true;
}

static bool
any_active_member(Rule *rule, RuleAction *action)
{
	static SPIPlanPtr plan = NULL;
	int64		ignored;

	return pick(&plan, "SELECT c.user_id" ACTIVE_MEMBERS " LIMIT 1", rule, action, &ignored);
}

static void
bump(Rule *rule, RuleAction *action, int64 user_id)
{
	Oid			types[3] = {INT4OID, INT4OID, INT8OID};
	Datum		args[3] = {Int32GetDatum(rule->id), Int32GetDatum(action->action_no),
	Int64GetDatum(user_id)};
	int			ret;

	nocrm_plan(&plan_bump,
			   "UPDATE nocrm.assignment_counters SET assigned = assigned + 1"
			   " WHERE automation_id = $1 AND action_no = $2 AND user_id = $3",
			   3, types);
	ret = SPI_execute_plan(plan_bump, args, NULL, false, 0);
	if (ret != SPI_OK_UPDATE)
		elog(ERROR, "updating assignment counter failed: %s", SPI_result_code_string(ret));
}

static bool
pick_counted(Rule *rule, RuleAction *action, int64 *user_id)
{
	bool		balanced = action->kind == ACT_ASSIGN_BALANCED;

	for (;;)
	{
		CHECK_FOR_INTERRUPTS();
		if (balanced
			? pick(&plan_balanced_try,
				   "SELECT c.user_id" ACTIVE_MEMBERS
				   " ORDER BY " OPEN_LEADS ", c.assigned, c.position"
				   " FOR UPDATE OF c SKIP LOCKED LIMIT 1",
				   rule, action, user_id)
			: pick(&plan_rr_try,
				   "SELECT c.user_id" ACTIVE_MEMBERS LOWEST_COUNT
				   " ORDER BY c.position FOR UPDATE OF c SKIP LOCKED LIMIT 1",
				   rule, action, user_id))
			break;
		if (!any_active_member(rule, action))
			return false;

		/*
		 * Every candidate is in another transaction's hands: wait for one.
		 * After the wait the row may no longer be lowest; then look again
		 * with a new snapshot.
		 */
		if (balanced
			? pick(&plan_balanced_wait,
				   "SELECT c.user_id" ACTIVE_MEMBERS
				   " ORDER BY " OPEN_LEADS ", c.assigned, c.position"
				   " FOR UPDATE OF c LIMIT 1",
				   rule, action, user_id)
			: pick(&plan_rr_wait,
				   "SELECT c.user_id" ACTIVE_MEMBERS LOWEST_COUNT
				   " ORDER BY c.position FOR UPDATE OF c LIMIT 1",
				   rule, action, user_id))
			break;
	}
	bump(rule, action, *user_id);
	return true;
}

static bool
pick_random(Rule *rule, RuleAction *action, int64 *user_id)
{
	Oid			types[1] = {INT8ARRAYOID};
	Datum	   *elems = palloc(sizeof(Datum) * action->nusers);
	Datum		args[1];
	int			ret;
	bool		isnull;

	for (int i = 0; i < action->nusers; i++)
		elems[i] = Int64GetDatum(action->users[i]);
	args[0] = PointerGetDatum(construct_array(elems, action->nusers, INT8OID,
											  sizeof(int64), FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	nocrm_plan(&plan_random,
			   "SELECT id FROM nocrm.users WHERE id = ANY ($1) AND active"
			   " ORDER BY random() LIMIT 1",
			   1, types);
	ret = SPI_execute_plan(plan_random, args, NULL, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "choosing an assignee failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		return false;
	*user_id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
										   1, &isnull));
	return true;
}

int64
nocrm_pick_assignee(Rule *rule, RuleAction *action, LeadState *lead, bool *found)
{
	int64		user_id = 0;

	*found = action->kind == ACT_ASSIGN_RANDOM
		? pick_random(rule, action, &user_id)
		: pick_counted(rule, action, &user_id);
	return user_id;
}
