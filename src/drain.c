/*
 * drain.c — CALL nocrm.drain(): delivers due queue items.
 *
 * pg_cron starts one run a minute; a run keeps going until its run time is
 * up, so mail leaves within a poll interval of the commit that queued it.
 * The background worker (worker.c) runs the same loop, nocrm_drain_run().
 * Each round: claim a batch (FOR UPDATE SKIP LOCKED, with a lease) and
 * commit; run delayed actions in one transaction; send emails and POSTs
 * with no transaction work in flight; record the outcomes and commit.  A
 * drain that dies leaves its claimed items to the next run once the lease
 * ends; every item keeps one idempotency key across attempts.
 *
 * The drain keeps its own limits: the caller's statement_timeout is switched
 * off (the run time bounds a run), lock waits are bounded by
 * nocrm.request_timeout, and outcomes are recorded without waiting for row
 * locks.  A cancel (pg_cancel_backend, nocrm.stop_worker()) is honoured
 * between items and in the middle of a transfer, but only after what was
 * already sent is recorded.
 */
#include "nocrm.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "common/pg_prng.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "catalog/namespace.h"
#include "storage/lmgr.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/fmgrprotos.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

PG_FUNCTION_INFO_V1(nocrm_drain);

typedef enum ItemKind
{
	ITEM_EMAIL,
	ITEM_MOBILE,
	ITEM_WEBHOOK,
	ITEM_ACTION
} ItemKind;

typedef struct QueueItem
{
	int64		id;
	ItemKind	kind;
	char	   *recipient;
	char	   *idempotency_key;
	int			attempts;
	char	   *event;
	int32		automation_id;
	int			action_no;
	int64		lead_id;
	int64		actor_id;		/* whose change queued it, -1 if unknown */
	Jsonb	   *payload;
	char	   *subject;		/* rendered, for emails */
	char	   *body;			/* rendered email body, or the JSON to POST */
	TimestampTz prev_attempt;	/* last_attempt_at before this claim, 0 if none */
	char	   *host;			/* where it goes (SMTP server or URL host), for fairness */
	Transfer   *xfer;			/* its delivery in this round, if any */
	/* outcome */
	const char *state;
	char	   *error;
	bool		retry;
	double		retry_delay;	/* seconds, when retry */
	bool		released;		/* not tried: handed back without using an attempt */
	bool		recorded;
	bool		noted;			/* its failure, if any, went to the alerts */
	TimestampTz started;		/* this item's own attempt, 0 if not tried */
	TimestampTz finished;
} QueueItem;

static SPIPlanPtr plan_claim,
			plan_record,
			plan_held,
			plan_lock_actions,
			plan_taken_back,
			plan_prune;

/* Second key of the advisory lock every running drain holds (shared); the first is nocrm.queue's oid. */
#define DRAIN_LOCK_KEY 1

/* A cancel or termination is waiting: stop starting work, record, then let it act. */
static inline bool
stop_pending(void)
{
	return QueryCancelPending || ProcDiePending;
}

static ItemKind
kind_from_text(const char *kind)
{
	if (strcmp(kind, "email") == 0)
		return ITEM_EMAIL;
	if (strcmp(kind, "mobile") == 0)
		return ITEM_MOBILE;
	if (strcmp(kind, "webhook") == 0)
		return ITEM_WEBHOOK;
	return ITEM_ACTION;
}

static char *
text_col(HeapTuple tuple, TupleDesc desc, int col)
{
	return SPI_getvalue(tuple, desc, col);
}

/* The mobile push body: the queued payload plus the idempotency key. */
static char *
push_body(QueueItem *item)
{
	JsonbParseState *state = NULL;
	JsonbIterator *it = JsonbIteratorInit(&item->payload->root);
	JsonbIteratorToken tok;
	JsonbValue	v,
				key,
				value;

	/* A payload written by hand may be anything: keep only an object's fields. */
	if (!JB_ROOT_IS_OBJECT(item->payload) || JB_ROOT_IS_SCALAR(item->payload))
		pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	else
		while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_END_OBJECT && tok != WJB_DONE)
			pushJsonbValue(&state, tok, tok == WJB_BEGIN_OBJECT ? NULL : &v);
	key.type = jbvString;
	key.val.string.val = "idempotency_key";
	key.val.string.len = strlen(key.val.string.val);
	value.type = jbvString;
	value.val.string.val = item->idempotency_key;
	value.val.string.len = strlen(item->idempotency_key);
	pushJsonbValue(&state, WJB_KEY, &key);
	pushJsonbValue(&state, WJB_VALUE, &value);
	return JsonbToCString(NULL,
						  &JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_OBJECT, NULL))->root, 0);
}

/* host:port of an http(s) URL, lower case, without user info; "" if none. */
static char *
url_host(const char *url)
{
	const char *p = url ? strstr(url, "://") : NULL;
	const char *end,
			   *at;
	char	   *host;

	if (p == NULL)
		return "";
	p += 3;
	end = p + strcspn(p, "/?#");
	/* credentials in the URL are not a host, and must not be stored as one */
	while ((at = memchr(p, '@', end - p)) != NULL)
		p = at + 1;
	host = pnstrdup(p, end - p);
	for (char *c = host; *c; c++)
		if (*c >= 'A' && *c <= 'Z')
			*c += 'a' - 'A';
	return host;
}

/* Where an item goes: one key per receiving server, so a slow one can be set aside. */
static char *
item_host(QueueItem *item)
{
	switch (item->kind)
	{
		case ITEM_EMAIL:
			return "smtp";
		case ITEM_MOBILE:
			return url_host(nocrm_push_url);
		case ITEM_WEBHOOK:
			return url_host(item->recipient);
		case ITEM_ACTION:
			break;
	}
	return "";
}

/*
 * Claims up to batch_size due items (and items whose lease ran out) and
 * renders them, all into memory that survives the commit.
 */
static int
claim(QueueItem **items, const char *token, bool no_email, MemoryContext keep)
{
	Oid			types[4] = {INT4OID, INT4OID, UUIDOID, BOOLOID};
	Datum		args[4];
	int			n;
	MemoryContext old;

	nocrm_plan(&plan_claim,
			   /* each partial index walked in order, so a claim costs the same with any backlog */
			   "WITH due AS (SELECT id, last_attempt_at FROM nocrm.queue"
			   "              WHERE state = 'pending' AND run_at <= now()"
			   "                AND NOT ($4 AND kind = 'email')"
			   "              ORDER BY run_at LIMIT $1 FOR UPDATE SKIP LOCKED),"
			   "     expired AS (SELECT id, last_attempt_at FROM nocrm.queue"
			   "                  WHERE state = 'processing' AND lease_until < now()"
			   "                    AND NOT ($4 AND kind = 'email')"
			   "                  ORDER BY lease_until LIMIT $1 FOR UPDATE SKIP LOCKED),"
			   "     claimed AS ("
			   "  UPDATE nocrm.queue q"
			   "     SET state = 'processing', attempts = q.attempts + 1,"
			   "         lease_until = now() + make_interval(secs => $2),"
			   "         claim_token = $3, last_attempt_at = now()"
			   "    FROM (SELECT * FROM due UNION ALL SELECT * FROM expired) p"
			   "   WHERE q.id = p.id"
			   "  RETURNING q.*, p.last_attempt_at AS prev_attempt)"
			   " SELECT c.id, c.kind, c.recipient, c.idempotency_key, c.attempts, c.event,"
			   "        c.automation_id, c.action_no, c.lead_id, c.payload, t.subject, t.body,"
			   "        CASE WHEN c.kind = 'email'"
			   "             THEN nocrm.template_context(c.lead_id, c.payload, c.automation_id, c.event) END,"
			   "        c.actor_id, c.prev_attempt"
			   "   FROM claimed c"
			   "   LEFT JOIN nocrm.email_templates t ON c.kind = 'email'"
			   "        AND t.name = coalesce(c.payload ->> 'template', 'notification')"
			   "  ORDER BY c.run_at, c.id",
			   4, types);
	args[0] = Int32GetDatum(nocrm_drain_batch_size);
	args[1] = Int32GetDatum(nocrm_lease_seconds);
	args[2] = DirectFunctionCall1(uuid_in, CStringGetDatum(token));
	args[3] = BoolGetDatum(no_email);
	nocrm_exec_plan(plan_claim, args, NULL, SPI_OK_SELECT, "claiming queue items failed");

	n = (int) SPI_processed;
	old = MemoryContextSwitchTo(keep);
	*items = palloc0(sizeof(QueueItem) * (n + 1));
	for (int i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		QueueItem  *item = &(*items)[i];
		bool		isnull;
		Datum		d;
		char	   *subject = text_col(tup, desc, 11);
		char	   *body = text_col(tup, desc, 12);
		Jsonb	   *context;

		item->id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		item->kind = kind_from_text(text_col(tup, desc, 2));
		item->recipient = text_col(tup, desc, 3);
		item->idempotency_key = text_col(tup, desc, 4);
		item->attempts = DatumGetInt32(SPI_getbinval(tup, desc, 5, &isnull));
		item->event = text_col(tup, desc, 6);
		d = SPI_getbinval(tup, desc, 7, &isnull);
		item->automation_id = isnull ? 0 : DatumGetInt32(d);
		d = SPI_getbinval(tup, desc, 8, &isnull);
		item->action_no = isnull ? 0 : DatumGetInt32(d);
		d = SPI_getbinval(tup, desc, 9, &isnull);
		item->lead_id = isnull ? 0 : DatumGetInt64(d);
		item->payload = DatumGetJsonbPCopy(SPI_getbinval(tup, desc, 10, &isnull));
		d = SPI_getbinval(tup, desc, 13, &isnull);
		context = isnull ? NULL : DatumGetJsonbPCopy(d);
		d = SPI_getbinval(tup, desc, 14, &isnull);
		item->actor_id = isnull ? -1 : DatumGetInt64(d);
		d = SPI_getbinval(tup, desc, 15, &isnull);
		item->prev_attempt = isnull ? 0 : DatumGetTimestampTz(d);
		item->host = item_host(item);

		switch (item->kind)
		{
			case ITEM_EMAIL:
				if (subject == NULL)
				{
					/* the name the claim looked up: the payload's, or notify's template */
					JsonbValue *name = JB_ROOT_IS_OBJECT(item->payload) && !JB_ROOT_IS_SCALAR(item->payload)
						? getKeyJsonValueFromContainer(&item->payload->root, "template", 8, NULL) : NULL;

					item->started = item->finished = GetCurrentTimestamp();
					item->state = "dead";
					item->error = psprintf("email template \"%s\" does not exist",
										   name == NULL || name->type == jbvNull ? "notification"
										   : name->type == jbvString
										   ? pnstrdup(name->val.string.val, name->val.string.len)
										   : "?");
					break;
				}
				item->subject = nocrm_render(subject, context);
				item->body = nocrm_render(body, context);
				break;
			case ITEM_MOBILE:
				item->body = push_body(item);
				break;
			case ITEM_WEBHOOK:
				item->body = JsonbToCString(NULL, &item->payload->root, 0);
				break;
			case ITEM_ACTION:
				break;
		}
	}
	MemoryContextSwitchTo(old);
	return n;
}

/* Exponential backoff with jitter: base * 2^(attempt-1) * [0.5, 1.5), then capped. */
static double
backoff_seconds(int attempts)
{
	double		delay = nocrm_retry_base_seconds;

	for (int i = 1; i < attempts && delay < nocrm_retry_max_seconds; i++)
		delay *= 2;
	delay *= 0.5 + pg_prng_double(&pg_global_prng_state);
	return Min(delay, (double) nocrm_retry_max_seconds);
}

static void
outcome(QueueItem *item, DeliveryResult *r)
{
	if (r->config_error)
	{
		/*
		 * Our settings, not this message: no attempt is used, and the run
		 * claims no more emails (delivery.c warned once).
		 */
		item->state = "pending";
		item->released = true;
		item->error = r->error;
	}
	else if (r->ok)
		item->state = "done";
	else if (r->permanent || item->attempts >= nocrm_max_attempts)
	{
		item->state = "dead";
		item->error = r->error;
	}
	else
	{
		item->state = "pending";
		item->retry = true;
		/* a 429 or 503 with Retry-After: not before it asked, within our cap */
		item->retry_delay = r->retry_after > 0 ?
			Max(1.0, Min(r->retry_after, (double) nocrm_webhook_max_retry_after_s)) :
			backoff_seconds(item->attempts);
		item->error = r->error;
	}
}

/*
 * Locks the batch's delayed actions that are still ours, so a cancel by an
 * admin (nocrm.cancel_queue_item) either comes first and the action does
 * not run, or waits for it.  Returns whether there is one to run; the
 * others are left as they are (recorded = true).
 */
static bool
lock_actions(QueueItem *items, int n, const char *token)
{
	Oid			types[2] = {INT8ARRAYOID, UUIDOID};
	Datum	   *ids = palloc(sizeof(Datum) * n);
	Datum		args[2];
	int			m = 0;
	bool		any = false;

	for (int i = 0; i < n; i++)
		if (items[i].kind == ITEM_ACTION && items[i].state == NULL)
			ids[m++] = Int64GetDatum(items[i].id);
	if (m == 0)
		return false;
	args[0] = PointerGetDatum(construct_array(ids, m, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	args[1] = DirectFunctionCall1(uuid_in, CStringGetDatum(token));
	nocrm_plan(&plan_lock_actions,
			   "SELECT id FROM nocrm.queue"
			   " WHERE id = ANY ($1) AND state = 'processing' AND claim_token = $2"
			   "   FOR UPDATE SKIP LOCKED",
			   2, types);
	nocrm_exec_plan(plan_lock_actions, args, NULL, SPI_OK_SELECT, "locking delayed actions failed");
	for (int i = 0; i < n; i++)
	{
		QueueItem  *item = &items[i];
		bool		locked = false;

		if (item->kind != ITEM_ACTION || item->state != NULL)
			continue;
		for (uint64 j = 0; j < SPI_processed && !locked; j++)
		{
			bool		isnull;

			locked = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[j], SPI_tuptable->tupdesc,
												 1, &isnull)) == item->id;
		}
		if (locked)
			any = true;
		else
			item->recorded = true;	/* cancelled meanwhile, or someone holds it: not ours to run */
	}
	SPI_freetuptable(SPI_tuptable);
	return any;
}

/* A delayed action, in its subtransaction: why it was cancelled, or NULL. */
typedef struct DelayedRun
{
	QueueItem  *item;
	const char *why;
} DelayedRun;

static void
run_delayed(void *arg)
{
	DelayedRun *run = arg;
	QueueItem  *item = run->item;

	run->why = nocrm_run_delayed(item->automation_id, item->action_no, item->lead_id,
								 item->event, item->payload, item->actor_id);
}

/* Runs each due delayed action in its own subtransaction. */
static void
run_actions(QueueItem *items, int n, MemoryContext keep)
{
	for (int i = 0; i < n; i++)
	{
		QueueItem  *item = &items[i];
		DelayedRun	run = {item, NULL};
		ErrorData  *edata;

		if (item->kind != ITEM_ACTION || item->state != NULL || item->recorded)
			continue;
		if (stop_pending())
		{
			item->state = "pending";
			item->released = true;
			continue;
		}
		item->started = GetCurrentTimestamp();
		edata = nocrm_in_subtransaction(run_delayed, &run, keep);
		item->finished = GetCurrentTimestamp();
		if (edata == NULL)
		{
			item->state = run.why ? "cancelled" : "done";
			item->error = run.why ? MemoryContextStrdup(keep, run.why) : NULL;
		}
		else
		{
			DeliveryResult r;

			if (edata->sqlerrcode == ERRCODE_QUERY_CANCELED)
			{
				/*
				 * The drain was cancelled, not the action failing: hand it
				 * back and keep the cancel pending, to be honoured once the
				 * batch is recorded.
				 */
				item->state = "pending";
				item->released = true;
				QueryCancelPending = true;
				InterruptPending = true;
			}
			else
			{
				memset(&r, 0, sizeof(r));
				r.error = edata->message;
				outcome(item, &r);
			}
		}
	}
}

static Oid	queue_relid;		/* nocrm.queue, looked up by each CALL */

static void
set_local(const char *name, const char *value)
{
	(void) set_config_option(name, value, PGC_USERSET, PGC_S_SESSION, GUC_ACTION_LOCAL,
							 true, 0, false);
}

/*
 * Commits and starts the next transaction with the drain's own settings,
 * whatever the caller's role or database set: read committed (the claims
 * rely on it) and lock waits bounded by nocrm.request_timeout.
 */
static void
drain_commit(void)
{
	char		ms[32];

	SPI_commit();
	set_local("transaction_isolation", "read committed");
	snprintf(ms, sizeof(ms), "%d", nocrm_request_timeout_ms);
	set_local("lock_timeout", ms);
}

static Datum
timestamp_or_null(TimestampTz t, bool *isnull)
{
	*isnull = t == 0;
	return TimestampTzGetDatum(t);
}

/*
 * Writes the outcomes of the batch's items not yet recorded, in one
 * statement that waits for no lock.  A row another session has changed is
 * left as that session made it (an admin's cancel stays), but gets its
 * delivered_at when it went out.  A row re-claimed by another drain after
 * our lease ran out is theirs.  Returns how many rows are still ours but
 * locked by someone else: those stay unrecorded, to be tried again.
 * finished_only: only the items with an outcome (during a round).
 */
static int
record(QueueItem *items, int n, const char *token, bool actions, bool finished_only)
{
	Oid			types[8] = {INT8ARRAYOID, TEXTARRAYOID, TEXTARRAYOID, FLOAT8ARRAYOID,
	BOOLARRAYOID, UUIDOID, TIMESTAMPTZARRAYOID, TIMESTAMPTZARRAYOID};
	Datum	   *ids = palloc(sizeof(Datum) * n);
	Datum	   *states = palloc(sizeof(Datum) * n);
	Datum	   *errors = palloc(sizeof(Datum) * n);
	bool	   *error_nulls = palloc(sizeof(bool) * n);
	Datum	   *retries = palloc(sizeof(Datum) * n);
	bool	   *retry_nulls = palloc(sizeof(bool) * n);
	Datum	   *released = palloc(sizeof(Datum) * n);
	Datum	   *attempted = palloc(sizeof(Datum) * n);
	bool	   *attempted_nulls = palloc(sizeof(bool) * n);
	Datum	   *finished = palloc(sizeof(Datum) * n);
	bool	   *finished_nulls = palloc(sizeof(bool) * n);
	int			m = 0;
	int			left = 0;
	int			dims[1];
	int			lbs[1] = {1};
	Datum		args[8];

	for (int i = 0; i < n; i++)
	{
		QueueItem  *item = &items[i];

		if (item->recorded || (item->kind == ITEM_ACTION) != actions ||
			(finished_only && item->state == NULL))
			continue;
		if (item->state == NULL)
		{
			item->state = "pending";
			item->released = true;
		}
		ids[m] = Int64GetDatum(item->id);
		states[m] = CStringGetTextDatum(item->state);
		errors[m] = item->error ? CStringGetTextDatum(item->error) : (Datum) 0;
		error_nulls[m] = item->error == NULL;
		retries[m] = Float8GetDatum(item->retry_delay);
		retry_nulls[m] = !item->retry;
		released[m] = BoolGetDatum(item->released);
		/* an item handed back untried keeps the time of its previous attempt */
		attempted[m] = timestamp_or_null(item->started ? item->started : item->prev_attempt,
										 &attempted_nulls[m]);
		finished[m] = timestamp_or_null(item->finished ? item->finished : GetCurrentTimestamp(),
										&finished_nulls[m]);
		m++;
	}
	if (m == 0)
		return 0;
	/*
	 * Deliveries' outcomes do not even wait for the table lock: interrupts
	 * are held meanwhile.  (Delayed actions hold their rows already, and
	 * must commit with their outcome or not at all.)
	 */
	if (!actions && !ConditionalLockRelationOid(queue_relid, RowExclusiveLock))
		return m;

	dims[0] = m;
	args[0] = PointerGetDatum(construct_array(ids, m, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	args[1] = PointerGetDatum(construct_array(states, m, TEXTOID, -1, false, TYPALIGN_INT));
	args[2] = PointerGetDatum(construct_md_array(errors, error_nulls, 1, dims, lbs,
												 TEXTOID, -1, false, TYPALIGN_INT));
	args[3] = PointerGetDatum(construct_md_array(retries, retry_nulls, 1, dims, lbs,
												 FLOAT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	args[4] = PointerGetDatum(construct_array(released, m, BOOLOID, 1, true, TYPALIGN_CHAR));
	args[5] = DirectFunctionCall1(uuid_in, CStringGetDatum(token));
	args[6] = PointerGetDatum(construct_md_array(attempted, attempted_nulls, 1, dims, lbs,
												 TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	args[7] = PointerGetDatum(construct_md_array(finished, finished_nulls, 1, dims, lbs,
												 TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));

	nocrm_plan(&plan_record,
			   "WITH o AS (SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::float8[],"
			   "                                $5::boolean[], $7::timestamptz[], $8::timestamptz[])"
			   "             AS o(id, state, error, retry, released, attempted, finished)),"
			   "     mine AS (SELECT q.id FROM nocrm.queue q"
			   "               WHERE q.id IN (SELECT id FROM o) AND q.claim_token = $6"
			   "                 FOR UPDATE SKIP LOCKED),"
			   "     written AS ("
			   "  UPDATE nocrm.queue q"
			   "     SET state = CASE WHEN q.state = 'processing' THEN o.state ELSE q.state END,"
			   "         last_error = CASE WHEN q.state = 'processing'"
			   "                           THEN coalesce(o.error, q.last_error) ELSE q.last_error END,"
			   "         attempts = q.attempts - CASE WHEN o.released AND q.state = 'processing'"
			   "                                      THEN 1 ELSE 0 END,"
			   "         run_at = CASE WHEN o.retry IS NOT NULL AND q.state = 'processing'"
			   "                       THEN o.finished + make_interval(secs => o.retry) ELSE q.run_at END,"
			   "         last_attempt_at = o.attempted,"
			   "         delivered_at = CASE WHEN o.state = 'done' THEN o.finished ELSE q.delivered_at END,"
			   "         lease_until = NULL, claim_token = NULL"
			   "    FROM o"
			   "   WHERE q.id = o.id AND q.id IN (SELECT id FROM mine)"
			   "  RETURNING q.id)"
			   " SELECT count(*) FROM written",
			   8, types);
	nocrm_exec_plan(plan_record, args, NULL, SPI_OK_SELECT, "recording deliveries failed");
	{
		bool		isnull;
		int64		written = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
														  SPI_tuptable->tupdesc, 1, &isnull));

		SPI_freetuptable(SPI_tuptable);
		if (written < m)
		{
			/*
			 * Rare: some were not written.  Those still under our token are
			 * locked by someone else (try again); the others are gone.
			 */
			Oid			held_types[2] = {INT8ARRAYOID, UUIDOID};
			Datum		held_args[2] = {args[0], args[5]};

			nocrm_plan(&plan_held,
					   "SELECT id FROM nocrm.queue WHERE id = ANY ($1) AND claim_token = $2",
					   2, held_types);
			nocrm_exec_plan(plan_held, held_args, NULL, SPI_OK_SELECT, "reading the queue failed");
		}
		for (int i = 0; i < n; i++)
		{
			QueueItem  *item = &items[i];
			bool		held = false;

			if (item->recorded || (item->kind == ITEM_ACTION) != actions ||
				(finished_only && item->state == NULL))
				continue;
			for (uint64 j = 0; written < m && j < SPI_processed && !held; j++)
				held = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[j], SPI_tuptable->tupdesc,
												   1, &isnull)) == item->id;
			if (held)
				left++;
			else
				item->recorded = true;
		}
		if (written < m)
			SPI_freetuptable(SPI_tuptable);
	}
	return left;
}

static const char *const item_kind_names[] = {"email", "mobile", "webhook", "action"};

/*
 * The batch's failed attempts recorded since the last call (retried or
 * dead; not items handed back untried), to the alerts (alerts.c), in the
 * transaction that recorded them.
 */
static void
note_failures(QueueItem *items, int n, bool actions)
{
	AlertFailure *f = palloc(sizeof(AlertFailure) * (n + 1));
	int			m = 0;

	for (int i = 0; i < n; i++)
	{
		QueueItem  *item = &items[i];

		if (!item->recorded || item->noted || (item->kind == ITEM_ACTION) != actions)
			continue;
		item->noted = true;
		if (item->released || item->state == NULL ||
			(strcmp(item->state, "dead") != 0 && !item->retry))
			continue;
		f[m].automation_id = item->automation_id;
		f[m].lead_id = item->lead_id;
		f[m].queue_id = item->id;
		f[m].kind = item_kind_names[item->kind];
		f[m].error = item->error;
		f[m].dead = strcmp(item->state, "dead") == 0;
		m++;
	}
	if (m > 0)
		nocrm_alerts_note(m, f);
}

/*
 * Records the outcomes and commits, with interrupts held so a cancel cannot
 * lose them.  Rows another session holds locked are tried again for up to
 * nocrm.request_timeout (not at all when stopping); any still held then
 * stay processing until their lease ends and are claimed again.
 */
static void
record_and_commit(QueueItem *items, int n, const char *token)
{
	TimestampTz give_up = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													  nocrm_request_timeout_ms);
	int			left;

	HOLD_INTERRUPTS();
	for (;;)
	{
		left = record(items, n, token, false, false);
		note_failures(items, n, false);
		drain_commit();
		if (left == 0 || stop_pending() || GetCurrentTimestamp() >= give_up)
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 50,
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
	RESUME_INTERRUPTS();
	if (left > 0)
		ereport(WARNING,
				(errmsg("nocrm.drain() could not record the outcome of %d queue items", left),
				 errdetail("Another session holds their rows locked."),
				 errhint("They stay processing until lease_until; then a drain claims them again.")));
}

/* Old finished queue items and run log rows go, a small batch each round. */
static void
prune(void)
{
	Oid			types[2] = {INT4OID, INT4OID};
	Datum		args[2] = {Int32GetDatum(nocrm_queue_retention_seconds),
	Int32GetDatum(nocrm_run_log_retention_seconds)};

	nocrm_plan(&plan_prune,
			   "WITH q AS (DELETE FROM nocrm.queue WHERE id IN ("
			   "    SELECT id FROM nocrm.queue"
			   "     WHERE state IN ('done', 'cancelled')"
			   "       AND coalesce(delivered_at, last_attempt_at, created_at)"
			   "           < now() - make_interval(secs => $1)"
			   "     LIMIT 1000 FOR UPDATE SKIP LOCKED) RETURNING 1),"
			   /* the oldest 1,000 by id (ids follow time): no index on created_at to keep up */
			   "     r AS (DELETE FROM nocrm.automation_runs WHERE id IN ("
			   "    SELECT id FROM nocrm.automation_runs"
			   "     WHERE id IN (SELECT id FROM nocrm.automation_runs ORDER BY id LIMIT 1000)"
			   "       AND created_at < now() - make_interval(secs => $2)"
			   "     FOR UPDATE SKIP LOCKED) RETURNING 1)"
			   " SELECT (SELECT count(*) FROM q) + (SELECT count(*) FROM r)",
			   2, types);
	nocrm_exec_plan(plan_prune, args, NULL, SPI_OK_SELECT, "pruning failed");
	SPI_freetuptable(SPI_tuptable);
	/* group counts the committing transactions could not add to their rows */
	(void) nocrm_assign_fold_increments();
	nocrm_fold_firing_counts(nocrm_run_log_retention_seconds);
	nocrm_alerts_prune(nocrm_run_log_retention_seconds);
	nocrm_hosts_prune();
}

/* A claim token: gen_random_uuid(), a version 4 UUID from pg_strong_random(). */
static char *
new_token(void)
{
	return DatumGetCString(DirectFunctionCall1(uuid_out, OidFunctionCall0(F_GEN_RANDOM_UUID)));
}

/*
 * Whether this database drains its queue: nocrm.drain_enabled = off never,
 * on always, auto (the default) unless nocrm.queue comes by logical
 * replication from another database, whose drain sends it.
 */
static bool
drain_enabled_here(void)
{
	Oid			types[1] = {OIDOID};
	Datum		args[1] = {ObjectIdGetDatum(queue_relid)};
	char	   *subscription;

	if (nocrm_drain_enabled == DRAIN_ENABLED_OFF)
	{
		ereport(NOTICE,
				(errmsg("nocrm.drain() is switched off in this database"),
				 errdetail("nocrm.drain_enabled is off.")));
		return false;
	}
	if (nocrm_drain_enabled == DRAIN_ENABLED_ON)
		return true;
	if (SPI_execute_with_args("SELECT s.subname FROM pg_catalog.pg_subscription_rel r"
							  "  JOIN pg_catalog.pg_subscription s ON s.oid = r.srsubid"
							  " WHERE r.srrelid = $1 ORDER BY s.subname LIMIT 1",
							  1, types, args, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "reading pg_subscription_rel failed");
	if (SPI_processed == 0)
		return true;
	subscription = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	ereport(NOTICE,
			(errmsg("nocrm.drain() does nothing on a subscriber of nocrm.queue"),
			 errdetail("Subscription \"%s\" replicates nocrm.queue into this database: the publisher's drain sends its items.",
					   subscription),
			 errhint("After a switchover, drop the subscription (or remove nocrm.queue from it); to drain here anyway, set nocrm.drain_enabled = on.")));
	return false;
}

static bool
not_yet_sent(QueueItem *item)
{
	return item->state == NULL && item->kind != ITEM_ACTION &&
		(item->xfer == NULL || item->xfer->state == XFER_WAITING);
}

/*
 * Drops from the batch the items not yet sent that are no longer ours: an
 * admin cancelled them (or set them dead) since the claim.  One query for
 * the batch, at most once a second, that waits for no lock.
 */
static void
drop_taken_back(QueueItem *items, int n, const char *token)
{
	Oid			types[2] = {INT8ARRAYOID, UUIDOID};
	Datum	   *ids = palloc(sizeof(Datum) * n);
	Datum		args[2];
	int			m = 0;

	for (int i = 0; i < n; i++)
		if (not_yet_sent(&items[i]))
			ids[m++] = Int64GetDatum(items[i].id);
	if (m == 0)
		return;
	HOLD_INTERRUPTS();
	if (ConditionalLockRelationOid(queue_relid, AccessShareLock))
	{
		args[0] = PointerGetDatum(construct_array(ids, m, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
		args[1] = DirectFunctionCall1(uuid_in, CStringGetDatum(token));
		nocrm_plan(&plan_taken_back,
				   "SELECT id FROM nocrm.queue WHERE id = ANY ($1)"
				   "   AND (state <> 'processing' OR claim_token IS DISTINCT FROM $2)",
				   2, types);
		nocrm_exec_plan(plan_taken_back, args, NULL, SPI_OK_SELECT, "reading the queue failed");
		for (uint64 j = 0; j < SPI_processed; j++)
		{
			bool		isnull;
			int64		id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[j],
														 SPI_tuptable->tupdesc, 1, &isnull));

			for (int i = 0; i < n; i++)
				if (items[i].id == id && not_yet_sent(&items[i]))
				{
					items[i].state = "taken back";	/* not sent, and not ours to record */
					items[i].recorded = true;
					if (items[i].xfer)
						items[i].xfer->state = XFER_DROPPED;
				}
		}
		SPI_freetuptable(SPI_tuptable);
	}
	drain_commit();
	RESUME_INTERRUPTS();
}

typedef struct BatchRef
{
	QueueItem  *items;
	int			n;
	const char *token;
} BatchRef;

static void transfer_outcome(QueueItem *item);

/*
 * About once a second during a round: what has ended is recorded (so a
 * crash cannot send it again, and a slow host does not hold back the
 * others' records), then the rows an admin took back are dropped.
 */
static void
round_tick(void *arg)
{
	BatchRef   *b = (BatchRef *) arg;
	bool		any = false;

	for (int i = 0; i < b->n; i++)
	{
		QueueItem  *item = &b->items[i];

		if (item->xfer && item->state == NULL &&
			(item->xfer->state == XFER_DONE || item->xfer->state == XFER_HANDED_BACK))
		{
			transfer_outcome(item);
			any = true;
		}
	}
	if (any && !stop_pending())
	{
		(void) record(b->items, b->n, b->token, false, true);
		note_failures(b->items, b->n, false);
		drain_commit();
	}
	drop_taken_back(b->items, b->n, b->token);
}

/* What the round did with an item's transfer, as the item's outcome. */
static void
transfer_outcome(QueueItem *item)
{
	Transfer   *t = item->xfer;

	switch (t->state)
	{
		case XFER_WAITING:
		case XFER_RUNNING:
		case XFER_DROPPED:
			break;				/* untried (record() hands it back), or not ours */
		case XFER_HANDED_BACK:
			/* a host's turn is over, it is paused, or its rate is used up: no attempt used */
			item->state = "pending";
			item->released = true;
			item->retry = true;
			item->retry_delay = t->hand_back_delay;
			item->finished = t->finished;
			break;
		case XFER_DONE:
			item->started = t->started;
			item->finished = t->finished;
			if (!t->result.ok && stop_pending())
			{
				/* Cut short by a cancel: it may have arrived, so it goes again, at once. */
				item->state = "pending";
				item->released = true;
				item->error = psprintf("delivery interrupted by a cancel of the drain (%s); it is sent again",
									   t->result.error ? t->result.error : "no answer");
			}
			else
				outcome(item, &t->result);
			break;
	}
}

/*
 * Sends the batch's emails, pushes and webhooks, several hosts at once
 * (round.c).  Interrupts are held meanwhile, so a cancel cannot throw away
 * an outcome: libcurl's progress callback and the round see it and cut the
 * transfers, and the drain acts on it once the outcomes are recorded.
 * Items not started by half the lease are handed back as they are, and so
 * is everything once a cancel is pending.
 */
static void
deliver_batch(DeliveryHandles *handles, QueueItem *items, int n, const char *token)
{
	TimestampTz hand_back = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
														(int64) nocrm_lease_seconds * 500);
	Transfer   *xfers = palloc0(sizeof(Transfer) * (n + 1));
	QueueItem **of = palloc(sizeof(QueueItem *) * (n + 1));
	BatchRef	batch = {items, n, token};
	int			m = 0;

	for (int i = 0; i < n; i++)
	{
		QueueItem  *item = &items[i];
		Transfer   *t = &xfers[m];

		if (item->state != NULL || item->kind == ITEM_ACTION)
			continue;
		t->state = XFER_WAITING;
		t->host = item->host;
		t->idempotency_key = item->idempotency_key;
		t->event = item->event;
		switch (item->kind)
		{
			case ITEM_EMAIL:
				t->is_mail = true;
				t->to = item->recipient;
				t->message = nocrm_build_queued_message(item->payload, item->recipient,
														item->subject, item->body,
														item->idempotency_key);
				break;
			case ITEM_MOBILE:
				t->url = nocrm_push_url;
				t->body = item->body;
				break;
			case ITEM_WEBHOOK:
				t->url = item->recipient;
				t->body = item->body;
				t->signature_secret = handles->webhook_secret;
				break;
			case ITEM_ACTION:
				break;
		}
		item->xfer = t;
		of[m++] = item;
	}
	if (m == 0)
		return;
	HOLD_INTERRUPTS();
	nocrm_deliver_round(handles, xfers, m, hand_back, round_tick, &batch);
	RESUME_INTERRUPTS();
	for (int j = 0; j < m; j++)
		if (of[j]->state == NULL)
			transfer_outcome(of[j]);
}

/* The HTTP hosts of the batch: what other drains know of them is read now. */
static void
load_hosts(QueueItem *items, int n)
{
	const char **names = palloc(sizeof(char *) * (n + 1));
	int			m = 0;

	for (int i = 0; i < n; i++)
		if ((items[i].kind == ITEM_WEBHOOK || items[i].kind == ITEM_MOBILE) && items[i].host[0])
			names[m++] = items[i].host;
	nocrm_hosts_load(names, m);
}

/*
 * CALL nocrm.drain(run_time => NULL): run_time in seconds, 0 = until nothing
 * is due now; NULL = until just before the next whole minute (when pg_cron
 * starts the next run), at most nocrm.drain_run_time.
 */
Datum
nocrm_drain(PG_FUNCTION_ARGS)
{
	CallContext *call = (CallContext *) fcinfo->context;

	if (call == NULL || !IsA(call, CallContext) || call->atomic)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TRANSACTION_STATE),
				 errmsg("nocrm.drain() must be run with CALL outside a transaction block"),
				 errdetail("It commits after each batch and sends mail between transactions."),
				 errhint("Run CALL nocrm.drain(); on its own, as pg_cron does.")));
	nocrm_drain_run(PG_ARGISNULL(0) ? nocrm_drain_run_seconds : PG_GETARG_FLOAT8(0),
					PG_ARGISNULL(0));
	PG_RETURN_VOID();
}

/*
 * One drain run, for CALL nocrm.drain() and the background worker (worker.c):
 * in a transaction with no snapshot set, which it commits after each step.
 * by_minute: also stop just before the next whole minute (pg_cron's next run).
 */
void
nocrm_drain_run(double run_time, bool by_minute)
{
	TimestampTz deadline;
	MemoryContext keep;
	MemoryContext outer;
	DeliveryHandles handles;
	int			round = 0;
	Datum		lock_key[2];
	volatile bool locked = false;

	/* A standby drains nothing; its queue runs once it is promoted. */
	if (RecoveryInProgress())
	{
		ereport(NOTICE,
				(errmsg("nocrm.drain() does nothing on a standby"),
				 errdetail("The queue is drained on the primary; after promotion, here.")));
		return;
	}
	if (run_time < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("run_time must not be negative"),
				 errhint("Give seconds, or 0 to stop as soon as nothing is due.")));

	/*
	 * The run time bounds a run, not the caller's statement_timeout (a role
	 * or database setting would cancel pg_cron's drain every minute).
	 */
	disable_timeout(STATEMENT_TIMEOUT, false);

	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), (int64) (run_time * 1000));
	if (by_minute)
	{
		/*
		 * pg_cron starts a run every whole minute: stop half a second before
		 * the next one, so runs follow each other without a gap.
		 */
		TimestampTz now = GetCurrentTimestamp();
		TimestampTz next_minute = now - now % (60 * USECS_PER_SEC) + 60 * USECS_PER_SEC;

		deadline = Min(deadline, next_minute - USECS_PER_SEC / 2);
	}

	queue_relid = get_relname_relid("queue", get_namespace_oid("nocrm", false));
	if (!OidIsValid(queue_relid))
		elog(ERROR, "table nocrm.queue does not exist");
	if (SPI_connect_ext(SPI_OPT_NONATOMIC) != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (!drain_enabled_here())
	{
		SPI_finish();
		return;
	}

	lock_key[0] = Int32GetDatum((int32) queue_relid);
	lock_key[1] = Int32GetDatum(DRAIN_LOCK_KEY);
	outer = CurrentMemoryContext;
	keep = AllocSetContextCreate(TopMemoryContext, "nocrm drain", ALLOCSET_DEFAULT_SIZES);
	nocrm_delivery_begin(&handles);
	nocrm_transfers_begin(&handles);
	PG_TRY();
	{
		/*
		 * Every drain holds this lock shared while it runs (across its
		 * commits); nocrm.stop_worker() finds the drains by it and holds it
		 * exclusively while it stops them.
		 */
		locked = DatumGetBool(DirectFunctionCall2(pg_try_advisory_lock_shared_int4,
												  lock_key[0], lock_key[1]));
		if (!locked)
			ereport(NOTICE,
					(errmsg("nocrm.drain() does not start while nocrm.stop_worker() stops the drains")));
		/* from here on, every transaction has the drain's own settings */
		else
			drain_commit();
		while (locked)
		{
			QueueItem  *items;
			char	   *token;
			int			n,
						fired;

			CHECK_FOR_INTERRUPTS();
			/* a round's allocations all go with it */
			MemoryContextSwitchTo(outer);
			MemoryContextReset(keep);
			MemoryContextSwitchTo(keep);
			token = new_token();

			if (round++ % 50 == 0)
			{
				prune();
				drain_commit();
			}
			/* date rules that fell due (dates.c), before the queue's items */
			fired = nocrm_fire_due_dates(nocrm_drain_batch_size);
			drain_commit();
			/* tasks whose due time passed: task.overdue, once each (task_events.c) */
			fired += nocrm_raise_overdue_tasks(nocrm_drain_batch_size);
			drain_commit();

			/* after a configuration error (delivery.c warned), no more emails this run */
			n = claim(&items, token, handles.smtp_config_error != NULL, keep);
			load_hosts(items, n);
			/* read each round: a rotated secret needs no restart */
			nocrm_credentials_load(&handles);
			drain_commit();

			if (n > 0)
			{
				/*
				 * Delayed actions and their outcomes commit together, so a
				 * crash cannot run one twice.
				 */
				if (lock_actions(items, n, token))
				{
					run_actions(items, n, keep);
					(void) record(items, n, token, true, false);
					note_failures(items, n, true);
				}
				drain_commit();

				/* Deliveries, with no transaction work in flight. */
				deliver_batch(&handles, items, n, token);
				record_and_commit(items, n, token);
				/* pauses and rate allowances, for the next rounds and drains */
				HOLD_INTERRUPTS();
				nocrm_hosts_save();
				drain_commit();
				RESUME_INTERRUPTS();
				/* A cancel waited for the outcomes: it acts now. */
				CHECK_FOR_INTERRUPTS();
				/* More may be due at once; a run with a time limit keeps to it. */
				if (run_time > 0 && GetCurrentTimestamp() >= deadline)
					break;
				continue;
			}
			if (fired > 0 && GetCurrentTimestamp() < deadline)
				continue;		/* more may be due */
			if (GetCurrentTimestamp() >= deadline)
				break;
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 nocrm_drain_poll_ms, PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
			/* A new transaction, so now() in the next claim is after the wait. */
			drain_commit();
		}
	}
	PG_FINALLY();
	{
		nocrm_transfers_end(&handles);
		nocrm_delivery_end(&handles);
		MemoryContextSwitchTo(outer);
		MemoryContextDelete(keep);
		if (locked)
			(void) DirectFunctionCall2(pg_advisory_unlock_shared_int4, lock_key[0], lock_key[1]);
	}
	PG_END_TRY();
	SPI_finish();
}
