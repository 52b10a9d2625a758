/*
 * drain.c — CALL nocrm.drain(): delivers due queue items.
 *
 * pg_cron starts one run a minute; a run keeps going until its run time is
 * up, so mail leaves within a poll interval of the commit that queued it.
 * Each round: claim a batch (FOR UPDATE SKIP LOCKED, with a lease) and
 * commit; run delayed actions in one transaction; send emails and POSTs
 * with no transaction work in flight; record the outcomes and commit.  A
 * drain that dies leaves its claimed items to the next run once the lease
 * ends; every item keeps one idempotency key across attempts.
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
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
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
	/* outcome */
	const char *state;
	char	   *error;
	bool		retry;
	bool		released;		/* not tried: handed back without using an attempt */
	bool		recorded;
} QueueItem;

static SPIPlanPtr plan_claim,
			plan_record,
			plan_prune;

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

/*
 * Claims up to batch_size due items (and items whose lease ran out) and
 * renders them, all into memory that survives the commit.
 */
static int
claim(QueueItem **items, const char *token, MemoryContext keep)
{
	Oid			types[3] = {INT4OID, INT4OID, UUIDOID};
	Datum		args[3];
	int			n;
	MemoryContext old;

	nocrm_plan(&plan_claim,
			   /* each partial index walked in order, so a claim costs the same with any backlog */
			   "WITH due AS (SELECT id FROM nocrm.queue"
			   "              WHERE state = 'pending' AND run_at <= now()"
			   "              ORDER BY run_at LIMIT $1 FOR UPDATE SKIP LOCKED),"
			   "     expired AS (SELECT id FROM nocrm.queue"
			   "                  WHERE state = 'processing' AND lease_until < now()"
			   "                  ORDER BY lease_until LIMIT $1 FOR UPDATE SKIP LOCKED),"
			   "     claimed AS ("
			   "  UPDATE nocrm.queue q"
			   "     SET state = 'processing', attempts = q.attempts + 1,"
			   "         lease_until = now() + make_interval(secs => $2),"
			   "         claim_token = $3, last_attempt_at = now()"
			   "   WHERE q.id IN (SELECT id FROM due UNION ALL SELECT id FROM expired)"
			   "  RETURNING q.*)"
			   " SELECT c.id, c.kind, c.recipient, c.idempotency_key, c.attempts, c.event,"
			   "        c.automation_id, c.action_no, c.lead_id, c.payload, t.subject, t.body,"
			   "        CASE WHEN c.kind = 'email'"
			   "             THEN nocrm.template_context(c.lead_id, c.payload, c.automation_id, c.event) END,"
			   "        c.actor_id"
			   "   FROM claimed c"
			   "   LEFT JOIN nocrm.email_templates t ON c.kind = 'email'"
			   "        AND t.name = coalesce(c.payload ->> 'template', 'notification')"
			   "  ORDER BY c.run_at, c.id",
			   3, types);
	args[0] = Int32GetDatum(nocrm_drain_batch_size);
	args[1] = Int32GetDatum(nocrm_lease_seconds);
	args[2] = DirectFunctionCall1(uuid_in, CStringGetDatum(token));
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

		switch (item->kind)
		{
			case ITEM_EMAIL:
				if (subject == NULL)
				{
					item->state = "dead";
					item->error = psprintf("email template \"%s\" does not exist",
										   text_col(tup, desc, 11) ? text_col(tup, desc, 11) : "?");
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
	if (r->ok)
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
		item->error = r->error;
	}
}

static void
deliver(DeliveryHandles *h, QueueItem *item)
{
	DeliveryResult r;

	switch (item->kind)
	{
		case ITEM_EMAIL:
			nocrm_send_mail(h, item->recipient,
							nocrm_build_message(nocrm_mail_from, item->recipient, item->subject,
												item->body, item->idempotency_key),
							&r);
			break;
		case ITEM_MOBILE:
			nocrm_post_json(h, nocrm_push_url, item->body, item->idempotency_key,
							item->event, NULL, &r);
			break;
		case ITEM_WEBHOOK:
			nocrm_post_json(h, item->recipient, item->body, item->idempotency_key,
							item->event, nocrm_webhook_secret, &r);
			break;
		case ITEM_ACTION:
			return;
	}
	outcome(item, &r);
}

/* Runs each due delayed action in its own subtransaction. */
static void
run_actions(QueueItem *items, int n, MemoryContext keep)
{
	for (int i = 0; i < n; i++)
	{
		QueueItem  *item = &items[i];
		MemoryContext oldcontext = CurrentMemoryContext;
		ResourceOwner oldowner = CurrentResourceOwner;

		if (item->kind != ITEM_ACTION || item->state != NULL)
			continue;
		BeginInternalSubTransaction(NULL);
		PG_TRY();
		{
			const char *why = nocrm_run_delayed(item->automation_id, item->action_no,
												item->lead_id, item->event, item->payload,
												item->actor_id);

			ReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(oldcontext);
			CurrentResourceOwner = oldowner;
			item->state = why ? "cancelled" : "done";
			item->error = why ? MemoryContextStrdup(keep, why) : NULL;
		}
		PG_CATCH();
		{
			ErrorData  *edata;
			DeliveryResult r;

			MemoryContextSwitchTo(keep);
			edata = CopyErrorData();
			FlushErrorState();
			RollbackAndReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(oldcontext);
			CurrentResourceOwner = oldowner;
			memset(&r, 0, sizeof(r));
			r.error = edata->message;
			outcome(item, &r);
		}
		PG_END_TRY();
	}
}

/* Writes the outcomes of the batch's items not yet recorded, in one statement. */
static void
record(QueueItem *items, int n, const char *token)
{
	Oid			types[6] = {INT8ARRAYOID, TEXTARRAYOID, TEXTARRAYOID, FLOAT8ARRAYOID,
	BOOLARRAYOID, UUIDOID};
	Datum	   *ids = palloc(sizeof(Datum) * n);
	Datum	   *states = palloc(sizeof(Datum) * n);
	Datum	   *errors = palloc(sizeof(Datum) * n);
	bool	   *error_nulls = palloc(sizeof(bool) * n);
	Datum	   *retries = palloc(sizeof(Datum) * n);
	bool	   *retry_nulls = palloc(sizeof(bool) * n);
	Datum	   *released = palloc(sizeof(Datum) * n);
	int			m = 0;
	int			dims[1];
	int			lbs[1] = {1};
	Datum		args[6];

	for (int i = 0; i < n; i++)
	{
		QueueItem  *item = &items[i];

		if (item->recorded)
			continue;
		item->recorded = true;
		ids[m] = Int64GetDatum(item->id);
		states[m] = CStringGetTextDatum(item->state ? item->state : "pending");
		errors[m] = item->error ? CStringGetTextDatum(item->error) : (Datum) 0;
		error_nulls[m] = item->error == NULL;
		retries[m] = Float8GetDatum(item->retry ? backoff_seconds(item->attempts) : 0);
		retry_nulls[m] = !item->retry;
		released[m] = BoolGetDatum(item->released);
		m++;
	}
	if (m == 0)
		return;
	dims[0] = m;
	args[0] = PointerGetDatum(construct_array(ids, m, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	args[1] = PointerGetDatum(construct_array(states, m, TEXTOID, -1, false, TYPALIGN_INT));
	args[2] = PointerGetDatum(construct_md_array(errors, error_nulls, 1, dims, lbs,
												 TEXTOID, -1, false, TYPALIGN_INT));
	args[3] = PointerGetDatum(construct_md_array(retries, retry_nulls, 1, dims, lbs,
												 FLOAT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	args[4] = PointerGetDatum(construct_array(released, m, BOOLOID, 1, true, TYPALIGN_CHAR));
	args[5] = DirectFunctionCall1(uuid_in, CStringGetDatum(token));

	/* A row re-claimed by another drain after our lease ran out is theirs now. */
	nocrm_plan(&plan_record,
			   "UPDATE nocrm.queue q"
			   "   SET state = o.state, last_error = coalesce(o.error, q.last_error),"
			   "       attempts = q.attempts - CASE WHEN o.released THEN 1 ELSE 0 END,"
			   "       run_at = CASE WHEN o.retry IS NULL THEN q.run_at"
			   "                     ELSE now() + make_interval(secs => o.retry) END,"
			   "       delivered_at = CASE WHEN o.state = 'done' THEN clock_timestamp() END,"
			   "       lease_until = NULL, claim_token = NULL"
			   "  FROM unnest($1::bigint[], $2::text[], $3::text[], $4::float8[], $5::boolean[])"
			   "       AS o(id, state, error, retry, released)"
			   " WHERE q.id = o.id AND q.claim_token = $6",
			   6, types);
	nocrm_exec_plan(plan_record, args, NULL, SPI_OK_UPDATE, "recording deliveries failed");
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
			   "     r AS (DELETE FROM nocrm.automation_runs WHERE id IN ("
			   "    SELECT id FROM nocrm.automation_runs"
			   "     WHERE created_at < now() - make_interval(secs => $2)"
			   "     ORDER BY created_at LIMIT 1000 FOR UPDATE SKIP LOCKED) RETURNING 1)"
			   " SELECT (SELECT count(*) FROM q) + (SELECT count(*) FROM r)",
			   2, types);
	nocrm_exec_plan(plan_prune, args, NULL, SPI_OK_SELECT, "pruning failed");
}

static char *
new_token(void)
{
	char	   *buf = palloc(37);
	uint8		b[16];

	for (int i = 0; i < 16; i++)
		b[i] = (uint8) pg_prng_uint32(&pg_global_prng_state);
	b[6] = (b[6] & 0x0f) | 0x40;
	b[8] = (b[8] & 0x3f) | 0x80;
	snprintf(buf, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
			 b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9],
			 b[10], b[11], b[12], b[13], b[14], b[15]);
	return buf;
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
	double		run_time = PG_ARGISNULL(0) ? nocrm_drain_run_seconds : PG_GETARG_FLOAT8(0);
	TimestampTz deadline;
	MemoryContext keep;
	DeliveryHandles handles;
	int			round = 0;

	if (call == NULL || !IsA(call, CallContext) || call->atomic)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TRANSACTION_STATE),
				 errmsg("nocrm.drain() must be run with CALL outside a transaction block"),
				 errdetail("It commits after each batch and sends mail between transactions."),
				 errhint("Run CALL nocrm.drain(); on its own, as pg_cron does.")));
	/* A standby drains nothing; its queue runs once it is promoted. */
	if (RecoveryInProgress())
	{
		ereport(NOTICE,
				(errmsg("nocrm.drain() does nothing on a standby"),
				 errdetail("The queue is drained on the primary; after promotion, here.")));
		PG_RETURN_VOID();
	}
	if (run_time < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("run_time must not be negative"),
				 errhint("Give seconds, or 0 to stop as soon as nothing is due.")));
	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), (int64) (run_time * 1000));
	if (PG_ARGISNULL(0))
	{
		/*
		 * pg_cron starts a run every whole minute: stop half a second before
		 * the next one, so runs follow each other without a gap.
		 */
		TimestampTz now = GetCurrentTimestamp();
		TimestampTz next_minute = now - now % (60 * USECS_PER_SEC) + 60 * USECS_PER_SEC;

		deadline = Min(deadline, next_minute - USECS_PER_SEC / 2);
	}

	keep = AllocSetContextCreate(TopMemoryContext, "nocrm drain", ALLOCSET_DEFAULT_SIZES);
	if (SPI_connect_ext(SPI_OPT_NONATOMIC) != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	nocrm_delivery_begin(&handles);
	PG_TRY();
	{
		for (;;)
		{
			QueueItem  *items;
			char	   *token;
			int			n;
			MemoryContext old;

			CHECK_FOR_INTERRUPTS();
			MemoryContextReset(keep);
			old = MemoryContextSwitchTo(keep);
			token = new_token();
			MemoryContextSwitchTo(old);

			if (round++ % 50 == 0)
			{
				prune();
				SPI_commit();
			}
			n = claim(&items, token, keep);
			SPI_commit();

			if (n > 0)
			{
				TimestampTz hand_back = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
																	(int64) nocrm_lease_seconds * 500);

				/*
				 * Delayed actions and their outcomes commit together, so a
				 * crash cannot run one twice.
				 */
				run_actions(items, n, keep);
				for (int i = 0; i < n; i++)
					items[i].recorded = items[i].kind != ITEM_ACTION;
				record(items, n, token);
				SPI_commit();
				for (int i = 0; i < n; i++)
					items[i].recorded = items[i].kind == ITEM_ACTION;

				/*
				 * Deliveries, with no transaction work in flight.  Items not
				 * reached by half the lease are handed back unattempted, so
				 * a slow batch never outlives its claim.
				 */
				for (int i = 0; i < n; i++)
				{
					if (items[i].state != NULL)
						continue;
					if (GetCurrentTimestamp() >= hand_back)
					{
						items[i].state = "pending";
						items[i].released = true;
						continue;
					}
					deliver(&handles, &items[i]);
				}
				record(items, n, token);
				SPI_commit();
				/* More may be due at once; a run with a time limit keeps to it. */
				if (run_time > 0 && GetCurrentTimestamp() >= deadline)
					break;
				continue;
			}
			if (GetCurrentTimestamp() >= deadline)
				break;
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 nocrm_drain_poll_ms, PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
			/* A new transaction, so now() in the next claim is after the wait. */
			SPI_commit();
		}
	}
	PG_FINALLY();
	{
		nocrm_delivery_end(&handles);
		MemoryContextDelete(keep);
	}
	PG_END_TRY();
	SPI_finish();
	PG_RETURN_VOID();
}
