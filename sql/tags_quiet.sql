-- Tag actions when the tag change raises no event anyone records or listens
-- to (nocrm.history = actions, no lead.any_update rule, no stage trigger):
-- written in one statement that also tells which tags changed.  The history
-- rows must be those of the two-step path.
\i test/fixtures/crm.sql
SET nocrm.history = actions;
SET nocrm.run_log = 'all';   -- fired runs too, to compare them
SELECT nocrm.create_automation(name => 'tag won', event => 'lead.status.changed.to', target => 'won',
  actions => '[{"type": "add_tags", "tags": ["Upsell", "VIP", "Upsell", "Won"]}]');
SELECT nocrm.create_automation(name => 'untag lost', event => 'lead.status.changed.to', target => 'lost',
  actions => '[{"type": "remove_tags", "tags": ["Won", "Upsell", "never there"]}]');
INSERT INTO nocrm.leads (title) VALUES ('A'), ('B');
INSERT INTO nocrm.tags (lead_id, name) VALUES (2, 'VIP'), (2, 'Won'), (2, 'Upsell');
UPDATE nocrm.leads SET status = 'won';
SELECT lead_id, event, automation_id, old_value, new_value, detail FROM nocrm.lead_history ORDER BY id;
SELECT lead_id, name FROM nocrm.tags ORDER BY lead_id, name;
UPDATE nocrm.leads SET status = 'lost';
SELECT lead_id, event, automation_id, old_value, new_value, detail FROM nocrm.lead_history WHERE id > 2 ORDER BY id;
SELECT lead_id, name FROM nocrm.tags ORDER BY lead_id, name;
SELECT automation_id, lead_id, actions FROM nocrm.automation_runs ORDER BY id;

-- The same changes with a lead.any_update rule listening take the two-step
-- path, and log the same rows (plus the rule's own).
SELECT nocrm.create_automation(name => 'listen', event => 'lead.any_update', conditions => '{"status": "won"}',
  actions => '[{"type": "notify", "user": "anna@example.com", "message": "changed"}]');
TRUNCATE nocrm.lead_history;
UPDATE nocrm.leads SET status = 'won';
UPDATE nocrm.leads SET status = 'lost';
SELECT lead_id, event, automation_id, old_value, new_value, detail FROM nocrm.lead_history ORDER BY id;
