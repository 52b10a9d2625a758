-- nocrm_automation 1.2 -> 1.3
\echo Use "ALTER EXTENSION nocrm_automation UPDATE TO '1.3'" to load this file. \quit

-- ==== rule order, stop, once per lead, on creation ====
-- Rules for one event run by position, then id; a rule may stop the rules
-- after it for that event on that lead; a rule may run once per lead, or at
-- most once per interval per lead (kept in automation_enrollments, whose
-- primary key makes two transactions agree even when one rolls back).
ALTER TABLE nocrm.automations
    ADD COLUMN position integer NOT NULL DEFAULT 0,
    ADD COLUMN stop_processing boolean NOT NULL DEFAULT false,
    ADD COLUMN once_per_lead boolean NOT NULL DEFAULT false,
    ADD COLUMN at_most_every interval,
    ADD COLUMN on_creation boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN nocrm.automations.position IS 'Order among the rules of one event: lower first, ties by id. Default 0.';
COMMENT ON COLUMN nocrm.automations.stop_processing IS 'After this rule ran for an event on a lead, the rules after it (by position, id) do not run for that event on that lead.';
COMMENT ON COLUMN nocrm.automations.once_per_lead IS 'Runs at most once for a lead, ever (nocrm.automation_enrollments); later matches are recorded as stopped.';
COMMENT ON COLUMN nocrm.automations.at_most_every IS 'Runs for a lead at most once in this interval; NULL: no limit (unless once_per_lead).';
COMMENT ON COLUMN nocrm.automations.on_creation IS 'lead.status.changed.to / lead.step.changed.to only: also runs for a lead inserted with that status or at that step (imports included).';

CREATE TABLE nocrm.automation_enrollments (
    automation_id  integer NOT NULL REFERENCES nocrm.automations ON DELETE CASCADE,
    lead_id        bigint NOT NULL REFERENCES nocrm.leads ON DELETE CASCADE,
    first_run_at   timestamptz NOT NULL DEFAULT now(),
    last_run_at    timestamptz NOT NULL DEFAULT now(),
    runs           integer NOT NULL DEFAULT 1,
    PRIMARY KEY (automation_id, lead_id)
);
CREATE INDEX automation_enrollments_lead_idx ON nocrm.automation_enrollments (lead_id);
COMMENT ON TABLE nocrm.automation_enrollments IS 'Leads an automation with once_per_lead or at_most_every has run for: when first and last, how often. Delete a row to let the automation run for that lead again.';
SELECT pg_catalog.pg_extension_config_dump('nocrm.automation_enrollments', '');
GRANT SELECT, DELETE ON nocrm.automation_enrollments TO nocrm_admin;
GRANT SELECT ON nocrm.automation_enrollments TO nocrm_agent;

-- Options of an automation; arguments left NULL keep their value.
CREATE FUNCTION nocrm.set_automation_options(
    id               integer,
    "position"       integer DEFAULT NULL,
    stop_processing  boolean DEFAULT NULL,
    once_per_lead    boolean DEFAULT NULL,
    at_most_every    interval DEFAULT NULL,
    on_creation      boolean DEFAULT NULL,
    clear_at_most_every boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    UPDATE nocrm.automations a
       SET position = coalesce(set_automation_options.position, a.position),
           stop_processing = coalesce(set_automation_options.stop_processing, a.stop_processing),
           once_per_lead = coalesce(set_automation_options.once_per_lead, a.once_per_lead),
           at_most_every = CASE WHEN clear_at_most_every THEN NULL
                                ELSE coalesce(set_automation_options.at_most_every, a.at_most_every) END,
           on_creation = coalesce(set_automation_options.on_creation, a.on_creation)
     WHERE a.id = set_automation_options.id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'automation % does not exist', set_automation_options.id
            USING ERRCODE = 'no_data_found';
    END IF;
END $$;
COMMENT ON FUNCTION nocrm.set_automation_options(integer, integer, boolean, boolean, interval, boolean, boolean) IS 'Sets an automation''s position, stop_processing, once_per_lead, at_most_every and on_creation; arguments left NULL keep their value.';

-- Positions 10, 20, ... in list order, e.g. all the rules of one event;
-- automations not listed keep theirs.
CREATE FUNCTION nocrm.reorder_automations(ids integer[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    missing integer;
BEGIN
    IF ids IS NULL OR cardinality(ids) = 0 OR array_position(ids, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'reorder_automations needs a list of automation ids'
            USING ERRCODE = 'invalid_parameter_value', DETAIL = format('ids: %s', ids);
    END IF;
    IF (SELECT count(DISTINCT i) FROM unnest(ids) i) <> cardinality(ids) THEN
        RAISE EXCEPTION 'reorder_automations: an automation is listed twice'
            USING ERRCODE = 'invalid_parameter_value', DETAIL = format('ids: %s', ids);
    END IF;
    SELECT i INTO missing FROM unnest(ids) i
     WHERE NOT EXISTS (SELECT 1 FROM nocrm.automations a WHERE a.id = i) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'automation % does not exist', missing USING ERRCODE = 'no_data_found';
    END IF;
    UPDATE nocrm.automations a SET position = o.n * 10
      FROM unnest(ids) WITH ORDINALITY o(id, n)
     WHERE a.id = o.id AND a.position IS DISTINCT FROM o.n * 10;
END $$;
COMMENT ON FUNCTION nocrm.reorder_automations(integer[]) IS 'Gives the listed automations positions 10, 20, ... in list order; the others keep theirs.';

GRANT EXECUTE ON FUNCTION nocrm.set_automation_options(integer, integer, boolean, boolean, interval, boolean, boolean),
    nocrm.reorder_automations(integer[]) TO nocrm_admin;

-- ==== drain control ====

-- Cancelling one queue item: pending (never sent), processing (in flight:
-- the drain's outcome no longer overwrites it) or dead (out of the dead
-- letters).  Done and cancelled items are left as they are.
CREATE FUNCTION nocrm.cancel_queue_item(id bigint, reason text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    was text;
BEGIN
    IF cancel_queue_item.id IS NULL THEN
        RAISE EXCEPTION 'id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT q.state INTO was FROM nocrm.queue q WHERE q.id = cancel_queue_item.id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'queue item % does not exist', cancel_queue_item.id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF was IN ('pending', 'processing', 'dead') THEN
        UPDATE nocrm.queue q
           SET state = 'cancelled', lease_until = NULL,
               last_error = 'cancelled by ' || session_user || coalesce(': ' || reason, '')
         WHERE q.id = cancel_queue_item.id;
    END IF;
    RETURN was;
END $$;
COMMENT ON FUNCTION nocrm.cancel_queue_item(bigint, text) IS 'Cancels a pending, processing (in flight) or dead queue item; returns the state it had. A processing item may still reach its receiver; the drain does not overwrite the cancel.';
REVOKE ALL ON FUNCTION nocrm.cancel_queue_item(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nocrm.cancel_queue_item(bigint, text) TO nocrm_admin;

-- stop_worker() also stops the drains running now (each holds the advisory
-- lock (nocrm.queue's oid, 1) shared while it runs): it cancels them and
-- holds that lock until its transaction ends, so none starts meanwhile.
CREATE OR REPLACE FUNCTION nocrm.stop_worker() RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    removed boolean := false;
    queue_oid oid := 'nocrm.queue'::regclass;
    stopped boolean := false;
    waited_until timestamptz := clock_timestamp() + interval '30 seconds';
BEGIN
    IF to_regclass('cron.job') IS NOT NULL THEN
        removed := coalesce((SELECT cron.unschedule(jobid) FROM cron.job
                              WHERE jobname = 'nocrm-drain-' || current_database()), false);
    END IF;
    LOOP
        -- drains that started meanwhile are cancelled on the next turn
        PERFORM pg_cancel_backend(l.pid)
           FROM pg_locks l
          WHERE l.locktype = 'advisory' AND l.granted AND l.pid <> pg_backend_pid()
            AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
            AND l.classid = queue_oid AND l.objid = 1 AND l.objsubid = 2;
        stopped := pg_try_advisory_xact_lock(queue_oid::integer, 1);
        EXIT WHEN stopped OR clock_timestamp() > waited_until;
        PERFORM pg_sleep(0.05);
    END LOOP;
    IF NOT stopped THEN
        RAISE WARNING 'a drain of this database did not stop within 30 seconds'
            USING HINT = 'See pg_stat_activity for CALL nocrm.drain(); pg_terminate_backend() stops it at once.';
    END IF;
    RETURN removed;
END $$;
COMMENT ON FUNCTION nocrm.stop_worker() IS 'Removes the pg_cron job of the drain and stops the drains running in this database (they record what they sent first); returns whether a job was removed.';

GRANT SET ON PARAMETER nocrm.drain_enabled TO nocrm_admin;

-- ==== mail: EHLO name, TLS trust, From name ====
-- The new delivery settings are for admins like the others (no credentials among them).
GRANT SET ON PARAMETER nocrm.mail_from_name, nocrm.smtp_helo_name, nocrm.smtp_ca_file,
    nocrm.smtp_ca_path, nocrm.smtp_tls_verify, nocrm.smtp_tls_server_name,
    nocrm.http_ca_file, nocrm.http_ca_path
    TO nocrm_admin;

CREATE FUNCTION nocrm.email_message(recipient text, subject text, body text,
                                    idempotency_key text DEFAULT gen_random_uuid()::text)
RETURNS text
    AS 'MODULE_PATHNAME', 'nocrm_email_message' LANGUAGE C STRICT;
COMMENT ON FUNCTION nocrm.email_message(text, text, text, text) IS 'The RFC 5322 message the drain would send now with these values and the current settings (CRLF line ends): for previews and tests.';
REVOKE ALL ON FUNCTION nocrm.email_message(text, text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nocrm.email_message(text, text, text, text) TO nocrm_admin;

-- ==== field conditions ====
-- A column of nocrm.leads that an automation's field condition reads cannot
-- be dropped while the automation exists: the drop is refused, naming them.
CREATE FUNCTION nocrm.protect_rule_columns() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    dropped record;
    readers text;
BEGIN
    IF to_regclass('nocrm.automations') IS NULL THEN
        RETURN;
    END IF;
    FOR dropped IN SELECT * FROM pg_event_trigger_dropped_objects()
                    WHERE object_type = 'table column' AND original
                      AND address_names[1] = 'nocrm' AND address_names[2] = 'leads' LOOP
        SELECT string_agg(format('%s "%s"', a.id, a.name), ', ' ORDER BY a.id) INTO readers
          FROM nocrm.automations a
         WHERE jsonb_path_exists(a.conditions, '$.** ? (@.field == $column)',
                                 jsonb_build_object('column', dropped.address_names[3]));
        IF readers IS NOT NULL THEN
            RAISE EXCEPTION 'cannot drop column % of nocrm.leads: automations read it', dropped.address_names[3]
                USING ERRCODE = 'dependent_objects_still_exist',
                      DETAIL = format('Field conditions of automations %s name it.', readers),
                      HINT = 'Change or delete those automations first.';
        END IF;
    END LOOP;
END $$;
COMMENT ON FUNCTION nocrm.protect_rule_columns() IS 'Event trigger: refuses to drop a column of nocrm.leads that a field condition reads.';
CREATE EVENT TRIGGER nocrm_protect_rule_columns ON sql_drop
    EXECUTE FUNCTION nocrm.protect_rule_columns();
