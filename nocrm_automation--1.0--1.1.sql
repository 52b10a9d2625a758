-- nocrm_automation 1.0 -> 1.1: roles, owner-rights triggers, dump of sequences.
\echo Use "ALTER EXTENSION nocrm_automation UPDATE TO '1.1'" to load this file. \quit

------------------------------------------------------------------------
-- Two roles: nocrm_admin manages automations, templates, triggers and
-- settings; nocrm_agent works with leads, tags, comments and emails.
-- Roles belong to the cluster: made once, kept when the extension goes.
------------------------------------------------------------------------
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'nocrm_agent') THEN
        CREATE ROLE nocrm_agent NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'nocrm_admin') THEN
        CREATE ROLE nocrm_admin NOLOGIN;
    END IF;
END $$;
COMMENT ON ROLE nocrm_agent IS 'nocrm_automation: works with leads, tags, comments and emails; cannot read or change rules, the queue or credentials.';
COMMENT ON ROLE nocrm_admin IS 'nocrm_automation: manages automations, templates, stage triggers, users, pipelines and settings.';
GRANT nocrm_agent TO nocrm_admin;

GRANT USAGE ON SCHEMA nocrm TO nocrm_agent, nocrm_admin;
-- (1.0 revoked functions from PUBLIC, but not the drain procedure)
REVOKE ALL ON PROCEDURE nocrm.drain(double precision) FROM PUBLIC;

-- Agents: the CRM's daily work.  History is readable, never writable.
GRANT SELECT, INSERT, UPDATE, DELETE ON nocrm.leads, nocrm.tags, nocrm.comments, nocrm.emails
    TO nocrm_agent;
GRANT SELECT ON nocrm.users, nocrm.pipelines, nocrm.steps, nocrm.working_hours, nocrm.absences,
    nocrm.lead_history TO nocrm_agent;
GRANT SELECT, UPDATE (read_at) ON nocrm.notifications TO nocrm_agent;
GRANT EXECUTE ON FUNCTION nocrm.lead_timeline(bigint), nocrm.fire_trigger(bigint, text),
    nocrm.butler_id(), nocrm.is_working(bigint, timestamptz), nocrm.is_absent(bigint, timestamptz),
    nocrm.is_available(bigint, timestamptz, boolean),
    nocrm.next_working_time(bigint, timestamptz) TO nocrm_agent;

-- Admins: the rules and what they name.  The queue and run log are
-- readable (and dead letters can be requeued); history stays read-only.
GRANT SELECT, INSERT, UPDATE, DELETE ON nocrm.automations, nocrm.stage_triggers,
    nocrm.email_templates, nocrm.users, nocrm.pipelines, nocrm.steps, nocrm.working_hours,
    nocrm.absences TO nocrm_admin;
GRANT SELECT ON nocrm.queue, nocrm.automation_runs, nocrm.assignment_counters, nocrm.notifications,
    nocrm.butler_activity, nocrm.queue_status, nocrm.dead_letters, nocrm.automation_stats,
    nocrm.stage_trigger_board TO nocrm_admin;
GRANT UPDATE (state, attempts, run_at, lease_until) ON nocrm.queue TO nocrm_admin;
GRANT EXECUTE ON FUNCTION
    nocrm.create_automation(text, text, jsonb, text, jsonb, boolean, text),
    nocrm.update_automation(integer, text, jsonb, text, jsonb, boolean),
    nocrm.set_automation_enabled(integer, boolean), nocrm.enable_automation(integer),
    nocrm.disable_automation(integer), nocrm.rename_automation(integer, text),
    nocrm.delete_automation(integer), nocrm.set_automation_mode(integer, text),
    nocrm.go_live(integer), nocrm.check_automation(text, text, text, jsonb, jsonb),
    nocrm.set_butler(text, text), nocrm.resolve_user(jsonb), nocrm.resolve_step(text, text),
    nocrm.create_stage_trigger(text, text, jsonb, boolean, text, text, boolean),
    nocrm.delete_stage_trigger(integer), nocrm.set_stage_trigger_enabled(integer, boolean),
    nocrm.copy_stage_trigger(integer, text, text), nocrm.move_stage_trigger(integer, text, text),
    nocrm.stage_trigger_must_exist(boolean, integer),
    nocrm.explain(bigint, text, text), nocrm.describe_actions(integer, jsonb, bigint, text),
    nocrm.render_template(text, bigint, text), nocrm.render(text, jsonb),
    nocrm.template_context(bigint, jsonb, integer, text), nocrm.group_members(jsonb),
    nocrm.requeue_dead(bigint[]), nocrm.worker_scheduled(), nocrm.is_timezone(text),
    nocrm.replace_json_string(jsonb, text, text)
    TO nocrm_admin;

-- Settings admins may change; the credentials (smtp_user, smtp_password,
-- webhook_secret) stay with superusers.
GRANT SET ON PARAMETER nocrm.max_chain_depth, nocrm.history, nocrm.automations_enabled,
    nocrm.smtp_url, nocrm.smtp_tls, nocrm.mail_from, nocrm.push_url,
    nocrm.connect_timeout, nocrm.request_timeout, nocrm.drain_batch_size, nocrm.drain_run_time,
    nocrm.drain_poll_interval, nocrm.lease_time, nocrm.max_attempts, nocrm.retry_base,
    nocrm.retry_max, nocrm.queue_retention, nocrm.run_log_retention
    TO nocrm_admin;

------------------------------------------------------------------------
-- Triggers write the extension's tables with its owner's rights, never
-- the caller's, with a search_path no caller can plant objects in.
------------------------------------------------------------------------
ALTER FUNCTION nocrm.lead_before_trigger() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION nocrm.lead_event_trigger() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION nocrm.tag_event_trigger() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION nocrm.comment_event_trigger() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION nocrm.email_event_trigger() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION nocrm.flush_assignments_trigger() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION nocrm.rules_changed_trigger() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION nocrm.automation_validate_trigger() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION nocrm.template_validate_trigger() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
-- pg_temp last: otherwise a caller's temporary table could shadow a catalog one.
ALTER FUNCTION nocrm.sync_assignment_counters() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION nocrm.cascade_user_email() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION nocrm.check_references() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION nocrm.protect_butler() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION nocrm.stage_trigger_validate() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
-- Agents fire custom triggers and read timelines: both read or write what agents cannot.
ALTER FUNCTION nocrm.fire_trigger(bigint, text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION nocrm.lead_timeline(bigint) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

------------------------------------------------------------------------
-- Dump and restore: identity sequences go with their tables' data.
------------------------------------------------------------------------
-- (one call per statement: each call rewrites the extension's catalog row)
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['users', 'pipelines', 'steps', 'leads', 'comments', 'emails',
                             'automations', 'notifications', 'queue', 'lead_history',
                             'automation_runs', 'stage_triggers', 'absences'] LOOP
        PERFORM pg_catalog.pg_extension_config_dump(
            pg_catalog.pg_get_serial_sequence('nocrm.' || t, 'id')::regclass, '');
    END LOOP;
END $$;
-- The seeded notification template is made by CREATE EXTENSION; a dump of
-- it would collide on restore.
SELECT pg_catalog.pg_extension_config_dump('nocrm.email_templates', $$WHERE name <> 'notification'$$);
