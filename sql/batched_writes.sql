-- History, run log and notification rows are written in batches: at the end
-- of the outermost statement, in the order they were made, and not at all
-- when the (sub)transaction that made them rolls back.
\i test/fixtures/crm.sql
SELECT nocrm.create_automation(name => 'welcome', event => 'lead.creation',
  conditions => '{"pipeline": "Vendite"}',
  actions => '[{"type": "notify", "user": "anna@example.com", "message": "New: {{lead.title}}"},
               {"type": "assign", "user": "matteo@example.com"}]') AS welcome \gset

-- One statement, 2,500 leads: 5 history rows each (12,500 rows, more than
-- one batch of 10,000), a run log row and a notification each.
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Bulk ' || g, 1 FROM generate_series(1, 2500) g;
SELECT (SELECT count(*) FROM nocrm.lead_history) AS history,
       (SELECT count(*) FROM nocrm.automation_runs) AS runs,
       (SELECT count(*) FROM nocrm.notifications) AS notifications;
-- Per lead, the rows keep their order: the event, the actions, the events
-- the assignment raised.
SELECT h.event, h.actor_id, h.automation_id, h.chain_depth, count(*)
  FROM (SELECT h.*, row_number() OVER (PARTITION BY lead_id ORDER BY id) AS n FROM nocrm.lead_history h) h
 GROUP BY h.n, h.event, h.actor_id, h.automation_id, h.chain_depth ORDER BY h.n, h.event;
-- ids and timestamps both follow the order things happened in
SELECT count(*) AS out_of_order FROM (
  SELECT created_at < lag(created_at) OVER (ORDER BY id) AS back FROM nocrm.lead_history) x WHERE back;
-- each notification's id is the one its history row names
SELECT count(*) AS notifications_named_in_history FROM nocrm.notifications n
  JOIN nocrm.lead_history h ON h.event = 'action.notify' AND (h.new_value ->> 'notification_id')::bigint = n.id
 WHERE h.lead_id = n.lead_id AND n.message = 'New: ' || (SELECT title FROM nocrm.leads WHERE id = n.lead_id);

-- A subtransaction rolled back takes its rows with it; the rest stay.
TRUNCATE nocrm.lead_history, nocrm.automation_runs, nocrm.notifications;
DO $$
BEGIN
    INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Kept', 1);
    BEGIN
        INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Rolled back', 1);
        RAISE EXCEPTION 'undo';
    EXCEPTION WHEN raise_exception THEN
        NULL;
    END;
END $$;
SELECT l.title AS lead, h.event
  FROM nocrm.lead_history h LEFT JOIN nocrm.leads l ON l.id = h.lead_id ORDER BY h.id;
SELECT message FROM nocrm.notifications ORDER BY id;

-- Inside one statement, the rows are not there yet; after it, they are.
TRUNCATE nocrm.lead_history, nocrm.automation_runs, nocrm.notifications;
CREATE FUNCTION pg_temp.history_count() RETURNS bigint LANGUAGE sql VOLATILE AS
  $$ SELECT count(*) FROM nocrm.lead_history $$;
WITH l AS (INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('In a CTE', 1) RETURNING id)
SELECT pg_temp.history_count() AS during;
SELECT pg_temp.history_count() AS after;

-- A user's trigger on notifications fires when the batch is written, still
-- inside the transaction.
CREATE TABLE public.seen_notifications (id bigint, message text);
CREATE FUNCTION public.see_notification() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.seen_notifications VALUES (NEW.id, NEW.message);
    RETURN NULL;
END $$;
CREATE TRIGGER see_notification AFTER INSERT ON nocrm.notifications
    FOR EACH ROW EXECUTE FUNCTION public.see_notification();
BEGIN;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Seen', 1);
SELECT s.message FROM public.seen_notifications s JOIN nocrm.notifications n USING (id);
ROLLBACK;
SELECT count(*) AS seen_after_rollback FROM public.seen_notifications;
DROP TABLE public.seen_notifications;
DROP FUNCTION public.see_notification() CASCADE;

-- Past work_mem the statement's transition tables are read back from disk:
-- every row's events still come, old and new versions paired.
SET work_mem = '64kB';
TRUNCATE nocrm.lead_history, nocrm.automation_runs, nocrm.notifications;
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Spilled ' || g, 1 FROM generate_series(1, 3000) g;
UPDATE nocrm.leads SET status = 'standby', title = title || '!' WHERE title LIKE 'Spilled %';
DELETE FROM nocrm.leads WHERE title LIKE 'Spilled %' AND status = 'standby';
SELECT event, count(*), count(DISTINCT lead_id) AS leads FROM nocrm.lead_history GROUP BY event ORDER BY event;
-- each status change paired the right old and new row
SELECT count(*) FILTER (WHERE (old_value ->> 'title') || '!' = new_value ->> 'title') AS paired,
       count(*) FILTER (WHERE (old_value ->> 'title') || '!' <> new_value ->> 'title') AS mismatched
  FROM nocrm.lead_history WHERE event = 'lead.any_update' AND old_value ? 'title';
RESET work_mem;

-- Backstop: if the statement trigger that writes the batch is disabled,
-- the rows are written at commit, with a warning.
-- (On leads the event trigger itself writes the batch at the statement's
-- end; tags have a row trigger and the separate statement trigger.)
ALTER TABLE nocrm.tags DISABLE TRIGGER nocrm_flush_assignments;
TRUNCATE nocrm.lead_history;
INSERT INTO nocrm.tags (lead_id, name) SELECT id, 'no statement trigger' FROM nocrm.leads WHERE title = 'Kept';
ALTER TABLE nocrm.tags ENABLE TRIGGER nocrm_flush_assignments;
SELECT event, detail FROM nocrm.lead_history;
