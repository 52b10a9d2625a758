-- Restore mode (restore.c): a session with check_function_bodies off, as
-- pg_dump's output and pg_restore set it, by a role that may write the
-- history itself, loads rows as they come.  Nothing is derived, recorded,
-- raised or validated; a row of nocrm.seeded_rows is written over the
-- seeded row.  With the setting back on, everything fires again.
\i test/fixtures/crm.sql
SELECT nocrm.create_automation(name => 'rr', event => 'lead.creation',
  conditions => '{"pipeline": "Vendite"}',
  actions => '[{"type": "assign_round_robin", "users": [1, 2]},
               {"type": "add_tags", "tags": ["Nuovo"]},
               {"type": "comment", "body": "Benvenuto"},
               {"type": "notify", "user": "owner", "message": "Nuovo lead {{lead.title}}"},
               {"type": "add_tags", "tags": ["Dopo"], "delay": "1 hour"}]');
SELECT nocrm.create_automation(name => 'any update', event => 'lead.any_update',
  actions => '[{"type": "notify", "user": 3, "message": "changed"}]');
SELECT nocrm.create_stage_trigger(pipeline => 'Vendite', step => 'Preventivo', kind => 'tag_added',
  params => '{"tag": "Hot"}');
SELECT automation_id, user_id, position, assigned FROM nocrm.assignment_counters ORDER BY 1, 3;

-- Not a restore: check_function_bodies is on.
SELECT nocrm.restoring();
SET check_function_bodies = off;
SELECT nocrm.restoring();

-- Rows as a dump holds them: a Vendite lead without a step (the BEFORE
-- trigger would place it at Nuovo), a won lead without closed_at (it would
-- be stamped), no owner (round robin would assign one).
COPY nocrm.leads (id, title, pipeline_id, step_id, status, user_id, created_at, updated_at, closed_at) FROM stdin;
101	Dal dump 1	1	\N	todo	\N	2030-01-01 10:00:00+00	2030-01-02 10:00:00+00	\N
102	Dal dump 2	1	2	won	1	2030-01-01 11:00:00+00	2030-01-01 11:00:00+00	\N
\.
INSERT INTO nocrm.leads (id, title, pipeline_id, step_id, created_at, updated_at)
VALUES (103, 'Dal dump 3', 1, 1, '2030-01-03 09:00:00+00', '2030-01-03 09:00:00+00');
-- a tag the stage trigger moves on, a comment by the Butler (refused outside automations), an email
COPY nocrm.tags (lead_id, name, created_at) FROM stdin;
101	Hot	2030-01-02 10:00:00+00
\.
INSERT INTO nocrm.comments (id, lead_id, user_id, body) VALUES (50, 101, 0, 'Richiamare il cliente');
INSERT INTO nocrm.emails (id, lead_id, from_address, subject) VALUES (60, 102, 'c@client.example', 'Grazie');
SELECT id, title, pipeline_id, step_id, status, user_id, updated_at, closed_at FROM nocrm.leads ORDER BY id;
SELECT lead_id, name FROM nocrm.tags ORDER BY 1, 2;
SELECT (SELECT count(*) FROM nocrm.lead_history) AS history,
       (SELECT count(*) FROM nocrm.automation_runs) AS runs,
       (SELECT count(*) FROM nocrm.notifications) AS notifications,
       (SELECT count(*) FROM nocrm.queue) AS queue,
       (SELECT count(*) FROM nocrm.comments) AS comments;
SELECT last_value IS NULL AS history_ids_unused FROM pg_sequences WHERE sequencename = 'lead_history_id_seq';

-- Rules and templates as the source accepted them, even if what they name
-- is not loaded yet; a group action's counters come from the dump, not
-- from a sync.
COPY nocrm.automations (id, name, event, conditions, actions) FROM stdin;
20	later pipeline	lead.creation	{"pipeline": "Loaded later"}	[{"type": "assign_round_robin", "users": ["later@example.com"]}]
\.
INSERT INTO nocrm.email_templates (name, subject, body, updated_at)
VALUES ('from_a_newer_version', '{{lead.colour}}', 'x', '2030-01-01 00:00:00+00');
SELECT id, name, created_at = updated_at AS untouched FROM nocrm.automations WHERE id = 20;
SELECT count(*) AS counters_of_20 FROM nocrm.assignment_counters WHERE automation_id = 20;
SELECT name, subject, updated_at FROM nocrm.email_templates WHERE name = 'from_a_newer_version';
-- (deleting them is no restore: done with the setting on, below)

-- Seeded rows: a loaded value is written over the Butler and the
-- notification template; the row is stored once.
INSERT INTO nocrm.seeded_rows (seed, value) VALUES
  ('butler', '{"name": "Alfred", "email": "alfred@example.com", "timezone": "Europe/Rome", "created_at": "2029-05-01T08:00:00.123456"}'),
  ('notification_template', '{"subject": "{{message}}", "body": "{{message}}\n-- \n{{butler.name}}", "updated_at": "2029-06-01T00:00:00"}');
SELECT id, name, email, timezone, is_butler, created_at FROM nocrm.users WHERE is_butler;
SELECT subject, body, updated_at FROM nocrm.email_templates WHERE name = 'notification';
SELECT seed, value = nocrm.seeded_row(seed) AS current FROM nocrm.seeded_rows ORDER BY seed;
-- the same row again changes nothing and stores nothing twice
INSERT INTO nocrm.seeded_rows (seed, value) SELECT seed, value FROM nocrm.seeded_rows WHERE seed = 'butler';
SELECT seed, count(*) FROM nocrm.seeded_rows GROUP BY seed ORDER BY seed;
SELECT (SELECT count(*) FROM nocrm.lead_history) AS history, (SELECT count(*) FROM nocrm.notifications) AS notifications;

-- The setting back on: the restored data is the CRM's, and the next changes fire.
RESET check_function_bodies;
SELECT nocrm.restoring();
DELETE FROM nocrm.automations WHERE id = 20;
DELETE FROM nocrm.email_templates WHERE name = 'from_a_newer_version';
SELECT setval('nocrm.leads_id_seq', 103);
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Dopo il restore', 1);
SELECT l.id, l.step_id, u.name AS owner FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.id = 104;
SELECT lead_id, name FROM nocrm.tags WHERE lead_id = 104;
SELECT event, actor_id, automation_id FROM nocrm.lead_history WHERE lead_id = 104 ORDER BY id;
SELECT user_id, message FROM nocrm.notifications ORDER BY id;
SELECT kind, state, payload ->> 'type' AS action FROM nocrm.queue ORDER BY id;
-- a tag added now moves the lead (the stage trigger was restored, not fired)
INSERT INTO nocrm.tags (lead_id, name) VALUES (103, 'Hot');
SELECT id, step_id FROM nocrm.leads WHERE id = 103;
-- validation is back
INSERT INTO nocrm.email_templates (name, subject, body) VALUES ('bad', '{{lead.colour}}', 'x');
SELECT nocrm.create_automation(name => 'bad', event => 'lead.creation', conditions => '{"pipeline": "Nessuno"}',
  actions => '[{"type": "add_tags", "tags": ["x"]}]');
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (101, 0, 'Sono il Butler');

-- Roles that cannot write the history: the setting changes nothing for
-- them (it is no way around automations or the history).
SET client_min_messages = warning;
DROP ROLE IF EXISTS regress_restore_agent;
RESET client_min_messages;
CREATE ROLE regress_restore_agent IN ROLE nocrm_agent;
SET ROLE regress_restore_agent;
SET check_function_bodies = off;
SELECT nocrm.restoring();
SET nocrm.actor = 'anna@example.com';
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Da un agente', 1);
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (101, 0, 'Sono il Butler');
RESET nocrm.actor;
RESET check_function_bodies;
RESET ROLE;
SELECT u.name AS owner, (SELECT count(*) FROM nocrm.lead_history h WHERE h.lead_id = l.id) > 0 AS history
  FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'Da un agente';
DROP ROLE regress_restore_agent;

-- A superuser who turns the setting off by hand is restoring too: it is
-- the documented opt-in.  SET check_function_bodies = on opts out.
SET check_function_bodies = off;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Import senza automazioni', 1);
SET check_function_bodies = on;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Import con automazioni', 1);
SELECT title, user_id IS NOT NULL AS assigned, step_id FROM nocrm.leads WHERE title LIKE 'Import%' ORDER BY id;

-- The drain is no restore: run in the default setting (as pg_cron runs it),
-- the delayed actions' changes raise their events (the any_update rule
-- notifies user 3 of each added tag).
SELECT lead_id, count(*) AS changed FROM nocrm.notifications WHERE message = 'changed' GROUP BY 1 ORDER BY 1;
UPDATE nocrm.queue SET run_at = now() WHERE state = 'pending';
CALL nocrm.drain(0);
SELECT q.lead_id, q.state, (SELECT count(*) FROM nocrm.tags t WHERE t.lead_id = q.lead_id AND t.name = 'Dopo') AS tagged
  FROM nocrm.queue q ORDER BY q.id;
SELECT lead_id, count(*) AS changed FROM nocrm.notifications WHERE message = 'changed' GROUP BY 1 ORDER BY 1;

-- The seeded rows are kept as they change, for the next dump.
SELECT nocrm.set_butler('Jeeves', 'jeeves@example.com');
SELECT value ->> 'name' AS name, value ->> 'email' AS email, value ->> 'created_at' AS created_at
  FROM nocrm.seeded_rows WHERE seed = 'butler';
UPDATE nocrm.email_templates SET body = 'Nuovo testo {{message}}' WHERE name = 'notification';
SELECT value ->> 'body' AS body FROM nocrm.seeded_rows WHERE seed = 'notification_template';
DELETE FROM nocrm.email_templates WHERE name = 'notification';
SELECT value FROM nocrm.seeded_rows WHERE seed = 'notification_template';
-- a restored NULL deletes it, a restored value brings it back
SELECT nocrm.restore_seeded_row('notification_template',
  '{"subject": "{{message}}", "body": "di nuovo", "updated_at": "2029-07-01T00:00:00"}');
SELECT subject, body, updated_at FROM nocrm.email_templates WHERE name = 'notification';
SELECT nocrm.restore_seeded_row('notification_template', NULL);
SELECT count(*) FROM nocrm.email_templates WHERE name = 'notification';
SELECT nocrm.restore_seeded_row('butler', nocrm.seeded_row('butler'));
SELECT nocrm.restore_seeded_row('someone', '{}');
SELECT seed, value IS NULL AS deleted FROM nocrm.seeded_rows ORDER BY seed;

-- Restored rows before their parents (a parallel restore, restore_order.c):
-- held in nocrm.restore_held, inserted by the load of the last parent; the
-- foreign keys still check them.  A tag and a comment of lead 900, the lead
-- of pipeline 90 and step 91, then the step, then the pipeline.
SET check_function_bodies = off;
INSERT INTO nocrm.tags (lead_id, name) VALUES (900, 'Prima'), (900, 'Dopo il lead');
INSERT INTO nocrm.comments (id, lead_id, user_id, body) OVERRIDING SYSTEM VALUE VALUES (9000, 900, 1, 'Prima del lead');
INSERT INTO nocrm.leads (id, title, pipeline_id, step_id, user_id) OVERRIDING SYSTEM VALUE
  VALUES (900, 'Prima dei genitori', 90, 91, 1);
SELECT tbl, count(*) FROM nocrm.restore_held GROUP BY tbl ORDER BY tbl::text;
INSERT INTO nocrm.steps (id, pipeline_id, name, position) OVERRIDING SYSTEM VALUE VALUES (91, 90, 'Ultimo', 1);
SELECT tbl, count(*) FROM nocrm.restore_held GROUP BY tbl ORDER BY tbl::text;
-- (the load that brings the last parent inserts all, children after parents)
INSERT INTO nocrm.pipelines (id, name) OVERRIDING SYSTEM VALUE VALUES (90, 'Arrivata dopo');
SELECT count(*) AS held FROM nocrm.restore_held;
SELECT l.title, s.name AS step, p.name AS pipeline,
       (SELECT string_agg(t.name, ', ' ORDER BY t.name) FROM nocrm.tags t WHERE t.lead_id = l.id) AS tags,
       (SELECT body FROM nocrm.comments c WHERE c.lead_id = l.id) AS comment,
       (SELECT count(*) FROM nocrm.lead_history h WHERE h.lead_id = l.id) AS history,
       (SELECT count(*) FROM nocrm.queue q WHERE q.lead_id = l.id) AS queued
  FROM nocrm.leads l JOIN nocrm.steps s ON s.id = l.step_id JOIN nocrm.pipelines p ON p.id = l.pipeline_id
 WHERE l.id = 900;
-- a row that refers to nothing is never inserted: held, with a NOTICE
INSERT INTO nocrm.tags (lead_id, name) VALUES (999999, 'Orfano');
SELECT tbl, row LIKE '(999999,Orfano,"%' AS row_as_text FROM nocrm.restore_held;
SELECT nocrm.load_held_rows();
RESET check_function_bodies;
-- outside restore mode the foreign keys refuse at once, and nothing is held
INSERT INTO nocrm.tags (lead_id, name) VALUES (999998, 'Orfano');
SELECT count(*) AS held FROM nocrm.restore_held;
-- load_held_rows() (a superuser: restore mode inside it) still holds it; admins can neither read nor load held rows
SELECT nocrm.load_held_rows();
SET ROLE nocrm_admin;
SELECT count(*) FROM nocrm.restore_held;
SELECT nocrm.load_held_rows();
RESET ROLE;
DELETE FROM nocrm.restore_held;
-- every table of the extension with a foreign key to another holds; every one completes
SELECT c.relname, bool_or(t.tgname = 'nocrm_restore_hold') AS holds, bool_or(t.tgname = 'nocrm_restore_complete') AS completes
  FROM pg_class c LEFT JOIN pg_trigger t ON t.tgrelid = c.oid
 WHERE c.relnamespace = 'nocrm'::regnamespace AND c.relkind = 'r'
 GROUP BY c.oid, c.relname
HAVING coalesce(bool_or(t.tgname = 'nocrm_restore_hold'), false) IS DISTINCT FROM
         EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'f' AND k.confrelid <> c.oid
                    AND (SELECT relnamespace FROM pg_class WHERE oid = k.confrelid) = 'nocrm'::regnamespace)
    OR coalesce(bool_or(t.tgname = 'nocrm_restore_complete'), false) IS DISTINCT FROM (c.relname <> 'restore_loaded');
