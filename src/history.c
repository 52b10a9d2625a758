/*
 * history.c — writing nocrm.lead_history, and small jsonb builders for it.
 */
#include "nocrm.h"

#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/timestamp.h"

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

/* "key" of an object being built with pushJsonbValue */
void
nocrm_jsonb_key(JsonbParseState **state, const char *key)
{
	JsonbValue	k;

	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	pushJsonbValue(state, WJB_KEY, &k);
}

/* "key": "value" (value NULL gives JSON null) */
void
nocrm_jsonb_put_string(JsonbParseState **state, const char *key, const char *value)
{
	JsonbValue	v;

	nocrm_jsonb_key(state, key);
	v.type = value ? jbvString : jbvNull;
	if (value)
	{
		v.val.string.val = (char *) value;
		v.val.string.len = strlen(value);
	}
	pushJsonbValue(state, WJB_VALUE, &v);
}

/* "key": 123 */
void
nocrm_jsonb_put_int64(JsonbParseState **state, const char *key, int64 value)
{
	JsonbValue	v;

	nocrm_jsonb_key(state, key);
	v.type = jbvNumeric;
	v.val.numeric = DatumGetNumeric(DirectFunctionCall1(int8_numeric, Int64GetDatum(value)));
	pushJsonbValue(state, WJB_VALUE, &v);
}

/* "key": value (a jsonb embedded as it is, or null) */
void
nocrm_jsonb_put_jsonb(JsonbParseState **state, const char *key, Jsonb *value)
{
	JsonbValue	v;

	nocrm_jsonb_key(state, key);
	if (value)
	{
		v.type = jbvBinary;
		v.val.binary.data = &value->root;
		v.val.binary.len = VARSIZE(value) - VARHDRSZ;
	}
	else
		v.type = jbvNull;
	pushJsonbValue(state, WJB_VALUE, &v);
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

static WriteBuffer history_buffer = {
	.what = "writing lead history failed",
	.sql = "INSERT INTO nocrm.lead_history (lead_id, event, actor_id, automation_id,"
	"  stage_trigger_id, chain_depth, old_value, new_value, detail, created_at)"
	" SELECT r.lead_id, r.event, r.actor_id, r.automation_id, r.stage_trigger_id,"
	"        r.chain_depth, r.old_value, r.new_value, r.detail, r.created_at"
	"   FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) WITH ORDINALITY"
	"        AS r(lead_id, event, actor_id, automation_id, stage_trigger_id, chain_depth,"
	"             old_value, new_value, detail, created_at, ord)"
	"  ORDER BY r.ord",
	.ncols = 10,
	.types = {INT8OID, TEXTOID, INT8OID, INT4OID, INT4OID, INT4OID, JSONBOID, JSONBOID, TEXTOID,
	TIMESTAMPTZOID},
};

/*
 * Appends one history row (written in a batch, see writebuf.c).  The actor
 * and chain come from the dispatcher: inside an automation's chain the
 * actor is the Butler.  automation_id is an automation (> 0), a stage
 * trigger (< 0, minus its id) or none (0).
 */
void
nocrm_history(int64 lead_id, const char *event, int32 automation_id,
			  Jsonb *old_value, Jsonb *new_value, const char *detail)
{
	Datum		values[10];
	bool		nulls[10];
	int64		actor = nocrm_current_actor();

	memset(nulls, false, sizeof(nulls));
	values[0] = Int64GetDatum(lead_id);
	values[1] = CStringGetTextDatum(event);
	values[2] = Int64GetDatum(actor);
	nulls[2] = actor < 0;
	values[3] = Int32GetDatum(automation_id);
	nulls[3] = automation_id <= 0;
	values[4] = Int32GetDatum(-automation_id);
	nulls[4] = automation_id >= 0;
	values[5] = Int32GetDatum(nocrm_chain_depth());
	values[6] = JsonbPGetDatum(old_value);
	nulls[6] = old_value == NULL;
	values[7] = JsonbPGetDatum(new_value);
	nulls[7] = new_value == NULL;
	values[8] = detail ? CStringGetTextDatum(detail) : (Datum) 0;
	nulls[8] = detail == NULL;
	/* when it happened, not when the batch is written */
	values[9] = TimestampTzGetDatum(GetCurrentTimestamp());
	nocrm_buffer_row(&history_buffer, values, nulls);
}
