-- nocrm.run_log: which runs nocrm.automation_runs records.  Its default,
-- auto, follows nocrm.history: everything with all; with actions all but
-- fired runs (lead_history's action.* and trigger.fired rows say what they
-- did); nothing with none.  An explicit value wins over nocrm.history.
\i test/fixtures/crm.sql
-- 1 test mode, 2 fires and stops what follows, 3 stopped; a stage trigger
-- moves one lead forward and refuses to move the other back.
SELECT nocrm.create_automation(name => 'Trial', event => 'lead.status.changed.to', target => 'won',
  mode => 'test', actions => '[{"type": "add_tags", "tags": ["trial"]}]');
SELECT nocrm.create_automation(name => 'Won tag', event => 'lead.status.changed.to', target => 'won',
  actions => '[{"type": "add_tags", "tags": ["won"]}]');
SELECT nocrm.set_automation_options(2, stop_processing => true);
SELECT nocrm.create_automation(name => 'After won', event => 'lead.status.changed.to', target => 'won',
  actions => '[{"type": "add_tags", "tags": ["late"]}]');
SELECT nocrm.create_stage_trigger('Qualificato', 'status_changed', '{"status": "won"}',
  pipeline => 'Vendite', name => 'Won qualifies');
INSERT INTO nocrm.leads (title, pipeline_id, step_id) VALUES ('Ahead', 1, 1), ('Behind', 1, 4);

-- Both leads won with the two settings given; returns the run log.
CREATE FUNCTION pg_temp.won_runs(history text, run_log text)
RETURNS TABLE (run text, lead text, outcome text, nactions integer, detail text)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('nocrm.automations_enabled', 'off', true);
    UPDATE nocrm.leads SET status = 'todo', step_id = CASE title WHEN 'Ahead' THEN 1 ELSE 4 END;
    DELETE FROM nocrm.tags;
    TRUNCATE nocrm.automation_runs, nocrm.lead_history;
    PERFORM set_config('nocrm.automations_enabled', 'on', true),
            set_config('nocrm.history', history, true), set_config('nocrm.run_log', run_log, true);
    UPDATE nocrm.leads SET status = 'won';
    RETURN QUERY
    SELECT coalesce('automation ' || r.automation_id, 'trigger ' || r.stage_trigger_id), l.title,
           r.outcome, r.nactions, r.detail
      FROM nocrm.automation_runs r JOIN nocrm.leads l ON l.id = r.lead_id ORDER BY l.title, r.id;
END $$;

SHOW nocrm.run_log;
SELECT * FROM pg_temp.won_runs('all', 'auto');
SELECT * FROM pg_temp.won_runs('actions', 'auto');
-- what lead_history records of the same at actions: every firing's actions
SELECT l.title, h.event, h.automation_id, h.stage_trigger_id, h.detail
  FROM nocrm.lead_history h JOIN nocrm.leads l ON l.id = h.lead_id ORDER BY l.title, h.id;
SELECT * FROM pg_temp.won_runs('none', 'auto');
SELECT * FROM pg_temp.won_runs('actions', 'all');
SELECT * FROM pg_temp.won_runs('all', 'exceptions');
SELECT * FROM pg_temp.won_runs('all', 'none');
SELECT * FROM pg_temp.won_runs('none', 'all');
-- nothing else changes with the setting: the tags are the same each time
SELECT l.title, string_agg(t.name, ', ' ORDER BY t.name) AS tags
  FROM nocrm.leads l JOIN nocrm.tags t ON t.lead_id = l.id GROUP BY l.title ORDER BY l.title;

-- A bulk insert (written by the direct path) logs as a single row does.
SELECT nocrm.create_automation(name => 'Tag new', event => 'lead.creation',
  actions => '[{"type": "add_tags", "tags": ["new"]}]');
TRUNCATE nocrm.automation_runs, nocrm.lead_history;
SET nocrm.history = actions;
INSERT INTO nocrm.leads (title) SELECT 'bulk ' || i FROM generate_series(1, 100) i;
SELECT (SELECT count(*) FROM nocrm.automation_runs) AS runs,
       (SELECT count(*) FROM nocrm.lead_history WHERE event = 'action.add_tags') AS action_rows;
SET nocrm.run_log = 'all';   -- quoted: ALL is a keyword in SET
INSERT INTO nocrm.leads (title) SELECT 'bulk ' || i FROM generate_series(101, 200) i;
SELECT outcome, count(*), min(actions::text) FROM nocrm.automation_runs GROUP BY outcome;
-- automation_stats counts every firing, whatever the run log keeps
-- (nocrm.firing_counts): 2 won leads in each of the 7 rounds, 200 new leads
SELECT name, fired, test_runs, skipped FROM nocrm.automation_stats WHERE id IN (2, 4) ORDER BY id;
RESET nocrm.run_log;
RESET nocrm.history;

-- Admins may set it, agents not; bad values are refused.
SET ROLE nocrm_admin;
SET nocrm.run_log = exceptions;
SHOW nocrm.run_log;
RESET ROLE;
RESET nocrm.run_log;
SET ROLE nocrm_agent;
SET nocrm.run_log = none;
RESET ROLE;
SET nocrm.run_log = fired;
SHOW nocrm.run_log;
