/*
 * where.c — condition groups and field conditions of a rule ("any", "all",
 * "not", {"field": ..., "op": ...}): copying a compiled tree into the rule
 * cache, choosing its guard, and judging it on a lead.
 *
 * Judging is three-valued so the gate can use it on a row in place: what
 * it cannot know there (tags) is "maybe".  Today's condition keys nested in
 * a group are judged by the caller (rules.c), through in->keys.
 */
#include "nocrm.h"

#include "access/htup_details.h"
#include "executor/tuptable.h"
#include "utils/datum.h"
#include "utils/typcache.h"

/* ---------------------------------------------------------------- copying */

/* size bytes of src (NULL stays NULL), in CurrentMemoryContext. */
void *
nocrm_copy_bytes(const void *src, Size size)
{
	void	   *dst;

	if (src == NULL)
		return NULL;
	dst = palloc(size > 0 ? size : 1);
	memcpy(dst, src, size);
	return dst;
}

const char *
nocrm_copy_string(const char *s)
{
	return s ? pstrdup(s) : NULL;
}

static const char **
copy_strs(const char **strings, int n)
{
	const char **dst;

	if (strings == NULL)
		return NULL;
	dst = palloc(sizeof(char *) * (n + 1));
	for (int i = 0; i < n; i++)
		dst[i] = pstrdup(strings[i]);
	dst[n] = NULL;
	return dst;
}

/* The condition fields of src (keys and tree) into dst, in CurrentMemoryContext. */
void
nocrm_copy_condition_keys(Rule *dst, const Rule *src)
{
	dst->has_tags = copy_strs(src->has_tags, src->nhas_tags);
	dst->lacks_tags = copy_strs(src->lacks_tags, src->nlacks_tags);
	dst->owners = nocrm_copy_bytes(src->owners, sizeof(int64) * src->nowners);
	dst->pipelines = nocrm_copy_bytes(src->pipelines, sizeof(int64) * src->npipelines);
	dst->steps = nocrm_copy_bytes(src->steps, sizeof(int64) * src->nsteps);
	dst->where = src->where ? nocrm_where_copy(src->where) : NULL;
}

static void
copy_value(FieldCond *f, FieldValue *v)
{
	if (!v->relative)
		v->value = datumCopy(v->value, f->typbyval, f->typlen);
}

static void
copy_node(CondNode *dst, const CondNode *src)
{
	*dst = *src;
	if (src->kind == CN_FIELD)
	{
		FieldCond  *f = &dst->field;

		f->column = nocrm_copy_string(f->column);
		f->needle = nocrm_copy_string(f->needle);
		f->text = nocrm_copy_string(f->text);
		f->values = nocrm_copy_bytes(f->values, sizeof(FieldValue) * f->nvalues);
		for (int i = 0; i < f->nvalues; i++)
			copy_value(f, &f->values[i]);
		if (f->has_from && !f->from_null)
			copy_value(f, &f->from);
		if (f->has_to && !f->to_null)
			copy_value(f, &f->to);
	}
	else if (src->kind == CN_KEYS)
	{
		dst->keys = nocrm_copy_bytes(src->keys, sizeof(Rule));
		nocrm_copy_condition_keys(dst->keys, src->keys);
	}
	if (src->nchildren > 0)
	{
		dst->children = palloc(sizeof(CondNode) * src->nchildren);
		for (int i = 0; i < src->nchildren; i++)
			copy_node(&dst->children[i], &src->children[i]);
	}
}

CondNode *
nocrm_where_copy(const CondNode *node)
{
	CondNode   *copy = palloc(sizeof(CondNode));

	copy_node(copy, node);
	return copy;
}

/*
 * A comparison every match passes: a field condition AND-ed at the top,
 * with constants on an ordered type.  NULL if there is none.
 */
const FieldCond *
nocrm_where_guard(const CondNode *node)
{
	if (node->kind == CN_FIELD)
		return nocrm_field_guards(&node->field) ? &node->field : NULL;
	if (node->kind == CN_ALL)
		for (int i = 0; i < node->nchildren; i++)
		{
			const FieldCond *g = nocrm_where_guard(&node->children[i]);

			if (g)
				return g;
		}
	return NULL;
}

/* Does the tree read tags anywhere (a query per lead)? */
bool
nocrm_where_reads_tags(const CondNode *node)
{
	if (node->kind == CN_KEYS)
		return node->keys->nhas_tags > 0 || node->keys->nlacks_tags > 0;
	for (int i = 0; i < node->nchildren; i++)
		if (nocrm_where_reads_tags(&node->children[i]))
			return true;
	return false;
}

/* ---------------------------------------------------------------- judging */

static Datum
field_of(WhereInput *in, AttrNumber attnum, bool *isnull)
{
	TupleDesc	desc;
	HeapTuple	row;

	if (in->mode == WHERE_GATE)
		return slot_getattr(in->newslot ? in->newslot : in->oldslot, attnum, isnull);
	row = nocrm_lead_row(in->lead, &desc);
	if (row == NULL || attnum > desc->natts)
	{
		*isnull = true;
		return (Datum) 0;
	}
	return heap_getattr(row, attnum, desc, isnull);
}

static bool
field_changed(FieldCond *f, WhereInput *in)
{
	Datum		old,
				new;
	bool		oldnull,
				newnull;

	switch (in->mode)
	{
		case WHERE_RECHECK:
			return true;		/* the change happened when the action was queued */
		case WHERE_EXPLAIN:
			return in->explain_column && strcmp(in->explain_column, f->column) == 0;
		case WHERE_GATE:
			if (!in->oldslot || !in->newslot)
				return false;
			old = slot_getattr(in->oldslot, f->attnum, &oldnull);
			new = slot_getattr(in->newslot, f->attnum, &newnull);
			break;
		default:
			if (!in->ev || !in->ev->old_row || !in->ev->new_row)
				return false;	/* not an UPDATE: nothing changed from before */
			old = heap_getattr(in->ev->old_row, f->attnum, in->ev->rows_desc, &oldnull);
			new = heap_getattr(in->ev->new_row, f->attnum, in->ev->rows_desc, &newnull);
			break;
	}
	return nocrm_field_changed(f, old, oldnull, new, newnull);
}

static const char *
node_text(const CondNode *node)
{
	switch (node->kind)
	{
		case CN_FIELD:
			return node->field.text;
		case CN_ANY:
			return "any";
		case CN_NOT:
			return "not";
		case CN_KEYS:
			return "keys";
		default:
			return "all";
	}
}

/*
 * The tree on the lead.  in->failed is set to the first condition that did
 * not hold (through "all" groups), for explain.
 */
Truth
nocrm_where_eval(const CondNode *node, WhereInput *in)
{
	Truth		result;
	bool		isnull;
	Datum		value;

	switch (node->kind)
	{
		case CN_FIELD:
			if (node->field.op == FOP_CHANGED)
				result = field_changed((FieldCond *) &node->field, in) ? TRUTH_TRUE : TRUTH_FALSE;
			else
			{
				value = field_of(in, node->field.attnum, &isnull);
				result = nocrm_field_holds((FieldCond *) &node->field, value, isnull)
					? TRUTH_TRUE : TRUTH_FALSE;
			}
			break;
		case CN_KEYS:
			result = in->keys(node->keys, in);
			break;
		case CN_NOT:
			result = nocrm_where_eval(&node->children[0], in);
			if (result != TRUTH_MAYBE)
				result = result == TRUTH_TRUE ? TRUTH_FALSE : TRUTH_TRUE;
			break;
		case CN_ANY:
			result = TRUTH_FALSE;
			for (int i = 0; i < node->nchildren && result != TRUTH_TRUE; i++)
			{
				const char *failed = in->failed;
				Truth		t = nocrm_where_eval(&node->children[i], in);

				in->failed = failed;	/* one failing alternative is not the reason */
				if (t != TRUTH_FALSE)
					result = t;
			}
			break;
		default:				/* CN_ALL */
			result = TRUTH_TRUE;
			for (int i = 0; i < node->nchildren && result != TRUTH_FALSE; i++)
			{
				Truth		t = nocrm_where_eval(&node->children[i], in);

				if (t != TRUTH_TRUE)
					result = t;
			}
			return result;		/* a failing child already named itself */
	}
	if (result == TRUTH_FALSE && in->failed == NULL)
		in->failed = node_text(node);
	return result;
}
