/*
 * history.c — writing nocrm.lead_history.
 */
#include "nocrm.h"

#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/timestamp.h"

static WriteBuffer history_buffer = {
	.what = "writing lead history failed",
	.table = "lead_history",
	.columns = {"lead_id", "event", "actor_id", "automation_id", "stage_trigger_id", "chain_depth",
	"old_value", "new_value", "detail", "created_at"},
	.direct = true,
	.ncols = 10,
	.types = {INT8OID, TEXTOID, INT8OID, INT4OID, INT4OID, INT4OID, JSONBOID, JSONBOID, TEXTOID,
	TIMESTAMPTZOID},
};

/*
 * Appends one history row (written in a batch, see writebuf.c).  The actor
 * and chain come from the dispatcher: inside an automation's chain the
 * actor is the Butler.  automation_id is an automation (> 0), a stage
 * trigger (< 0, minus its id) or none (0).
 */
void
nocrm_history(int64 lead_id, const char *event, int32 automation_id,
			  Jsonb *old_value, Jsonb *new_value, const char *detail)
{
	Datum		values[10];
	bool		nulls[10];
	int64		actor = nocrm_current_actor();

	memset(nulls, false, sizeof(nulls));
	values[0] = Int64GetDatum(lead_id);
	values[1] = CStringGetTextDatum(event);
	values[2] = Int64GetDatum(actor);
	nulls[2] = actor < 0;
	values[3] = Int32GetDatum(automation_id);
	nulls[3] = automation_id <= 0;
	values[4] = Int32GetDatum(-automation_id);
	nulls[4] = automation_id >= 0;
	values[5] = Int32GetDatum(nocrm_chain_depth());
	values[6] = JsonbPGetDatum(old_value);
	nulls[6] = old_value == NULL;
	values[7] = JsonbPGetDatum(new_value);
	nulls[7] = new_value == NULL;
	values[8] = detail ? CStringGetTextDatum(detail) : (Datum) 0;
	nulls[8] = detail == NULL;
	/* when it happened, not when the batch is written */
	values[9] = TimestampTzGetDatum(GetCurrentTimestamp());
	nocrm_buffer_row(&history_buffer, values, nulls);
}
