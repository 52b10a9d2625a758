/*
 * fieldcmp.c — field conditions on values: a column of nocrm.leads compared
 * with constants by the column type's own btree comparison (so numeric,
 * dates, enums and text with its collation all order as in SQL), and the
 * gate's index of guards.
 *
 * A guard is one comparison every match of a rule passes.  The index sorts
 * the guards of many rules by their constants, so a row meets only the rules
 * whose guard it passes in a few binary searches, however many rules there
 * are.  Nothing here knows rules: callers pass payloads.
 */
#include "nocrm.h"

#include "access/htup_details.h"
#include "catalog/pg_attribute.h"
#include "catalog/pg_type.h"
#include "parser/parse_coerce.h"
#include "utils/datum.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/formatting.h"
#include "utils/lsyscache.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "utils/typcache.h"

const char *const nocrm_field_op_names[FOP_COUNT] = {
	[FOP_EQ] = "=",
	[FOP_NE] = "!=",
	[FOP_LT] = "<",
	[FOP_LE] = "<=",
	[FOP_GT] = ">",
	[FOP_GE] = ">=",
	[FOP_BETWEEN] = "between",
	[FOP_IN] = "in",
	[FOP_NOT_IN] = "not_in",
	[FOP_EMPTY] = "is_empty",
	[FOP_NOT_EMPTY] = "is_not_empty",
	[FOP_CONTAINS] = "contains",
	[FOP_STARTS_WITH] = "starts_with",
	[FOP_CHANGED] = "changed",
};

/* The column's type; false if nocrm.leads has no such column. */
bool
nocrm_field_cond_init(FieldCond *f, Oid relid, const char *column)
{
	HeapTuple	tup = SearchSysCacheAttName(relid, column);
	Form_pg_attribute att;
	Oid			base;

	if (!HeapTupleIsValid(tup))
		return false;
	att = (Form_pg_attribute) GETSTRUCT(tup);
	f->column = pstrdup(column);
	f->attnum = att->attnum;
	f->typid = att->atttypid;
	f->collation = att->attcollation;
	ReleaseSysCache(tup);
	if (f->attnum <= 0)
		return false;			/* system columns are not fields */

	base = getBaseType(f->typid);
	get_typlenbyval(base, &f->typlen, &f->typbyval);
	f->is_text = TypeCategory(base) == TYPCATEGORY_STRING;
	f->type = lookup_type_cache(base, TYPECACHE_CMP_PROC_FINFO);
	return true;
}

/* A value to compare with: relative ones are now() + offset, in the column's type. */
Datum
nocrm_field_value(FieldCond *f, FieldValue *v)
{
	Datum		at;

	if (!v->relative)
		return v->value;
	at = DirectFunctionCall2(timestamptz_pl_interval,
							 TimestampTzGetDatum(GetCurrentTransactionStartTimestamp()),
							 IntervalPGetDatum(&v->offset));
	switch (getBaseType(f->typid))
	{
		case DATEOID:
			return DirectFunctionCall1(timestamptz_date, at);
		case TIMESTAMPOID:
			return DirectFunctionCall1(timestamptz_timestamp, at);
		default:
			return at;
	}
}

static int
compare(FieldCond *f, Datum a, Datum b)
{
	return DatumGetInt32(FunctionCall2Coll(&f->type->cmp_proc_finfo, f->collation, a, b));
}

static char *
lowered(FieldCond *f, Datum value)
{
	text	   *t = DatumGetTextPP(value);

	return str_tolower(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t), f->collation);
}

/*
 * Does the value pass the comparison?  A NULL passes only is_empty (as in
 * SQL, where NULL compared with anything is not true).
 */
bool
nocrm_field_holds(FieldCond *f, Datum value, bool isnull)
{
	switch (f->op)
	{
		case FOP_EMPTY:
		case FOP_NOT_EMPTY:
			{
				bool		empty = isnull ||
					(f->is_text && VARSIZE_ANY_EXHDR(DatumGetPointer(value)) == 0);

				return f->op == FOP_EMPTY ? empty : !empty;
			}
		case FOP_CHANGED:
			return false;		/* judged on two versions: nocrm_field_changed */
		default:
			break;
	}
	if (isnull)
		return false;
	switch (f->op)
	{
		case FOP_EQ:
			return compare(f, value, nocrm_field_value(f, &f->values[0])) == 0;
		case FOP_NE:
			return compare(f, value, nocrm_field_value(f, &f->values[0])) != 0;
		case FOP_LT:
			return compare(f, value, nocrm_field_value(f, &f->values[0])) < 0;
		case FOP_LE:
			return compare(f, value, nocrm_field_value(f, &f->values[0])) <= 0;
		case FOP_GT:
			return compare(f, value, nocrm_field_value(f, &f->values[0])) > 0;
		case FOP_GE:
			return compare(f, value, nocrm_field_value(f, &f->values[0])) >= 0;
		case FOP_BETWEEN:
			return compare(f, value, nocrm_field_value(f, &f->values[0])) >= 0 &&
				compare(f, value, nocrm_field_value(f, &f->values[1])) <= 0;
		case FOP_IN:
		case FOP_NOT_IN:
			{
				bool		found = false;

				for (int i = 0; i < f->nvalues && !found; i++)
					found = compare(f, value, nocrm_field_value(f, &f->values[i])) == 0;
				return f->op == FOP_IN ? found : !found;
			}
		case FOP_CONTAINS:
		case FOP_STARTS_WITH:
			{
				/* freed at once: the gate judges every row of a statement */
				char	   *text = lowered(f, value);
				bool		held = f->op == FOP_CONTAINS
					? strstr(text, f->needle) != NULL
					: strncmp(text, f->needle, strlen(f->needle)) == 0;

				pfree(text);
				return held;
			}
		default:
			elog(ERROR, "nocrm: unexpected field operator %d", (int) f->op);
	}
	return false;
}

static bool
same_value(FieldCond *f, Datum a, bool anull, Datum b, bool bnull)
{
	if (anull || bnull)
		return anull == bnull;
	if (OidIsValid(f->type->cmp_proc))
		return compare(f, a, b) == 0;
	return datumIsEqual(a, b, f->typbyval, f->typlen);
}

/* "changed", optionally from one value and to another, between two versions. */
bool
nocrm_field_changed(FieldCond *f, Datum old, bool oldnull, Datum value, bool isnull)
{
	if (same_value(f, old, oldnull, value, isnull))
		return false;
	if (f->has_from &&
		!same_value(f, old, oldnull, f->from_null ? (Datum) 0 : nocrm_field_value(f, &f->from),
					f->from_null))
		return false;
	if (f->has_to &&
		!same_value(f, value, isnull, f->to_null ? (Datum) 0 : nocrm_field_value(f, &f->to),
					f->to_null))
		return false;
	return true;
}

/* Can the comparison be a guard in the index (constants only, ordered type)? */
bool
nocrm_field_guards(const FieldCond *f)
{
	if (!OidIsValid(f->type->cmp_proc))
		return false;
	switch (f->op)
	{
		case FOP_EQ:
		case FOP_IN:
		case FOP_LT:
		case FOP_LE:
		case FOP_GT:
		case FOP_GE:
		case FOP_BETWEEN:
			for (int i = 0; i < f->nvalues; i++)
				if (f->values[i].relative)
					return false;
			return true;
		default:
			return false;
	}
}

/* ---------------------------------------------------------------- the index */

typedef struct GuardEntry
{
	Datum		value;
	bool		inclusive;
	void	   *payload;
} GuardEntry;

/* The guards on one column, by kind, each array sorted by value. */
typedef struct GuardColumn
{
	FieldCond  *field;			/* the first guard's: attnum, type, collation */
	int			neq,
				nlower,
				nupper;
	GuardEntry *eq;				/* value = v */
	GuardEntry *lower;			/* v > value (>= if inclusive) */
	GuardEntry *upper;			/* v < value (<= if inclusive) */
} GuardColumn;

struct FieldIndex
{
	int			ncolumns;
	GuardColumn *columns;
};

static int
entry_cmp(const void *a, const void *b, void *arg)
{
	return compare((FieldCond *) arg, ((const GuardEntry *) a)->value,
				   ((const GuardEntry *) b)->value);
}

static GuardColumn *
column_for(FieldIndex *index, const FieldCond *f, int cap)
{
	for (int i = 0; i < index->ncolumns; i++)
	{
		FieldCond  *c = index->columns[i].field;

		if (c->attnum == f->attnum && c->type == f->type && c->collation == f->collation)
			return &index->columns[i];
	}
	index->columns[index->ncolumns].field = (FieldCond *) f;
	index->columns[index->ncolumns].eq = palloc(sizeof(GuardEntry) * cap);
	index->columns[index->ncolumns].lower = palloc(sizeof(GuardEntry) * cap);
	index->columns[index->ncolumns].upper = palloc(sizeof(GuardEntry) * cap);
	return &index->columns[index->ncolumns++];
}

static void
add(GuardEntry *list, int *n, Datum value, bool inclusive, void *payload)
{
	list[*n].value = value;
	list[*n].inclusive = inclusive;
	list[*n].payload = payload;
	(*n)++;
}

/* An index of n guards (nocrm_field_guards true), in CurrentMemoryContext. */
FieldIndex *
nocrm_field_index_build(int n, const FieldCond **guards, void **payloads)
{
	FieldIndex *index = palloc0(sizeof(FieldIndex));
	int			cap = 0;

	for (int i = 0; i < n; i++)
		cap += Max(guards[i]->nvalues, 1);
	index->columns = palloc0(sizeof(GuardColumn) * (n + 1));
	for (int i = 0; i < n; i++)
	{
		const FieldCond *f = guards[i];
		GuardColumn *c = column_for(index, f, cap);

		switch (f->op)
		{
			case FOP_EQ:
			case FOP_IN:
				for (int v = 0; v < f->nvalues; v++)
					add(c->eq, &c->neq, f->values[v].value, true, payloads[i]);
				break;
			case FOP_GT:
			case FOP_GE:
			case FOP_BETWEEN:	/* its lower bound: the upper one is checked after */
				add(c->lower, &c->nlower, f->values[0].value, f->op != FOP_GT, payloads[i]);
				break;
			case FOP_LT:
			case FOP_LE:
				add(c->upper, &c->nupper, f->values[0].value, f->op == FOP_LE, payloads[i]);
				break;
			default:
				elog(ERROR, "nocrm: field operator %d is no guard", (int) f->op);
		}
	}
	for (int i = 0; i < index->ncolumns; i++)
	{
		GuardColumn *c = &index->columns[i];

		qsort_arg(c->eq, c->neq, sizeof(GuardEntry), entry_cmp, c->field);
		qsort_arg(c->lower, c->nlower, sizeof(GuardEntry), entry_cmp, c->field);
		qsort_arg(c->upper, c->nupper, sizeof(GuardEntry), entry_cmp, c->field);
	}
	return index;
}

/* The first entry whose value is >= v (or > v when after_equal). */
static int
search(GuardColumn *c, GuardEntry *list, int n, Datum v, bool after_equal)
{
	int			lo = 0,
				hi = n;

	while (lo < hi)
	{
		int			mid = lo + (hi - lo) / 2;
		int			r = compare(c->field, list[mid].value, v);

		if (r < 0 || (after_equal && r == 0))
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

/*
 * The payloads of the guards this row passes (at most max; each guard's
 * payload once per value it matched, so callers dedupe IN lists).
 */
int
nocrm_field_index_probe(FieldIndex *index, FieldGetter get, void *row, void **out, int max)
{
	int			n = 0;

	for (int i = 0; i < index->ncolumns; i++)
	{
		GuardColumn *c = &index->columns[i];
		bool		isnull;
		Datum		v = get(row, c->field->attnum, &isnull);
		int			from,
					to;

		if (isnull)
			continue;
		/* equal values */
		from = search(c, c->eq, c->neq, v, false);
		to = search(c, c->eq, c->neq, v, true);
		for (int e = from; e < to && n < max; e++)
			out[n++] = c->eq[e].payload;
		/* lower bounds below v, and those equal to v when inclusive */
		to = search(c, c->lower, c->nlower, v, false);
		for (int e = 0; e < to && n < max; e++)
			out[n++] = c->lower[e].payload;
		for (int e = to; e < c->nlower && n < max &&
			 compare(c->field, c->lower[e].value, v) == 0; e++)
			if (c->lower[e].inclusive)
				out[n++] = c->lower[e].payload;
		/* upper bounds above v, and those equal to v when inclusive */
		from = search(c, c->upper, c->nupper, v, true);
		for (int e = from; e < c->nupper && n < max; e++)
			out[n++] = c->upper[e].payload;
		for (int e = from - 1; e >= 0 && n < max &&
			 compare(c->field, c->upper[e].value, v) == 0; e--)
			if (c->upper[e].inclusive)
				out[n++] = c->upper[e].payload;
	}
	return n;
}
