-- noCRM example: 'When a lead enters step "Preventivo" of pipeline "Vendite",
-- send an email from a template and add the tag "Preventivo Inviato"'.
\i test/fixtures/crm.sql

SELECT nocrm.create_automation(
  name       => 'Quote follow-up',
  event      => 'lead.step.changed.to',
  target     => 'Preventivo',
  conditions => '{"pipeline": "Vendite"}',
  actions    => '[{"type": "send_email", "template": "quote_followup"},
                  {"type": "add_tags", "tags": ["Preventivo Inviato"]}]',
  enabled    => true);

INSERT INTO nocrm.leads (title, pipeline_id, contact_email) VALUES
  ('Rossi spa', 1, 'acquisti@rossi.example'),
  ('Bianchi srl', 2, 'info@bianchi.example'),
  ('No contact', 1, NULL);

-- Into Vendite/Preventivo: email queued to the contact, tag added.
UPDATE nocrm.leads SET step_id = 3 WHERE title = 'Rossi spa';
-- Onboarding also has a step "Preventivo", but the condition restricts to Vendite.
UPDATE nocrm.leads SET step_id = 6 WHERE title = 'Bianchi srl';
-- Without a contact email the email is skipped (logged); the tag is still added.
UPDATE nocrm.leads SET step_id = 3 WHERE title = 'No contact';
-- Another step does nothing.
UPDATE nocrm.leads SET step_id = 5 WHERE title = 'Bianchi srl';

SELECT l.title, t.name AS tag FROM nocrm.tags t JOIN nocrm.leads l ON l.id = t.lead_id ORDER BY l.id, t.name;
SELECT kind, lead_id, event, recipient, payload, state FROM nocrm.queue ORDER BY id;
SELECT lead_id, event, automation_id, new_value, detail FROM nocrm.lead_history
 WHERE event LIKE 'action.%' ORDER BY id;

-- Moving back out and in again sends again (every entry into the step is an event);
-- the tag is already there, so add_tags only logs that.
UPDATE nocrm.leads SET step_id = 2 WHERE title = 'Rossi spa';
UPDATE nocrm.leads SET step_id = 3 WHERE title = 'Rossi spa';
SELECT count(*) AS emails_for_rossi FROM nocrm.queue WHERE recipient = 'acquisti@rossi.example';
SELECT event, detail FROM nocrm.lead_history
 WHERE lead_id = 1 AND event = 'action.add_tags' ORDER BY id;
