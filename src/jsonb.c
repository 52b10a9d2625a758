/*
 * jsonb.c — small jsonb builders: {"key": value} pairs and keys of objects
 * built with pushJsonbValue.  Used by history, the run log and events.
 */
#include "nocrm.h"

#include "utils/builtins.h"
#include "utils/fmgrprotos.h"

/* {"key": scalar}, converted as one object (history writes one per row) */
static Jsonb *
jsonb_pair(const char *key, JsonbValue *value)
{
	JsonbPair	pair;
	JsonbValue	object;

	pair.key.type = jbvString;
	pair.key.val.string.val = (char *) key;
	pair.key.val.string.len = strlen(key);
	pair.value = *value;
	pair.order = 0;
	object.type = jbvObject;
	object.val.object.nPairs = 1;
	object.val.object.pairs = &pair;
	return JsonbValueToJsonb(&object);
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
