-- Rule order (position), stop_processing, once_per_lead and at_most_every.
\i test/fixtures/crm.sql

-- 1. Position, then id: the rule written last runs first when placed first.
SELECT nocrm.create_automation(name => 'First written', event => 'lead.creation',
  actions => '[{"type": "comment", "body": "first written"}]');
SELECT nocrm.create_automation(name => 'Second written', event => 'lead.creation',
  actions => '[{"type": "comment", "body": "second written"}]');
INSERT INTO nocrm.leads (title) VALUES ('Order A');
SELECT body FROM nocrm.comments WHERE lead_id = 1 ORDER BY id;
SELECT nocrm.reorder_automations(ARRAY[2, 1]);
SELECT id, name, position FROM nocrm.automations ORDER BY position, id;
INSERT INTO nocrm.leads (title) VALUES ('Order B');
SELECT body FROM nocrm.comments WHERE lead_id = 2 ORDER BY id;
-- explain lists them in the order they run.
SELECT id, would_fire FROM nocrm.explain(2, 'lead.creation');
-- Equal positions: id order.
SELECT nocrm.set_automation_options(2, "position" => 20);
INSERT INTO nocrm.leads (title) VALUES ('Order C');
SELECT body FROM nocrm.comments WHERE lead_id = 3 ORDER BY id;

-- 2. stop_processing: the rules after it do not run for that event on that lead.
SELECT nocrm.disable_automation(id) FROM nocrm.automations ORDER BY id;
SELECT nocrm.create_automation(name => 'VIP tag, stop', event => 'lead.status.changed.to',
  target => 'won', conditions => '{"pipeline": "Vendite"}',
  actions => '[{"type": "add_tags", "tags": ["vip-won"]}]');
SELECT nocrm.create_automation(name => 'Generic won tag', event => 'lead.status.changed.to',
  target => 'won', actions => '[{"type": "add_tags", "tags": ["won"]}]');
SELECT nocrm.set_automation_options(3, stop_processing => true);
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Vendite lead', 1);
INSERT INTO nocrm.leads (title) VALUES ('No pipeline lead');
UPDATE nocrm.leads SET status = 'won' WHERE id IN (4, 5);
SELECT lead_id, name FROM nocrm.tags WHERE lead_id IN (4, 5) ORDER BY lead_id, name;
-- The stopped rule's run is recorded, with the reason.
SELECT automation_id, lead_id, outcome, detail FROM nocrm.automation_runs
 WHERE lead_id IN (4, 5) ORDER BY id;
SELECT id, would_fire, reason FROM nocrm.explain(4, 'lead.status.changed.to', 'won');
-- A stopper whose conditions fail stops nothing (lead 5 got "won" above); one
-- in test mode stops nothing either.
SELECT nocrm.set_automation_mode(3, 'test');
UPDATE nocrm.leads SET status = 'todo' WHERE id = 4;
DELETE FROM nocrm.tags WHERE lead_id = 4;
UPDATE nocrm.leads SET status = 'won' WHERE id = 4;
SELECT name FROM nocrm.tags WHERE lead_id = 4 ORDER BY name;
SELECT id, would_fire, reason FROM nocrm.explain(4, 'lead.status.changed.to', 'won');

-- 3. once_per_lead: to Preventivo, back, to Preventivo again: one quote email.
SELECT nocrm.disable_automation(id) FROM nocrm.automations ORDER BY id;
SELECT nocrm.create_automation(name => 'Quote once', event => 'lead.step.changed.to',
  target => 'Preventivo', conditions => '{"pipeline": "Vendite"}',
  actions => '[{"type": "send_email", "template": "quote_followup", "to": "client@example.com"}]');
SELECT nocrm.set_automation_options(5, once_per_lead => true);
INSERT INTO nocrm.leads (title, pipeline_id, step_id) VALUES ('Quote lead', 1, 1);
UPDATE nocrm.leads SET step_id = 3 WHERE id = 6;
UPDATE nocrm.leads SET step_id = 2 WHERE id = 6;
SELECT id, would_fire, reason FROM nocrm.explain(6, 'lead.step.changed.to', 'Preventivo');
UPDATE nocrm.leads SET step_id = 3 WHERE id = 6;
SELECT kind, lead_id, automation_id FROM nocrm.queue WHERE lead_id = 6 ORDER BY id;
SELECT automation_id, lead_id, outcome, detail FROM nocrm.automation_runs
 WHERE lead_id = 6 ORDER BY id;
SELECT automation_id, lead_id, runs, first_run_at = last_run_at AS once
  FROM nocrm.automation_enrollments ORDER BY automation_id, lead_id;
-- A firing that rolls back leaves no trace: the next one runs.
INSERT INTO nocrm.leads (title, pipeline_id, step_id) VALUES ('Rolled back', 1, 1);
BEGIN;
UPDATE nocrm.leads SET step_id = 3 WHERE id = 7;
SELECT count(*) AS enrolled_in_txn FROM nocrm.automation_enrollments WHERE lead_id = 7;
ROLLBACK;
SELECT count(*) AS enrolled_after_rollback FROM nocrm.automation_enrollments WHERE lead_id = 7;
UPDATE nocrm.leads SET step_id = 3 WHERE id = 7;
SELECT count(*) AS quote_emails FROM nocrm.queue WHERE lead_id = 7;
-- An admin deletes the enrollment to let it run again.
DELETE FROM nocrm.automation_enrollments WHERE automation_id = 5 AND lead_id = 6;
UPDATE nocrm.leads SET step_id = 2 WHERE id = 6;
UPDATE nocrm.leads SET step_id = 3 WHERE id = 6;
SELECT count(*) AS quote_emails FROM nocrm.queue WHERE lead_id = 6;
-- Test mode checks the enrollment but records none.
SELECT nocrm.set_automation_mode(5, 'test');
INSERT INTO nocrm.leads (title, pipeline_id, step_id) VALUES ('Test mode lead', 1, 3);
UPDATE nocrm.leads SET step_id = 2 WHERE id = 8;
UPDATE nocrm.leads SET step_id = 3 WHERE id = 8;
UPDATE nocrm.leads SET step_id = 2 WHERE id = 6;
UPDATE nocrm.leads SET step_id = 3 WHERE id = 6;
SELECT lead_id, outcome, detail FROM nocrm.automation_runs WHERE lead_id IN (6, 8) AND automation_id = 5
 ORDER BY id;
SELECT count(*) AS enrolled_lead_8 FROM nocrm.automation_enrollments WHERE lead_id = 8;
-- Deleting the lead deletes its enrollments; a lead.deleted rule once per lead runs.
SELECT nocrm.create_automation(name => 'Deleted once', event => 'lead.deleted',
  actions => '[{"type": "notify", "user": 1, "message": "gone"}]');
SELECT nocrm.set_automation_options(6, once_per_lead => true);
DELETE FROM nocrm.leads WHERE id = 6;
SELECT count(*) AS enrollments_of_lead_6 FROM nocrm.automation_enrollments WHERE lead_id = 6;
SELECT message FROM nocrm.notifications WHERE lead_id = 6;

-- 4. at_most_every: again only after the interval.
SELECT nocrm.disable_automation(id) FROM nocrm.automations ORDER BY id;
SELECT nocrm.create_automation(name => 'Nudge', event => 'lead.commented',
  actions => '[{"type": "notify", "user": "owner", "message": "New comment on {{lead.title}}"}]');
SELECT nocrm.set_automation_options(7, at_most_every => '1 hour');
INSERT INTO nocrm.leads (title, user_id) VALUES ('Chatty', 2);
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (9, 2, 'one');
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (9, 2, 'two');
SELECT count(*) AS nudges FROM nocrm.notifications WHERE lead_id = 9;
SELECT outcome, detail FROM nocrm.automation_runs WHERE lead_id = 9 ORDER BY id;
UPDATE nocrm.automation_enrollments SET last_run_at = last_run_at - interval '61 minutes'
 WHERE automation_id = 7;
SELECT id, would_fire, reason FROM nocrm.explain(9, 'lead.commented');
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (9, 2, 'three');
SELECT count(*) AS nudges FROM nocrm.notifications WHERE lead_id = 9;
SELECT runs, last_run_at > first_run_at AS later FROM nocrm.automation_enrollments WHERE automation_id = 7;

-- 5. An earlier creation rule that stops processing: the assigning rule after it
-- does not run, and no owner is set before the row is written.
SELECT nocrm.disable_automation(id) FROM nocrm.automations ORDER BY id;
SELECT nocrm.create_automation(name => 'Imports stop here', event => 'lead.creation',
  conditions => '{"status": "standby"}', actions => '[{"type": "comment", "body": "imported"}]');
SELECT nocrm.set_automation_options(8, stop_processing => true);
SELECT nocrm.create_automation(name => 'Assign Anna', event => 'lead.creation',
  actions => '[{"type": "assign", "user": 1}]');
INSERT INTO nocrm.leads (title, status) VALUES ('Imported', 'standby'), ('Fresh', 'todo');
SELECT title, user_id FROM nocrm.leads WHERE title IN ('Imported', 'Fresh') ORDER BY id;
SELECT l.title, h.event, h.automation_id FROM nocrm.lead_history h JOIN nocrm.leads l ON l.id = h.lead_id
 WHERE l.title IN ('Imported', 'Fresh') AND h.event LIKE 'action.%' ORDER BY h.id;

-- 6. Bad options are refused and change nothing.
\set SHOW_CONTEXT never
SELECT nocrm.set_automation_options(7, once_per_lead => true);
SELECT nocrm.set_automation_options(7, at_most_every => '-1 hour');
SELECT nocrm.set_automation_options(7, at_most_every => '0');
UPDATE nocrm.automations SET once_per_lead = true, at_most_every = '1 day' WHERE id = 1;
SELECT nocrm.set_automation_options(99, "position" => 1);
SELECT nocrm.reorder_automations(ARRAY[1, 1]);
SELECT nocrm.reorder_automations(ARRAY[1, 99]);
SELECT nocrm.reorder_automations('{}');
\set SHOW_CONTEXT errors
SELECT id, position, stop_processing, once_per_lead, at_most_every FROM nocrm.automations ORDER BY id;
-- Clearing at_most_every.
SELECT nocrm.set_automation_options(7, clear_at_most_every => true, once_per_lead => true);
SELECT once_per_lead, at_most_every FROM nocrm.automations WHERE id = 7;

-- 7. on_creation: a lead created at a step (an import) "gets" there.
SELECT nocrm.disable_automation(id) FROM nocrm.automations ORDER BY id;
SELECT nocrm.create_automation(name => 'Quote, imports too', event => 'lead.step.changed.to',
  target => 'Preventivo', actions => '[{"type": "add_tags", "tags": ["quote"]}]');
SELECT nocrm.set_automation_options(10, on_creation => true, once_per_lead => true);
SELECT nocrm.create_automation(name => 'Moves only', event => 'lead.step.changed.to',
  target => 'Preventivo', actions => '[{"type": "add_tags", "tags": ["moved"]}]');
SELECT nocrm.create_automation(name => 'Won on arrival', event => 'lead.status.changed.to',
  target => 'won', actions => '[{"type": "comment", "body": "born won"}]');
SELECT nocrm.set_automation_options(12, on_creation => true);
SET nocrm.history = actions;   -- the gate decides which inserts are looked at
INSERT INTO nocrm.leads (title, pipeline_id, step_id) VALUES ('Imported at Preventivo', 1, 3);
INSERT INTO nocrm.leads (title, pipeline_id, step_id) VALUES ('Imported at Nuovo', 1, 1);
INSERT INTO nocrm.leads (title, status) VALUES ('Imported as won', 'won');
SELECT l.title, t.name FROM nocrm.tags t JOIN nocrm.leads l ON l.id = t.lead_id
 WHERE l.title LIKE 'Imported %' ORDER BY l.id, t.name;
SELECT l.title, c.body FROM nocrm.comments c JOIN nocrm.leads l ON l.id = c.lead_id
 WHERE l.title LIKE 'Imported %' ORDER BY c.id;
-- Moved away and back: the rule for moves runs, the once-per-lead one not again.
UPDATE nocrm.leads SET step_id = 2 WHERE title = 'Imported at Preventivo';
UPDATE nocrm.leads SET step_id = 3 WHERE title = 'Imported at Preventivo';
SELECT t.name FROM nocrm.tags t JOIN nocrm.leads l ON l.id = t.lead_id
 WHERE l.title = 'Imported at Preventivo' ORDER BY t.name;
RESET nocrm.history;
-- With history = all the creation's step event is in the history, from nothing.
INSERT INTO nocrm.leads (title, pipeline_id, step_id) VALUES ('Second import', 1, 3);
SELECT h.event, h.old_value, h.new_value FROM nocrm.lead_history h JOIN nocrm.leads l ON l.id = h.lead_id
 WHERE l.title = 'Second import' AND h.event LIKE 'lead.%' ORDER BY h.id;
-- Only for *.changed.to events.
\set SHOW_CONTEXT never
SELECT nocrm.set_automation_options(9, on_creation => true);
\set SHOW_CONTEXT errors
