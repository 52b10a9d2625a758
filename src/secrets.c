/*
 * secrets.c — credentials kept where PostgreSQL keeps them: the options of
 * the USER MAPPING FOR PUBLIC on the server nocrm_credentials, as
 * postgres_fdw keeps passwords.  pg_user_mappings shows them only to
 * superusers (nobody else has USAGE on the server); nocrm.set_secret()
 * lets nocrm_admin set or clear one without reading it.  The settings
 * nocrm.smtp_user, nocrm.smtp_password and nocrm.webhook_secret are used
 * while no secret of that name is set.
 */
#include "nocrm.h"

#include "access/reloptions.h"
#include "catalog/pg_foreign_data_wrapper.h"
#include "catalog/pg_foreign_server.h"
#include "catalog/pg_user_mapping.h"
#include "commands/defrem.h"
#include "foreign/foreign.h"
#include "utils/builtins.h"
#include "utils/syscache.h"

PG_FUNCTION_INFO_V1(nocrm_credentials_validator);

static const char *const secret_names[] = {"smtp_user", "smtp_password", "webhook_secret"};

/* VALIDATOR of the FDW nocrm_credentials: known names, on the user mapping only. */
Datum
nocrm_credentials_validator(PG_FUNCTION_ARGS)
{
	List	   *options = untransformRelOptions(PG_GETARG_DATUM(0));
	Oid			catalog = PG_GETARG_OID(1);
	ListCell   *lc;

	foreach(lc, options)
	{
		DefElem    *def = (DefElem *) lfirst(lc);
		bool		known = false;

		for (int i = 0; i < lengthof(secret_names); i++)
			known |= strcmp(def->defname, secret_names[i]) == 0;
		if (!known || catalog != UserMappingRelationId)
			ereport(ERROR,
					(errcode(ERRCODE_FDW_INVALID_OPTION_NAME),
					 errmsg("invalid option \"%s\"", def->defname),
					 errhint(catalog == UserMappingRelationId
							 ? "Valid options are smtp_user, smtp_password and webhook_secret."
							 : "Secrets go on the USER MAPPING FOR PUBLIC: use nocrm.set_secret().")));
	}
	PG_RETURN_VOID();
}

/* One secret from the mapping, copied into CurrentMemoryContext; NULL if unset. */
static char *
mapped_secret(Oid serverid, const char *name)
{
	HeapTuple	tup = SearchSysCache2(USERMAPPINGUSERSERVER, ObjectIdGetDatum(InvalidOid),
									  ObjectIdGetDatum(serverid));
	char	   *value = NULL;
	bool		isnull;
	Datum		options;
	ListCell   *lc;

	if (!HeapTupleIsValid(tup))
		return NULL;
	options = SysCacheGetAttr(USERMAPPINGUSERSERVER, tup, Anum_pg_user_mapping_umoptions, &isnull);
	if (!isnull)
		foreach(lc, untransformRelOptions(options))
		{
			DefElem    *def = (DefElem *) lfirst(lc);

			if (strcmp(def->defname, name) == 0)
				value = pstrdup(defGetString(def));
		}
	ReleaseSysCache(tup);
	return value;
}

/*
 * The credentials for this round of deliveries, read again each round so a
 * rotation needs no restart.  Needs a transaction (the drain's).
 */
void
nocrm_credentials_load(DeliveryHandles *h)
{
	ForeignServer *server = GetForeignServerByName("nocrm_credentials", true);
	char	   *user = server ? mapped_secret(server->serverid, "smtp_user") : NULL;
	char	   *password = server ? mapped_secret(server->serverid, "smtp_password") : NULL;
	char	   *webhook = server ? mapped_secret(server->serverid, "webhook_secret") : NULL;

	h->smtp_user = user ? user : nocrm_smtp_user;
	h->smtp_password = password ? password : nocrm_smtp_password;
	h->webhook_secret = webhook ? webhook : nocrm_webhook_secret;
}
