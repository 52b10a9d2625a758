/*
 * relay.c — browser notifications' NOTIFYs sent after the commit, by a
 * background worker, instead of by the user's transaction.
 *
 * PostgreSQL serializes the commits of transactions that issued NOTIFY: a
 * global lock is held from PreCommit_Notify across the commit's WAL flush,
 * so every lead insert that notifies waits for the others' flushes.  With
 * the library preloaded and nocrm.worker_database naming this database, a
 * transaction keeps its payloads in memory, reserves room for them in a
 * shared ring just before commit, and copies them there once committed; the
 * relay worker sends them (same channel, same payloads, from its own pid)
 * in one transaction per batch.  Without the worker, or when the ring is
 * full, the transaction sends them itself, as before.
 *
 * A NOTIFY is a wake-up for listeners, not a record: the rows are in
 * nocrm.notifications.  Payloads copied to the ring but not yet sent when
 * the relay worker dies (or the server crashes) are lost.
 */
#include "nocrm.h"

#include "access/xact.h"
#include "commands/async.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "storage/lwlock.h"
#include "tcop/tcopprot.h"
#include "utils/memutils.h"

PGDLLEXPORT void nocrm_relay_main(Datum arg);

#define RELAY_RING_BYTES	(1024 * 1024)
#define RELAY_CHANNEL		"nocrm_notifications"

/*
 * Woken, the relay lets this long pass with its latch still set before it
 * takes the ring: the commits meanwhile find the latch set and send no
 * signal (a kill() per commit cost the writers about 6 % of their CPU).
 */
#define RELAY_GATHER_US		2000

typedef struct RelayShared
{
	LWLock	   *lock;
	Oid			dboid;			/* the relay worker's database; InvalidOid: none */
	int			pgprocno;		/* its PGPROC, -1 when none runs */
	Oid			ring_dboid;		/* the database the waiting payloads belong to */
	Size		used;			/* bytes of payloads waiting, from data[0] */
	Size		reserved;		/* bytes promised to committing transactions */
	char		data[FLEXIBLE_ARRAY_MEMBER];	/* NUL-terminated payloads */
} RelayShared;

static RelayShared *relay = NULL;

/* This transaction's payloads (in TopTransactionContext), with their subtransactions. */
typedef struct HeldPayload
{
	char	   *payload;
	SubTransactionId subid;
} HeldPayload;

static HeldPayload *held = NULL;
static int	nheld = 0,
			held_cap = 0;
static Size held_bytes = 0;
static Size reserved_here = 0;	/* reserved at pre-commit, to copy at commit */

static Size
relay_size(void)
{
	return add_size(offsetof(RelayShared, data), RELAY_RING_BYTES);
}

void
nocrm_relay_shmem_request(void)
{
	RequestAddinShmemSpace(MAXALIGN(relay_size()));
	RequestNamedLWLockTranche("nocrm_relay", 1);
}

void
nocrm_relay_shmem_startup(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	relay = ShmemInitStruct("nocrm_automation notify relay", relay_size(), &found);
	if (!found)
	{
		relay->lock = &(GetNamedLWLockTranche("nocrm_relay"))->lock;
		relay->dboid = relay->ring_dboid = InvalidOid;
		relay->pgprocno = -1;
		relay->used = relay->reserved = 0;
	}
	LWLockRelease(AddinShmemInitLock);
}

/* Does a relay worker run for this database? */
static bool
relay_running(void)
{
	bool		running;

	if (relay == NULL)
		return false;
	LWLockAcquire(relay->lock, LW_SHARED);
	running = relay->pgprocno >= 0 && relay->dboid == MyDatabaseId;
	LWLockRelease(relay->lock);
	return running;
}

/*
 * A browser notification's NOTIFY: held for the relay when one runs for
 * this database, else sent by this transaction at its commit.
 */
void
nocrm_relay_notify(const char *payload)
{
	MemoryContext old;

	if (!relay_running())
	{
		Async_Notify(RELAY_CHANNEL, payload);
		return;
	}
	old = MemoryContextSwitchTo(TopTransactionContext);
	if (nheld == held_cap)
	{
		held_cap = held_cap ? held_cap * 2 : 16;
		held = held ? repalloc(held, sizeof(HeldPayload) * held_cap)
			: palloc(sizeof(HeldPayload) * held_cap);
	}
	held[nheld].payload = pstrdup(payload);
	held[nheld].subid = GetCurrentSubTransactionId();
	held_bytes += strlen(payload) + 1;
	nheld++;
	MemoryContextSwitchTo(old);
}

/* A rolled-back subtransaction's payloads go with it, as its NOTIFYs would. */
void
nocrm_relay_subxact_abort(SubTransactionId subid)
{
	int			kept = 0;

	for (int i = 0; i < nheld; i++)
	{
		if (held[i].subid >= subid)
		{
			held_bytes -= strlen(held[i].payload) + 1;
			continue;
		}
		held[kept++] = held[i];
	}
	nheld = kept;
}

/*
 * Just before commit: room in the ring for this transaction's payloads, or,
 * if there is none (or the relay stopped), the NOTIFYs sent the usual way
 * (PreCommit_Notify comes after this callback).  A PREPARE sends them too,
 * so it fails as it would with any NOTIFY.
 */
void
nocrm_relay_pre_commit(bool prepare)
{
	bool		room = false;

	if (nheld == 0)
		return;
	if (relay != NULL && !prepare)
	{
		LWLockAcquire(relay->lock, LW_EXCLUSIVE);
		if (relay->pgprocno >= 0 && relay->dboid == MyDatabaseId &&
			relay->used + relay->reserved + held_bytes <= RELAY_RING_BYTES)
		{
			relay->reserved += held_bytes;
			room = true;
		}
		LWLockRelease(relay->lock);
	}
	if (room)
	{
		reserved_here = held_bytes;
		return;
	}
	for (int i = 0; i < nheld; i++)
		Async_Notify(RELAY_CHANNEL, held[i].payload);
	nheld = 0;
	held_bytes = 0;
}

/* Transaction end: a commit hands its payloads to the relay; an abort drops them. */
void
nocrm_relay_xact_end(bool committed)
{
	int			pgprocno = -1;

	if (reserved_here > 0)
	{
		LWLockAcquire(relay->lock, LW_EXCLUSIVE);
		relay->reserved -= reserved_here;
		if (committed)
		{
			for (int i = 0; i < nheld; i++)
			{
				Size		len = strlen(held[i].payload) + 1;

				memcpy(&relay->data[relay->used], held[i].payload, len);
				relay->used += len;
			}
			pgprocno = relay->pgprocno;
		}
		LWLockRelease(relay->lock);
		if (pgprocno >= 0)
			SetLatch(&ProcGlobal->allProcs[pgprocno].procLatch);
	}
	/* the memory went with TopTransactionContext */
	held = NULL;
	nheld = held_cap = 0;
	held_bytes = reserved_here = 0;
}

/* From _PG_init, with the drain worker (worker.c). */
void
nocrm_relay_register(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 5;
	strlcpy(worker.bgw_library_name, "nocrm_automation", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "nocrm_relay_main", BGW_MAXLEN);
	strlcpy(worker.bgw_name, "nocrm_automation notify relay", BGW_MAXLEN);
	strlcpy(worker.bgw_type, "nocrm notify relay", BGW_MAXLEN);
	RegisterBackgroundWorker(&worker);
}

static void
relay_detach(int code, Datum arg)
{
	LWLockAcquire(relay->lock, LW_EXCLUSIVE);
	relay->pgprocno = -1;
	relay->dboid = InvalidOid;
	LWLockRelease(relay->lock);
}

/* Sends what the ring holds, in one transaction. */
static void
relay_send(char *buf)
{
	Size		n;

	LWLockAcquire(relay->lock, LW_EXCLUSIVE);
	n = relay->used;
	memcpy(buf, relay->data, n);
	relay->used = 0;
	LWLockRelease(relay->lock);
	if (n == 0)
		return;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	pgstat_report_activity(STATE_RUNNING, "nocrm notify relay");
	for (Size off = 0; off < n; off += strlen(&buf[off]) + 1)
		Async_Notify(RELAY_CHANNEL, &buf[off]);
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);
}

void
nocrm_relay_main(Datum arg)
{
	char	   *database;
	char	   *buf;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	/* the drain worker's database: off until a reload names one */
	while (nocrm_worker_database == NULL || nocrm_worker_database[0] == '\0')
	{
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_EXIT_ON_PM_DEATH, -1L, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
	}
	database = MemoryContextStrdup(TopMemoryContext, nocrm_worker_database);
	BackgroundWorkerInitializeConnection(database,
										 nocrm_worker_role[0] != '\0' ? nocrm_worker_role : NULL, 0);
	buf = MemoryContextAlloc(TopMemoryContext, RELAY_RING_BYTES);
	before_shmem_exit(relay_detach, (Datum) 0);
	LWLockAcquire(relay->lock, LW_EXCLUSIVE);
	if (relay->ring_dboid != MyDatabaseId)
		relay->used = 0;		/* a predecessor's, for another database */
	relay->ring_dboid = relay->dboid = MyDatabaseId;
	relay->pgprocno = MyProc->pgprocno;
	LWLockRelease(relay->lock);
	ereport(LOG, (errmsg("nocrm notify relay started for database \"%s\"", database)));

	for (;;)
	{
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			if (strcmp(database, nocrm_worker_database) != 0)
			{
				ereport(LOG,
						(errmsg("nocrm notify relay of database \"%s\" exits: nocrm.worker_database changed",
								database)));
				proc_exit(1);
			}
		}
		relay_send(buf);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_EXIT_ON_PM_DEATH, -1L, PG_WAIT_EXTENSION);
		pg_usleep(RELAY_GATHER_US);
		/* before the ring is read: a later commit sets the latch again */
		ResetLatch(MyLatch);
	}
}
