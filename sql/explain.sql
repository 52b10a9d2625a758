-- "Why did it fire?": nocrm.explain() on every event, each reason an
-- automation or stage trigger would not fire, resolved actions; explain
-- agrees with what really happens; test mode; the run log
-- (nocrm.automation_runs); lead_timeline(); automation_stats; pruning.
\i test/fixtures/crm.sql
\set VERBOSITY default
\set SHOW_CONTEXT never
SET nocrm.smtp_url = '';
SET nocrm.retry_base = 3600;

\i test/fixtures/try_sql.sql

-- explain() with each action's runs_at shown as the delay from now().
CREATE FUNCTION pg_temp.ex(lead bigint, ev text, tgt text DEFAULT NULL)
RETURNS TABLE (kind text, id integer, name text, fires boolean, reason text,
               conditions jsonb, actions jsonb)
LANGUAGE sql AS $$
    SELECT e.kind, e.id, e.name, e.would_fire, e.reason, e.conditions,
           (SELECT jsonb_agg(CASE WHEN a ? 'runs_at'
                                  THEN (a - 'runs_at') || jsonb_build_object('runs_in',
                                           ((a ->> 'runs_at')::timestamptz - now())::text)
                                  ELSE a END ORDER BY o)
              FROM jsonb_array_elements(e.actions) WITH ORDINALITY AS x(a, o))
      FROM nocrm.explain(lead, ev, tgt) e
     ORDER BY e.kind, e.id
$$;

-- An actions array with each "runs_at" (a time) replaced by true.
CREATE FUNCTION pg_temp.no_runs_at(actions jsonb) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_agg(CASE WHEN a ? 'runs_at' THEN a || '{"runs_at": true}' ELSE a END ORDER BY o)
      FROM jsonb_array_elements(actions) WITH ORDINALITY AS x(a, o)
$$;

-- Everything explain() must leave alone, as one digest per table.
CREATE TEMP TABLE snapshots (label text, tbl text, digest text);
CREATE FUNCTION pg_temp.snapshot(label text) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO snapshots
    SELECT label, 'leads', md5(coalesce(string_agg(l::text, '|' ORDER BY l.id), '')) FROM nocrm.leads l
    UNION ALL
    SELECT label, 'tags', md5(coalesce(string_agg(t::text, '|' ORDER BY t.lead_id, t.name), '')) FROM nocrm.tags t
    UNION ALL
    SELECT label, 'comments', md5(coalesce(string_agg(c::text, '|' ORDER BY c.id), '')) FROM nocrm.comments c
    UNION ALL
    SELECT label, 'assignment_counters',
           md5(coalesce(string_agg(c::text, '|' ORDER BY c.automation_id, c.action_no, c.user_id), ''))
      FROM nocrm.assignment_counters c
    UNION ALL
    SELECT label, 'notifications', md5(coalesce(string_agg(n::text, '|' ORDER BY n.id), '')) FROM nocrm.notifications n
    UNION ALL
    SELECT label, 'queue', md5(coalesce(string_agg(q::text, '|' ORDER BY q.id), '')) FROM nocrm.queue q
    UNION ALL
    SELECT label, 'lead_history', md5(coalesce(string_agg(h::text, '|' ORDER BY h.id), '')) FROM nocrm.lead_history h
    UNION ALL
    SELECT label, 'automation_runs', md5(coalesce(string_agg(r::text, '|' ORDER BY r.id), '')) FROM nocrm.automation_runs r
$$;

------------------------------------------------------------------------
-- 1. Leads, then automations on all ten events and stage triggers.
------------------------------------------------------------------------
-- 1 Alpha: Vendite/Nuovo, Anna's, tagged B2B.  2 Beta: no pipeline, no owner.
-- 3 Gamma: Vendite/Preventivo, Matteo's.  4 Delta: to be deleted, tagged B2B.
-- 5 Epsilon: Vendite/Nuovo, Anna's.  6 Eta: Onboarding/Kickoff, no owner.
-- 7 Theta: Vendite/Nuovo, Anna's.
-- Gamma is tagged frozen; Matteo is away for two days.
INSERT INTO nocrm.leads (title, pipeline_id, step_id, user_id, status, amount, contact_email) VALUES
  ('Alpha',   1, NULL, 1,    'todo',    1000, 'alpha@client.example'),
  ('Beta',    NULL, NULL, NULL, 'standby', NULL, NULL),
  ('Gamma',   1, 3,    2,    'todo',    500,  'gamma@client.example'),
  ('Delta',   1, NULL, 3,    'todo',    NULL, NULL),
  ('Epsilon', 1, NULL, 1,    'todo',    NULL, 'epsilon@client.example'),
  ('Eta',     2, NULL, NULL, 'todo',    NULL, NULL),
  ('Theta',   1, NULL, 1,    'todo',    NULL, NULL);
INSERT INTO nocrm.tags (lead_id, name) VALUES (1, 'B2B'), (4, 'B2B'), (3, 'frozen');
INSERT INTO nocrm.absences (user_id, starts_at, ends_at)
VALUES (2, now() - interval '1 day', now() + interval '2 days');

-- lead.creation: one automation per reason not to fire.
SELECT nocrm.create_automation(name => 'New: tag', event => 'lead.creation',
  actions => '[{"type": "add_tags", "tags": ["new", "B2B"]}]');                       -- 1
SELECT nocrm.create_automation(name => 'New: off', event => 'lead.creation', enabled => false,
  actions => '[{"type": "comment", "body": "hello"}]');                               -- 2
SELECT nocrm.create_automation(name => 'New: won only', event => 'lead.creation',
  conditions => '{"status": "won"}', actions => '[{"type": "comment", "body": "won"}]');  -- 3
SELECT nocrm.create_automation(name => 'New: unassigned', event => 'lead.creation',
  conditions => '{"owner": null}',
  actions => '[{"type": "assign_round_robin", "users": [2, 3]}]');                    -- 4
SELECT nocrm.create_automation(name => 'New: Matteo''s', event => 'lead.creation',
  conditions => '{"owner": "matteo@example.com"}',
  actions => '[{"type": "notify", "user": "owner", "message": "Hi {{user.name}}, {{lead.title}} is yours"}]');  -- 5
SELECT nocrm.create_automation(name => 'New: Onboarding', event => 'lead.creation',
  conditions => '{"pipeline": "Onboarding"}', actions => '[{"type": "set_step", "step": "Kickoff"}]');  -- 6
SELECT nocrm.create_automation(name => 'New: at Preventivo', event => 'lead.creation',
  conditions => '{"step": "Preventivo"}', actions => '[{"type": "set_status", "status": "standby"}]');  -- 7
SELECT nocrm.create_automation(name => 'New: B2B and VIP', event => 'lead.creation',
  conditions => '{"has_tag": ["B2B", "VIP"]}', actions => '[{"type": "remove_tags", "tags": ["B2B", "cold"]}]');  -- 8
SELECT nocrm.create_automation(name => 'New: not B2B', event => 'lead.creation',
  conditions => '{"lacks_tag": "B2B"}', actions => '[{"type": "add_tags", "tags": ["B2C"]}]');  -- 9
SELECT nocrm.create_automation(name => 'New: trial', event => 'lead.creation', mode => 'test',
  actions => '[{"type": "assign", "user": 4}]');                                      -- 10
SELECT nocrm.create_automation(name => 'New: all hold', event => 'lead.creation',
  conditions => '{"status": ["todo", "standby"], "owner": [1, 2], "pipeline": "Vendite",
                  "step": ["Nuovo", "Qualificato"], "has_tag": "B2B", "lacks_tag": ["VIP"]}',
  actions => '[{"type": "set_status", "status": "standby"}]');                        -- 11
SELECT nocrm.create_automation(name => 'New: two fail', event => 'lead.creation',
  conditions => '{"lacks_tag": "B2B", "pipeline": "Onboarding", "status": "todo"}',
  actions => '[{"type": "set_status", "status": "lost"}]');                           -- 12
-- the other nine events
SELECT nocrm.create_automation(name => 'Gone: tell Sara', event => 'lead.deleted',
  conditions => '{"lacks_tag": "B2B"}',
  actions => '[{"type": "notify", "user": 4, "message": "{{lead.title}} is gone ({{event}})"}]');  -- 13
SELECT nocrm.create_automation(name => 'Gone: B2B', event => 'lead.deleted',
  conditions => '{"has_tag": "B2B"}',
  actions => '[{"type": "notify", "user": 4, "message": "a B2B lead is gone"}]');      -- 14
SELECT nocrm.create_automation(name => 'Update: hook', event => 'lead.any_update',
  actions => '[{"type": "webhook", "url": "http://127.0.0.1:1/hook"}]');              -- 15
SELECT nocrm.create_automation(name => 'Won: upsell', event => 'lead.status.changed.to', target => 'won',
  actions => '[{"type": "add_tags", "tags": ["upsell"]},
               {"type": "notify", "user": "owner", "message": "{{owner.name}} won {{lead.title}}"}]');  -- 16
SELECT nocrm.create_automation(name => 'Lost: survey', event => 'lead.status.changed.to', target => 'lost',
  actions => '[{"type": "send_email", "template": "quote_followup"}]');               -- 17
SELECT nocrm.create_automation(name => 'Quote: follow up', event => 'lead.step.changed.to',
  target => 'Preventivo',
  actions => '[{"type": "send_email", "template": "quote_followup"},
               {"type": "comment", "body": "Quote sent 3 days ago?", "delay": "3 days"}]');  -- 18
SELECT nocrm.create_automation(name => 'Closing', event => 'lead.step.changed.to', target => 'Chiusura',
  actions => '[{"type": "set_status", "status": "won"}]');                            -- 19
SELECT nocrm.create_automation(name => 'Assigned: welcome', event => 'lead.assigned',
  conditions => '{"pipeline": "Vendite"}',
  actions => '[{"type": "notify", "user": "owner", "message": "Welcome {{owner.name}} to {{lead.title}}"}]');  -- 20
SELECT nocrm.create_automation(name => 'Unassigned: rotate', event => 'lead.unassigned',
  actions => '[{"type": "assign_round_robin", "users": ["anna@example.com", 2, 3]}]'); -- 21
SELECT nocrm.create_automation(name => 'Unassigned: onboarding draw', event => 'lead.unassigned',
  conditions => '{"pipeline": "Onboarding"}',
  actions => '[{"type": "assign_random", "users": [1, 2, 4]}]');                      -- 22
SELECT nocrm.create_automation(name => 'Content: tag', event => 'lead.content_has_changed',
  conditions => '{"lacks_tag": "frozen"}', actions => '[{"type": "add_tags", "tags": ["edited"]}]');  -- 23
SELECT nocrm.create_automation(name => 'Commented: mail sales', event => 'lead.commented',
  actions => '[{"type": "send_email", "template": "quote_followup", "to": "sales@example.com"}]');  -- 24
SELECT nocrm.create_automation(name => 'Mail in: later', event => 'lead.email.received',
  actions => '[{"type": "comment", "body": "Answer within a day", "delay": "1 day"},
               {"type": "notify", "user": "owner", "message": "{{lead.title}} wrote", "respect_working_hours": true}]');  -- 25

-- Stage triggers of Vendite (Onboarding's 6 never shows for a Vendite lead).
SELECT nocrm.create_stage_trigger('Qualificato', 'field_changed', pipeline => 'Vendite', name => 'Any field');  -- 1
SELECT nocrm.create_stage_trigger('Preventivo', 'field_changed', '{"field": "amount"}', pipeline => 'Vendite',
                                  name => 'Amount set');                          -- 2
SELECT nocrm.create_stage_trigger('Chiusura', 'comment_added', pipeline => 'Vendite', name => 'Comment closes');  -- 3
SELECT nocrm.create_stage_trigger('Nuovo', 'comment_added', allow_backward => true, pipeline => 'Vendite',
                                  name => 'Comment restarts');                    -- 4
SELECT nocrm.create_stage_trigger('Chiusura', 'status_changed', '{"status": "won"}', pipeline => 'Vendite',
                                  name => 'Won closes');                          -- 5
SELECT nocrm.create_stage_trigger('Kickoff', 'email_received', name => 'Onboarding mail');  -- 6
SELECT nocrm.create_stage_trigger('Qualificato', 'email_received', pipeline => 'Vendite', name => 'Mail qualifies');  -- 7
SELECT nocrm.create_stage_trigger('Nuovo', 'field_changed', '{"field": "title"}', pipeline => 'Vendite',
                                  name => 'Renamed restarts');                    -- 8

SELECT pg_temp.snapshot('before');

------------------------------------------------------------------------
-- 2. explain() on every event.
------------------------------------------------------------------------
-- lead.creation on Alpha: each reason (disabled, each condition key failing
-- with the lead's value, test mode) and the resolved actions.
SELECT * FROM pg_temp.ex(1, 'lead.creation');
-- On Beta (no owner, no pipeline, standby): the unassigned rule holds and
-- names the next round-robin user (Giovanni: Matteo is away); "owner" is null.
SELECT id, name, fires, reason, conditions, actions FROM pg_temp.ex(2, 'lead.creation')
 WHERE id IN (1, 4, 5, 6, 7, 9, 11, 12);
-- On Gamma (Matteo's, at Preventivo): owner and step conditions hold; notify
-- renders its message for the owner.
SELECT id, name, fires, reason, conditions, actions FROM pg_temp.ex(3, 'lead.creation')
 WHERE id IN (5, 7);

-- lead.deleted: the lead is taken as gone, so it has no tags left.
SELECT * FROM pg_temp.ex(4, 'lead.deleted');

-- lead.any_update with the changing field: amount on Alpha (at Nuovo): both
-- field triggers match, the further one (Preventivo) wins.
SELECT * FROM pg_temp.ex(1, 'lead.any_update', 'amount');
-- title on Gamma (at Preventivo): both matching triggers are behind it.
SELECT * FROM pg_temp.ex(3, 'lead.any_update', 'title');
-- Without a field, no field trigger can match.
SELECT * FROM pg_temp.ex(3, 'lead.any_update');

-- lead.status.changed.to: the target decides; a stage trigger follows.
SELECT * FROM pg_temp.ex(1, 'lead.status.changed.to', 'won');
SELECT * FROM pg_temp.ex(1, 'lead.status.changed.to', 'lost');

-- lead.step.changed.to: a step name means the step of the lead's pipeline;
-- digits mean a step id (6: Onboarding's Preventivo, also a target of 18).
SELECT * FROM pg_temp.ex(1, 'lead.step.changed.to', 'Preventivo');
SELECT * FROM pg_temp.ex(1, 'lead.step.changed.to', 'Chiusura');
SELECT id, fires, reason FROM pg_temp.ex(1, 'lead.step.changed.to', '6');
SELECT id, fires, reason FROM pg_temp.ex(1, 'lead.step.changed.to', '2');

-- lead.assigned: the pipeline condition.
SELECT * FROM pg_temp.ex(1, 'lead.assigned');
SELECT * FROM pg_temp.ex(2, 'lead.assigned');

-- lead.unassigned: the next round-robin user; assign_random lists who it
-- may pick (not Matteo, who is away), for Eta of Onboarding.
SELECT * FROM pg_temp.ex(2, 'lead.unassigned');
SELECT * FROM pg_temp.ex(6, 'lead.unassigned');
-- An inactive member is no candidate either.
UPDATE nocrm.users SET active = false WHERE id = 1;
SELECT id, actions FROM pg_temp.ex(6, 'lead.unassigned');
UPDATE nocrm.users SET active = true WHERE id = 1;

-- lead.content_has_changed, with and without the field.
SELECT * FROM pg_temp.ex(1, 'lead.content_has_changed', 'description');
SELECT * FROM pg_temp.ex(3, 'lead.content_has_changed');

-- lead.commented: the email subject is rendered for the lead; stage
-- triggers: forward to Chiusura wins over the allowed backward move.
SELECT * FROM pg_temp.ex(1, 'lead.commented');
SELECT * FROM pg_temp.ex(3, 'lead.commented');
SELECT * FROM pg_temp.ex(2, 'lead.commented');

-- lead.email.received: a delayed action runs in a day; respect_working_hours
-- runs now when the owner works (Anna), after the owner's absence (Matteo).
SELECT * FROM pg_temp.ex(1, 'lead.email.received');
SELECT e.id, a ->> 'type' AS type, a ->> 'user' AS "user",
       (a ->> 'runs_at')::timestamptz = (SELECT ends_at FROM nocrm.absences WHERE user_id = 2) AS after_absence
  FROM nocrm.explain(3, 'lead.email.received') e, jsonb_array_elements(e.actions) a
 WHERE e.kind = 'automation' AND a ->> 'type' = 'notify';

-- A broken rule (what it names is gone; only possible around the checks).
SET session_replication_role = replica;
INSERT INTO nocrm.automations (name, event, actions)
VALUES ('Broken: ghost user', 'lead.commented', '[{"type": "assign", "user": 99}]');   -- 26
RESET session_replication_role;
SELECT kind, id, name, fires, reason, conditions, actions FROM pg_temp.ex(1, 'lead.commented');
DELETE FROM nocrm.automations WHERE id = 26;

------------------------------------------------------------------------
-- 3. Errors.
------------------------------------------------------------------------
SELECT * FROM pg_temp.try_sql($$SELECT * FROM nocrm.explain(999, 'lead.creation')$$);
SELECT * FROM pg_temp.try_sql($$SELECT * FROM nocrm.explain(1, 'lead.created')$$);
SELECT * FROM pg_temp.try_sql($$SELECT * FROM nocrm.explain(1, 'lead.status.changed.to')$$);
SELECT * FROM pg_temp.try_sql($$SELECT * FROM nocrm.explain(1, 'lead.step.changed.to')$$);
SELECT * FROM pg_temp.try_sql($$SELECT * FROM nocrm.explain(1, 'lead.status.changed.to', 'sold')$$);
SELECT * FROM pg_temp.try_sql($$SELECT * FROM nocrm.explain(1, 'lead.step.changed.to', 'Kickoff')$$);
SELECT * FROM pg_temp.try_sql($$SELECT * FROM nocrm.explain(1, 'lead.step.changed.to', '999')$$);
SELECT * FROM pg_temp.try_sql($$SELECT * FROM nocrm.explain(2, 'lead.step.changed.to', 'Preventivo')$$);
SELECT * FROM pg_temp.try_sql($$SELECT * FROM nocrm.explain(1, 'lead.creation', 'amount')$$);
SELECT * FROM pg_temp.try_sql($$SELECT * FROM nocrm.explain(1, 'lead.commented', 'anna@example.com')$$);
-- lead.assigned takes the new owner as target; an unknown one is refused.
SELECT * FROM pg_temp.try_sql($$SELECT * FROM nocrm.explain(1, 'lead.assigned', 'nobody@example.com')$$);
SELECT kind, id, would_fire FROM nocrm.explain(1, 'lead.assigned', 'anna@example.com') ORDER BY kind, id;
SELECT * FROM pg_temp.try_sql($$SELECT * FROM nocrm.explain(NULL, 'lead.creation')$$);
SELECT * FROM pg_temp.try_sql($$SELECT * FROM nocrm.explain(1, NULL)$$);
SELECT * FROM pg_temp.try_sql($$SELECT * FROM nocrm.explain(1, 'lead.status.changed.to', NULL)$$);

-- explain() changed nothing: leads, tags, comments, round-robin counters,
-- notifications, queue, history and run log are as they were.
SELECT pg_temp.snapshot('after');
SELECT b.tbl, b.digest = a.digest AS unchanged
  FROM snapshots b JOIN snapshots a ON a.tbl = b.tbl AND a.label = 'after'
 WHERE b.label = 'before' ORDER BY b.tbl;

------------------------------------------------------------------------
-- 4. explain() agrees with what happens: what it says would fire (kind,
--    id) against the run log's 'fired' rows at depth 1 for that event.
------------------------------------------------------------------------
CREATE TEMP TABLE scenarios (scenario text, lead bigint, event text, since bigint);
CREATE TEMP TABLE predicted (scenario text, kind text, id integer);
CREATE FUNCTION pg_temp.predict(sc text, lead bigint, ev text, tgt text DEFAULT NULL) RETURNS text
LANGUAGE sql AS $$
    INSERT INTO scenarios SELECT sc, lead, ev, coalesce(max(r.id), 0) FROM nocrm.automation_runs r;
    INSERT INTO predicted SELECT sc, e.kind, e.id FROM nocrm.explain(lead, ev, tgt) e WHERE e.would_fire;
    SELECT string_agg(p.kind || ' ' || p.id, ', ' ORDER BY p.kind, p.id) FROM predicted p WHERE p.scenario = sc;
$$;
CREATE FUNCTION pg_temp.agree(sc text)
RETURNS TABLE (scenario text, event text, predicted text, happened text, agree boolean)
LANGUAGE sql AS $$
    WITH s AS (SELECT * FROM scenarios WHERE scenario = sc),
         p AS (SELECT p.kind || ' ' || p.id AS k FROM predicted p WHERE p.scenario = sc),
         h AS (SELECT CASE WHEN r.automation_id IS NOT NULL THEN 'automation ' || r.automation_id
                           ELSE 'stage_trigger ' || r.stage_trigger_id END AS k
                 FROM nocrm.automation_runs r, s
                WHERE r.id > s.since AND r.lead_id = s.lead AND r.event = s.event
                  AND r.chain_depth = 1 AND r.outcome = 'fired')
    SELECT sc, s.event,
           (SELECT string_agg(k, ', ' ORDER BY k) FROM p),
           (SELECT string_agg(k, ', ' ORDER BY k) FROM h),
           (SELECT array_agg(k ORDER BY k) FROM p) IS NOT DISTINCT FROM (SELECT array_agg(k ORDER BY k) FROM h)
      FROM s
$$;

-- A comment on Alpha: the mail to sales, and the move to Chiusura.
SELECT pg_temp.predict('comment', 1, 'lead.commented');
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (1, 1, 'Any news?');
SELECT * FROM pg_temp.agree('comment');

-- A new amount on Epsilon: two events, each with its own automations; the
-- amount trigger (Preventivo) moves the lead, the any-field one does not.
SELECT pg_temp.predict('amount/content', 5, 'lead.content_has_changed', 'amount');
SELECT pg_temp.predict('amount/any', 5, 'lead.any_update', 'amount');
UPDATE nocrm.leads SET amount = 2000 WHERE id = 5;
SELECT * FROM pg_temp.agree('amount/content');
SELECT * FROM pg_temp.agree('amount/any');

-- Beta is won (no pipeline, so no stage trigger).
SELECT pg_temp.predict('won', 2, 'lead.status.changed.to', 'won');
UPDATE nocrm.leads SET status = 'won' WHERE id = 2;
SELECT * FROM pg_temp.agree('won');

-- Delta is deleted: only the rule for leads without B2B fires.
SELECT pg_temp.predict('delete', 4, 'lead.deleted');
DELETE FROM nocrm.leads WHERE id = 4;
SELECT * FROM pg_temp.agree('delete');

-- Theta gets an email, then moves to Preventivo.
SELECT pg_temp.predict('email', 7, 'lead.email.received');
INSERT INTO nocrm.emails (lead_id, from_address, subject) VALUES (7, 'theta@client.example', 'Re: offer');
SELECT * FROM pg_temp.agree('email');
SELECT pg_temp.predict('step', 7, 'lead.step.changed.to', 'Preventivo');
UPDATE nocrm.leads SET step_id = 3 WHERE id = 7;
SELECT * FROM pg_temp.agree('step');

-- Eta (Onboarding) is assigned: nothing fires; then unassigned: the round
-- robin takes the user explain named (Sara is made inactive so the random
-- draw has one candidate).
SELECT pg_temp.predict('assign', 6, 'lead.assigned');
UPDATE nocrm.leads SET user_id = 3 WHERE id = 6;
SELECT * FROM pg_temp.agree('assign');
UPDATE nocrm.users SET active = false WHERE id = 4;
SELECT id, actions FROM nocrm.explain(6, 'lead.unassigned') ORDER BY id;
SELECT pg_temp.predict('unassign', 6, 'lead.unassigned');
UPDATE nocrm.leads SET user_id = NULL WHERE id = 6;
SELECT * FROM pg_temp.agree('unassign');
UPDATE nocrm.users SET active = true WHERE id = 4;
SELECT l.user_id, u.name FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.id = 6;
SELECT automation_id, action_no, user_id, assigned FROM nocrm.assignment_counters
 WHERE automation_id = 21 ORDER BY position;
-- ... and the rotation moves on: Matteo is away, so Giovanni is next.
SELECT id, actions FROM nocrm.explain(6, 'lead.unassigned') WHERE id = 21;

SELECT bool_and(a.agree) AS all_agree, count(*) AS scenarios
  FROM scenarios s, LATERAL pg_temp.agree(s.scenario) a;

-- The rules so far are switched off for what follows.
SELECT count(*) AS disabled FROM (SELECT nocrm.disable_automation(id) FROM nocrm.automations) d;
SELECT count(*) AS disabled FROM (SELECT nocrm.set_stage_trigger_enabled(id, false) FROM nocrm.stage_triggers) d;
SELECT (SELECT count(*) FROM nocrm.automations WHERE enabled) AS automations_on,
       (SELECT count(*) FROM nocrm.stage_triggers WHERE enabled) AS stage_triggers_on;

------------------------------------------------------------------------
-- 5. Test mode: the run is recorded with what it would have done; nothing
--    is done.  go_live() makes it act.
------------------------------------------------------------------------
INSERT INTO nocrm.leads (title, contact_email) VALUES ('Iota', 'iota@client.example');  -- 8
SELECT nocrm.create_automation(name => 'Trial', event => 'lead.commented', mode => 'test',
  actions => '[{"type": "add_tags", "tags": ["trial"]},
               {"type": "assign", "user": "sara.manager@example.com"},
               {"type": "notify", "user": 1, "message": "{{lead.title}} is on trial"},
               {"type": "send_email", "template": "quote_followup"},
               {"type": "comment", "body": "Later", "delay": "1 day"}]');      -- 27
SELECT kind, id, name, fires, reason FROM pg_temp.ex(8, 'lead.commented');

CREATE TEMP VIEW iota AS
SELECT (SELECT count(*) FROM nocrm.tags WHERE lead_id = 8) AS tags,
       (SELECT user_id FROM nocrm.leads WHERE id = 8) AS owner,
       (SELECT count(*) FROM nocrm.queue WHERE lead_id = 8) AS queued,
       (SELECT count(*) FROM nocrm.notifications WHERE lead_id = 8) AS notifications,
       (SELECT count(*) FROM nocrm.comments WHERE lead_id = 8) AS comments,
       (SELECT count(*) FROM nocrm.lead_history WHERE lead_id = 8 AND event LIKE 'action.%') AS action_rows,
       (SELECT count(*) FROM nocrm.assignment_counters WHERE automation_id = 27) AS counters;
SELECT * FROM iota;
SET nocrm.actor = 'matteo@example.com';
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (8, 2, 'Trying');
RESET nocrm.actor;
-- Only the person's comment is there.
SELECT * FROM iota;
SELECT automation_id, lead_id, event, mode, outcome, change, actor_id, chain_depth, nactions, detail,
       pg_temp.no_runs_at(actions) AS described,
       (SELECT (a ->> 'runs_at')::timestamptz - r.created_at BETWEEN interval '1 day' - interval '1 minute'
                                                                AND interval '1 day'
          FROM jsonb_array_elements(r.actions) a WHERE a ? 'runs_at') AS runs_in_a_day
  FROM nocrm.automation_runs r WHERE lead_id = 8 ORDER BY id;
SELECT event, actor_id, automation_id, detail FROM nocrm.lead_history WHERE lead_id = 8 ORDER BY id;

-- Live: the same comment does it all.
SELECT nocrm.go_live(27);
SELECT kind, id, name, fires, reason FROM pg_temp.ex(8, 'lead.commented');
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (8, 2, 'For real');
SELECT * FROM iota;
SELECT automation_id, mode, outcome, actor_id, chain_depth, nactions, pg_temp.no_runs_at(actions) AS actions,
       detail
  FROM nocrm.automation_runs WHERE lead_id = 8 ORDER BY id;
-- Back to test mode; the mode is checked; a missing automation is P0002.
SELECT nocrm.set_automation_mode(27, 'test');
SELECT kind, id, fires, reason FROM pg_temp.ex(8, 'lead.commented');
SELECT code, message FROM pg_temp.try_sql($$SELECT nocrm.set_automation_mode(27, 'shadow')$$);
SELECT * FROM pg_temp.try_sql($$SELECT nocrm.set_automation_mode(9999, 'test')$$);
SELECT * FROM pg_temp.try_sql($$SELECT nocrm.go_live(9999)$$);
SELECT id, mode, enabled FROM nocrm.automations WHERE id = 27;
SELECT nocrm.disable_automation(27);

------------------------------------------------------------------------
-- 6. The run log of a chain started by a person: every firing with its
--    change, the person (also deep in the chain), depth, actions with
--    outcomes and queue ids, a loop stop, stage trigger moves and skips,
--    a test-mode run.  explain() called inside the chain sees the loop.
------------------------------------------------------------------------
SET nocrm.actor = 'giovanni@example.com';
-- 9: the address cannot be one, so its email will die.
INSERT INTO nocrm.leads (title, pipeline_id, contact_email) VALUES ('Kappa', 1, 'kappa at client.example');
SELECT nocrm.create_automation(name => 'Chain: take', event => 'lead.commented',
  conditions => '{"owner": null, "pipeline": "Vendite"}',
  actions => '[{"type": "assign_round_robin", "users": [2, 1]},
               {"type": "add_tags", "tags": ["contacted"]},
               {"type": "send_email", "template": "quote_followup"},
               {"type": "comment", "body": "Call back?", "delay": "1 hour"},
               {"type": "add_tags", "tags": ["followed-up"], "delay": "1 hour", "recheck": false}]');  -- 28
SELECT nocrm.create_automation(name => 'Chain: welcome', event => 'lead.assigned',
  actions => '[{"type": "notify", "user": "owner", "message": "{{owner.name}}: {{lead.title}} is yours"},
               {"type": "set_step", "step": "Qualificato"}]');                   -- 29
SELECT nocrm.create_automation(name => 'Chain: qualified', event => 'lead.step.changed.to',
  target => 'Qualificato', actions => '[{"type": "add_tags", "tags": ["qualified"]}]');  -- 30
SELECT nocrm.create_automation(name => 'Chain: echo', event => 'lead.any_update',
  conditions => '{"has_tag": "contacted"}', actions => '[{"type": "add_tags", "tags": ["echo"]}]');  -- 31
SELECT nocrm.create_automation(name => 'Chain: shadow', event => 'lead.commented', mode => 'test',
  conditions => '{"pipeline": "Vendite"}', actions => '[{"type": "set_status", "status": "lost"}]');  -- 32
SELECT nocrm.create_stage_trigger('Preventivo', 'tag_added', '{"tag": "qualified"}', pipeline => 'Vendite');  -- 9
SELECT nocrm.create_stage_trigger('Nuovo', 'tag_added', '{"tag": "contacted"}', pipeline => 'Vendite');       -- 10

-- explain() from inside the chain, when the welcome automation moves the
-- lead to Qualificato (step 2).
CREATE TABLE public.explained_inside AS
SELECT ''::text AS event, * FROM nocrm.explain(9, 'lead.commented') WHERE false;
CREATE FUNCTION public.explain_inside() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.explained_inside
    SELECT ev, e.* FROM unnest(ARRAY['lead.commented', 'lead.assigned']) AS ev,
                        LATERAL nocrm.explain(NEW.id, ev) e;
    RETURN NULL;
END $$;
CREATE TRIGGER explain_inside AFTER UPDATE ON nocrm.leads
    FOR EACH ROW WHEN (NEW.step_id = 2 AND OLD.step_id IS DISTINCT FROM NEW.step_id)
    EXECUTE FUNCTION public.explain_inside();

SELECT kind, id, name, fires, reason, conditions FROM pg_temp.ex(9, 'lead.commented')
 WHERE kind = 'stage_trigger' OR id > 27;
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (9, 3, 'Please call me');
RESET nocrm.actor;

SELECT coalesce('automation ' || automation_id, 'stage trigger ' || stage_trigger_id) AS run,
       event, mode, outcome, change, actor_id, chain_depth AS depth, nactions, actions, detail
  FROM nocrm.automation_runs WHERE lead_id = 9 ORDER BY id;
SELECT s.name AS step, l.user_id, array(SELECT name FROM nocrm.tags WHERE lead_id = 9 ORDER BY name) AS tags
  FROM nocrm.leads l JOIN nocrm.steps s ON s.id = l.step_id WHERE l.id = 9;
SELECT id, kind, automation_id, action_no, recipient, state FROM nocrm.queue WHERE lead_id = 9 ORDER BY id;
-- Inside the chain: the welcome automation, running, is a loop stop; the
-- lead is assigned by then, so "Chain: take" no longer matches.
SELECT event, kind, id, would_fire, reason FROM public.explained_inside
 WHERE kind = 'stage_trigger' OR id > 27 ORDER BY event, kind, id;
DROP TRIGGER explain_inside ON nocrm.leads;
DROP FUNCTION public.explain_inside();
DROP TABLE public.explained_inside;

------------------------------------------------------------------------
-- 7. The drain: Kappa's email dies at once (no valid address), the
--    rechecked comment is cancelled (the lead has an owner now), the
--    unconditional tag is added.  Then Kappa's timeline.
------------------------------------------------------------------------
UPDATE nocrm.queue SET run_at = now() - interval '1 second' WHERE lead_id = 9 AND kind = 'action';
CALL nocrm.drain(0);
SELECT id, kind, action_no, state, attempts, last_error FROM nocrm.queue WHERE lead_id = 9 ORDER BY id;
-- The delayed action's run, recorded when it ran (no one set nocrm.actor for the drain).
SELECT automation_id, event, outcome, actor_id, chain_depth, nactions, actions
  FROM nocrm.automation_runs WHERE lead_id = 9 AND id > (SELECT max(id) FROM nocrm.automation_runs
                                                          WHERE lead_id = 9 AND automation_id = 32)
 ORDER BY id;
SELECT who, what, detail FROM nocrm.lead_timeline(9);

------------------------------------------------------------------------
-- 8. automation_stats after all this.
------------------------------------------------------------------------
SELECT id, name, enabled, mode, fired, test_runs, skipped, failed, avg_actions,
       last_fired IS NOT NULL AS has_fired
  FROM nocrm.automation_stats;

------------------------------------------------------------------------
-- 9. Pruning: the drain removes run log rows older than
--    nocrm.run_log_retention (30 days by default).
------------------------------------------------------------------------
SHOW nocrm.run_log_retention;
INSERT INTO nocrm.automation_runs (automation_id, lead_id, event, outcome, chain_depth, created_at)
VALUES (1, 1, 'lead.creation', 'fired', 1, now() - interval '31 days'),
       (1, 1, 'lead.creation', 'fired', 1, now() - interval '29 days');
SELECT count(*) AS runs, count(*) FILTER (WHERE created_at < now() - interval '30 days') AS older
  FROM nocrm.automation_runs;
SELECT count(*) AS runs_before FROM nocrm.automation_runs \gset
CALL nocrm.drain(0);
SELECT count(*) AS runs, :runs_before - count(*) AS pruned,
       count(*) FILTER (WHERE created_at < now() - interval '30 days') AS older
  FROM nocrm.automation_runs;
-- A long retention keeps the 29-day-old row.
SET nocrm.run_log_retention = '365d';
CALL nocrm.drain(0);
SELECT count(*) AS runs, :runs_before - 1 - count(*) AS pruned FROM nocrm.automation_runs;
-- Retention 0: everything logged before the drain goes.
SET nocrm.run_log_retention = 0;
CALL nocrm.drain(0);
SELECT count(*) AS runs FROM nocrm.automation_runs;
RESET nocrm.run_log_retention;
-- The stats cover the run log's retention: only dead queue items are left.
SELECT id, name, fired, test_runs, skipped, failed, avg_actions, last_fired
  FROM nocrm.automation_stats WHERE id IN (16, 27, 28, 31, 32);

-- Later fixes, on a fresh CRM: explain judges conditions on the lead as it
-- will be after the change (as the engine does), shows owner_changed stage
-- triggers for owner events, and knows when automations are switched off.
\i test/fixtures/crm.sql
SELECT nocrm.create_automation(name => 'won and won', event => 'lead.status.changed.to', target => 'won',
  conditions => '{"status": "won"}', actions => '[{"type": "add_tags", "tags": "w"}]');
SELECT nocrm.create_automation(name => 'to Anna', event => 'lead.assigned',
  conditions => '{"owner": "anna@example.com"}', actions => '[{"type": "add_tags", "tags": "a"}]');
SELECT nocrm.create_stage_trigger(pipeline => 'Vendite', step => 'Qualificato', kind => 'owner_changed', name => 'owner moves');
INSERT INTO nocrm.leads (title, pipeline_id, user_id) VALUES ('After', 1, 2);
SELECT kind, id, name, would_fire, reason FROM nocrm.explain(1, 'lead.status.changed.to', 'won');
SELECT kind, id, name, would_fire, reason FROM nocrm.explain(1, 'lead.assigned', 'anna@example.com') ORDER BY kind, id;
SELECT kind, id, name, would_fire, reason FROM nocrm.explain(1, 'lead.assigned', 'matteo@example.com') ORDER BY kind, id;
UPDATE nocrm.leads SET status = 'won' WHERE id = 1;
UPDATE nocrm.leads SET user_id = 1 WHERE id = 1;
SELECT automation_id, stage_trigger_id, event, outcome FROM nocrm.automation_runs ORDER BY id;
SET nocrm.automations_enabled = off;
SELECT kind, id, would_fire, reason FROM nocrm.explain(1, 'lead.status.changed.to', 'won');
RESET nocrm.automations_enabled;
