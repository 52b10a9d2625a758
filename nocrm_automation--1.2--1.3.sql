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

REVOKE ALL ON FUNCTION nocrm.set_automation_options(integer, integer, boolean, boolean, interval, boolean, boolean),
    nocrm.reorder_automations(integer[]) FROM PUBLIC;
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

-- queue_status: how many drains run now in this database (by their lock).
CREATE OR REPLACE VIEW nocrm.queue_status AS
SELECT (SELECT count(*) FROM nocrm.queue WHERE state = 'pending') AS pending,
       (SELECT count(*) FROM nocrm.queue WHERE state = 'pending' AND run_at <= now()) AS due,
       (SELECT count(*) FROM nocrm.queue WHERE state = 'processing') AS processing,
       (SELECT count(*) FROM nocrm.queue WHERE state = 'done') AS done,
       (SELECT count(*) FROM nocrm.queue WHERE state = 'dead') AS dead,
       (SELECT count(*) FROM nocrm.queue WHERE state = 'cancelled') AS cancelled,
       (SELECT min(run_at) FROM nocrm.queue WHERE state = 'pending' AND run_at <= now()) AS oldest_due,
       now() - (SELECT min(run_at) FROM nocrm.queue WHERE state = 'pending' AND run_at <= now()) AS oldest_due_age,
       (SELECT count(*) FROM nocrm.queue WHERE state = 'done'
           AND delivered_at > now() - interval '5 minutes') / 5.0 AS per_minute_5m,
       (SELECT last_error FROM nocrm.queue WHERE last_error IS NOT NULL
         ORDER BY last_attempt_at DESC NULLS LAST, id DESC LIMIT 1) AS last_error,
       (SELECT max(last_attempt_at) FROM nocrm.queue WHERE last_error IS NOT NULL) AS last_error_at,
       nocrm.worker_scheduled() AS worker_scheduled,
       (SELECT count(*) FROM pg_catalog.pg_locks l
         WHERE l.locktype = 'advisory' AND l.granted
           AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = current_database())
           AND l.classid = 'nocrm.queue'::regclass AND l.objid = 1 AND l.objsubid = 2) AS drains_running;
COMMENT ON VIEW nocrm.queue_status IS 'One row: items by state, the oldest due item and its age, deliveries per minute over 5 minutes, the last error, whether pg_cron runs the drain, and how many drains run now.';

-- A logical subscriber's apply worker runs with session_replication_role =
-- replica: no automation fires there, and neither does the statement trigger
-- nocrm_rules_changed.  These row triggers fire only in that mode, so rule
-- changes that arrive by replication still reach the subscriber's caches.
CREATE TRIGGER nocrm_rules_changed_replica AFTER INSERT OR UPDATE OR DELETE ON nocrm.automations
    FOR EACH ROW EXECUTE FUNCTION nocrm.rules_changed_trigger();
CREATE TRIGGER nocrm_rules_changed_replica AFTER INSERT OR UPDATE OR DELETE ON nocrm.users
    FOR EACH ROW EXECUTE FUNCTION nocrm.rules_changed_trigger();
CREATE TRIGGER nocrm_rules_changed_replica AFTER INSERT OR UPDATE OR DELETE ON nocrm.pipelines
    FOR EACH ROW EXECUTE FUNCTION nocrm.rules_changed_trigger();
CREATE TRIGGER nocrm_rules_changed_replica AFTER INSERT OR UPDATE OR DELETE ON nocrm.steps
    FOR EACH ROW EXECUTE FUNCTION nocrm.rules_changed_trigger();
CREATE TRIGGER nocrm_rules_changed_replica AFTER INSERT OR UPDATE OR DELETE ON nocrm.email_templates
    FOR EACH ROW EXECUTE FUNCTION nocrm.rules_changed_trigger();
CREATE TRIGGER nocrm_rules_changed_replica AFTER INSERT OR UPDATE OR DELETE ON nocrm.stage_triggers
    FOR EACH ROW EXECUTE FUNCTION nocrm.rules_changed_trigger();
ALTER TABLE nocrm.automations ENABLE REPLICA TRIGGER nocrm_rules_changed_replica;
ALTER TABLE nocrm.users ENABLE REPLICA TRIGGER nocrm_rules_changed_replica;
ALTER TABLE nocrm.pipelines ENABLE REPLICA TRIGGER nocrm_rules_changed_replica;
ALTER TABLE nocrm.steps ENABLE REPLICA TRIGGER nocrm_rules_changed_replica;
ALTER TABLE nocrm.email_templates ENABLE REPLICA TRIGGER nocrm_rules_changed_replica;
ALTER TABLE nocrm.stage_triggers ENABLE REPLICA TRIGGER nocrm_rules_changed_replica;

-- ==== mail: EHLO name, TLS trust, From name ====
-- The new delivery settings are for admins like the others (no credentials among them).
GRANT SET ON PARAMETER nocrm.mail_from_name, nocrm.smtp_helo_name, nocrm.smtp_ca_file,
    nocrm.smtp_ca_path, nocrm.smtp_tls_verify, nocrm.smtp_tls_server_name,
    nocrm.smtp_tls_pinned_key, nocrm.http_ca_file, nocrm.http_ca_path
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
                    WHERE object_type = 'table column'
                      AND address_names[1] = 'nocrm' AND address_names[2] = 'leads' LOOP
        SELECT string_agg(format('%s "%s"', a.id, a.name), ', ' ORDER BY a.id) INTO readers
          FROM nocrm.automations a
         WHERE jsonb_path_exists(a.conditions, '$.** ? (@.field == $column)',
                                 jsonb_build_object('column', dropped.address_names[3]))
            OR (a.event = 'lead.date.reached' AND a.target = dropped.address_names[3])
            OR jsonb_path_exists(a.actions, '$[*] ? (@.type == "set_field" && (@.field == $column || @.value.field == $column))',
                                 jsonb_build_object('column', dropped.address_names[3]));
        IF readers IS NOT NULL THEN
            RAISE EXCEPTION 'cannot drop column % of nocrm.leads: automations use it', dropped.address_names[3]
                USING ERRCODE = 'dependent_objects_still_exist',
                      DETAIL = format('Automations %s read or set it (field conditions, date rules, set_field).', readers),
                      HINT = 'Change or delete those automations first.';
        END IF;
    END LOOP;
END $$;
COMMENT ON FUNCTION nocrm.protect_rule_columns() IS 'Event trigger: refuses to drop a column of nocrm.leads that an automation reads or sets (field condition, date rule target, set_field).';
REVOKE ALL ON FUNCTION nocrm.protect_rule_columns() FROM PUBLIC;
CREATE EVENT TRIGGER nocrm_protect_rule_columns ON sql_drop
    EXECUTE FUNCTION nocrm.protect_rule_columns();

-- ==== restore ====
-- pg_dump's output and every pg_restore connection set check_function_bodies
-- = false.  Such a session, by a role that may write the history itself, is
-- restoring: the extension's triggers derive, validate, record and raise
-- nothing for the rows it loads, which the source database already made
-- (restore.c; the C triggers ask directly, the PL/pgSQL ones in WHEN).
CREATE FUNCTION nocrm.restoring() RETURNS boolean
    AS 'MODULE_PATHNAME', 'nocrm_restoring_sql' LANGUAGE C VOLATILE;
COMMENT ON FUNCTION nocrm.restoring() IS 'Whether this session is loading a dump: check_function_bodies is off (pg_dump and pg_restore set it so), the role may write nocrm.lead_history itself, and no extension script is running. The extension''s triggers then take rows as they come: no automation, stage trigger, history, notification, counter or validation.';

CREATE OR REPLACE TRIGGER nocrm_stage_trigger_validate BEFORE INSERT OR UPDATE ON nocrm.stage_triggers
    FOR EACH ROW WHEN (NOT nocrm.restoring()) EXECUTE FUNCTION nocrm.stage_trigger_validate();
CREATE OR REPLACE TRIGGER nocrm_sync_counters AFTER INSERT OR UPDATE OF actions ON nocrm.automations
    FOR EACH ROW WHEN (NOT nocrm.restoring()) EXECUTE FUNCTION nocrm.sync_assignment_counters();
CREATE OR REPLACE TRIGGER nocrm_cascade_email AFTER UPDATE OF email ON nocrm.users
    FOR EACH ROW WHEN (OLD.email IS NOT NULL AND NEW.email IS NOT NULL
                       AND lower(OLD.email) <> lower(NEW.email) AND NOT nocrm.restoring())
    EXECUTE FUNCTION nocrm.cascade_user_email();
CREATE OR REPLACE TRIGGER nocrm_check_references AFTER DELETE OR UPDATE OF id, email ON nocrm.users
    FOR EACH STATEMENT WHEN (NOT nocrm.restoring()) EXECUTE FUNCTION nocrm.check_references();
CREATE OR REPLACE TRIGGER nocrm_check_references AFTER DELETE OR UPDATE OF id, name ON nocrm.pipelines
    FOR EACH STATEMENT WHEN (NOT nocrm.restoring()) EXECUTE FUNCTION nocrm.check_references();
CREATE OR REPLACE TRIGGER nocrm_check_references AFTER DELETE OR UPDATE OF id, name ON nocrm.steps
    FOR EACH STATEMENT WHEN (NOT nocrm.restoring()) EXECUTE FUNCTION nocrm.check_references();
CREATE OR REPLACE TRIGGER nocrm_check_references AFTER DELETE OR UPDATE OF name ON nocrm.email_templates
    FOR EACH STATEMENT WHEN (NOT nocrm.restoring()) EXECUTE FUNCTION nocrm.check_references();

-- The rows CREATE EXTENSION makes, the Butler (users id 0) and the
-- notification template, stay out of their tables' dumps: a restore makes
-- them again with CREATE EXTENSION, and a dumped copy would collide with
-- them (under --disable-triggers too).  Their values travel here, kept from
-- the CRM's first users or their first change on; loading a row writes the
-- values over the seeded row.
CREATE TABLE nocrm.seeded_rows (
    seed   text PRIMARY KEY CHECK (seed IN ('butler', 'notification_template')),
    value  jsonb CHECK (value IS NOT NULL OR seed = 'notification_template')
);
COMMENT ON TABLE nocrm.seeded_rows IS 'The Butler and the notification template as they are, from the CRM''s first users or templates or their first change on: pg_dump carries them here, and a restore writes them over the ones CREATE EXTENSION made again. value NULL: the template was deleted. Kept by triggers; not for editing.';

-- Timestamps in UTC, so the value does not depend on the session's TimeZone.
CREATE FUNCTION nocrm.seeded_row(seed text) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
    SELECT CASE seeded_row.seed
        WHEN 'butler' THEN
            (SELECT jsonb_build_object('name', u.name, 'email', u.email, 'timezone', u.timezone,
                                       'created_at', u.created_at AT TIME ZONE 'UTC')
               FROM nocrm.users u WHERE u.is_butler)
        WHEN 'notification_template' THEN
            (SELECT jsonb_build_object('subject', t.subject, 'body', t.body,
                                       'updated_at', t.updated_at AT TIME ZONE 'UTC')
               FROM nocrm.email_templates t WHERE t.name = 'notification')
    END
$$;
COMMENT ON FUNCTION nocrm.seeded_row(text) IS 'A seeded row (butler or notification_template) as it is now, as nocrm.seeded_rows keeps it; NULL for a deleted template.';

CREATE FUNCTION nocrm.restore_seeded_row(seed text, value jsonb) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    IF seed IS NULL OR seed NOT IN ('butler', 'notification_template') THEN
        RAISE EXCEPTION 'unknown seeded row "%"', seed
            USING ERRCODE = 'invalid_parameter_value', HINT = 'The seeded rows are butler and notification_template.';
    END IF;
    IF value IS NOT DISTINCT FROM nocrm.seeded_row(seed) THEN
        RETURN false;
    END IF;
    IF seed = 'butler' THEN
        UPDATE nocrm.users u
           SET name = value ->> 'name', email = value ->> 'email', timezone = value ->> 'timezone',
               created_at = (value ->> 'created_at')::timestamp AT TIME ZONE 'UTC'
         WHERE u.is_butler;
    ELSIF value IS NULL THEN
        DELETE FROM nocrm.email_templates t WHERE t.name = 'notification';
    ELSE
        INSERT INTO nocrm.email_templates AS t (name, subject, body, updated_at)
        VALUES ('notification', value ->> 'subject', value ->> 'body',
                (value ->> 'updated_at')::timestamp AT TIME ZONE 'UTC')
        ON CONFLICT (name) DO UPDATE
           SET subject = EXCLUDED.subject, body = EXCLUDED.body, updated_at = EXCLUDED.updated_at;
    END IF;
    RETURN true;
END $$;
COMMENT ON FUNCTION nocrm.restore_seeded_row(text, jsonb) IS 'Writes a value of nocrm.seeded_rows over the seeded row; returns whether it changed it. A restore does this as it loads the rows; after a load with triggers disabled: SELECT nocrm.restore_seeded_row(seed, value) FROM nocrm.seeded_rows.';

CREATE FUNCTION nocrm.seeded_rows_load() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- A change to the seeded row has stored this row already (seeded_rows_keep).
    IF nocrm.restore_seeded_row(NEW.seed, NEW.value)
       OR EXISTS (SELECT 1 FROM nocrm.seeded_rows r WHERE r.seed = NEW.seed) THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END $$;
COMMENT ON FUNCTION nocrm.seeded_rows_load() IS 'Trigger: a row loaded into nocrm.seeded_rows (a restore) is written over the seeded row it names.';
CREATE TRIGGER nocrm_seeded_rows_load BEFORE INSERT ON nocrm.seeded_rows
    FOR EACH ROW EXECUTE FUNCTION nocrm.seeded_rows_load();

CREATE FUNCTION nocrm.seeded_rows_keep() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s text := CASE TG_TABLE_NAME WHEN 'users' THEN 'butler' ELSE 'notification_template' END;
BEGIN
    UPDATE nocrm.seeded_rows r SET value = nocrm.seeded_row(s)
     WHERE r.seed = s AND r.value IS DISTINCT FROM nocrm.seeded_row(s);
    INSERT INTO nocrm.seeded_rows (seed, value)
    SELECT s, nocrm.seeded_row(s) WHERE NOT EXISTS (SELECT 1 FROM nocrm.seeded_rows r WHERE r.seed = s)
    ON CONFLICT (seed) DO NOTHING;
    RETURN NULL;
END $$;
COMMENT ON FUNCTION nocrm.seeded_rows_keep() IS 'Trigger: a change to the Butler or the notification template is kept in nocrm.seeded_rows, for pg_dump.';
CREATE TRIGGER nocrm_seeded_rows_keep AFTER UPDATE ON nocrm.users
    FOR EACH ROW WHEN (NEW.is_butler) EXECUTE FUNCTION nocrm.seeded_rows_keep();
CREATE TRIGGER nocrm_seeded_rows_keep_insert AFTER INSERT ON nocrm.email_templates
    FOR EACH ROW WHEN (NEW.name = 'notification') EXECUTE FUNCTION nocrm.seeded_rows_keep();
CREATE TRIGGER nocrm_seeded_rows_keep_update AFTER UPDATE ON nocrm.email_templates
    FOR EACH ROW WHEN (OLD.name = 'notification' OR NEW.name = 'notification')
    EXECUTE FUNCTION nocrm.seeded_rows_keep();
CREATE TRIGGER nocrm_seeded_rows_keep_delete AFTER DELETE ON nocrm.email_templates
    FOR EACH ROW WHEN (OLD.name = 'notification') EXECUTE FUNCTION nocrm.seeded_rows_keep();

-- Kept from the CRM's first user or template of its own on, so that even
-- seeded rows never changed come back with their timestamps.
CREATE FUNCTION nocrm.seeded_rows_start() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO nocrm.seeded_rows (seed, value)
    SELECT s, nocrm.seeded_row(s) FROM unnest(ARRAY['butler', 'notification_template']) s
     WHERE NOT EXISTS (SELECT 1 FROM nocrm.seeded_rows r WHERE r.seed = s)
    ON CONFLICT (seed) DO NOTHING;
    RETURN NULL;
END $$;
COMMENT ON FUNCTION nocrm.seeded_rows_start() IS 'Trigger: the first users or templates of a CRM start nocrm.seeded_rows, so a dump carries the seeded rows as they are.';
CREATE TRIGGER nocrm_seeded_rows_start AFTER INSERT ON nocrm.users
    FOR EACH STATEMENT EXECUTE FUNCTION nocrm.seeded_rows_start();
CREATE TRIGGER nocrm_seeded_rows_start AFTER INSERT ON nocrm.email_templates
    FOR EACH STATEMENT EXECUTE FUNCTION nocrm.seeded_rows_start();

-- Updated from an older version: a CRM in use, or seeded rows changed, are
-- kept from now on (a fresh install, or one never used, has none).
INSERT INTO nocrm.seeded_rows (seed, value)
SELECT s, nocrm.seeded_row(s) FROM unnest(ARRAY['butler', 'notification_template']) s
 WHERE EXISTS (SELECT 1 FROM nocrm.users u
                WHERE NOT u.is_butler
                   OR (u.name, u.email, u.timezone) IS DISTINCT FROM ('The Butler', 'butler@nocrm.invalid', 'UTC'))
    OR EXISTS (SELECT 1 FROM nocrm.email_templates t WHERE t.name <> 'notification')
    OR NOT EXISTS (SELECT 1 FROM nocrm.email_templates t
                    WHERE t.name = 'notification' AND t.subject = '{{lead.title}}: {{message}}'
                      AND t.body = E'{{message}}\n\nLead: {{lead.title}} ({{lead.status}}, {{lead.pipeline}} / {{lead.step}})\nOwner: {{owner.name}}\n\n-- \n{{butler.name}}');

-- Only rows that match the seeded row now: a leftover of a load with the
-- triggers disabled is not carried on.
SELECT pg_catalog.pg_extension_config_dump('nocrm.seeded_rows',
    'WHERE value IS NOT DISTINCT FROM nocrm.seeded_row(seed)');

REVOKE ALL ON FUNCTION nocrm.restore_seeded_row(text, jsonb), nocrm.seeded_rows_load(),
    nocrm.seeded_rows_keep(), nocrm.seeded_rows_start() FROM PUBLIC;
GRANT SELECT ON nocrm.seeded_rows TO nocrm_admin;

-- ==== date rules ====
-- lead.date.reached: an automation fires at its target date column +
-- date_offset.  Writes of a lead schedule one pending row per rule here (C,
-- dates.c); the drain fires what is due through the partial index.
ALTER TABLE nocrm.automations ADD COLUMN date_offset interval NOT NULL DEFAULT '0';
COMMENT ON COLUMN nocrm.automations.date_offset IS 'lead.date.reached only: when after (or, negative, before) the target date column it fires, e.g. ''-3 days''.';

CREATE TABLE nocrm.date_firings (
    automation_id  integer NOT NULL REFERENCES nocrm.automations ON DELETE CASCADE,
    lead_id        bigint NOT NULL REFERENCES nocrm.leads ON DELETE CASCADE,
    date_value     timestamptz NOT NULL,
    due_at         timestamptz NOT NULL,
    state          text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'fired', 'skipped', 'failed')),
    scheduled_at   timestamptz NOT NULL DEFAULT now(),
    done_at        timestamptz,
    detail         text,
    PRIMARY KEY (automation_id, lead_id, date_value)
);
CREATE INDEX date_firings_due_idx ON nocrm.date_firings (due_at) WHERE state = 'pending';
CREATE INDEX date_firings_lead_idx ON nocrm.date_firings (lead_id);
COMMENT ON TABLE nocrm.date_firings IS 'Date rules (lead.date.reached): one row per automation, lead and date value; pending until due_at, then fired, skipped (conditions no longer held; detail says why) or failed (the error).';
SELECT pg_catalog.pg_extension_config_dump('nocrm.date_firings', '');
GRANT SELECT ON nocrm.date_firings TO nocrm_admin, nocrm_agent;

-- A date rule created, enabled or changed: the leads whose date is still
-- ahead are scheduled (past dates are not fired after the fact).
-- As the owner: an admin writes automations but cannot write date_firings.
CREATE FUNCTION nocrm.schedule_date_rule() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND (NEW.event, NEW.target, NEW.date_offset, NEW.enabled)
                            IS NOT DISTINCT FROM (OLD.event, OLD.target, OLD.date_offset, OLD.enabled) THEN
        RETURN NULL;
    END IF;
    DELETE FROM nocrm.date_firings f WHERE f.automation_id = NEW.id AND f.state = 'pending';
    IF NEW.event = 'lead.date.reached' AND NEW.enabled THEN
        EXECUTE format($q$INSERT INTO nocrm.date_firings (automation_id, lead_id, date_value, due_at)
                          SELECT $1, l.id, l.%1$I::timestamptz, l.%1$I::timestamptz + $2
                            FROM nocrm.leads l
                           WHERE l.%1$I > now() - interval '200 years' AND l.%1$I < '200000-01-01'
                             AND l.%1$I::timestamptz + $2 >= now()
                          ON CONFLICT DO NOTHING$q$, NEW.target)
          USING NEW.id, NEW.date_offset;
    END IF;
    RETURN NULL;
END $$;
-- (a restore brings date_firings back as they were)
CREATE TRIGGER nocrm_schedule_date_rule_insert AFTER INSERT ON nocrm.automations
    FOR EACH ROW WHEN (NEW.event = 'lead.date.reached' AND NOT nocrm.restoring())
    EXECUTE FUNCTION nocrm.schedule_date_rule();
CREATE TRIGGER nocrm_schedule_date_rule_update AFTER UPDATE ON nocrm.automations
    FOR EACH ROW WHEN ((NEW.event = 'lead.date.reached' OR OLD.event = 'lead.date.reached')
                       AND NOT nocrm.restoring())
    EXECUTE FUNCTION nocrm.schedule_date_rule();

CREATE FUNCTION nocrm.fire_due_date_rules(max integer DEFAULT 100) RETURNS integer
    AS 'MODULE_PATHNAME', 'nocrm_fire_due_date_rules' LANGUAGE C VOLATILE;
COMMENT ON FUNCTION nocrm.fire_due_date_rules(integer) IS 'Fires up to max date rules that are due (what each round of the drain does); returns how many were handled.';

CREATE FUNCTION nocrm.set_date_offset(id integer, date_offset interval) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    UPDATE nocrm.automations a SET date_offset = set_date_offset.date_offset WHERE a.id = set_date_offset.id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'automation % does not exist', set_date_offset.id USING ERRCODE = 'no_data_found';
    END IF;
END $$;
COMMENT ON FUNCTION nocrm.set_date_offset(integer, interval) IS 'Sets when a lead.date.reached automation fires relative to its date column, e.g. ''-3 days''; pending firings are scheduled again.';
REVOKE ALL ON FUNCTION nocrm.schedule_date_rule(), nocrm.fire_due_date_rules(integer),
    nocrm.set_date_offset(integer, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nocrm.set_date_offset(integer, interval) TO nocrm_admin;

-- ==== rule versions ====
-- Every change of an automation or a stage trigger is kept: who, when, the
-- definition after it (before it, for a delete).  revert_automation() and
-- revert_stage_trigger() bring an older one back, validated like any write.
CREATE TABLE nocrm.rule_versions (
    kind        text NOT NULL CHECK (kind IN ('automation', 'stage_trigger')),
    object_id   integer NOT NULL,
    version     integer NOT NULL CHECK (version > 0),
    operation   text NOT NULL CHECK (operation IN ('created', 'changed', 'deleted', 'reverted')),
    definition  jsonb NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    changed_by  name NOT NULL DEFAULT session_user,
    actor_id    bigint,
    detail      text,
    PRIMARY KEY (kind, object_id, version)
);
COMMENT ON TABLE nocrm.rule_versions IS 'Every version of every automation and stage trigger: the row as jsonb after the change (before it for deleted), who (session_user, and nocrm.actor when set) and when. Written by triggers; revert with nocrm.revert_automation() / nocrm.revert_stage_trigger().';
SELECT pg_catalog.pg_extension_config_dump('nocrm.rule_versions', '');
GRANT SELECT ON nocrm.rule_versions TO nocrm_admin;

CREATE FUNCTION nocrm.record_rule_version() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rule_kind text := CASE TG_TABLE_NAME WHEN 'automations' THEN 'automation' ELSE 'stage_trigger' END;
    row_now jsonb := CASE WHEN TG_OP = 'DELETE' THEN to_jsonb(OLD) ELSE to_jsonb(NEW) END
                     - 'created_at' - 'updated_at';
    reverted text := nullif(current_setting('nocrm_internal.reverting', true), '');
    actor bigint;
BEGIN
    IF TG_OP = 'UPDATE' AND row_now = to_jsonb(OLD) - 'created_at' - 'updated_at' THEN
        RETURN NULL;            -- nothing but the timestamps changed
    END IF;
    BEGIN
        actor := (SELECT u.id FROM nocrm.users u
                   WHERE lower(u.email) = lower(nullif(current_setting('nocrm.actor', true), ''))
                      OR u.id::text = nullif(current_setting('nocrm.actor', true), '') LIMIT 1);
    EXCEPTION WHEN others THEN
        actor := NULL;
    END;
    INSERT INTO nocrm.rule_versions (kind, object_id, version, operation, definition, actor_id, detail)
    SELECT rule_kind, (row_now ->> 'id')::integer, coalesce(max(v.version), 0) + 1,
           CASE WHEN reverted IS NOT NULL THEN 'reverted'
                WHEN TG_OP = 'INSERT' THEN 'created' WHEN TG_OP = 'DELETE' THEN 'deleted'
                ELSE 'changed' END,
           row_now, actor, CASE WHEN reverted IS NOT NULL THEN 'back to version ' || reverted END
      FROM nocrm.rule_versions v
     WHERE v.kind = rule_kind AND v.object_id = (row_now ->> 'id')::integer;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION nocrm.record_rule_version() FROM PUBLIC;
CREATE TRIGGER nocrm_rule_versions AFTER INSERT OR UPDATE OR DELETE ON nocrm.automations
    FOR EACH ROW WHEN (NOT nocrm.restoring()) EXECUTE FUNCTION nocrm.record_rule_version();
CREATE TRIGGER nocrm_rule_versions AFTER INSERT OR UPDATE OR DELETE ON nocrm.stage_triggers
    FOR EACH ROW WHEN (NOT nocrm.restoring()) EXECUTE FUNCTION nocrm.record_rule_version();

-- What an update from an older version had: its first version.
INSERT INTO nocrm.rule_versions (kind, object_id, version, operation, definition, detail)
SELECT 'automation', a.id, 1, 'created', to_jsonb(a) - 'created_at' - 'updated_at', 'as it was at the update to 1.3'
  FROM nocrm.automations a;
INSERT INTO nocrm.rule_versions (kind, object_id, version, operation, definition, detail)
SELECT 'stage_trigger', t.id, 1, 'created', to_jsonb(t) - 'created_at', 'as it was at the update to 1.3'
  FROM nocrm.stage_triggers t;

-- Brings version N of a rule back (re-creating it with its id if it was
-- deleted).  The write is validated like any other; a version that names
-- a user, step or template gone since is refused, and nothing changes.
CREATE FUNCTION nocrm.revert_rule(kind text, id integer, version integer) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    def jsonb;
    tbl text := CASE kind WHEN 'automation' THEN 'automations' WHEN 'stage_trigger' THEN 'stage_triggers' END;
    cols text;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'unknown rule kind %', quote_literal(kind)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Kinds are automation and stage_trigger.';
    END IF;
    SELECT v.definition INTO def FROM nocrm.rule_versions v
     WHERE v.kind = revert_rule.kind AND v.object_id = revert_rule.id AND v.version = revert_rule.version;
    IF NOT FOUND THEN
        RAISE EXCEPTION '% % has no version %', replace(kind, '_', ' '), id, version
            USING ERRCODE = 'no_data_found',
                  HINT = format('SELECT version, operation, changed_at FROM nocrm.rule_versions WHERE kind = %L AND object_id = %s;', kind, id);
    END IF;
    -- the columns the table has now and the version knows (id included)
    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO cols
      FROM pg_attribute a
     WHERE a.attrelid = ('nocrm.' || tbl)::regclass AND a.attnum > 0 AND NOT a.attisdropped
       AND def ? a.attname;
    PERFORM set_config('nocrm_internal.reverting', version::text, true);
    EXECUTE format('INSERT INTO nocrm.%I AS t (%s) SELECT %s FROM jsonb_populate_record(NULL::nocrm.%I, $1)'
                   ' ON CONFLICT (id) DO UPDATE SET (%s) = (SELECT %s)',
                   tbl, cols, cols, tbl, cols,
                   (SELECT string_agg('EXCLUDED.' || quote_ident(c), ', ') FROM unnest(string_to_array(replace(cols, '"', ''), ', ')) c))
      USING def;
    PERFORM set_config('nocrm_internal.reverting', '', true);
END $$;
COMMENT ON FUNCTION nocrm.revert_rule(text, integer, integer) IS 'Brings version N of an automation or stage trigger back (validated; re-created with its id if deleted).';

CREATE FUNCTION nocrm.revert_automation(id integer, version integer) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $$ SELECT nocrm.revert_rule('automation', revert_automation.id, revert_automation.version) $$;
COMMENT ON FUNCTION nocrm.revert_automation(integer, integer) IS 'Brings version N of an automation back (nocrm.rule_versions); validated like any write.';
CREATE FUNCTION nocrm.revert_stage_trigger(id integer, version integer) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $$ SELECT nocrm.revert_rule('stage_trigger', revert_stage_trigger.id, revert_stage_trigger.version) $$;
COMMENT ON FUNCTION nocrm.revert_stage_trigger(integer, integer) IS 'Brings version N of a stage trigger back (nocrm.rule_versions); validated like any write.';

-- The version of an automation in force at a time (e.g. a queue row's created_at).
CREATE FUNCTION nocrm.automation_version_at(id integer, at timestamptz) RETURNS integer
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT max(v.version) FROM nocrm.rule_versions v
     WHERE v.kind = 'automation' AND v.object_id = automation_version_at.id AND v.changed_at <= automation_version_at.at
$$;
COMMENT ON FUNCTION nocrm.automation_version_at(integer, timestamptz) IS 'The version of an automation in force at that time, e.g. when a delayed action was queued.';

REVOKE ALL ON FUNCTION nocrm.revert_rule(text, integer, integer), nocrm.revert_automation(integer, integer),
    nocrm.revert_stage_trigger(integer, integer), nocrm.automation_version_at(integer, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nocrm.revert_rule(text, integer, integer), nocrm.revert_automation(integer, integer),
    nocrm.revert_stage_trigger(integer, integer), nocrm.automation_version_at(integer, timestamptz) TO nocrm_admin;

-- ==== secrets ====
-- Credentials where PostgreSQL keeps them: options of the USER MAPPING FOR
-- PUBLIC on server nocrm_credentials (as postgres_fdw does).  Only
-- superusers can read them (nobody has USAGE on the server); nocrm_admin
-- sets and clears them with set_secret() without seeing them.  They are not
-- in dumps: the server belongs to the extension, so pg_dump skips its
-- mapping (set them again after a restore).
CREATE FUNCTION nocrm.credentials_validator(text[], oid) RETURNS void
    AS 'MODULE_PATHNAME', 'nocrm_credentials_validator' LANGUAGE C STRICT;
REVOKE ALL ON FUNCTION nocrm.credentials_validator(text[], oid) FROM PUBLIC;
CREATE FOREIGN DATA WRAPPER nocrm_credentials VALIDATOR nocrm.credentials_validator;
COMMENT ON FOREIGN DATA WRAPPER nocrm_credentials IS 'nocrm_automation: holds no tables, only the credentials of server nocrm_credentials.';
CREATE SERVER nocrm_credentials FOREIGN DATA WRAPPER nocrm_credentials;
COMMENT ON SERVER nocrm_credentials IS 'nocrm_automation: its USER MAPPING FOR PUBLIC holds smtp_user, smtp_password and webhook_secret (nocrm.set_secret()).';

CREATE FUNCTION nocrm.set_secret(name text, value text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    present boolean;
BEGIN
    IF name IS NULL OR name NOT IN ('smtp_user', 'smtp_password', 'webhook_secret') THEN
        RAISE EXCEPTION 'unknown secret %', coalesce(quote_literal(name), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Secrets are smtp_user, smtp_password and webhook_secret.';
    END IF;
    IF value = '' THEN
        RAISE EXCEPTION 'an empty % is not a secret', name
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Give NULL to clear it.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_user_mapping um JOIN pg_foreign_server s ON s.oid = um.umserver
                    WHERE s.srvname = 'nocrm_credentials' AND um.umuser = 0) THEN
        CREATE USER MAPPING FOR PUBLIC SERVER nocrm_credentials;
    END IF;
    SELECT EXISTS (SELECT 1 FROM pg_user_mapping um JOIN pg_foreign_server s ON s.oid = um.umserver,
                                 unnest(um.umoptions) o
                    WHERE s.srvname = 'nocrm_credentials' AND um.umuser = 0
                      AND split_part(o, '=', 1) = set_secret.name) INTO present;
    -- the statements carry the value: no error of theirs may show it
    BEGIN
        IF value IS NULL THEN
            IF present THEN
                EXECUTE format('ALTER USER MAPPING FOR PUBLIC SERVER nocrm_credentials OPTIONS (DROP %I)', name);
            END IF;
        ELSE
            EXECUTE format('ALTER USER MAPPING FOR PUBLIC SERVER nocrm_credentials OPTIONS (%s %I %L)',
                           CASE WHEN present THEN 'SET' ELSE 'ADD' END, name, value);
        END IF;
    EXCEPTION WHEN others THEN
        RAISE EXCEPTION 'setting secret % failed', name USING ERRCODE = SQLSTATE;
    END;
END $$;
COMMENT ON FUNCTION nocrm.set_secret(text, text) IS 'Sets (or, with NULL, clears) smtp_user, smtp_password or webhook_secret; the drain uses it from its next round. Nobody but superusers can read it back.';

CREATE FUNCTION nocrm.secrets() RETURNS TABLE (name text, is_set boolean)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT n, EXISTS (SELECT 1 FROM pg_user_mapping um JOIN pg_foreign_server s ON s.oid = um.umserver,
                                    unnest(um.umoptions) o
                       WHERE s.srvname = 'nocrm_credentials' AND um.umuser = 0 AND split_part(o, '=', 1) = n)
      FROM unnest(ARRAY['smtp_user', 'smtp_password', 'webhook_secret']) n
$$;
COMMENT ON FUNCTION nocrm.secrets() IS 'Which secrets are set (never their values).';
REVOKE ALL ON FUNCTION nocrm.set_secret(text, text), nocrm.secrets() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nocrm.set_secret(text, text), nocrm.secrets() TO nocrm_admin;


-- ==== set_field ====
-- {"type": "set_field", "field": column, "value": ...}: compiled into one
-- UPDATE (src/definition.c); test mode and explain describe it in
-- describe_actions, defined once for 1.3 near the end of this script.
-- ==== email as the owner ====
-- send_email and notify's email channel may send From the lead owner
-- ("from": "owner") when an admin marked the owner's address as verified,
-- else with Reply-To the owner.  MAIL FROM stays nocrm.mail_from.
ALTER TABLE nocrm.users
    ADD COLUMN sender_verified boolean NOT NULL DEFAULT false,
    ADD COLUMN sender_name text
        CONSTRAINT users_sender_name_check
        CHECK (btrim(sender_name) <> '' AND sender_name !~ '[[:cntrl:]]' AND octet_length(sender_name) <= 200),
    ADD CONSTRAINT users_sender_needs_email CHECK (NOT sender_verified OR email IS NOT NULL);
COMMENT ON COLUMN nocrm.users.sender_verified IS 'Set by an admin once this address may be sent from by the CRM''s mail server (SPF/DKIM of its domain): then "from": "owner" puts it in From. Cleared when email changes.';
COMMENT ON COLUMN nocrm.users.sender_name IS 'Display name in From/Reply-To when mail is sent as this user; NULL = name.';

-- Not SECURITY DEFINER: current_user is who writes the row.
CREATE FUNCTION nocrm.guard_sender_verified() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    -- a new address is not verified, whoever changes it
    IF TG_OP = 'UPDATE' AND OLD.sender_verified AND NEW.sender_verified
       AND lower(NEW.email) IS DISTINCT FROM lower(OLD.email) THEN
        NEW.sender_verified := false;
    END IF;
    IF NEW.sender_verified AND (TG_OP = 'INSERT' OR NOT OLD.sender_verified)
       AND NOT pg_has_role(current_user, 'nocrm_admin', 'USAGE')
       AND NOT pg_has_role(current_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = TG_RELID), 'USAGE') THEN
        RAISE EXCEPTION 'only an admin can mark a user as a verified sender'
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = format('User %s would send email From %s.', NEW.id, NEW.email),
                  HINT = 'An admin (nocrm_admin) sets users.sender_verified once the mail server may send for that address (SPF, DKIM of its domain).';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER nocrm_guard_sender_verified BEFORE INSERT OR UPDATE OF sender_verified, email ON nocrm.users
    FOR EACH ROW EXECUTE FUNCTION nocrm.guard_sender_verified();
REVOKE ALL ON FUNCTION nocrm.guard_sender_verified() FROM PUBLIC;

-- The message of a queue row, with the From and Reply-To its payload carries.
CREATE FUNCTION nocrm.email_message(recipient text, subject text, body text,
                                    idempotency_key text, payload jsonb)
RETURNS text
    AS 'MODULE_PATHNAME', 'nocrm_email_message' LANGUAGE C STRICT;
COMMENT ON FUNCTION nocrm.email_message(text, text, text, text, jsonb) IS 'The RFC 5322 message the drain would send now for an email queue row''s payload (its "from", "from_name", "reply_to", "reply_to_name"): for previews and tests.';
REVOKE ALL ON FUNCTION nocrm.email_message(text, text, text, text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nocrm.email_message(text, text, text, text, jsonb) TO nocrm_admin;

-- ==== business calendar ====
-- The company calendar: a time zone, weekly hours and holidays.  Users
-- without working hours of their own, and leads without owner, follow it
-- (is_working, next_working_time, respect_working_hours, only_working_hours);
-- delays may count business time ("2 business hours", "3 business days").
-- Without its row everything works as before.  The arithmetic is C
-- (src/calendar.c), which is now is_working() and next_working_time() too.
CREATE TABLE nocrm.business_calendar (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    timezone   text NOT NULL CHECK (nocrm.is_timezone(timezone))
);
COMMENT ON TABLE nocrm.business_calendar IS 'The company calendar, at most one row: its time zone. While the row exists, users without working hours and leads without owner follow nocrm.business_hours and nocrm.holidays; without it they work at any time.';

CREATE TABLE nocrm.business_hours (
    weekday  integer NOT NULL CHECK (weekday BETWEEN 1 AND 7),
    starts   time NOT NULL,
    ends     time NOT NULL,
    PRIMARY KEY (weekday, starts),
    CHECK (starts < ends)
);
COMMENT ON TABLE nocrm.business_hours IS 'The company''s weekly hours per ISO weekday (1 = Monday), in the calendar''s time zone, from starts (included) to ends (excluded, 24:00 allowed); several periods a day, none overlapping. No rows: open all day on every day that is not a holiday.';

CREATE TABLE nocrm.holidays (
    day   date PRIMARY KEY CHECK (isfinite(day)),
    name  text NOT NULL CHECK (btrim(name) <> '')
);
COMMENT ON TABLE nocrm.holidays IS 'Days the company is closed all day (local dates in the calendar''s time zone). Users with working hours of their own do not follow them (give them an absence).';

-- Bad rows are refused with a reason, before the constraints (which stay as
-- the last word); a restore loads what the source accepted.
CREATE FUNCTION nocrm.business_calendar_validate() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    other record;
    days text[] := ARRAY['Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'Saturday', 'Sunday'];
BEGIN
    IF TG_TABLE_NAME = 'business_calendar' THEN
        IF NEW.timezone IS NOT NULL AND NOT nocrm.is_timezone(NEW.timezone) THEN
            RAISE EXCEPTION 'unknown time zone "%"', NEW.timezone
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'The company calendar''s time zone must be a name of pg_timezone_names.',
                      HINT = 'E.g. Europe/Rome, America/New_York or UTC.';
        END IF;
        IF TG_OP = 'INSERT' AND EXISTS (SELECT 1 FROM nocrm.business_calendar) THEN
            RAISE EXCEPTION 'the company calendar exists already'
                USING ERRCODE = 'unique_violation',
                      DETAIL = format('nocrm.business_calendar has its one row, in time zone %s.',
                                      (SELECT c.timezone FROM nocrm.business_calendar c)),
                      HINT = 'Change it: UPDATE nocrm.business_calendar SET timezone = ''Europe/Rome''.';
        END IF;
        RETURN NEW;
    END IF;

    IF NOT EXISTS (SELECT 1 FROM nocrm.business_calendar) THEN
        RAISE EXCEPTION 'there is no company calendar yet'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = format('nocrm.%s is read in the company calendar''s time zone, and nocrm.business_calendar has no row.', TG_TABLE_NAME),
                  HINT = 'Create it first: INSERT INTO nocrm.business_calendar (timezone) VALUES (''Europe/Rome'').';
    END IF;

    IF TG_TABLE_NAME = 'holidays' THEN
        IF NEW.day IS NOT NULL AND NOT isfinite(NEW.day) THEN
            RAISE EXCEPTION 'a holiday must be a date, not %', NEW.day
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'nocrm.holidays holds days the company is closed.';
        END IF;
        IF NEW.name IS NOT NULL AND btrim(NEW.name) = '' THEN
            RAISE EXCEPTION 'the holiday on % needs a name', NEW.day
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'nocrm.holidays.name is blank.',
                      HINT = 'E.g. ''Natale''.';
        END IF;
        RETURN NEW;
    END IF;

    -- business_hours
    IF NEW.weekday IS NOT NULL AND NEW.weekday NOT BETWEEN 1 AND 7 THEN
        RAISE EXCEPTION 'weekday % is not a day of the week', NEW.weekday
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'Weekdays are ISO: 1 = Monday ... 7 = Sunday.';
    END IF;
    IF NEW.starts >= NEW.ends THEN
        RAISE EXCEPTION 'business hours must end after they start'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('On %s the period would start at %s and end at %s.',
                                  days[NEW.weekday], NEW.starts, NEW.ends),
                  HINT = 'A period cannot cross midnight: write two rows (e.g. 22:00-24:00, then 00:00-06:00 the next day).';
    END IF;
    SELECT h.starts, h.ends INTO other FROM nocrm.business_hours h
     WHERE h.weekday = NEW.weekday AND h.starts < NEW.ends AND NEW.starts < h.ends
       AND (TG_OP = 'INSERT' OR (h.weekday, h.starts) IS DISTINCT FROM (OLD.weekday, OLD.starts))
     ORDER BY h.starts LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'business hours overlap'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('On %s, %s-%s overlaps %s-%s.', days[NEW.weekday],
                                  NEW.starts, NEW.ends, other.starts, other.ends),
                  HINT = 'Make them one row, or move one.';
    END IF;
    RETURN NEW;
END $$;
COMMENT ON FUNCTION nocrm.business_calendar_validate() IS 'Trigger: checks a row of the company calendar (time zone, one calendar, weekday, start before end, no overlap, named holidays).';
CREATE TRIGGER nocrm_business_calendar_validate BEFORE INSERT OR UPDATE ON nocrm.business_calendar
    FOR EACH ROW WHEN (NOT nocrm.restoring()) EXECUTE FUNCTION nocrm.business_calendar_validate();
CREATE TRIGGER nocrm_business_calendar_validate BEFORE INSERT OR UPDATE ON nocrm.business_hours
    FOR EACH ROW WHEN (NOT nocrm.restoring()) EXECUTE FUNCTION nocrm.business_calendar_validate();
CREATE TRIGGER nocrm_business_calendar_validate BEFORE INSERT OR UPDATE ON nocrm.holidays
    FOR EACH ROW WHEN (NOT nocrm.restoring()) EXECUTE FUNCTION nocrm.business_calendar_validate();

-- The calendar is read once per transaction; a change is seen at once by
-- the transaction that makes it.
CREATE FUNCTION nocrm.business_calendar_changed() RETURNS trigger
    AS 'MODULE_PATHNAME', 'nocrm_business_calendar_changed' LANGUAGE C;
COMMENT ON FUNCTION nocrm.business_calendar_changed() IS 'Trigger: the company calendar changed, this transaction reads it again.';
CREATE TRIGGER nocrm_business_calendar_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON nocrm.business_calendar
    FOR EACH STATEMENT EXECUTE FUNCTION nocrm.business_calendar_changed();
CREATE TRIGGER nocrm_business_calendar_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON nocrm.business_hours
    FOR EACH STATEMENT EXECUTE FUNCTION nocrm.business_calendar_changed();
CREATE TRIGGER nocrm_business_calendar_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON nocrm.holidays
    FOR EACH STATEMENT EXECUTE FUNCTION nocrm.business_calendar_changed();

COMMENT ON TABLE nocrm.working_hours IS 'Working hours per ISO weekday (1 = Monday) in the user''s time zone; several rows a day are allowed. No rows = the company calendar (nocrm.business_calendar), or always working without one.';

-- The working-time functions, now with the company calendar for users
-- without hours (and for user_id NULL: nobody, e.g. a lead without owner).
CREATE OR REPLACE FUNCTION nocrm.is_working(user_id bigint, at timestamptz DEFAULT now()) RETURNS boolean
    AS 'MODULE_PATHNAME', 'nocrm_is_working_sql' LANGUAGE C STABLE;
COMMENT ON FUNCTION nocrm.is_working(bigint, timestamptz) IS 'Whether the time falls in the user''s working hours, in their time zone; for a user without hours (or NULL) the company calendar''s, true without one. True for an unknown user.';
CREATE OR REPLACE FUNCTION nocrm.next_working_time(user_id bigint, after timestamptz DEFAULT now())
RETURNS timestamptz
    AS 'MODULE_PATHNAME', 'nocrm_next_working_time_sql' LANGUAGE C STABLE;
COMMENT ON FUNCTION nocrm.next_working_time(bigint, timestamptz) IS 'When the user next works and is not away, from a given time (the time itself if they do): their hours, else the company calendar (also for NULL), else any time. "after" for an unknown user.';
CREATE FUNCTION nocrm.delay_until(user_id bigint, delay text, after timestamptz DEFAULT now())
RETURNS timestamptz
    AS 'MODULE_PATHNAME', 'nocrm_delay_until_sql' LANGUAGE C STABLE;
COMMENT ON FUNCTION nocrm.delay_until(bigint, text, timestamptz) IS 'When an action with this "delay" (an interval, or "N business minutes|hours|days" on the user''s hours, else the company calendar, else plain time) queued at "after" falls due; "after" for a NULL delay.';
REVOKE ALL ON FUNCTION nocrm.delay_until(bigint, text, timestamptz), nocrm.business_calendar_validate(),
    nocrm.business_calendar_changed() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nocrm.delay_until(bigint, text, timestamptz) TO nocrm_agent;

GRANT SELECT ON nocrm.business_calendar, nocrm.business_hours, nocrm.holidays TO nocrm_agent;
GRANT SELECT, INSERT, UPDATE, DELETE ON nocrm.business_calendar, nocrm.business_hours, nocrm.holidays
    TO nocrm_admin;
SELECT pg_catalog.pg_extension_config_dump('nocrm.business_calendar', '');
SELECT pg_catalog.pg_extension_config_dump('nocrm.business_hours', '');
SELECT pg_catalog.pg_extension_config_dump('nocrm.holidays', '');

-- ==== failure alerts ====
-- A dead letter, an automation that keeps failing, and one the drain
-- disables for it are told to the admins (users.is_admin): a notification
-- and its NOTIFY, an email (template "alert") and the alert webhook, at most
-- once per problem (kind, subject) and nocrm.alert_interval.  The drain
-- calls nocrm.record_failures() in the transaction that records the
-- outcomes (alerts.c), so an alert commits with its cause or not at all.
ALTER TABLE nocrm.users ADD COLUMN is_admin boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN nocrm.users.is_admin IS 'Gets the failure alerts (dead letters, failing and disabled automations): a notification, and an email when the user has an address.';

CREATE INDEX queue_dead_idx ON nocrm.queue (automation_id) WHERE state = 'dead';

-- One row per failed attempt of an automation's work: a delivery (retried
-- or dead), a delayed action, a date rule's firing.  Pruned with the run log.
CREATE TABLE nocrm.automation_failures (
    id             bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    automation_id  integer NOT NULL,
    lead_id        bigint,
    queue_id       bigint,
    kind           text NOT NULL CHECK (kind IN ('email', 'mobile', 'webhook', 'action', 'date')),
    dead           boolean NOT NULL DEFAULT false,
    error          text,
    failed_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX automation_failures_automation_idx ON nocrm.automation_failures (automation_id, failed_at);
CREATE INDEX automation_failures_failed_idx ON nocrm.automation_failures (failed_at);
COMMENT ON TABLE nocrm.automation_failures IS 'Failed attempts of automations'' work (deliveries, delayed actions, date rules), written by the drain; counted for automation_failing alerts and nocrm.auto_disable_failures. Pruned after nocrm.run_log_retention.';

CREATE TABLE nocrm.alerts (
    id               bigint GENERATED BY DEFAULT AS IDENTITY UNIQUE,
    kind             text NOT NULL CHECK (kind IN ('dead_letter', 'automation_failing', 'automation_disabled')),
    subject          text NOT NULL,
    automation_id    integer,
    occurrences      bigint NOT NULL DEFAULT 0,
    first_seen       timestamptz NOT NULL DEFAULT now(),
    last_seen        timestamptz NOT NULL DEFAULT now(),
    last_queue_id    bigint,
    last_lead_id     bigint,
    last_error       text,
    alerted_at       timestamptz,
    alerts_sent      integer NOT NULL DEFAULT 0,
    since_alert      bigint NOT NULL DEFAULT 0,
    acknowledged_at  timestamptz,
    acknowledged_by  text,
    resolved_at      timestamptz,
    resolved_by      text,
    note             text,
    PRIMARY KEY (kind, subject)
);
COMMENT ON TABLE nocrm.alerts IS 'One row per problem (kind, subject: "automation N", or "queue KIND" for items no automation queued): occurrences, first and last seen, when the admins were last told, acknowledged and resolved. Open ones are in nocrm.problems.';
SELECT pg_catalog.pg_extension_config_dump('nocrm.alerts', '');
SELECT pg_catalog.pg_extension_config_dump('nocrm.automation_failures', '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('nocrm.alerts', 'id')::regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('nocrm.automation_failures', 'id')::regclass, '');

-- The built-in alert email, editable like "notification" (a seeded row).
DO $$
DECLARE
    tracked boolean := EXISTS (SELECT 1 FROM nocrm.seeded_rows);
BEGIN
    INSERT INTO nocrm.email_templates (name, subject, body)
    VALUES ('alert', '[CRM alert] {{message}}',
            E'{{message}}\n\nOpen problems: SELECT * FROM nocrm.problems;\nAcknowledge: SELECT nocrm.acknowledge_problem(id);\n\n-- \n{{butler.name}}')
    ON CONFLICT (name) DO NOTHING;
    -- the insert started nocrm.seeded_rows (its trigger): not on a CRM never used
    IF NOT tracked THEN
        DELETE FROM nocrm.seeded_rows;
    END IF;
END $$;

ALTER TABLE nocrm.seeded_rows DROP CONSTRAINT seeded_rows_seed_check,
    ADD CONSTRAINT seeded_rows_seed_check CHECK (seed IN ('butler', 'notification_template', 'alert_template')),
    DROP CONSTRAINT seeded_rows_check,
    ADD CONSTRAINT seeded_rows_check CHECK (value IS NOT NULL OR seed <> 'butler');

CREATE OR REPLACE FUNCTION nocrm.seeded_row(seed text) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
    SELECT CASE seeded_row.seed
        WHEN 'butler' THEN
            (SELECT jsonb_build_object('name', u.name, 'email', u.email, 'timezone', u.timezone,
                                       'created_at', u.created_at AT TIME ZONE 'UTC')
               FROM nocrm.users u WHERE u.is_butler)
        WHEN 'notification_template' THEN
            (SELECT jsonb_build_object('subject', t.subject, 'body', t.body,
                                       'updated_at', t.updated_at AT TIME ZONE 'UTC')
               FROM nocrm.email_templates t WHERE t.name = 'notification')
        WHEN 'alert_template' THEN
            (SELECT jsonb_build_object('subject', t.subject, 'body', t.body,
                                       'updated_at', t.updated_at AT TIME ZONE 'UTC')
               FROM nocrm.email_templates t WHERE t.name = 'alert')
    END
$$;
COMMENT ON FUNCTION nocrm.seeded_row(text) IS 'A seeded row (butler, notification_template or alert_template) as it is now, as nocrm.seeded_rows keeps it; NULL for a deleted template.';

CREATE OR REPLACE FUNCTION nocrm.restore_seeded_row(seed text, value jsonb) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    template text := CASE seed WHEN 'notification_template' THEN 'notification'
                               WHEN 'alert_template' THEN 'alert' END;
BEGIN
    IF seed IS NULL OR seed NOT IN ('butler', 'notification_template', 'alert_template') THEN
        RAISE EXCEPTION 'unknown seeded row "%"', seed
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'The seeded rows are butler, notification_template and alert_template.';
    END IF;
    IF value IS NOT DISTINCT FROM nocrm.seeded_row(seed) THEN
        RETURN false;
    END IF;
    IF seed = 'butler' THEN
        UPDATE nocrm.users u
           SET name = value ->> 'name', email = value ->> 'email', timezone = value ->> 'timezone',
               created_at = (value ->> 'created_at')::timestamp AT TIME ZONE 'UTC'
         WHERE u.is_butler;
    ELSIF value IS NULL THEN
        DELETE FROM nocrm.email_templates t WHERE t.name = template;
    ELSE
        INSERT INTO nocrm.email_templates AS t (name, subject, body, updated_at)
        VALUES (template, value ->> 'subject', value ->> 'body',
                (value ->> 'updated_at')::timestamp AT TIME ZONE 'UTC')
        ON CONFLICT (name) DO UPDATE
           SET subject = EXCLUDED.subject, body = EXCLUDED.body, updated_at = EXCLUDED.updated_at;
    END IF;
    RETURN true;
END $$;

CREATE OR REPLACE FUNCTION nocrm.seeded_rows_keep() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    names text[];
    s text;
BEGIN
    IF TG_TABLE_NAME = 'users' THEN
        names := ARRAY['butler'];
    ELSE
        names := CASE TG_OP WHEN 'INSERT' THEN ARRAY[NEW.name] WHEN 'DELETE' THEN ARRAY[OLD.name]
                            ELSE ARRAY[OLD.name, NEW.name] END;
        names := ARRAY(SELECT DISTINCT CASE n WHEN 'notification' THEN 'notification_template'
                                              WHEN 'alert' THEN 'alert_template' END
                         FROM unnest(names) n WHERE n IN ('notification', 'alert'));
    END IF;
    FOREACH s IN ARRAY names LOOP
        UPDATE nocrm.seeded_rows r SET value = nocrm.seeded_row(s)
         WHERE r.seed = s AND r.value IS DISTINCT FROM nocrm.seeded_row(s);
        INSERT INTO nocrm.seeded_rows (seed, value)
        SELECT s, nocrm.seeded_row(s) WHERE NOT EXISTS (SELECT 1 FROM nocrm.seeded_rows r WHERE r.seed = s)
        ON CONFLICT (seed) DO NOTHING;
    END LOOP;
    RETURN NULL;
END $$;
COMMENT ON FUNCTION nocrm.seeded_rows_keep() IS 'Trigger: a change to the Butler, the notification or the alert template is kept in nocrm.seeded_rows, for pg_dump.';

CREATE OR REPLACE FUNCTION nocrm.seeded_rows_start() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO nocrm.seeded_rows (seed, value)
    SELECT s, nocrm.seeded_row(s) FROM unnest(ARRAY['butler', 'notification_template', 'alert_template']) s
     WHERE NOT EXISTS (SELECT 1 FROM nocrm.seeded_rows r WHERE r.seed = s)
    ON CONFLICT (seed) DO NOTHING;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER nocrm_seeded_rows_keep_insert AFTER INSERT ON nocrm.email_templates
    FOR EACH ROW WHEN (NEW.name IN ('notification', 'alert')) EXECUTE FUNCTION nocrm.seeded_rows_keep();
CREATE OR REPLACE TRIGGER nocrm_seeded_rows_keep_update AFTER UPDATE ON nocrm.email_templates
    FOR EACH ROW WHEN (OLD.name IN ('notification', 'alert') OR NEW.name IN ('notification', 'alert'))
    EXECUTE FUNCTION nocrm.seeded_rows_keep();
CREATE OR REPLACE TRIGGER nocrm_seeded_rows_keep_delete AFTER DELETE ON nocrm.email_templates
    FOR EACH ROW WHEN (OLD.name IN ('notification', 'alert')) EXECUTE FUNCTION nocrm.seeded_rows_keep();
SELECT pg_catalog.pg_extension_config_dump('nocrm.email_templates', $$WHERE name NOT IN ('notification', 'alert')$$);

-- A CRM in use keeps the alert template from now on, like the other two.
INSERT INTO nocrm.seeded_rows (seed, value)
SELECT 'alert_template', nocrm.seeded_row('alert_template')
 WHERE EXISTS (SELECT 1 FROM nocrm.seeded_rows)
ON CONFLICT (seed) DO NOTHING;

-- current_setting() of an alert setting, also before the library is loaded.
CREATE FUNCTION nocrm.alert_setting(name text, fallback text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
    SELECT coalesce(nullif(current_setting('nocrm.' || name, true), ''), fallback)
$$;
COMMENT ON FUNCTION nocrm.alert_setting(text, text) IS 'A nocrm.alert_* setting as text, or the fallback while the library is not loaded.';

-- Tells the admins about one problem, unless it was told within
-- nocrm.alert_interval or is acknowledged; counts it either way.  The row
-- lock on the problem serializes concurrent drains.  Returns whether the
-- admins were told.
CREATE FUNCTION nocrm.raise_alert(kind text, automation_id integer, message text,
                                  queue_id bigint DEFAULT NULL, lead_id bigint DEFAULT NULL,
                                  error text DEFAULT NULL, queue_kind text DEFAULT NULL,
                                  occurrences integer DEFAULT 1)
RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    subj text := CASE WHEN raise_alert.automation_id IS NOT NULL THEN 'automation ' || raise_alert.automation_id
                      ELSE 'queue ' || coalesce(queue_kind, 'item') END;
    every interval := nocrm.alert_setting('alert_interval', '1h')::interval;
    url text := nocrm.alert_setting('alert_webhook_url', '');
    a nocrm.alerts;
    reopened boolean;
    tell boolean;
    text_out text;
    nid bigint;
    u record;
    body jsonb;
BEGIN
    IF kind IS NULL OR kind NOT IN ('dead_letter', 'automation_failing', 'automation_disabled') THEN
        RAISE EXCEPTION 'unknown alert kind "%"', kind
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Kinds are dead_letter, automation_failing and automation_disabled.';
    END IF;
    INSERT INTO nocrm.alerts AS x (kind, subject, automation_id)
    VALUES (raise_alert.kind, subj, raise_alert.automation_id)
    ON CONFLICT ON CONSTRAINT alerts_pkey DO NOTHING;
    SELECT * INTO a FROM nocrm.alerts x WHERE x.kind = raise_alert.kind AND x.subject = subj FOR UPDATE;
    reopened := a.resolved_at IS NOT NULL;
    tell := (a.acknowledged_at IS NULL OR reopened)
            AND (a.alerted_at IS NULL OR a.alerted_at <= now() - every);
    UPDATE nocrm.alerts x
       SET occurrences = CASE WHEN reopened THEN 0 ELSE x.occurrences END + raise_alert.occurrences,
           first_seen = CASE WHEN reopened THEN now() ELSE x.first_seen END,
           last_seen = now(),
           last_queue_id = coalesce(queue_id, x.last_queue_id),
           last_lead_id = coalesce(lead_id, x.last_lead_id),
           last_error = coalesce(error, x.last_error),
           alerted_at = CASE WHEN tell THEN now() ELSE x.alerted_at END,
           alerts_sent = x.alerts_sent + CASE WHEN tell THEN 1 ELSE 0 END,
           since_alert = CASE WHEN tell THEN 0 ELSE x.since_alert + raise_alert.occurrences END,
           acknowledged_at = CASE WHEN reopened THEN NULL ELSE x.acknowledged_at END,
           acknowledged_by = CASE WHEN reopened THEN NULL ELSE x.acknowledged_by END,
           resolved_at = NULL, resolved_by = NULL
     WHERE x.id = a.id
    RETURNING * INTO a;
    IF NOT tell THEN
        RETURN false;
    END IF;

    text_out := message || CASE WHEN a.occurrences > raise_alert.occurrences
                                THEN format(' (%s times since %s)', a.occurrences,
                                            to_char(a.first_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI "UTC"'))
                                ELSE '' END;
    FOR u IN SELECT us.id, us.email FROM nocrm.users us
              WHERE us.is_admin AND us.active AND NOT us.is_butler ORDER BY us.id LOOP
        INSERT INTO nocrm.notifications (user_id, lead_id, automation_id, message)
        VALUES (u.id, lead_id, raise_alert.automation_id, text_out)
        RETURNING id INTO nid;
        PERFORM pg_notify('nocrm_notifications',
                          json_build_object('id', nid, 'user_id', u.id, 'lead_id', lead_id,
                                            'automation_id', raise_alert.automation_id,
                                            'message', left(text_out, 1000),
                                            'truncated', length(text_out) > 1000,
                                            'alert_id', a.id, 'alert', a.kind)::text);
        IF u.email IS NOT NULL THEN
            INSERT INTO nocrm.queue (kind, lead_id, event, recipient, payload)
            VALUES ('email', lead_id, 'alert.' || a.kind, u.email,
                    jsonb_build_object('template', 'alert', 'to', u.email, 'user_id', u.id,
                                       'message', text_out, 'alert_id', a.id));
        END IF;
    END LOOP;
    IF url <> '' THEN
        body := jsonb_build_object(
            'event', 'alert.' || a.kind, 'occurred_at', now(), 'message', text_out,
            'alert', jsonb_build_object(
                'id', a.id, 'kind', a.kind, 'subject', a.subject, 'automation_id', a.automation_id,
                'automation', (SELECT au.name FROM nocrm.automations au WHERE au.id = a.automation_id),
                'occurrences', a.occurrences, 'first_seen', a.first_seen, 'last_seen', a.last_seen,
                'queue_id', queue_id, 'lead_id', lead_id, 'error', error));
        INSERT INTO nocrm.queue (kind, lead_id, event, recipient, payload)
        VALUES ('webhook', lead_id, 'alert.' || a.kind, url, body || jsonb_build_object('alert_id', a.id));
    END IF;
    RETURN true;
END $$;
COMMENT ON FUNCTION nocrm.raise_alert(text, integer, text, bigint, bigint, text, text, integer) IS 'Counts a problem in nocrm.alerts and, unless acknowledged or told within nocrm.alert_interval, tells the admins: a notification (and NOTIFY), an email with the template alert, a webhook to nocrm.alert_webhook_url. Returns whether it told them. Called by the drain.';

-- What the drain met in one transaction: failed attempts (retried or dead)
-- of queue items and date rules.  Each is checked against the queue row as
-- recorded (an admin's cancel wins); alert emails and webhooks raise
-- nothing of their own.  Returns how many alerts were told.
CREATE FUNCTION nocrm.record_failures(automation_ids integer[], lead_ids bigint[], queue_ids bigint[],
                                      kinds text[], errors text[], dead boolean[])
RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    f record;
    groups jsonb;
    told integer := 0;
    failing integer := nocrm.alert_setting('alert_failures', '5')::integer;
    disable_at integer := nocrm.alert_setting('auto_disable_failures', '0')::integer;
    win_text text := nocrm.alert_setting('alert_failure_window', '1h');
    win interval := win_text::interval;
    touched integer[] := '{}';
    aid integer;
    n bigint;
    n_disable bigint;
    since timestamptz;
    nnew integer;
    last record;
    aname text;
    what text;
BEGIN
    -- One statement for the batch: the failures that stand as recorded,
    -- written; the dead letters grouped by problem, for one alert each.
    WITH given AS (SELECT x.* FROM unnest(automation_ids, lead_ids, queue_ids, kinds, errors, dead)
                                 WITH ORDINALITY AS x(automation_id, lead_id, queue_id, kind, error, dead, o)),
         ok AS (SELECT given.automation_id, given.lead_id, given.queue_id, given.kind, given.dead, given.o,
                       regexp_replace(coalesce(given.error, 'no error message'), '\s+', ' ', 'g') AS error
                  FROM given LEFT JOIN nocrm.queue q ON q.id = given.queue_id
                 WHERE given.queue_id IS NULL
                    OR (q.state = CASE WHEN given.dead THEN 'dead' ELSE 'pending' END
                        AND NOT (q.payload ? 'alert_id'))),
         ins AS (INSERT INTO nocrm.automation_failures (automation_id, lead_id, queue_id, kind, dead, error)
                 SELECT ok.automation_id, ok.lead_id, ok.queue_id, ok.kind, ok.dead, ok.error
                   FROM ok WHERE ok.automation_id IS NOT NULL ORDER BY ok.o
                 RETURNING automation_failures.automation_id)
    SELECT (SELECT coalesce(array_agg(ins.automation_id), '{}') FROM ins),
           (SELECT coalesce(jsonb_agg(g), '[]')
              FROM (SELECT ok.automation_id, count(*) AS n,
                           (array_agg(ok.kind ORDER BY ok.o DESC))[1] AS kind,
                           (array_agg(ok.queue_id ORDER BY ok.o DESC))[1] AS queue_id,
                           (array_agg(ok.lead_id ORDER BY ok.o DESC))[1] AS lead_id,
                           (array_agg(ok.error ORDER BY ok.o DESC))[1] AS error
                      FROM ok WHERE ok.dead
                     GROUP BY ok.automation_id, CASE WHEN ok.automation_id IS NULL THEN ok.kind END
                     ORDER BY min(ok.o)) g)
      INTO touched, groups;

    FOR f IN SELECT * FROM jsonb_to_recordset(groups)
                        AS g(automation_id integer, n integer, kind text, queue_id bigint, lead_id bigint, error text) LOOP
        aname := (SELECT a.name FROM nocrm.automations a WHERE a.id = f.automation_id);
        what := CASE f.kind WHEN 'action' THEN 'delayed action' ELSE f.kind END;
        IF nocrm.raise_alert('dead_letter', f.automation_id,
               format('Dead letter: %s %s (queue item %s%s) gave up: %s%s', what,
                      CASE WHEN f.automation_id IS NULL THEN 'queued by hand'
                           ELSE format('of automation %s "%s"', f.automation_id, coalesce(aname, '(deleted)')) END,
                      f.queue_id, coalesce(', lead ' || f.lead_id, ''), f.error,
                      CASE WHEN f.n > 1 THEN format(' (and %s more in the same round)', f.n - 1) ELSE '' END),
               f.queue_id, f.lead_id, f.error, f.kind, f.n) THEN
            told := told + 1;
        END IF;
    END LOOP;

    FOREACH aid IN ARRAY ARRAY(SELECT DISTINCT t FROM unnest(touched) t ORDER BY t) LOOP
        SELECT count(*) INTO n FROM nocrm.automation_failures x
         WHERE x.automation_id = aid AND x.failed_at > now() - win;
        SELECT x.lead_id, x.queue_id, x.error INTO last FROM nocrm.automation_failures x
         WHERE x.automation_id = aid ORDER BY x.id DESC LIMIT 1;
        nnew := (SELECT count(*) FROM unnest(touched) t WHERE t = aid);
        aname := (SELECT a.name FROM nocrm.automations a WHERE a.id = aid);
        -- after a disable, only the failures since count towards the next
        SELECT max(x.last_seen) INTO since FROM nocrm.alerts x
         WHERE x.kind = 'automation_disabled' AND x.automation_id = aid;
        SELECT count(*) INTO n_disable FROM nocrm.automation_failures x
         WHERE x.automation_id = aid AND x.failed_at > greatest(now() - win, since);
        IF disable_at > 0 AND n_disable >= disable_at
           AND EXISTS (SELECT 1 FROM nocrm.automations a WHERE a.id = aid AND a.enabled) THEN
            BEGIN
                UPDATE nocrm.automations a SET enabled = false, updated_at = now() WHERE a.id = aid;
                IF nocrm.raise_alert('automation_disabled', aid,
                       format('Automation %s "%s" was disabled after %s failures within %s; the last: %s. Enable it again with nocrm.enable_automation(%s) once fixed.',
                              aid, aname, n_disable, win_text, last.error, aid),
                       last.queue_id, last.lead_id, last.error) THEN
                    told := told + 1;
                END IF;
                CONTINUE;
            EXCEPTION WHEN OTHERS THEN
                -- it stays enabled; the failing alert below says so
                RAISE WARNING 'nocrm: automation % could not be disabled: %', aid, SQLERRM;
            END;
        END IF;
        IF failing > 0 AND n >= failing THEN
            IF nocrm.raise_alert('automation_failing', aid,
                   format('Automation %s "%s" keeps failing: %s failures within %s; the last: %s',
                          aid, coalesce(aname, '(deleted)'), n, win_text, last.error),
                   last.queue_id, last.lead_id, last.error, NULL, nnew) THEN
                told := told + 1;
            END IF;
        END IF;
    END LOOP;
    RETURN told;
END $$;
COMMENT ON FUNCTION nocrm.record_failures(integer[], bigint[], bigint[], text[], text[], boolean[]) IS 'Called by the drain with the failed attempts it recorded: writes nocrm.automation_failures, raises dead_letter alerts, automation_failing ones at nocrm.alert_failures failures within nocrm.alert_failure_window, and disables an automation at nocrm.auto_disable_failures.';

-- Open problems, newest first.
CREATE VIEW nocrm.problems AS
SELECT a.id, a.kind, a.subject, a.automation_id, au.name AS automation, au.enabled AS automation_enabled,
       a.occurrences, a.first_seen, a.last_seen, a.last_error, a.last_queue_id, a.last_lead_id,
       CASE WHEN a.kind = 'dead_letter' THEN
           (SELECT count(*) FROM nocrm.queue q
             WHERE q.state = 'dead' AND NOT (q.payload ? 'alert_id')
               AND CASE WHEN a.automation_id IS NOT NULL THEN q.automation_id = a.automation_id
                        ELSE q.automation_id IS NULL AND a.subject = 'queue ' || q.kind END) END AS dead_now,
       CASE WHEN a.automation_id IS NOT NULL THEN
           (SELECT count(*) FROM nocrm.automation_failures f
             WHERE f.automation_id = a.automation_id
               AND f.failed_at > now() - nocrm.alert_setting('alert_failure_window', '1h')::interval) END
           AS recent_failures,
       a.alerted_at, a.alerts_sent, a.since_alert, a.acknowledged_at IS NOT NULL AS acknowledged,
       a.acknowledged_at, a.acknowledged_by, a.note
  FROM nocrm.alerts a
  LEFT JOIN nocrm.automations au ON au.id = a.automation_id
 WHERE a.resolved_at IS NULL
 ORDER BY a.last_seen DESC, a.id DESC;
COMMENT ON VIEW nocrm.problems IS 'Open problems: dead letters (by automation, or by kind for items queued by hand), failing and disabled automations, with occurrences, first and last seen, dead letters now and failures within nocrm.alert_failure_window. Acknowledge with nocrm.acknowledge_problem(id), close with nocrm.resolve_problem(id).';

CREATE FUNCTION nocrm.acknowledge_problem(id bigint, note text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    a nocrm.alerts;
BEGIN
    IF acknowledge_problem.id IS NULL THEN
        RAISE EXCEPTION 'id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO a FROM nocrm.alerts x WHERE x.id = acknowledge_problem.id FOR UPDATE;
    IF NOT FOUND OR a.resolved_at IS NOT NULL THEN
        RAISE EXCEPTION 'problem % is not open', acknowledge_problem.id
            USING ERRCODE = 'no_data_found',
                  DETAIL = CASE WHEN FOUND THEN format('It was resolved at %s by %s.', a.resolved_at, a.resolved_by)
                                ELSE 'There is no such problem.' END,
                  HINT = 'Open problems are listed in nocrm.problems.';
    END IF;
    IF a.acknowledged_at IS NOT NULL THEN
        RETURN false;
    END IF;
    UPDATE nocrm.alerts x SET acknowledged_at = now(), acknowledged_by = current_user::text,
                              note = coalesce(acknowledge_problem.note, x.note)
     WHERE x.id = acknowledge_problem.id;
    RETURN true;
END $$;
COMMENT ON FUNCTION nocrm.acknowledge_problem(bigint, text) IS 'Marks an open problem as seen: it stays open and counted, but raises no more alerts until resolved. Returns false if it was acknowledged already.';

CREATE FUNCTION nocrm.resolve_problem(id bigint, note text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    IF resolve_problem.id IS NULL THEN
        RAISE EXCEPTION 'id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM nocrm.alerts x WHERE x.id = resolve_problem.id) THEN
        RAISE EXCEPTION 'problem % does not exist', resolve_problem.id
            USING ERRCODE = 'no_data_found', HINT = 'Problems are listed in nocrm.problems.';
    END IF;
    UPDATE nocrm.alerts x SET resolved_at = now(), resolved_by = current_user::text,
                              note = coalesce(resolve_problem.note, x.note)
     WHERE x.id = resolve_problem.id AND x.resolved_at IS NULL;
    RETURN FOUND;
END $$;
COMMENT ON FUNCTION nocrm.resolve_problem(bigint, text) IS 'Closes a problem (it leaves nocrm.problems); the next occurrence opens it again, with its counts from zero. Returns false if it was resolved already.';

REVOKE ALL ON FUNCTION nocrm.alert_setting(text, text),
    nocrm.raise_alert(text, integer, text, bigint, bigint, text, text, integer),
    nocrm.record_failures(integer[], bigint[], bigint[], text[], text[], boolean[]),
    nocrm.acknowledge_problem(bigint, text), nocrm.resolve_problem(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nocrm.alert_setting(text, text), nocrm.acknowledge_problem(bigint, text),
    nocrm.resolve_problem(bigint, text) TO nocrm_admin;
GRANT SELECT ON nocrm.alerts, nocrm.problems, nocrm.automation_failures TO nocrm_admin;
GRANT UPDATE (acknowledged_at, acknowledged_by, resolved_at, resolved_by, note) ON nocrm.alerts TO nocrm_admin;
GRANT SET ON PARAMETER nocrm.alert_interval, nocrm.alert_failures, nocrm.alert_failure_window,
    nocrm.auto_disable_failures, nocrm.alert_webhook_url TO nocrm_admin;

-- ==== run log: one index less to keep up ====
-- The drain prunes the run log from its oldest ids (which follow time), so
-- the created_at index, written for every run, is not needed.
DROP INDEX nocrm.automation_runs_created_idx;

-- ==== group counters that nobody waits for: the tables ====
-- (the section "group counters that nobody waits for" below says why;
-- here because explain's group_next_member, with the tasks, reads them)
CREATE TABLE nocrm.assignment_increments (
    -- a key, so the folds' deletes replicate (FOR TABLES IN SCHEMA nocrm)
    id             bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    automation_id  integer NOT NULL,
    action_no      integer NOT NULL,
    user_id        bigint NOT NULL,
    delta          bigint NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX assignment_increments_member_idx
    ON nocrm.assignment_increments (automation_id, action_no, user_id);
COMMENT ON TABLE nocrm.assignment_increments IS 'Committed group assignments not yet added to nocrm.assignment_counters.assigned, because another transaction held the counter row as they committed. Folded into it by the next commit that gets the row, and by the drain; nocrm.group_counts shows the sum.';
SELECT pg_catalog.pg_extension_config_dump('nocrm.assignment_increments', '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('nocrm.assignment_increments', 'id')::regclass, '');
GRANT SELECT ON nocrm.assignment_increments TO nocrm_admin;

CREATE VIEW nocrm.group_counts AS
SELECT c.automation_id, c.action_no, c.user_id, c.position,
       c.assigned + coalesce((SELECT sum(i.delta) FROM nocrm.assignment_increments i
                               WHERE i.automation_id = c.automation_id AND i.action_no = c.action_no
                                 AND i.user_id = c.user_id), 0)::bigint AS assigned,
       c.weight, c.cap
  FROM nocrm.assignment_counters c;
COMMENT ON VIEW nocrm.group_counts IS 'nocrm.assignment_counters with assigned counting every committed assignment, the increments not yet folded included.';
GRANT SELECT ON nocrm.group_counts TO nocrm_admin;

-- ==== tasks ====
-- Tasks on leads (nocrm.tasks): made by people or by the create_task
-- action (src/tasks.c).  task.created and task.completed come from
-- statement triggers with transition tables, task.overdue from each drain
-- round through tasks_overdue_idx (src/task_events.c); rules on them judge
-- and act on the task's lead.
CREATE TABLE nocrm.tasks (
    id             bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    lead_id        bigint NOT NULL REFERENCES nocrm.leads ON DELETE CASCADE,
    assignee_id    bigint REFERENCES nocrm.users,
    title          text NOT NULL CHECK (btrim(title) <> '' AND octet_length(title) <= 1000),
    notes          text,
    due_at         timestamptz,
    done_at        timestamptz,
    overdue_at     timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    created_by     bigint REFERENCES nocrm.users ON DELETE SET NULL,
    automation_id  integer,
    rule_version   integer,
    CHECK (rule_version IS NULL OR automation_id IS NOT NULL)
);
CREATE INDEX tasks_lead_idx ON nocrm.tasks (lead_id);
-- a user's open tasks, soonest first
CREATE INDEX tasks_open_idx ON nocrm.tasks (assignee_id, due_at) WHERE done_at IS NULL;
-- the drain's overdue scan: open, not yet raised
CREATE INDEX tasks_overdue_idx ON nocrm.tasks (due_at) WHERE done_at IS NULL AND overdue_at IS NULL;
COMMENT ON TABLE nocrm.tasks IS 'Tasks on leads: to do by an assignee, by due_at; done when done_at is set. Inserting one raises task.created, setting done_at task.completed, and the drain raises task.overdue once when due_at passes (overdue_at). A lead''s tasks go with it.';
COMMENT ON COLUMN nocrm.tasks.overdue_at IS 'When task.overdue was raised (once); cleared when due_at changes or the task is reopened, so it can come again.';
COMMENT ON COLUMN nocrm.tasks.created_by IS 'Who made it: the Butler (0) for create_task, else the user nocrm.actor names (NULL if unknown).';
COMMENT ON COLUMN nocrm.tasks.automation_id IS 'The automation whose create_task made it, with its version then (rule_version, see nocrm.rule_versions).';
SELECT pg_catalog.pg_extension_config_dump('nocrm.tasks', '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('nocrm.tasks', 'id')::regclass, '');

-- created_by from nocrm.actor; a later due time or a reopened task may go overdue again
CREATE FUNCTION nocrm.task_before() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    actor text := nullif(current_setting('nocrm.actor', true), '');
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.created_by IS NULL AND actor IS NOT NULL THEN
            NEW.created_by := (SELECT u.id FROM nocrm.users u
                                WHERE lower(u.email) = lower(actor) OR u.id::text = actor
                                ORDER BY u.id LIMIT 1);
        END IF;
    ELSIF NEW.overdue_at IS NOT DISTINCT FROM OLD.overdue_at
          AND (NEW.due_at IS DISTINCT FROM OLD.due_at OR (OLD.done_at IS NOT NULL AND NEW.done_at IS NULL)) THEN
        NEW.overdue_at := NULL;
    END IF;
    RETURN NEW;
END $$;
COMMENT ON FUNCTION nocrm.task_before() IS 'Trigger: a new task''s created_by from nocrm.actor; a changed due_at or a reopened task clears overdue_at, so task.overdue can come again.';
CREATE TRIGGER nocrm_task_before BEFORE INSERT OR UPDATE ON nocrm.tasks
    FOR EACH ROW WHEN (NOT nocrm.restoring()) EXECUTE FUNCTION nocrm.task_before();

CREATE FUNCTION nocrm.task_statement_trigger() RETURNS trigger
AS 'MODULE_PATHNAME', 'nocrm_task_statement_trigger'
LANGUAGE C SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION nocrm.task_statement_trigger() IS 'AFTER INSERT or UPDATE ON nocrm.tasks, for each statement: raises task.created for new tasks and task.completed for tasks whose done_at was set, on their leads.';
CREATE TRIGGER nocrm_task_events_insert AFTER INSERT ON nocrm.tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION nocrm.task_statement_trigger();
CREATE TRIGGER nocrm_task_events_update AFTER UPDATE ON nocrm.tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION nocrm.task_statement_trigger();

CREATE FUNCTION nocrm.raise_overdue_tasks(max integer DEFAULT 100) RETURNS integer
    AS 'MODULE_PATHNAME', 'nocrm_raise_overdue_tasks_sql' LANGUAGE C VOLATILE;
COMMENT ON FUNCTION nocrm.raise_overdue_tasks(integer) IS 'Raises task.overdue for up to max open tasks whose due_at has passed, once each (what each round of the drain does); returns how many.';

CREATE FUNCTION nocrm.complete_task(task_id bigint) RETURNS nocrm.tasks
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    t nocrm.tasks;
BEGIN
    IF task_id IS NULL THEN
        RAISE EXCEPTION 'task_id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    UPDATE nocrm.tasks k SET done_at = now() WHERE k.id = complete_task.task_id AND k.done_at IS NULL
    RETURNING k.* INTO t;
    IF FOUND THEN
        RETURN t;
    END IF;
    SELECT k.* INTO t FROM nocrm.tasks k WHERE k.id = complete_task.task_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'task % does not exist', task_id USING ERRCODE = 'no_data_found';
    END IF;
    RAISE EXCEPTION 'task % is already done', task_id
        USING ERRCODE = 'object_not_in_prerequisite_state',
              DETAIL = format('It was done at %s.', t.done_at),
              HINT = 'Reopen it with UPDATE nocrm.tasks SET done_at = NULL.';
END $$;
COMMENT ON FUNCTION nocrm.complete_task(bigint) IS 'Marks an open task done now (raises task.completed) and returns it; with the caller''s rights.';

-- The group members of create_task with "assignee": "round_robin", "balanced" or "random" get counters too.
CREATE OR REPLACE FUNCTION nocrm.group_members(actions jsonb)
RETURNS TABLE (action_no integer, user_id bigint, pos integer, weight integer, cap integer)
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
    SELECT (a.no - 1)::integer,
           nocrm.resolve_user(CASE jsonb_typeof(m.who) WHEN 'object' THEN m.who -> 'user' ELSE m.who END),
           (m.pos - 1)::integer,
           coalesce((m.who ->> 'weight')::integer, 1),
           (m.who ->> 'cap')::integer
      FROM jsonb_array_elements(actions) WITH ORDINALITY AS a(def, no),
           jsonb_array_elements(a.def -> 'users') WITH ORDINALITY AS m(who, pos)
     WHERE a.def ->> 'type' IN ('assign_round_robin', 'assign_balanced', 'assign_random')
        OR (a.def ->> 'type' = 'create_task' AND a.def ->> 'assignee' IN ('round_robin', 'balanced', 'random'))
$$;

-- The member a round-robin or balanced group would take now (no lock, no pending increments).
CREATE FUNCTION nocrm.group_next_member(automation_id integer, action_no integer, kind text,
                                        only_working_hours boolean DEFAULT false, by_tasks boolean DEFAULT false)
RETURNS bigint
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
    SELECT c.user_id
      FROM nocrm.group_counts c JOIN nocrm.users u ON u.id = c.user_id
     WHERE c.automation_id = group_next_member.automation_id AND c.action_no = group_next_member.action_no
       AND u.active AND NOT nocrm.is_absent(u.id)
       AND (NOT group_next_member.only_working_hours OR nocrm.is_working(u.id))
       AND (c.cap IS NULL OR (SELECT count(*) FROM nocrm.leads o WHERE o.user_id = c.user_id
                                 AND o.status IN ('todo', 'standby')) < c.cap)
     ORDER BY CASE WHEN group_next_member.kind = 'assign_balanced' AND group_next_member.by_tasks
                   THEN (SELECT count(*) FROM nocrm.tasks k WHERE k.assignee_id = c.user_id
                            AND k.done_at IS NULL)::numeric / c.weight
                   WHEN group_next_member.kind = 'assign_balanced'
                   THEN (SELECT count(*) FROM nocrm.leads o WHERE o.user_id = c.user_id
                            AND o.status IN ('todo', 'standby'))::numeric / c.weight END,
              c.assigned::numeric / c.weight, c.position
     LIMIT 1
$$;
COMMENT ON FUNCTION nocrm.group_next_member(integer, integer, text, boolean, boolean) IS 'For explain and test mode: the member a round-robin (kind assign_round_robin) or balanced (assign_balanced; by open leads, or open tasks with by_tasks) group action would pick now.';

CREATE FUNCTION nocrm.group_available(automation_id integer, action_no integer) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
    SELECT jsonb_agg(u.name ORDER BY c.position)
      FROM nocrm.assignment_counters c JOIN nocrm.users u ON u.id = c.user_id
     WHERE c.automation_id = group_available.automation_id AND c.action_no = group_available.action_no
       AND u.active AND NOT nocrm.is_absent(u.id)
$$;
COMMENT ON FUNCTION nocrm.group_available(integer, integer) IS 'For explain and test mode: the names of a group action''s available members (random picks one).';

-- What create_task would make now: assignee, title, due time.
CREATE FUNCTION nocrm.describe_task(action jsonb, lead_id bigint, automation_id integer,
                                    action_no integer, event text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE SET search_path = pg_catalog AS $$
DECLARE
    lead nocrm.leads;
    grp text := CASE action ->> 'assignee' WHEN 'round_robin' THEN 'assign_round_robin'
                    WHEN 'balanced' THEN 'assign_balanced' WHEN 'random' THEN 'assign_random' END;
    who bigint;
    due timestamptz;
    d jsonb;
BEGIN
    SELECT * INTO lead FROM nocrm.leads l WHERE l.id = describe_task.lead_id;
    IF grp = 'assign_random' THEN
        d := jsonb_build_object('assignee_one_of', nocrm.group_available(describe_task.automation_id, action_no));
    ELSE
        who := CASE WHEN grp IS NOT NULL
                    THEN nocrm.group_next_member(describe_task.automation_id, action_no, grp,
                                                 coalesce((action ->> 'only_working_hours')::boolean, false), true)
                    WHEN action -> 'assignee' IS NULL OR action ->> 'assignee' = 'owner' THEN lead.user_id
                    ELSE nocrm.resolve_user(action -> 'assignee') END;
        d := jsonb_build_object('assignee_id', who, 'assignee', (SELECT name FROM nocrm.users WHERE id = who));
    END IF;
    IF jsonb_typeof(action -> 'due') = 'string' THEN
        due := now() + (action ->> 'due')::interval;
    ELSIF jsonb_typeof(action -> 'due') = 'object' THEN
        due := (to_jsonb(lead) ->> (action -> 'due' ->> 'field'))::timestamptz
               + coalesce((action -> 'due' ->> 'offset')::interval, '0');
    END IF;
    IF due IS NOT NULL AND who IS NOT NULL AND coalesce((action ->> 'respect_working_hours')::boolean, false) THEN
        due := nocrm.next_working_time(who, due);
    END IF;
    RETURN d || jsonb_build_object(
        'title', nocrm.render(action ->> 'title',
                              nocrm.template_context(lead.id, CASE WHEN who IS NULL THEN '{}'
                                                                   ELSE jsonb_build_object('user_id', who) END,
                                                     describe_task.automation_id, event)),
        'due_at', due);
END $$;
COMMENT ON FUNCTION nocrm.describe_task(jsonb, bigint, integer, integer, text) IS 'For explain and test mode: the task a create_task action would make on the lead now (assignee, rendered title, due time). Changes nothing.';


-- A column a create_task's "due" reads is protected like the other columns rules use.
CREATE OR REPLACE FUNCTION nocrm.protect_rule_columns() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    dropped record;
    readers text;
BEGIN
    IF to_regclass('nocrm.automations') IS NULL THEN
        RETURN;
    END IF;
    FOR dropped IN SELECT * FROM pg_event_trigger_dropped_objects()
                    WHERE object_type = 'table column'
                      AND address_names[1] = 'nocrm' AND address_names[2] = 'leads' LOOP
        SELECT string_agg(format('%s "%s"', a.id, a.name), ', ' ORDER BY a.id) INTO readers
          FROM nocrm.automations a
         WHERE jsonb_path_exists(a.conditions, '$.** ? (@.field == $column)',
                                 jsonb_build_object('column', dropped.address_names[3]))
            OR (a.event = 'lead.date.reached' AND a.target = dropped.address_names[3])
            OR jsonb_path_exists(a.actions, '$[*] ? ((@.type == "set_field" && (@.field == $column || @.value.field == $column)) || (@.type == "create_task" && @.due.field == $column))',
                                 jsonb_build_object('column', dropped.address_names[3]));
        IF readers IS NOT NULL THEN
            RAISE EXCEPTION 'cannot drop column % of nocrm.leads: automations use it', dropped.address_names[3]
                USING ERRCODE = 'dependent_objects_still_exist',
                      DETAIL = format('Automations %s read or set it (field conditions, date rules, set_field).', readers),
                      HINT = 'Change or delete those automations first.';
        END IF;
    END LOOP;
END $$;

REVOKE ALL ON FUNCTION nocrm.task_before(), nocrm.task_statement_trigger(), nocrm.raise_overdue_tasks(integer),
    nocrm.complete_task(bigint), nocrm.group_next_member(integer, integer, text, boolean, boolean),
    nocrm.group_available(integer, integer), nocrm.describe_task(jsonb, bigint, integer, integer, text)
    FROM PUBLIC;
-- Agents work with tasks as with leads (any lead's); what the engine keeps
-- (created_by, overdue_at, automation_id, rule_version) they cannot write.
GRANT SELECT, DELETE ON nocrm.tasks TO nocrm_agent;
GRANT INSERT (lead_id, assignee_id, title, notes, due_at, done_at),
      UPDATE (lead_id, assignee_id, title, notes, due_at, done_at) ON nocrm.tasks TO nocrm_agent;
GRANT EXECUTE ON FUNCTION nocrm.complete_task(bigint) TO nocrm_agent;
GRANT EXECUTE ON FUNCTION nocrm.group_next_member(integer, integer, text, boolean, boolean),
    nocrm.group_available(integer, integer), nocrm.describe_task(jsonb, bigint, integer, integer, text)
    TO nocrm_admin;
-- ==== polite webhooks ====
-- Per receiving host (host:port of a webhook URL or of nocrm.push_url): the
-- pause a 429/503 Retry-After asked for and the nocrm.webhook_rate
-- allowance, shared by the drains (each keeps them in memory while it runs).
CREATE TABLE nocrm.webhook_hosts (
    host text PRIMARY KEY,
    paused_until timestamptz,
    pause_status integer,
    rate_used_until timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE nocrm.webhook_hosts IS 'Written by the drain: per receiving HTTP host, until when it asked not to be sent to (Retry-After of a 429 or 503) and until when its nocrm.webhook_rate allowance is used. Rows an hour past both are pruned.';
COMMENT ON COLUMN nocrm.webhook_hosts.host IS 'host:port of the URL, lower case, without user info.';
COMMENT ON COLUMN nocrm.webhook_hosts.paused_until IS 'No request to this host starts before this (its Retry-After, at most nocrm.webhook_max_retry_after).';
COMMENT ON COLUMN nocrm.webhook_hosts.pause_status IS 'The HTTP status that asked for the pause (429 or 503).';
COMMENT ON COLUMN nocrm.webhook_hosts.rate_used_until IS 'The host''s nocrm.webhook_rate allowance is used up to this time (GCRA): COUNT more may go per PERIOD after it.';
SELECT pg_catalog.pg_extension_config_dump('nocrm.webhook_hosts', '');
REVOKE ALL ON nocrm.webhook_hosts FROM PUBLIC;
GRANT SELECT ON nocrm.webhook_hosts TO nocrm_admin;
GRANT SET ON PARAMETER nocrm.webhook_rate, nocrm.webhook_host_concurrency,
    nocrm.webhook_max_retry_after TO nocrm_admin;

-- ==== parallel restore ====
-- pg_restore -j loads the data of the extension's tables in any order, and
-- their foreign keys exist before the data (src/restore_order.c): in restore
-- mode a row whose parent row is not loaded yet waits here, and is inserted
-- at the end of the load that brings its last parent.
CREATE TABLE nocrm.restore_held (
    tbl      regclass NOT NULL,
    row      text NOT NULL,
    held_at  timestamptz NOT NULL DEFAULT now()
);
-- (logical replication of the schema: the rows are deleted once loaded)
ALTER TABLE nocrm.restore_held REPLICA IDENTITY FULL;
COMMENT ON TABLE nocrm.restore_held IS 'Rows a restore loaded before the rows they refer to (a parallel pg_restore): each is inserted into tbl once its parent rows are there. Empty after a complete restore.';
-- dumped, so that rows held in an unfinished restore are not lost
SELECT pg_catalog.pg_extension_config_dump('nocrm.restore_held', '');

-- The tables whose restore-mode load has committed (for the application's
-- foreign keys to them); not dumped: it describes this database's restore.
CREATE TABLE nocrm.restore_loaded (
    tbl        regclass PRIMARY KEY,
    loaded_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE nocrm.restore_loaded IS 'Tables of the extension a restore into this database has loaded: the application''s foreign keys to them wait for that in a parallel restore. Not dumped.';
SELECT pg_catalog.pg_extension_config_dump('nocrm.restore_loaded', 'WHERE false');

CREATE FUNCTION nocrm.restore_hold() RETURNS trigger
    AS 'MODULE_PATHNAME', 'nocrm_restore_hold' LANGUAGE C;
CREATE FUNCTION nocrm.restore_complete() RETURNS trigger
    AS 'MODULE_PATHNAME', 'nocrm_restore_complete' LANGUAGE C;
CREATE FUNCTION nocrm.load_held_rows() RETURNS bigint
    AS 'MODULE_PATHNAME', 'nocrm_load_held_rows' LANGUAGE C
    SET check_function_bodies = off;
COMMENT ON FUNCTION nocrm.load_held_rows() IS 'Inserts the rows of nocrm.restore_held whose parent rows are there now, as restored rows (no automation, no history); returns how many are still held.';
CREATE FUNCTION nocrm.restore_fk_wait() RETURNS event_trigger
    AS 'MODULE_PATHNAME', 'nocrm_restore_fk_wait' LANGUAGE C;
REVOKE ALL ON FUNCTION nocrm.restore_hold(), nocrm.restore_complete(), nocrm.load_held_rows(),
    nocrm.restore_fk_wait() FROM PUBLIC;
CREATE EVENT TRIGGER nocrm_restore_fk_wait ON ddl_command_start WHEN TAG IN ('ALTER TABLE')
    EXECUTE FUNCTION nocrm.restore_fk_wait();

-- The two triggers: hold on every table of the extension with a foreign key
-- to another, complete on every table of the extension.  A section adding
-- a table calls it again.
CREATE FUNCTION nocrm.restore_order_triggers() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    t regclass;
BEGIN
    FOR t IN SELECT DISTINCT c.conrelid::regclass FROM pg_constraint c
              WHERE c.contype = 'f' AND c.conrelid <> c.confrelid
                AND c.connamespace = 'nocrm'::regnamespace
                AND (SELECT relnamespace FROM pg_class WHERE oid = c.confrelid) = 'nocrm'::regnamespace
                AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = c.conrelid AND g.tgname = 'nocrm_restore_hold')
              ORDER BY 1
    LOOP
        EXECUTE format('CREATE TRIGGER nocrm_restore_hold BEFORE INSERT ON %s FOR EACH ROW EXECUTE FUNCTION nocrm.restore_hold()', t);
    END LOOP;
    FOR t IN SELECT c.oid::regclass FROM pg_class c
              WHERE c.relnamespace = 'nocrm'::regnamespace AND c.relkind = 'r'
                AND c.oid <> 'nocrm.restore_loaded'::regclass
                AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = c.oid AND g.tgname = 'nocrm_restore_complete')
              ORDER BY c.relname
    LOOP
        -- a load is a statement of the restore itself: the rows a trigger of
        -- ours writes while a load runs (the seeded rows) end no load, and
        -- must not take the loads' lock in the middle of one
        EXECUTE format('CREATE TRIGGER nocrm_restore_complete AFTER INSERT ON %s FOR EACH STATEMENT'
                       ' WHEN (pg_catalog.pg_trigger_depth() < 1) EXECUTE FUNCTION nocrm.restore_complete()', t);
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION nocrm.restore_order_triggers() FROM PUBLIC;
SELECT nocrm.restore_order_triggers();

-- ==== explain shows the sender ====
-- explain() and describe_actions() show the From and Reply-To that
-- "from" / "reply_to" of send_email and notify's email channel give the
-- lead now, chosen by the engine's own code (src/actions.c).
CREATE FUNCTION nocrm.describe_sender(action jsonb, lead_id bigint)
RETURNS jsonb
    AS 'MODULE_PATHNAME', 'nocrm_describe_sender' LANGUAGE C STABLE;
COMMENT ON FUNCTION nocrm.describe_sender(jsonb, bigint) IS 'For an action with "from" or "reply_to": the From ("from", "from_name") and Reply-To ("reply_to", "reply_to_name") its email would carry for the lead now, and why ("sender"); {} otherwise. Changes nothing.';
REVOKE ALL ON FUNCTION nocrm.describe_sender(jsonb, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nocrm.describe_sender(jsonb, bigint) TO nocrm_admin;
-- describe_actions as of 1.3, once: set_field's, with business delays (calendar),
-- create_task (tasks) and describe_sender() for send_email and notify by email
CREATE OR REPLACE FUNCTION nocrm.describe_actions(automation_id integer, actions jsonb, lead_id bigint,
                                       event text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE SET search_path = pg_catalog AS $$
DECLARE
    a jsonb;
    no integer := 0;
    lead nocrm.leads;
    who bigint;
    d jsonb;
    out jsonb := '[]';
BEGIN
    SELECT * INTO lead FROM nocrm.leads l WHERE l.id = describe_actions.lead_id;
    FOR a IN SELECT value FROM jsonb_array_elements(actions) LOOP
        d := jsonb_build_object('no', no + 1, 'type', a ->> 'type');
        CASE a ->> 'type'
        WHEN 'assign' THEN
            who := nocrm.resolve_user(a -> 'user');
            d := d || jsonb_build_object('user_id', who,
                                         'user', (SELECT name FROM nocrm.users WHERE id = who));
        WHEN 'assign_round_robin', 'assign_balanced', 'assign_random' THEN
            IF a ->> 'type' = 'assign_random' THEN
                d := d || jsonb_build_object('one_of', nocrm.group_available(describe_actions.automation_id, no));
            ELSE
                who := nocrm.group_next_member(describe_actions.automation_id, no, a ->> 'type',
                                               coalesce((a ->> 'only_working_hours')::boolean, false));
                d := d || jsonb_build_object('next_user_id', who,
                                             'next_user', (SELECT name FROM nocrm.users WHERE id = who));
            END IF;
        WHEN 'add_tags', 'remove_tags' THEN
            d := d || jsonb_build_object('tags', (
                SELECT coalesce(jsonb_agg(t ORDER BY o), '[]')
                  FROM jsonb_array_elements_text(CASE jsonb_typeof(a -> 'tags') WHEN 'array' THEN a -> 'tags'
                                                      ELSE jsonb_build_array(a -> 'tags') END)
                       WITH ORDINALITY AS x(t, o)
                 WHERE EXISTS (SELECT 1 FROM nocrm.tags g WHERE g.lead_id = lead.id AND g.name = x.t)
                       = (a ->> 'type' = 'remove_tags')));
        WHEN 'set_status' THEN
            d := d || jsonb_build_object('from', lead.status, 'to', a ->> 'status');
        WHEN 'set_step' THEN
            d := d || jsonb_build_object('to', (
                SELECT jsonb_build_object('step_id', s.id, 'step', s.name) FROM nocrm.steps s
                 WHERE CASE jsonb_typeof(a -> 'step') WHEN 'number' THEN s.id = (a ->> 'step')::bigint
                            ELSE s.pipeline_id = lead.pipeline_id AND s.name = a ->> 'step' END));
        WHEN 'comment' THEN
            d := d || jsonb_build_object('body', a ->> 'body');
        WHEN 'notify' THEN
            who := CASE WHEN a ->> 'user' = 'owner' THEN lead.user_id ELSE nocrm.resolve_user(a -> 'user') END;
            d := d || jsonb_build_object(
                'user', (SELECT name FROM nocrm.users WHERE id = who),
                'channels', coalesce(a -> 'channels', '["browser"]'),
                'message', nocrm.render(a ->> 'message',
                                        nocrm.template_context(lead.id, jsonb_build_object('user_id', who),
                                                               automation_id, event)));
            IF coalesce(a -> 'channels', '[]') ? 'email' THEN
                d := d || nocrm.describe_sender(a, lead.id);
            END IF;
        WHEN 'send_email' THEN
            d := d || jsonb_build_object(
                'to', coalesce(a ->> 'to', lead.contact_email),
                'template', a ->> 'template',
                'subject', (SELECT r.subject FROM nocrm.render_template(a ->> 'template', lead.id) r));
            d := d || nocrm.describe_sender(a, lead.id);
        WHEN 'webhook' THEN
            d := d || jsonb_build_object('url', a ->> 'url');
        WHEN 'create_task' THEN
            d := d || nocrm.describe_task(a, describe_actions.lead_id, describe_actions.automation_id, no, event);
        WHEN 'set_field' THEN
            d := d || jsonb_build_object('field', a ->> 'field', 'value', a -> 'value',
                                         'now', to_jsonb(lead) -> (a ->> 'field'));
        ELSE
            NULL;
        END CASE;
        -- (create_task's respect_working_hours moves its due time, not the action)
        IF a ? 'delay' OR (coalesce((a ->> 'respect_working_hours')::boolean, false)
                           AND a ->> 'type' IS DISTINCT FROM 'create_task') THEN
            -- as the engine queues it: business delays on the owner's or the company's
            -- calendar, respect_working_hours without owner on the company's
            d := d || jsonb_build_object('runs_at',
                CASE WHEN coalesce((a ->> 'respect_working_hours')::boolean, false)
                     THEN nocrm.next_working_time(lead.user_id, nocrm.delay_until(lead.user_id, a ->> 'delay', now()))
                     ELSE nocrm.delay_until(lead.user_id, a ->> 'delay', now()) END);
        END IF;
        out := out || jsonb_build_array(d);
        no := no + 1;
    END LOOP;
    RETURN out;
END $$;

-- ==== seeded rows while a dump is loaded ====
-- The CRM's first users or templates start nocrm.seeded_rows, except while
-- a dump is loaded: its own seeded_rows arrive with it, and the sessions of
-- a parallel restore would otherwise write the same seeds at once (and
-- deadlock on them).
CREATE OR REPLACE TRIGGER nocrm_seeded_rows_start AFTER INSERT ON nocrm.users
    FOR EACH STATEMENT WHEN (NOT nocrm.restoring()) EXECUTE FUNCTION nocrm.seeded_rows_start();
CREATE OR REPLACE TRIGGER nocrm_seeded_rows_start AFTER INSERT ON nocrm.email_templates
    FOR EACH STATEMENT WHEN (NOT nocrm.restoring()) EXECUTE FUNCTION nocrm.seeded_rows_start();

-- ==== record rows without an INSERT ====
CREATE FUNCTION nocrm.record_writes(reset boolean DEFAULT false,
                                    OUT table_name text, OUT direct bigint, OUT by_sql bigint)
RETURNS SETOF record AS 'MODULE_PATHNAME', 'nocrm_record_writes' LANGUAGE C VOLATILE;
COMMENT ON FUNCTION nocrm.record_writes(boolean) IS
'This session''s batched record rows per table: written directly (multi-insert, no INSERT statement) and by INSERT. reset => true zeroes them after reading.';

-- ==== lead_history keyed by lead ====
-- Every read of the history is by lead in id order; a separate primary key
-- on id alone cost every history row a second index entry.  id stays
-- unique by its identity; the key (and the replica identity) is now
-- (lead_id, id).
ALTER TABLE nocrm.lead_history DROP CONSTRAINT lead_history_pkey;
DROP INDEX nocrm.lead_history_lead_idx;
ALTER TABLE nocrm.lead_history ADD CONSTRAINT lead_history_pkey PRIMARY KEY (lead_id, id);

-- ==== group counters that nobody waits for ====
-- A committing transaction adds its picks to the member's counter row only
-- if no other transaction holds that row (SKIP LOCKED); otherwise it
-- records them in nocrm.assignment_increments (made above, before the
-- tasks), an insert that waits for nobody.  The next transaction that gets
-- the row, or the drain, folds them into it.  Picks count both; removing a
-- member drops its increments.

CREATE OR REPLACE FUNCTION nocrm.sync_assignment_counters() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- Members dropped from a group, or groups that are gone, lose their counters.
    DELETE FROM nocrm.assignment_counters c
     WHERE c.automation_id = NEW.id
       AND NOT EXISTS (SELECT 1 FROM nocrm.group_members(NEW.actions) m
                        WHERE m.action_no = c.action_no AND m.user_id = c.user_id);
    -- ... and their increments, so a member added back starts afresh.
    DELETE FROM nocrm.assignment_increments i
     WHERE i.automation_id = NEW.id
       AND NOT EXISTS (SELECT 1 FROM nocrm.assignment_counters c
                        WHERE c.automation_id = i.automation_id AND c.action_no = i.action_no
                          AND c.user_id = i.user_id);

    -- New members join at the group's current lowest count, so they take
    -- their turn in the rotation instead of catching up on past leads.
    INSERT INTO nocrm.assignment_counters AS c
           (automation_id, action_no, user_id, position, assigned, weight, cap)
    SELECT NEW.id, m.action_no, m.user_id, m.pos,
           coalesce((SELECT min(o.assigned) FROM nocrm.group_counts o
                      WHERE o.automation_id = NEW.id AND o.action_no = m.action_no), 0),
           m.weight, m.cap
      FROM nocrm.group_members(NEW.actions) m
    ON CONFLICT (automation_id, action_no, user_id)
    DO UPDATE SET position = EXCLUDED.position, weight = EXCLUDED.weight, cap = EXCLUDED.cap;
    RETURN NULL;
END $$;


-- ==== run log as nocrm.history says ====
-- nocrm.run_log (src/runlog.c): with nocrm.history = actions the run log no
-- longer repeats what lead_history's action.* and trigger.fired rows record.
GRANT SET ON PARAMETER nocrm.run_log TO nocrm_admin;

-- ==== firing counts ====
-- automation_stats counted the run log's fired rows, which nocrm.run_log
-- no longer keeps by default with nocrm.history = actions.  Firings are
-- counted instead, one row per rule and statement (src/firings.c); the
-- drain folds each day's rows into one and prunes them with the run log.
CREATE TABLE nocrm.firing_counts (
    id                bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    automation_id     integer,
    stage_trigger_id  integer,
    fired             bigint NOT NULL,
    actions           bigint NOT NULL,
    last_fired        timestamptz NOT NULL,
    CHECK ((automation_id IS NULL) <> (stage_trigger_id IS NULL))
);
COMMENT ON TABLE nocrm.firing_counts IS 'How often each automation or stage trigger fired, whatever nocrm.run_log keeps: rows to add up (per statement, folded per UTC day by the drain, pruned after nocrm.run_log_retention). actions: the actions those firings ran.';
SELECT pg_catalog.pg_extension_config_dump('nocrm.firing_counts', '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('nocrm.firing_counts', 'id')::regclass, '');
REVOKE ALL ON nocrm.firing_counts FROM PUBLIC;
GRANT SELECT ON nocrm.firing_counts TO nocrm_admin;

-- the firings the run log has kept so far
INSERT INTO nocrm.firing_counts (automation_id, stage_trigger_id, fired, actions, last_fired)
SELECT automation_id, stage_trigger_id, count(*), sum(nactions), max(created_at)
  FROM nocrm.automation_runs
 WHERE outcome = 'fired' AND (automation_id IS NULL) <> (stage_trigger_id IS NULL)
 GROUP BY automation_id, stage_trigger_id, date_trunc('day', created_at, 'UTC');

CREATE OR REPLACE VIEW nocrm.automation_stats AS
SELECT a.id, a.name, a.enabled, a.mode,
       coalesce(f.fired, 0) AS fired,
       count(r.id) FILTER (WHERE r.outcome = 'test') AS test_runs,
       count(r.id) FILTER (WHERE r.outcome IN ('stopped', 'skipped')) AS skipped,
       (SELECT count(*) FROM nocrm.queue q WHERE q.automation_id = a.id AND q.state = 'dead') AS failed,
       f.last_fired,
       round(f.actions / nullif(f.fired, 0), 1) AS avg_actions
  FROM nocrm.automations a
  LEFT JOIN LATERAL (SELECT sum(c.fired)::bigint AS fired, sum(c.actions) AS actions,
                            date_trunc('second', max(c.last_fired)) AS last_fired
                       FROM nocrm.firing_counts c WHERE c.automation_id = a.id) f ON true
  LEFT JOIN nocrm.automation_runs r ON r.automation_id = a.id AND r.outcome <> 'fired'
 GROUP BY a.id, f.fired, f.actions, f.last_fired
 ORDER BY a.id;
COMMENT ON VIEW nocrm.automation_stats IS 'Per automation: firings, test-mode runs, loop stops, failed deliveries (dead queue items), last firing, average actions per firing. Counts cover the run log''s retention (nocrm.run_log_retention), firings to the day.';

CREATE VIEW nocrm.stage_trigger_stats AS
SELECT t.id, t.name, p.name AS pipeline, s.name AS step, t.kind, t.enabled,
       coalesce(f.fired, 0) AS fired,
       coalesce(r.refused, 0) AS refused,
       f.last_fired
  FROM nocrm.stage_triggers t
  JOIN nocrm.steps s ON s.id = t.step_id
  JOIN nocrm.pipelines p ON p.id = s.pipeline_id
  LEFT JOIN LATERAL (SELECT sum(c.fired)::bigint AS fired,
                            date_trunc('second', max(c.last_fired)) AS last_fired
                       FROM nocrm.firing_counts c WHERE c.stage_trigger_id = t.id) f ON true
  LEFT JOIN (SELECT stage_trigger_id, count(*) AS refused FROM nocrm.automation_runs
              WHERE outcome = 'skipped' AND stage_trigger_id IS NOT NULL
              GROUP BY stage_trigger_id) r ON r.stage_trigger_id = t.id
 ORDER BY t.id;
COMMENT ON VIEW nocrm.stage_trigger_stats IS 'Per stage trigger: the moves it made (fired), the backward moves it refused, its last move. Counts cover the run log''s retention (nocrm.run_log_retention), moves to the day.';
GRANT SELECT ON nocrm.stage_trigger_stats TO nocrm_admin;

SELECT nocrm.restore_order_triggers();
