-- Roles: nocrm_agent works with leads; nocrm_admin manages rules and
-- settings.  Triggers write with the extension owner's rights, so agents
-- get automations and history without being able to touch either.
\i test/fixtures/crm.sql
SET client_min_messages = warning;
DROP ROLE IF EXISTS regress_nocrm_agent;
DROP ROLE IF EXISTS regress_nocrm_admin;
RESET client_min_messages;
CREATE ROLE regress_nocrm_agent LOGIN IN ROLE nocrm_agent;
CREATE ROLE regress_nocrm_admin LOGIN IN ROLE nocrm_admin;

SELECT nocrm.create_automation(name => 'rr', event => 'lead.creation',
  actions => '[{"type": "assign_round_robin", "users": [1, 2]},
               {"type": "notify", "user": "owner", "message": "New: {{lead.title}}", "channels": ["browser", "email"]}]');
SELECT nocrm.create_stage_trigger(pipeline => 'Vendite', step => 'Chiusura', kind => 'custom',
                                  params => '{"code": "paid"}');

\set VERBOSITY terse
-- The agent's day: leads, tags, comments, emails; automations run for them.
SET ROLE regress_nocrm_agent;
SET nocrm.actor = 'anna@example.com';
INSERT INTO nocrm.leads (title, pipeline_id, contact_email) VALUES ('By an agent', 1, 'c@client.example');
INSERT INTO nocrm.tags (lead_id, name) VALUES (1, 'B2B');
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (1, 1, 'called them');
INSERT INTO nocrm.emails (lead_id, from_address, subject) VALUES (1, 'c@client.example', 'Re: offer');
SELECT id, title, user_id FROM nocrm.leads;
SELECT event, actor_id, automation_id FROM nocrm.lead_history ORDER BY id;
SELECT user_id, message FROM nocrm.notifications;
UPDATE nocrm.notifications SET read_at = now() WHERE user_id = 1;
SELECT nocrm.fire_trigger(1, 'paid');
SELECT what FROM nocrm.lead_timeline(1) WHERE what LIKE 'trigger%';
-- ... and what it cannot do: read or change rules, the queue, the run log,
-- write history, act as the Butler, switch automations off, read credentials.
SELECT count(*) FROM nocrm.automations;
SELECT count(*) FROM nocrm.queue;
SELECT count(*) FROM nocrm.automation_runs;
SELECT count(*) FROM nocrm.assignment_counters;
SELECT nocrm.create_automation(name => 'sneaky', event => 'lead.creation', actions => '[{"type": "add_tags", "tags": "x"}]');
INSERT INTO nocrm.lead_history (lead_id, event) VALUES (1, 'lead.won.by.me');
UPDATE nocrm.lead_history SET actor_id = 1;
DELETE FROM nocrm.lead_history;
UPDATE nocrm.users SET name = 'Me' WHERE is_butler;
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (1, 0, 'I am the Butler');
SET nocrm.actor = '0';
UPDATE nocrm.leads SET title = 'renamed' WHERE id = 1;
RESET nocrm.actor;
SET nocrm.automations_enabled = off;
SET nocrm.history = 'none';
SHOW nocrm.smtp_password;
SHOW nocrm.webhook_secret;
SELECT * FROM nocrm.explain(1, 'lead.commented');
SELECT nocrm.requeue_dead();
RESET ROLE;

-- The admin manages rules, templates, triggers and most settings.
SET ROLE regress_nocrm_admin;
SELECT nocrm.create_automation(name => 'admin rule', event => 'lead.commented',
  actions => '[{"type": "add_tags", "tags": "commented"}]');
SELECT nocrm.create_stage_trigger(pipeline => 'Vendite', step => 'Qualificato', kind => 'comment_added');
INSERT INTO nocrm.email_templates (name, subject, body) VALUES ('admin_tpl', 'Hi {{lead.title}}', 'x');
SELECT kind, state FROM nocrm.queue ORDER BY id;
SELECT count(*) > 0 AS sees_runs FROM nocrm.automation_runs;
SELECT kind, would_fire FROM nocrm.explain(1, 'lead.commented') ORDER BY kind, id;
SET nocrm.max_chain_depth = 3;
SET nocrm.smtp_url = 'smtp://mail.example.com:587';
RESET nocrm.smtp_url;
RESET nocrm.max_chain_depth;
-- ... but not credentials, and history stays read-only for admins too.
SET nocrm.smtp_password = 'secret';
SET nocrm.webhook_secret = 'secret';
INSERT INTO nocrm.lead_history (lead_id, event) VALUES (1, 'forged');
DELETE FROM nocrm.lead_history;
RESET ROLE;

-- A caller's search_path cannot redirect the triggers: an operator planted
-- ahead of pg_catalog is ignored inside them.
CREATE SCHEMA regress_evil;
CREATE FUNCTION regress_evil.never(bigint, bigint) RETURNS boolean LANGUAGE sql AS 'SELECT false';
CREATE OPERATOR regress_evil.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = regress_evil.never);
GRANT USAGE ON SCHEMA regress_evil TO regress_nocrm_agent;
SET ROLE regress_nocrm_agent;
SET search_path = regress_evil, pg_catalog, public;
SELECT 1::bigint = 1::bigint AS planted_operator_applies_here;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Second', 1);
SELECT title, user_id FROM nocrm.leads ORDER BY id;
RESET search_path;
RESET ROLE;
DROP SCHEMA regress_evil CASCADE;
\set VERBOSITY default

-- Everything that runs with the owner's rights has a pinned path, pg_temp last.
SELECT p.proname, p.proconfig
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'nocrm' AND p.prosecdef
 ORDER BY p.proname;

DROP ROLE regress_nocrm_agent;
DROP ROLE regress_nocrm_admin;
