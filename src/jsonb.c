/*
 * jsonb.c — small jsonb builders: {"key": value} pairs and keys of objects
 * built with pushJsonbValue.  Used by history, the run log and events.
 */
#include "nocrm.h"

#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/memutils.h"

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

/*
 * The last few {"key": 123} made: a bulk statement's history rows repeat a
 * handful of them (the members of a group, a step) for every lead.
 */
#define INT_PAIRS_KEPT	8

typedef struct IntPair
{
	char		key[NAMEDATALEN];
	int64		value;
	bool		isnull;
	Jsonb	   *jsonb;			/* in TopMemoryContext; NULL = free */
} IntPair;

static IntPair int_pairs[INT_PAIRS_KEPT];
static int	next_int_pair = 0;

/* {"key": 123} (or null), a copy of its own in the current memory context */
Jsonb *
nocrm_jsonb_int_pair(const char *key, int64 value, bool isnull)
{
	JsonbValue	v;
	Jsonb	   *made;
	IntPair    *kept;

	for (int i = 0; i < INT_PAIRS_KEPT; i++)
		if (int_pairs[i].jsonb && int_pairs[i].value == value && int_pairs[i].isnull == isnull &&
			strcmp(int_pairs[i].key, key) == 0)
		{
			made = palloc(VARSIZE(int_pairs[i].jsonb));
			memcpy(made, int_pairs[i].jsonb, VARSIZE(int_pairs[i].jsonb));
			return made;
		}
	v.type = isnull ? jbvNull : jbvNumeric;
	if (!isnull)
		v.val.numeric = DatumGetNumeric(DirectFunctionCall1(int8_numeric,
															Int64GetDatum(value)));
	made = jsonb_pair(key, &v);
	if (strlen(key) >= NAMEDATALEN)
		return made;
	kept = &int_pairs[next_int_pair];
	next_int_pair = (next_int_pair + 1) % INT_PAIRS_KEPT;
	if (kept->jsonb)
		pfree(kept->jsonb);
	kept->jsonb = NULL;
	strlcpy(kept->key, key, NAMEDATALEN);
	kept->value = value;
	kept->isnull = isnull;
	kept->jsonb = MemoryContextAlloc(TopMemoryContext, VARSIZE(made));
	memcpy(kept->jsonb, made, VARSIZE(made));
	return made;
}
