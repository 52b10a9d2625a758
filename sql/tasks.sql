-- Tasks: nocrm.tasks, the create_task action (assignee kinds, due kinds,
-- working hours, placeholders, delays), the events task.created,
-- task.completed and task.overdue as rule triggers, complete_task(),
-- the timeline, explain and test mode, privileges, validation.
\i test/fixtures/crm.sql
\set VERBOSITY default
\set SHOW_CONTEXT never

\i test/fixtures/try_sql.sql

-- The tasks as a table: due times relative to when the task was made, or as they are.
CREATE FUNCTION pg_temp.tasks() RETURNS TABLE (id bigint, lead text, assignee text, title text,
    notes text, due text, done boolean, created_by bigint, automation_id integer, rule_version integer)
LANGUAGE sql AS $$
  SELECT t.id, l.title, u.name, t.title, t.notes,
         CASE WHEN t.due_at > '2029-01-01' THEN t.due_at::text ELSE 'created + ' || (t.due_at - t.created_at)::text END,
         t.done_at IS NOT NULL, t.created_by, t.automation_id, t.rule_version
    FROM nocrm.tasks t JOIN nocrm.leads l ON l.id = t.lead_id LEFT JOIN nocrm.users u ON u.id = t.assignee_id
   ORDER BY t.id
$$;

-- An automation's id by name (ids depend on the cases refused below).
CREATE FUNCTION pg_temp.aid(n text) RETURNS integer LANGUAGE sql AS
$$ SELECT id FROM nocrm.automations WHERE name = n $$;

-- 1. Validation: each bad create_task is refused when written, naming the place.
CREATE TEMP TABLE cases (n serial, label text, event text DEFAULT 'lead.creation', actions jsonb);
INSERT INTO cases (label, actions) VALUES
  ('no title',              '[{"type": "create_task"}]'),
  ('blank title',           '[{"type": "create_task", "title": "  "}]'),
  ('title a number',        '[{"type": "create_task", "title": 7}]'),
  ('unknown placeholder',   '[{"type": "create_task", "title": "Call {{lead.phone}}"}]'),
  ('unclosed placeholder',  '[{"type": "create_task", "title": "Call", "notes": "About {{lead.title"}]'),
  ('misspelt argument',     '[{"type": "create_task", "title": "Call", "assignees": "owner"}]'),
  ('unknown assignee word', '[{"type": "create_task", "title": "Call", "assignee": "team"}]'),
  ('unknown user',          '[{"type": "create_task", "title": "Call", "assignee": "nobody@example.com"}]'),
  ('unknown user id',       '[{"type": "create_task", "title": "Call", "assignee": 99}]'),
  ('assignee an object',    '[{"type": "create_task", "title": "Call", "assignee": {"user": 1}}]'),
  ('group without users',   '[{"type": "create_task", "title": "Call", "assignee": "round_robin"}]'),
  ('users not a list',      '[{"type": "create_task", "title": "Call", "assignee": "balanced", "users": 1}]'),
  ('user twice in group',   '[{"type": "create_task", "title": "Call", "assignee": "round_robin", "users": [1, "anna@example.com"]}]'),
  ('users for one user',    '[{"type": "create_task", "title": "Call", "assignee": 1, "users": [1, 2]}]'),
  ('fallback for owner',    '[{"type": "create_task", "title": "Call", "fallback": "anyone"}]'),
  ('unknown fallback',      '[{"type": "create_task", "title": "Call", "assignee": "random", "users": [1], "fallback": "boss"}]'),
  ('due not an interval',   '[{"type": "create_task", "title": "Call", "due": "soon"}]'),
  ('due in the past',       '[{"type": "create_task", "title": "Call", "due": "-1 day"}]'),
  ('due too far',           '[{"type": "create_task", "title": "Call", "due": "11 years"}]'),
  ('due a number',          '[{"type": "create_task", "title": "Call", "due": 2}]'),
  ('due object bad key',    '[{"type": "create_task", "title": "Call", "due": {"field": "next_action_at", "plus": "1 day"}}]'),
  ('due unknown column',    '[{"type": "create_task", "title": "Call", "due": {"field": "call_at"}}]'),
  ('due not a date column', '[{"type": "create_task", "title": "Call", "due": {"field": "amount"}}]'),
  ('due bad offset',        '[{"type": "create_task", "title": "Call", "due": {"field": "next_action_at", "offset": "a while"}}]'),
  ('working hours, no due', '[{"type": "create_task", "title": "Call", "respect_working_hours": true}]');
INSERT INTO cases (label, event, actions) VALUES
  ('owner on unassigned',   'lead.unassigned', '[{"type": "create_task", "title": "Call"}]'),
  ('on a deleted lead',     'lead.deleted', '[{"type": "create_task", "title": "Call", "assignee": 1}]'),
  ('notify assignee, no task', 'lead.creation', '[{"type": "notify", "user": "assignee", "message": "hi"}]'),
  ('notify assignee, delayed', 'task.overdue', '[{"type": "notify", "user": "assignee", "message": "hi", "delay": "1 hour"}]');

\pset format unaligned
\pset fieldsep ' | '
SELECT c.n, c.label, r.code, r.message, r.detail, r.hint
  FROM cases c,
       pg_temp.try_sql(format('SELECT nocrm.create_automation(name => %L, event => %L, actions => %L)',
                              'rule', c.event, c.actions)) r
 ORDER BY c.n;
-- Task events take no target, and conditions on them cannot ask what "changed".
SELECT * FROM pg_temp.try_sql($$SELECT nocrm.create_automation(name => 'rule', event => 'task.overdue',
  target => 'due_at', actions => '[{"type": "add_tags", "tags": ["late"]}]')$$);
SELECT * FROM pg_temp.try_sql($$SELECT nocrm.create_automation(name => 'rule', event => 'task.completed',
  conditions => '{"field": "status", "op": "changed"}', actions => '[{"type": "add_tags", "tags": ["x"]}]')$$);
SELECT * FROM pg_temp.try_sql($$SELECT nocrm.create_automation(name => 'rule', event => 'task.done',
  actions => '[{"type": "add_tags", "tags": ["x"]}]')$$);
\pset format aligned
SELECT count(*) AS automations FROM nocrm.automations;

-- 2. Assignee "owner" (the default), due from now, placeholders in title and notes.
SELECT nocrm.create_automation(name => 'Call new leads', event => 'lead.creation',
  conditions => '{"pipeline": "Vendite"}',
  actions => '[{"type": "create_task", "title": "Call {{lead.title}}",
                "notes": "Owner {{owner.name}}, task for {{user.name}} ({{automation.name}})", "due": "2 days"}]');
INSERT INTO nocrm.leads (title, pipeline_id, user_id) VALUES ('Ferrari', 1, 1);
-- no owner: the task is made anyway, with nobody assigned, and the history says why
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Nobody''s', 1);
SELECT * FROM pg_temp.tasks();
SELECT l.title, h.event, h.actor_id, h.new_value - 'due_at' AS new_value, h.detail
  FROM nocrm.lead_history h JOIN nocrm.leads l ON l.id = h.lead_id
 WHERE h.event IN ('action.create_task', 'task.created') ORDER BY h.id;
SELECT a.automation_id = pg_temp.aid('Call new leads') AS this_rule, a.outcome,
       a.actions -> 0 -> 'type' AS type, (a.actions -> 0 -> 'result') - 'due_at'::text AS result, a.actions -> 0 -> 'detail' AS detail
  FROM nocrm.automation_runs a WHERE a.event = 'lead.creation' ORDER BY a.id;
SELECT nocrm.disable_automation(pg_temp.aid('Call new leads'));

-- 3. A named user, and groups (round robin, balanced, random) picked by the
--    group assignment code, with their counters.
SELECT nocrm.create_automation(name => 'Tasks by kind', event => 'lead.creation',
  conditions => '{"pipeline": "Onboarding"}',
  actions => '[{"type": "create_task", "title": "Welcome call", "assignee": "sara.manager@example.com"},
               {"type": "create_task", "title": "Kickoff", "assignee": "round_robin", "users": [1, 2, 3]},
               {"type": "create_task", "title": "Review", "assignee": "balanced", "users": [2, 3]},
               {"type": "create_task", "title": "Survey", "assignee": "random", "users": ["sara.manager@example.com"]}]');
SELECT action_no, user_id, position, assigned FROM nocrm.assignment_counters
 WHERE automation_id = pg_temp.aid('Tasks by kind') ORDER BY action_no, position;
-- Matteo has two open tasks, Giovanni none: balanced (by open tasks) gives
-- Giovanni the reviews until they are even, then takes turns.
INSERT INTO nocrm.tasks (lead_id, assignee_id, title)
  SELECT id, 2, 'Old task ' || i FROM nocrm.leads, generate_series(1, 2) i WHERE title = 'Ferrari';
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Onboarding ' || i, 2 FROM generate_series(1, 4) i;
SELECT l.title, string_agg(t.title || '=' || coalesce(u.name, '-'), ', ' ORDER BY t.id) AS tasks
  FROM nocrm.leads l JOIN nocrm.tasks t ON t.lead_id = l.id LEFT JOIN nocrm.users u ON u.id = t.assignee_id
 WHERE l.pipeline_id = 2 GROUP BY l.id, l.title ORDER BY l.id;
SELECT action_no, user_id, assigned FROM nocrm.assignment_counters
 WHERE automation_id = pg_temp.aid('Tasks by kind') ORDER BY action_no, position;
-- Nobody available: unassigned, logged; an inactive named user: unassigned too.
UPDATE nocrm.users SET active = false WHERE id IN (2, 4);
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Onboarding 5', 2);
SELECT t.title, t.assignee_id FROM nocrm.tasks t JOIN nocrm.leads l ON l.id = t.lead_id
 WHERE l.title = 'Onboarding 5' ORDER BY t.id;
SELECT h.detail FROM nocrm.lead_history h JOIN nocrm.leads l ON l.id = h.lead_id
 WHERE l.title = 'Onboarding 5' AND h.event = 'action.create_task' ORDER BY h.id;
-- With "fallback": "anyone" an unavailable member is taken.
SELECT nocrm.update_automation(pg_temp.aid('Tasks by kind'), actions => '[{"type": "create_task", "title": "Survey", "assignee": "random",
  "users": ["sara.manager@example.com"], "fallback": "anyone"}]');
UPDATE nocrm.users SET active = true WHERE id = 4;
INSERT INTO nocrm.absences (user_id, starts_at, ends_at) VALUES (4, now() - interval '1 day', now() + interval '1 day');
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Onboarding 6', 2);
SELECT t.title, u.name, h.detail FROM nocrm.tasks t JOIN nocrm.leads l ON l.id = t.lead_id
  JOIN nocrm.users u ON u.id = t.assignee_id
  JOIN nocrm.lead_history h ON h.lead_id = l.id AND h.event = 'action.create_task'
 WHERE l.title = 'Onboarding 6';
UPDATE nocrm.users SET active = true WHERE id = 2;
DELETE FROM nocrm.absences;
SELECT nocrm.delete_automation(pg_temp.aid('Tasks by kind'));

-- 4. Due from a date column of the lead (timestamptz, date), with an
--    offset; empty; moved into the assignee's working hours.
ALTER TABLE nocrm.leads ADD COLUMN call_date date;
-- Sara works Monday to Friday, 09:00-18:00 UTC.
INSERT INTO nocrm.working_hours (user_id, weekday, starts, ends)
  SELECT 4, d, '09:00', '18:00' FROM generate_series(1, 5) d;
SELECT nocrm.create_automation(name => 'Prepare', event => 'lead.creation',
  conditions => '{"pipeline": "Vendite", "owner": 4}',
  actions => '[{"type": "create_task", "title": "Prepare the call", "due": {"field": "next_action_at", "offset": "-1 day"}},
               {"type": "create_task", "title": "Confirm", "due": {"field": "call_date"}},
               {"type": "create_task", "title": "Prepare (working hours)", "respect_working_hours": true,
                "due": {"field": "next_action_at", "offset": "-1 day"}}]');
-- 2030-01-13 10:00 UTC is a Sunday: the day before is a Saturday, moved to Monday 09:00.
INSERT INTO nocrm.leads (title, pipeline_id, user_id, next_action_at, call_date)
VALUES ('Dated', 1, 4, '2030-01-13 10:00+00', '2030-02-01');
INSERT INTO nocrm.leads (title, pipeline_id, user_id) VALUES ('Undated', 1, 4);
SELECT t.lead, t.title, t.assignee, t.due FROM pg_temp.tasks() t WHERE t.lead IN ('Dated', 'Undated');
SELECT l.title, h.detail FROM nocrm.lead_history h JOIN nocrm.leads l ON l.id = h.lead_id
 WHERE l.title IN ('Dated', 'Undated') AND h.event = 'action.create_task' ORDER BY h.id;
-- The columns "due" reads cannot be dropped while the rule uses them.
SELECT * FROM pg_temp.try_sql('ALTER TABLE nocrm.leads DROP COLUMN call_date');

-- 5. explain() and test mode describe the task the action would make.
SELECT name, would_fire, actions FROM nocrm.explain((SELECT id FROM nocrm.leads WHERE title = 'Dated'), 'lead.creation')
 WHERE name = 'Prepare';
SELECT nocrm.create_automation(name => 'Try tasks', event => 'lead.creation', mode => 'test',
  conditions => '{"pipeline": "Vendite", "owner": 4}',
  actions => '[{"type": "create_task", "title": "Try {{lead.title}}", "assignee": "round_robin", "users": [2, 3]}]');
INSERT INTO nocrm.leads (title, pipeline_id, user_id) VALUES ('Tried', 1, 4);
SELECT r.outcome, r.actions FROM nocrm.automation_runs r JOIN nocrm.leads l ON l.id = r.lead_id
 WHERE l.title = 'Tried' AND r.outcome = 'test';
SELECT count(*) AS tasks_of_test_mode FROM nocrm.tasks WHERE title LIKE 'Try %';
SELECT nocrm.disable_automation(id) FROM nocrm.automations WHERE name IN ('Prepare', 'Try tasks');

-- 6. Rules on task events judge and act on the task's lead.
SELECT nocrm.create_automation(name => 'Task made', event => 'task.created',
  conditions => '{"pipeline": "Vendite"}', actions => '[{"type": "add_tags", "tags": ["has task"]}]');
SELECT nocrm.create_automation(name => 'Task done', event => 'task.completed',
  actions => '[{"type": "comment", "body": "A task is done"}, {"type": "set_status", "status": "standby"}]');
INSERT INTO nocrm.leads (title, pipeline_id, user_id) VALUES ('Manual', 1, 3), ('Elsewhere', 2, 3);
-- by hand, as Giovanni: created_by comes from nocrm.actor
SET nocrm.actor = 'giovanni@example.com';
INSERT INTO nocrm.tasks (lead_id, assignee_id, title)
  SELECT id, 3, 'Send the brochure' FROM nocrm.leads WHERE title IN ('Manual', 'Elsewhere') ORDER BY id;
RESET nocrm.actor;
SELECT l.title, array(SELECT g.name FROM nocrm.tags g WHERE g.lead_id = l.id) AS tags, t.created_by
  FROM nocrm.leads l JOIN nocrm.tasks t ON t.lead_id = l.id WHERE l.title IN ('Manual', 'Elsewhere') ORDER BY l.id;
-- completing it: complete_task() or done_at set from NULL; later writes of done_at raise nothing
SELECT id, title, done_at IS NOT NULL AS done
  FROM nocrm.complete_task((SELECT t.id FROM nocrm.tasks t JOIN nocrm.leads l ON l.id = t.lead_id WHERE l.title = 'Manual'));
UPDATE nocrm.tasks SET done_at = now() WHERE lead_id = (SELECT id FROM nocrm.leads WHERE title = 'Elsewhere');
UPDATE nocrm.tasks SET done_at = now() - interval '1 hour' WHERE lead_id = (SELECT id FROM nocrm.leads WHERE title = 'Elsewhere');
SELECT l.title, l.status, (SELECT count(*) FROM nocrm.comments c WHERE c.lead_id = l.id AND c.body = 'A task is done') AS comments
  FROM nocrm.leads l WHERE l.title IN ('Manual', 'Elsewhere') ORDER BY l.id;
SELECT code, message, hint FROM pg_temp.try_sql($$SELECT nocrm.complete_task((SELECT t.id FROM nocrm.tasks t JOIN nocrm.leads l ON l.id = t.lead_id WHERE l.title = 'Manual'))$$);
SELECT code, message FROM pg_temp.try_sql('SELECT nocrm.complete_task(9999)');
SELECT code, message FROM pg_temp.try_sql('SELECT nocrm.complete_task(NULL)');
-- A task inserted done raises both events.
INSERT INTO nocrm.leads (title, pipeline_id, user_id) VALUES ('Logged call', 1, 3);
INSERT INTO nocrm.tasks (lead_id, title, done_at) SELECT id, 'Called', now() FROM nocrm.leads WHERE title = 'Logged call';
SELECT event, new_value - 'due_at' - 'done_at' - 'task_id' AS new_value FROM nocrm.lead_history
 WHERE lead_id = (SELECT id FROM nocrm.leads WHERE title = 'Logged call') AND event LIKE 'task.%' ORDER BY id;
-- A task made by create_task raises task.created inside the rule's chain.
SELECT nocrm.enable_automation(pg_temp.aid('Call new leads'));
INSERT INTO nocrm.leads (title, pipeline_id, user_id) VALUES ('Chained', 1, 1);
SELECT event, (SELECT name FROM nocrm.automations a WHERE a.id = automation_id) AS automation, chain_depth, detail FROM nocrm.lead_history
 WHERE lead_id = (SELECT id FROM nocrm.leads WHERE title = 'Chained')
   AND event IN ('action.create_task', 'task.created', 'action.add_tags') ORDER BY id;
SELECT nocrm.disable_automation(pg_temp.aid('Call new leads'));

-- 7. task.overdue: each drain round raises it once per open task whose due
--    time passed, through the partial index.
SELECT nocrm.create_automation(name => 'Overdue', event => 'task.overdue',
  conditions => '{"status": ["todo", "standby"]}',
  actions => '[{"type": "notify", "user": "owner", "message": "Overdue task on {{lead.title}}"}]');
INSERT INTO nocrm.leads (title, pipeline_id, user_id) VALUES ('Late', 2, 2), ('Lost and late', 2, 2);
UPDATE nocrm.leads SET status = 'lost' WHERE title = 'Lost and late';
INSERT INTO nocrm.tasks (lead_id, assignee_id, title, due_at)
  SELECT l.id, 2, x.title, now() + x.due
    FROM nocrm.leads l, (VALUES ('Past', interval '-1 hour'), ('Future', interval '1 day')) x(title, due)
   WHERE l.title IN ('Late', 'Lost and late') ORDER BY l.id, x.title;
INSERT INTO nocrm.tasks (lead_id, title, due_at, done_at)
  SELECT id, 'Done long ago', now() - interval '2 days', now() - interval '1 day' FROM nocrm.leads WHERE title = 'Late';
SET enable_seqscan = off;
EXPLAIN (COSTS OFF) SELECT id FROM nocrm.tasks
 WHERE done_at IS NULL AND overdue_at IS NULL AND due_at <= now() ORDER BY due_at LIMIT 100;
RESET enable_seqscan;
-- explain() judges a task.overdue rule on a lead like the drain will
SELECT l.title, e.would_fire, e.reason FROM nocrm.leads l, nocrm.explain(l.id, 'task.overdue') e
 WHERE l.title IN ('Late', 'Lost and late') ORDER BY l.id;
SELECT nocrm.raise_overdue_tasks() AS raised;
SELECT nocrm.raise_overdue_tasks() AS raised_again;
SELECT l.title AS lead, t.title, t.overdue_at IS NOT NULL AS raised
  FROM nocrm.tasks t JOIN nocrm.leads l ON l.id = t.lead_id WHERE l.title IN ('Late', 'Lost and late') ORDER BY t.id;
-- the rule judged each lead: only the open one notified its owner
SELECT user_id, message FROM nocrm.notifications WHERE message LIKE 'Overdue%' ORDER BY id;
SELECT l.title, r.outcome FROM nocrm.automation_runs r JOIN nocrm.leads l ON l.id = r.lead_id
 WHERE r.event = 'task.overdue' ORDER BY r.id;
-- Put off (due_at changed): it may be overdue again; the drain finds it.
UPDATE nocrm.tasks SET due_at = now() - interval '1 minute'
 WHERE title = 'Past' AND lead_id = (SELECT id FROM nocrm.leads WHERE title = 'Late');
SELECT t.overdue_at IS NULL AS rearmed FROM nocrm.tasks t
 WHERE title = 'Past' AND lead_id = (SELECT id FROM nocrm.leads WHERE title = 'Late');
CALL nocrm.drain(0);
SELECT count(*) AS overdue_notifications FROM nocrm.notifications WHERE message LIKE 'Overdue%';
SELECT t.overdue_at IS NOT NULL AS raised FROM nocrm.tasks t
 WHERE title = 'Past' AND lead_id = (SELECT id FROM nocrm.leads WHERE title = 'Late');
-- A rule that fails on one task rolls back alone: the task is marked
-- anyway (raised once), the lead's history says why, the next task goes on.
SELECT nocrm.create_automation(name => 'Bad', event => 'task.overdue',
  conditions => '{"has_tag": "bad"}',
  actions => '[{"type": "set_field", "field": "probability", "value": 150}]');
INSERT INTO nocrm.leads (title, pipeline_id, user_id) VALUES ('Bad lead', 2, 2), ('Good lead', 2, 2);
INSERT INTO nocrm.tags (lead_id, name) SELECT id, 'bad' FROM nocrm.leads WHERE title = 'Bad lead';
INSERT INTO nocrm.tasks (lead_id, title, due_at)
  SELECT id, 'Check', now() - interval '1 day' * (3 - id % 2) FROM nocrm.leads WHERE title IN ('Bad lead', 'Good lead');
SELECT nocrm.raise_overdue_tasks() AS raised;
SELECT l.title, t.overdue_at IS NOT NULL AS raised,
       (SELECT count(*) FROM nocrm.notifications n WHERE n.lead_id = l.id) AS notified,
       (SELECT h.detail FROM nocrm.lead_history h WHERE h.lead_id = l.id AND h.event = 'task.overdue') AS detail
  FROM nocrm.tasks t JOIN nocrm.leads l ON l.id = t.lead_id WHERE t.title = 'Check' ORDER BY l.id;
SELECT nocrm.raise_overdue_tasks() AS raised_again;
SELECT nocrm.delete_automation(pg_temp.aid('Bad'));
-- notify "assignee" on a task event: the task's assignee, not the lead's owner.
SELECT nocrm.create_automation(name => 'Tell the assignee', event => 'task.overdue',
  actions => '[{"type": "notify", "user": "assignee", "message": "Your task on {{lead.title}} is late"}]');
INSERT INTO nocrm.leads (title, pipeline_id, user_id) VALUES ('Assigned', 2, 2);
INSERT INTO nocrm.tasks (lead_id, assignee_id, title, due_at)
  SELECT id, 4, 'Sara''s', now() - interval '1 minute' FROM nocrm.leads WHERE title = 'Assigned';
INSERT INTO nocrm.tasks (lead_id, title, due_at)
  SELECT id, 'Nobody''s', now() - interval '2 minutes' FROM nocrm.leads WHERE title = 'Assigned';
SELECT nocrm.raise_overdue_tasks() AS raised;
SELECT n.user_id, n.message FROM nocrm.notifications n JOIN nocrm.leads l ON l.id = n.lead_id
 WHERE l.title = 'Assigned' ORDER BY n.id;
SELECT h.detail FROM nocrm.lead_history h JOIN nocrm.leads l ON l.id = h.lead_id
 WHERE l.title = 'Assigned' AND h.event = 'action.notify' ORDER BY h.id;
SELECT nocrm.delete_automation(pg_temp.aid('Tell the assignee'));

-- 8. The timeline tells the task's story.
SELECT who, what, regexp_replace(detail, '"done_at": .*$', '"done_at": (time)') AS detail
  FROM nocrm.lead_timeline((SELECT id FROM nocrm.leads WHERE title = 'Manual'))
 WHERE what LIKE 'task.%' OR what LIKE 'action.%';
SELECT who, what FROM nocrm.lead_timeline((SELECT id FROM nocrm.leads WHERE title = 'Late'))
 WHERE what LIKE 'task.%';

-- 9. A delayed create_task is made by the drain when due.
SELECT nocrm.create_automation(name => 'Follow up', event => 'lead.creation',
  conditions => '{"pipeline": "Vendite", "owner": 3}',
  actions => '[{"type": "create_task", "title": "Follow up {{lead.title}}", "due": "1 day", "delay": "1 hour"}]');
INSERT INTO nocrm.leads (title, pipeline_id, user_id) VALUES ('Later', 1, 3);
SELECT count(*) AS tasks_now FROM nocrm.tasks WHERE title = 'Follow up Later';
UPDATE nocrm.queue SET run_at = now() - interval '1 second' WHERE kind = 'action' AND state = 'pending';
CALL nocrm.drain(0);
SELECT t.title, t.assignee, t.due, t.created_by, t.rule_version FROM pg_temp.tasks() t WHERE t.lead = 'Later';

-- 10. Agents work with tasks; what the engine keeps they cannot write.
CREATE ROLE regress_tasks_agent IN ROLE nocrm_agent;
SET ROLE regress_tasks_agent;
SET nocrm.actor = 'anna@example.com';
INSERT INTO nocrm.tasks (lead_id, assignee_id, title, due_at)
  SELECT id, 1, 'Agent task', '2030-03-01 09:00+00' FROM nocrm.leads WHERE title = 'Ferrari'
  RETURNING title, created_by, automation_id;
SELECT title, done_at IS NOT NULL AS done FROM nocrm.complete_task((SELECT max(id) FROM nocrm.tasks));
SELECT code, message FROM pg_temp.try_sql($$INSERT INTO nocrm.tasks (lead_id, title, created_by) VALUES (1, 'x', 0)$$);
SELECT code, message FROM pg_temp.try_sql($$UPDATE nocrm.tasks SET overdue_at = NULL$$);
SELECT code, message FROM pg_temp.try_sql('SELECT nocrm.raise_overdue_tasks()');
RESET nocrm.actor;
RESET ROLE;
DROP ROLE regress_tasks_agent;

-- 11. A lead's tasks go with it.
SELECT id AS ferrari FROM nocrm.leads WHERE title = 'Ferrari' \gset
SELECT count(*) AS tasks_of_ferrari FROM nocrm.tasks WHERE lead_id = :ferrari;
DELETE FROM nocrm.leads WHERE id = :ferrari;
SELECT count(*) AS tasks_of_ferrari FROM nocrm.tasks WHERE lead_id = :ferrari;
