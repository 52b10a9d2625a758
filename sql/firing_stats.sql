-- Firing counts (nocrm.firing_counts) behind automation_stats and
-- stage_trigger_stats: every firing is counted, whatever nocrm.run_log
-- keeps, in one row per rule and statement; rolled-back firings are not;
-- the drain folds each day's rows into one and prunes them with the run log.
\i test/fixtures/crm.sql
SET nocrm.history = actions;   -- the run log keeps no fired runs (run_log auto)
SELECT nocrm.create_automation(name => 'Tag new', event => 'lead.creation',
  actions => '[{"type": "add_tags", "tags": ["new"]}]');
SELECT nocrm.create_automation(name => 'Won twice', event => 'lead.status.changed.to', target => 'won',
  actions => '[{"type": "add_tags", "tags": ["won"]}, {"type": "add_tags", "tags": ["customer"]}]');
SELECT nocrm.create_automation(name => 'Never', event => 'lead.commented',
  actions => '[{"type": "add_tags", "tags": ["x"]}]');
SELECT nocrm.create_stage_trigger('Qualificato', 'status_changed', '{"status": "won"}',
  pipeline => 'Vendite', name => 'Won qualifies');

-- 1. A 100-row insert: 100 firings in one row, no run log row.
INSERT INTO nocrm.leads (title, pipeline_id, step_id) SELECT 'bulk ' || i, 1, 1 FROM generate_series(1, 100) i;
SELECT automation_id, stage_trigger_id, fired, actions, last_fired <= now() AS in_time
  FROM nocrm.firing_counts ORDER BY id;
SELECT count(*) AS runs FROM nocrm.automation_runs;
SELECT id, name, fired, test_runs, skipped, failed, avg_actions, last_fired IS NOT NULL AS has_fired
  FROM nocrm.automation_stats;

-- 2. Ten of them won, then two one-row statements: a row per rule and
--    statement (the automation's two actions counted, the trigger's move).
UPDATE nocrm.leads SET status = 'won' WHERE id <= 10;
UPDATE nocrm.leads SET status = 'won' WHERE id = 11;
UPDATE nocrm.leads SET status = 'won' WHERE id = 12;
SELECT automation_id, stage_trigger_id, fired, actions FROM nocrm.firing_counts ORDER BY id;
SELECT id, name, fired, avg_actions FROM nocrm.automation_stats WHERE id = 2;
-- the same firings with nocrm.run_log = 'all' give as many fired runs
SET nocrm.run_log = 'all';
UPDATE nocrm.leads SET status = 'won' WHERE id BETWEEN 13 AND 15;
SELECT (SELECT count(*) FROM nocrm.automation_runs WHERE automation_id = 2 AND outcome = 'fired') AS runs,
       (SELECT fired FROM nocrm.firing_counts ORDER BY id DESC OFFSET 1 LIMIT 1) AS counted;
RESET nocrm.run_log;

-- 3. Stage trigger: the moves it made and the backward ones it refused.
UPDATE nocrm.leads SET step_id = 4 WHERE id = 16;
UPDATE nocrm.leads SET status = 'won' WHERE id IN (16, 17);
SELECT id, name, pipeline, step, kind, enabled, fired, refused, last_fired IS NOT NULL AS has_fired
  FROM nocrm.stage_trigger_stats;

-- 4. Rolled back: a transaction, a savepoint, an exception block.  What
--    the same rule counted before the savepoint stays.
SELECT sum(fired) AS before FROM nocrm.firing_counts WHERE automation_id = 1 \gset
BEGIN;
INSERT INTO nocrm.leads (title) VALUES ('rolled back');
ROLLBACK;
BEGIN;
INSERT INTO nocrm.leads (title) VALUES ('kept 1');
SAVEPOINT s;
INSERT INTO nocrm.leads (title) SELECT 'undone' FROM generate_series(1, 5);
ROLLBACK TO s;
INSERT INTO nocrm.leads (title) VALUES ('kept 2');
COMMIT;
DO $$
BEGIN
    INSERT INTO nocrm.leads (title) VALUES ('kept 3');
    BEGIN
        INSERT INTO nocrm.leads (title) VALUES ('failed');
        RAISE EXCEPTION 'give up';
    EXCEPTION WHEN raise_exception THEN NULL;
    END;
END $$;
SELECT sum(fired) - :before AS counted_since FROM nocrm.firing_counts WHERE automation_id = 1;
SELECT string_agg(title, ', ' ORDER BY id) AS kept FROM nocrm.leads WHERE id > 100 AND title NOT LIKE 'bulk%';

-- 5. Test mode and switched-off automations fire nothing; a test run is a test_run.
SELECT nocrm.set_automation_mode(1, 'test');
INSERT INTO nocrm.leads (title) VALUES ('test mode');
SELECT nocrm.set_automation_mode(1, 'live');
SET nocrm.automations_enabled = off;
INSERT INTO nocrm.leads (title) VALUES ('switched off');
RESET nocrm.automations_enabled;
SELECT id, fired, test_runs FROM nocrm.automation_stats WHERE id = 1;

-- 6. The drain folds each day's rows into one, sums kept; a deleted rule's
--    rows go.  (Rows of other days are made here by hand.)
INSERT INTO nocrm.firing_counts (automation_id, fired, actions, last_fired)
VALUES (1, 7, 7, date_trunc('day', now(), 'UTC') - interval '2 days' + interval '1 hour'),
       (1, 3, 3, date_trunc('day', now(), 'UTC') - interval '2 days' + interval '2 hours'),
       (3, 1, 1, now() - interval '1 day');
SELECT nocrm.delete_automation(3);
SELECT automation_id, stage_trigger_id, count(*) AS rows, sum(fired) AS fired, sum(actions) AS actions
  FROM nocrm.firing_counts GROUP BY 1, 2 ORDER BY 1, 2;
SELECT id, fired, avg_actions FROM nocrm.automation_stats ORDER BY id;
CALL nocrm.drain(0);
SELECT automation_id, stage_trigger_id, date_trunc('day', last_fired, 'UTC') = date_trunc('day', now(), 'UTC') AS today,
       fired, actions
  FROM nocrm.firing_counts ORDER BY 1, 2, 3;
SELECT id, fired, avg_actions FROM nocrm.automation_stats ORDER BY id;
-- folding again changes nothing
CALL nocrm.drain(0);
SELECT count(*) AS rows, sum(fired) AS fired FROM nocrm.firing_counts;

-- 7. The counts cover the run log's retention: rows older go.
SET nocrm.run_log_retention = '1d';
CALL nocrm.drain(0);
SELECT automation_id, stage_trigger_id, fired FROM nocrm.firing_counts ORDER BY 1, 2;
SET nocrm.run_log_retention = 0;
CALL nocrm.drain(0);
SELECT count(*) AS rows FROM nocrm.firing_counts;
SELECT id, fired, avg_actions, last_fired FROM nocrm.automation_stats ORDER BY id;
SELECT id, fired, refused, last_fired FROM nocrm.stage_trigger_stats;
RESET nocrm.run_log_retention;

-- 8. Admins read the views and the counts; agents neither.
SET ROLE nocrm_admin;
SELECT count(*) >= 0 AS ok FROM nocrm.firing_counts;
SELECT count(*) AS triggers FROM nocrm.stage_trigger_stats;
RESET ROLE;
SET ROLE nocrm_agent;
SELECT count(*) FROM nocrm.firing_counts;
SELECT count(*) FROM nocrm.stage_trigger_stats;
-- but an agent's writes are counted (the counts are written as the extension's owner)
INSERT INTO nocrm.leads (title) VALUES ('by an agent');
RESET ROLE;
SELECT automation_id, fired FROM nocrm.firing_counts;
RESET nocrm.history;
