/*
 * round.c — one drain round's deliveries, with several receiving hosts in
 * flight at once (transfers.c's multi handle).
 *
 * Each host (the SMTP server, the push gateway, each webhook host:port)
 * gets its items in claim order.  A host has at most
 * nocrm.webhook_host_concurrency requests in flight (the SMTP server one:
 * mail goes one message after the other on its connection), starts them
 * no faster than nocrm.webhook_rate allows, may use nocrm.request_timeout
 * of the round, and gets nothing while a Retry-After it sent runs.  What a
 * host may not start now waits for a later moment of the round, or is
 * handed back untried (no attempt used) with the time it may go: one slow
 * or hanging host holds back neither the others nor the mail.
 */
#include "nocrm.h"

#include "miscadmin.h"
#include "utils/hsearch.h"
#include "utils/timestamp.h"

/* Longest libcurl wait between looks at cancels, rate slots and the clock. */
#define ROUND_TICK_MS 100

typedef struct RoundHost
{
	const char *name;
	bool		is_mail;
	int			limit;			/* requests in flight at most */
	int			in_flight;
	int64		used;			/* microseconds of transfers in this round */
	int			next;			/* first waiting transfer, -1 = none */
	int			last;
} RoundHost;

typedef struct HostKey
{
	char		key[256];
	int			index;
} HostKey;

static inline bool
stop_pending(void)
{
	return QueryCancelPending || ProcDiePending;
}

static void
hand_back(Transfer *t, double delay)
{
	t->state = XFER_HANDED_BACK;
	t->hand_back_delay = delay;
	t->finished = GetCurrentTimestamp();
}

/* The host's waiting transfers: skips those no longer waiting (dropped by an admin). */
static int
first_waiting(RoundHost *host, Transfer *xfers, int *link)
{
	while (host->next >= 0 && xfers[host->next].state != XFER_WAITING)
		host->next = link[host->next];
	return host->next;
}

/* Hands back every waiting transfer of the host, the k-th after delay(k). */
static void
hand_back_host(RoundHost *host, Transfer *xfers, int *link, bool rate)
{
	double		paused = host->is_mail ? 0 : nocrm_host_paused_for(host->name);
	int			k = 0;

	for (int i = first_waiting(host, xfers, link); i >= 0; i = link[i])
		if (xfers[i].state == XFER_WAITING)
		{
			double		slot = rate ? nocrm_host_rate_wait(host->name, k++) : 0;

			hand_back(&xfers[i], Max(paused, slot));
		}
	host->next = -1;
}

/*
 * Runs the round: returns when every transfer is done or handed back, or
 * (then with some still XFER_WAITING: the caller hands them back as they
 * are) once hand_back_at has passed or a cancel is pending.  check is
 * called about once a second, to mark as XFER_DROPPED what an admin took
 * back.  The caller holds interrupts.
 */
void
nocrm_deliver_round(DeliveryHandles *h, Transfer *xfers, int n, TimestampTz hand_back_at,
					TakenBackCheck check, void *arg)
{
	HASHCTL		ctl;
	HTAB	   *index;
	RoundHost  *hosts = palloc0(sizeof(RoundHost) * (n + 1));
	int		   *link = palloc(sizeof(int) * (n + 1));
	int		   *host_of = palloc(sizeof(int) * (n + 1));
	Transfer  **done = palloc(sizeof(Transfer *) * (n + 1));
	int			nhosts = 0;
	int			running = 0;
	int			turn = 0;
	TimestampTz checked = GetCurrentTimestamp();
	int64		budget = (int64) nocrm_request_timeout_ms * 1000;

	/* hosts, each with its list of transfers in claim order */
	ctl.keysize = sizeof(((HostKey *) 0)->key);
	ctl.entrysize = sizeof(HostKey);
	ctl.hcxt = CurrentMemoryContext;
	index = hash_create("nocrm round hosts", 64, &ctl, HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	for (int i = 0; i < n; i++)
	{
		char		key[256];
		bool		found;
		HostKey    *e;
		RoundHost  *host;

		link[i] = -1;
		if (xfers[i].state != XFER_WAITING)
			continue;
		snprintf(key, sizeof(key), "%c%s", xfers[i].is_mail ? 'm' : 'h', xfers[i].host);
		e = hash_search(index, key, HASH_ENTER, &found);
		if (!found)
		{
			e->index = nhosts++;
			host = &hosts[e->index];
			host->name = xfers[i].host;
			host->is_mail = xfers[i].is_mail;
			host->limit = host->is_mail ? 1 : nocrm_webhook_host_concurrency;
			host->next = host->last = -1;
		}
		host = &hosts[e->index];
		host_of[i] = e->index;
		if (host->next < 0)
			host->next = i;
		else
			link[host->last] = i;
		host->last = i;
	}
	hash_destroy(index);

	for (;;)
	{
		bool		waiting = false;
		double		soonest = -1;
		int			ndone;

		if (stop_pending())
		{
			/* cut what is in flight; the waiting ones go back untried */
			nocrm_transfers_abort(h, "delivery interrupted by a cancel of the drain");
			break;
		}
		if (check && GetCurrentTimestamp() - checked >= USECS_PER_SEC)
		{
			check(arg);
			checked = GetCurrentTimestamp();
		}
		/* start what may start, one host after the other from a moving first */
		if (GetCurrentTimestamp() < hand_back_at)
			for (int j = 0; j < nhosts; j++)
			{
				RoundHost  *host = &hosts[(turn + j) % nhosts];
				int			i;

				while ((i = first_waiting(host, xfers, link)) >= 0 && host->in_flight < host->limit)
				{
					double		wait;

					if (!host->is_mail && nocrm_host_paused_for(host->name) > 0)
					{
						hand_back_host(host, xfers, link, false);
						break;
					}
					if (host->used >= budget)
					{
						/* behind what is due now: the next rounds serve the others first */
						for (; i >= 0; i = link[i])
							if (xfers[i].state == XFER_WAITING)
								hand_back(&xfers[i], 0);
						host->next = -1;
						break;
					}
					wait = host->is_mail ? 0 : nocrm_host_rate_wait(host->name, 0);
					if (wait > 0)
					{
						if (soonest < 0 || wait < soonest)
							soonest = wait;
						break;
					}
					host->next = link[i];
					if (!host->is_mail)
						nocrm_host_rate_take(host->name);
					if (nocrm_transfer_start(h, &xfers[i]))
					{
						host->in_flight++;
						running++;
					}
				}
				if (first_waiting(host, xfers, link) >= 0)
					waiting = true;
			}
		turn++;
		if (running == 0)
		{
			if (!waiting || GetCurrentTimestamp() >= hand_back_at)
				break;
			/*
			 * Nothing in flight, so only rate limits hold items back: wait
			 * for a slot when it is near, else hand them back for when
			 * their slots come.
			 */
			if (soonest < 0 || soonest * 1000 > nocrm_drain_poll_ms)
			{
				for (int j = 0; j < nhosts; j++)
					if (first_waiting(&hosts[j], xfers, link) >= 0)
						hand_back_host(&hosts[j], xfers, link, true);
				break;
			}
		}
		ndone = nocrm_transfers_wait(h, soonest >= 0 ? Min(ROUND_TICK_MS, (long) (soonest * 1000) + 1) :
									 ROUND_TICK_MS, done, n);
		for (int d = 0; d < ndone; d++)
		{
			Transfer   *t = done[d];
			RoundHost  *host = &hosts[host_of[t - xfers]];

			host->in_flight--;
			running--;
			host->used += t->finished - t->started;
			/* one that hangs has had the host's turn, whatever the clocks say */
			if (t->result.timed_out)
				host->used = Max(host->used, budget);
			/* the host asked for a pause: its other items wait for it too */
			if (!host->is_mail && t->result.retry_after > 0)
				nocrm_host_pause(host->name,
								 Min(t->result.retry_after, (double) nocrm_webhook_max_retry_after_s),
								 t->result.status);
		}
	}
}
