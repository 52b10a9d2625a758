-- nocrm_automation 1.1 -> 1.2: lead events handled once per statement,
-- from transition tables, past a gate; tag, comment and email rows nothing
-- listens to skip the after-trigger queue; the BEFORE trigger runs as the
-- caller.
\echo Use "ALTER EXTENSION nocrm_automation UPDATE TO '1.2'" to load this file. \quit

------------------------------------------------------------------------
-- Gates: can a row change be recorded, run an automation or move a lead?
-- The lead statement trigger asks for each row; the tag, comment and email
-- triggers ask in their WHEN clauses, before the row is queued.  They read
-- only per-backend caches (loaded as the extension owner when stale).
------------------------------------------------------------------------
CREATE FUNCTION nocrm.lead_insert_wanted(status text, user_id bigint, pipeline_id bigint, step_id bigint)
RETURNS boolean AS 'MODULE_PATHNAME', 'nocrm_lead_insert_wanted' LANGUAGE C VOLATILE;
COMMENT ON FUNCTION nocrm.lead_insert_wanted(text, bigint, bigint, bigint) IS
'The lead gate for an INSERT (what the statement trigger asks for each new row): can a new lead with these values be recorded, run an automation or be moved by a stage trigger?';

CREATE FUNCTION nocrm.lead_update_wanted(old_status text, new_status text, old_user_id bigint, new_user_id bigint,
                                         old_pipeline_id bigint, new_pipeline_id bigint,
                                         old_step_id bigint, new_step_id bigint)
RETURNS boolean AS 'MODULE_PATHNAME', 'nocrm_lead_update_wanted' LANGUAGE C VOLATILE;
COMMENT ON FUNCTION nocrm.lead_update_wanted(text, text, bigint, bigint, bigint, bigint, bigint, bigint) IS
'The lead gate for an UPDATE (what the statement trigger asks for each changed row): can this change be recorded, run an automation or move the lead?';

CREATE FUNCTION nocrm.lead_delete_wanted(status text, user_id bigint, pipeline_id bigint, step_id bigint)
RETURNS boolean AS 'MODULE_PATHNAME', 'nocrm_lead_delete_wanted' LANGUAGE C VOLATILE;
COMMENT ON FUNCTION nocrm.lead_delete_wanted(text, bigint, bigint, bigint) IS
'The lead gate for a DELETE (what the statement trigger asks for each deleted row): is lead.deleted recorded or listened to for this lead?';

CREATE FUNCTION nocrm.child_event_wanted(event text, author bigint DEFAULT NULL)
RETURNS boolean AS 'MODULE_PATHNAME', 'nocrm_child_event_wanted' LANGUAGE C VOLATILE;
COMMENT ON FUNCTION nocrm.child_event_wanted(text, bigint) IS
'WHEN clause of the event triggers on tags, comments and emails: is the event recorded or listened to?';

------------------------------------------------------------------------
-- Lead events once per statement, from the statement's transition tables:
-- no after-trigger event per row, and every row's foreign key checks done
-- before the first automation runs.
------------------------------------------------------------------------
CREATE FUNCTION nocrm.lead_statement_trigger() RETURNS trigger
AS 'MODULE_PATHNAME', 'nocrm_lead_statement_trigger'
LANGUAGE C SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION nocrm.lead_statement_trigger() IS
'AFTER INSERT, UPDATE or DELETE ON nocrm.leads, for each statement: raises the CRM events of each row that passes the gate, in the order the statement wrote the rows.';

DROP TRIGGER nocrm_lead_events ON nocrm.leads;
DROP FUNCTION nocrm.lead_event_trigger();
CREATE TRIGGER nocrm_lead_events_insert AFTER INSERT ON nocrm.leads
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION nocrm.lead_statement_trigger();
CREATE TRIGGER nocrm_lead_events_update AFTER UPDATE ON nocrm.leads
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION nocrm.lead_statement_trigger();
CREATE TRIGGER nocrm_lead_events_delete AFTER DELETE ON nocrm.leads
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION nocrm.lead_statement_trigger();

DROP TRIGGER nocrm_tag_events ON nocrm.tags;
CREATE TRIGGER nocrm_tag_events_insert AFTER INSERT ON nocrm.tags FOR EACH ROW
    WHEN (nocrm.child_event_wanted('lead.any_update'))
    EXECUTE FUNCTION nocrm.tag_event_trigger();
CREATE TRIGGER nocrm_tag_events_update AFTER UPDATE ON nocrm.tags FOR EACH ROW
    WHEN (nocrm.child_event_wanted('lead.any_update'))
    EXECUTE FUNCTION nocrm.tag_event_trigger();
CREATE TRIGGER nocrm_tag_events_delete AFTER DELETE ON nocrm.tags FOR EACH ROW
    WHEN (nocrm.child_event_wanted('lead.any_update'))
    EXECUTE FUNCTION nocrm.tag_event_trigger();

DROP TRIGGER nocrm_comment_events ON nocrm.comments;
CREATE TRIGGER nocrm_comment_events AFTER INSERT ON nocrm.comments FOR EACH ROW
    WHEN (nocrm.child_event_wanted('lead.commented', NEW.user_id))
    EXECUTE FUNCTION nocrm.comment_event_trigger();

DROP TRIGGER nocrm_email_events ON nocrm.emails;
CREATE TRIGGER nocrm_email_events AFTER INSERT ON nocrm.emails FOR EACH ROW
    WHEN (nocrm.child_event_wanted('lead.email.received'))
    EXECUTE FUNCTION nocrm.email_event_trigger();

------------------------------------------------------------------------
-- The BEFORE trigger reads steps from a cache and needs no rights of its
-- own; SECURITY DEFINER cost a GUC save and restore on every row.  Cache
-- reloads switch to the owner and pin search_path in C.
------------------------------------------------------------------------
ALTER FUNCTION nocrm.lead_before_trigger() SECURITY INVOKER RESET search_path;

CREATE FUNCTION nocrm.gate_counters(reset boolean DEFAULT false,
                                    OUT gate text, OUT passed bigint, OUT skipped bigint)
RETURNS SETOF record AS 'MODULE_PATHNAME', 'nocrm_gate_counters' LANGUAGE C VOLATILE;
COMMENT ON FUNCTION nocrm.gate_counters(boolean) IS
'This session''s gate decisions: rows passed to the event triggers and rows skipped because nothing could care. reset => true zeroes them after reading.';

------------------------------------------------------------------------
-- template_context in C with a kept plan: as SQL with SET search_path it
-- was parsed and planned on every notify.
------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION nocrm.template_context(lead_id bigint, payload jsonb, automation_id integer, event text)
RETURNS jsonb
AS 'MODULE_PATHNAME', 'nocrm_template_context_sql'
LANGUAGE C STABLE SET search_path = pg_catalog;
