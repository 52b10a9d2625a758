-- handwritten_rules.sql — the benchmark anchor: the seed rules written as
-- plain PL/pgSQL triggers, the way a capable PostgreSQL developer would write
-- them for this CRM without the extension.  core_bench.sh and
-- test/t/100_handwritten_anchor.pl compare the engine against it.
--
--   psql -v rules=seed5 -f handwritten_rules.sql   (default: the five rules)
--   psql -v rules=seed3 -f handwritten_rules.sql   (rules 1, 3 and 5 only)
--   psql -v rules=none  -f handwritten_rules.sql   (drop everything)
--   then SELECT anchor.enable();   -- extension triggers off, these on
--
-- The rules (the ids are those nocrm.create_automation gives the seed5 rules
-- of rulesets.sh in a fresh database; they are only written into the
-- automation_id columns so the rows match the engine's):
--   1 lead.creation                          notify Sara "Nuovo lead: {{lead.title}}"
--   2 lead.deleted                           notify Sara "Lead eliminato: {{lead.title}}"
--   3 lead.creation, Vendite, no owner       round robin anna, matteo, giovanni
--   4 lead.step.changed.to Preventivo, Vendite   queue the email quote_followup,
--                                            tag "Preventivo inviato"
--   5 lead.status.changed.to won             tag "Upsell Opportunity"
--
-- What it writes is what the engine writes for these rules, minus the
-- engine's own records: no nocrm.lead_history, no nocrm.automation_runs
-- (the engine writes action rows and run-log rows even with
-- nocrm.history = actions), no assignment_counters, no queue.actor_id.
-- Nor does it do what these rules never need here: it does not skip
-- inactive users in the round robin, nor cut a message at 4,000 bytes.
--
-- Design:
-- * Users, pipeline, step and template are looked up once, here, and baked
--   into the function bodies as literals (format() + EXECUTE): the triggers
--   run no lookup for the rules.  Re-run this file after renaming them.
-- * Round robin is one BEFORE ROW INSERT assignment of NEW.user_id from a
--   sequence: no second UPDATE of the lead, no counter row to lock, so
--   concurrent inserts never wait on each other.  A rolled-back insert uses
--   up its turn (sequences are not transactional); the engine's counters
--   roll back.
-- * The same BEFORE trigger keeps the extension's lead bookkeeping (first
--   step, updated_at, closed_at; see docs/reference.md, Lead bookkeeping),
--   so rows end identical to the engine's.  The first step is looked up per
--   row, not baked in: it is a CRM invariant, not part of a rule, and steps
--   get reordered.
-- * Notifications, tags and queue rows are written by AFTER ... FOR EACH
--   STATEMENT triggers over transition tables: one INSERT ... SELECT per
--   statement instead of a PL/pgSQL call and an INSERT per row.  A bulk
--   statement gets set-based writes; a single-row statement pays one call,
--   about what a row trigger costs.  That is clearly better for the bulk
--   workloads and no worse for one row.
-- * Old and new rows of an UPDATE are matched with NOT IN (SELECT id FROM
--   old_rows WHERE <old state matched already>), not a join: PL/pgSQL keeps
--   the plan of its first call, planned with that call's transition table
--   sizes, and a nested loop planned for one row is quadratic on a big
--   update (measured: a join version took 23 s for a 20,000-row UPDATE
--   after a one-row UPDATE in the same session, 0.09 s in a fresh one).  A
--   hashed NOT IN subplan has no such plan choice (0.12 s either way).
-- * Rows are written in the order the statement wrote the leads (transition
--   table order, no ORDER BY), as the engine handles them, so ids match.
-- * NOTIFY as the engine does it: a transaction's first 1,000 notifications
--   get one NOTIFY each (the engine's payload), the rest one bulk NOTIFY per
--   user and statement ({"user_id", "count", "first_id", "last_id", "bulk"};
--   the engine sends one per user and batch of 10,000 rows).

\set ON_ERROR_STOP 1
\if :{?rules}
\else
\set rules seed5
\endif
SET anchor.rules = :'rules';
SELECT :'rules' = 'none' AS drop_only \gset

BEGIN;
SET LOCAL client_min_messages = warning;
-- the schema holds every object of the anchor; dropping its functions drops
-- the triggers.  (The extension's triggers stay as they are: anchor.enable()
-- disabled them, ALTER TABLE ... ENABLE TRIGGER USER turns them back on.)
DROP SCHEMA IF EXISTS anchor CASCADE;
\if :drop_only
\else

DO $generate$
DECLARE
    rules   text := current_setting('anchor.rules');
    sara    bigint;
    rr      bigint[];
    vendite bigint;
    preventivo bigint;
    -- The statement that writes one notification per transition-table row
    -- and sends their NOTIFYs.  %1$s transition table, %2$s user id,
    -- %3$s automation id, %4$L message prefix.
    notify_sql constant text := $sql$
    sent := coalesce(nullif(current_setting('anchor.notified', true), ''), '0')::integer;
    WITH ins AS (
        INSERT INTO nocrm.notifications (user_id, lead_id, automation_id, message)
        SELECT %2$s, r.id, %3$s, %4$L || r.title FROM %1$s r
        RETURNING id, lead_id, message
    ), numbered AS (
        SELECT ins.*, row_number() OVER () + sent AS k FROM ins
    )
    SELECT count(*),
           count(CASE WHEN k <= 1000 THEN pg_notify('nocrm_notifications', json_build_object(
                      'id', id, 'user_id', %2$s, 'lead_id', lead_id, 'automation_id', %3$s,
                      'message', left(message, 1000), 'truncated', char_length(message) > 1000)::text) END),
           min(id) FILTER (WHERE k > 1000), max(id) FILTER (WHERE k > 1000)
      INTO total, each_sent, bulk_first, bulk_last
      FROM numbered;
    IF total > each_sent THEN
        PERFORM pg_notify('nocrm_notifications', json_build_object('user_id', %2$s,
                    'count', total - each_sent, 'first_id', bulk_first, 'last_id', bulk_last,
                    'bulk', true)::text);
    END IF;
    PERFORM set_config('anchor.notified', (sent + total)::text, true);
$sql$;
    notify_decl constant text := 'sent integer; total bigint; each_sent bigint; bulk_first bigint; bulk_last bigint;';
    body text;
BEGIN
    IF rules NOT IN ('seed5', 'seed3') THEN
        RAISE EXCEPTION 'handwritten_rules.sql: rules must be seed5, seed3 or none, not "%"', rules;
    END IF;

    SELECT id INTO STRICT sara FROM nocrm.users WHERE lower(email) = 'sara@example.com';
    SELECT array_agg(u.id ORDER BY m.pos) INTO rr
      FROM unnest(ARRAY['anna@example.com', 'matteo@example.com', 'giovanni@example.com'])
           WITH ORDINALITY AS m(email, pos)
      JOIN nocrm.users u ON lower(u.email) = m.email;
    IF cardinality(rr) IS DISTINCT FROM 3 THEN
        RAISE EXCEPTION 'handwritten_rules.sql: users anna, matteo, giovanni not all found';
    END IF;
    SELECT id INTO STRICT vendite FROM nocrm.pipelines WHERE name = 'Vendite';
    SELECT id INTO STRICT preventivo FROM nocrm.steps WHERE pipeline_id = vendite AND name = 'Preventivo';
    PERFORM 1 FROM nocrm.email_templates WHERE name = 'quote_followup';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'handwritten_rules.sql: email template quote_followup not found';
    END IF;

    CREATE SCHEMA anchor;
    -- rule 3's rotation: nextval % 3 picks anna first, as the engine does.
    CREATE SEQUENCE anchor.rr_vendite MINVALUE 0 START 0;

    -- Bookkeeping (as the extension's BEFORE trigger) and rule 3.
    EXECUTE format($f$
CREATE FUNCTION anchor.lead_before() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW IS NOT DISTINCT FROM OLD THEN   -- a no-op update keeps updated_at
            RETURN NEW;
        END IF;
        IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
            NEW.updated_at := now();
        END IF;
        IF NEW.pipeline_id IS DISTINCT FROM OLD.pipeline_id
           AND NEW.step_id IS NOT DISTINCT FROM OLD.step_id THEN
            NEW.step_id := NULL;               -- to the new pipeline's first step
        END IF;
    END IF;
    IF NEW.pipeline_id IS NOT NULL AND NEW.step_id IS NULL THEN
        SELECT s.id INTO NEW.step_id FROM nocrm.steps s
         WHERE s.pipeline_id = NEW.pipeline_id ORDER BY s.position LIMIT 1;
    ELSIF NEW.step_id IS NOT NULL AND NEW.pipeline_id IS NULL THEN
        SELECT s.pipeline_id INTO NEW.pipeline_id FROM nocrm.steps s WHERE s.id = NEW.step_id;
    END IF;
    IF NEW.status IN ('won', 'lost', 'cancelled') THEN
        IF NEW.closed_at IS NULL
           OR (TG_OP = 'UPDATE' AND OLD.status IN ('todo', 'standby')
               AND NEW.closed_at IS NOT DISTINCT FROM OLD.closed_at) THEN
            NEW.closed_at := now();
        END IF;
    ELSE
        NEW.closed_at := NULL;
    END IF;
    -- rule 3: round robin on creation in Vendite without owner
    IF TG_OP = 'INSERT' AND NEW.user_id IS NULL AND NEW.pipeline_id = %1$s THEN
        NEW.user_id := (%2$L::bigint[])[nextval('anchor.rr_vendite') %% 3 + 1];
    END IF;
    RETURN NEW;
END $body$;
$f$, vendite, rr);

    -- rule 1
    EXECUTE format($f$
CREATE FUNCTION anchor.leads_inserted() RETURNS trigger LANGUAGE plpgsql AS $body$
DECLARE %s
BEGIN %s
    RETURN NULL;
END $body$;
$f$, notify_decl, format(notify_sql, 'new_rows', sara, 1, 'Nuovo lead: '));

    -- rule 5, and with seed5 rule 4
    body := $f$
    INSERT INTO nocrm.tags (lead_id, name)
    SELECT n.id, 'Upsell Opportunity' FROM new_rows n
     WHERE n.status = 'won'
       AND n.id NOT IN (SELECT o.id FROM old_rows o WHERE o.status = 'won')
    ON CONFLICT DO NOTHING;
$f$;
    IF rules = 'seed5' THEN
        -- the step belongs to Vendite only (FK on (step_id, pipeline_id)),
        -- so "at step Preventivo" is also "in Vendite".
        body := body || format($f$
    WITH moved AS (
        SELECT n.id, n.contact_email FROM new_rows n
         WHERE n.step_id = %1$s
           AND n.id NOT IN (SELECT o.id FROM old_rows o WHERE o.step_id = %1$s)
    ), queued AS (
        -- the row send_email writes; without contact_email the engine skips it
        INSERT INTO nocrm.queue (kind, automation_id, action_no, lead_id, event, recipient, payload)
        SELECT 'email', 4, 0, m.id, 'lead.step.changed.to', m.contact_email,
               jsonb_build_object('template', %2$L, 'to', m.contact_email)
          FROM moved m WHERE m.contact_email IS NOT NULL
    )
    INSERT INTO nocrm.tags (lead_id, name)
    SELECT m.id, 'Preventivo inviato' FROM moved m
    ON CONFLICT DO NOTHING;
$f$, preventivo, 'quote_followup');
    END IF;
    EXECUTE format($f$
CREATE FUNCTION anchor.leads_updated() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN %s
    RETURN NULL;
END $body$;
$f$, body);

    -- rule 2
    IF rules = 'seed5' THEN
        EXECUTE format($f$
CREATE FUNCTION anchor.leads_deleted() RETURNS trigger LANGUAGE plpgsql AS $body$
DECLARE %s
BEGIN %s
    RETURN NULL;
END $body$;
$f$, notify_decl, format(notify_sql, 'old_rows', sara, 2, 'Lead eliminato: '));
    END IF;

    CREATE TRIGGER anchor_lead_before BEFORE INSERT OR UPDATE ON nocrm.leads
        FOR EACH ROW EXECUTE FUNCTION anchor.lead_before();
    CREATE TRIGGER anchor_leads_inserted AFTER INSERT ON nocrm.leads
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION anchor.leads_inserted();
    CREATE TRIGGER anchor_leads_updated AFTER UPDATE ON nocrm.leads
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION anchor.leads_updated();
    ALTER TABLE nocrm.leads DISABLE TRIGGER anchor_lead_before;
    ALTER TABLE nocrm.leads DISABLE TRIGGER anchor_leads_inserted;
    ALTER TABLE nocrm.leads DISABLE TRIGGER anchor_leads_updated;
    IF rules = 'seed5' THEN
        CREATE TRIGGER anchor_leads_deleted AFTER DELETE ON nocrm.leads
            REFERENCING OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION anchor.leads_deleted();
        ALTER TABLE nocrm.leads DISABLE TRIGGER anchor_leads_deleted;
    END IF;
END
$generate$;

-- Switch this database to the anchor: the extension's triggers on the CRM
-- tables off, the anchor's on.  (Its own bookkeeping trigger replaces the
-- extension's, so they must not run together.)
CREATE OR REPLACE FUNCTION anchor.enable() RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['nocrm.leads', 'nocrm.tags', 'nocrm.comments', 'nocrm.emails'] LOOP
        EXECUTE format('ALTER TABLE %s DISABLE TRIGGER USER', t);
    END LOOP;
    FOR t IN SELECT tgname FROM pg_trigger
              WHERE tgrelid = 'nocrm.leads'::regclass AND tgname LIKE 'anchor\_%' LOOP
        EXECUTE format('ALTER TABLE nocrm.leads ENABLE TRIGGER %I', t);
    END LOOP;
END $$;

\endif
COMMIT;
