/*
 * chain.c — the chain of automations and stage triggers running now, and
 * who is acting.
 *
 * Actions change leads through ordinary SQL, so their changes raise events
 * of their own, nested inside the action.  The chain makes the Butler the
 * actor, bounds the depth and stops a rule from re-firing on a change its
 * own chain made.  Reset at transaction end.
 */
#include "nocrm.h"

#include "utils/builtins.h"
#include "utils/memutils.h"

#define MAX_CHAIN 101			/* nocrm.max_chain_depth is at most 100 */

static int32 chain[MAX_CHAIN];
static int	chain_len = 0;

/* The person whose change started the current chain. */
static int64 root_actor = -1;
static bool root_actor_given = false;
static int64 given_root_actor = -1;

/* The last nocrm.actor value resolved, so each row need not look it up. */
static char *actor_text = NULL;
static int64 actor_id = -1;
static uint64 actor_generation = 0;

int
nocrm_chain_depth(void)
{
	return chain_len;
}

/* Top of the chain: an automation id, or minus a stage trigger id. */
int32
nocrm_chain_automation(void)
{
	return chain_len > 0 ? chain[chain_len - 1] : 0;
}

void
nocrm_chain_push(int32 id)
{
	if (chain_len >= MAX_CHAIN)
		elog(ERROR, "automation chain too deep");
	chain[chain_len++] = id;
}

/*
 * Enters the chain as automation id (or stage trigger -id); the first to
 * enter notes whose change started it, for the run log.
 */
void
nocrm_chain_enter(int32 id)
{
	if (chain_len == 0)
	{
		root_actor = root_actor_given ? given_root_actor : nocrm_current_actor();
		root_actor_given = false;
	}
	nocrm_chain_push(id);
}

/* For a delayed action: the person whose change queued it (-1: unknown). */
void
nocrm_set_root_actor(int64 actor)
{
	root_actor_given = true;
	given_root_actor = actor;
}

/* The person whose change started the current chain, or the current actor. */
int64
nocrm_root_actor(void)
{
	return chain_len > 0 ? root_actor : nocrm_current_actor();
}

void
nocrm_chain_pop(void)
{
	Assert(chain_len > 0);
	chain_len--;
}

bool
nocrm_chain_contains(int32 id)
{
	for (int i = 0; i < chain_len; i++)
		if (chain[i] == id)
			return true;
	return false;
}

/*
 * The actor of the current change: the Butler inside an automation's chain,
 * else the user named by nocrm.actor, else -1 (unknown).
 */
int64
nocrm_current_actor(void)
{
	bool		found;
	int64		id;
	const char *text = nocrm_actor ? nocrm_actor : "";

	if (chain_len > 0)
		return BUTLER_ID;
	if (text[0] == '\0')
		return -1;
	/* Valid until the setting or nocrm.users changes (the rule cache's signal). */
	if (actor_text != NULL && strcmp(actor_text, text) == 0 &&
		actor_generation == nocrm_rules_generation())
		return actor_id;

	if (strspn(text, "0123456789") == strlen(text) && strlen(text) < 19)
		id = nocrm_lookup_id("SELECT id FROM nocrm.users WHERE id = $1",
							 Int64GetDatum(strtoll(text, NULL, 10)), INT8OID, &found);
	else
		id = nocrm_lookup_id("SELECT id FROM nocrm.users WHERE lower(email) = lower($1)",
							 CStringGetTextDatum(text), TEXTOID, &found);
	if (!found)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("nocrm.actor names an unknown user: \"%s\"", text),
				 errdetail("The setting must be the id or email of a row in nocrm.users."),
				 errhint("SET nocrm.actor to a user's id or email, or RESET nocrm.actor.")));
	if (id == BUTLER_ID)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("nocrm.actor cannot be The Butler"),
				 errdetail("Only automations act as The Butler, so history can tell people from automations."),
				 errhint("SET nocrm.actor to the human user making the change.")));

	if (actor_text)
		pfree(actor_text);
	actor_text = MemoryContextStrdup(TopMemoryContext, text);
	actor_id = id;
	actor_generation = nocrm_rules_generation();
	return id;
}

/* Can nocrm_current_actor() answer without SPI? */
bool
nocrm_actor_known(void)
{
	const char *text = nocrm_actor ? nocrm_actor : "";

	return chain_len > 0 || text[0] == '\0' ||
		(actor_text != NULL && strcmp(actor_text, text) == 0 &&
		 actor_generation == nocrm_rules_generation());
}

/* At transaction end no chain can be running. */
void
nocrm_chain_reset(void)
{
	chain_len = 0;
}
