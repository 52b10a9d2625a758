-- Email templates: placeholders checked when saved, rendered as plain text.
\i test/fixtures/crm.sql

-- Every placeholder renders.
INSERT INTO nocrm.email_templates (name, subject, body) VALUES ('everything', '{{ lead.title }} / {{event}}',
  E'id={{lead.id}} title={{lead.title}} amount={{lead.amount}} status={{lead.status}} probability={{lead.probability}}\n'
  'description={{lead.description}} contact={{lead.contact_email}} pipeline={{lead.pipeline}} step={{lead.step}}\n'
  'next={{lead.next_action_at}} owner={{owner.name}} <{{owner.email}}> butler={{butler.name}} <{{butler.email}}>\n'
  'user={{user.name}} automation={{automation.name}} message={{message}}');
INSERT INTO nocrm.leads (title, pipeline_id, user_id, amount, probability, description, contact_email, next_action_at)
VALUES ('Caffè Ü srl', 1, 2, 1234.50, 40, 'Espresso machines', 'bar@caffe.example', '2026-12-01 10:00+00');
SELECT subject, body FROM nocrm.render_template('everything', 1, 'Hello');
-- No lead, no message: empty values, never an error.
SELECT subject, body FROM nocrm.render_template('everything', NULL);
-- The Butler's new name shows at once.
SELECT nocrm.set_butler('Alfred', 'alfred@crm.example');
SELECT body LIKE '%butler=Alfred <alfred@crm.example>%' AS renamed FROM nocrm.render_template('everything', 1);

-- Values are text: a lead whose data looks like a placeholder is not expanded again.
UPDATE nocrm.leads SET title = '{{owner.email}} {{lead.title}} {{unknown}} {{', description = '{{butler.name}}' WHERE id = 1;
SELECT subject FROM nocrm.render_template('everything', 1);
SELECT substring(body from 'description=[^\n]*') AS description FROM nocrm.render_template('everything', 1);

-- Refused when saved: unknown placeholder (subject or body), unclosed braces, a line break in the subject.
\set VERBOSITY default
INSERT INTO nocrm.email_templates (name, subject, body) VALUES ('bad1', 'Hi {{lead.name}}', 'x');
INSERT INTO nocrm.email_templates (name, subject, body) VALUES ('bad2', 'Hi', 'Dear {{owner.nme }}');
INSERT INTO nocrm.email_templates (name, subject, body) VALUES ('bad3', 'Hi', 'Dear {{owner.name');
INSERT INTO nocrm.email_templates (name, subject, body) VALUES ('bad4', E'Hi\r\nBcc: x@example.com', 'x');
UPDATE nocrm.email_templates SET body = '{{lead.secret}}' WHERE name = 'everything';
SELECT name FROM nocrm.email_templates ORDER BY name;
SELECT * FROM nocrm.render_template('missing', 1);

-- The notification template used by notify's email channel can be edited.
UPDATE nocrm.email_templates SET subject = '[CRM] {{message}}' WHERE name = 'notification';
SELECT subject FROM nocrm.render_template('notification', 1, 'Call back');

-- Notify messages take the same placeholders, rendered when the automation runs.
UPDATE nocrm.leads SET title = 'Bar Centrale' WHERE id = 1;
SELECT nocrm.create_automation(name => 'hello owner', event => 'lead.commented',
  actions => '[{"type": "notify", "user": "owner", "message": "{{owner.name}}, {{lead.title}} ({{lead.step}}) has a comment", "channels": ["browser", "mobile"]}]');
INSERT INTO nocrm.comments (lead_id, body) VALUES (1, 'ping');
SELECT user_id, message FROM nocrm.notifications;
SELECT kind, payload ->> 'message' AS message FROM nocrm.queue;
-- ... and are checked when the automation is saved.
SELECT nocrm.create_automation(name => 'bad message', event => 'lead.commented',
  actions => '[{"type": "notify", "user": 1, "message": "Hi {{lead.owner}}"}]');
SELECT nocrm.create_automation(name => 'bad message', event => 'lead.commented',
  actions => '[{"type": "notify", "user": 1, "message": "Hi {{lead.title"}]');

-- A deleted lead's placeholders still render: the queued item carries a
-- snapshot of the row, and browser messages are rendered before it is gone.
TRUNCATE nocrm.queue, nocrm.notifications;
SELECT nocrm.create_automation(name => 'farewell', event => 'lead.deleted',
  actions => '[{"type": "notify", "user": 4, "message": "Deleted: {{lead.title}} ({{owner.name}})", "channels": ["browser", "email"]},
               {"type": "send_email", "template": "quote_followup", "to": "archive@crm.example"}]');
DELETE FROM nocrm.leads WHERE id = 1;
SELECT message FROM nocrm.notifications;
SELECT q.kind, q.payload ->> 'message' AS message, q.payload -> 'lead' ->> 'title' AS snapshot_title,
       nocrm.render(t.subject, nocrm.template_context(q.lead_id, q.payload, q.automation_id, q.event)) AS subject
  FROM nocrm.queue q
  JOIN nocrm.email_templates t ON t.name = coalesce(q.payload ->> 'template', 'notification')
 ORDER BY q.id;

-- A message made long by lead data is cut to 4000 bytes on a character
-- boundary instead of failing the change (pg_notify's payload limit).
SELECT nocrm.create_automation(name => 'long', event => 'lead.creation',
  actions => '[{"type": "notify", "user": 4, "message": "{{lead.description}}"}]');
INSERT INTO nocrm.leads (title, description) VALUES ('Long', repeat('è', 5000));
SELECT octet_length(message) AS bytes, length(message) AS chars FROM nocrm.notifications WHERE message LIKE 'è%';
-- Characters that JSON escapes cannot overflow the notification payload:
-- listeners get the first 1,000 characters and a "truncated" flag.
INSERT INTO nocrm.leads (title, description) VALUES ('Quotes', repeat('"', 5000));
SELECT octet_length(message) AS bytes FROM nocrm.notifications WHERE message LIKE '"%';

-- Found by the fuzzer: a context that is not an object (array, string,
-- number) renders placeholders empty instead of crashing the backend.
SELECT nocrm.render('[{{lead.title}}]', '["a", "lead.title"]') AS from_array,
       nocrm.render('[{{lead.title}}]', '"lead.title"') AS from_string,
       nocrm.render('[{{lead.title}}]', '5') AS from_number,
       nocrm.render('[{{lead.title}}]', NULL) AS from_null;

-- Messages that use only the lead's own placeholders are rendered from the
-- lead at hand, without a query: the same text as through the full context
-- (the second rule's {{lead.pipeline}}, empty here, sends it that way);
-- NULL renders empty.
SELECT nocrm.create_automation(name => 'local "quick"', event => 'lead.creation',
  actions => '[{"type": "notify", "user": 4, "message": "L {{lead.id}}|{{ lead.title }}|{{lead.status}}|{{lead.contact_email}}|{{event}}|{{automation.name}}|"}]');
SELECT nocrm.create_automation(name => 'local "quick"', event => 'lead.creation',
  actions => '[{"type": "notify", "user": 4, "message": "F {{lead.id}}|{{ lead.title }}|{{lead.status}}|{{lead.contact_email}}|{{event}}|{{automation.name}}|{{lead.pipeline}}"}]');
INSERT INTO nocrm.leads (title, contact_email) VALUES ('Locale è', 'c@example.com'), ('Senza email', NULL);
SELECT message FROM nocrm.notifications WHERE message ~ '^[LF] ' ORDER BY message;
