/*
 * guc.c — settings of nocrm_automation and the module's entry point.
 */
#include "nocrm.h"

#include "fmgr.h"
#include "utils/guc.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

int			nocrm_max_chain_depth = 5;
int			nocrm_history_level = HISTORY_ALL;
bool		nocrm_automations_enabled = true;
char	   *nocrm_actor = NULL;

static const struct config_enum_entry history_options[] = {
	{"none", HISTORY_NONE, false},
	{"actions", HISTORY_ACTIONS, false},
	{"all", HISTORY_ALL, false},
	{NULL, 0, false}
};

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

	MarkGUCPrefixReserved("nocrm");
}

void
_PG_init(void)
{
	nocrm_define_gucs();
	nocrm_rules_init();
	nocrm_dispatch_init();
}
