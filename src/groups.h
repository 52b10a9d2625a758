/*
 * groups.h — the SQL shared by the group assignment queries (assign.c,
 * group_pick.c): a group's available members and their load.
 */
#ifndef NOCRM_GROUPS_H
#define NOCRM_GROUPS_H

/*
 * Parameters of every group query: $1 automation, $2 action, $3 pending
 * increments by position, $4 ignore availability (fallback "anyone"),
 * $5 only members within their working hours.
 *
 * A member is available when active and, unless $4, not absent now, within
 * working hours if $5 (without hours of their own: the company calendar's,
 * is_working(NULL)), and under their cap of open leads.
 */
#define OPEN_LEADS(c) \
	"(SELECT count(*) FROM nocrm.leads l WHERE l.user_id = " c ".user_id" \
	" AND l.status IN ('todo', 'standby'))"

/* create_task's balanced groups balance open tasks instead */
#define OPEN_TASKS(c) \
	"(SELECT count(*) FROM nocrm.tasks k WHERE k.assignee_id = " c ".user_id" \
	" AND k.done_at IS NULL)"

#define NOT_ABSENT(u) \
	"  NOT EXISTS (SELECT 1 FROM nocrm.absences a WHERE a.user_id = " u ".id" \
	"              AND now() >= a.starts_at AND now() < a.ends_at)"

#define WITHIN_HOURS_IF_ASKED(u) \
	"  AND (NOT $5" \
	"       OR (NOT EXISTS (SELECT 1 FROM nocrm.working_hours w WHERE w.user_id = " u ".id)" \
	"           AND nocrm.is_working(NULL, now()))" \
	"       OR EXISTS (SELECT 1 FROM nocrm.working_hours w WHERE w.user_id = " u ".id" \
	"                  AND w.weekday = extract(isodow FROM now() AT TIME ZONE " u ".timezone)" \
	"                  AND (now() AT TIME ZONE " u ".timezone)::time >= w.starts" \
	"                  AND (now() AT TIME ZONE " u ".timezone)::time < w.ends))"

#define UNDER_CAP(c) \
	"  AND (" c ".cap IS NULL OR " OPEN_LEADS(c) " < " c ".cap)"

#define AVAILABLE(c, u) \
	" " u ".active AND ($4 OR (" NOT_ABSENT(u) WITHIN_HOURS_IF_ASKED(u) UNDER_CAP(c) "))"

/* The same for a pick with $5 false: no working-hours subplans to start on
 * every pick. */
#define AVAILABLE_ANY_TIME(c, u) \
	" " u ".active AND ($4 OR (" NOT_ABSENT(u) UNDER_CAP(c) "))"

/* counters: nocrm.assignment_counters, or (1.3) nocrm.group_counts, whose
 * assigned also counts the increments not folded yet */
#define MEMBERS_WHERE(counters, c, u, available) \
	" FROM " counters " " c " JOIN nocrm.users " u " ON " u ".id = " c ".user_id" \
	" WHERE " c ".automation_id = $1 AND " c ".action_no = $2 AND" available

/* ... and when no member has a cap: no open-lead count to start on every pick */
#define AVAILABLE_UNCAPPED(c, u) \
	" " u ".active AND ($4 OR " NOT_ABSENT(u) ")"

#define MEMBERS(counters, c, u)			MEMBERS_WHERE(counters, c, u, AVAILABLE(c, u))
#define MEMBERS_UNCAPPED(counters, c, u)	MEMBERS_WHERE(counters, c, u, AVAILABLE_UNCAPPED(c, u))
#define MEMBERS_ANY_TIME(counters, c, u)	MEMBERS_WHERE(counters, c, u, AVAILABLE_ANY_TIME(c, u))

#endif							/* NOCRM_GROUPS_H */
