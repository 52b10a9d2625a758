/*
 * writebuf.c — rows of history, the run log, notifications and the queue, written in
 * batches.
 *
 * A bulk statement raises thousands of events; one INSERT per history row
 * costs more than the event.  Rows are kept in memory and written by one
 * INSERT ... SELECT FROM unnest(...) per table: at the end of each
 * outermost statement on the event tables (the statement trigger), at the
 * end of fire_trigger() and of each delayed action, and whenever
 * BUFFER_LIMIT rows are waiting.  Rows keep the order they were made in
 * (unnest yields them in array order and the INSERT takes them as they
 * come: no sort, whose start-up a one-row batch would pay).  A rolled-back
 * subtransaction takes its rows with it.  A waiting row may be added to in
 * place (firings.c's counts): WriteBuffer.generation tells its maker when
 * the row numbers have moved.
 */
#include "nocrm.h"

#include "access/xact.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/array.h"
#include "utils/datum.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"

#define BUFFER_LIMIT	10000	/* rows across all buffers before a flush */

static MemoryContext buffer_context = NULL;	/* child of TopTransactionContext */
PG_FUNCTION_INFO_V1(nocrm_record_writes);

static WriteBuffer *registered[8];
static int	nregistered = 0;
static int	total_rows = 0;
static bool flushing = false;

static void
buffer_reset(WriteBuffer *buf)
{
	buf->n = buf->cap = 0;
	buf->values = NULL;
	buf->nulls = NULL;
	buf->subids = NULL;
	buf->generation++;
}

/*
 * Appends one row; values are copied.  May flush (needs no SPI connection).
 * Returns the row's number for nocrm_buffered_values, -1 if it was written
 * at once.
 */
int
nocrm_buffer_row(WriteBuffer *buf, Datum *values, bool *nulls)
{
	MemoryContext old;

	if (buffer_context == NULL)
	{
		buffer_context = AllocSetContextCreate(TopTransactionContext, "nocrm write buffers",
											   ALLOCSET_DEFAULT_SIZES);
		for (int i = 0; i < nregistered; i++)
			buffer_reset(registered[i]);
	}
	if (!buf->registered)
	{
		if (nregistered >= lengthof(registered))
			elog(ERROR, "too many write buffers");
		registered[nregistered++] = buf;
		buf->registered = true;
		buffer_reset(buf);
		for (int c = 0; c < buf->ncols; c++)
			get_typlenbyvalalign(buf->types[c], &buf->typlen[c], &buf->typbyval[c],
								 &buf->typalign[c]);
	}
	old = MemoryContextSwitchTo(buffer_context);
	if (buf->n == buf->cap)
	{
		buf->cap = buf->cap ? buf->cap * 2 : 64;
		buf->values = buf->values ? repalloc(buf->values, sizeof(Datum) * buf->cap * buf->ncols)
			: palloc(sizeof(Datum) * buf->cap * buf->ncols);
		buf->nulls = buf->nulls ? repalloc(buf->nulls, sizeof(bool) * buf->cap * buf->ncols)
			: palloc(sizeof(bool) * buf->cap * buf->ncols);
		buf->subids = buf->subids ? repalloc(buf->subids, sizeof(SubTransactionId) * buf->cap)
			: palloc(sizeof(SubTransactionId) * buf->cap);
	}
	for (int c = 0; c < buf->ncols; c++)
	{
		int			i = buf->n * buf->ncols + c;

		buf->nulls[i] = nulls[c];
		buf->values[i] = nulls[c] ? (Datum) 0
			: datumCopy(values[c], buf->typbyval[c], buf->typlen[c]);
	}
	buf->subids[buf->n++] = GetCurrentSubTransactionId();
	MemoryContextSwitchTo(old);
	if (++total_rows >= BUFFER_LIMIT)
	{
		nocrm_buffers_flush();
		return -1;
	}
	return buf->n - 1;
}

/*
 * The values of waiting row `row` (numbered when rows were last moved, see
 * WriteBuffer.generation), for adding to its by-value columns in place;
 * NULL once the rows have moved: written, dropped with a subtransaction,
 * or gone with the transaction.
 */
Datum *
nocrm_buffered_values(WriteBuffer *buf, int row, uint64 generation)
{
	if (generation != buf->generation || row < 0 || row >= buf->n)
		return NULL;
	return &buf->values[row * buf->ncols];
}

/* INSERT INTO nocrm.table (columns) SELECT * FROM unnest($1, ...) */
static const char *
insert_sql(WriteBuffer *buf)
{
	StringInfoData sql;

	initStringInfo(&sql);
	appendStringInfo(&sql, "INSERT INTO nocrm.%s (", buf->table);
	for (int c = 0; c < buf->ncols; c++)
		appendStringInfo(&sql, "%s%s", c ? ", " : "", buf->columns[c]);
	appendStringInfoString(&sql, ") SELECT * FROM unnest(");
	for (int c = 0; c < buf->ncols; c++)
		appendStringInfo(&sql, "%s$%d", c ? ", " : "", c + 1);
	appendStringInfoChar(&sql, ')');
	return sql.data;
}

/* Writes n of the buffer's rows by INSERT: those numbered in rows, or the first n. */
static void
insert_rows(WriteBuffer *buf, const int *rows, int n)
{
	Datum	   *args = palloc(sizeof(Datum) * buf->ncols);
	Oid		   *argtypes = palloc(sizeof(Oid) * buf->ncols);
	int			dims[1] = {n};
	int			lbs[1] = {1};

	for (int c = 0; c < buf->ncols; c++)
	{
		Datum	   *col = palloc(sizeof(Datum) * n);
		bool	   *colnulls = palloc(sizeof(bool) * n);

		for (int i = 0; i < n; i++)
		{
			int			r = rows ? rows[i] : i;

			col[i] = buf->values[r * buf->ncols + c];
			colnulls[i] = buf->nulls[r * buf->ncols + c];
		}
		argtypes[c] = get_array_type(buf->types[c]);
		args[c] = PointerGetDatum(construct_md_array(col, colnulls, 1, dims, lbs, buf->types[c],
													 buf->typlen[c], buf->typbyval[c],
													 buf->typalign[c]));
	}
	if (buf->sql == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		buf->sql = insert_sql(buf);
		MemoryContextSwitchTo(old);
	}
	if (buf->before_sql)
		buf->before_sql(buf);
	nocrm_plan(&buf->plan, buf->sql, buf->ncols, argtypes);
	nocrm_exec_plan(buf->plan, args, NULL, SPI_OK_INSERT, buf->what);
	buf->sql_rows += n;
}

/* Writes the buffer's first n rows: directly when the table allows, else by INSERT. */
static void
flush_one(WriteBuffer *buf, int n)
{
	if (buf->before_write)
		buf->before_write(buf);
	if (buf->direct)
	{
		int		   *retry = buf->skip_conflicts ? palloc(sizeof(int) * n) : NULL;
		int			left = nocrm_direct_insert(buf, n, retry);

		if (left >= 0)
		{
			buf->direct_rows += n - left;
			if (left > 0)
				insert_rows(buf, retry, left);
			return;
		}
	}
	insert_rows(buf, NULL, n);
}

/* Drops the first n rows (written); rows made while they were written stay. */
static void
drop_written(WriteBuffer *buf, int n)
{
	int			left = buf->n - n;

	if (left > 0)
	{
		memmove(buf->values, &buf->values[n * buf->ncols], sizeof(Datum) * left * buf->ncols);
		memmove(buf->nulls, &buf->nulls[n * buf->ncols], sizeof(bool) * left * buf->ncols);
		memmove(buf->subids, &buf->subids[n], sizeof(SubTransactionId) * left);
	}
	buf->n = left;
	buf->generation++;
	total_rows -= n;
}

static bool
any_rows(void)
{
	for (int i = 0; i < nregistered; i++)
		if (registered[i]->n > 0)
			return true;
	return false;
}

/*
 * Writes every waiting row.  A buffer's INSERT can fire triggers that make
 * rows (a user's trigger) or flush again (the tags statement trigger): the
 * nested call returns at once, and the rows are written by the next pass.
 */
void
nocrm_buffers_flush(void)
{
	if (flushing || !any_rows())
		return;
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	flushing = true;
	/* rows made while these are written are new rows, not additions to them */
	for (int i = 0; i < nregistered; i++)
		registered[i]->generation++;
	PG_TRY();
	{
		while (any_rows())
			for (int i = 0; i < nregistered; i++)
			{
				WriteBuffer *buf = registered[i];
				int			n = buf->n;

				if (n == 0)
					continue;
				flush_one(buf, n);
				drop_written(buf, n);
			}
	}
	PG_FINALLY();
	{
		flushing = false;
	}
	PG_END_TRY();
	SPI_finish();
	total_rows = 0;
	for (int i = 0; i < nregistered; i++)
		buffer_reset(registered[i]);
	MemoryContextReset(buffer_context);
}

/* The transaction is over: its memory (and the rows) went with it. */
void
nocrm_buffers_xact_end(void)
{
	buffer_context = NULL;
	total_rows = 0;
	flushing = false;
	for (int i = 0; i < nregistered; i++)
		buffer_reset(registered[i]);
}

/* Drops the rows written since subtransaction subid began. */
void
nocrm_buffers_subxact_abort(SubTransactionId subid)
{
	for (int i = 0; i < nregistered; i++)
	{
		WriteBuffer *buf = registered[i];
		int			kept = 0;

		for (int r = 0; r < buf->n; r++)
		{
			if (buf->subids[r] >= subid)
				continue;
			if (kept != r)
			{
				memcpy(&buf->values[kept * buf->ncols], &buf->values[r * buf->ncols],
					   sizeof(Datum) * buf->ncols);
				memcpy(&buf->nulls[kept * buf->ncols], &buf->nulls[r * buf->ncols],
					   sizeof(bool) * buf->ncols);
				buf->subids[kept] = buf->subids[r];
			}
			kept++;
		}
		total_rows -= buf->n - kept;
		if (kept < buf->n)
			buf->generation++;
		buf->n = kept;
	}
}

/*
 * nocrm.record_writes(reset): per table this session wrote batched rows to,
 * how many went directly and how many by INSERT.
 */
Datum
nocrm_record_writes(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	bool		reset = !PG_ARGISNULL(0) && PG_GETARG_BOOL(0);

	InitMaterializedSRF(fcinfo, 0);
	for (int i = 0; i < nregistered; i++)
	{
		WriteBuffer *buf = registered[i];
		Datum		values[3];
		bool		nulls[3] = {false, false, false};

		values[0] = CStringGetTextDatum(buf->table);
		values[1] = Int64GetDatum(buf->direct_rows);
		values[2] = Int64GetDatum(buf->sql_rows);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		if (reset)
			buf->direct_rows = buf->sql_rows = 0;
	}
	return (Datum) 0;
}

/* Rows waiting in all buffers (for tests and the flush trigger). */
int
nocrm_buffered_rows(void)
{
	return total_rows;
}
