/*
 * guc.c — settings of nocrm_automation and the module's entry point.
 */
#include "nocrm.h"

#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "utils/guc.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

int			nocrm_max_chain_depth = 5;
int			nocrm_history_level = HISTORY_ALL;
bool		nocrm_automations_enabled = true;
char	   *nocrm_actor = NULL;

char	   *nocrm_smtp_url = NULL;
char	   *nocrm_smtp_user = NULL;
char	   *nocrm_smtp_password = NULL;
int			nocrm_smtp_tls = SMTP_TLS_TRY;
char	   *nocrm_mail_from = NULL;
char	   *nocrm_mail_from_name = NULL;
char	   *nocrm_smtp_helo_name = NULL;
char	   *nocrm_smtp_ca_file = NULL;
char	   *nocrm_smtp_ca_path = NULL;
bool		nocrm_smtp_tls_verify = true;
char	   *nocrm_smtp_tls_server_name = NULL;
char	   *nocrm_smtp_tls_pinned_key = NULL;
char	   *nocrm_http_ca_file = NULL;
char	   *nocrm_http_ca_path = NULL;
char	   *nocrm_push_url = NULL;
char	   *nocrm_webhook_secret = NULL;
int			nocrm_connect_timeout_ms = 5000;
int			nocrm_request_timeout_ms = 20000;
int			nocrm_webhook_host_concurrency = 1;
int			nocrm_webhook_max_retry_after_s = 3600;
char	   *nocrm_webhook_rate = NULL;
int			nocrm_drain_batch_size = 100;
int			nocrm_drain_run_seconds = 60;
int			nocrm_drain_poll_ms = 200;
int			nocrm_drain_enabled = DRAIN_ENABLED_AUTO;
char	   *nocrm_worker_database = NULL;
char	   *nocrm_worker_role = NULL;
int			nocrm_lease_seconds = 300;
int			nocrm_max_attempts = 8;
int			nocrm_retry_base_seconds = 30;
int			nocrm_retry_max_seconds = 3600;
int			nocrm_queue_retention_seconds = 7 * 24 * 3600;
int			nocrm_run_log_retention_seconds = 30 * 24 * 3600;
int			nocrm_run_log_level = RUN_LOG_AUTO;

static const struct config_enum_entry tls_options[] = {
	{"none", SMTP_TLS_NONE, false},
	{"try", SMTP_TLS_TRY, false},
	{"require", SMTP_TLS_REQUIRE, false},
	{NULL, 0, false}
};

/* auto, plus the spellings of a boolean */
static const struct config_enum_entry drain_enabled_options[] = {
	{"auto", DRAIN_ENABLED_AUTO, false},
	{"on", DRAIN_ENABLED_ON, false},
	{"off", DRAIN_ENABLED_OFF, false},
	{"true", DRAIN_ENABLED_ON, true},
	{"false", DRAIN_ENABLED_OFF, true},
	{"yes", DRAIN_ENABLED_ON, true},
	{"no", DRAIN_ENABLED_OFF, true},
	{"1", DRAIN_ENABLED_ON, true},
	{"0", DRAIN_ENABLED_OFF, true},
	{NULL, 0, false}
};

static const struct config_enum_entry history_options[] = {
	{"none", HISTORY_NONE, false},
	{"actions", HISTORY_ACTIONS, false},
	{"all", HISTORY_ALL, false},
	{NULL, 0, false}
};

static const struct config_enum_entry run_log_options[] = {
	{"auto", RUN_LOG_AUTO, false},
	{"none", RUN_LOG_NONE, false},
	{"exceptions", RUN_LOG_EXCEPTIONS, false},
	{"all", RUN_LOG_ALL, false},
	{NULL, 0, false}
};

static bool
check_smtp_url(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL || (*newval)[0] == '\0' ||
		pg_strncasecmp(*newval, "smtp://", 7) == 0 || pg_strncasecmp(*newval, "smtps://", 8) == 0)
		return true;
	GUC_check_errdetail("nocrm.smtp_url must start with smtp:// or smtps://.");
	return false;
}

/* Settings only SQL reads (nocrm.record_failures): kept here for their checks. */
static int	alert_interval_seconds = 3600;
static int	alert_failures = 5;
static int	alert_failure_window_seconds = 3600;
static int	auto_disable_failures = 0;
static char *alert_webhook_url = NULL;

/* As a webhook action's url: http(s)://, no spaces, at most 2000 bytes. */
static bool
check_alert_webhook_url(char **newval, void **extra, GucSource source)
{
	const char *v = *newval;

	if (v == NULL || v[0] == '\0')
		return true;
	if ((strncmp(v, "http://", 7) == 0 || strncmp(v, "https://", 8) == 0) &&
		strpbrk(v, " \t\r\n") == NULL && strlen(v) <= 2000)
		return true;
	GUC_check_errdetail("nocrm.alert_webhook_url must be an http:// or https:// URL without spaces, of at most 2000 bytes.");
	return false;
}

/* A host name (letters, digits, '-', '.') or an address literal [...]. */
static bool
check_host_name(char **newval, void **extra, GucSource source)
{
	const char *v = *newval;
	size_t		len = v ? strlen(v) : 0;

	if (len == 0)
		return true;
	if (len > 253)
	{
		GUC_check_errdetail("A host name has at most 253 characters.");
		return false;
	}
	if (v[0] == '[' && v[len - 1] == ']')
	{
		size_t		skip = strncmp(v + 1, "IPv6:", 5) == 0 ? 6 : 1;

		if (len > skip + 1 && strspn(v + skip, "0123456789abcdefABCDEF:.") == len - skip - 1)
			return true;
		GUC_check_errdetail("An address literal is [IPv4] or [IPv6:...].");
		return false;
	}
	if (strspn(v, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.") != len ||
		v[0] == '.' || v[0] == '-' || strstr(v, "..") != NULL)
	{
		GUC_check_errdetail("Give an ASCII host name such as crm.example.com (an internationalized one as xn--...).");
		return false;
	}
	return true;
}

/* A public key pin as libcurl takes it: sha256//<base64>[;sha256//...], or a key file. */
static bool
check_pinned_key(char **newval, void **extra, GucSource source)
{
	const char *v = *newval;

	if (v == NULL || v[0] == '\0' || v[0] == '/' || strncmp(v, "sha256//", 8) == 0)
		return true;
	GUC_check_errdetail("Give sha256//<base64 of the SHA-256 of the public key> (several separated by ;), or the absolute path of a PEM or DER public key file.");
	return false;
}

/* A display name: text on one line. */
static bool
check_display_name(char **newval, void **extra, GucSource source)
{
	const char *v = *newval;

	if (v == NULL)
		return true;
	if (strlen(v) > 200)
	{
		GUC_check_errdetail("A display name has at most 200 bytes.");
		return false;
	}
	if (!pg_verify_mbstr(PG_UTF8, v, strlen(v), true))
	{
		GUC_check_errdetail("A display name must be UTF-8.");
		return false;
	}
	for (; *v; v++)
		if ((unsigned char) *v < 0x20 || *v == 0x7f)
		{
			GUC_check_errdetail("A display name cannot hold line breaks or control characters.");
			return false;
		}
	return true;
}

/* nocrm.webhook_rate: empty, off, or COUNT/PERIOD (hosts.c parses it). */
static bool
check_webhook_rate(char **newval, void **extra, GucSource source)
{
	int			count;
	double		period;
	const char *problem = NULL;

	if (nocrm_parse_rate(*newval, &count, &period, &problem))
		return true;
	GUC_check_errdetail("%s", problem);
	GUC_check_errhint("E.g. nocrm.webhook_rate = '20/s' (each host at most 20 requests a second), '600/min', or '' for no limit.");
	return false;
}

void
nocrm_define_gucs(void)
{
	DefineCustomStringVariable("nocrm.actor",
							   "The CRM user (id or email) on whose behalf this session changes leads.",
							   "Recorded as the actor in nocrm.lead_history. Empty means unknown.",
							   &nocrm_actor,
							   "",
							   PGC_USERSET,
							   0,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("nocrm.max_chain_depth",
							"How deep automations may trigger one another.",
							"1 means automations react to people's changes only. Deeper automations are stopped and the stop is logged.",
							&nocrm_max_chain_depth,
							5, 1, 100,
							PGC_SUSET,
							0,
							NULL, NULL, NULL);

	DefineCustomEnumVariable("nocrm.history",
							 "What nocrm.lead_history records: all, actions or none.",
							 "all records every event and automated action; actions only automated actions and stops.",
							 &nocrm_history_level,
							 HISTORY_ALL,
							 history_options,
							 PGC_SUSET,
							 0,
							 NULL, NULL, NULL);

	DefineCustomBoolVariable("nocrm.automations_enabled",
							 "Whether automations run.",
							 "When off, events are still recorded but no automation fires (e.g. for bulk imports).",
							 &nocrm_automations_enabled,
							 true,
							 PGC_SUSET,
							 0,
							 NULL, NULL, NULL);

	/* Delivery.  Credentials are superuser-only and hidden from others. */
	DefineCustomStringVariable("nocrm.smtp_url",
							   "SMTP server for outgoing mail, e.g. smtp://mail.example.com:587 or smtps://...:465.",
							   NULL, &nocrm_smtp_url, "", PGC_SUSET, 0, check_smtp_url, NULL, NULL);
	DefineCustomStringVariable("nocrm.smtp_user", "SMTP user name.", NULL,
							   &nocrm_smtp_user, "", PGC_SUSET, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);
	DefineCustomStringVariable("nocrm.smtp_password", "SMTP password.", NULL,
							   &nocrm_smtp_password, "", PGC_SUSET,
							   GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL,
							   NULL, NULL, NULL);
	DefineCustomEnumVariable("nocrm.smtp_tls",
							 "TLS for SMTP: none, try (STARTTLS when offered) or require.",
							 NULL, &nocrm_smtp_tls, SMTP_TLS_TRY, tls_options,
							 PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("nocrm.mail_from", "Sender address of automated mail.", NULL,
							   &nocrm_mail_from, "butler@nocrm.invalid", PGC_SUSET, 0,
							   NULL, NULL, NULL);
	DefineCustomStringVariable("nocrm.mail_from_name",
							   "Display name of the From header of automated mail; empty = the bare address.",
							   NULL, &nocrm_mail_from_name, "", PGC_SUSET, 0,
							   check_display_name, NULL, NULL);
	DefineCustomStringVariable("nocrm.smtp_helo_name",
							   "Name this server gives in EHLO/HELO; empty = the domain of nocrm.mail_from, else the host's FQDN.",
							   NULL, &nocrm_smtp_helo_name, "", PGC_SUSET, 0,
							   check_host_name, NULL, NULL);
	DefineCustomStringVariable("nocrm.smtp_ca_file",
							   "CA certificates (PEM file) that the SMTP server's certificate is checked against; empty = the system store.",
							   NULL, &nocrm_smtp_ca_file, "", PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("nocrm.smtp_ca_path",
							   "Directory of CA certificates (OpenSSL hashed names) for the SMTP server's certificate.",
							   NULL, &nocrm_smtp_ca_path, "", PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("nocrm.smtp_tls_verify",
							 "Whether the SMTP server's certificate and name are verified; off encrypts without checking who answers.",
							 NULL, &nocrm_smtp_tls_verify, true, PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("nocrm.smtp_tls_server_name",
							   "Name expected in the SMTP server's certificate when nocrm.smtp_url names it otherwise (e.g. by IP).",
							   NULL, &nocrm_smtp_tls_server_name, "", PGC_SUSET, 0,
							   check_host_name, NULL, NULL);
	DefineCustomStringVariable("nocrm.smtp_tls_pinned_key",
							   "Public key the SMTP server's certificate must carry: sha256//<base64>[;...] or a key file; checked even with nocrm.smtp_tls_verify off.",
							   NULL, &nocrm_smtp_tls_pinned_key, "", PGC_SUSET, 0,
							   check_pinned_key, NULL, NULL);
	DefineCustomStringVariable("nocrm.http_ca_file",
							   "CA certificates (PEM file) for https webhooks and the push gateway; empty = the system store.",
							   NULL, &nocrm_http_ca_file, "", PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("nocrm.http_ca_path",
							   "Directory of CA certificates (OpenSSL hashed names) for https webhooks and the push gateway.",
							   NULL, &nocrm_http_ca_path, "", PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("nocrm.push_url",
							   "Push gateway URL that notify's mobile channel POSTs JSON to.",
							   NULL, &nocrm_push_url, "", PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("nocrm.webhook_secret",
							   "Key of the HMAC-SHA256 signature of webhook bodies (X-Nocrm-Signature).",
							   NULL, &nocrm_webhook_secret, "", PGC_SUSET,
							   GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL, NULL, NULL, NULL);
	DefineCustomIntVariable("nocrm.connect_timeout", "Timeout to connect to a mail or HTTP server.",
							NULL, &nocrm_connect_timeout_ms, 5000, 100, 600000,
							PGC_SUSET, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("nocrm.request_timeout", "Timeout of one delivery, connection included.",
							NULL, &nocrm_request_timeout_ms, 20000, 100, 3600000,
							PGC_SUSET, GUC_UNIT_MS, NULL, NULL, NULL);
	/* Polite webhooks (hosts.c, round.c) */
	DefineCustomStringVariable("nocrm.webhook_rate",
							   "Most requests each webhook host (and the push gateway) gets, as COUNT/PERIOD, e.g. 20/s or 600/min; empty = no limit.",
							   NULL, &nocrm_webhook_rate, "", PGC_SUSET, 0,
							   check_webhook_rate, NULL, NULL);
	DefineCustomIntVariable("nocrm.webhook_host_concurrency",
							"Requests in flight at once to one webhook host (or the push gateway).",
							NULL, &nocrm_webhook_host_concurrency, 1, 1, 100,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("nocrm.webhook_max_retry_after",
							"Longest wait a 429 or 503 Retry-After can ask for; a longer one is cut to this.",
							NULL, &nocrm_webhook_max_retry_after_s, 3600, 1, 7 * 86400,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);

	/* The drain */
	DefineCustomIntVariable("nocrm.drain_batch_size", "Queue items one drain claims at a time.",
							NULL, &nocrm_drain_batch_size, 100, 1, 10000,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("nocrm.drain_run_time",
							"Longest a CALL nocrm.drain() keeps polling; it also stops just before the next whole minute, when pg_cron starts the next run.",
							NULL, &nocrm_drain_run_seconds, 60, 0, 3600,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("nocrm.drain_poll_interval", "Pause of an idle drain between polls.",
							NULL, &nocrm_drain_poll_ms, 200, 10, 60000,
							PGC_SUSET, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomEnumVariable("nocrm.drain_enabled",
							 "Whether CALL nocrm.drain() sends from this database: auto, on or off.",
							 "auto drains unless nocrm.queue is replicated into this database by a subscription.",
							 &nocrm_drain_enabled, DRAIN_ENABLED_AUTO, drain_enabled_options,
							 PGC_SUSET, 0, NULL, NULL, NULL);
	/* The background worker (worker.c): a change makes it restart with the new ones. */
	DefineCustomStringVariable("nocrm.worker_database",
							   "Database whose queue the background worker drains; empty = no worker.",
							   "Needs shared_preload_libraries = 'nocrm_automation'.",
							   &nocrm_worker_database, "", PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("nocrm.worker_role",
							   "Role the background worker connects as; empty = the bootstrap superuser.",
							   NULL, &nocrm_worker_role, "", PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("nocrm.lease_time",
							"How long a claimed item is reserved; after that another drain may take it.",
							NULL, &nocrm_lease_seconds, 300, 1, 86400,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("nocrm.max_attempts", "Delivery attempts before an item is dead.",
							NULL, &nocrm_max_attempts, 8, 1, 1000,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("nocrm.retry_base", "First retry delay; it doubles per attempt, with jitter.",
							NULL, &nocrm_retry_base_seconds, 30, 0, 86400,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("nocrm.retry_max", "Longest retry delay.",
							NULL, &nocrm_retry_max_seconds, 3600, 0, 7 * 86400,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("nocrm.queue_retention",
							"How long delivered and cancelled items are kept before pruning.",
							NULL, &nocrm_queue_retention_seconds, 7 * 24 * 3600, 0, INT_MAX,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);

	DefineCustomEnumVariable("nocrm.run_log",
							 "Which runs nocrm.automation_runs records: auto, all, exceptions or none.",
							 "exceptions records test-mode runs, loop stops and refused moves, not fired runs; "
							 "auto is all with nocrm.history = all, exceptions with actions, none with none.",
							 &nocrm_run_log_level,
							 RUN_LOG_AUTO,
							 run_log_options,
							 PGC_SUSET,
							 0,
							 NULL, NULL, NULL);
	DefineCustomIntVariable("nocrm.run_log_retention",
							"How long nocrm.automation_runs rows are kept; the drain prunes older ones.",
							NULL, &nocrm_run_log_retention_seconds, 30 * 24 * 3600, 0, INT_MAX,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);

	/* Failure alerts (alerts.c; the SQL of nocrm.record_failures reads them) */
	DefineCustomIntVariable("nocrm.alert_interval",
							"Shortest time between two alerts about the same problem.",
							NULL, &alert_interval_seconds, 3600, 0, 30 * 24 * 3600,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("nocrm.alert_failures",
							"Failures of an automation within nocrm.alert_failure_window that raise an automation_failing alert; 0: never.",
							NULL, &alert_failures, 5, 0, 1000000,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("nocrm.alert_failure_window",
							"The window failures of an automation are counted in.",
							NULL, &alert_failure_window_seconds, 3600, 1, 30 * 24 * 3600,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("nocrm.auto_disable_failures",
							"Failures of an automation within nocrm.alert_failure_window after which the drain disables it; 0: never.",
							NULL, &auto_disable_failures, 0, 0, 1000000,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("nocrm.alert_webhook_url",
							   "URL the failure alerts are POSTed to as webhooks; empty: none.",
							   NULL, &alert_webhook_url, "", PGC_SUSET, 0,
							   check_alert_webhook_url, NULL, NULL);

	MarkGUCPrefixReserved("nocrm");
}

void
_PG_init(void)
{
	nocrm_define_gucs();
	nocrm_worker_register();
	nocrm_rules_init();
	nocrm_dispatch_init();
	nocrm_lead_init();
}
