/*
 * wake.c — how a committing transaction wakes the background worker
 * (worker.c): the worker publishes its latch and database in shared memory;
 * a transaction that queued work sets that latch when it commits (not
 * before: the worker only sees committed rows), and bumps a counter, so a
 * wake that arrives while the worker is busy draining is not lost.
 *
 * Without shared_preload_libraries there is no shared state and waking does
 * nothing: pg_cron's drain polls instead.
 */
#include "nocrm.h"

#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "storage/spin.h"

typedef struct WakeShared
{
	slock_t		mutex;
	Oid			dboid;			/* database the worker drains; InvalidOid: none */
	int			pgprocno;		/* the worker's PGPROC, -1 when none runs */
	pg_atomic_uint32 wakes;		/* bumped by every wake */
} WakeShared;

static WakeShared *wake_shared = NULL;

/* this transaction wrote queue rows */
static bool queued_this_xact = false;

void
nocrm_wake_shmem_request(void)
{
	RequestAddinShmemSpace(MAXALIGN(sizeof(WakeShared)));
}

void
nocrm_wake_shmem_startup(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	wake_shared = ShmemInitStruct("nocrm_automation worker", sizeof(WakeShared), &found);
	if (!found)
	{
		SpinLockInit(&wake_shared->mutex);
		wake_shared->dboid = InvalidOid;
		wake_shared->pgprocno = -1;
		pg_atomic_init_u32(&wake_shared->wakes, 0);
	}
	LWLockRelease(AddinShmemInitLock);
}

/* The worker announces itself (attach) once connected, and withdraws at exit. */
void
nocrm_wake_attach(bool attach)
{
	if (wake_shared == NULL)
		return;
	SpinLockAcquire(&wake_shared->mutex);
	wake_shared->dboid = attach ? MyDatabaseId : InvalidOid;
	wake_shared->pgprocno = attach ? MyProc->pgprocno : -1;
	SpinLockRelease(&wake_shared->mutex);
}

/* How many wakes so far: the worker drains again when it changed meanwhile. */
uint32
nocrm_wake_count(void)
{
	return wake_shared ? pg_atomic_read_u32(&wake_shared->wakes) : 0;
}

/* Called for every queue row written (actions.c). */
void
nocrm_wake_note_queued(void)
{
	queued_this_xact = true;
}

/* At transaction end (dispatch.c): a commit that queued work wakes the worker. */
void
nocrm_wake_xact_end(bool committed)
{
	int			pgprocno = -1;

	if (!queued_this_xact)
		return;
	queued_this_xact = false;
	if (!committed || wake_shared == NULL)
		return;
	SpinLockAcquire(&wake_shared->mutex);
	if (wake_shared->dboid == MyDatabaseId)
		pgprocno = wake_shared->pgprocno;
	SpinLockRelease(&wake_shared->mutex);
	if (pgprocno < 0)
		return;
	pg_atomic_fetch_add_u32(&wake_shared->wakes, 1);
	SetLatch(&ProcGlobal->allProcs[pgprocno].procLatch);
}
