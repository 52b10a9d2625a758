/*
 * events.c — trigger functions that turn row changes on leads, tags,
 * comments and emails into CRM events.
 */
#include "nocrm.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "executor/tuptable.h"
#include "miscadmin.h"
#include "utils/memutils.h"
#include "utils/tuplestore.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(nocrm_lead_before_trigger);
PG_FUNCTION_INFO_V1(nocrm_lead_event_trigger);
PG_FUNCTION_INFO_V1(nocrm_lead_statement_trigger);
PG_FUNCTION_INFO_V1(nocrm_tag_event_trigger);
PG_FUNCTION_INFO_V1(nocrm_comment_event_trigger);
PG_FUNCTION_INFO_V1(nocrm_email_event_trigger);

/* Columns that are workflow, not "content", for lead.content_has_changed. */
static const char *const workflow_columns[] = {
	"id", "pipeline_id", "step_id", "status", "user_id",
	"created_at", "updated_at", "closed_at", NULL
};

static bool
is_workflow_column(const char *name)
{
	for (int i = 0; workflow_columns[i]; i++)
		if (strcmp(workflow_columns[i], name) == 0)
			return true;
	return false;
}

static void
check_trigger(FunctionCallInfo fcinfo, const char *name, bool before)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "%s: not called by trigger manager", name);
	if (!TRIGGER_FIRED_FOR_ROW(trigdata->tg_event) ||
		TRIGGER_FIRED_BEFORE(trigdata->tg_event) != before)
		elog(ERROR, "%s: must be fired %s, for each row", name, before ? "before" : "after");
}

static bool
closed_status(const char *status)
{
	return (nocrm_status_bit(status) & STATUS_OPEN) == 0;
}

/*
 * BEFORE INSERT OR UPDATE ON nocrm.leads: keeps updated_at, closed_at and a
 * lead's place in its pipeline consistent, whoever writes the row, and
 * writes the owner a creation rule chose for a new lead.
 */
Datum
nocrm_lead_before_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	TupleDesc	desc;
	HeapTuple	newtup,
				oldtup = NULL;
	int			cols[5];
	Datum		vals[5];
	bool		nulls[5] = {false, false, false, false, false};
	int			ncols = 0;
	bool		changed = false;
	LeadState	newlead,
				oldlead;
	int			att_updated,
				att_closed;
	const LeadAttnums *attnums;
	Datum		now = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());

	check_trigger(fcinfo, "nocrm_lead_before_trigger", true);
	/* A restore loads the row as the source database wrote it (restore.c). */
	if (nocrm_restoring())
		return PointerGetDatum(TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event)
							   ? trigdata->tg_newtuple : trigdata->tg_trigtuple);
	desc = trigdata->tg_relation->rd_att;
	attnums = nocrm_lead_attnums(desc);
	att_updated = attnums->updated_at;
	att_closed = attnums->closed_at;

	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
	{
		nocrm_lead_note_write();
		oldtup = trigdata->tg_trigtuple;
		newtup = trigdata->tg_newtuple;
		for (int i = 1; i <= desc->natts && !changed; i++)
			if (!TupleDescAttr(desc, i - 1)->attisdropped && i != att_updated &&
				!nocrm_column_equal(oldtup, newtup, desc, i))
				changed = true;
		if (!changed)
			return PointerGetDatum(newtup);
		nocrm_lead_from_tuple(&oldlead, oldtup, desc);
		if (nocrm_column_equal(oldtup, newtup, desc, att_updated))
		{
			cols[ncols] = att_updated;
			vals[ncols++] = now;
		}
	}
	else if (TRIGGER_FIRED_BY_INSERT(trigdata->tg_event))
		newtup = trigdata->tg_trigtuple;
	else
		elog(ERROR, "nocrm_lead_before_trigger: must be fired for INSERT or UPDATE");

	nocrm_lead_from_tuple(&newlead, newtup, desc);

	/* Place the lead: a step implies its pipeline; a pipeline alone, its first step. */
	if (newlead.has_step && !newlead.has_pipeline)
	{
		int64		pipeline;

		nocrm_gate_caches_ready(false);
		if (nocrm_step_pipeline(newlead.step_id, &pipeline))
		{
			cols[ncols] = attnums->pipeline_id;
			vals[ncols++] = Int64GetDatum(pipeline);
			newlead.has_pipeline = true;
			newlead.pipeline_id = pipeline;
		}
	}
	else if (newlead.has_pipeline &&
			 (!newlead.has_step ||
			  (oldtup && oldlead.has_pipeline && oldlead.pipeline_id != newlead.pipeline_id &&
			   oldlead.has_step && newlead.step_id == oldlead.step_id)))
	{
		int64		step = 0;
		bool		found;

		nocrm_gate_caches_ready(false);
		found = nocrm_first_step(newlead.pipeline_id, &step);
		cols[ncols] = attnums->step_id;
		vals[ncols] = Int64GetDatum(step);
		nulls[ncols++] = !found;
		newlead.has_step = found;
		newlead.step_id = step;
	}

	/* A new lead's owner, when a creation rule can decide it now (preassign.c). */
	if (oldtup == NULL && !newlead.has_owner && attnums->id > 0)
	{
		int64		owner;
		bool		id_null;

		(void) heap_getattr(newtup, attnums->id, desc, &id_null);
		if (!id_null && nocrm_preassign_row(&newlead, trigdata->tg_relation, &owner))
		{
			cols[ncols] = attnums->user_id;
			vals[ncols++] = Int64GetDatum(owner);
		}
	}

	/*
	 * closed_at is stamped when a lead closes (unless the writer gives one)
	 * and cleared when it reopens; a closed lead always has one.
	 */
	{
		bool		was_closed = oldtup ? closed_status(oldlead.status_text) : false;
		bool		is_closed = closed_status(newlead.status_text);
		bool		closed_null;
		bool		set_by_writer;

		(void) heap_getattr(newtup, att_closed, desc, &closed_null);
		set_by_writer = oldtup ? !nocrm_column_equal(oldtup, newtup, desc, att_closed) : !closed_null;
		if (is_closed && ((!was_closed && !set_by_writer) || closed_null))
		{
			cols[ncols] = att_closed;
			vals[ncols++] = now;
		}
		else if (!is_closed && !closed_null)
		{
			cols[ncols] = att_closed;
			vals[ncols] = (Datum) 0;
			nulls[ncols++] = true;
		}
	}

	if (ncols > 0)
		newtup = heap_modify_tuple_by_cols(newtup, desc, ncols, cols, vals, nulls);
	return PointerGetDatum(newtup);
}

/* A column value as JSON: numbers and booleans as such, the rest as text. */
static void
column_jsonb(HeapTuple tuple, TupleDesc desc, int attno, JsonbValue *v)
{
	char	   *text = SPI_getvalue(tuple, desc, attno);

	if (text == NULL)
	{
		v->type = jbvNull;
		return;
	}
	switch (TupleDescAttr(desc, attno - 1)->atttypid)
	{
		case INT2OID:
		case INT4OID:
		case INT8OID:
		case NUMERICOID:
			if (strcmp(text, "NaN") != 0 && strstr(text, "Infinity") == NULL)
			{
				v->type = jbvNumeric;
				v->val.numeric = DatumGetNumeric(DirectFunctionCall3(numeric_in,
																	 CStringGetDatum(text),
																	 ObjectIdGetDatum(InvalidOid),
																	 Int32GetDatum(-1)));
				return;
			}
			break;
		case BOOLOID:
			v->type = jbvBool;
			v->val.boolean = text[0] == 't';
			return;
	}
	v->type = jbvString;
	v->val.string.val = text;
	v->val.string.len = strlen(text);
}

/* {"column": value, ...} of the tuple's columns flagged in mask */
static Jsonb *
columns_json(HeapTuple tuple, TupleDesc desc, bool *mask)
{
	JsonbParseState *state = NULL;

	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	for (int i = 1; i <= desc->natts; i++)
	{
		JsonbValue	k,
					v;

		if (!mask[i])
			continue;
		k.type = jbvString;
		k.val.string.val = NameStr(TupleDescAttr(desc, i - 1)->attname);
		k.val.string.len = strlen(k.val.string.val);
		pushJsonbValue(&state, WJB_KEY, &k);
		column_jsonb(tuple, desc, i, &v);
		pushJsonbValue(&state, WJB_VALUE, &v);
	}
	return JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_OBJECT, NULL));
}

static void
add_event(RaisedEvent *events, int *n, NocrmEvent event, Jsonb *old_value, Jsonb *new_value)
{
	memset(&events[*n], 0, sizeof(RaisedEvent));
	events[*n].event = event;
	events[*n].old_value = old_value;
	events[*n].new_value = new_value;
	events[*n].detail = NULL;
	(*n)++;
}

static Jsonb *
owner_json(LeadState *lead)
{
	return nocrm_jsonb_int_pair("user_id", lead->owner_id, !lead->has_owner);
}

/*
 * A lead inserted with a status or at a step "gets" there: when rules with
 * on_creation listen, it raises the *.changed.to event too, from nothing.
 */
static void
creation_changes(LeadState *lead, RaisedEvent *events, int *n)
{
	RaisedEvent *ev = &events[*n];

	memset(ev, 0, sizeof(*ev));
	ev->event = EV_STATUS_CHANGED;
	ev->to_status = lead->status;
	ev->at_creation = true;
	if (nocrm_rules_on_creation(ev))
	{
		ev->new_value = nocrm_jsonb_pair("status", lead->status_text);
		ev = &events[++(*n)];
	}
	if (!lead->has_step)
		return;
	memset(ev, 0, sizeof(*ev));
	ev->event = EV_STEP_CHANGED;
	ev->to_step = lead->step_id;
	ev->at_creation = true;
	if (nocrm_rules_on_creation(ev))
	{
		ev->new_value = nocrm_jsonb_int_pair("step_id", lead->step_id, false);
		(*n)++;
	}
}

/* The events of an UPDATE, in the documented order. */
static int
update_events(HeapTuple oldtup, HeapTuple newtup, TupleDesc desc,
			  LeadState *oldlead, LeadState *newlead, RaisedEvent *events)
{
	bool	   *changed = palloc0(sizeof(bool) * (desc->natts + 1));
	bool	   *content = palloc0(sizeof(bool) * (desc->natts + 1));
	bool		any = false,
				any_content = false;
	int			n = 0;
	int			att_updated = nocrm_lead_attnums(desc)->updated_at;
	int			att_closed = nocrm_lead_attnums(desc)->closed_at;

	/* updated_at and closed_at are bookkeeping the BEFORE trigger maintains, not events. */
	for (int i = 1; i <= desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i - 1);

		if (att->attisdropped || i == att_updated || i == att_closed ||
			nocrm_column_equal(oldtup, newtup, desc, i))
			continue;
		changed[i] = any = true;
		if (!is_workflow_column(NameStr(att->attname)))
			content[i] = any_content = true;
	}
	if (!any)
		return 0;

	if (oldlead->status != newlead->status)
	{
		add_event(events, &n, EV_STATUS_CHANGED,
				  nocrm_jsonb_pair("status", oldlead->status_text),
				  nocrm_jsonb_pair("status", newlead->status_text));
		events[n - 1].to_status = newlead->status;
	}
	if (newlead->has_step &&
		(!oldlead->has_step || oldlead->step_id != newlead->step_id))
	{
		add_event(events, &n, EV_STEP_CHANGED,
				  nocrm_jsonb_int_pair("step_id", oldlead->step_id, !oldlead->has_step),
				  nocrm_jsonb_int_pair("step_id", newlead->step_id, false));
		events[n - 1].to_step = newlead->step_id;
	}
	if (newlead->has_owner &&
		(!oldlead->has_owner || oldlead->owner_id != newlead->owner_id))
		add_event(events, &n, EV_ASSIGNED, owner_json(oldlead), owner_json(newlead));
	if (!newlead->has_owner && oldlead->has_owner)
		add_event(events, &n, EV_UNASSIGNED, owner_json(oldlead), owner_json(newlead));
	if (any_content)
		add_event(events, &n, EV_CONTENT_CHANGED,
				  columns_json(oldtup, desc, content), columns_json(newtup, desc, content));
	add_event(events, &n, EV_ANY_UPDATE,
			  columns_json(oldtup, desc, changed), columns_json(newtup, desc, changed));
	return n;
}

/* The row as to_jsonb() makes it: what placeholders read once the lead is gone. */
static Jsonb *
row_json(HeapTuple tuple, TupleDesc desc)
{
	Oid			type = desc->tdtypeid;
	Datum		row = heap_copy_tuple_as_datum(tuple, desc);
	bool		isnull;
	int			ret = SPI_execute_with_args("SELECT to_jsonb($1)", 1, &type, &row, NULL, true, 1);

	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "snapshot of a deleted lead failed: %s", SPI_result_code_string(ret));
	return DatumGetJsonbP(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * The events of one row change of nocrm.leads ('I', 'U' or 'D'; oldtup for
 * U and D, newtup for I and U), dispatched.  Needs an SPI connection.
 */
static void
lead_row_events(char op, HeapTuple oldtup, HeapTuple newtup, TupleDesc desc)
{
	LeadState	lead,
				oldlead;
	RaisedEvent events[EV_COUNT];
	int			nevents = 0;

	if (op == 'I')
	{
		nocrm_lead_from_tuple(&lead, newtup, desc);
		/* an owner chosen by a rule that has not run yet: until it runs, the lead has none */
		nocrm_preassign_seen(&lead);
		nocrm_preassign_hide_owner(&lead);
		add_event(events, &nevents, EV_CREATION, NULL,
				  nocrm_jsonb_pair("title", lead.title));
		creation_changes(&lead, events, &nevents);
		add_event(events, &nevents, lead.has_owner ? EV_ASSIGNED : EV_UNASSIGNED,
				  NULL, owner_json(&lead));
	}
	else if (op == 'D')
	{
		nocrm_lead_from_tuple(&lead, oldtup, desc);
		lead.deleted = true;
		lead.snapshot = row_json(oldtup, desc);
		add_event(events, &nevents, EV_DELETED,
				  nocrm_jsonb_pair("title", lead.title), NULL);
	}
	else
	{
		nocrm_lead_from_tuple(&oldlead, oldtup, desc);
		nocrm_lead_from_tuple(&lead, newtup, desc);
		nevents = update_events(oldtup, newtup, desc, &oldlead, &lead, events);
		/* both versions, for "changed" field conditions */
		for (int e = 0; e < nevents; e++)
		{
			events[e].old_row = oldtup;
			events[e].new_row = newtup;
			events[e].rows_desc = desc;
		}
	}

	/*
	 * An inserted or updated row is its lead's latest version, and this
	 * transaction holds its row lock: other rows' automations, which run
	 * first, only change their own leads.
	 */
	lead.latest_locked = !lead.deleted;
	if (op != 'D' && nocrm_automations_enabled && nocrm_date_rules_exist())
		nocrm_schedule_dates(lead.id, oldtup, newtup, desc);
	if (nevents > 0)
		nocrm_dispatch(&lead, events, nevents);
}

static char
trigger_op(TriggerData *trigdata)
{
	if (TRIGGER_FIRED_BY_INSERT(trigdata->tg_event))
		return 'I';
	if (TRIGGER_FIRED_BY_DELETE(trigdata->tg_event))
		return 'D';
	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
		return 'U';
	elog(ERROR, "nocrm: lead event trigger fired for an unexpected operation");
	return 0;
}

/*
 * AFTER INSERT OR UPDATE OR DELETE ON nocrm.leads, for each row (1.0 and
 * 1.1; 1.2 uses nocrm_lead_statement_trigger).
 */
Datum
nocrm_lead_event_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	char		op;

	check_trigger(fcinfo, "nocrm_lead_event_trigger", false);
	if (nocrm_restoring())
		return PointerGetDatum(NULL);
	op = trigger_op(trigdata);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	lead_row_events(op, op == 'I' ? NULL : trigdata->tg_trigtuple,
					op == 'I' ? trigdata->tg_trigtuple : op == 'U' ? trigdata->tg_newtuple : NULL,
					trigdata->tg_relation->rd_att);
	SPI_finish();
	return PointerGetDatum(NULL);
}

/* Was the row's owner chosen by a rule that has yet to run?  Then it is wanted. */
static bool
preassigned_row(TupleTableSlot *slot, const LeadAttnums *cols)
{
	bool		isnull;
	Datum		id;

	if (!nocrm_preassign_any())
		return false;
	id = slot_getattr(slot, cols->id, &isnull);
	return !isnull && nocrm_preassigned(DatumGetInt64(id)) != NULL;
}


/* Could a row of a bulk statement add tags quietly (tagset.c)? */
static bool
bulk_tags_possible(void)
{
	if (!nocrm_automations_enabled || nocrm_event_listened(EV_ANY_UPDATE))
		return false;
	for (int e = 0; e < EV_COUNT; e++)
	{
		int			n;
		Rule	  **rules = nocrm_rules_for_event((NocrmEvent) e, &n);

		for (int r = 0; r < n; r++)
			for (int a = 0; a < rules[r]->nactions; a++)
				if (rules[r]->actions[a].kind == ACT_ADD_TAGS)
					return true;
	}
	return false;
}

/* Loads the tags of the statement's next TAGSET_CHUNK leads. */
static void
load_tag_chunk(Tuplestorestate *table, int readptr, TupleTableSlot *slot, int attno)
{
	int64	   *ids = palloc(sizeof(int64) * TAGSET_CHUNK);
	int			n = 0;

	while (n < TAGSET_CHUNK && nocrm_transition_next(table, readptr, slot))
	{
		bool		isnull;
		Datum		id = slot_getattr(slot, attno, &isnull);

		if (!isnull)
			ids[n++] = DatumGetInt64(id);
		ExecClearTuple(slot);
	}
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	nocrm_tagset_load(ids, n);
	SPI_finish();
	pfree(ids);
}

/* A bulk statement's trigger owns the tag set; nested statements leave it alone. */
static bool tag_chunks_owned = false;

/*
 * AFTER INSERT, UPDATE or DELETE ON nocrm.leads, for each statement, with
 * its transition tables: each row that passes the gate has its events
 * dispatched, in the order the statement wrote the rows.
 *
 * Once per statement rather than per row: no after-trigger event per row
 * (a bulk statement's queue would hold one per lead), and the foreign key
 * checks of all rows have run before any automation runs (interleaved, the
 * checks' cached plans were re-planned for every row: the trigger pins
 * another search_path than the session's).
 */
Datum
nocrm_lead_statement_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	TupleDesc	desc;
	char		op;
	int			oldptr = 0,
				newptr = 0;
	TupleTableSlot *oldslot,
			   *newslot;
	MemoryContext rowcontext,
				caller = CurrentMemoryContext;
	const LeadAttnums *cols;
	int			aheadptr = 0;
	TupleTableSlot *aheadslot = NULL;
	int64		nrows = 0;

	if (!CALLED_AS_TRIGGER(fcinfo) || TRIGGER_FIRED_FOR_ROW(trigdata->tg_event) ||
		!TRIGGER_FIRED_AFTER(trigdata->tg_event))
		elog(ERROR, "nocrm_lead_statement_trigger: must be fired after, for each statement");
	op = trigger_op(trigdata);
	/* A restored row's events happened in the source database. */
	if (nocrm_restoring())
		return PointerGetDatum(NULL);
	if (op == 'D')
		nocrm_lead_note_write();
	desc = trigdata->tg_relation->rd_att;
	cols = nocrm_lead_attnums(desc);
	oldslot = op == 'I' ? NULL : nocrm_transition_reader(trigdata->tg_oldtable, desc, &oldptr);
	newslot = op == 'D' ? NULL : nocrm_transition_reader(trigdata->tg_newtable, desc, &newptr);
	if ((op != 'I' && oldslot == NULL) || (op != 'D' && newslot == NULL))
		elog(ERROR, "nocrm_lead_statement_trigger: the trigger must have its transition tables");
	rowcontext = AllocSetContextCreate(caller, "nocrm lead row", ALLOCSET_DEFAULT_SIZES);
	if (op != 'D' && !tag_chunks_owned &&
		tuplestore_tuple_count(trigdata->tg_newtable) >= TAGSET_MIN_ROWS && bulk_tags_possible())
	{
		aheadslot = nocrm_transition_reader(trigdata->tg_newtable, desc, &aheadptr);
		tag_chunks_owned = true;
	}

	PG_TRY();
	{
	for (;;)
	{
		HeapTuple	oldtup = NULL,
					newtup = NULL;

		CHECK_FOR_INTERRUPTS();
		/* a row read back from a spilled tuplestore lives in rowcontext: free it first */
		if (oldslot)
			ExecClearTuple(oldslot);
		if (newslot)
			ExecClearTuple(newslot);
		MemoryContextReset(rowcontext);
		MemoryContextSwitchTo(rowcontext);
		if (oldslot && !nocrm_transition_next(trigdata->tg_oldtable, oldptr, oldslot))
			break;
		/* OLD and NEW TABLE of an UPDATE hold each row's versions in the same order */
		if (newslot && !nocrm_transition_next(trigdata->tg_newtable, newptr, newslot))
			break;
		if (aheadslot && nrows++ % TAGSET_CHUNK == 0)
		{
			nocrm_tagset_settle();
			load_tag_chunk(trigdata->tg_newtable, aheadptr, aheadslot, cols->id);
		}
		nocrm_plans_note_row();
		if (!(op == 'I' && preassigned_row(newslot, cols)) &&
			!nocrm_lead_row_wanted(op, oldslot, newslot, cols))
			continue;
		if (oldslot)
			oldtup = ExecFetchSlotHeapTuple(oldslot, false, NULL);
		if (newslot)
			newtup = ExecFetchSlotHeapTuple(newslot, false, NULL);
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		lead_row_events(op, oldtup, newtup, desc);
		nocrm_gate_row_done();
		SPI_finish();
	}
	}
	PG_FINALLY();
	{
		nocrm_gate_row_done();
		if (aheadslot)
		{
			tag_chunks_owned = false;
			nocrm_tagset_forget();
		}
	}
	PG_END_TRY();
	MemoryContextSwitchTo(caller);
	if (aheadslot)
		ExecDropSingleTupleTableSlot(aheadslot);
	if (oldslot)
		ExecDropSingleTupleTableSlot(oldslot);
	if (newslot)
		ExecDropSingleTupleTableSlot(newslot);
	MemoryContextDelete(rowcontext);
	if (op == 'I')
		nocrm_preassign_statement_end();
	/* the statement's round-robin counts and batched rows */
	nocrm_flush_writes();
	return PointerGetDatum(NULL);
}

/* Will the dispatcher look at more than the lead's id for this event? */
static bool
lead_needed(NocrmEvent event)
{
	int			n;

	if (!nocrm_automations_enabled)
		return false;
	(void) nocrm_rules_for_event(event, &n);
	return n > 0 || nocrm_stage_triggers_exist();
}

/*
 * Shared by the tags, comments and emails triggers: raise one event on the
 * lead of the given row, unless the lead itself is being deleted (cascade).
 */
static void
child_row_event(TriggerData *trigdata, HeapTuple tuple, NocrmEvent event,
				const char *column, const char *key, const char *detail, bool removed)
{
	TupleDesc	desc = trigdata->tg_relation->rd_att;
	char	   *value = SPI_getvalue(tuple, desc, SPI_fnumber(desc, column));
	bool		isnull;
	Datum		lead_id = heap_getattr(tuple, SPI_fnumber(desc, "lead_id"), desc, &isnull);
	LeadState	lead;
	RaisedEvent ev;

	if (isnull)
		return;
	if (!removed && !lead_needed(event))
	{
		/*
		 * Only history listens, and it needs the id: the row's foreign key
		 * vouches that the lead exists.  (A removal may be the cascade of
		 * the lead's own deletion: that one is checked.)
		 */
		memset(&lead, 0, sizeof(lead));
		lead.id = DatumGetInt64(lead_id);
	}
	else if (!nocrm_lead_fetch(DatumGetInt64(lead_id), &lead))
		return;
	memset(&ev, 0, sizeof(ev));
	ev.event = event;
	ev.old_value = removed ? nocrm_jsonb_pair(key, value) : NULL;
	ev.new_value = removed ? NULL : nocrm_jsonb_pair(key, value);
	ev.detail = detail;
	nocrm_dispatch(&lead, &ev, 1);
}

static Datum
child_trigger(FunctionCallInfo fcinfo, const char *name, NocrmEvent event,
			  const char *column, const char *key, const char *detail)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	check_trigger(fcinfo, name, false);
	if (nocrm_restoring())
		return PointerGetDatum(NULL);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	child_row_event(trigdata, trigdata->tg_trigtuple, event, column, key, detail, false);
	SPI_finish();
	return PointerGetDatum(NULL);
}

/*
 * AFTER INSERT OR UPDATE OR DELETE ON nocrm.tags: a tag change is a
 * lead.any_update; an UPDATE of a tag is its removal plus an addition.
 */
Datum
nocrm_tag_event_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	check_trigger(fcinfo, "nocrm_tag_event_trigger", false);
	if (nocrm_restoring())
		return PointerGetDatum(NULL);
	nocrm_plans_note_row();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (TRIGGER_FIRED_BY_INSERT(trigdata->tg_event))
		child_row_event(trigdata, trigdata->tg_trigtuple, EV_ANY_UPDATE,
						"name", "tag", "tag added", false);
	else if (TRIGGER_FIRED_BY_DELETE(trigdata->tg_event))
		child_row_event(trigdata, trigdata->tg_trigtuple, EV_ANY_UPDATE,
						"name", "tag", "tag removed", true);
	else
	{
		TupleDesc	desc = trigdata->tg_relation->rd_att;

		if (!nocrm_column_equal(trigdata->tg_trigtuple, trigdata->tg_newtuple, desc,
						  SPI_fnumber(desc, "name")) ||
			!nocrm_column_equal(trigdata->tg_trigtuple, trigdata->tg_newtuple, desc,
						  SPI_fnumber(desc, "lead_id")))
		{
			child_row_event(trigdata, trigdata->tg_trigtuple, EV_ANY_UPDATE,
							"name", "tag", "tag removed", true);
			child_row_event(trigdata, trigdata->tg_newtuple, EV_ANY_UPDATE,
							"name", "tag", "tag added", false);
		}
	}
	SPI_finish();
	return PointerGetDatum(NULL);
}

/* AFTER INSERT ON nocrm.comments; only automations write as the Butler. */
Datum
nocrm_comment_event_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	/* (a restore loads the Butler's comments the source's automations wrote) */
	if (CALLED_AS_TRIGGER(fcinfo) && nocrm_chain_depth() == 0 && !nocrm_restoring())
	{
		TupleDesc	desc = trigdata->tg_relation->rd_att;
		bool		isnull;
		Datum		author = heap_getattr(trigdata->tg_trigtuple, SPI_fnumber(desc, "user_id"),
										  desc, &isnull);

		if (!isnull && DatumGetInt64(author) == BUTLER_ID)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("only automations comment as The Butler"),
					 errdetail("Comments by user %d are the Butler's, written by automations.", BUTLER_ID),
					 errhint("Write the comment as the person making it.")));
	}
	return child_trigger(fcinfo, "nocrm_comment_event_trigger", EV_COMMENTED,
						 "body", "comment", NULL);
}

/* AFTER INSERT ON nocrm.emails */
Datum
nocrm_email_event_trigger(PG_FUNCTION_ARGS)
{
	return child_trigger(fcinfo, "nocrm_email_event_trigger", EV_EMAIL_RECEIVED,
						 "subject", "subject", NULL);
}
