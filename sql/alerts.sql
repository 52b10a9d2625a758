-- Failure alerts: a dead letter, an automation that keeps failing and one
-- the drain disables tell the admins (notification, email, webhook), at
-- most once per problem and nocrm.alert_interval; nocrm.problems lists what
-- is open.  No network: the SMTP server is unset (emails wait), addresses
-- that cannot be one and missing templates die at once, the alert webhook
-- points at a closed port.
\i test/fixtures/crm.sql
SET nocrm.retry_base = 0;
SET nocrm.max_attempts = 2;
SET nocrm.smtp_url = '';
SET nocrm.alert_webhook_url = 'http://127.0.0.1:1/alerts';
SET nocrm.alert_failures = 0;              -- "keeps failing" comes later

-- Anna and Sara are the admins; Matteo is not, nor an inactive admin.
UPDATE nocrm.users SET is_admin = true WHERE id IN (1, 4);
INSERT INTO nocrm.users (name, email, is_admin, active) VALUES ('Gone', 'gone@example.com', true, false);

-- The built-in template, seeded like "notification".
SELECT subject, body FROM nocrm.email_templates WHERE name = 'alert';

SELECT nocrm.create_automation(name => 'Quote mail', event => 'lead.creation',
  actions => '[{"type": "send_email", "template": "quote_followup"}]');

-- A dead letter: an address that cannot be one dies at its first attempt.
INSERT INTO nocrm.leads (title, contact_email) VALUES ('Bad address', E'x@client.example\r\nBcc: all@client.example');
CALL nocrm.drain(0);
SELECT id, kind, recipient IS NULL AS no_recipient, automation_id, state FROM nocrm.queue ORDER BY id;
SELECT kind, subject, automation_id, occurrences, last_queue_id, last_lead_id, alerts_sent, since_alert,
       alerted_at IS NOT NULL AS alerted
  FROM nocrm.alerts ORDER BY id;
-- One notification per active admin, with the problem in words.
SELECT user_id, lead_id, automation_id, message FROM nocrm.notifications ORDER BY id;
-- An email to each admin (waiting for the SMTP server) and the webhook,
-- which died on the closed port after its 2 attempts: an alert's own
-- delivery raises no alert, so nothing loops.
SELECT kind, recipient, event, state, attempts, payload - 'message' - 'alert' - 'occurred_at' AS payload
  FROM nocrm.queue WHERE payload ? 'alert_id' ORDER BY id;
SELECT (payload -> 'alert') - 'first_seen' - 'last_seen' AS alert, payload ->> 'message' AS message,
       payload ->> 'occurred_at' IS NOT NULL AS occurred_at
  FROM nocrm.queue WHERE kind = 'webhook';
SELECT subject, body FROM nocrm.render_template('alert', 1, 'Dead letter: ...');

-- The same problem again within the hour: counted, nobody told again.
INSERT INTO nocrm.leads (title, contact_email) VALUES ('Bad again', 'not an address');
CALL nocrm.drain(0);
SELECT kind, occurrences, alerts_sent, since_alert, last_lead_id FROM nocrm.alerts;
SELECT count(*) AS notifications FROM nocrm.notifications;
SELECT count(*) AS alert_items FROM nocrm.queue WHERE payload ? 'alert_id';

-- The open problems.
SELECT id, kind, subject, automation, automation_enabled, occurrences, dead_now, recent_failures,
       alerts_sent, acknowledged, last_error
  FROM nocrm.problems;

-- Once the interval has passed, the next occurrence is told, with the count.
UPDATE nocrm.alerts SET alerted_at = alerted_at - interval '61 minutes';
INSERT INTO nocrm.leads (title, contact_email) VALUES ('Third', 'still not');
CALL nocrm.drain(0);
SELECT kind, occurrences, alerts_sent, since_alert FROM nocrm.alerts;
SELECT user_id, regexp_replace(message, '\d{4}-\d\d-\d\d \d\d:\d\d UTC', 'T') AS message
  FROM nocrm.notifications WHERE id > 2 ORDER BY id;

-- Acknowledged: still counted, no more alerts, until it is resolved.
SELECT nocrm.acknowledge_problem(1, 'Looking into the import');
SELECT nocrm.acknowledge_problem(1);        -- already: false
UPDATE nocrm.alerts SET alerted_at = alerted_at - interval '61 minutes';
INSERT INTO nocrm.leads (title, contact_email) VALUES ('Fourth', 'nope');
CALL nocrm.drain(0);
SELECT kind, occurrences, alerts_sent, since_alert, acknowledged_at IS NOT NULL AS acknowledged,
       acknowledged_by, note FROM nocrm.alerts;
SELECT count(*) AS notifications FROM nocrm.notifications;
-- Resolved: out of the view; the next occurrence opens it again, counted
-- from zero, and is told (the interval has passed).
SELECT nocrm.resolve_problem(1, 'Import fixed');
SELECT nocrm.resolve_problem(1);            -- already: false
SELECT count(*) AS open_problems FROM nocrm.problems;
INSERT INTO nocrm.leads (title, contact_email) VALUES ('Fifth', 'no');
CALL nocrm.drain(0);
SELECT kind, occurrences, alerts_sent, acknowledged_at IS NULL AS unacknowledged, resolved_at IS NULL AS open
  FROM nocrm.alerts;

-- An item queued by hand that dies: its own problem, "queue email".
TRUNCATE nocrm.notifications;
INSERT INTO nocrm.queue (kind, recipient, payload) VALUES ('email', 'ops@example.com', '{"template": "no_such"}');
CALL nocrm.drain(0);
SELECT kind, subject, automation_id, occurrences, last_error FROM nocrm.alerts ORDER BY id;
SELECT user_id, message FROM nocrm.notifications ORDER BY id;

-- No loop: with the alert template gone, the alert emails die too, and
-- the alert webhooks requeued die again: they raise nothing.
TRUNCATE nocrm.notifications;
DELETE FROM nocrm.email_templates WHERE name = 'alert';
SET nocrm.smtp_url = 'smtp://127.0.0.1:1';
SELECT nocrm.requeue_dead(ARRAY(SELECT id FROM nocrm.queue WHERE state = 'dead' AND payload ? 'alert_id'));
CALL nocrm.drain(0);
SELECT kind, state, count(*), split_part(min(last_error), ':', 1) AS last_error FROM nocrm.queue
 WHERE payload ? 'alert_id' GROUP BY kind, state ORDER BY kind, state;
SELECT kind, subject, occurrences, alerts_sent FROM nocrm.alerts ORDER BY id;
SELECT count(*) AS notifications FROM nocrm.notifications;
SET nocrm.smtp_url = '';
SET nocrm.alert_webhook_url = '';
INSERT INTO nocrm.email_templates (name, subject, body) VALUES ('alert', '[CRM alert] {{message}}', '{{message}}');

-- An automation that keeps failing: nocrm.alert_failures failed attempts
-- within nocrm.alert_failure_window (here 3 in the default hour).  Its
-- delayed actions fail (an action it cannot run) and are retried later.
TRUNCATE nocrm.queue, nocrm.notifications, nocrm.alerts;
SET nocrm.alert_failures = 3;
SET nocrm.retry_base = 3600;
SET nocrm.max_attempts = 10;
SELECT nocrm.create_automation(name => 'Follow up', event => 'lead.commented',
  actions => '[{"type": "comment", "body": "later", "delay": "1 day"}]');
INSERT INTO nocrm.queue (kind, automation_id, action_no, lead_id, event, payload)
SELECT 'action', 2, 0, 1, 'lead.commented', '{"type": "no_such_action"}' FROM generate_series(1, 2);
CALL nocrm.drain(0);
SELECT automation_id, lead_id, kind, dead, error FROM nocrm.automation_failures ORDER BY id;
SELECT count(*) AS alerts FROM nocrm.alerts;   -- 2 failures: not yet
INSERT INTO nocrm.queue (kind, automation_id, action_no, lead_id, event, payload)
VALUES ('action', 2, 0, 1, 'lead.commented', '{"type": "no_such_action"}');
CALL nocrm.drain(0);
SELECT kind, subject, occurrences, alerts_sent FROM nocrm.alerts;
SELECT user_id, automation_id, message FROM nocrm.notifications ORDER BY id;
SELECT id, kind, automation, automation_enabled, occurrences, dead_now, recent_failures FROM nocrm.problems;

-- Auto-disable at nocrm.auto_disable_failures (off by default): the drain
-- disables it in the transaction that records the failure, and tells.
SET nocrm.auto_disable_failures = 4;
INSERT INTO nocrm.queue (kind, automation_id, action_no, lead_id, event, payload)
VALUES ('action', 2, 0, 1, 'lead.commented', '{"type": "no_such_action"}');
CALL nocrm.drain(0);
SELECT id, name, enabled FROM nocrm.automations WHERE id = 2;
SELECT kind, subject, occurrences, alerts_sent FROM nocrm.alerts ORDER BY id;
SELECT user_id, message FROM nocrm.notifications WHERE message LIKE '%disabled%' ORDER BY id;
-- Its retries now find it disabled: cancelled, not failures.
UPDATE nocrm.queue SET run_at = now() WHERE state = 'pending';
CALL nocrm.drain(0);
SELECT state, count(*) FROM nocrm.queue WHERE kind = 'action' GROUP BY state ORDER BY state;
SELECT count(*) AS failures FROM nocrm.automation_failures;
-- Enabled again: only failures from now on count towards the next disable.
SELECT nocrm.enable_automation(2);
INSERT INTO nocrm.queue (kind, automation_id, action_no, lead_id, event, payload)
VALUES ('action', 2, 0, 1, 'lead.commented', '{"type": "no_such_action"}');
CALL nocrm.drain(0);
SELECT enabled FROM nocrm.automations WHERE id = 2;
SELECT kind, occurrences, alerts_sent FROM nocrm.alerts ORDER BY id;

-- Both problems of automation 2 are open, each told once.
SELECT kind, subject, automation, automation_enabled, recent_failures, acknowledged
  FROM nocrm.problems ORDER BY id;

-- Several dead letters of one problem in one round: one alert, saying so.
TRUNCATE nocrm.alerts, nocrm.notifications;
SET nocrm.alert_failures = 0;
SET nocrm.auto_disable_failures = 0;
INSERT INTO nocrm.leads (title, contact_email) VALUES ('A', 'bad a'), ('B', 'bad b'), ('C', 'bad c');
CALL nocrm.drain(0);
SELECT kind, subject, occurrences, alerts_sent, since_alert FROM nocrm.alerts;
SELECT user_id, message FROM nocrm.notifications ORDER BY id;

-- A date rule whose firing fails (its set_field breaks a CHECK of the
-- lead) is a failure of its automation too.
TRUNCATE nocrm.alerts, nocrm.automation_failures, nocrm.notifications;
SET nocrm.alert_failures = 1;
SELECT nocrm.create_automation(name => 'Overdue', event => 'lead.date.reached', target => 'next_action_at',
  actions => '[{"type": "set_field", "field": "probability", "value": 150}]');
UPDATE nocrm.leads SET next_action_at = now() - interval '1 minute' WHERE id = 1;
CALL nocrm.drain(0);
SELECT automation_id, lead_id, state, detail FROM nocrm.date_firings;
SELECT automation_id, lead_id, queue_id, kind, dead, error FROM nocrm.automation_failures;
SELECT kind, subject, automation, occurrences FROM nocrm.problems;
SELECT user_id, message FROM nocrm.notifications ORDER BY id;

-- Bad input.
SELECT nocrm.acknowledge_problem(NULL);
SELECT nocrm.acknowledge_problem(999);
SELECT nocrm.resolve_problem(999);
SELECT nocrm.resolve_problem(1);
SELECT nocrm.acknowledge_problem(1);
SELECT nocrm.raise_alert('bogus', 1, 'x');
SET nocrm.alert_webhook_url = 'ftp://example.com/alerts';
SET nocrm.alert_webhook_url = 'https://example.com/a b';
SET nocrm.alert_failures = -1;
SET nocrm.alert_interval = '-1s';
SHOW nocrm.alert_webhook_url;
SHOW nocrm.alert_interval;

-- Admins read the problems and acknowledge them; agents see nothing.
SET ROLE nocrm_admin;
SELECT count(*) > 0 AS admin_reads FROM nocrm.problems;
SELECT nocrm.acknowledge_problem((SELECT min(id) FROM nocrm.problems));
RESET ROLE;
SET ROLE nocrm_agent;
SELECT count(*) FROM nocrm.problems;
RESET ROLE;
