-- Rule versions: every change of an automation or stage trigger is kept and can be reverted.
\i test/fixtures/crm.sql
SET nocrm.actor = 'sara.manager@example.com';
SELECT nocrm.create_automation(name => 'Welcome', event => 'lead.creation',
  actions => '[{"type": "add_tags", "tags": ["new"]}]');
SELECT nocrm.update_automation(1, conditions => '{"pipeline": "Vendite"}');
SELECT nocrm.rename_automation(1, 'Welcome Vendite');
SELECT nocrm.set_automation_options(1, once_per_lead => true);
-- a write that changes nothing is no version
UPDATE nocrm.automations SET name = name WHERE id = 1;
RESET nocrm.actor;
SELECT version, operation, actor_id, changed_by = session_user AS by_me,
       definition->>'name' AS name, definition->'conditions' AS conditions,
       definition->'once_per_lead' AS once, detail
  FROM nocrm.rule_versions WHERE kind = 'automation' AND object_id = 1 ORDER BY version;

-- Revert to version 1: the definition comes back (validated), as a new version.
SELECT nocrm.revert_automation(1, 1);
SELECT name, conditions, once_per_lead FROM nocrm.automations WHERE id = 1;
SELECT version, operation, detail, definition->>'name' AS name FROM nocrm.rule_versions
 WHERE kind = 'automation' AND object_id = 1 ORDER BY version DESC LIMIT 1;

-- Deleted, then brought back with its id.
SELECT nocrm.delete_automation(1);
SELECT version, operation FROM nocrm.rule_versions WHERE kind = 'automation' AND object_id = 1 ORDER BY version DESC LIMIT 1;
SELECT nocrm.revert_automation(1, 3);
SELECT id, name, conditions FROM nocrm.automations;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('After the revert', 1);
SELECT name FROM nocrm.tags WHERE lead_id = 1;

-- A version naming something gone since is refused, and nothing changes.
SELECT nocrm.create_automation(name => 'Onboarding only', event => 'lead.creation',
  conditions => '{"pipeline": "Onboarding"}', actions => '[{"type": "comment", "body": "hi"}]');
SELECT nocrm.update_automation(2, conditions => '{}');
DELETE FROM nocrm.leads; DELETE FROM nocrm.steps WHERE pipeline_id = 2; DELETE FROM nocrm.pipelines WHERE name = 'Onboarding';
\set SHOW_CONTEXT never
SELECT nocrm.revert_automation(2, 1);
SELECT conditions FROM nocrm.automations WHERE id = 2;
SELECT nocrm.revert_automation(2, 99);
SELECT nocrm.revert_rule('trigger', 2, 1);
\set SHOW_CONTEXT errors

-- Stage triggers too.
SELECT nocrm.create_stage_trigger('Chiusura', 'email_received', pipeline => 'Vendite', name => 'Reply');
UPDATE nocrm.stage_triggers SET allow_backward = true WHERE id = 1;
SELECT version, operation, definition->'allow_backward' AS allow_backward
  FROM nocrm.rule_versions WHERE kind = 'stage_trigger' ORDER BY version;
SELECT nocrm.revert_stage_trigger(1, 1);
SELECT allow_backward FROM nocrm.stage_triggers WHERE id = 1;

-- Which version a delayed action was queued under.
SELECT nocrm.automation_version_at(2, now()) AS version_now,
       nocrm.automation_version_at(2, '2000-01-01') AS before_it_existed;

-- Admins read the versions and revert; agents cannot.
CREATE ROLE regress_v_agent; GRANT nocrm_agent TO regress_v_agent;
SET ROLE regress_v_agent;
SELECT count(*) FROM nocrm.rule_versions;
RESET ROLE;
DROP ROLE regress_v_agent;
