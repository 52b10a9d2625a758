/*
 * hosts.c — politeness per receiving HTTP host (host:port of a webhook URL,
 * or of nocrm.push_url): the pause a 429 or 503 with Retry-After asked for,
 * and the nocrm.webhook_rate allowance (GCRA: a "used until" time per host;
 * the rate's count may go at once, then one per period/count).
 *
 * Kept in this process's memory while a drain runs, and in
 * nocrm.webhook_hosts between runs and between drains: read for a round's
 * hosts when it claims, written after it records.
 */
#include "nocrm.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"

typedef struct HostState
{
	char		host[256];		/* hash key */
	TimestampTz paused_until;	/* 0 = not paused */
	long		pause_status;
	TimestampTz used_until;		/* GCRA theoretical arrival time, 0 = unused */
	bool		dirty;			/* changed since the last save */
} HostState;

static HTAB *hosts = NULL;
static SPIPlanPtr plan_load,
			plan_save,
			plan_prune;

/*
 * nocrm.webhook_hosts came with 1.3: before ALTER EXTENSION UPDATE (the
 * library is new, the schema not yet) the state is only kept in memory.
 */
#define HOSTS_TABLE "webhook_hosts"

/* the parsed nocrm.webhook_rate, and the string it was parsed from */
static const char *rate_parsed_from = NULL;
static int	rate_count = 0;
static double rate_period = 0;

/*
 * Parses nocrm.webhook_rate: empty or "off" (no limit), or COUNT/PERIOD
 * with PERIOD a unit (s, sec, second, m, min, minute, h, hour) optionally
 * after a number: "20/s", "600/min", "100/10s".  false with *problem.
 */
bool
nocrm_parse_rate(const char *value, int *count, double *period, const char **problem)
{
	const char *p = value;
	char	   *end;
	long		n;
	double		mult = 1;
	size_t		len;

	*count = 0;
	*period = 0;
	while (p && *p == ' ')
		p++;
	if (p == NULL || *p == '\0' || pg_strcasecmp(p, "off") == 0)
		return true;
	errno = 0;
	n = strtol(p, &end, 10);
	if (end == p || errno != 0 || n < 1 || n > 1000000)
	{
		*problem = "The count before \"/\" must be a whole number from 1 to 1000000.";
		return false;
	}
	p = end;
	while (*p == ' ')
		p++;
	if (*p != '/')
	{
		*problem = "Give COUNT/PERIOD, e.g. 20/s, 600/min or 100/10s.";
		return false;
	}
	p++;
	while (*p == ' ')
		p++;
	if (*p >= '0' && *p <= '9')
	{
		errno = 0;
		mult = strtol(p, &end, 10);
		if (errno != 0 || mult < 1 || mult > 86400)
		{
			*problem = "The number before the unit must be from 1 to 86400.";
			return false;
		}
		p = end;
	}
	len = strlen(p);
	while (len > 0 && p[len - 1] == ' ')
		len--;
	if ((len == 1 && p[0] == 's') || (len == 3 && strncmp(p, "sec", 3) == 0) ||
		(len == 6 && strncmp(p, "second", 6) == 0))
		*period = mult;
	else if ((len == 1 && p[0] == 'm') || (len == 3 && strncmp(p, "min", 3) == 0) ||
			 (len == 6 && strncmp(p, "minute", 6) == 0))
		*period = mult * 60;
	else if ((len == 1 && p[0] == 'h') || (len == 4 && strncmp(p, "hour", 4) == 0))
		*period = mult * 3600;
	else
	{
		*problem = "The period is s, sec, second, m, min, minute, h or hour, optionally after a number: 20/s, 600/min, 100/10s.";
		return false;
	}
	*count = (int) n;
	return true;
}

static void
current_rate(void)
{
	const char *problem;

	if (rate_parsed_from == nocrm_webhook_rate)
		return;
	/* checked when set (guc.c): a value that fails here means no limit */
	if (!nocrm_parse_rate(nocrm_webhook_rate, &rate_count, &rate_period, &problem))
		rate_count = 0;
	rate_parsed_from = nocrm_webhook_rate;
}

static HostState *
host_state(const char *host, bool create)
{
	char		key[256];
	bool		found;
	HostState  *s;

	if (hosts == NULL)
	{
		HASHCTL		ctl;

		if (!create)
			return NULL;
		ctl.keysize = sizeof(key);
		ctl.entrysize = sizeof(HostState);
		ctl.hcxt = TopMemoryContext;
		hosts = hash_create("nocrm receiving hosts", 64, &ctl, HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	}
	strlcpy(key, host, sizeof(key));
	s = hash_search(hosts, key, create ? HASH_ENTER : HASH_FIND, &found);
	if (s && !found)
	{
		s->paused_until = 0;
		s->pause_status = 0;
		s->used_until = 0;
		s->dirty = false;
	}
	return s;
}

/*
 * Reads what other drains (or earlier runs) know of these hosts, in the
 * caller's transaction; what this drain has not saved yet is kept.
 */
void
nocrm_hosts_load(const char **names, int n)
{
	Oid			types[1] = {TEXTARRAYOID};
	Datum	   *d;
	Datum		args[1];
	int			m = 0;

	if (n == 0 || !nocrm_table_exists(HOSTS_TABLE))
		return;
	d = palloc(sizeof(Datum) * n);
	for (int i = 0; i < n; i++)
		d[m++] = CStringGetTextDatum(names[i]);
	args[0] = PointerGetDatum(construct_array(d, m, TEXTOID, -1, false, TYPALIGN_INT));
	nocrm_plan(&plan_load,
			   "SELECT host, coalesce(paused_until, '-infinity') > now(), paused_until,"
			   "       pause_status, rate_used_until > now(), rate_used_until"
			   "  FROM nocrm.webhook_hosts WHERE host = ANY ($1)",
			   1, types);
	nocrm_exec_plan(plan_load, args, NULL, SPI_OK_SELECT, "reading nocrm.webhook_hosts failed");
	/* the table is the truth for what this drain has saved: an admin may have lifted a pause */
	for (int i = 0; i < n; i++)
	{
		HostState  *s = host_state(names[i], false);

		if (s && !s->dirty)
			s->paused_until = s->used_until = 0;
	}
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		HostState  *s = host_state(SPI_getvalue(tup, desc, 1), true);
		bool		isnull,
					live;
		Datum		v;

		live = DatumGetBool(SPI_getbinval(tup, desc, 2, &isnull));
		if (!isnull && live)
		{
			TimestampTz until = DatumGetTimestampTz(SPI_getbinval(tup, desc, 3, &isnull));

			if (until > s->paused_until)
			{
				s->paused_until = until;
				v = SPI_getbinval(tup, desc, 4, &isnull);
				s->pause_status = isnull ? 0 : DatumGetInt32(v);
			}
		}
		live = DatumGetBool(SPI_getbinval(tup, desc, 5, &isnull));
		if (!isnull && live)
		{
			TimestampTz until = DatumGetTimestampTz(SPI_getbinval(tup, desc, 6, &isnull));

			if (until > s->used_until)
				s->used_until = until;
		}
	}
	SPI_freetuptable(SPI_tuptable);
}

/*
 * Writes the hosts changed since the last save, keeping the later of the
 * stored and our times.  In a subtransaction: a row another drain holds
 * for longer than lock_timeout costs a WARNING, not the run.
 */
void
nocrm_hosts_save(void)
{
	HASH_SEQ_STATUS seq;
	HostState  *s;
	MemoryContext oldcontext = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	Oid			types[4] = {TEXTOID, TIMESTAMPTZOID, INT4OID, TIMESTAMPTZOID};

	if (hosts == NULL || !nocrm_table_exists(HOSTS_TABLE))
		return;
	BeginInternalSubTransaction(NULL);
	PG_TRY();
	{
		nocrm_plan(&plan_save,
				   "INSERT INTO nocrm.webhook_hosts AS w (host, paused_until, pause_status, rate_used_until)"
				   " VALUES ($1, $2, $3, $4)"
				   " ON CONFLICT (host) DO UPDATE"
				   "   SET paused_until = CASE WHEN coalesce(excluded.paused_until, '-infinity')"
				   "                                >= coalesce(w.paused_until, '-infinity')"
				   "                           THEN excluded.paused_until ELSE w.paused_until END,"
				   "       pause_status = CASE WHEN coalesce(excluded.paused_until, '-infinity')"
				   "                                >= coalesce(w.paused_until, '-infinity')"
				   "                           THEN excluded.pause_status ELSE w.pause_status END,"
				   "       rate_used_until = greatest(excluded.rate_used_until, w.rate_used_until),"
				   "       updated_at = now()",
				   4, types);
		hash_seq_init(&seq, hosts);
		while ((s = hash_seq_search(&seq)) != NULL)
		{
			Datum		args[4];
			char		nulls[4] = {' ', ' ', ' ', ' '};

			if (!s->dirty)
				continue;
			args[0] = CStringGetTextDatum(s->host);
			args[1] = TimestampTzGetDatum(s->paused_until);
			args[2] = Int32GetDatum((int32) s->pause_status);
			args[3] = TimestampTzGetDatum(s->used_until);
			if (s->paused_until == 0)
				nulls[1] = nulls[2] = 'n';
			if (s->used_until == 0)
				nulls[3] = 'n';
			nocrm_exec_plan(plan_save, args, nulls, SPI_OK_INSERT, "writing nocrm.webhook_hosts failed");
			s->dirty = false;
		}
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldcontext);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
		ereport(WARNING,
				(errmsg("nocrm.drain() could not write nocrm.webhook_hosts: %s", edata->message),
				 errdetail("The pauses and rate allowances of this round hold in this drain only.")));
	}
	PG_END_TRY();
}

/* Rows that no longer pause or limit anyone, an hour after. */
void
nocrm_hosts_prune(void)
{
	if (!nocrm_table_exists(HOSTS_TABLE))
		return;
	nocrm_plan(&plan_prune,
			   "DELETE FROM nocrm.webhook_hosts"
			   " WHERE coalesce(greatest(paused_until, rate_used_until), updated_at)"
			   "       < now() - interval '1 hour'",
			   0, NULL);
	nocrm_exec_plan(plan_prune, NULL, NULL, SPI_OK_DELETE, "pruning nocrm.webhook_hosts failed");
}

/* Seconds the host asked us to wait still, 0 when it is not paused. */
double
nocrm_host_paused_for(const char *host)
{
	HostState  *s = host_state(host, false);
	TimestampTz now = GetCurrentTimestamp();

	if (s == NULL || s->paused_until <= now)
		return 0;
	return (double) (s->paused_until - now) / USECS_PER_SEC;
}

/* A 429 or 503 with Retry-After: nothing more to this host for that long. */
void
nocrm_host_pause(const char *host, double seconds, long status)
{
	HostState  *s = host_state(host, true);
	TimestampTz until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), (int64) (seconds * 1000));

	if (until > s->paused_until)
	{
		s->paused_until = until;
		s->pause_status = status;
		s->dirty = true;
	}
}

/*
 * Seconds from now until the host may get the (k+1)-th next request under
 * nocrm.webhook_rate (k = 0: the next one); 0 = now, or no limit.
 */
double
nocrm_host_rate_wait(const char *host, int k)
{
	HostState  *s;
	TimestampTz now = GetCurrentTimestamp();
	double		interval,
				tat,
				at;

	current_rate();
	if (rate_count == 0)
		return 0;
	s = host_state(host, false);
	interval = rate_period / rate_count;
	/* in seconds from now */
	tat = s ? Max(0, (double) (s->used_until - now) / USECS_PER_SEC) : 0;
	at = tat + k * interval - (rate_count - 1) * interval;
	return Max(0, at);
}

/* A request to the host starts now: it uses one of its allowance. */
void
nocrm_host_rate_take(const char *host)
{
	HostState  *s;
	TimestampTz now = GetCurrentTimestamp();

	current_rate();
	if (rate_count == 0)
		return;
	s = host_state(host, true);
	s->used_until = Max(s->used_until, now) +
		(TimestampTz) (rate_period / rate_count * USECS_PER_SEC);
	s->dirty = true;
}
