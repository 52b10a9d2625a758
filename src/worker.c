/*
 * worker.c — the background worker that drains one database's queue
 * promptly (shared_preload_libraries = 'nocrm_automation',
 * nocrm.worker_database).  It runs the same drain as CALL nocrm.drain(0),
 * then sleeps until the next item or date firing falls due, at most
 * WORKER_MAX_SLEEP_MS; a transaction that queued work wakes it at commit
 * (wake.c).  Everything the drain guarantees holds: nocrm.drain_enabled,
 * the advisory lock of nocrm.stop_worker() (which cancels the run in
 * progress), concurrent drains (pg_cron's, by hand) claiming disjoint items.
 *
 * A reload that changes nocrm.worker_database or nocrm.worker_role makes it
 * exit, to be started again by the postmaster with the new ones.
 */
#include "nocrm.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "commands/dbcommands.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/pquery.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/portal.h"
#include "utils/snapmgr.h"

PGDLLEXPORT void nocrm_worker_main(Datum arg);

/* Longest sleep: work queued without a wake (requeue_dead(), by hand) waits at most this. */
#define WORKER_MAX_SLEEP_MS 10000
/* Pause after a failed run (a cancel by stop_worker(), an error) before the next. */
#define WORKER_ERROR_PAUSE_MS 1000
/* Seconds before the postmaster starts a worker that exited again. */
#define WORKER_RESTART_SECONDS 5

/* the portal a run is in, while it runs: an error marks it failed, as PortalRun does */
static Portal run_portal = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static void
worker_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	nocrm_wake_shmem_request();
	nocrm_relay_shmem_request();
}

static void
worker_shmem_startup(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	nocrm_wake_shmem_startup();
	nocrm_relay_shmem_startup();
}

/* From _PG_init: only a preloaded library has a worker (and shared memory). */
void
nocrm_worker_register(void)
{
	BackgroundWorker worker;

	if (!process_shared_preload_libraries_in_progress)
		return;
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = worker_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = worker_shmem_startup;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	/* a standby drains nothing: it starts once recovery is over (promotion) */
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = WORKER_RESTART_SECONDS;
	strlcpy(worker.bgw_library_name, "nocrm_automation", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "nocrm_worker_main", BGW_MAXLEN);
	strlcpy(worker.bgw_name, "nocrm_automation drain worker", BGW_MAXLEN);
	strlcpy(worker.bgw_type, "nocrm drain worker", BGW_MAXLEN);
	RegisterBackgroundWorker(&worker);
	nocrm_relay_register();
}

static void
worker_detach(int code, Datum arg)
{
	nocrm_wake_attach(false);
}

static bool
configured(void)
{
	return nocrm_worker_database != NULL && nocrm_worker_database[0] != '\0';
}

/* Reloads the configuration if asked; exits (to be restarted) when the worker's own settings changed. */
static void
reload_if_asked(const char *database, const char *role)
{
	if (!ConfigReloadPending)
		return;
	ConfigReloadPending = false;
	ProcessConfigFile(PGC_SIGHUP);
	if (database != NULL &&
		(strcmp(database, nocrm_worker_database) != 0 || strcmp(role, nocrm_worker_role) != 0))
	{
		ereport(LOG,
				(errmsg("nocrm drain worker of database \"%s\" exits: nocrm.worker_database or nocrm.worker_role changed",
						database)));
		proc_exit(1);
	}
}

/* Milliseconds until the next queue item, lease end, date firing or overdue task is due; capped. */
static long
next_due_ms(void)
{
	long		ms = WORKER_MAX_SLEEP_MS;

	PushActiveSnapshot(GetTransactionSnapshot());
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	/* (nocrm.tasks came with 1.3) */
	if (SPI_execute(psprintf("SELECT (extract(epoch FROM least("
							 "   (SELECT min(run_at) FROM nocrm.queue WHERE state = 'pending'),"
							 "   (SELECT min(lease_until) FROM nocrm.queue WHERE state = 'processing'),"
							 "   (SELECT min(due_at) FROM nocrm.date_firings WHERE state = 'pending')%s)"
							 "   - clock_timestamp()) * 1000)::float8",
							 nocrm_table_exists("tasks")
							 ? ", (SELECT min(due_at) FROM nocrm.tasks WHERE done_at IS NULL AND overdue_at IS NULL)"
							 : ""),
					true, 1) != SPI_OK_SELECT)
		elog(ERROR, "reading the next due time failed");
	if (SPI_processed == 1)
	{
		bool		isnull;
		double		d = DatumGetFloat8(SPI_getbinval(SPI_tuptable->vals[0],
													 SPI_tuptable->tupdesc, 1, &isnull));

		/*
		 * Something due now that the run just made did not take (drain off,
		 * stop_worker() holding its lock, a configuration error): not again
		 * at once, but at the cap, or at the next wake.
		 */
		if (!isnull && d > 0)
			ms = (long) Min(d + 1, (double) WORKER_MAX_SLEEP_MS);
	}
	SPI_finish();
	PopActiveSnapshot();
	return ms;
}

/* One drain run and the time to sleep after it, in milliseconds. */
static long
drain_once(void)
{
	static bool warned_missing = false;
	MemoryContext cxt = CurrentMemoryContext;
	long		sleep_ms = WORKER_MAX_SLEEP_MS;

	PG_TRY();
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		pgstat_report_activity(STATE_RUNNING, "nocrm drain");
		if (nocrm_table_exists("queue"))
		{
			Portal		portal;

			warned_missing = false;

			/*
			 * The drain commits as it goes, as a procedure does: like CALL,
			 * it runs in an active portal, which outlives the commits and
			 * gives its SPI calls their snapshots.
			 */
			portal = CreatePortal("nocrm drain worker", true, true);
			portal->visible = false;
			portal->status = PORTAL_ACTIVE;
			run_portal = portal;
			ActivePortal = portal;
			PortalContext = portal->portalContext;
			MemoryContextSwitchTo(PortalContext);
			nocrm_drain_run(0, false);
			/* as PortalRunUtility does after a CALL */
			if (portal->portalSnapshot != NULL && ActiveSnapshotSet())
				PopActiveSnapshot();
			portal->portalSnapshot = NULL;
			ActivePortal = NULL;
			PortalContext = NULL;
			run_portal = NULL;
			portal->status = PORTAL_DONE;
			PortalDrop(portal, false);
			MemoryContextSwitchTo(cxt);
			sleep_ms = next_due_ms();
		}
		else if (!warned_missing)
		{
			ereport(LOG,
					(errmsg("nocrm drain worker: extension nocrm_automation is not installed in database \"%s\"",
							get_database_name(MyDatabaseId)),
					 errhint("CREATE EXTENSION nocrm_automation there, or change nocrm.worker_database.")));
			warned_missing = true;
		}
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		/* a cancel (nocrm.stop_worker()) or an error: this run ends, the worker goes on */
		MemoryContextSwitchTo(cxt);
		/* failed, the abort's cleanup drops it (an active one it would keep) */
		if (run_portal != NULL)
			MarkPortalFailed(run_portal);
		run_portal = NULL;
		ActivePortal = NULL;
		PortalContext = NULL;
		EmitErrorReport();
		FlushErrorState();
		AbortCurrentTransaction();
		sleep_ms = WORKER_ERROR_PAUSE_MS;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	pgstat_report_activity(STATE_IDLE, NULL);
	return sleep_ms;
}

void
nocrm_worker_main(Datum arg)
{
	char	   *database;
	char	   *role;
	MemoryContext cxt;

	/* SIGTERM: the drain stops after recording what it sent (die, not an immediate exit) */
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	/* off until a reload names a database */
	while (!configured())
	{
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_EXIT_ON_PM_DEATH, -1L, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		reload_if_asked(NULL, NULL);
	}
	database = MemoryContextStrdup(TopMemoryContext, nocrm_worker_database);
	role = MemoryContextStrdup(TopMemoryContext, nocrm_worker_role);
	BackgroundWorkerInitializeConnection(database, role[0] != '\0' ? role : NULL, 0);
	nocrm_wake_attach(true);
	before_shmem_exit(worker_detach, (Datum) 0);
	ereport(LOG, (errmsg("nocrm drain worker started for database \"%s\"", database)));

	cxt = AllocSetContextCreate(TopMemoryContext, "nocrm drain worker", ALLOCSET_DEFAULT_SIZES);
	MemoryContextSwitchTo(cxt);
	for (;;)
	{
		uint32		seen = nocrm_wake_count();
		long		sleep_ms;

		CHECK_FOR_INTERRUPTS();
		reload_if_asked(database, role);
		sleep_ms = drain_once();
		MemoryContextReset(cxt);
		/* a commit woke us while we drained: its rows may have come after the last claim */
		if (nocrm_wake_count() != seen && sleep_ms != WORKER_ERROR_PAUSE_MS)
			continue;
		/*
		 * After a cancel, the whole pause: stop_worker() cancels every 50 ms
		 * until it gets its lock, and a run started at each of its wakes
		 * would keep it waiting.
		 */
		(void) WaitLatch(MyLatch,
						 (sleep_ms == WORKER_ERROR_PAUSE_MS ? 0 : WL_LATCH_SET) |
						 WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 sleep_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		/* a cancel while idle has nothing to cancel (outside a run it would end the worker) */
		QueryCancelPending = false;
	}
}
