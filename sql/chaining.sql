-- Chaining: an action's own change raises events that fire other automations,
-- bounded by nocrm.max_chain_depth, and no automation re-fires in its own chain.
\i test/fixtures/crm.sql

-- 1. A chain: creation -> assign (raises lead.assigned) -> notify the new owner.
SELECT nocrm.create_automation(name => 'Assign to Anna', event => 'lead.creation',
  actions => '[{"type": "assign", "user": 1}]');
SELECT nocrm.create_automation(name => 'Tell the owner', event => 'lead.assigned',
  actions => '[{"type": "notify", "user": "owner", "message": "A lead is yours"}]');
INSERT INTO nocrm.leads (title) VALUES ('Chain');
SELECT event, actor_id, automation_id, chain_depth, new_value, detail
  FROM nocrm.lead_history ORDER BY id;
SELECT user_id, lead_id, automation_id, message FROM nocrm.notifications;

-- 2. A loop between two automations: won -> standby -> won -> ...
SELECT nocrm.create_automation(name => 'Won reopens', event => 'lead.status.changed.to',
  target => 'won', actions => '[{"type": "set_status", "status": "standby"}]');
SELECT nocrm.create_automation(name => 'Standby wins', event => 'lead.status.changed.to',
  target => 'standby', actions => '[{"type": "set_status", "status": "won"}]');
TRUNCATE nocrm.lead_history;
UPDATE nocrm.leads SET status = 'won' WHERE title = 'Chain';
-- It ends with a logged stop, not an error: each automation ran once.
SELECT event, actor_id, automation_id, chain_depth, old_value, new_value, detail
  FROM nocrm.lead_history ORDER BY id;
SELECT status FROM nocrm.leads WHERE title = 'Chain';

-- 3. A rule that feeds itself (any tag change adds a tag) stops at once.
SELECT nocrm.create_automation(name => 'Tag echo', event => 'lead.any_update',
  conditions => '{"has_tag": "echo"}', actions => '[{"type": "add_tags", "tags": ["echoed"]}]');
TRUNCATE nocrm.lead_history;
INSERT INTO nocrm.tags (lead_id, name) VALUES (1, 'echo');
SELECT event, automation_id, chain_depth, new_value, detail FROM nocrm.lead_history ORDER BY id;

-- 4. The depth limit: a chain of distinct automations, each moving the lead on.
SELECT nocrm.disable_automation(id) FROM nocrm.automations ORDER BY id;
INSERT INTO nocrm.leads (title, pipeline_id, step_id) VALUES ('Stairs', 1, 4);
SELECT nocrm.create_automation(name => 'Step ' || s.name || ' -> next', event => 'lead.step.changed.to',
         target => s.name, conditions => '{"pipeline": "Vendite"}',
         actions => jsonb_build_array(jsonb_build_object('type', 'set_step', 'step', n.name)))
  FROM nocrm.steps s JOIN nocrm.steps n ON n.pipeline_id = s.pipeline_id AND n.position = s.position + 1
 WHERE s.pipeline_id = 1 ORDER BY s.position;
SET nocrm.max_chain_depth = 2;
TRUNCATE nocrm.lead_history;
-- Nuovo -(6)-> Qualificato -(7)-> Preventivo; automation 8 would make depth 3: stopped.
UPDATE nocrm.leads SET step_id = 1 WHERE title = 'Stairs';
SELECT s.name AS step FROM nocrm.leads l JOIN nocrm.steps s ON s.id = l.step_id WHERE l.title = 'Stairs';
SELECT event, automation_id, chain_depth, new_value, detail
  FROM nocrm.lead_history WHERE event <> 'lead.any_update' ORDER BY id;

-- Depth 1: automations run on people's changes only, never on their own:
-- Nuovo -(6)-> Qualificato, then automation 7 is stopped.
SET nocrm.max_chain_depth = 1;
UPDATE nocrm.leads SET step_id = 1 WHERE title = 'Stairs';
SELECT s.name AS step FROM nocrm.leads l JOIN nocrm.steps s ON s.id = l.step_id WHERE l.title = 'Stairs';
RESET nocrm.max_chain_depth;
-- Depth 0 is not a valid setting (nocrm.automations_enabled turns automations off).
SET nocrm.max_chain_depth = 0;

-- 5. nocrm.automations_enabled = off: events are recorded, nothing fires.
SET nocrm.automations_enabled = off;
TRUNCATE nocrm.lead_history;
UPDATE nocrm.leads SET step_id = 1 WHERE title = 'Stairs';
SELECT event, automation_id FROM nocrm.lead_history ORDER BY id;
RESET nocrm.automations_enabled;
SELECT s.name AS step FROM nocrm.leads l JOIN nocrm.steps s ON s.id = l.step_id WHERE l.title = 'Stairs';
