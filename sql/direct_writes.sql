-- History and run log rows go to their tables by multi-insert, without an
-- INSERT statement, when nothing needs the executor; otherwise by INSERT.
-- Either way the rows, defaults, constraints and indexes are the same.
-- nocrm.record_writes() counts the rows each way.
\i test/fixtures/crm.sql
SELECT nocrm.create_automation(name => 'welcome', event => 'lead.creation',
  conditions => '{"pipeline": "Vendite"}',
  actions => '[{"type": "notify", "user": "anna@example.com", "message": "New: {{lead.title}}"},
               {"type": "assign", "user": "matteo@example.com"}]') AS welcome \gset
SELECT count(*) FROM nocrm.record_writes(reset => true);

-- 1,500 leads in one statement: 7,500 history rows (more than one batch
-- of 1,000 slots), 1,500 run rows directly; notifications (a foreign key
-- to users) by INSERT.
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Bulk ' || g, 1 FROM generate_series(1, 1500) g;
SELECT * FROM nocrm.record_writes(reset => true) ORDER BY table_name;
-- the columns left out got their defaults: ids in order, one per row
SELECT count(*) AS rows, count(DISTINCT id) AS ids, min(id) AS first, max(id) AS last,
       bool_and(created_at IS NOT NULL) AS stamped FROM nocrm.lead_history;
SELECT count(*) AS runs, min(id), max(id), bool_and(mode = 'live' AND outcome = 'fired' AND nactions = 2) AS fired
  FROM nocrm.automation_runs;
-- the indexes have every row: index scans agree with the heap
SET enable_seqscan = off;
SELECT count(*) AS by_lead_index FROM nocrm.lead_history WHERE lead_id BETWEEN 1 AND 1500;
SELECT count(*) AS by_automation_index FROM nocrm.automation_runs WHERE automation_id = :welcome;
SELECT event, chain_depth FROM nocrm.lead_history WHERE lead_id = 700 ORDER BY id;
RESET enable_seqscan;
-- a later statement of the same transaction sees the rows
BEGIN;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Seen', 1) RETURNING id AS seen \gset
SELECT count(*) AS history_of_seen FROM nocrm.lead_history WHERE lead_id = :seen;
ROLLBACK;
SELECT count(*) AS after_rollback FROM nocrm.lead_history WHERE lead_id = :seen;

-- Columns a user adds get their defaults; an index of theirs (partial, on
-- an expression) is kept.
ALTER TABLE nocrm.lead_history ADD COLUMN source text NOT NULL DEFAULT 'crm',
  ADD COLUMN noted_at timestamptz DEFAULT clock_timestamp();
CREATE INDEX lead_history_event_lower ON nocrm.lead_history (lower(event)) WHERE automation_id IS NOT NULL;
SELECT count(*) AS tables FROM nocrm.record_writes(reset => true);
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Added ' || g, 1 FROM generate_series(1, 100) g;
SELECT * FROM nocrm.record_writes(reset => true) WHERE table_name = 'lead_history';
SELECT source, count(*), bool_and(noted_at IS NOT NULL) AS noted FROM nocrm.lead_history
 WHERE lead_id > 1500 GROUP BY source;
SET enable_seqscan = off;
SELECT count(*) AS by_expression_index FROM nocrm.lead_history
 WHERE lower(event) = 'action.notify' AND automation_id IS NOT NULL;
RESET enable_seqscan;
SELECT count(*) AS by_heap FROM nocrm.lead_history WHERE event = 'action.notify';
ALTER TABLE nocrm.lead_history DROP COLUMN noted_at;
DROP INDEX nocrm.lead_history_event_lower;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('After the drop', 1);
SELECT * FROM nocrm.record_writes(reset => true) WHERE table_name = 'lead_history';
ALTER TABLE nocrm.lead_history DROP COLUMN source;

-- A CHECK constraint and NOT NULL are enforced: the statement fails whole,
-- nothing stays.
\set VERBOSITY terse
ALTER TABLE nocrm.automation_runs ADD CONSTRAINT no_refused_titles
  CHECK (change IS NULL OR change::text NOT LIKE '%Refused%');
SELECT count(*) AS leads_before FROM nocrm.leads \gset
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Refused ' || g, 1 FROM generate_series(1, 3) g;
SELECT count(*) - :leads_before AS leads_added FROM nocrm.leads;
ALTER TABLE nocrm.automation_runs DROP CONSTRAINT no_refused_titles;
ALTER TABLE nocrm.lead_history ADD COLUMN reviewer text NOT NULL DEFAULT 'nobody';
ALTER TABLE nocrm.lead_history ALTER COLUMN reviewer DROP DEFAULT;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('No reviewer', 1);
SELECT count(*) - :leads_before AS leads_added FROM nocrm.leads;
ALTER TABLE nocrm.lead_history DROP COLUMN reviewer;
\set VERBOSITY default

-- A user's trigger on the table: the rows go by INSERT, and it fires for each.
CREATE TABLE public.history_copy (lead_id bigint, event text);
CREATE FUNCTION public.copy_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.history_copy VALUES (NEW.lead_id, NEW.event); RETURN NEW; END $$;
CREATE TRIGGER copy_history AFTER INSERT ON nocrm.lead_history FOR EACH ROW EXECUTE FUNCTION public.copy_history();
SELECT count(*) AS tables FROM nocrm.record_writes(reset => true);
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Copied ' || g, 1 FROM generate_series(1, 10) g;
SELECT * FROM nocrm.record_writes(reset => true) ORDER BY table_name;
SELECT event, count(*) FROM public.history_copy GROUP BY event ORDER BY event;
DROP TRIGGER copy_history ON nocrm.lead_history;
-- without it, directly again (the table's shape is read anew)
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Direct again', 1);
SELECT * FROM nocrm.record_writes(reset => true) WHERE table_name = 'lead_history';

-- Row-level security, or a deferrable unique index: by INSERT.
ALTER TABLE nocrm.automation_runs ENABLE ROW LEVEL SECURITY;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('With RLS', 1);
SELECT * FROM nocrm.record_writes(reset => true) WHERE table_name = 'automation_runs';
ALTER TABLE nocrm.automation_runs DISABLE ROW LEVEL SECURITY;
ALTER TABLE nocrm.lead_history ADD CONSTRAINT history_id_deferred UNIQUE (id) DEFERRABLE INITIALLY DEFERRED;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Deferred', 1);
SELECT * FROM nocrm.record_writes(reset => true) WHERE table_name = 'lead_history';
ALTER TABLE nocrm.lead_history DROP CONSTRAINT history_id_deferred;

-- A read-only transaction gets INSERT's error, and nothing is written.
BEGIN READ ONLY;
SELECT nocrm.fire_trigger(1, 'read-only');
ROLLBACK;
SELECT count(*) AS custom_rows FROM nocrm.lead_history WHERE event = 'custom_trigger';

-- A row that collides with a unique index fails the statement as INSERT would.
SELECT pg_sequence_last_value(pg_get_serial_sequence('nocrm.lead_history', 'id')) + 1 AS next_id,
       pg_sequence_last_value(pg_get_serial_sequence('nocrm.leads', 'id')) + 1 AS next_lead \gset
INSERT INTO nocrm.lead_history (id, lead_id, event) VALUES (:next_id, :next_lead, 'manual');
\set VERBOSITY terse
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Collides', 1);
\set VERBOSITY default
SELECT count(*) AS collided FROM nocrm.leads WHERE title = 'Collides';
DELETE FROM nocrm.lead_history WHERE event = 'manual';

-- Notifications and queue rows go directly too.  A notification's user (a
-- foreign key) is checked once per batch and distinct user, and locked FOR
-- KEY SHARE as the per-row check would lock it.
SELECT nocrm.create_automation(name => 'mail and tell', event => 'lead.creation',
  conditions => '{"pipeline": "Onboarding"}',
  actions => '[{"type": "send_email", "template": "quote_followup"},
               {"type": "notify", "user": "giovanni@example.com", "message": "Onboarding: {{lead.title}}"},
               {"type": "notify", "user": "sara.manager@example.com", "message": "Onboarding: {{lead.title}}"}]') AS mail_and_tell \gset
SELECT count(*) AS tables FROM nocrm.record_writes(reset => true);
BEGIN;
INSERT INTO nocrm.leads (title, pipeline_id, contact_email)
  SELECT 'Onboard ' || g, 2, 'buyer' || g || '@client.example' FROM generate_series(1, 1200) g;
SELECT * FROM nocrm.record_writes(reset => true) WHERE table_name IN ('notifications', 'queue');
SELECT u.email, count(*), count(DISTINCT n.lead_id) AS leads, bool_and(n.created_at = now() AND n.read_at IS NULL) AS defaults
  FROM nocrm.notifications n JOIN nocrm.users u ON u.id = n.user_id
 WHERE n.message LIKE 'Onboarding: %' GROUP BY u.email ORDER BY u.email;
SELECT kind, state, count(*), count(DISTINCT lead_id) AS leads FROM nocrm.queue
 WHERE automation_id = :mail_and_tell GROUP BY kind, state;
-- the two notified users are locked by this transaction (against a
-- delete), the others are not
SELECT email, xmax::text::bigint = txid_current() % 4294967296 AS locked_here
  FROM nocrm.users WHERE id > 0 ORDER BY id;
SET enable_seqscan = off;
SELECT count(*) AS unread_by_index FROM nocrm.notifications
 WHERE user_id = (SELECT id FROM nocrm.users WHERE email = 'sara.manager@example.com') AND read_at IS NULL;
RESET enable_seqscan;
ROLLBACK;
-- a user deleted by the same statement: the batch goes to INSERT, and the
-- constraint's own error fails the statement
\set VERBOSITY terse
WITH gone AS (DELETE FROM nocrm.users WHERE email = 'sara.manager@example.com' RETURNING id)
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Orphan ' || g, 2 FROM generate_series(1, 3) g;
\set VERBOSITY default
SELECT * FROM nocrm.record_writes(reset => true) WHERE table_name = 'notifications';
SELECT count(*) AS orphans FROM nocrm.leads WHERE title LIKE 'Orphan %';
-- a deferrable foreign key is checked at commit by its trigger: by INSERT
ALTER TABLE nocrm.notifications ALTER CONSTRAINT notifications_user_id_fkey DEFERRABLE INITIALLY IMMEDIATE;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Deferrable', 2);
SELECT * FROM nocrm.record_writes(reset => true) WHERE table_name = 'notifications';
ALTER TABLE nocrm.notifications ALTER CONSTRAINT notifications_user_id_fkey NOT DEFERRABLE;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Immediate again', 2);
SELECT * FROM nocrm.record_writes(reset => true) WHERE table_name = 'notifications';
-- the check runs as the owner of users as it is now, not as it was when
-- the table's shape was read (the owner it had is gone by then)
CREATE ROLE direct_writes_owner;
GRANT USAGE ON SCHEMA nocrm TO direct_writes_owner;
ALTER TABLE nocrm.users OWNER TO direct_writes_owner;
-- notifications' shape read anew while that role owns users
ALTER TABLE nocrm.notifications SET (autovacuum_enabled = true);
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Owned', 2);
SELECT current_user AS me \gset
ALTER TABLE nocrm.users OWNER TO :"me";
REVOKE USAGE ON SCHEMA nocrm FROM direct_writes_owner;
DROP ROLE direct_writes_owner;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Owner gone', 2);
SELECT * FROM nocrm.record_writes(reset => true) WHERE table_name = 'notifications';
ALTER TABLE nocrm.notifications RESET (autovacuum_enabled);
SELECT nocrm.delete_automation(:mail_and_tell);

-- Everything the rows reached, compared with the same work done by INSERT
-- (a trigger that does nothing forces that path).
CREATE FUNCTION public.nothing() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
TRUNCATE nocrm.lead_history, nocrm.automation_runs;
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Twin ' || g, 1 FROM generate_series(1, 200) g;
CREATE TEMP TABLE direct_rows AS
  SELECT lead_id - (SELECT min(lead_id) FROM nocrm.lead_history) AS lead_no, event, actor_id, automation_id,
         chain_depth, old_value, new_value - 'notification_id' AS new_value, detail FROM nocrm.lead_history;
TRUNCATE nocrm.lead_history, nocrm.automation_runs;
CREATE TRIGGER nothing AFTER INSERT ON nocrm.lead_history FOR EACH STATEMENT EXECUTE FUNCTION public.nothing();
SELECT count(*) AS tables FROM nocrm.record_writes(reset => true);
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Twin ' || g, 1 FROM generate_series(1, 200) g;
SELECT * FROM nocrm.record_writes(reset => true) WHERE table_name = 'lead_history';
DROP TRIGGER nothing ON nocrm.lead_history;
SELECT count(*) AS differences FROM (
  (SELECT * FROM direct_rows
   EXCEPT ALL
   SELECT lead_id - (SELECT min(lead_id) FROM nocrm.lead_history), event, actor_id, automation_id,
          chain_depth, old_value, new_value - 'notification_id', detail FROM nocrm.lead_history)
  UNION ALL
  (SELECT lead_id - (SELECT min(lead_id) FROM nocrm.lead_history), event, actor_id, automation_id,
          chain_depth, old_value, new_value - 'notification_id', detail FROM nocrm.lead_history
   EXCEPT ALL
   SELECT * FROM direct_rows)) d;
SELECT count(*) AS compared FROM direct_rows;
