-- Stage triggers: a trigger placed on a step moves a lead of that pipeline to
-- the step when its condition happens.  Every kind firing and not firing, the
-- backward rule, skipped steps, which trigger wins, composition with
-- automations (chains, loop protection, depth), nocrm.fire_trigger, the
-- management functions and the board, validation, and the off switch.
\i test/fixtures/crm.sql
\set VERBOSITY default
\set SHOW_CONTEXT never

-- Where each lead is.
CREATE TEMP VIEW places AS
SELECT l.id, l.title, p.name AS pipeline, s.name AS step, l.status
  FROM nocrm.leads l
  LEFT JOIN nocrm.pipelines p ON p.id = l.pipeline_id
  LEFT JOIN nocrm.steps s ON s.id = l.step_id
 ORDER BY l.id;

-- History without the catch-all lead.any_update / lead.content_has_changed rows.
CREATE TEMP VIEW hist AS
SELECT lead_id AS lead, event, actor_id AS actor, automation_id AS auto,
       stage_trigger_id AS trig, chain_depth AS depth, old_value, new_value, detail
  FROM nocrm.lead_history
 WHERE event NOT IN ('lead.any_update', 'lead.content_has_changed')
 ORDER BY id;

\i test/fixtures/try_sql.sql

------------------------------------------------------------------------
-- 1. owner_changed: a change of owner on UPDATE, not the owner at creation.
------------------------------------------------------------------------
SELECT nocrm.create_stage_trigger('Qualificato', 'owner_changed', pipeline => 'Vendite',
                                  name => 'Owner set');
-- Created with an owner: lead.assigned is raised, but the trigger does not fire.
INSERT INTO nocrm.leads (title, pipeline_id, user_id) VALUES ('Owner', 1, 1);
-- Created without an owner, in no pipeline: nothing to move.
INSERT INTO nocrm.leads (title, user_id) VALUES ('Nowhere', 2);
SELECT * FROM places;
SELECT * FROM hist;
TRUNCATE nocrm.lead_history;
-- A change of owner moves the lead; the Butler does it, as stage trigger 1, at depth 1.
UPDATE nocrm.leads SET user_id = 2 WHERE title = 'Owner';
-- A lead with no pipeline is never moved.
UPDATE nocrm.leads SET user_id = 3 WHERE title = 'Nowhere';
SELECT * FROM places;
SELECT lead_id AS lead, event, actor_id AS actor, automation_id AS auto,
       stage_trigger_id AS trig, chain_depth AS depth, old_value, new_value, detail
  FROM nocrm.lead_history ORDER BY id;
-- Taking the owner away is a change of owner too.
INSERT INTO nocrm.leads (title, pipeline_id, user_id) VALUES ('Owner gone', 1, 1);
UPDATE nocrm.leads SET user_id = NULL WHERE title = 'Owner gone';
SELECT * FROM places WHERE title = 'Owner gone';
DELETE FROM nocrm.stage_triggers;
DELETE FROM nocrm.leads;
TRUNCATE nocrm.lead_history;

------------------------------------------------------------------------
-- 2. field_changed: a change of a lead column (the watched one, or any),
--    never the lead's place in its pipeline.
------------------------------------------------------------------------
SELECT nocrm.create_stage_trigger('Preventivo', 'field_changed', '{"field": "amount"}',
                                  pipeline => 'Vendite');
SELECT nocrm.create_stage_trigger('Qualificato', 'field_changed', pipeline => 'Vendite');
INSERT INTO nocrm.leads (id, title, pipeline_id) OVERRIDING SYSTEM VALUE VALUES
  (10, 'Amount', 1), (11, 'Anything', 1), (12, 'Jump', 1), (13, 'Elsewhere', 2);
-- A field that is not watched: only the any-field trigger (Qualificato) fires.
UPDATE nocrm.leads SET title = 'Amount!' WHERE id = 10;
SELECT * FROM places WHERE id = 10;
-- The watched field: forward to Preventivo.
UPDATE nocrm.leads SET amount = 1000 WHERE id = 10;
SELECT * FROM places WHERE id = 10;
-- Both match an amount change: the furthest step (Preventivo) wins.
UPDATE nocrm.leads SET amount = 50, probability = 20 WHERE id = 11;
SELECT * FROM places WHERE id = 11;
-- Skipped steps: a move by hand from Nuovo to Chiusura changes only the lead's
-- place, so neither field_changed trigger (Qualificato, Preventivo) fires.
UPDATE nocrm.leads SET step_id = 4 WHERE id = 12;
SELECT * FROM places WHERE id = 12;
-- A lead of another pipeline: the Vendite triggers do nothing.
UPDATE nocrm.leads SET amount = 5, title = 'Elsewhere!' WHERE id = 13;
SELECT * FROM places WHERE id = 13;
SELECT * FROM hist;
DELETE FROM nocrm.stage_triggers;
TRUNCATE nocrm.lead_history;

------------------------------------------------------------------------
-- 3. status_changed, with and without a status.
------------------------------------------------------------------------
SELECT nocrm.create_stage_trigger('Chiusura', 'status_changed', '{"status": "won"}',
                                  pipeline => 'Vendite');
INSERT INTO nocrm.leads (id, title, pipeline_id) OVERRIDING SYSTEM VALUE VALUES (20, 'Status', 1);
-- Another status: nothing.
UPDATE nocrm.leads SET status = 'standby' WHERE id = 20;
SELECT * FROM places WHERE id = 20;
-- won: to Chiusura.
UPDATE nocrm.leads SET status = 'won' WHERE id = 20;
SELECT * FROM places WHERE id = 20;
SELECT * FROM hist;
DELETE FROM nocrm.stage_triggers;
TRUNCATE nocrm.lead_history;

------------------------------------------------------------------------
-- 4. tag_added, with and without a tag.
------------------------------------------------------------------------
SELECT nocrm.create_stage_trigger('Preventivo', 'tag_added', '{"tag": "B2B"}',
                                  pipeline => 'Vendite');
INSERT INTO nocrm.leads (id, title, pipeline_id) OVERRIDING SYSTEM VALUE VALUES
  (30, 'Tagged', 1), (31, 'Untagged', 1);
-- Another tag: nothing.
INSERT INTO nocrm.tags (lead_id, name) VALUES (30, 'B2C');
SELECT * FROM places WHERE id = 30;
-- Tags compare exactly.
INSERT INTO nocrm.tags (lead_id, name) VALUES (30, 'b2b');
SELECT * FROM places WHERE id = 30;
-- The tag: to Preventivo.
INSERT INTO nocrm.tags (lead_id, name) VALUES (30, 'B2B');
SELECT * FROM places WHERE id = 30;
-- Removing the tag is not adding it.
SET nocrm.automations_enabled = off;
INSERT INTO nocrm.tags (lead_id, name) VALUES (31, 'B2B');
RESET nocrm.automations_enabled;
DELETE FROM nocrm.tags WHERE lead_id = 31;
SELECT * FROM places WHERE id = 31;
-- Renaming a tag to B2B adds it.
INSERT INTO nocrm.tags (lead_id, name) VALUES (31, 'B2X');
UPDATE nocrm.tags SET name = 'B2B' WHERE lead_id = 31 AND name = 'B2X';
SELECT * FROM places WHERE id = 31;
SELECT * FROM hist;
DELETE FROM nocrm.stage_triggers;
TRUNCATE nocrm.lead_history;

------------------------------------------------------------------------
-- 5. comment_added and email_received, only for leads of the pipeline.
------------------------------------------------------------------------
SELECT nocrm.create_stage_trigger('Qualificato', 'comment_added', pipeline => 'Vendite');
SELECT nocrm.create_stage_trigger('Preventivo', 'email_received', pipeline => 'Vendite');
INSERT INTO nocrm.leads (id, title, pipeline_id) OVERRIDING SYSTEM VALUE VALUES
  (40, 'Talk', 1), (41, 'Onboard talk', 2);
INSERT INTO nocrm.leads (id, title) OVERRIDING SYSTEM VALUE VALUES (42, 'No pipeline talk');
-- Another pipeline, or none: nothing.
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (41, 1, 'hello'), (42, 1, 'hello');
INSERT INTO nocrm.emails (lead_id, from_address, subject) VALUES (41, 'x@example.com', 'hi'),
                                                                  (42, 'x@example.com', 'hi');
SELECT * FROM places WHERE id IN (41, 42);
-- A comment: to Qualificato; an email: to Preventivo.
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (40, 1, 'called them');
SELECT * FROM places WHERE id = 40;
INSERT INTO nocrm.emails (lead_id, from_address, subject) VALUES (40, 'x@example.com', 'quote?');
SELECT * FROM places WHERE id = 40;
SELECT * FROM hist;
TRUNCATE nocrm.lead_history;

------------------------------------------------------------------------
-- 6. The backward rule.
------------------------------------------------------------------------
-- Lead 40 is at Preventivo; the comment trigger is on Qualificato, behind it:
-- not moved, and the skip is logged.
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (40, 1, 'again');
SELECT * FROM places WHERE id = 40;
SELECT * FROM hist;
TRUNCATE nocrm.lead_history;
-- With allow_backward it moves back.
UPDATE nocrm.stage_triggers SET allow_backward = true WHERE kind = 'comment_added';
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (40, 1, 'and again');
SELECT * FROM places WHERE id = 40;
SELECT * FROM hist;
TRUNCATE nocrm.lead_history;
-- Already at the step: not moved, nothing logged.
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (40, 1, 'once more');
SELECT * FROM places WHERE id = 40;
SELECT * FROM hist;
DELETE FROM nocrm.stage_triggers;
TRUNCATE nocrm.lead_history;

------------------------------------------------------------------------
-- 7. Several triggers match one change.
------------------------------------------------------------------------
-- On different steps: the furthest wins, though its id is higher; only the
-- winner is logged.
SELECT nocrm.create_stage_trigger('Qualificato', 'tag_added', '{"tag": "hot"}', pipeline => 'Vendite',
                                  name => 'hot -> Qualificato');
SELECT nocrm.create_stage_trigger('Preventivo', 'tag_added', pipeline => 'Vendite',
                                  name => 'any tag -> Preventivo');
INSERT INTO nocrm.leads (id, title, pipeline_id) OVERRIDING SYSTEM VALUE VALUES (50, 'Hot', 1);
INSERT INTO nocrm.tags (lead_id, name) VALUES (50, 'hot');
SELECT * FROM places WHERE id = 50;
SELECT * FROM hist;
DELETE FROM nocrm.stage_triggers;
TRUNCATE nocrm.lead_history;
-- On the same step: the lowest id wins, whatever the order of creation.
INSERT INTO nocrm.stage_triggers (id, step_id, kind, name) VALUES (90, 4, 'status_changed', 'ninety');
INSERT INTO nocrm.stage_triggers (id, step_id, kind, params, name)
VALUES (80, 4, 'status_changed', '{"status": "lost"}', 'eighty');
INSERT INTO nocrm.leads (id, title, pipeline_id) OVERRIDING SYSTEM VALUE VALUES (51, 'Lost', 1);
UPDATE nocrm.leads SET status = 'lost' WHERE id = 51;
SELECT * FROM places WHERE id = 51;
SELECT * FROM hist;
DELETE FROM nocrm.stage_triggers;
TRUNCATE nocrm.lead_history;

------------------------------------------------------------------------
-- 8. Composition with automations.
------------------------------------------------------------------------
-- a. A trigger's move is a step change like any: the automation on
--    lead.step.changed.to Preventivo runs after the trigger moved the lead there.
SELECT nocrm.create_stage_trigger('Preventivo', 'email_received', pipeline => 'Vendite');
SELECT nocrm.create_automation(name => 'Quote follow-up', event => 'lead.step.changed.to',
  target => 'Preventivo', conditions => '{"pipeline": "Vendite"}',
  actions => '[{"type": "add_tags", "tags": ["Preventivo Inviato"]}]');
INSERT INTO nocrm.leads (id, title, pipeline_id) OVERRIDING SYSTEM VALUE VALUES (60, 'Quote', 1);
INSERT INTO nocrm.emails (lead_id, from_address, subject) VALUES (60, 'x@example.com', 'send a quote');
SELECT * FROM places WHERE id = 60;
SELECT name FROM nocrm.tags WHERE lead_id = 60 ORDER BY name;
SELECT * FROM hist;
DELETE FROM nocrm.stage_triggers;
DELETE FROM nocrm.automations;
TRUNCATE nocrm.lead_history;

-- b. An automation adds the tag a tag_added trigger watches: the trigger
--    moves the lead, inside the automation's chain.
SELECT nocrm.create_automation(name => 'Won gets a tag', event => 'lead.status.changed.to',
  target => 'won', actions => '[{"type": "add_tags", "tags": ["vinto"]}]');
SELECT nocrm.create_stage_trigger('Chiusura', 'tag_added', '{"tag": "vinto"}', pipeline => 'Vendite');
INSERT INTO nocrm.leads (id, title, pipeline_id) OVERRIDING SYSTEM VALUE VALUES (61, 'Won', 1);
UPDATE nocrm.leads SET status = 'won' WHERE id = 61;
SELECT * FROM places WHERE id = 61;
SELECT lead_id AS lead, event, actor_id AS actor, automation_id AS auto,
       stage_trigger_id AS trig, chain_depth AS depth, old_value, new_value, detail
  FROM nocrm.lead_history WHERE event <> 'lead.content_has_changed' ORDER BY id;
DELETE FROM nocrm.stage_triggers;
DELETE FROM nocrm.automations;
TRUNCATE nocrm.lead_history;

-- c. Triggers run after the event's automations, on the lead as it is then:
--    an automation moves the commented lead to Chiusura, so the comment
--    trigger on Preventivo is behind it and skipped.
SELECT nocrm.create_automation(name => 'Comment closes', event => 'lead.commented',
  actions => '[{"type": "set_step", "step": "Chiusura"}]', conditions => '{"pipeline": "Vendite"}');
SELECT nocrm.create_stage_trigger('Preventivo', 'comment_added', pipeline => 'Vendite');
INSERT INTO nocrm.leads (id, title, pipeline_id) OVERRIDING SYSTEM VALUE VALUES (62, 'Commented', 1);
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (62, 1, 'close it');
SELECT * FROM places WHERE id = 62;
SELECT * FROM hist;
DELETE FROM nocrm.stage_triggers;
DELETE FROM nocrm.automations;
TRUNCATE nocrm.lead_history;

-- d. Loop protection: the trigger moves the lead to Preventivo, an automation
--    sends it back to Qualificato and adds a tag; the trigger matches again
--    but is in the chain already: skipped and logged.
SELECT nocrm.create_stage_trigger('Preventivo', 'tag_added', pipeline => 'Vendite', name => 'any tag');
SELECT nocrm.create_automation(name => 'Bounce back', event => 'lead.step.changed.to',
  target => 'Preventivo', conditions => '{"pipeline": "Vendite"}',
  actions => '[{"type": "set_step", "step": "Qualificato"}, {"type": "add_tags", "tags": ["again"]}]');
INSERT INTO nocrm.leads (id, title, pipeline_id) OVERRIDING SYSTEM VALUE VALUES (63, 'Loop', 1);
INSERT INTO nocrm.tags (lead_id, name) VALUES (63, 'go');
SELECT * FROM places WHERE id = 63;
SELECT * FROM hist;
TRUNCATE nocrm.lead_history;

-- e. nocrm.max_chain_depth counts triggers.  At depth 1 the trigger still
--    moves on a person's change, but the automation it would set off is stopped.
SET nocrm.max_chain_depth = 1;
INSERT INTO nocrm.leads (id, title, pipeline_id) OVERRIDING SYSTEM VALUE VALUES (64, 'Shallow', 1);
INSERT INTO nocrm.tags (lead_id, name) VALUES (64, 'go');
SELECT * FROM places WHERE id = 64;
SELECT * FROM hist;
TRUNCATE nocrm.lead_history;
-- A trigger set off by an automation at the limit is skipped and logged.
SELECT nocrm.create_automation(name => 'Comment tags', event => 'lead.commented',
  actions => '[{"type": "add_tags", "tags": ["commented"]}]');
INSERT INTO nocrm.leads (id, title, pipeline_id) OVERRIDING SYSTEM VALUE VALUES (65, 'Deep', 1);
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (65, 1, 'tag me');
SELECT * FROM places WHERE id = 65;
SELECT * FROM hist;
RESET nocrm.max_chain_depth;
DELETE FROM nocrm.stage_triggers;
DELETE FROM nocrm.automations;
TRUNCATE nocrm.lead_history;

------------------------------------------------------------------------
-- 9. custom triggers and nocrm.fire_trigger.
------------------------------------------------------------------------
SELECT nocrm.create_stage_trigger('Chiusura', 'custom', '{"code": "invoice_paid"}',
                                  pipeline => 'Vendite', name => 'Paid');
INSERT INTO nocrm.leads (id, title, pipeline_id) OVERRIDING SYSTEM VALUE VALUES
  (70, 'Invoice', 1), (71, 'Onboarding invoice', 2);
-- A known code moves the lead.
SELECT nocrm.fire_trigger(70, 'invoice_paid');
SELECT * FROM places WHERE id = 70;
SELECT * FROM hist;
TRUNCATE nocrm.lead_history;
-- Already there: false.
SELECT nocrm.fire_trigger(70, 'invoice_paid');
-- An unknown code, or a code of another pipeline's trigger: false (the call is logged).
SELECT nocrm.fire_trigger(70, 'invoice_sent');
SELECT nocrm.fire_trigger(71, 'invoice_paid');
SELECT * FROM places WHERE id IN (70, 71);
SELECT * FROM hist;
TRUNCATE nocrm.lead_history;
-- An unknown lead, and NULL arguments, are errors.
SELECT code AS sqlstate, message FROM pg_temp.try_sql($$ SELECT nocrm.fire_trigger(999, 'invoice_paid') $$);
SELECT code AS sqlstate, message FROM pg_temp.try_sql($$ SELECT nocrm.fire_trigger(NULL, 'invoice_paid') $$);
SELECT code AS sqlstate, message FROM pg_temp.try_sql($$ SELECT nocrm.fire_trigger(70, NULL) $$);
DELETE FROM nocrm.stage_triggers;

------------------------------------------------------------------------
-- 10. Management: copy, move, disable/enable, delete, the board.
------------------------------------------------------------------------
SELECT nocrm.create_stage_trigger('Qualificato', 'custom', '{"code": "promote"}',
                                  pipeline => 'Vendite', name => 'Promote');
SELECT nocrm.create_stage_trigger('Kickoff', 'comment_added', allow_backward => true,
                                  name => 'Talk resets', enabled => false);
-- Copy to the other pipeline's Preventivo.
SELECT nocrm.copy_stage_trigger(id, 'Preventivo', 'Onboarding') FROM nocrm.stage_triggers
 WHERE name = 'Promote';
SELECT * FROM nocrm.stage_trigger_board;
INSERT INTO nocrm.leads (id, title, pipeline_id) OVERRIDING SYSTEM VALUE VALUES
  (80, 'Sales', 1), (81, 'Onboard', 2), (82, 'Onboard 2', 2);
-- The copy works there, the original still works here.
SELECT nocrm.fire_trigger(81, 'promote') AS onboarding, nocrm.fire_trigger(80, 'promote') AS vendite;
SELECT * FROM places WHERE id IN (80, 81);
-- Move the original to Chiusura: the lead at Qualificato goes on to Chiusura.
SELECT nocrm.move_stage_trigger(id, 'Chiusura', 'Vendite') FROM nocrm.stage_triggers
 WHERE name = 'Promote' AND step_id = 2;
SELECT nocrm.fire_trigger(80, 'promote');
SELECT * FROM places WHERE id = 80;
-- Disable the copy: nothing; enable it: it moves.
SELECT nocrm.set_stage_trigger_enabled(id, false) FROM nocrm.stage_triggers WHERE step_id = 6;
SELECT nocrm.fire_trigger(82, 'promote');
SELECT nocrm.set_stage_trigger_enabled(id, true) FROM nocrm.stage_triggers WHERE step_id = 6;
SELECT nocrm.fire_trigger(82, 'promote');
-- Enable the disabled comment trigger: a comment sends 82 back to Kickoff.
SELECT nocrm.set_stage_trigger_enabled(id, true) FROM nocrm.stage_triggers WHERE name = 'Talk resets';
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (82, 1, 'start over');
SELECT * FROM places WHERE id IN (81, 82);
SELECT * FROM nocrm.stage_trigger_board;
-- Delete the copy: the Onboarding lead no longer moves.
SELECT nocrm.delete_stage_trigger(id) FROM nocrm.stage_triggers WHERE step_id = 6;
SELECT nocrm.fire_trigger(82, 'promote');
SELECT * FROM nocrm.stage_trigger_board;
-- History names each trigger that fired.
SELECT * FROM hist WHERE event LIKE 'trigger.%' OR event = 'custom_trigger';
TRUNCATE nocrm.lead_history;
-- Each function on a missing id: P0002.
SELECT code AS sqlstate, message FROM pg_temp.try_sql($$ SELECT nocrm.delete_stage_trigger(999) $$);
SELECT code AS sqlstate, message FROM pg_temp.try_sql($$ SELECT nocrm.set_stage_trigger_enabled(999, true) $$);
SELECT code AS sqlstate, message FROM pg_temp.try_sql($$ SELECT nocrm.copy_stage_trigger(999, 'Nuovo', 'Vendite') $$);
SELECT code AS sqlstate, message FROM pg_temp.try_sql($$ SELECT nocrm.move_stage_trigger(999, 'Nuovo', 'Vendite') $$);
-- Copy and move resolve the step like create does.
SELECT code AS sqlstate, message, hint FROM pg_temp.try_sql(format(
  'SELECT nocrm.copy_stage_trigger(%s, %L)', (SELECT id FROM nocrm.stage_triggers WHERE name = 'Promote'), 'Preventivo'));
SELECT code AS sqlstate, message, hint FROM pg_temp.try_sql(format(
  'SELECT nocrm.move_stage_trigger(%s, %L, %L)', (SELECT id FROM nocrm.stage_triggers WHERE name = 'Promote'), 'Fatturato', 'Vendite'));
SELECT * FROM nocrm.stage_trigger_board;
DELETE FROM nocrm.stage_triggers;

------------------------------------------------------------------------
-- 11. Validation: what is refused, with its SQLSTATE; nothing is stored.
------------------------------------------------------------------------
CREATE TEMP TABLE cases (n serial PRIMARY KEY, label text, stmt text);
INSERT INTO cases (label, stmt) VALUES
  ('unknown kind',          $$ SELECT nocrm.create_stage_trigger('Qualificato', 'stage_changed', pipeline => 'Vendite') $$),
  ('kind is case-sensitive', $$ SELECT nocrm.create_stage_trigger('Qualificato', 'Tag_Added', pipeline => 'Vendite') $$),
  ('params an array',       $$ SELECT nocrm.create_stage_trigger('Qualificato', 'tag_added', '["B2B"]', pipeline => 'Vendite') $$),
  ('params a string',       $$ SELECT nocrm.create_stage_trigger('Qualificato', 'tag_added', '"B2B"', pipeline => 'Vendite') $$),
  ('param of no kind',      $$ SELECT nocrm.create_stage_trigger('Qualificato', 'owner_changed', '{"tag": "x"}', pipeline => 'Vendite') $$),
  ('param of another kind', $$ SELECT nocrm.create_stage_trigger('Qualificato', 'tag_added', '{"field": "amount"}', pipeline => 'Vendite') $$),
  ('extra param',           $$ SELECT nocrm.create_stage_trigger('Qualificato', 'tag_added', '{"tag": "x", "status": "won"}', pipeline => 'Vendite') $$),
  ('param a number',        $$ SELECT nocrm.create_stage_trigger('Qualificato', 'tag_added', '{"tag": 5}', pipeline => 'Vendite') $$),
  ('param null',            $$ SELECT nocrm.create_stage_trigger('Qualificato', 'tag_added', '{"tag": null}', pipeline => 'Vendite') $$),
  ('param blank',           $$ SELECT nocrm.create_stage_trigger('Qualificato', 'tag_added', '{"tag": "  "}', pipeline => 'Vendite') $$),
  ('unknown status',        $$ SELECT nocrm.create_stage_trigger('Chiusura', 'status_changed', '{"status": "closed"}', pipeline => 'Vendite') $$),
  ('status is case-sensitive', $$ SELECT nocrm.create_stage_trigger('Chiusura', 'status_changed', '{"status": "Won"}', pipeline => 'Vendite') $$),
  ('field not a column',    $$ SELECT nocrm.create_stage_trigger('Qualificato', 'field_changed', '{"field": "colour"}', pipeline => 'Vendite') $$),
  ('field step_id',         $$ SELECT nocrm.create_stage_trigger('Qualificato', 'field_changed', '{"field": "step_id"}', pipeline => 'Vendite') $$),
  ('field pipeline_id',     $$ SELECT nocrm.create_stage_trigger('Qualificato', 'field_changed', '{"field": "pipeline_id"}', pipeline => 'Vendite') $$),
  ('field updated_at',      $$ SELECT nocrm.create_stage_trigger('Qualificato', 'field_changed', '{"field": "updated_at"}', pipeline => 'Vendite') $$),
  ('custom without code',   $$ SELECT nocrm.create_stage_trigger('Chiusura', 'custom', pipeline => 'Vendite') $$),
  ('custom code with space', $$ SELECT nocrm.create_stage_trigger('Chiusura', 'custom', '{"code": "invoice paid"}', pipeline => 'Vendite') $$),
  ('custom code too long',  $$ SELECT nocrm.create_stage_trigger('Chiusura', 'custom', jsonb_build_object('code', repeat('x', 101)), pipeline => 'Vendite') $$),
  ('unknown step',          $$ SELECT nocrm.create_stage_trigger('Fatturato', 'comment_added') $$),
  ('step of another pipeline', $$ SELECT nocrm.create_stage_trigger('Kickoff', 'comment_added', pipeline => 'Vendite') $$),
  ('step id of another pipeline', $$ SELECT nocrm.create_stage_trigger('5', 'comment_added', pipeline => 'Vendite') $$),
  ('unknown pipeline',      $$ SELECT nocrm.create_stage_trigger('Nuovo', 'comment_added', pipeline => 'Acquisti') $$),
  ('ambiguous step',        $$ SELECT nocrm.create_stage_trigger('Preventivo', 'comment_added') $$),
  ('direct INSERT, bad kind', $$ INSERT INTO nocrm.stage_triggers (step_id, kind) VALUES (2, 'whatever') $$),
  ('direct INSERT, null params', $$ INSERT INTO nocrm.stage_triggers (step_id, kind, params) VALUES (2, 'comment_added', NULL) $$),
  ('direct UPDATE, bad params', $$ UPDATE nocrm.stage_triggers SET params = '{"code": "x"}' WHERE kind = 'comment_added' $$),
  -- accepted: every kind, step by name with pipeline, by id, unambiguous name alone
  ('ok: owner_changed',     $$ SELECT nocrm.create_stage_trigger('Qualificato', 'owner_changed', pipeline => 'Vendite') $$),
  ('ok: field user_id',     $$ SELECT nocrm.create_stage_trigger('2', 'field_changed', '{"field": "user_id"}') $$),
  ('ok: status lost',       $$ SELECT nocrm.create_stage_trigger('Chiusura', 'status_changed', '{"status": "lost"}') $$),
  ('ok: custom code',       $$ SELECT nocrm.create_stage_trigger('Preventivo', 'custom', '{"code": "a.b:c-d_1"}', pipeline => '2') $$);
SELECT nocrm.create_stage_trigger('Nuovo', 'comment_added', pipeline => 'Vendite', name => 'kept');
SELECT c.n, c.label, r.code AS sqlstate, r.message, r.detail, r.hint
  FROM cases c, pg_temp.try_sql(c.stmt) r ORDER BY c.n;
-- Only the trigger created outside the cases is stored.
SELECT * FROM nocrm.stage_trigger_board;
DELETE FROM nocrm.stage_triggers;

------------------------------------------------------------------------
-- 12. nocrm.automations_enabled = off stops stage triggers; a rolled-back
--     transaction leaves no move.
------------------------------------------------------------------------
SELECT nocrm.create_stage_trigger('Qualificato', 'comment_added', pipeline => 'Vendite');
SELECT nocrm.create_stage_trigger('Chiusura', 'custom', '{"code": "done"}', pipeline => 'Vendite');
INSERT INTO nocrm.leads (id, title, pipeline_id) OVERRIDING SYSTEM VALUE VALUES (90, 'Switch', 1);
TRUNCATE nocrm.lead_history;
SET nocrm.automations_enabled = off;
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (90, 1, 'off');
SELECT nocrm.fire_trigger(90, 'done');
SELECT * FROM places WHERE id = 90;
-- The events are recorded, no trigger row.
SELECT * FROM hist;
RESET nocrm.automations_enabled;
TRUNCATE nocrm.lead_history;
BEGIN;
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (90, 1, 'on');
SELECT * FROM places WHERE id = 90;
ROLLBACK;
SELECT * FROM places WHERE id = 90;
SELECT count(*) AS history_rows FROM nocrm.lead_history;
-- A trigger created in a rolled-back transaction does not fire afterwards.
BEGIN;
SELECT nocrm.create_stage_trigger('Preventivo', 'custom', '{"code": "ghost"}', pipeline => 'Vendite');
SELECT nocrm.fire_trigger(90, 'ghost');
ROLLBACK;
SELECT nocrm.fire_trigger(90, 'ghost');
SELECT * FROM places WHERE id = 90;
