/*
 * lead.c — reading a lead row into the LeadState the rules look at.
 */
#include "nocrm.h"

#include "access/htup_details.h"
#include "utils/builtins.h"

int
nocrm_status_bit(const char *status)
{
	if (status == NULL)
		return 0;
	if (strcmp(status, "todo") == 0)
		return STATUS_TODO;
	if (strcmp(status, "standby") == 0)
		return STATUS_STANDBY;
	if (strcmp(status, "won") == 0)
		return STATUS_WON;
	if (strcmp(status, "lost") == 0)
		return STATUS_LOST;
	if (strcmp(status, "cancelled") == 0)
		return STATUS_CANCELLED;
	return 0;
}

static Datum
get_attr(HeapTuple tuple, TupleDesc desc, const char *col, bool *isnull)
{
	int			attno = SPI_fnumber(desc, col);

	if (attno <= 0)
		elog(ERROR, "nocrm.leads has no column \"%s\"", col);
	return heap_getattr(tuple, attno, desc, isnull);
}

static bool
get_int64(HeapTuple tuple, TupleDesc desc, const char *col, int64 *value)
{
	bool		isnull;
	Datum		d = get_attr(tuple, desc, col, &isnull);

	*value = isnull ? 0 : DatumGetInt64(d);
	return !isnull;
}

static const char *
get_text(HeapTuple tuple, TupleDesc desc, const char *col)
{
	bool		isnull;
	Datum		d = get_attr(tuple, desc, col, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

void
nocrm_lead_from_tuple(LeadState *lead, HeapTuple tuple, TupleDesc desc)
{
	memset(lead, 0, sizeof(LeadState));
	get_int64(tuple, desc, "id", &lead->id);
	lead->title = get_text(tuple, desc, "title");
	lead->status_text = get_text(tuple, desc, "status");
	lead->status = nocrm_status_bit(lead->status_text);
	lead->has_owner = get_int64(tuple, desc, "user_id", &lead->owner_id);
	lead->has_pipeline = get_int64(tuple, desc, "pipeline_id", &lead->pipeline_id);
	lead->has_step = get_int64(tuple, desc, "step_id", &lead->step_id);
	lead->contact_email = get_text(tuple, desc, "contact_email");
}

static bool
fetch(SPIPlanPtr *slot, const char *sql, int64 lead_id, LeadState *lead)
{
	Oid			argtypes[1] = {INT8OID};
	Datum		args[1] = {Int64GetDatum(lead_id)};
	int			ret;

	nocrm_plan(slot, sql, 1, argtypes);
	ret = SPI_execute_plan(*slot, args, NULL, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading lead failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		return false;
	nocrm_lead_from_tuple(lead, SPI_tuptable->vals[0], SPI_tuptable->tupdesc);
	return true;
}

/* Reads the lead as this command sees it; false if it no longer exists. */
bool
nocrm_lead_fetch(int64 lead_id, LeadState *lead)
{
	static SPIPlanPtr plan = NULL;

	return fetch(&plan,
				 "SELECT id, title, status, user_id, pipeline_id, step_id, contact_email"
				 " FROM nocrm.leads WHERE id = $1",
				 lead_id, lead);
}

/*
 * Locks the lead and reads its latest version: rules are then judged on
 * what other sessions committed, and their actions cannot be overtaken.
 */
bool
nocrm_lead_fetch_locked(int64 lead_id, LeadState *lead)
{
	static SPIPlanPtr plan = NULL;

	return fetch(&plan,
				 "SELECT id, title, status, user_id, pipeline_id, step_id, contact_email"
				 " FROM nocrm.leads WHERE id = $1 FOR NO KEY UPDATE",
				 lead_id, lead);
}
