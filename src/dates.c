/*
 * dates.c — date rules (event lead.date.reached): "3 days before
 * next_action_at", "14 days after updated_at" — scheduled.
 *
 * A lead written with a new value in a rule's date column gets one pending
 * row in nocrm.date_firings, due at that value + the rule's date_offset,
 * replacing the pending row of the old value.  The drain fires what is due
 * (due.c).  The primary key (rule, lead, date value) makes each firing
 * happen once: a date set back to a value that already fired does not fire
 * again.
 */
#include "nocrm.h"

#include "access/htup_details.h"
#include "executor/tuptable.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"

static SPIPlanPtr plan_unschedule;
static SPIPlanPtr plan_schedule;

bool
nocrm_date_rules_exist(void)
{
	int			n;

	(void) nocrm_rules_for_event(EV_DATE_REACHED, &n);
	return n > 0;
}

/* The column's value as timestamptz; false past timestamptz's range. */
static bool
as_timestamptz(Oid typid, Datum value, TimestampTz *out)
{
	int			overflow = 0;

	switch (getBaseType(typid))
	{
		case DATEOID:
			*out = date2timestamptz_opt_overflow(DatumGetDateADT(value), &overflow);
			break;
		case TIMESTAMPOID:
			*out = timestamp2timestamptz_opt_overflow(DatumGetTimestamp(value), &overflow);
			break;
		default:
			*out = DatumGetTimestampTz(value);
			break;
	}
	return overflow == 0 && !TIMESTAMP_NOT_FINITE(*out);	/* infinity never falls due */
}

/* value + offset; false when that passes the end (or start) of time. */
static bool
due_time(TimestampTz value, Interval *offset, TimestampTz *due)
{
	MemoryContext oldcontext = CurrentMemoryContext;
	volatile bool ok = true;

	/* a pure computation: its only error is the overflow, nothing to clean up */
	PG_TRY();
	{
		*due = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
													   TimestampTzGetDatum(value),
													   IntervalPGetDatum(offset)));
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(oldcontext);
		FlushErrorState();
		ok = false;
	}
	PG_END_TRY();
	return ok;
}

/*
 * A firing for the value; none when the value or its due time is beyond
 * what timestamptz holds (it could never fall due).
 */
static void
schedule(Rule *rule, int64 lead_id, Datum value)
{
	Oid			argtypes[4] = {INT4OID, INT8OID, TIMESTAMPTZOID, TIMESTAMPTZOID};
	Datum		args[4];
	TimestampTz at,
				due;

	if (!as_timestamptz(rule->date_typid, value, &at) || !due_time(at, &rule->date_offset, &due))
		return;
	args[0] = Int32GetDatum(rule->id);
	args[1] = Int64GetDatum(lead_id);
	args[2] = TimestampTzGetDatum(at);
	args[3] = TimestampTzGetDatum(due);
	nocrm_plan(&plan_schedule,
			   "INSERT INTO nocrm.date_firings (automation_id, lead_id, date_value, due_at)"
			   " VALUES ($1, $2, $3, $4)"
			   " ON CONFLICT (automation_id, lead_id, date_value) DO NOTHING", 4, argtypes);
	nocrm_exec_plan(plan_schedule, args, NULL, SPI_OK_INSERT, "scheduling a date rule");
	/* the background worker may sleep past its due time otherwise */
	nocrm_wake_note_queued();
}

static void
unschedule(Rule *rule, int64 lead_id)
{
	Oid			argtypes[2] = {INT4OID, INT8OID};
	Datum		args[2] = {Int32GetDatum(rule->id), Int64GetDatum(lead_id)};

	nocrm_plan(&plan_unschedule,
			   "DELETE FROM nocrm.date_firings"
			   " WHERE automation_id = $1 AND lead_id = $2 AND state = 'pending'", 2, argtypes);
	nocrm_exec_plan(plan_unschedule, args, NULL, SPI_OK_DELETE, "rescheduling a date rule");
}

/* Date values compare as stored: these types are all passed by value. */
static bool
same_date(Datum a, bool anull, Datum b, bool bnull)
{
	return anull == bnull && (anull || a == b);
}

/*
 * A lead row inserted (oldtup NULL) or updated: (re)schedule the date rules
 * whose column it sets or changes.  Needs an SPI connection.
 */
void
nocrm_schedule_dates(int64 lead_id, HeapTuple oldtup, HeapTuple newtup, TupleDesc desc)
{
	int			n;
	Rule	  **rules = nocrm_rules_for_event(EV_DATE_REACHED, &n);

	/* the writes below may reload the cache: keep these rules alive */
	nocrm_rules_pin();
	PG_TRY();
	{
		for (int i = 0; i < n; i++)
		{
			Rule	   *rule = rules[i];
			bool		newnull,
						oldnull = true;
			Datum		new = heap_getattr(newtup, rule->date_attnum, desc, &newnull);
			Datum		old = oldtup ? heap_getattr(oldtup, rule->date_attnum, desc, &oldnull) : (Datum) 0;

			if (same_date(old, oldnull, new, newnull))
				continue;
			if (oldtup)
				unschedule(rule, lead_id);
			if (!newnull)
				schedule(rule, lead_id, new);
		}
	}
	PG_FINALLY();
	{
		nocrm_rules_unpin();
	}
	PG_END_TRY();
}

/* For the gate: does this row set or change a date rule's column? */
bool
nocrm_dates_row_changed(TupleTableSlot *oldslot, TupleTableSlot *newslot)
{
	int			n;
	Rule	  **rules = nocrm_rules_for_event(EV_DATE_REACHED, &n);

	for (int i = 0; i < n; i++)
	{
		bool		newnull,
					oldnull = true;
		Datum		new = slot_getattr(newslot, rules[i]->date_attnum, &newnull);
		Datum		old = oldslot ? slot_getattr(oldslot, rules[i]->date_attnum, &oldnull) : (Datum) 0;

		if (!same_date(old, oldnull, new, newnull))
			return true;
	}
	return false;
}
