-- set_field: any column of the lead, to a constant, now() + interval, a
-- computed value, or cleared; typed when the rule is written.
\i test/fixtures/crm.sql
ALTER TABLE nocrm.leads ADD COLUMN commission numeric(10, 2), ADD COLUMN source text;

SELECT nocrm.create_automation(name => 'Plan the call', event => 'lead.creation',
  actions => '[{"type": "set_field", "field": "next_action_at", "value": {"now": "2 days"}},
               {"type": "set_field", "field": "probability", "value": 20},
               {"type": "set_field", "field": "source", "value": "web"}]');
SELECT nocrm.create_automation(name => 'Commission', event => 'lead.status.changed.to', target => 'won',
  actions => '[{"type": "set_field", "field": "commission", "value": {"field": "amount", "times": 0.1}},
               {"type": "set_field", "field": "next_action_at", "value": null},
               {"type": "set_field", "field": "probability", "value": 100}]');
INSERT INTO nocrm.leads (title, amount) VALUES ('Deal', 1234.5);
SELECT round(extract(epoch FROM next_action_at - now()) / 86400) AS days_ahead, probability, source
  FROM nocrm.leads WHERE title = 'Deal';
UPDATE nocrm.leads SET status = 'won' WHERE title = 'Deal';
SELECT next_action_at, probability, commission FROM nocrm.leads WHERE title = 'Deal';
-- History: each change with its old and new value, as the Butler; the
-- change raised the usual events.
SELECT event, actor_id, automation_id,
       regexp_replace(old_value::text, '"\d{4}-[^"]*"', '"(time)"') AS old_value,
       regexp_replace(new_value::text, '"\d{4}-[^"]*"', '"(time)"') AS new_value
  FROM nocrm.lead_history WHERE lead_id = 1 AND (event LIKE 'action.%' OR event = 'lead.content_has_changed')
 ORDER BY id;
-- An unchanged value writes nothing.
UPDATE nocrm.leads SET status = 'todo' WHERE title = 'Deal';
UPDATE nocrm.leads SET status = 'won' WHERE title = 'Deal';
SELECT detail FROM nocrm.lead_history WHERE lead_id = 1 AND event = 'action.set_field' ORDER BY id DESC LIMIT 3;

-- Chained: a set_field raises lead.content_has_changed for other rules.
SELECT nocrm.create_automation(name => 'On commission', event => 'lead.content_has_changed',
  conditions => '{"field": "commission", "op": "changed"}',
  actions => '[{"type": "comment", "body": "commission set"}]');
INSERT INTO nocrm.leads (title, amount) VALUES ('Deal 2', 100);
UPDATE nocrm.leads SET status = 'won' WHERE title = 'Deal 2';
SELECT body FROM nocrm.comments c JOIN nocrm.leads l ON l.id = c.lead_id WHERE l.title = 'Deal 2';

-- Test mode and explain describe it.
SELECT nocrm.describe_actions(1, (SELECT actions FROM nocrm.automations WHERE id = 2), 1, 'lead.status.changed.to');

-- Delayed: it runs as it was queued.
SELECT nocrm.create_automation(name => 'Later', event => 'lead.creation',
  conditions => '{"field": "title", "op": "=", "value": "Later"}',
  actions => '[{"type": "set_field", "field": "source", "value": "delayed", "delay": "1 second"}]');
INSERT INTO nocrm.leads (title) VALUES ('Later');
UPDATE nocrm.queue SET run_at = now() WHERE kind = 'action';
CALL nocrm.drain(0);
SELECT q.state, q.last_error FROM nocrm.queue q JOIN nocrm.leads l ON l.id = q.lead_id WHERE l.title = 'Later';
SELECT r.automation_id, r.outcome, r.detail FROM nocrm.automation_runs r JOIN nocrm.leads l ON l.id = r.lead_id WHERE l.title = 'Later' ORDER BY r.id;
SELECT id, would_fire, reason FROM nocrm.explain((SELECT id FROM nocrm.leads WHERE title = 'Later'), 'lead.creation');
SELECT source FROM nocrm.leads WHERE title = 'Later';

-- Refused when written.
\set SHOW_CONTEXT never
SELECT nocrm.check_automation('x', 'lead.creation', NULL, '{}', '[{"type": "set_field", "field": "nope", "value": 1}]');
SELECT nocrm.check_automation('x', 'lead.creation', NULL, '{}', '[{"type": "set_field", "field": "status", "value": "won"}]');
SELECT nocrm.check_automation('x', 'lead.creation', NULL, '{}', '[{"type": "set_field", "field": "updated_at", "value": {"now": "0 days"}}]');
SELECT nocrm.check_automation('x', 'lead.creation', NULL, '{}', '[{"type": "set_field", "field": "probability", "value": "high"}]');
SELECT nocrm.check_automation('x', 'lead.creation', NULL, '{}', '[{"type": "set_field", "field": "title", "value": null}]');
SELECT nocrm.check_automation('x', 'lead.creation', NULL, '{}', '[{"type": "set_field", "field": "probability", "value": {"now": "1 day"}}]');
SELECT nocrm.check_automation('x', 'lead.creation', NULL, '{}', '[{"type": "set_field", "field": "probability", "value": {"field": "title", "times": 2}}]');
SELECT nocrm.check_automation('x', 'lead.creation', NULL, '{}', '[{"type": "set_field", "field": "commission", "value": {"field": "amount", "plus": 1, "times": 2}}]');
SELECT nocrm.check_automation('x', 'lead.creation', NULL, '{}', '[{"type": "set_field", "field": "source"}]');
SELECT nocrm.check_automation('x', 'lead.deleted', NULL, '{}', '[{"type": "set_field", "field": "source", "value": "x"}]');
\set SHOW_CONTEXT errors
-- A value the column refuses when it runs (a CHECK): the write fails, as an UPDATE would.
SELECT nocrm.create_automation(name => 'Too likely', event => 'lead.creation',
  conditions => '{"field": "title", "op": "=", "value": "Over"}',
  actions => '[{"type": "set_field", "field": "probability", "value": 150}]');
\set VERBOSITY terse
INSERT INTO nocrm.leads (title) VALUES ('Over');
\set VERBOSITY default
SELECT count(*) AS over_leads FROM nocrm.leads WHERE title = 'Over';

-- A column set_field writes cannot be dropped while the rule exists.
\set SHOW_CONTEXT never
ALTER TABLE nocrm.leads DROP COLUMN commission;
\set SHOW_CONTEXT errors
