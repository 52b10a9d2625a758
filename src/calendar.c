/*
 * calendar.c — working time: a user's weekly hours in their time zone, or,
 * for users without hours of their own and leads without owner, the company
 * calendar (nocrm.business_calendar, business_hours, holidays); and delays
 * counted in business time ("2 business hours", "3 business days").
 *
 * nocrm.is_working(), nocrm.next_working_time() and nocrm.delay_until() are
 * this file, so every caller (respect_working_hours, group picks, explain,
 * other actions) gets the same answer.  The company calendar is read once
 * per transaction; a change to its tables in the transaction is seen at
 * once (the statement trigger below).  A user's hours are read per call.
 */
#include "nocrm.h"

#include "commands/trigger.h"
#include "pgtime.h"
#include "storage/proc.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/formatting.h"
#include "utils/date.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(nocrm_is_working_sql);
PG_FUNCTION_INFO_V1(nocrm_next_working_time_sql);
PG_FUNCTION_INFO_V1(nocrm_delay_until_sql);
PG_FUNCTION_INFO_V1(nocrm_business_calendar_changed);

/* How far the calendar walks look ahead before giving up. */
#define MAX_WALK_DAYS		3660	/* 10 years of local days, for the next opening */
#define MAX_DUE_DAYS		36525	/* 100 years, for a business delay's end */
#define MAX_ABSENCE_ROUNDS	200		/* as next_working_time always did */

/* An open period of a local day, in microseconds from midnight; end <= 24:00. */
typedef struct Span
{
	int64		start;
	int64		end;
} Span;

typedef struct Calendar
{
	pg_tz	   *tz;
	bool		all_day;		/* the company calendar without hours: open on every non-holiday */
	int			nspans[8];		/* by ISO weekday, 1 = Monday */
	Span	   *spans[8];		/* sorted, overlaps merged */
	int			nholidays;
	DateADT    *holidays;		/* sorted */
} Calendar;

static const Span whole_day = {0, USECS_PER_DAY};

/* The company calendar of this transaction. */
static MemoryContext company_cxt = NULL;
static Calendar *company = NULL;	/* NULL: not configured */
static LocalTransactionId company_lxid = InvalidLocalTransactionId;
static LocalTransactionId changed_lxid = InvalidLocalTransactionId;

/* The user calendar being used: one at a time, its memory reset per load. */
static MemoryContext user_cxt = NULL;

static SPIPlanPtr plan_company,
			plan_company_hours,
			plan_holidays,
			plan_user_hours,
			plan_absent_until;

static void
connect_spi(void)
{
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
}

static MemoryContext
context_for(MemoryContext *slot)
{
	if (*slot == NULL)
		*slot = AllocSetContextCreate(TopMemoryContext, "nocrm calendar", ALLOCSET_SMALL_SIZES);
	else
		MemoryContextReset(*slot);
	return *slot;
}

static pg_tz *
zone(const char *name)
{
	pg_tz	   *tz = pg_tzset(name);

	if (tz == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("time zone \"%s\" is not recognized", name)));
	return tz;
}

/* Adds a period to its weekday, merging it with the ones it overlaps or touches. */
static void
add_span(Calendar *cal, int weekday, int64 start, int64 end)
{
	int			n = cal->nspans[weekday];
	Span	   *s = cal->spans[weekday];

	/* rows come ordered by start: only the last period can overlap */
	if (n > 0 && start <= s[n - 1].end)
	{
		s[n - 1].end = Max(s[n - 1].end, end);
		return;
	}
	s[n].start = start;
	s[n].end = end;
	cal->nspans[weekday] = n + 1;
}

/*
 * Reads weekly periods (weekday, starts, ends; ordered) from a result whose
 * columns start at first into cal, allocated in the current context.
 */
static void
read_spans(Calendar *cal, SPITupleTable *tt, uint64 nrows, int first)
{
	for (int d = 1; d <= 7; d++)
	{
		cal->spans[d] = palloc(sizeof(Span) * Max(nrows, 1));
		cal->nspans[d] = 0;
	}
	for (uint64 i = 0; i < nrows; i++)
	{
		bool		null1,
					null2,
					null3;
		Datum		wd = SPI_getbinval(tt->vals[i], tt->tupdesc, first, &null1);
		Datum		st = SPI_getbinval(tt->vals[i], tt->tupdesc, first + 1, &null2);
		Datum		en = SPI_getbinval(tt->vals[i], tt->tupdesc, first + 2, &null3);
		int			weekday;

		if (null1 || null2 || null3)
			continue;
		weekday = DatumGetInt32(wd);
		if (weekday < 1 || weekday > 7)
			continue;
		add_span(cal, weekday, DatumGetTimeADT(st), DatumGetTimeADT(en));
	}
}

/* Whether the company calendar must be read (again) in this transaction. */
static bool
company_stale(void)
{
	return company_lxid != MyProc->lxid || changed_lxid == MyProc->lxid;
}

/* The company calendar, NULL when nocrm.business_calendar has no row. */
static Calendar *
company_calendar(void)
{
	MemoryContext old;
	char	   *tzname;
	bool		isnull;
	Calendar   *cal;

	if (!company_stale())
		return company;

	connect_spi();
	company = NULL;
	company_lxid = InvalidLocalTransactionId;
	nocrm_plan(&plan_company, "SELECT c.timezone FROM nocrm.business_calendar c", 0, NULL);
	if (SPI_execute_plan(plan_company, NULL, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "reading nocrm.business_calendar failed");
	old = MemoryContextSwitchTo(context_for(&company_cxt));
	if (SPI_processed == 0)
	{
		MemoryContextSwitchTo(old);
		SPI_finish();
		company_lxid = MyProc->lxid;
		return NULL;
	}
	tzname = TextDatumGetCString(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
											   &isnull));
	cal = palloc0(sizeof(Calendar));
	cal->tz = zone(tzname);
	MemoryContextSwitchTo(old);

	nocrm_plan(&plan_company_hours,
			   "SELECT h.weekday, h.starts, h.ends FROM nocrm.business_hours h ORDER BY 1, 2", 0, NULL);
	if (SPI_execute_plan(plan_company_hours, NULL, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "reading nocrm.business_hours failed");
	old = MemoryContextSwitchTo(company_cxt);
	read_spans(cal, SPI_tuptable, SPI_processed, 1);
	cal->all_day = SPI_processed == 0;
	MemoryContextSwitchTo(old);

	nocrm_plan(&plan_holidays, "SELECT h.day FROM nocrm.holidays h ORDER BY 1", 0, NULL);
	if (SPI_execute_plan(plan_holidays, NULL, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "reading nocrm.holidays failed");
	old = MemoryContextSwitchTo(company_cxt);
	cal->holidays = palloc(sizeof(DateADT) * Max(SPI_processed, 1));
	for (uint64 i = 0; i < SPI_processed; i++)
		cal->holidays[cal->nholidays++] =
			DatumGetDateADT(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull));
	MemoryContextSwitchTo(old);
	SPI_finish();

	company = cal;
	company_lxid = MyProc->lxid;
	return company;
}

/*
 * The calendar that applies to a user (or to nobody, has_user false): their
 * own hours, else the company calendar.  NULL = any time is working time.
 * *known: the user exists (their absences count).
 */
static Calendar *
calendar_for(bool has_user, int64 user_id, bool *known)
{
	Oid			types[1] = {INT8OID};
	Datum		args[1] = {Int64GetDatum(user_id)};
	Calendar   *cal;
	char	   *tzname;
	bool		isnull;
	uint64		n;

	*known = false;
	if (!has_user)
		return company_calendar();

	connect_spi();
	nocrm_plan(&plan_user_hours,
			   "SELECT u.timezone, w.weekday, w.starts, w.ends"
			   "  FROM nocrm.users u"
			   "  LEFT JOIN nocrm.working_hours w ON w.user_id OPERATOR(pg_catalog.=) u.id"
			   " WHERE u.id OPERATOR(pg_catalog.=) $1"
			   " ORDER BY 2, 3", 1, types);
	if (SPI_execute_plan(plan_user_hours, args, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "reading nocrm.working_hours failed");
	n = SPI_processed;
	if (n == 0)
	{
		SPI_finish();
		return NULL;			/* an unknown user works at any time */
	}
	*known = true;
	(void) SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
	if (isnull)
	{
		/* no hours of their own */
		SPI_finish();
		return company_calendar();
	}
	{
		MemoryContext old = MemoryContextSwitchTo(context_for(&user_cxt));

		tzname = TextDatumGetCString(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
												   1, &isnull));
		cal = palloc0(sizeof(Calendar));
		cal->tz = zone(tzname);
		read_spans(cal, SPI_tuptable, n, 2);
		MemoryContextSwitchTo(old);
	}
	SPI_finish();
	return cal;
}

/* --- local time ------------------------------------------------------------ */

/* t as a local date, time of day (µs) and ISO weekday in the calendar's zone. */
static void
local_of(Calendar *cal, TimestampTz t, DateADT *date, int64 *tod, int *isodow)
{
	struct pg_tm tm;
	fsec_t		fsec;
	int			tzoff;
	int			j;

	if (timestamp2tm(t, &tzoff, &tm, &fsec, NULL, cal->tz) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));
	j = date2j(tm.tm_year, tm.tm_mon, tm.tm_mday);
	*date = j - POSTGRES_EPOCH_JDATE;
	*tod = ((((int64) tm.tm_hour * MINS_PER_HOUR) + tm.tm_min) * SECS_PER_MINUTE + tm.tm_sec)
		* USECS_PER_SEC + fsec;
	*isodow = j2day(j) == 0 ? 7 : j2day(j);
}

/* The instant a local date and time of day (24:00 allowed) is, as AT TIME ZONE gives it. */
static TimestampTz
instant_of(Calendar *cal, DateADT date, int64 tod)
{
	Timestamp	local = (Timestamp) date * USECS_PER_DAY + tod;
	struct pg_tm tm;
	fsec_t		fsec;
	int			tzoff;
	TimestampTz result;

	if (timestamp2tm(local, NULL, &tm, &fsec, NULL, NULL) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));
	tzoff = DetermineTimeZoneOffset(&tm, cal->tz);
	if (tm2timestamp(&tm, fsec, &tzoff, &result) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));
	return result;
}

static bool
is_holiday(Calendar *cal, DateADT date)
{
	int			lo = 0,
				hi = cal->nholidays - 1;

	while (lo <= hi)
	{
		int			mid = (lo + hi) / 2;

		if (cal->holidays[mid] == date)
			return true;
		if (cal->holidays[mid] < date)
			lo = mid + 1;
		else
			hi = mid - 1;
	}
	return false;
}

/* The open periods of a local date. */
static const Span *
day_spans(Calendar *cal, DateADT date, int *n)
{
	int			j = date + POSTGRES_EPOCH_JDATE;
	int			isodow = j2day(j) == 0 ? 7 : j2day(j);

	if (is_holiday(cal, date))
	{
		*n = 0;
		return NULL;
	}
	if (cal->all_day)
	{
		*n = 1;
		return &whole_day;
	}
	*n = cal->nspans[isodow];
	return cal->spans[isodow];
}

/* The period open at t, or NULL; its local date in *date. */
static const Span *
span_at(Calendar *cal, TimestampTz t, DateADT *date, int64 *tod)
{
	int			isodow,
				n;
	const Span *s;

	local_of(cal, t, date, tod, &isodow);
	s = day_spans(cal, *date, &n);
	for (int i = 0; i < n; i++)
		if (*tod >= s[i].start && *tod < s[i].end)
			return &s[i];
	return NULL;
}

/* Is t working time on the calendar (NULL: always)? */
static bool
open_at(Calendar *cal, TimestampTz t)
{
	DateADT		date;
	int64		tod;

	if (cal == NULL)
		return true;
	if (TIMESTAMP_NOT_FINITE(t))
		return false;
	return span_at(cal, t, &date, &tod) != NULL;
}

static void
no_open_time(TimestampTz after) pg_attribute_noreturn();

static void
no_open_time(TimestampTz after)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("the calendar has no working time within 10 years after %s",
					timestamptz_to_str(after)),
			 errdetail("Every day is a holiday or has no hours."),
			 errhint("Check nocrm.business_hours and nocrm.holidays.")));
}

/* The first working moment at or after t (local day by local day: DST-safe). */
static TimestampTz
next_open(Calendar *cal, TimestampTz t)
{
	DateADT		date;
	int64		tod;
	int			isodow;

	if (cal == NULL || TIMESTAMP_NOT_FINITE(t) || open_at(cal, t))
		return t;
	local_of(cal, t, &date, &tod, &isodow);
	for (int d = 0; d <= MAX_WALK_DAYS; d++)
	{
		int			n;
		const Span *s = day_spans(cal, date + d, &n);

		for (int i = 0; i < n; i++)
		{
			TimestampTz start = instant_of(cal, date + d, s[i].start);

			if (start > t)
				return start;
		}
	}
	no_open_time(t);
}

/* The end of the open period t is in (t must be open). */
static TimestampTz
open_until(Calendar *cal, TimestampTz t)
{
	DateADT		date;
	int64		tod;
	const Span *s = span_at(cal, t, &date, &tod);
	TimestampTz end;

	if (s == NULL)
		return t;
	end = instant_of(cal, date, s->end);
	/* a DST fold can map the local end before t: count clock time then */
	if (end <= t)
		end = t + (s->end - tod);
	return end;
}

static void
too_far(TimestampTz start) pg_attribute_noreturn();

static void
too_far(TimestampTz start)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("the business delay would end more than 100 years after %s",
					timestamptz_to_str(start)),
			 errdetail("The calendar has too little working time for it."),
			 errhint("Use a shorter delay, or check the working hours and nocrm.holidays.")));
}

/* t plus usecs of working time. */
static TimestampTz
add_working_time(Calendar *cal, TimestampTz t, int64 usecs)
{
	TimestampTz limit = t + (int64) MAX_DUE_DAYS * USECS_PER_DAY;
	TimestampTz start = t;

	t = next_open(cal, t);
	while (t < limit)
	{
		TimestampTz end = open_until(cal, t);

		if (end - t >= usecs)
			return t + usecs;
		usecs -= end - t;
		t = next_open(cal, end);
	}
	too_far(start);
}

/*
 * t plus days business days: the same business-clock time that many
 * business days later (the clock stands still outside the hours, so a start
 * outside them counts from the next opening), or the first working moment
 * after it when that day is closed then.
 */
static TimestampTz
add_business_days(Calendar *cal, TimestampTz t, int64 days)
{
	DateADT		date;
	int64		tod;
	int			isodow;
	int			walked = 0;
	TimestampTz start = t;

	t = next_open(cal, t);
	local_of(cal, t, &date, &tod, &isodow);
	while (days > 0)
	{
		int			n;

		date++;
		if (++walked > MAX_DUE_DAYS)
			too_far(start);
		(void) day_spans(cal, date, &n);
		if (n > 0)
			days--;
	}
	return next_open(cal, instant_of(cal, date, tod));
}

/* --- business delays -------------------------------------------------------- */

/*
 * "N business minutes|hours|days" (any case, singular or plural).  Returns
 * false when str does not use the word "business"; *problem is set when it
 * does but is not such a delay.
 */
bool
nocrm_business_parse(const char *str, int *unit, int64 *amount, const char **problem)
{
	const char *p = str;
	int64		n = 0;
	char		word[16];
	int			len = 0;

	*problem = NULL;
	{
		char	   *lower = asc_tolower(str, strlen(str));
		bool		business = strstr(lower, "business") != NULL;

		pfree(lower);
		if (!business)
			return false;
	}
	while (*p == ' ' || *p == '\t')
		p++;
	if (*p < '0' || *p > '9')
	{
		*problem = "it does not start with a whole number";
		return true;
	}
	while (*p >= '0' && *p <= '9')
	{
		n = n * 10 + (*p++ - '0');
		if (n > 100000000)
		{
			*problem = "the number is too large";
			return true;
		}
	}
	if (*p != ' ' && *p != '\t')
	{
		*problem = "it is not a whole number of business minutes, hours or days";
		return true;
	}
	while (*p == ' ' || *p == '\t')
		p++;
	if (pg_strncasecmp(p, "business", 8) != 0 || (p[8] != ' ' && p[8] != '\t'))
	{
		*problem = "it is not a whole number of business minutes, hours or days";
		return true;
	}
	p += 8;
	while (*p == ' ' || *p == '\t')
		p++;
	while (*p && *p != ' ' && *p != '\t' && len < (int) sizeof(word) - 1)
		word[len++] = *p++;
	word[len] = '\0';
	while (*p == ' ' || *p == '\t')
		p++;
	if (*p != '\0')
		len = 0;
	if (pg_strcasecmp(word, "minute") == 0 || pg_strcasecmp(word, "minutes") == 0)
		*unit = BUSINESS_MINUTES;
	else if (pg_strcasecmp(word, "hour") == 0 || pg_strcasecmp(word, "hours") == 0)
		*unit = BUSINESS_HOURS;
	else if (pg_strcasecmp(word, "day") == 0 || pg_strcasecmp(word, "days") == 0)
		*unit = BUSINESS_DAYS;
	else
		len = 0;
	if (len == 0)
	{
		*problem = "the unit is not business minutes, hours or days";
		return true;
	}
	*amount = n;
	return true;
}

/* The most of each unit: 10 years of round-the-clock time. */
int64
nocrm_business_max(int unit)
{
	switch (unit)
	{
		case BUSINESS_MINUTES:
			return (int64) 3650 * 24 * 60;
		case BUSINESS_HOURS:
			return (int64) 3650 * 24;
		default:
			return 3650;
	}
}

static TimestampTz
business_add(Calendar *cal, TimestampTz start, int unit, int64 amount)
{
	if (unit == BUSINESS_DAYS)
		return add_business_days(cal, start, amount);
	return add_working_time(cal, start,
							amount * (unit == BUSINESS_HOURS ? USECS_PER_HOUR : USECS_PER_MINUTE));
}

/* Plain time, when no calendar applies: N hours, or N days as interval days. */
static TimestampTz
plain_add(TimestampTz start, int unit, int64 amount)
{
	Interval	iv = {0};

	if (unit == BUSINESS_DAYS)
		iv.day = (int32) amount;
	else
		iv.time = amount * (unit == BUSINESS_HOURS ? USECS_PER_HOUR : USECS_PER_MINUTE);
	return DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
												   TimestampTzGetDatum(start),
												   IntervalPGetDatum(&iv)));
}

/*
 * When a business delay from start ends, on the user's hours or else the
 * company calendar; *plain: neither applies, counted in plain time.
 */
TimestampTz
nocrm_business_due(bool has_user, int64 user_id, TimestampTz start, int unit, int64 amount,
				   bool *plain)
{
	bool		known;
	Calendar   *cal = calendar_for(has_user, user_id, &known);

	*plain = cal == NULL;
	if (cal == NULL)
		return plain_add(start, unit, amount);
	return business_add(cal, start, unit, amount);
}

/*
 * The first moment at or after "after" when the user (or, has_user false,
 * the company) works and is not absent.
 */
TimestampTz
nocrm_next_working_time(bool has_user, int64 user_id, TimestampTz after)
{
	Oid			types[2] = {INT8OID, TIMESTAMPTZOID};
	bool		known;
	Calendar   *cal = calendar_for(has_user, user_id, &known);
	TimestampTz t = after;

	if (has_user && !known)
		return after;
	for (int round = 0; round < MAX_ABSENCE_ROUNDS; round++)
	{
		if (known)
		{
			Datum		args[2] = {Int64GetDatum(user_id), TimestampTzGetDatum(t)};
			bool		isnull;
			Datum		until;

			connect_spi();
			nocrm_plan(&plan_absent_until,
					   "SELECT pg_catalog.max(a.ends_at) FROM nocrm.absences a"
					   " WHERE a.user_id OPERATOR(pg_catalog.=) $1"
					   "   AND $2 OPERATOR(pg_catalog.>=) a.starts_at"
					   "   AND $2 OPERATOR(pg_catalog.<) a.ends_at", 2, types);
			if (SPI_execute_plan(plan_absent_until, args, NULL, true, 1) != SPI_OK_SELECT)
				elog(ERROR, "reading nocrm.absences failed");
			until = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
			SPI_finish();
			if (!isnull)
			{
				t = DatumGetTimestampTz(until);
				continue;
			}
		}
		if (open_at(cal, t))
			return t;
		t = next_open(cal, t);
		if (!known)
			return t;			/* nothing else to wait for */
	}
	return t;
}

bool
nocrm_is_working(bool has_user, int64 user_id, TimestampTz at)
{
	bool		known;

	return open_at(calendar_for(has_user, user_id, &known), at);
}

/*
 * At rule-write time: a business delay with no company calendar counts in
 * plain time for leads whose owner has no hours.  Said once, as a WARNING.
 */
void
nocrm_calendar_check_rule(const char *name, RuleAction *actions, int nactions)
{
	for (int i = 0; i < nactions; i++)
	{
		if (actions[i].business_unit == BUSINESS_NONE)
			continue;
		if (company_calendar() != NULL)
			return;
		ereport(WARNING,
				(errcode(ERRCODE_WARNING),
				 errmsg("automation \"%s\": no company calendar, so action %d's business delay counts plain time for leads whose owner has no working hours",
						name, i + 1),
				 errdetail("nocrm.business_calendar has no row; an owner's own working hours still apply."),
				 errhint("Set the company calendar: INSERT INTO nocrm.business_calendar (timezone) VALUES ('Europe/Rome'), then its hours into nocrm.business_hours.")));
		return;
	}
}

/* --- SQL functions ------------------------------------------------------------ */

/* nocrm.is_working(user_id, at): NULL user = the company calendar. */
Datum
nocrm_is_working_sql(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(1))
		PG_RETURN_NULL();
	PG_RETURN_BOOL(nocrm_is_working(!PG_ARGISNULL(0), PG_ARGISNULL(0) ? 0 : PG_GETARG_INT64(0),
									PG_GETARG_TIMESTAMPTZ(1)));
}

/* nocrm.next_working_time(user_id, after): NULL user = the company calendar. */
Datum
nocrm_next_working_time_sql(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(1))
		PG_RETURN_NULL();
	PG_RETURN_TIMESTAMPTZ(nocrm_next_working_time(!PG_ARGISNULL(0),
												  PG_ARGISNULL(0) ? 0 : PG_GETARG_INT64(0),
												  PG_GETARG_TIMESTAMPTZ(1)));
}

/*
 * nocrm.delay_until(user_id, delay, after): when an action with this
 * "delay" queued at "after" falls due (respect_working_hours aside).
 */
Datum
nocrm_delay_until_sql(PG_FUNCTION_ARGS)
{
	TimestampTz after;
	char	   *delay;
	int			unit;
	int64		amount;
	const char *problem;
	bool		plain;

	if (PG_ARGISNULL(2))
		PG_RETURN_NULL();
	after = PG_GETARG_TIMESTAMPTZ(2);
	if (PG_ARGISNULL(1))
		PG_RETURN_TIMESTAMPTZ(after);
	delay = text_to_cstring(PG_GETARG_TEXT_PP(1));
	if (!nocrm_business_parse(delay, &unit, &amount, &problem))
		return DirectFunctionCall2(timestamptz_pl_interval, TimestampTzGetDatum(after),
								   DirectFunctionCall3(interval_in, CStringGetDatum(delay),
													   ObjectIdGetDatum(InvalidOid),
													   Int32GetDatum(-1)));
	if (problem != NULL || amount < 1 || amount > nocrm_business_max(unit))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("bad business delay %s", quote_literal_cstr(delay)),
				 errdetail("%s", problem ? problem : "It must be at least 1 and at most 10 years of business time."),
				 errhint("Write e.g. \"2 business hours\", \"90 business minutes\" or \"3 business days\".")));
	PG_RETURN_TIMESTAMPTZ(nocrm_business_due(!PG_ARGISNULL(0), PG_ARGISNULL(0) ? 0 : PG_GETARG_INT64(0),
											 after, unit, amount, &plain));
}

/*
 * AFTER ... FOR EACH STATEMENT on the company calendar's tables: this
 * transaction reads the calendar afresh from now on (other transactions
 * read it at their start anyway).
 */
Datum
nocrm_business_calendar_changed(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "nocrm_business_calendar_changed: not called as a trigger");
	changed_lxid = MyProc->lxid;
	return PointerGetDatum(NULL);
}
