-- nocrm_automation 1.1 -> 1.2: row changes nothing listens to skip the
-- after-trigger queue; the BEFORE trigger runs as the caller.
\echo Use "ALTER EXTENSION nocrm_automation UPDATE TO '1.2'" to load this file. \quit

------------------------------------------------------------------------
-- Gates: evaluated in the triggers' WHEN clauses, once per row, before
-- the row is queued.  They read only per-backend caches (loaded as the
-- extension owner when stale), so they run as the caller and are cheap.
------------------------------------------------------------------------
CREATE FUNCTION nocrm.lead_insert_wanted(status text, user_id bigint, pipeline_id bigint, step_id bigint)
RETURNS boolean AS 'MODULE_PATHNAME', 'nocrm_lead_insert_wanted' LANGUAGE C VOLATILE;
COMMENT ON FUNCTION nocrm.lead_insert_wanted(text, bigint, bigint, bigint) IS
'WHEN clause of the INSERT event trigger on nocrm.leads: can a new lead with these values be recorded, run an automation or be moved by a stage trigger?';

CREATE FUNCTION nocrm.lead_update_wanted(old_status text, new_status text, old_user_id bigint, new_user_id bigint,
                                         old_pipeline_id bigint, new_pipeline_id bigint,
                                         old_step_id bigint, new_step_id bigint)
RETURNS boolean AS 'MODULE_PATHNAME', 'nocrm_lead_update_wanted' LANGUAGE C VOLATILE;
COMMENT ON FUNCTION nocrm.lead_update_wanted(text, text, bigint, bigint, bigint, bigint, bigint, bigint) IS
'WHEN clause of the UPDATE event trigger on nocrm.leads: can this change be recorded, run an automation or move the lead?';

CREATE FUNCTION nocrm.lead_delete_wanted(status text, user_id bigint, pipeline_id bigint, step_id bigint)
RETURNS boolean AS 'MODULE_PATHNAME', 'nocrm_lead_delete_wanted' LANGUAGE C VOLATILE;
COMMENT ON FUNCTION nocrm.lead_delete_wanted(text, bigint, bigint, bigint) IS
'WHEN clause of the DELETE event trigger on nocrm.leads: is lead.deleted recorded or listened to for this lead?';

CREATE FUNCTION nocrm.child_event_wanted(event text, author bigint DEFAULT NULL)
RETURNS boolean AS 'MODULE_PATHNAME', 'nocrm_child_event_wanted' LANGUAGE C VOLATILE;
COMMENT ON FUNCTION nocrm.child_event_wanted(text, bigint) IS
'WHEN clause of the event triggers on tags, comments and emails: is the event recorded or listened to?';

DROP TRIGGER nocrm_lead_events ON nocrm.leads;
CREATE TRIGGER nocrm_lead_events_insert AFTER INSERT ON nocrm.leads FOR EACH ROW
    WHEN (nocrm.lead_insert_wanted(NEW.status, NEW.user_id, NEW.pipeline_id, NEW.step_id))
    EXECUTE FUNCTION nocrm.lead_event_trigger();
CREATE TRIGGER nocrm_lead_events_update AFTER UPDATE ON nocrm.leads FOR EACH ROW
    WHEN (nocrm.lead_update_wanted(OLD.status, NEW.status, OLD.user_id, NEW.user_id,
                                   OLD.pipeline_id, NEW.pipeline_id, OLD.step_id, NEW.step_id))
    EXECUTE FUNCTION nocrm.lead_event_trigger();
CREATE TRIGGER nocrm_lead_events_delete AFTER DELETE ON nocrm.leads FOR EACH ROW
    WHEN (nocrm.lead_delete_wanted(OLD.status, OLD.user_id, OLD.pipeline_id, OLD.step_id))
    EXECUTE FUNCTION nocrm.lead_event_trigger();

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
