/*
 * tagset.c — the tags a bulk statement's add_tags actions add, written by
 * one INSERT per batch instead of one per lead.
 *
 * Whether a tag is new decides the action's history row and run-log entry,
 * so it must be known when the action runs, before the write.  For a bulk
 * statement on nocrm.leads the capture loads the tags its next CHUNK leads
 * already have (one query per chunk); a tag added in the statement joins
 * that set when it is buffered.  Any other write to nocrm.tags while a
 * chunk is loaded (a removal, a user's trigger, a rolled-back
 * subtransaction) makes the set unreliable: it is dropped, and the chunk's
 * remaining leads take the per-lead statement (actions.c).
 *
 * Only used when nothing listens to tag events (then nothing can come
 * between an added tag and its write).  Everything that reads nocrm.tags
 * while rows may be waiting calls nocrm_tagset_settle() first.
 */
#include "nocrm.h"

#include "common/hashfn.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"

typedef struct LeadTag
{
	int64		lead_id;
	char		name[NAMEDATALEN * 2];	/* longer names take the per-lead path */
} LeadTag;

static HTAB *chunk_tags = NULL;		/* (lead, tag) known to be on the lead */
static int64 *chunk_ids = NULL;		/* the loaded chunk's leads, sorted */
static int	chunk_n = 0;
static MemoryContext chunk_context = NULL;
static bool own_write = false;		/* the next tags statement is our flush */
static int	pending = 0;			/* rows waiting in the buffer */

static void
tags_before_write(WriteBuffer *buf)
{
	pending = 0;
}

/* Only an INSERT fires the tags statement trigger, which must know it is ours. */
static void
tags_before_sql(WriteBuffer *buf)
{
	own_write = true;
}

/*
 * Directly when the table allows: the tag event trigger's WHEN is false for
 * these rows (the set is used only while nothing listens to tag events) and
 * the statement trigger would only recognise the batch as ours.
 */
static WriteBuffer tags_buffer = {
	.what = "adding tags failed",
	.table = "tags",
	.columns = {"lead_id", "name"},
	.sql = "INSERT INTO nocrm.tags (lead_id, name)"
	" SELECT r.lead_id, r.name FROM unnest($1, $2) AS r(lead_id, name)"
	" ON CONFLICT DO NOTHING",
	.direct = true,
	.skip_conflicts = true,
	.quiet_triggers = {"tag_event_trigger", "flush_assignments_trigger"},
	.before_write = tags_before_write,
	.before_sql = tags_before_sql,
	.ncols = 2,
	.types = {INT8OID, TEXTOID},
};

/* Drops the loaded chunk: its leads take the per-lead path. */
void
nocrm_tagset_forget(void)
{
	chunk_tags = NULL;
	chunk_ids = NULL;
	chunk_n = 0;
	if (chunk_context)
		MemoryContextDelete(chunk_context);
	chunk_context = NULL;
}

/* The transaction is over (its buffered rows went with the write buffers). */
void
nocrm_tagset_xact_end(void)
{
	chunk_context = NULL;		/* a child of TopTransactionContext */
	nocrm_tagset_forget();
	own_write = false;
	pending = 0;
}

/*
 * Loads the tags of the leads in ids (the next rows of a bulk statement, in
 * any order).  Runs inside the caller's SPI connection.
 */
void
nocrm_tagset_load(int64 *ids, int n)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {INT8ARRAYOID};
	Datum		args[1];
	Datum	   *elems;
	MemoryContext old;

	nocrm_tagset_forget();
	if (n == 0)
		return;
	chunk_context = AllocSetContextCreate(TopTransactionContext, "nocrm tag set",
										  ALLOCSET_DEFAULT_SIZES);
	elems = palloc(sizeof(Datum) * n);
	for (int i = 0; i < n; i++)
		elems[i] = Int64GetDatum(ids[i]);
	args[0] = PointerGetDatum(construct_array(elems, n, INT8OID, 8, true, TYPALIGN_DOUBLE));
	/* a join, not = ANY ($1): a parameter's array is searched linearly per row */
	nocrm_plan(&plan, "SELECT t.lead_id, t.name FROM unnest($1) AS i(id)"
			   " JOIN nocrm.tags t ON t.lead_id = i.id", 1, types);
	nocrm_exec_plan(plan, args, NULL, SPI_OK_SELECT, "reading tags failed");

	chunk_tags = nocrm_blob_hash("nocrm tag set", Max(256, SPI_processed * 2), sizeof(LeadTag),
								 sizeof(LeadTag), chunk_context);
	old = MemoryContextSwitchTo(chunk_context);
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		bool		isnull;
		int64		lead_id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[r],
														  SPI_tuptable->tupdesc, 1, &isnull));
		char	   *name = SPI_getvalue(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 2);

		if (!nocrm_tagset_fits(name))
		{
			/* a name too long for the set: these leads take the per-lead path */
			MemoryContextSwitchTo(old);
			nocrm_tagset_forget();
			return;
		}
		(void) nocrm_tagset_present(lead_id, name, true);
	}
	chunk_ids = palloc(sizeof(int64) * n);
	memcpy(chunk_ids, ids, sizeof(int64) * n);
	qsort(chunk_ids, n, sizeof(int64), nocrm_int64_cmp);
	chunk_n = n;
	MemoryContextSwitchTo(old);
	SPI_freetuptable(SPI_tuptable);
}

/* Are this lead's tags known, so that an add can be buffered? */
bool
nocrm_tagset_covers(int64 lead_id)
{
	return chunk_tags != NULL &&
		bsearch(&lead_id, chunk_ids, chunk_n, sizeof(int64), nocrm_int64_cmp) != NULL;
}

/* Is the tag on the lead (or waiting to be written)?  With enter, it is now. */
bool
nocrm_tagset_present(int64 lead_id, const char *name, bool enter)
{
	LeadTag		key;
	bool		found;

	memset(&key, 0, sizeof(key));
	key.lead_id = lead_id;
	strlcpy(key.name, name, sizeof(key.name));
	(void) hash_search(chunk_tags, &key, enter ? HASH_ENTER : HASH_FIND, &found);
	return found;
}

/* Can this name be kept in the set?  (Longer ones take the per-lead path.) */
bool
nocrm_tagset_fits(const char *name)
{
	return strlen(name) < sizeof(((LeadTag *) 0)->name);
}

/* Buffers the tag for the lead; the caller checked it is not present. */
void
nocrm_tagset_add(int64 lead_id, Datum name)
{
	Datum		values[2] = {Int64GetDatum(lead_id), name};
	bool		nulls[2] = {false, false};

	(void) nocrm_tagset_present(lead_id, TextDatumGetCString(name), true);
	pending++;
	nocrm_buffer_row(&tags_buffer, values, nulls);
}

/* Before nocrm.tags is read or written otherwise: the waiting tags are written. */
void
nocrm_tagset_settle(void)
{
	if (pending > 0)
		nocrm_buffers_flush();
}

/*
 * A statement on nocrm.tags ended.  Ours (the flush: true) leaves the set
 * as it is; any other may have changed what the set says.
 */
bool
nocrm_tagset_tags_written(void)
{
	if (own_write)
	{
		own_write = false;
		return true;
	}
	nocrm_tagset_forget();
	return false;
}

/* A subtransaction rolled back: the set may hold tags it took with it. */
void
nocrm_tagset_subxact_abort(void)
{
	nocrm_tagset_forget();
}
