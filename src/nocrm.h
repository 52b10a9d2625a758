/*
 * nocrm.h — shared declarations of the nocrm_automation extension.
 */
#ifndef NOCRM_H
#define NOCRM_H

#include "postgres.h"

#include "catalog/pg_type.h"
#include "datatype/timestamp.h"
#include "executor/spi.h"
#include "utils/jsonb.h"
#include "utils/relcache.h"

/* Events, in the order one change raises them (see docs/reference.md). */
typedef enum NocrmEvent
{
	EV_CREATION = 0,
	EV_STATUS_CHANGED,
	EV_STEP_CHANGED,
	EV_ASSIGNED,
	EV_UNASSIGNED,
	EV_CONTENT_CHANGED,
	EV_ANY_UPDATE,
	EV_COMMENTED,
	EV_EMAIL_RECEIVED,
	EV_DELETED,
	EV_DATE_REACHED,			/* raised by the drain when a date rule falls due */
	EV_TASK_CREATED,			/* a row of nocrm.tasks inserted (tasks.c) */
	EV_TASK_COMPLETED,			/* its done_at set */
	EV_TASK_OVERDUE,			/* raised by the drain once its due_at passed */
	EV_COUNT
} NocrmEvent;

extern const char *const nocrm_event_names[EV_COUNT];

#define NOCRM_EVENT_HINT "Events are lead.creation, lead.deleted, lead.any_update, lead.status.changed.to," \
	" lead.step.changed.to, lead.assigned, lead.unassigned, lead.content_has_changed, lead.commented," \
	" lead.email.received, lead.date.reached, task.created, task.completed and task.overdue."

/* Lead statuses as bits, so a condition is one AND. */
#define STATUS_TODO			0x01
#define STATUS_STANDBY		0x02
#define STATUS_WON			0x04
#define STATUS_LOST			0x08
#define STATUS_CANCELLED	0x10
#define STATUS_OPEN			(STATUS_TODO | STATUS_STANDBY)

typedef enum ActionKind
{
	ACT_ASSIGN,
	ACT_ASSIGN_ROUND_ROBIN,
	ACT_ASSIGN_RANDOM,
	ACT_ASSIGN_BALANCED,
	ACT_ADD_TAGS,
	ACT_REMOVE_TAGS,
	ACT_SET_STATUS,
	ACT_SET_STEP,
	ACT_COMMENT,
	ACT_NOTIFY,
	ACT_SEND_EMAIL,
	ACT_WEBHOOK,
	ACT_SET_FIELD,
	ACT_CREATE_TASK,
	ACT_COUNT
} ActionKind;

extern const char *const nocrm_action_names[ACT_COUNT];

#define CHANNEL_BROWSER		0x01
#define CHANNEL_EMAIL		0x02
#define CHANNEL_MOBILE		0x04

/* When a create_task action's task is due. */
#define TASK_DUE_NONE		0
#define TASK_DUE_NOW		1	/* now() + due_offset */
#define TASK_DUE_FIELD		2	/* the lead's due_field + due_offset */

/* The Butler's user id, fixed by the install script and protected by a trigger. */
#define BUTLER_ID			0

/* "user": "owner" means the lead's owner when the action runs. */
#define USER_IS_OWNER		(-1)
/* notify "user": "assignee": the task's, on task.* events */
#define USER_IS_ASSIGNEE	(-2)

typedef struct RuleAction
{
	ActionKind	kind;
	int			action_no;		/* 0-based index in the actions array */
	bool		delayed;
	Interval	delay;
	int64		user_id;		/* assign, notify; USER_IS_OWNER allowed for notify */
	int			nusers;
	int64	   *users;			/* assign_* groups, in list order */
	Datum		tags;			/* text[] for add_tags / remove_tags */
	int			ntags;
	const char *status;			/* set_status */
	const char *step_name;		/* set_step by name, within the lead's pipeline */
	int64		step_id;		/* set_step by id, 0 if by name */
	const char *text;			/* comment body, notify message */
	bool		text_lead_local;	/* notify: the message uses only lead-local placeholders */
	int			channels;		/* notify */
	const char *template_name;	/* send_email */
	const char *to;				/* send_email recipient, NULL = lead contact */
	bool		from_owner;		/* send_email, notify email: "from": "owner" */
	bool		reply_to_owner; /* "reply_to": "owner" */
	const char *reply_to;		/* "reply_to": an address */
	const char *url;			/* webhook */
	const char *field;			/* set_field: the column */
	const char *sql;			/* set_field: its UPDATE, built when compiled */
	int			business_unit;	/* delayed in business time (BUSINESS_*), else 0 */
	int64		business_amount;	/* "2 business hours": 2 */
	bool		recheck;		/* delayed: check conditions again when due */
	bool		respect_working_hours;	/* queued: wait for the owner's working time */
	bool		only_working_hours; /* groups: skip members outside working hours */
	bool		assign_anyway;	/* groups: fallback "anyone" */
	bool		capped;			/* groups: some member has a cap */
	/* create_task (title in text; a group in users, picked as group_kind) */
	const char *task_notes;
	ActionKind	group_kind;		/* ACT_ASSIGN for one user or the owner (user_id) */
	int			due_kind;		/* TASK_DUE_* */
	Interval	due_offset;		/* from now, or from the lead's due_field */
	const char *due_field;
	bool		due_working_hours;	/* due moved into the assignee's working time */
	Jsonb	   *definition;		/* the action as written, for the queue */
} RuleAction;

/* Comparisons of a field condition ({"field": ..., "op": ...}). */
typedef enum FieldOp
{
	FOP_EQ,
	FOP_NE,
	FOP_LT,
	FOP_LE,
	FOP_GT,
	FOP_GE,
	FOP_BETWEEN,
	FOP_IN,
	FOP_NOT_IN,
	FOP_EMPTY,
	FOP_NOT_EMPTY,
	FOP_CONTAINS,
	FOP_STARTS_WITH,
	FOP_CHANGED,
	FOP_COUNT
} FieldOp;

extern const char *const nocrm_field_op_names[FOP_COUNT];

/* One value a field is compared with: a constant, or now() + offset. */
typedef struct FieldValue
{
	bool		relative;
	Datum		value;
	Interval	offset;
} FieldValue;

/* A field condition, compiled against the column's type. */
typedef struct FieldCond
{
	const char *column;
	AttrNumber	attnum;			/* in nocrm.leads */
	Oid			typid;
	Oid			collation;
	int16		typlen;
	bool		typbyval;
	bool		is_text;		/* contains / starts_with allowed */
	struct TypeCacheEntry *type;	/* comparison function */
	FieldOp		op;
	int			nvalues;		/* 1; BETWEEN 2; IN/NOT_IN n; EMPTY, CHANGED 0 */
	FieldValue *values;
	const char *needle;			/* contains / starts_with, lower case */
	/* changed: optional from / to (NULL value = was / becomes empty) */
	bool		has_from,
				has_to,
				from_null,
				to_null;
	FieldValue	from,
				to;
	const char *text;			/* as written, for explain and errors */
} FieldCond;

typedef enum CondNodeKind
{
	CN_ALL,
	CN_ANY,
	CN_NOT,
	CN_FIELD,
	CN_KEYS						/* has_tag, status, owner... of a nested object */
} CondNodeKind;

/* A condition group (any / all / not) or leaf; see docs "Field conditions". */
typedef struct CondNode
{
	CondNodeKind kind;
	int			nchildren;
	struct CondNode *children;
	FieldCond	field;			/* CN_FIELD */
	struct Rule *keys;			/* CN_KEYS: only its condition fields are set */
} CondNode;

typedef struct Rule
{
	int32		id;
	const char *name;
	NocrmEvent	event;
	/* *.changed.to target */
	int			target_status;	/* status bit */
	int			ntarget_steps;
	int64	   *target_steps;
	/* conditions; a zero count or mask means "not constrained" */
	int			nhas_tags;
	const char **has_tags;
	int			nlacks_tags;
	const char **lacks_tags;
	int			status_mask;
	int			nowners;
	int64	   *owners;
	bool		unassigned_only;
	int			npipelines;
	int64	   *pipelines;
	int			nsteps;
	int64	   *steps;
	/* field conditions and groups, AND-ed with the keys above; NULL if none */
	CondNode   *where;
	const FieldCond *guard;		/* a comparison every match passes, for the gate */
	bool		where_reads_tags;
	/* actions */
	int			nactions;
	RuleAction *actions;
	Jsonb	   *actions_json;	/* as written, for describing in test mode */
	bool		test_mode;		/* record what it would do, do nothing */
	/* options */
	int32		position;		/* rules of an event run by position, then id */
	bool		stop_processing;	/* once it ran, later rules skip this event */
	bool		once_per_lead;
	bool		on_creation;	/* *.changed.to: also a lead created so */
	/* lead.date.reached: the date column (the target) and when after it */
	AttrNumber	date_attnum;
	Oid			date_typid;
	Interval	date_offset;
	bool		has_min_interval;	/* at_most_every is set */
	Interval	at_most_every;
} Rule;

/*
 * The automations columns a stored rule compiles from
 * (nocrm_compile_stored): nocrm_rule_columns() selects these
 * NOCRM_RULE_NCOLUMNS, in NOCRM_RULE_ORDER.
 */
#define NOCRM_RULE_NCOLUMNS 13
#define NOCRM_RULE_ORDER "position, id"

/* The lead as the rules see it. */
typedef struct LeadState
{
	int64		id;
	const char *title;
	int			status;			/* status bit */
	const char *status_text;
	bool		has_owner;
	int64		owner_id;
	bool		has_pipeline;
	int64		pipeline_id;
	bool		has_step;
	int64		step_id;
	const char *contact_email;
	bool		deleted;
	Jsonb	   *snapshot;		/* the row as JSON, for a deleted lead's placeholders */
	HeapTuple	row;			/* the whole row, in nocrm.leads's layout, if read */
	TupleDesc	row_desc;
	bool		latest_locked;	/* the row this transaction just wrote: latest, locked */
} LeadState;

/* Where the columns the engine reads are in a lead row (lead.c). */
typedef struct LeadAttnums
{
	int			id,
				title,
				status,
				user_id,
				pipeline_id,
				step_id,
				contact_email,
				updated_at,		/* 0 in a query's result */
				closed_at;
} LeadAttnums;

/* A raised event with what changed, for history and matching. */
typedef struct RaisedEvent
{
	NocrmEvent	event;
	/* what a *.changed.to event changed to, matched against rule targets */
	int			to_status;
	int64		to_step;
	Jsonb	   *old_value;
	Jsonb	   *new_value;
	const char *detail;
	bool		at_creation;	/* *.changed.to of a lead inserted so (on_creation rules) */
	HeapTuple	old_row,		/* an UPDATE's two versions, for "changed" */
				new_row;
	TupleDesc	rows_desc;
} RaisedEvent;

/* guc.c */
extern int	nocrm_max_chain_depth;
extern int	nocrm_history_level;
extern bool nocrm_automations_enabled;
extern char *nocrm_actor;

/* delivery settings */
extern char *nocrm_smtp_url;
extern char *nocrm_smtp_user;
extern char *nocrm_smtp_password;
extern int	nocrm_smtp_tls;
extern char *nocrm_mail_from;
extern char *nocrm_mail_from_name;
extern char *nocrm_smtp_helo_name;
extern char *nocrm_smtp_ca_file;
extern char *nocrm_smtp_ca_path;
extern bool nocrm_smtp_tls_verify;
extern char *nocrm_smtp_tls_server_name;
extern char *nocrm_smtp_tls_pinned_key;
extern char *nocrm_http_ca_file;
extern char *nocrm_http_ca_path;
extern char *nocrm_push_url;
extern char *nocrm_webhook_secret;
extern int	nocrm_connect_timeout_ms;
extern int	nocrm_request_timeout_ms;
extern int	nocrm_webhook_host_concurrency;
extern int	nocrm_webhook_max_retry_after_s;
extern char *nocrm_webhook_rate;
extern int	nocrm_drain_batch_size;
extern int	nocrm_drain_run_seconds;
extern int	nocrm_drain_poll_ms;
extern int	nocrm_drain_enabled;
extern char *nocrm_worker_database;
extern char *nocrm_worker_role;

#define DRAIN_ENABLED_AUTO	0
#define DRAIN_ENABLED_ON	1
#define DRAIN_ENABLED_OFF	2
extern int	nocrm_lease_seconds;
extern int	nocrm_max_attempts;
extern int	nocrm_retry_base_seconds;
extern int	nocrm_retry_max_seconds;
extern int	nocrm_queue_retention_seconds;
extern int	nocrm_run_log_retention_seconds;
extern int	nocrm_run_log_level;

#define SMTP_TLS_NONE		0
#define SMTP_TLS_TRY		1
#define SMTP_TLS_REQUIRE	2

#define HISTORY_NONE		0
#define HISTORY_ACTIONS		1
#define HISTORY_ALL			2

/* nocrm.run_log: which runs nocrm.automation_runs records */
#define RUN_LOG_AUTO		(-1)	/* as nocrm.history says */
#define RUN_LOG_NONE		0
#define RUN_LOG_EXCEPTIONS	1		/* all but fired runs */
#define RUN_LOG_ALL			2

extern void nocrm_define_gucs(void);

/* status.c */
extern int	nocrm_status_bit(const char *status);

/* calendar.c: working time, the company calendar, business delays */
#define BUSINESS_NONE		0
#define BUSINESS_MINUTES	1
#define BUSINESS_HOURS		2
#define BUSINESS_DAYS		3
extern bool nocrm_business_parse(const char *str, int *unit, int64 *amount, const char **problem);
extern int64 nocrm_business_max(int unit);
extern TimestampTz nocrm_business_due(bool has_user, int64 user_id, TimestampTz start, int unit,
									  int64 amount, bool *plain);
extern TimestampTz nocrm_next_working_time(bool has_user, int64 user_id, TimestampTz after);
extern bool nocrm_is_working(bool has_user, int64 user_id, TimestampTz at);
extern void nocrm_calendar_check_rule(const char *name, RuleAction *actions, int nactions);

/* transition.c: statement triggers' transition tables, with read pointers of our own */
extern TupleTableSlot *nocrm_transition_reader(Tuplestorestate *table, TupleDesc desc, int *readptr);
extern bool nocrm_transition_next(Tuplestorestate *table, int readptr, TupleTableSlot *slot);

/* spi_plans.c */
extern HTAB *nocrm_blob_hash(const char *name, long nelem, Size keysize, Size entrysize,
							 MemoryContext cxt);
extern ErrorData *nocrm_in_subtransaction(void (*body) (void *arg), void *arg,
										  MemoryContext errcxt);
extern SPIPlanPtr nocrm_plan(SPIPlanPtr *slot, const char *sql, int nargs, Oid *argtypes);
extern bool nocrm_table_exists(const char *table);
extern void nocrm_plans_note_row(void);
extern void nocrm_plans_xact_end(void);
extern int64 nocrm_lookup_id(const char *sql, Datum arg, Oid argtype, bool *found);
extern bool nocrm_plan_int64(SPIPlanPtr plan, Datum *args, const char *nulls, int64 *value);
extern void nocrm_exec_plan(SPIPlanPtr plan, Datum *args, const char *nulls, int expected,
							const char *what);
extern bool nocrm_column_equal(HeapTuple a, HeapTuple b, TupleDesc desc, int attno);


/* definition.c: parse and check a rule definition */
extern Rule *nocrm_compile_rule(int32 id, const char *name, const char *event,
								const char *target, Jsonb *conditions, Jsonb *actions);
extern NocrmEvent nocrm_event_from_name(const char *name);
extern RuleAction *nocrm_compile_action(const char *automation, NocrmEvent event, Jsonb *definition,
										int action_no);

/* rules.c: the per-backend rule cache */
extern void nocrm_rules_init(void);
extern Rule **nocrm_rules_for_event(NocrmEvent event, int *nrules);
extern Rule **nocrm_rules_for_change(RaisedEvent *ev, int *nrules);
extern void nocrm_rules_pin(void);
extern void nocrm_rules_unpin(void);
extern void nocrm_rules_reset_pins(void);
extern Oid	nocrm_automations_relid(void);
extern Oid	nocrm_extension_owner(void);
extern bool nocrm_rules_loaded(void);
extern bool nocrm_columns_may_match(Rule *rule, LeadState *lead);
extern uint64 nocrm_rules_generation(void);
extern bool nocrm_rule_matches(Rule *rule, LeadState *lead, RaisedEvent *ev);
extern bool nocrm_conditions_hold(Rule *rule, LeadState *lead);
extern bool nocrm_rule_matches_target(Rule *rule, RaisedEvent *ev);
extern Jsonb *nocrm_conditions_report(Rule *rule, LeadState *lead, const char *changed_column,
									 const char **failed);
extern Rule *nocrm_rule_by_id(int32 id);
extern Rule *nocrm_compile_stored(HeapTuple tuple, TupleDesc desc, char **error);
extern bool nocrm_rules_on_creation(RaisedEvent *ev);
extern const char *nocrm_rule_columns(void);
extern bool nocrm_where_row_may_match(RaisedEvent *ev, LeadState *lead,
									  struct TupleTableSlot *oldslot,
									  struct TupleTableSlot *newslot);

typedef struct OwnerContext
{
	Oid			saved_userid;
	int			saved_sec_context;
	int			guc_nest_level;
} OwnerContext;
extern void nocrm_owner_enter(OwnerContext *ctx);
extern void nocrm_owner_leave(OwnerContext *ctx);

/* chain.c: the automations running now, and who acts */
extern int64 nocrm_current_actor(void);
extern bool nocrm_actor_known(void);
extern int	nocrm_chain_depth(void);
extern int32 nocrm_chain_automation(void);
extern void nocrm_chain_push(int32 id);
extern void nocrm_chain_enter(int32 id);
extern void nocrm_chain_pop(void);
extern bool nocrm_chain_contains(int32 id);
extern void nocrm_chain_reset(void);
extern void nocrm_set_root_actor(int64 actor);
extern int64 nocrm_root_actor(void);

/* firings.c: nocrm.firing_counts */
extern void nocrm_count_firing(int32 id, int nactions);
extern void nocrm_fold_firing_counts(int retention_seconds);

/* runlog.c: nocrm.automation_runs */
typedef struct RunOutcomes
{
	JsonbParseState *state;
	MemoryContext context;
	int			nactions;
} RunOutcomes;
extern RunOutcomes *nocrm_runlog_begin(RunOutcomes *outcomes);
extern void nocrm_runlog_resume(RunOutcomes *outer);
extern void nocrm_runlog_action(RuleAction *action, Jsonb *old_value, Jsonb *new_value,
								const char *detail);
extern void nocrm_runlog_fired(int32 id, LeadState *lead, RaisedEvent *ev,
							   RunOutcomes *outcomes, int64 actor);
extern void nocrm_runlog_record(int32 id, LeadState *lead, RaisedEvent *ev, const char *event,
								const char *outcome, const char *actions, int nactions,
								const char *detail);

/* dates.c: date rules (lead.date.reached), scheduled on writes, fired by the drain */
extern bool nocrm_date_rules_exist(void);
extern void nocrm_schedule_dates(int64 lead_id, HeapTuple oldtup, HeapTuple newtup, TupleDesc desc);
extern bool nocrm_dates_row_changed(struct TupleTableSlot *oldslot, struct TupleTableSlot *newslot);

/* due.c: date rules that fell due, fired (the drain, fire_due_date_rules()) */
extern int	nocrm_fire_due_dates(int max);

/* secrets.c: credentials in the user mapping of server nocrm_credentials */
struct DeliveryHandles;
extern void nocrm_credentials_load(struct DeliveryHandles *h);

/* enrollment.c: once_per_lead and at_most_every */
extern bool nocrm_enrollment_admits(Rule *rule, int64 lead_id, bool record, const char **why);

/* alerts.c: failures the drain met, for nocrm.record_failures() */
typedef struct AlertFailure
{
	int32		automation_id;	/* 0: none (an item queued by hand) */
	int64		lead_id;		/* 0: none */
	int64		queue_id;		/* 0: not a queue item (a date rule) */
	const char *kind;			/* email, mobile, webhook, action, date */
	const char *error;
	bool		dead;			/* gave up, else it is retried */
} AlertFailure;
extern void nocrm_alerts_note(int n, const AlertFailure *f);
extern void nocrm_alerts_prune(int retention_seconds);

/* drain.c: one drain run (CALL nocrm.drain() and the background worker) */
extern void nocrm_drain_run(double run_time, bool by_minute);

/* wake.c: the background worker's shared state, woken at commit of queued work */
extern void nocrm_wake_shmem_request(void);
extern void nocrm_wake_shmem_startup(void);
extern void nocrm_wake_note_queued(void);
extern void nocrm_wake_xact_end(bool committed);
extern void nocrm_wake_attach(bool attach);
extern uint32 nocrm_wake_count(void);

/* relay.c: browser notifications' NOTIFYs sent after commit by a worker */
extern void nocrm_relay_shmem_request(void);
extern void nocrm_relay_shmem_startup(void);
extern void nocrm_relay_register(void);
extern void nocrm_relay_notify(const char *payload);
extern void nocrm_relay_pre_commit(bool prepare);
extern void nocrm_relay_xact_end(bool committed);
extern void nocrm_relay_subxact_abort(SubTransactionId subid);

/* worker.c: the background worker (shared_preload_libraries) */
extern void nocrm_worker_register(void);

/* tasks.c: the create_task action */
extern void nocrm_create_task(Rule *rule, RuleAction *action, LeadState *lead, RaisedEvent *ev);

/* task_events.c: task.created / task.completed (trigger), task.overdue (the drain) */
extern int	nocrm_raise_overdue_tasks(int max);

/* dispatch.c: run the rules for raised events */
extern void nocrm_dispatch(LeadState *lead, RaisedEvent *events, int nevents);
extern void nocrm_dispatch_init(void);
extern void nocrm_run_rule_alone(Rule *rule, LeadState *lead, RaisedEvent *ev);
extern const char *nocrm_run_delayed(int32 automation_id, int action_no, int64 lead_id,
									 const char *event, Jsonb *definition, int64 actor);

/* stages.c */
extern bool nocrm_stage_triggers(LeadState *lead, RaisedEvent *ev, const char *custom_code);
extern bool nocrm_stage_triggers_exist(void);
extern bool nocrm_stage_triggers_in_pipeline(int64 pipeline_id);
extern bool nocrm_places_loaded(void);
extern bool nocrm_step_pipeline(int64 step_id, int64 *pipeline_id);
extern bool nocrm_first_step(int64 pipeline_id, int64 *step_id);

/* What a stage trigger would do, for explain(). */
typedef struct StageVerdict
{
	int32		id;
	const char *name;
	int64		step_id;
	bool		would_move;
	const char *reason;
} StageVerdict;
extern StageVerdict *nocrm_stage_verdicts(LeadState *lead, RaisedEvent *ev, int *n);

/* actions.c: From and Reply-To of an email sent as the lead owner */
extern Jsonb *nocrm_sender_choice(bool from_owner, bool reply_to_owner, const char *reply_to_address,
								  bool has_owner, int64 owner_id, const char **detail);

/* restore.c: a session loading a dump (check_function_bodies off) */
extern bool nocrm_restoring(void);

/* gate.c: which row changes need the event triggers at all */
extern void nocrm_gate_caches_ready(bool rules);
extern bool nocrm_event_listened(NocrmEvent event);
extern bool nocrm_gate_row_rules_wanted(void);
extern void nocrm_gate_row_done(void);
extern bool nocrm_lead_row_wanted(char op, struct TupleTableSlot *oldslot,
								  struct TupleTableSlot *newslot,
								  const LeadAttnums *cols);

/* qsort/bsearch order of int64 values (tagset.c, direct_insert.c) */
static inline int
nocrm_int64_cmp(const void *a, const void *b)
{
	int64		x = *(const int64 *) a,
				y = *(const int64 *) b;

	return x < y ? -1 : x > y;
}

/* writebuf.c: rows written in batches */
#define WRITEBUF_MAX_COLS	16
typedef struct WriteBuffer
{
	const char *what;			/* for the error message */
	const char *table;			/* nocrm.<table> */
	const char *columns[WRITEBUF_MAX_COLS];
	const char *sql;			/* NULL: INSERT INTO table (columns) SELECT FROM unnest($1, ...) */
	bool		direct;			/* may skip the INSERT (direct_insert.c) */
	bool		skip_conflicts; /* sql ends ON CONFLICT DO NOTHING: direct leaves such rows to it */
	const char *quiet_triggers[2];	/* nocrm trigger functions that do nothing for these rows */
	void		(*before_write) (struct WriteBuffer *buf);	/* optional */
	void		(*before_sql) (struct WriteBuffer *buf);	/* optional: rows go by INSERT */
	int			ncols;
	Oid			types[WRITEBUF_MAX_COLS];	/* element types */
	/* set up on first use */
	bool		registered;
	int16		typlen[WRITEBUF_MAX_COLS];
	bool		typbyval[WRITEBUF_MAX_COLS];
	char		typalign[WRITEBUF_MAX_COLS];
	SPIPlanPtr	plan;
	int			n;
	int			cap;
	Datum	   *values;
	bool	   *nulls;
	SubTransactionId *subids;
	uint64		generation;		/* changes whenever waiting rows are renumbered */
	int64		direct_rows;	/* written so far, for nocrm.record_writes() */
	int64		sql_rows;
} WriteBuffer;
extern int	nocrm_buffer_row(WriteBuffer *buf, Datum *values, bool *nulls);
extern Datum *nocrm_buffered_values(WriteBuffer *buf, int row, uint64 generation);
/* direct_insert.c: record rows without an INSERT statement */
extern int	nocrm_direct_insert(WriteBuffer *buf, int nrows, int *retry);
extern void nocrm_buffers_flush(void);
extern void nocrm_buffers_xact_end(void);
extern void nocrm_buffers_subxact_abort(SubTransactionId subid);
extern int	nocrm_buffered_rows(void);

/* tagset.c: add_tags of a bulk statement, written in batches */
#define TAGSET_CHUNK		10000	/* leads whose tags are loaded at once */
#define TAGSET_MIN_ROWS		64		/* smaller statements take the per-lead path */
extern void nocrm_tagset_load(int64 *ids, int n);
extern bool nocrm_tagset_covers(int64 lead_id);
extern bool nocrm_tagset_fits(const char *name);
extern bool nocrm_tagset_present(int64 lead_id, const char *name, bool enter);
extern void nocrm_tagset_add(int64 lead_id, Datum name);
extern void nocrm_tagset_settle(void);
extern void nocrm_tagset_forget(void);
extern bool nocrm_tagset_tags_written(void);
extern void nocrm_tagset_subxact_abort(void);
extern void nocrm_tagset_xact_end(void);

/* history.c */
extern void nocrm_history(int64 lead_id, const char *event, int32 automation_id,
						  Jsonb *old_value, Jsonb *new_value, const char *detail);

/* jsonb.c */
extern Jsonb *nocrm_jsonb_pair(const char *key, const char *value);
extern Jsonb *nocrm_jsonb_int_pair(const char *key, int64 value, bool isnull);
extern void nocrm_jsonb_key(JsonbParseState **state, const char *key);
extern void nocrm_jsonb_put_string(JsonbParseState **state, const char *key, const char *value);
extern void nocrm_jsonb_put_int64(JsonbParseState **state, const char *key, int64 value);
extern void nocrm_jsonb_put_jsonb(JsonbParseState **state, const char *key, Jsonb *value);

/* actions.c */
extern void nocrm_run_action(Rule *rule, RuleAction *action, LeadState *lead,
							 RaisedEvent *ev);
extern bool nocrm_action_leaves_lead_alone(RuleAction *action);
extern void nocrm_record_assignment(Rule *rule, RuleAction *action, LeadState *lead,
									int64 user_id, bool fallback);
extern bool nocrm_user_is_active(int64 user_id);

/* assign.c */
extern void nocrm_assign_subxact_abort(SubTransactionId subid);
extern void nocrm_assign_subxact_commit(SubTransactionId subid, SubTransactionId parent);
extern void nocrm_assign_xact_end(void);
extern void nocrm_flush_writes(void);
extern bool nocrm_pick_assignee_held(Rule *rule, RuleAction *action, int64 *user_id);
extern int64 nocrm_pick_assignee(Rule *rule, RuleAction *action, LeadState *lead,
								 bool *found, bool *fallback);
extern void nocrm_assign_refund(int32 automation_id, int32 action_no, int64 user_id);
extern void nocrm_assign_pre_commit(void);
extern int64 nocrm_assign_fold_increments(void);

/* group_pick.c */
extern bool nocrm_group_pick_held(Rule *rule, RuleAction *action, bool anyone, int64 *user_id);
extern bool nocrm_group_pick(Rule *rule, RuleAction *action, bool anyone, Datum pending,
							 int64 *user_id);
extern void nocrm_group_statement_end(void);
extern void nocrm_group_subxact_abort(void);
extern void nocrm_group_xact_end(void);

/* preassign.c: owners decided in the BEFORE ROW trigger of an INSERT */
typedef struct PreAssignment
{
	int64		lead_id;		/* hash key */
	int64		user_id;
	struct PreAssignment *next; /* the choice made after it (a hint: check lead_id, state) */
	uint32		made;			/* preassign.c's Making: the rule, subtransaction, statement */
	bool		fallback;		/* nobody available: fallback "anyone" applied */
	char		state;			/* 'p'ending, 's'een by the statement, 't'aken by the rule, 'x' gone */
} PreAssignment;
extern bool nocrm_preassign_row(LeadState *lead, Relation rel, int64 *user_id);
extern PreAssignment *nocrm_preassigned(int64 lead_id);
extern bool nocrm_preassign_any(void);
extern bool nocrm_preassign_take(int64 lead_id, int32 automation_id, int32 action_no,
								 int64 *user_id, bool *fallback);
extern void nocrm_preassign_seen(LeadState *lead);
extern void nocrm_preassign_hide_owner(LeadState *lead);
extern void nocrm_preassign_statement_end(void);
extern void nocrm_preassign_subxact_abort(SubTransactionId subid);
extern void nocrm_preassign_xact_end(void);

/* templates.c */
extern char *nocrm_render(const char *text, Jsonb *context);
extern char *nocrm_unknown_placeholder(const char *text, bool *unclosed);
extern bool nocrm_placeholders_lead_local(const char *text);
extern char *nocrm_render_lead_local(const char *text, LeadState *lead, const char *event,
									 const char *automation);
extern Jsonb *nocrm_template_context(Datum lead_id, bool lead_null, Datum payload, bool payload_null,
									 Datum automation_id, bool automation_null,
									 Datum event, bool event_null, bool read_only);

/* delivery.c */
typedef struct DeliveryHandles
{
	void	   *smtp;			/* CURL *, kept for a batch */
	void	   *http;
	char	   *smtp_config_error;	/* set by the first config_error; later
									 * emails of the run fail fast with it */
	/* credentials of this round (secrets.c) */
	const char *smtp_user;
	const char *smtp_password;
	const char *webhook_secret;
	void	   *multi;			/* CURLM *, for a run (transfers.c) */
} DeliveryHandles;

typedef struct DeliveryResult
{
	bool		ok;
	bool		permanent;		/* retrying cannot help */
	/*
	 * The settings (or the server's opinion of us: EHLO name, sender,
	 * certificate, login) are wrong, not this message: every email fails the
	 * same way until an admin fixes them.  permanent is false.  The drain
	 * should keep the item pending without using up an attempt, and send no
	 * more mail this run; delivery.c logs one WARNING per run and error says
	 * which setting to fix.
	 */
	bool		config_error;
	long		status;			/* SMTP or HTTP response code */
	double		retry_after;	/* seconds a 429 or 503 asked to wait (Retry-After), 0 = none */
	bool		timed_out;		/* no answer within nocrm.request_timeout */
	char	   *error;
} DeliveryResult;

/* One delivery of a round, run through libcurl's multi interface (transfers.c). */
typedef enum TransferState
{
	XFER_WAITING,				/* not started */
	XFER_RUNNING,
	XFER_DONE,					/* result is its outcome */
	XFER_HANDED_BACK,			/* not tried: back to pending after hand_back_delay */
	XFER_DROPPED				/* taken back by an admin before its turn */
} TransferState;

typedef struct Transfer
{
	/* what to send (the drain) */
	bool		is_mail;
	const char *host;			/* whom it loads: "smtp", or host:port of the URL */
	const char *url;			/* HTTP: URL, JSON body, signature key */
	const char *body;
	const char *signature_secret;
	const char *event;
	const char *idempotency_key;
	const char *to;				/* mail: recipient, RFC 5322 message */
	const char *message;
	/* what happened */
	TransferState state;
	DeliveryResult result;
	double		hand_back_delay;	/* seconds; 0 = behind what is due now */
	TimestampTz started;
	TimestampTz finished;
	/* delivery.c's, while in flight */
	void	   *easy;
	void	   *work;
} Transfer;

extern void nocrm_delivery_begin(DeliveryHandles *h);
extern void nocrm_delivery_end(DeliveryHandles *h);
extern bool nocrm_valid_address(const char *addr);
extern const char *nocrm_address_problem(const char *addr);
extern char *nocrm_build_message(const char *from, const char *to, const char *subject,
								 const char *body, const char *idempotency_key);
extern char *nocrm_build_queued_message(Jsonb *payload, const char *to, const char *subject,
										const char *body, const char *idempotency_key);
extern void nocrm_send_mail(DeliveryHandles *h, const char *to, const char *message,
							DeliveryResult *r);
extern void nocrm_post_json(DeliveryHandles *h, const char *url, const char *body,
							const char *idempotency_key, const char *event,
							const char *signature_secret, DeliveryResult *r);
extern char *nocrm_hmac_sha256_hex(const char *key, const char *data);
extern bool nocrm_http_prepare(DeliveryHandles *h, Transfer *t);
extern void nocrm_http_finish(Transfer *t, int curl_code);
extern bool nocrm_mail_prepare(DeliveryHandles *h, Transfer *t, bool fresh_connection);
extern bool nocrm_mail_finish(DeliveryHandles *h, Transfer *t, int curl_code);

/* transfers.c: the libcurl multi handle of a drain run */
extern void nocrm_transfers_begin(DeliveryHandles *h);
extern void nocrm_transfers_end(DeliveryHandles *h);
extern bool nocrm_transfer_start(DeliveryHandles *h, Transfer *t);
extern int	nocrm_transfers_wait(DeliveryHandles *h, long timeout_ms, Transfer **done, int max_done);
extern void nocrm_transfers_abort(DeliveryHandles *h, const char *why);

/* hosts.c: per receiving host, Retry-After pauses and nocrm.webhook_rate */
extern bool nocrm_parse_rate(const char *value, int *count, double *period, const char **problem);
extern void nocrm_hosts_load(const char **hosts, int n);
extern void nocrm_hosts_save(void);
extern void nocrm_hosts_prune(void);
extern double nocrm_host_paused_for(const char *host);
extern void nocrm_host_pause(const char *host, double seconds, long status);
extern double nocrm_host_rate_wait(const char *host, int k);
extern void nocrm_host_rate_take(const char *host);

/* round.c: one round's deliveries, several hosts at once */
typedef void (*TakenBackCheck) (void *arg);
extern void nocrm_deliver_round(DeliveryHandles *h, Transfer *xfers, int n, TimestampTz hand_back,
								TakenBackCheck check, void *arg);


/* lead.c: reading lead rows */
extern void nocrm_lead_init(void);
extern const LeadAttnums *nocrm_lead_attnums(TupleDesc desc);
extern void nocrm_lead_from_tuple(LeadState *lead, HeapTuple tuple, TupleDesc desc);
extern bool nocrm_lead_fetch(int64 lead_id, LeadState *lead);
extern bool nocrm_lead_fetch_locked(int64 lead_id, LeadState *lead);
extern HeapTuple nocrm_lead_row(LeadState *lead, TupleDesc *desc);
extern Oid	nocrm_leads_relid(void);

/* where.c: condition groups and field conditions */
typedef enum Truth
{
	TRUTH_FALSE = 0,
	TRUTH_TRUE,
	TRUTH_MAYBE					/* the gate cannot tell (tags) */
} Truth;

typedef enum WhereMode
{
	WHERE_EVENT,				/* an event: "changed" compares its two versions */
	WHERE_RECHECK,				/* a delayed action due: "changed" holds */
	WHERE_EXPLAIN,				/* "changed" holds for explain's target column */
	WHERE_GATE					/* rows in slots; tags are maybe */
} WhereMode;

typedef struct WhereInput
{
	WhereMode	mode;
	LeadState  *lead;
	RaisedEvent *ev;
	struct TupleTableSlot *newslot,
			   *oldslot;		/* WHERE_GATE */
	const char *explain_column;
	Truth		(*keys) (Rule *keys, struct WhereInput *in);	/* nested keys */
	const char *failed;			/* out: first condition that did not hold */
} WhereInput;

extern void *nocrm_copy_bytes(const void *src, Size size);
extern const char *nocrm_copy_string(const char *s);
extern void nocrm_copy_condition_keys(Rule *dst, const Rule *src);
extern CondNode *nocrm_where_copy(const CondNode *node);
extern const FieldCond *nocrm_where_guard(const CondNode *node);
extern bool nocrm_where_reads_tags(const CondNode *node);
extern Truth nocrm_where_eval(const CondNode *node, WhereInput *in);

/* fieldcmp.c: field conditions on values, and the gate's index of them */
extern bool nocrm_field_cond_init(FieldCond *f, Oid relid, const char *column);
extern Datum nocrm_field_value(FieldCond *f, FieldValue *v);
extern bool nocrm_field_holds(FieldCond *f, Datum value, bool isnull);
extern bool nocrm_field_changed(FieldCond *f, Datum old, bool oldnull, Datum value, bool isnull);
extern bool nocrm_field_guards(const FieldCond *f);

typedef struct FieldIndex FieldIndex;
typedef Datum (*FieldGetter) (void *row, AttrNumber attnum, bool *isnull);
extern FieldIndex *nocrm_field_index_build(int n, const FieldCond **guards, void **payloads);
extern int	nocrm_field_index_probe(FieldIndex *index, FieldGetter get, void *row,
									void **out, int max);
extern void nocrm_lead_note_write(void);
extern uint64 nocrm_lead_write_count(void);

#endif							/* NOCRM_H */
