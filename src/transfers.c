/*
 * transfers.c — the libcurl multi handle of a drain run: several deliveries
 * in flight at once, each with its own timeout, driven without blocking on
 * any one of them.
 *
 * delivery.c builds each request (nocrm_*_prepare) and judges its answer
 * (nocrm_*_finish); round.c decides what starts when.  Connections are kept
 * by the multi handle for the whole run, so they are reused across rounds.
 */
#include "nocrm.h"

#include <curl/curl.h>

#include "miscadmin.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

/* the transfers in the multi handle now */
static Transfer **running = NULL;
static int	nrunning = 0;
static int	running_size = 0;

void
nocrm_transfers_begin(DeliveryHandles *h)
{
	CURLM	   *m;

	/* after nocrm_delivery_begin, which initialises libcurl */
	m = curl_multi_init();
	if (m == NULL)
		elog(ERROR, "curl_multi_init failed");
	/* keep a connection to each host the run talks to */
	if (curl_multi_setopt(m, CURLMOPT_MAXCONNECTS, 64L) != CURLM_OK)
	{
		curl_multi_cleanup(m);
		elog(ERROR, "libcurl refused CURLMOPT_MAXCONNECTS");
	}
	h->multi = m;
	nrunning = 0;
}

/* Frees the handles of transfers still in flight (after an error) and the multi handle. */
void
nocrm_transfers_end(DeliveryHandles *h)
{
	CURLM	   *m = (CURLM *) h->multi;

	if (m == NULL)
		return;
	for (int i = 0; i < nrunning; i++)
	{
		Transfer   *t = running[i];

		(void) curl_multi_remove_handle(m, (CURL *) t->easy);
		if (!t->is_mail)
			curl_easy_cleanup((CURL *) t->easy);
		t->easy = NULL;
	}
	nrunning = 0;
	(void) curl_multi_cleanup(m);
	h->multi = NULL;
}

static void
track(Transfer *t)
{
	if (nrunning == running_size)
	{
		running_size = Max(16, running_size * 2);
		running = running ?
			repalloc(running, sizeof(Transfer *) * running_size) :
			MemoryContextAlloc(TopMemoryContext, sizeof(Transfer *) * running_size);
	}
	running[nrunning++] = t;
}

static void
untrack(Transfer *t)
{
	for (int i = 0; i < nrunning; i++)
		if (running[i] == t)
		{
			running[i] = running[--nrunning];
			return;
		}
}

static bool
add(DeliveryHandles *h, Transfer *t)
{
	CURLMcode	rc = curl_multi_add_handle((CURLM *) h->multi, (CURL *) t->easy);

	if (rc != CURLM_OK)
	{
		/* not sent: a retry with the usual backoff */
		if (!t->is_mail)
			curl_easy_cleanup((CURL *) t->easy);
		t->easy = NULL;
		t->work = NULL;
		memset(&t->result, 0, sizeof(t->result));
		t->result.error = psprintf("libcurl could not start the transfer: %s",
								   curl_multi_strerror(rc));
		return false;
	}
	track(t);
	return true;
}

/*
 * Starts t.  false when it is over at once (nothing to send, or libcurl
 * would not take it): t->state is XFER_DONE with its result.
 */
bool
nocrm_transfer_start(DeliveryHandles *h, Transfer *t)
{
	bool		ready;

	t->started = GetCurrentTimestamp();
	ready = t->is_mail ? nocrm_mail_prepare(h, t, false) : nocrm_http_prepare(h, t);
	if (ready && add(h, t))
	{
		t->state = XFER_RUNNING;
		return true;
	}
	t->state = XFER_DONE;
	t->finished = GetCurrentTimestamp();
	return false;
}

/* A finished transfer: judged, or (an email on a stale connection) started again. */
static bool
finished(DeliveryHandles *h, Transfer *t, CURLcode res)
{
	CURLMcode	rc = curl_multi_remove_handle((CURLM *) h->multi, (CURL *) t->easy);

	untrack(t);
	if (rc != CURLM_OK)
		elog(WARNING, "curl_multi_remove_handle failed: %s", curl_multi_strerror(rc));
	if (t->is_mail)
	{
		if (nocrm_mail_finish(h, t, res))
		{
			/* once more, at once, on a new connection */
			if (nocrm_mail_prepare(h, t, true) && add(h, t))
				return false;
		}
	}
	else
		nocrm_http_finish(t, res);
	t->state = XFER_DONE;
	t->finished = GetCurrentTimestamp();
	return true;
}

/*
 * Lets the transfers in flight progress for up to timeout_ms (less when one
 * of them ends) and returns those that ended, judged, in done[].  With none
 * in flight it just waits.
 */
int
nocrm_transfers_wait(DeliveryHandles *h, long timeout_ms, Transfer **done, int max_done)
{
	CURLM	   *m = (CURLM *) h->multi;
	CURLMcode	rc;
	CURLMsg    *msg;
	int			still,
				left,
				numfds,
				n = 0;

	rc = curl_multi_perform(m, &still);
	if (rc == CURLM_OK && still > 0 && nrunning > 0)
		rc = curl_multi_poll(m, NULL, 0, (int) timeout_ms, &numfds);
	else if (rc == CURLM_OK && nrunning == 0)
		pg_usleep(timeout_ms * 1000L);
	if (rc == CURLM_OK)
		rc = curl_multi_perform(m, &still);
	if (rc != CURLM_OK)
		elog(ERROR, "libcurl's multi interface failed: %s", curl_multi_strerror(rc));
	while (n < max_done && (msg = curl_multi_info_read(m, &left)) != NULL)
	{
		Transfer   *t = NULL;

		if (msg->msg != CURLMSG_DONE)
			continue;
		if (curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &t) != CURLE_OK || t == NULL)
			elog(ERROR, "a libcurl transfer lost its queue item");
		if (finished(h, t, msg->data.result))
			done[n++] = t;
	}
	return n;
}

/* Ends every transfer in flight without an answer: error why, not sent as far as we know. */
void
nocrm_transfers_abort(DeliveryHandles *h, const char *why)
{
	while (nrunning > 0)
	{
		Transfer   *t = running[nrunning - 1];

		/* judged as libcurl would have, had the progress callback cut it */
		(void) finished(h, t, CURLE_ABORTED_BY_CALLBACK);
		if (t->state != XFER_DONE)
			continue;			/* an email set up again: cut it too */
		if (t->result.error == NULL)
			t->result.error = pstrdup(why);
	}
}
