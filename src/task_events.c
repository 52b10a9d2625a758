/*
 * task_events.c — the events of nocrm.tasks: task.created and
 * task.completed from the statement triggers on the table (transition
 * tables, as for leads), task.overdue found by each drain round through the
 * partial index on due_at and raised once per task (overdue_at remembers).
 *
 * A task's events are raised on its lead: rules on them judge their
 * conditions on that lead and act on it.
 */
#include "nocrm.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "executor/tuptable.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

PG_FUNCTION_INFO_V1(nocrm_task_statement_trigger);
PG_FUNCTION_INFO_V1(nocrm_raise_overdue_tasks_sql);

/* What the events carry of a task. */
typedef struct TaskRow
{
	int64		id;
	int64		lead_id;
	const char *title;
	bool		has_assignee;
	int64		assignee_id;
	bool		has_due;
	TimestampTz due_at;
	bool		done;
	TimestampTz done_at;
} TaskRow;

static Datum
column(TupleTableSlot *slot, const char *name, bool *isnull)
{
	int			attnum = SPI_fnumber(slot->tts_tupleDescriptor, name);

	if (attnum <= 0)
		elog(ERROR, "nocrm.tasks has no column %s", name);
	return slot_getattr(slot, attnum, isnull);
}

static void
task_from_slot(TupleTableSlot *slot, TaskRow *t)
{
	bool		isnull;
	Datum		d;

	t->id = DatumGetInt64(column(slot, "id", &isnull));
	t->lead_id = DatumGetInt64(column(slot, "lead_id", &isnull));
	t->title = TextDatumGetCString(column(slot, "title", &isnull));
	d = column(slot, "assignee_id", &isnull);
	t->has_assignee = !isnull;
	t->assignee_id = isnull ? 0 : DatumGetInt64(d);
	d = column(slot, "due_at", &isnull);
	t->has_due = !isnull;
	t->due_at = isnull ? 0 : DatumGetTimestampTz(d);
	d = column(slot, "done_at", &isnull);
	t->done = !isnull;
	t->done_at = isnull ? 0 : DatumGetTimestampTz(d);
}

static void
put_time(JsonbParseState **state, const char *key, bool has, TimestampTz t)
{
	char		buf[MAXDATELEN + 1];

	if (has)
		nocrm_jsonb_put_string(state, key, JsonEncodeDateTime(buf, TimestampTzGetDatum(t),
															   TIMESTAMPTZOID, NULL));
	else
		nocrm_jsonb_put_string(state, key, NULL);
}

/* {"task_id": ..., "title": ..., "assignee_id": ..., "due_at": ... [, "done_at": ...]} */
static Jsonb *
task_json(TaskRow *t, bool with_done)
{
	JsonbParseState *state = NULL;

	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	nocrm_jsonb_put_int64(&state, "task_id", t->id);
	nocrm_jsonb_put_string(&state, "title", t->title);
	if (t->has_assignee)
		nocrm_jsonb_put_int64(&state, "assignee_id", t->assignee_id);
	else
		nocrm_jsonb_put_string(&state, "assignee_id", NULL);
	put_time(&state, "due_at", t->has_due, t->due_at);
	if (with_done)
		put_time(&state, "done_at", t->done, t->done_at);
	return JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_OBJECT, NULL));
}

/* Raises one event of a task on its lead.  Needs an SPI connection. */
static void
raise_on_lead(TaskRow *t, NocrmEvent event)
{
	LeadState	lead;
	RaisedEvent ev;

	if (!nocrm_lead_fetch(t->lead_id, &lead))
		return;					/* the lead is going (its cascade) */
	memset(&ev, 0, sizeof(ev));
	ev.event = event;
	ev.new_value = task_json(t, event == EV_TASK_COMPLETED);
	nocrm_dispatch(&lead, &ev, 1);
}

static TupleTableSlot *
reader(Tuplestorestate *table, TupleDesc desc, int *readptr)
{
	if (table == NULL)
		elog(ERROR, "nocrm_task_statement_trigger: the trigger must have its transition tables");
	return nocrm_transition_reader(table, desc, readptr);
}

/*
 * AFTER INSERT or UPDATE ON nocrm.tasks, for each statement: task.created
 * for each new row (and task.completed when it comes done), task.completed
 * for each row whose done_at went from NULL to a value, in the order the
 * statement wrote them.
 */
Datum
nocrm_task_statement_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	bool		insert;
	TupleDesc	desc;
	int			oldptr = 0,
				newptr = 0;
	TupleTableSlot *oldslot = NULL,
			   *newslot;
	MemoryContext rowcontext,
				caller = CurrentMemoryContext;
	bool		wanted;

	if (!CALLED_AS_TRIGGER(fcinfo) || TRIGGER_FIRED_FOR_ROW(trigdata->tg_event) ||
		!TRIGGER_FIRED_AFTER(trigdata->tg_event) || TRIGGER_FIRED_BY_DELETE(trigdata->tg_event))
		elog(ERROR, "nocrm_task_statement_trigger: must be fired after INSERT or UPDATE, for each statement");
	/* a restored task's events happened in the source database */
	if (nocrm_restoring())
		return PointerGetDatum(NULL);
	insert = TRIGGER_FIRED_BY_INSERT(trigdata->tg_event);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	/* the gate: nothing records or listens to task events, nothing to do */
	wanted = nocrm_event_listened(EV_TASK_COMPLETED) || (insert && nocrm_event_listened(EV_TASK_CREATED));
	if (!wanted && nocrm_chain_depth() == 0)
		(void) nocrm_current_actor();	/* a bad nocrm.actor is an error either way */
	SPI_finish();
	if (!wanted)
		return PointerGetDatum(NULL);
	desc = trigdata->tg_relation->rd_att;
	newslot = reader(trigdata->tg_newtable, desc, &newptr);
	if (!insert)
		oldslot = reader(trigdata->tg_oldtable, desc, &oldptr);
	rowcontext = AllocSetContextCreate(caller, "nocrm task row", ALLOCSET_DEFAULT_SIZES);
	for (;;)
	{
		TaskRow		task;

		CHECK_FOR_INTERRUPTS();
		ExecClearTuple(newslot);
		if (oldslot)
			ExecClearTuple(oldslot);
		MemoryContextReset(rowcontext);
		MemoryContextSwitchTo(rowcontext);
		if (oldslot && !nocrm_transition_next(trigdata->tg_oldtable, oldptr, oldslot))
			break;
		if (!nocrm_transition_next(trigdata->tg_newtable, newptr, newslot))
			break;
		task_from_slot(newslot, &task);
		if (!insert)
		{
			bool		was_open;

			(void) column(oldslot, "done_at", &was_open);
			if (!task.done || !was_open)
				continue;
		}
		/* one SPI connection per row: its results go with the row */
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		if (insert)
			raise_on_lead(&task, EV_TASK_CREATED);
		if (task.done)
			raise_on_lead(&task, EV_TASK_COMPLETED);
		SPI_finish();
	}
	MemoryContextSwitchTo(caller);
	ExecDropSingleTupleTableSlot(newslot);
	if (oldslot)
		ExecDropSingleTupleTableSlot(oldslot);
	MemoryContextDelete(rowcontext);
	/* the statement's batched history and run log rows */
	nocrm_flush_writes();
	return PointerGetDatum(NULL);
}

static SPIPlanPtr plan_overdue,
			plan_mark;

static void
mark_overdue(int64 task_id)
{
	Oid			types[1] = {INT8OID};
	Datum		args[1] = {Int64GetDatum(task_id)};

	nocrm_plan(&plan_mark, "UPDATE nocrm.tasks SET overdue_at = now() WHERE id = $1", 1, types);
	nocrm_exec_plan(plan_mark, args, NULL, SPI_OK_UPDATE, "marking a task overdue");
}

/* One task's overdue round, in its subtransaction. */
static void
raise_overdue(void *arg)
{
	TaskRow    *task = arg;

	mark_overdue(task->id);
	raise_on_lead(task, EV_TASK_OVERDUE);
	nocrm_flush_writes();
}

/*
 * Raises task.overdue for up to max open tasks whose due_at has passed and
 * that were not raised yet, oldest first, each in a subtransaction of its
 * own: a failing rule rolls back its own work only, and the task is marked
 * anyway (raised once), with the error in the lead's history.  Tasks
 * another drain holds are skipped.  Returns how many were handled.  Needs
 * an SPI connection.
 */
int
nocrm_raise_overdue_tasks(int max)
{
	Oid			types[1] = {INT4OID};
	Datum		args[1] = {Int32GetDatum(max)};
	TaskRow    *tasks;
	uint64		n;
	int			ret;

	if (max <= 0 || !nocrm_table_exists("tasks")	/* (came with 1.3) */)
		return 0;
	/* the partial index tasks_overdue_idx: open, not yet raised, by due_at */
	nocrm_plan(&plan_overdue,
			   "SELECT id, lead_id, title, assignee_id, due_at, done_at FROM nocrm.tasks"
			   " WHERE done_at IS NULL AND overdue_at IS NULL AND due_at <= now()"
			   " ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED", 1, types);
	ret = SPI_execute_plan(plan_overdue, args, NULL, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading overdue tasks failed: %s", SPI_result_code_string(ret));
	n = SPI_processed;
	tasks = palloc(sizeof(TaskRow) * (n + 1));
	for (uint64 i = 0; i < n; i++)
	{
		HeapTuple	t = SPI_tuptable->vals[i];
		TupleDesc	d = SPI_tuptable->tupdesc;
		bool		isnull;
		Datum		v;

		tasks[i].id = DatumGetInt64(SPI_getbinval(t, d, 1, &isnull));
		tasks[i].lead_id = DatumGetInt64(SPI_getbinval(t, d, 2, &isnull));
		tasks[i].title = SPI_getvalue(t, d, 3);
		v = SPI_getbinval(t, d, 4, &isnull);
		tasks[i].has_assignee = !isnull;
		tasks[i].assignee_id = isnull ? 0 : DatumGetInt64(v);
		tasks[i].has_due = true;
		tasks[i].due_at = DatumGetTimestampTz(SPI_getbinval(t, d, 5, &isnull));
		tasks[i].done = false;
	}
	SPI_freetuptable(SPI_tuptable);

	for (uint64 i = 0; i < n; i++)
	{
		ErrorData  *edata;

		CHECK_FOR_INTERRUPTS();
		edata = nocrm_in_subtransaction(raise_overdue, &tasks[i], NULL);
		if (edata != NULL)
		{
			if (edata->sqlerrcode == ERRCODE_QUERY_CANCELED)
				ReThrowError(edata);	/* the drain was cancelled: raised next round */
			ereport(WARNING,
					(errmsg("nocrm: task.overdue of task %lld failed: %s",
							(long long) tasks[i].id, edata->message)));
			mark_overdue(tasks[i].id);
			if (nocrm_history_level != HISTORY_NONE)
			{
				nocrm_history(tasks[i].lead_id, "task.overdue", 0, NULL, task_json(&tasks[i], false),
							  psprintf("failed: %s", edata->message));
				nocrm_flush_writes();
			}
			FreeErrorData(edata);
		}
	}
	return (int) n;
}

/* nocrm.raise_overdue_tasks(max integer DEFAULT 100): what each drain round does. */
Datum
nocrm_raise_overdue_tasks_sql(PG_FUNCTION_ARGS)
{
	int			max = PG_ARGISNULL(0) ? 100 : PG_GETARG_INT32(0);
	int			n;

	if (max < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max must not be negative")));
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	n = nocrm_raise_overdue_tasks(max);
	SPI_finish();
	PG_RETURN_INT32(n);
}
