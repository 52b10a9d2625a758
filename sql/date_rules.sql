-- Date rules: lead.date.reached fires at a date column + date_offset, found
-- by the drain in nocrm.date_firings; rescheduled when the date changes.
\i test/fixtures/crm.sql
CREATE FUNCTION pg_temp.firings() RETURNS TABLE (automation_id int, lead text, days_ahead numeric, state text, detail text)
LANGUAGE sql AS $$
  SELECT f.automation_id, l.title, round(extract(epoch FROM f.due_at - now()) / 86400, 1), f.state, f.detail
    FROM nocrm.date_firings f JOIN nocrm.leads l ON l.id = f.lead_id
   ORDER BY f.automation_id, l.id, f.date_value
$$;

-- 1. "3 days before next_action_at": scheduled when the date is written.
SELECT nocrm.create_automation(name => 'Prepare the call', event => 'lead.date.reached',
  target => 'next_action_at', conditions => '{"status": ["todo", "standby"]}',
  actions => '[{"type": "add_tags", "tags": ["call soon"]},
               {"type": "notify", "user": "owner", "message": "Call {{lead.title}} in 3 days"}]');
SELECT nocrm.set_date_offset(1, '-3 days');
INSERT INTO nocrm.leads (title, user_id, next_action_at) VALUES
  ('Call in 10 days', 1, now() + interval '10 days'),
  ('No date', 1, NULL);
SELECT * FROM pg_temp.firings();
-- Moved: the pending firing moves with it.
UPDATE nocrm.leads SET next_action_at = now() + interval '20 days' WHERE title = 'Call in 10 days';
SELECT * FROM pg_temp.firings();
-- Other changes leave it alone.
UPDATE nocrm.leads SET description = 'x' WHERE title = 'Call in 10 days';
SELECT count(*) AS firings FROM nocrm.date_firings;
-- Nothing is due yet.
SELECT nocrm.fire_due_date_rules();
SELECT id, would_fire, reason, conditions->'next_firing' IS NOT NULL AS has_next_firing
  FROM nocrm.explain(1, 'lead.date.reached');

-- 2. Due (time moves on): it fires once, as the Butler.
UPDATE nocrm.date_firings SET due_at = now() - interval '1 minute';
SELECT nocrm.fire_due_date_rules();
SELECT * FROM pg_temp.firings();
SELECT name FROM nocrm.tags WHERE lead_id = 1;
SELECT user_id, message FROM nocrm.notifications WHERE lead_id = 1;
SELECT automation_id, event, outcome, actor_id FROM nocrm.automation_runs WHERE lead_id = 1;
SELECT event, actor_id, automation_id FROM nocrm.lead_history WHERE lead_id = 1 AND event LIKE 'action.%' ORDER BY id;
SELECT nocrm.fire_due_date_rules() AS fired_again;
-- The same date again does not fire again; a new date does.
UPDATE nocrm.leads SET next_action_at = next_action_at WHERE id = 1;
UPDATE nocrm.leads SET next_action_at = next_action_at + interval '1 day' WHERE id = 1;
SELECT * FROM pg_temp.firings();

-- 3. Conditions that no longer hold when due: skipped, with a history row.
UPDATE nocrm.leads SET status = 'lost' WHERE id = 1;
UPDATE nocrm.date_firings SET due_at = now() - interval '1 minute' WHERE state = 'pending';
SELECT nocrm.fire_due_date_rules();
SELECT * FROM pg_temp.firings();
SELECT event, automation_id, detail FROM nocrm.lead_history WHERE lead_id = 1 AND event = 'automation.skipped';
SELECT outcome, detail FROM nocrm.automation_runs WHERE lead_id = 1 ORDER BY id;

-- 4. A stale rule: 14 days without an update (updated_at + 14 days).
SELECT nocrm.create_automation(name => 'Stale', event => 'lead.date.reached', target => 'updated_at',
  actions => '[{"type": "add_tags", "tags": ["stale"]}]');
SELECT nocrm.set_date_offset(2, '14 days');
-- Created now: the leads already there are scheduled (their dates are ahead).
SELECT automation_id, lead, days_ahead, state FROM pg_temp.firings() WHERE automation_id = 2;
INSERT INTO nocrm.leads (title) VALUES ('Fresh');
SELECT count(*) AS stale_firings_of_fresh FROM nocrm.date_firings f JOIN nocrm.leads l ON l.id = f.lead_id
 WHERE f.automation_id = 2 AND l.title = 'Fresh';
UPDATE nocrm.leads SET title = 'Fresh, touched' WHERE title = 'Fresh';
SELECT count(*) AS pending FROM nocrm.date_firings f JOIN nocrm.leads l ON l.id = f.lead_id
 WHERE f.automation_id = 2 AND l.title = 'Fresh, touched' AND f.state = 'pending';
-- Disabled: its pending firings go; enabled again: scheduled again.
SELECT nocrm.disable_automation(2);
SELECT count(*) AS pending_of_disabled FROM nocrm.date_firings WHERE automation_id = 2;
SELECT nocrm.enable_automation(2);
SELECT count(*) > 0 AS scheduled_again FROM nocrm.date_firings WHERE automation_id = 2 AND state = 'pending';
-- A deleted lead takes its firings with it.
DELETE FROM nocrm.leads WHERE title = 'Fresh, touched';
SELECT count(*) AS orphans FROM nocrm.date_firings f WHERE NOT EXISTS (SELECT 1 FROM nocrm.leads l WHERE l.id = f.lead_id);

-- 5. The gate: with history = actions, only rows that set or change a rule's date are looked at.
SELECT nocrm.disable_automation(2);
SET nocrm.history = actions;
SELECT passed, skipped FROM nocrm.gate_counters() WHERE gate = 'lead insert' \gset before_
INSERT INTO nocrm.leads (title) SELECT 'undated ' || g FROM generate_series(1, 5) g;
INSERT INTO nocrm.leads (title, next_action_at) VALUES ('dated', now() + interval '30 days');
SELECT passed - :before_passed AS passed, skipped - :before_skipped AS skipped
  FROM nocrm.gate_counters() WHERE gate = 'lead insert';
SELECT lead, days_ahead, state FROM pg_temp.firings() WHERE lead = 'dated';
RESET nocrm.history;

-- 6. Refused when written.
\set SHOW_CONTEXT never
SELECT nocrm.create_automation(name => 'x', event => 'lead.date.reached', actions => '[{"type": "comment", "body": "x"}]');
SELECT nocrm.create_automation(name => 'x', event => 'lead.date.reached', target => 'nxt_action', actions => '[{"type": "comment", "body": "x"}]');
SELECT nocrm.create_automation(name => 'x', event => 'lead.date.reached', target => 'title', actions => '[{"type": "comment", "body": "x"}]');
SELECT nocrm.set_date_offset(99, '1 day');
SELECT nocrm.create_automation(name => 'On creation', event => 'lead.creation',
  actions => '[{"type": "comment", "body": "x"}]') AS creation_rule \gset
SELECT nocrm.set_date_offset(:creation_rule, '1 day');
SELECT nocrm.create_automation(name => 'x', event => 'lead.date.reached', target => 'next_action_at',
  conditions => '{"field": "amount", "op": "changed"}', actions => '[{"type": "comment", "body": "x"}]');
\set SHOW_CONTEXT errors

-- 7. An admin (no rights on date_firings or leads) creates a date rule: scheduled all the same.
CREATE ROLE regress_date_admin;
GRANT nocrm_admin TO regress_date_admin;
SET ROLE regress_date_admin;
SELECT nocrm.create_automation(name => 'Admin date rule', event => 'lead.date.reached', target => 'next_action_at',
  actions => '[{"type": "add_tags", "tags": ["admin"]}]') AS admin_rule \gset
SELECT count(*) > 0 AS scheduled FROM nocrm.date_firings WHERE automation_id = :admin_rule;
-- firing is the drain's (the owner's) work
SELECT nocrm.fire_due_date_rules();
RESET ROLE;
DROP OWNED BY regress_date_admin;
DROP ROLE regress_date_admin;

-- 8. Dates beyond what timestamptz holds (fuzz findings): the write goes
-- through, nothing is scheduled; date_offset is bounded.
ALTER TABLE nocrm.leads ADD COLUMN renew_on date;
SELECT nocrm.create_automation(name => 'Far', event => 'lead.date.reached', target => 'renew_on',
  actions => '[{"type": "add_tags", "tags": ["far"]}]') AS far_rule \gset
SELECT nocrm.set_date_offset(:far_rule, '1 day');
INSERT INTO nocrm.leads (title, renew_on) VALUES ('beyond timestamptz', '300000-01-01');
INSERT INTO nocrm.leads (title, next_action_at) VALUES ('at the end of time', '294276-12-31 23:59:59+00');
INSERT INTO nocrm.leads (title, renew_on) VALUES ('infinite', 'infinity');
SELECT l.title, count(f.*) AS firings FROM nocrm.leads l LEFT JOIN nocrm.date_firings f ON f.lead_id = l.id
 WHERE l.title IN ('beyond timestamptz', 'at the end of time', 'infinite') GROUP BY l.id, l.title ORDER BY l.id;
\set SHOW_CONTEXT never
SELECT nocrm.set_date_offset(:far_rule, '101 years');
SELECT nocrm.set_date_offset(:far_rule, '-101 years');
\set SHOW_CONTEXT errors
SELECT nocrm.set_date_offset(:far_rule, '-100 years');

-- 9. A date rule's column cannot be dropped while the rule exists.
\set SHOW_CONTEXT never
ALTER TABLE nocrm.leads DROP COLUMN renew_on;
\set SHOW_CONTEXT errors
