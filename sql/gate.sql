-- The gates: a row change nothing can care about never reaches the event
-- triggers (their WHEN clauses say no), and everything that can care still
-- sees it.  Counted with nocrm.gate_counters(): passed = rows queued for
-- the event triggers, skipped = rows that were not.
\i test/fixtures/crm.sql
SET nocrm.history = actions;
-- the decisions since the last call, without the gates that made none
CREATE FUNCTION pg_temp.event_calls() RETURNS TABLE (gate text, passed bigint, skipped bigint) LANGUAGE sql AS $$
  SELECT * FROM nocrm.gate_counters(reset => true) WHERE passed + skipped > 0 $$;
SELECT count(*) FROM pg_temp.event_calls();

-- No rules, history of actions only: no row is queued.  The BEFORE trigger
-- still places new leads on their pipeline's first step (from its cache).
BEGIN;
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Bulk ' || g, 1 FROM generate_series(1, 3) g;
SELECT * FROM pg_temp.event_calls();
SELECT title, step_id, status FROM nocrm.leads ORDER BY id;
UPDATE nocrm.leads SET status = 'won', title = title || ' (won)';
DELETE FROM nocrm.leads WHERE title = 'Bulk 3 (won)';
SELECT * FROM pg_temp.event_calls();
SELECT title, status, closed_at IS NOT NULL AS closed FROM nocrm.leads ORDER BY id;
COMMIT;

-- A rule on lead.creation for Onboarding only: Vendite leads pass no gate.
SELECT nocrm.create_automation(name => 'onboarding tag', event => 'lead.creation',
  conditions => '{"pipeline": "Onboarding"}',
  actions => '[{"type": "add_tags", "tags": ["Onboarding"]}]') AS onboarding_rule \gset
BEGIN;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Sales lead', 1);
SELECT * FROM pg_temp.event_calls();
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('New customer', 2);
SELECT * FROM pg_temp.event_calls();
COMMIT;
SELECT l.title, t.name AS tag FROM nocrm.leads l LEFT JOIN nocrm.tags t ON t.lead_id = l.id
 WHERE l.title IN ('Sales lead', 'New customer') ORDER BY l.id;

-- Conditions on tags cannot be judged without a query: the gate says maybe.
SELECT nocrm.create_automation(name => 'tagged creation', event => 'lead.creation',
  conditions => '{"pipeline": "Vendite", "has_tag": "VIP"}',
  actions => '[{"type": "set_status", "status": "standby"}]') AS tagged_rule \gset
BEGIN;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Maybe', 1);
SELECT * FROM pg_temp.event_calls();
COMMIT;
SELECT nocrm.delete_automation(:tagged_rule);

-- A rule made in the same transaction is seen by the very next statement.
BEGIN;
SELECT nocrm.create_automation(name => 'sales tag', event => 'lead.creation',
  conditions => '{"pipeline": "Vendite"}',
  actions => '[{"type": "add_tags", "tags": ["Sales"]}]') AS sales_rule \gset
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Right after the rule', 1);
SELECT name FROM nocrm.tags WHERE lead_id = (SELECT id FROM nocrm.leads WHERE title = 'Right after the rule');
ROLLBACK;
SELECT * FROM pg_temp.event_calls();

-- Updates: only the event a rule listens to, with its target, passes.
SELECT nocrm.create_automation(name => 'won tag', event => 'lead.status.changed.to', target => 'won',
  actions => '[{"type": "add_tags", "tags": ["Won"]}]') AS won_rule \gset
BEGIN;
UPDATE nocrm.leads SET status = 'lost' WHERE title = 'Sales lead';
UPDATE nocrm.leads SET description = 'a note' WHERE title = 'Sales lead';
SELECT * FROM pg_temp.event_calls();
UPDATE nocrm.leads SET status = 'won' WHERE title = 'Sales lead';
SELECT * FROM pg_temp.event_calls();
COMMIT;
SELECT name FROM nocrm.tags WHERE lead_id = (SELECT id FROM nocrm.leads WHERE title = 'Sales lead') ORDER BY name;

-- The tag the rule added raised lead.any_update only if something listens:
-- nothing does, so tag_event_trigger was not called above.  With a rule on
-- lead.any_update, tag changes pass their gate.
SELECT nocrm.create_automation(name => 'any update', event => 'lead.any_update',
  conditions => '{"pipeline": "Onboarding"}',
  actions => '[{"type": "comment", "body": "updated"}]') AS any_rule \gset
BEGIN;
INSERT INTO nocrm.tags (lead_id, name) SELECT id, 'Hot' FROM nocrm.leads WHERE title = 'New customer';
SELECT * FROM pg_temp.event_calls();
COMMIT;
SELECT body, user_id FROM nocrm.comments ORDER BY id;
SELECT nocrm.delete_automation(:any_rule);

-- lead.deleted
SELECT nocrm.create_automation(name => 'deleted', event => 'lead.deleted', conditions => '{"status": "lost"}',
  actions => '[{"type": "notify", "user": "anna@example.com", "message": "{{lead.title}} is gone"}]') AS del_rule \gset
BEGIN;
DELETE FROM nocrm.leads WHERE title = 'Bulk 1 (won)';
SELECT * FROM pg_temp.event_calls();
UPDATE nocrm.leads SET status = 'lost' WHERE title = 'Bulk 2 (won)';
DELETE FROM nocrm.leads WHERE title = 'Bulk 2 (won)';
SELECT * FROM pg_temp.event_calls();
COMMIT;
SELECT message FROM nocrm.notifications ORDER BY id;

-- Stage triggers count for the leads of their pipeline only (no rule
-- listens to a title change).
SELECT nocrm.create_stage_trigger('Chiusura', 'status_changed', '{"status": "won"}', pipeline => 'Vendite') AS st \gset
BEGIN;
UPDATE nocrm.leads SET title = 'New customer, renamed' WHERE title = 'New customer';
SELECT * FROM pg_temp.event_calls();
UPDATE nocrm.leads SET title = 'Sales lead, renamed' WHERE title = 'Sales lead';
SELECT * FROM pg_temp.event_calls();
ROLLBACK;
SELECT nocrm.delete_stage_trigger(:st);

-- Everything is wanted when history records every event.
SET nocrm.history = 'all';
BEGIN;
UPDATE nocrm.leads SET description = 'recorded' WHERE title = 'Sales lead';
SELECT * FROM pg_temp.event_calls();
COMMIT;
SELECT event, new_value FROM nocrm.lead_history
 WHERE lead_id = (SELECT id FROM nocrm.leads WHERE title = 'Sales lead') AND event = 'lead.content_has_changed';
-- ... but no rule is judged for a row that history alone wants: both
-- creations are recorded, the Onboarding rule fires for its lead only.
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('History only', 1), ('History and rule', 2);
SELECT l.title, h.event, h.automation_id, h.new_value FROM nocrm.lead_history h JOIN nocrm.leads l ON l.id = h.lead_id
 WHERE l.title IN ('History only', 'History and rule') ORDER BY h.id;
SELECT * FROM pg_temp.event_calls();
SET nocrm.history = actions;

-- ... and nothing when automations are switched off.
SET nocrm.automations_enabled = off;
BEGIN;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('While off', 2);
SELECT * FROM pg_temp.event_calls();
COMMIT;
RESET nocrm.automations_enabled;
SELECT count(*) AS tags_of_while_off FROM nocrm.tags WHERE lead_id = (SELECT id FROM nocrm.leads WHERE title = 'While off');

-- What the gate skips is still checked: a human cannot comment as the
-- Butler, and a bad nocrm.actor is an error, rules or no rules.
INSERT INTO nocrm.comments (lead_id, user_id, body)
  SELECT id, 0, 'I am the Butler' FROM nocrm.leads WHERE title = 'Sales lead';
SET nocrm.actor = 'nobody@example.com';
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('By nobody', 1);
RESET nocrm.actor;

-- The first-step cache follows changes to steps.
INSERT INTO nocrm.steps (pipeline_id, name, position) VALUES (2, 'Welcome', 0);
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Welcomed', 2);
SELECT s.name FROM nocrm.leads l JOIN nocrm.steps s ON s.id = l.step_id WHERE l.title = 'Welcomed';
UPDATE nocrm.leads SET step_id = (SELECT id FROM nocrm.steps WHERE name = 'Kickoff'), pipeline_id = NULL
 WHERE title = 'Welcomed' RETURNING pipeline_id;

-- An agent cannot read the rules, yet the gate loads them (as the owner).
CREATE ROLE regress_gate_agent IN ROLE nocrm_agent;
SELECT nocrm.create_automation(name => 'agent sees', event => 'lead.creation',
  conditions => '{"pipeline": "Onboarding"}',
  actions => '[{"type": "assign", "user": "matteo@example.com"}]') AS agent_rule \gset
SET ROLE regress_gate_agent;
SELECT count(*) FROM nocrm.automations;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('From an agent', 2);
RESET ROLE;
SELECT u.name FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'From an agent';
DROP OWNED BY regress_gate_agent;
DROP ROLE regress_gate_agent;

-- The gate functions are callable, and reject an unknown event.
SELECT nocrm.lead_insert_wanted('todo', NULL, 2, NULL) AS onboarding,
       nocrm.lead_insert_wanted('todo', NULL, 1, NULL) AS vendite,
       nocrm.child_event_wanted('lead.commented') AS commented;
SELECT nocrm.child_event_wanted('lead.exploded');
