/*
 * firings.c — nocrm.firing_counts: how often each automation and stage
 * trigger fired, whatever the run log keeps (nocrm.run_log).
 *
 * A bulk statement fires a rule once per lead; a row per firing would cost
 * what the run log cost.  Firings are added up per rule and subtransaction
 * into one waiting row of the write buffer, written with the statement's
 * other records: one row per rule and statement.  The drain folds the
 * rows of a day into one and prunes them with the run log's retention, so
 * automation_stats and stage_trigger_stats cover the same span as before.
 */
#include "nocrm.h"

#include "access/xact.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#define KEPT_KEYS	256			/* keys kept across flushes before the map is remade */

static WriteBuffer counts_buffer = {
	.what = "counting firings failed",
	.table = "firing_counts",
	.columns = {"automation_id", "stage_trigger_id", "fired", "actions", "last_fired"},
	.direct = true,
	.ncols = 5,
	.types = {INT4OID, INT4OID, INT8OID, INT8OID, TIMESTAMPTZOID},
};

typedef struct FiringKey
{
	int32		id;				/* > 0 an automation, < 0 a stage trigger */
	SubTransactionId subid;		/* a rolled-back subtransaction drops its row */
} FiringKey;

typedef struct FiringRow
{
	FiringKey	key;
	uint64		generation;		/* the buffer's, when row was made */
	int			row;
} FiringRow;

static HTAB *rows_by_key = NULL;

static HTAB *
firing_rows(void)
{
	if (rows_by_key != NULL && hash_get_num_entries(rows_by_key) > KEPT_KEYS)
	{
		hash_destroy(rows_by_key);
		rows_by_key = NULL;
	}
	if (rows_by_key == NULL)
		rows_by_key = nocrm_blob_hash("nocrm firing counts", 64, sizeof(FiringKey),
									  sizeof(FiringRow), TopMemoryContext);
	return rows_by_key;
}

/* One firing of automation id (> 0) or stage trigger -id, that ran nactions actions. */
void
nocrm_count_firing(int32 id, int nactions)
{
	FiringKey	key;
	FiringRow  *entry;
	bool		found;
	TimestampTz now = GetCurrentTimestamp();
	Datum	   *counts = NULL;
	Datum		values[5];
	bool		nulls[5] = {false, false, false, false, false};

	memset(&key, 0, sizeof(key));
	key.id = id;
	key.subid = GetCurrentSubTransactionId();
	entry = hash_search(firing_rows(), &key, HASH_ENTER, &found);
	if (found)
		counts = nocrm_buffered_values(&counts_buffer, entry->row, entry->generation);
	if (counts != NULL)
	{
		counts[2] = Int64GetDatum(DatumGetInt64(counts[2]) + 1);
		counts[3] = Int64GetDatum(DatumGetInt64(counts[3]) + nactions);
		counts[4] = TimestampTzGetDatum(now);
		return;
	}
	entry->row = -1;			/* until the row is made (an error leaves it so) */
	if (!nocrm_table_exists("firing_counts"))	/* a schema older than 1.3 */
		return;
	values[0] = Int32GetDatum(id);
	nulls[0] = id <= 0;
	values[1] = Int32GetDatum(-id);
	nulls[1] = id >= 0;
	values[2] = Int64GetDatum(1);
	values[3] = Int64GetDatum(nactions);
	values[4] = TimestampTzGetDatum(now);
	entry->row = nocrm_buffer_row(&counts_buffer, values, nulls);
	entry->generation = counts_buffer.generation;
}

/*
 * The drain's share: each day's rows of a rule folded into one, those of
 * rules that are gone and those older than retention_seconds deleted.
 * Rows that committing transactions are writing stay for the next fold.
 */
void
nocrm_fold_firing_counts(int retention_seconds)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {INT4OID};
	Datum		args[1] = {Int32GetDatum(retention_seconds)};

	if (!nocrm_table_exists("firing_counts"))
		return;
	nocrm_plan(&plan,
			   "WITH old AS (DELETE FROM nocrm.firing_counts f"
			   "              WHERE f.last_fired < now() - make_interval(secs => $1)"
			   "                 OR (f.automation_id IS NOT NULL AND NOT EXISTS"
			   "                     (SELECT FROM nocrm.automations a WHERE a.id = f.automation_id))"
			   "                 OR (f.stage_trigger_id IS NOT NULL AND NOT EXISTS"
			   "                     (SELECT FROM nocrm.stage_triggers t WHERE t.id = f.stage_trigger_id))),"
			   "     days AS (SELECT f.automation_id, f.stage_trigger_id,"
			   "                     date_trunc('day', f.last_fired, 'UTC') AS day"
			   "                FROM nocrm.firing_counts f"
			   "               WHERE f.last_fired >= now() - make_interval(secs => $1)"
			   "                 AND (f.automation_id IS NULL OR EXISTS"
			   "                      (SELECT FROM nocrm.automations a WHERE a.id = f.automation_id))"
			   "                 AND (f.stage_trigger_id IS NULL OR EXISTS"
			   "                      (SELECT FROM nocrm.stage_triggers t WHERE t.id = f.stage_trigger_id))"
			   "               GROUP BY 1, 2, 3 HAVING count(*) > 1),"
			   "     folded AS (DELETE FROM nocrm.firing_counts f USING days d"
			   "                 WHERE f.automation_id IS NOT DISTINCT FROM d.automation_id"
			   "                   AND f.stage_trigger_id IS NOT DISTINCT FROM d.stage_trigger_id"
			   "                   AND date_trunc('day', f.last_fired, 'UTC') = d.day"
			   "                RETURNING f.automation_id, f.stage_trigger_id, f.fired, f.actions,"
			   "                          f.last_fired, d.day)"
			   " INSERT INTO nocrm.firing_counts (automation_id, stage_trigger_id, fired, actions, last_fired)"
			   " SELECT automation_id, stage_trigger_id, sum(fired), sum(actions), max(last_fired)"
			   "   FROM folded GROUP BY automation_id, stage_trigger_id, day",
			   1, types);
	nocrm_exec_plan(plan, args, NULL, SPI_OK_INSERT, "folding firing counts failed");
}
