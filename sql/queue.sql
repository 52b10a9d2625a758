-- The drain's state machine, without a network: delayed actions, failures
-- that need no server, dead letters and requeueing, status view.
\i test/fixtures/crm.sql
SET nocrm.retry_base = 0;
SET nocrm.max_attempts = 2;

-- The drain commits, so it refuses to run inside a transaction block.
BEGIN;
CALL nocrm.drain(0);
ROLLBACK;
CALL nocrm.drain(-1);

-- Delayed actions are queued, and run by the drain once due, by the Butler.
SELECT nocrm.create_automation(name => 'follow up', event => 'lead.creation',
  conditions => '{"lacks_tag": "stop"}',
  actions => '[{"type": "comment", "body": "Follow-up due", "delay": "1 hour"},
               {"type": "assign", "user": "anna@example.com", "delay": "1 hour", "recheck": false}]');
INSERT INTO nocrm.leads (title) VALUES ('Lead A'), ('Lead B'), ('Lead C'), ('Lead D');
SELECT id, kind, lead_id, action_no, state, run_at - created_at AS delay FROM nocrm.queue ORDER BY id;
CALL nocrm.drain(0);                        -- nothing due yet
SELECT state, count(*) FROM nocrm.queue GROUP BY state;

-- Lead A: due now.  Lead B: its conditions no longer hold (tagged "stop"),
-- so the comment is cancelled, but the assign (recheck false) runs.
-- Lead C: deleted.  Lead D: its automation is disabled when due.
UPDATE nocrm.queue SET run_at = now() - interval '1 second' WHERE lead_id IN (1, 2, 3);
INSERT INTO nocrm.tags (lead_id, name) VALUES (2, 'stop');
DELETE FROM nocrm.leads WHERE id = 3;
CALL nocrm.drain(0);
SELECT id, lead_id, action_no, state, attempts, last_error FROM nocrm.queue ORDER BY id;
SELECT lead_id, user_id, body FROM nocrm.comments ORDER BY id;
SELECT id, user_id FROM nocrm.leads ORDER BY id;
SELECT lead_id, event, actor_id, automation_id, new_value
  FROM nocrm.lead_history WHERE event LIKE 'action.%' ORDER BY id;

SELECT nocrm.disable_automation(1);
UPDATE nocrm.queue SET run_at = now() - interval '1 second' WHERE lead_id = 4;
CALL nocrm.drain(0);
SELECT lead_id, action_no, state, last_error FROM nocrm.queue WHERE lead_id = 4 ORDER BY id;
-- ... and a deleted automation cancels what it left queued.
SELECT nocrm.enable_automation(1);
INSERT INTO nocrm.leads (title) VALUES ('Lead E');
SELECT nocrm.delete_automation(1);
UPDATE nocrm.queue SET run_at = now() - interval '1 second' WHERE lead_id = 5;
CALL nocrm.drain(0);
SELECT lead_id, action_no, state, last_error FROM nocrm.queue WHERE lead_id = 5 ORDER BY id;

-- Emails: with no SMTP server set (a configuration error) items wait
-- without using an attempt, and a run tries no more emails once it met one;
-- an address that cannot be one dies at once.  Nothing needs a network here.
TRUNCATE nocrm.queue;
SET nocrm.smtp_url = '';
SET nocrm.retry_base = 60;
SELECT nocrm.create_automation(name => 'mail', event => 'lead.creation',
  actions => '[{"type": "send_email", "template": "quote_followup"}]');
INSERT INTO nocrm.leads (title, contact_email) VALUES
  ('Good address', 'buyer@client.example'),
  ('Hostile address', E'buyer@client.example\r\nBcc: all@client.example');
CALL nocrm.drain(0);
SELECT recipient = 'buyer@client.example' AS good, state, attempts, last_error,
       run_at >= last_attempt_at AS retry_later
  FROM nocrm.queue ORDER BY id;
UPDATE nocrm.queue SET run_at = now() WHERE state = 'pending';
CALL nocrm.drain(0);                        -- still waiting for the setting
SELECT state, attempts, last_error FROM nocrm.queue ORDER BY id;
SELECT kind, attempts, last_error FROM nocrm.dead_letters;
SELECT pending, due, processing, done, dead, cancelled, last_error FROM nocrm.queue_status;
-- Requeue: all dead items, or by id.
SELECT nocrm.requeue_dead(ARRAY[(SELECT min(id) FROM nocrm.queue)]);  -- not dead: nothing
SELECT state, attempts FROM nocrm.queue ORDER BY id;
SELECT nocrm.requeue_dead();
SELECT nocrm.requeue_dead();
SELECT state, attempts FROM nocrm.queue ORDER BY id;

-- A rolled-back change queues nothing.
TRUNCATE nocrm.queue;
BEGIN;
INSERT INTO nocrm.leads (title, contact_email) VALUES ('Never', 'never@client.example');
SELECT count(*) AS queued_inside FROM nocrm.queue;
ROLLBACK;
SELECT count(*) AS queued_after FROM nocrm.queue;

-- Webhook and mobile items need their URL: without one they wait (not lost).
SELECT nocrm.create_automation(name => 'hook', event => 'lead.commented',
  actions => '[{"type": "webhook", "url": "http://127.0.0.1:1/hook"},
               {"type": "notify", "user": 1, "message": "m", "channels": ["mobile"]}]');
SET nocrm.push_url = '';
INSERT INTO nocrm.comments (lead_id, body) VALUES (1, 'hello');
CALL nocrm.drain(0);
UPDATE nocrm.queue SET run_at = now() WHERE state = 'pending';
CALL nocrm.drain(0);
SELECT kind, state, attempts, last_error LIKE 'HTTP Couldn''t connect to server%' AS refused,
       last_error LIKE 'no URL to send to%' AS no_url
  FROM nocrm.queue ORDER BY id;

-- Retention: done and cancelled items older than nocrm.queue_retention go.
TRUNCATE nocrm.queue;
INSERT INTO nocrm.queue (kind, payload, state, delivered_at) VALUES
  ('email', '{}', 'done', now() - interval '8 days'),
  ('email', '{}', 'done', now() - interval '1 day'),
  ('action', '{}', 'cancelled', now() - interval '8 days'),
  ('email', '{}', 'dead', now() - interval '30 days');
CALL nocrm.drain(0);
SELECT kind, state FROM nocrm.queue ORDER BY id;

-- Settings: credentials are for superusers only.
SELECT name, context, unit FROM pg_settings WHERE name LIKE 'nocrm.%' ORDER BY name;

-- Bad settings are refused when set, and the old value stays.
\set VERBOSITY terse
SET nocrm.smtp_url = 'http://mail.example.com';
SET nocrm.smtp_tls = 'sometimes';
SET nocrm.history = 'everything';
SET nocrm.max_chain_depth = 101;
SET nocrm.drain_batch_size = 0;
SET nocrm.lease_time = '0s';
SET nocrm.max_attempts = -1;
SET nocrm.request_timeout = 'soon';
\set VERBOSITY default
SHOW nocrm.smtp_url;
SHOW nocrm.max_chain_depth;

-- No pg_cron here (test/regress.conf preloads nothing): the queue works
-- without it and says that nothing schedules the drain.
SELECT current_setting('shared_preload_libraries') = '' AS nothing_preloaded,
       to_regclass('cron.job') IS NULL AS no_cron,
       worker_scheduled IS NULL AS not_scheduled
  FROM nocrm.queue_status;
