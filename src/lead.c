/*
 * lead.c — reading a lead row into the LeadState the rules look at.
 */
#include "nocrm.h"

#include "access/htup_details.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "catalog/namespace.h"
#include "utils/lsyscache.h"
#include "utils/typcache.h"

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

/*
 * Attribute numbers of nocrm.leads, looked up by name once: every trigger
 * call reads a row, and SPI_fnumber compares names column by column.  Kept
 * for the table's row type until its relcache entry is invalidated (ALTER
 * TABLE); a query result's descriptor (a RECORD) is looked up each time.
 */
static LeadAttnums table_attnums;
static Oid	table_attnums_relid = InvalidOid;

static void
lead_attnums_callback(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == table_attnums_relid)
		table_attnums_relid = InvalidOid;
}

void
nocrm_lead_init(void)
{
	CacheRegisterRelcacheCallback(lead_attnums_callback, (Datum) 0);
}

static int
attnum_of(TupleDesc desc, const char *col, bool required)
{
	int			attno = SPI_fnumber(desc, col);

	if (attno <= 0 && required)
		elog(ERROR, "nocrm.leads has no column \"%s\"", col);
	return attno;
}

/*
 * The engine reads and writes these columns as the install script made
 * them: after an ALTER TABLE that changed one's type, every write of a lead
 * is refused with this error rather than storing a value of another type.
 */
static void
check_type(TupleDesc desc, int attno, Oid expected)
{
	Form_pg_attribute att;

	if (attno <= 0)
		return;
	att = TupleDescAttr(desc, attno - 1);
	if (getBaseType(att->atttypid) != expected)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("column %s of nocrm.leads is %s, and nocrm_automation needs %s",
						NameStr(att->attname), format_type_be(att->atttypid), format_type_be(expected)),
				 errhint("ALTER TABLE nocrm.leads ALTER COLUMN %s TYPE %s restores it.",
						 NameStr(att->attname), format_type_be(expected))));
}

static void
lookup_attnums(TupleDesc desc, LeadAttnums *a, bool table)
{
	a->id = attnum_of(desc, "id", true);
	a->title = attnum_of(desc, "title", true);
	a->status = attnum_of(desc, "status", true);
	a->user_id = attnum_of(desc, "user_id", true);
	a->pipeline_id = attnum_of(desc, "pipeline_id", true);
	a->step_id = attnum_of(desc, "step_id", true);
	a->contact_email = attnum_of(desc, "contact_email", true);
	a->updated_at = attnum_of(desc, "updated_at", table);
	a->closed_at = attnum_of(desc, "closed_at", table);
	if (!table)
		return;
	check_type(desc, a->id, INT8OID);
	check_type(desc, a->title, TEXTOID);
	check_type(desc, a->status, TEXTOID);
	check_type(desc, a->user_id, INT8OID);
	check_type(desc, a->pipeline_id, INT8OID);
	check_type(desc, a->step_id, INT8OID);
	check_type(desc, a->contact_email, TEXTOID);
	check_type(desc, a->updated_at, TIMESTAMPTZOID);
	check_type(desc, a->closed_at, TIMESTAMPTZOID);
}

const LeadAttnums *
nocrm_lead_attnums(TupleDesc desc)
{
	static LeadAttnums scratch;
	Oid			relid;

	if (desc->tdtypeid == RECORDOID || !OidIsValid(desc->tdtypeid))
	{
		lookup_attnums(desc, &scratch, false);
		return &scratch;
	}
	relid = get_typ_typrelid(desc->tdtypeid);
	if (!OidIsValid(relid) || relid != table_attnums_relid)
	{
		lookup_attnums(desc, &table_attnums, true);
		table_attnums_relid = relid;
	}
	return &table_attnums;
}

static bool
get_int64(HeapTuple tuple, TupleDesc desc, int attno, int64 *value)
{
	bool		isnull;
	Datum		d = heap_getattr(tuple, attno, desc, &isnull);

	*value = isnull ? 0 : DatumGetInt64(d);
	return !isnull;
}

static const char *
get_text(HeapTuple tuple, TupleDesc desc, int attno)
{
	bool		isnull;
	Datum		d = heap_getattr(tuple, attno, desc, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

void
nocrm_lead_from_tuple(LeadState *lead, HeapTuple tuple, TupleDesc desc)
{
	const LeadAttnums *a = nocrm_lead_attnums(desc);

	memset(lead, 0, sizeof(LeadState));
	/* a row of the table itself (a trigger's): field conditions read it in place */
	if (desc->tdtypeid != RECORDOID && OidIsValid(desc->tdtypeid))
	{
		lead->row = tuple;
		lead->row_desc = desc;
	}
	get_int64(tuple, desc, a->id, &lead->id);
	lead->title = get_text(tuple, desc, a->title);
	lead->status_text = get_text(tuple, desc, a->status);
	lead->status = nocrm_status_bit(lead->status_text);
	lead->has_owner = get_int64(tuple, desc, a->user_id, &lead->owner_id);
	lead->has_pipeline = get_int64(tuple, desc, a->pipeline_id, &lead->pipeline_id);
	lead->has_step = get_int64(tuple, desc, a->step_id, &lead->step_id);
	lead->contact_email = get_text(tuple, desc, a->contact_email);
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

Oid
nocrm_leads_relid(void)
{
	return get_relname_relid("leads", get_namespace_oid("nocrm", false));
}

/*
 * The whole row, in the table's layout (attnums as in pg_attribute, which
 * field conditions hold), read once when the lead came from a query.  NULL
 * if the lead no longer exists.
 */
HeapTuple
nocrm_lead_row(LeadState *lead, TupleDesc *desc)
{
	static SPIPlanPtr plan = NULL;
	Oid			argtypes[1] = {INT8OID};
	Datum		args[1] = {Int64GetDatum(lead->id)};
	bool		isnull;
	Datum		d;
	HeapTupleHeader header;
	HeapTuple	row;
	int			ret;

	if (lead->row == NULL && !lead->deleted)
	{
		nocrm_plan(&plan, "SELECT l FROM nocrm.leads l WHERE l.id = $1", 1, argtypes);
		ret = SPI_execute_plan(plan, args, NULL, false, 1);	/* sees this statement's writes */
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "reading lead failed: %s", SPI_result_code_string(ret));
		if (SPI_processed == 0)
			return NULL;
		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
		header = DatumGetHeapTupleHeader(d);
		row = palloc(HEAPTUPLESIZE + HeapTupleHeaderGetDatumLength(header));
		row->t_len = HeapTupleHeaderGetDatumLength(header);
		ItemPointerSetInvalid(&row->t_self);
		row->t_tableOid = InvalidOid;
		row->t_data = (HeapTupleHeader) ((char *) row + HEAPTUPLESIZE);
		memcpy(row->t_data, header, row->t_len);
		lead->row = row;
		lead->row_desc = lookup_rowtype_tupdesc_copy(HeapTupleHeaderGetTypeId(header),
													 HeapTupleHeaderGetTypMod(header));
	}
	*desc = lead->row_desc;
	return lead->row;
}

/*
 * Lead rows written or deleted so far (any source: actions, stage triggers,
 * users' own triggers).  The dispatcher reads a lead again after a rule only
 * when this moved: a rule that only notified or queued mail changed nothing.
 */
static uint64 lead_writes = 0;

void
nocrm_lead_note_write(void)
{
	lead_writes++;
}

uint64
nocrm_lead_write_count(void)
{
	return lead_writes;
}
