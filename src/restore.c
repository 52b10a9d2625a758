/*
 * restore.c — is this session loading a dump?
 *
 * pg_dump's output, and every pg_restore connection (parallel workers
 * included, with or without --data-only), starts with SET
 * check_function_bodies = false: PostgreSQL documents it as what restores
 * do.  A session that has it off and may write the history itself (a
 * superuser, or a role with INSERT on nocrm.lead_history) is restoring:
 * the rows it loads are what the source database already made, so the
 * extension's triggers derive, validate, record and raise nothing for
 * them.  Outside CREATE / ALTER EXTENSION only (PostgreSQL turns the
 * setting off while it runs an extension script).
 *
 * The privilege condition keeps the opt-in from being a way around the
 * history: agents and admins cannot write history, so for them the
 * setting changes nothing.
 */
#include "nocrm.h"

#include "catalog/namespace.h"
#include "commands/extension.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/proc.h"
#include "utils/acl.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"

PG_FUNCTION_INFO_V1(nocrm_restoring_sql);

/* May this role write the history itself?  Asked once per transaction. */
static bool
may_load_history(Oid role)
{
	Oid			nsp,
				relid;

	if (superuser_arg(role))
		return true;
	nsp = get_namespace_oid("nocrm", true);
	relid = OidIsValid(nsp) ? get_relname_relid("lead_history", nsp) : InvalidOid;
	return OidIsValid(relid) && pg_class_aclcheck(relid, role, ACL_INSERT) == ACLCHECK_OK;
}

/*
 * The one test every trigger entry asks.  Costs one bool test unless
 * check_function_bodies is off.  The role is the one outside any SECURITY
 * DEFINER function (SET ROLE counts), so the answer is the same in the
 * owner-rights triggers as in the caller's.
 */
bool
nocrm_restoring(void)
{
	static LocalTransactionId cached_lxid = InvalidLocalTransactionId;
	static Oid	cached_role = InvalidOid;
	static bool cached = false;
	static bool noticed = false;
	Oid			role;

	if (check_function_bodies || creating_extension)
		return false;
	role = GetOuterUserId();
	if (MyProc->lxid != cached_lxid || role != cached_role)
	{
		cached = may_load_history(role);
		cached_lxid = MyProc->lxid;
		cached_role = role;
		/* Once per session: a setting left off by hand should not go unseen. */
		if (cached && !noticed)
		{
			noticed = true;
			ereport(NOTICE,
					(errmsg("restore mode: the rows this session writes run no automation, stage trigger or history of nocrm_automation"),
					 errdetail("check_function_bodies is off, as pg_dump and pg_restore set it, and the role may write nocrm.lead_history."),
					 errhint("SET check_function_bodies = on to run automations for them.")));
		}
	}
	return cached;
}

/* nocrm.restoring(): the same answer, for the PL/pgSQL triggers' WHEN clauses. */
Datum
nocrm_restoring_sql(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(nocrm_restoring());
}
