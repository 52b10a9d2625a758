/*
 * history.c — writing nocrm.lead_history, and small jsonb builders for it.
 */
#include "nocrm.h"

#include "utils/builtins.h"
#include "utils/fmgrprotos.h"

/* {"key": value} */
static Jsonb *
jsonb_pair(const char *key, JsonbValue *value)
{
	JsonbParseState *state = NULL;
	JsonbValue	k;

	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	pushJsonbValue(&state, WJB_KEY, &k);
	pushJsonbValue(&state, WJB_VALUE, value);
	return JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_OBJECT, NULL));
}

/* {"key": "value"} (value NULL gives JSON null) */
Jsonb *
nocrm_jsonb_pair(const char *key, const char *value)
{
	JsonbValue	v;

	v.type = value ? jbvString : jbvNull;
	if (value)
	{
		v.val.string.val = (char *) value;
		v.val.string.len = strlen(value);
	}
	return jsonb_pair(key, &v);
}

/* {"key": 123} (or null) */
Jsonb *
nocrm_jsonb_int_pair(const char *key, int64 value, bool isnull)
{
	JsonbValue	v;

	v.type = isnull ? jbvNull : jbvNumeric;
	if (!isnull)
		v.val.numeric = DatumGetNumeric(DirectFunctionCall1(int8_numeric,
															Int64GetDatum(value)));
	return jsonb_pair(key, &v);
}

/*
 * Appends one history row.  The actor and chain come from the dispatcher:
 * inside an automation's chain the actor is the Butler.  automation_id is
 * an automation (> 0), a stage trigger (< 0, minus its id) or none (0).
 */
void
nocrm_history(int64 lead_id, const char *event, int32 automation_id,
			  Jsonb *old_value, Jsonb *new_value, const char *detail)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[9] = {INT8OID, TEXTOID, INT8OID, INT4OID, INT4OID,
	JSONBOID, JSONBOID, TEXTOID, INT4OID};
	Datum		args[9];
	char		nulls[9];
	int64		actor;

	nocrm_plan(&plan,
			   "INSERT INTO nocrm.lead_history"
			   " (lead_id, event, actor_id, automation_id, chain_depth, old_value, new_value, detail,"
			   "  stage_trigger_id)"
			   " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
			   9, types);

	memset(nulls, ' ', sizeof(nulls));
	actor = nocrm_current_actor();
	args[0] = Int64GetDatum(lead_id);
	args[1] = CStringGetTextDatum(event);
	args[2] = Int64GetDatum(actor);
	if (actor < 0)
		nulls[2] = 'n';
	/* automation_id < 0 names a stage trigger (the chain's convention). */
	args[3] = Int32GetDatum(automation_id);
	if (automation_id <= 0)
		nulls[3] = 'n';
	args[8] = Int32GetDatum(-automation_id);
	if (automation_id >= 0)
		nulls[8] = 'n';
	args[4] = Int32GetDatum(nocrm_chain_depth());
	args[5] = old_value ? JsonbPGetDatum(old_value) : (Datum) 0;
	if (old_value == NULL)
		nulls[5] = 'n';
	args[6] = new_value ? JsonbPGetDatum(new_value) : (Datum) 0;
	if (new_value == NULL)
		nulls[6] = 'n';
	args[7] = detail ? CStringGetTextDatum(detail) : (Datum) 0;
	if (detail == NULL)
		nulls[7] = 'n';

	nocrm_exec_plan(plan, args, nulls, SPI_OK_INSERT, "writing lead history failed");
}
