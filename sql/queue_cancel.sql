-- Cancelling queue items (nocrm.cancel_queue_item) and the drain's own
-- switches: a cancelled item is never sent and its cancel is never
-- overwritten; nocrm.drain_enabled = off drains nothing.
\i test/fixtures/crm.sql
SET nocrm.retry_base = 60;
DROP ROLE IF EXISTS regress_cancel_admin;
DROP ROLE IF EXISTS regress_cancel_agent;
CREATE ROLE regress_cancel_admin IN ROLE nocrm_admin;
CREATE ROLE regress_cancel_agent IN ROLE nocrm_agent;

SELECT nocrm.create_automation(name => 'later', event => 'lead.creation',
  actions => '[{"type": "comment", "body": "Follow-up due", "delay": "1 hour"}]');
INSERT INTO nocrm.leads (title) SELECT 'Lead ' || i FROM generate_series(1, 5) i;
SELECT id, kind, lead_id, state FROM nocrm.queue ORDER BY id;

-- A pending item, cancelled by an admin, with a reason: it says who and why.
SET ROLE regress_cancel_admin;
SELECT nocrm.cancel_queue_item(1, 'customer asked us not to write');
RESET ROLE;
SELECT id, state, attempts, last_error, lease_until FROM nocrm.queue WHERE id = 1;
-- Once due, the drain leaves it alone and runs the others.
UPDATE nocrm.queue SET run_at = now() WHERE id IN (1, 2);
CALL nocrm.drain(0);
SELECT id, state, attempts FROM nocrm.queue ORDER BY id;
SELECT lead_id, body FROM nocrm.comments ORDER BY lead_id;

-- A dead item leaves the dead letters; done and cancelled items stay as they are.
UPDATE nocrm.queue SET state = 'dead', last_error = 'gave up' WHERE id = 3;
SELECT count(*) AS dead_letters FROM nocrm.dead_letters;
SELECT nocrm.cancel_queue_item(3);
SELECT count(*) AS dead_letters FROM nocrm.dead_letters;
SELECT nocrm.cancel_queue_item(2);
SELECT nocrm.cancel_queue_item(1, 'again');
SELECT id, state, last_error FROM nocrm.queue WHERE id IN (1, 2, 3) ORDER BY id;

-- An item in flight (claimed by a drain that is still sending it): it is
-- cancelled at once, and the caller learns it was processing.  (What the
-- drain then does with it: test/t/115_drain_control.pl.)
UPDATE nocrm.queue SET state = 'processing', lease_until = now() + interval '5 minutes'
 WHERE id = 4;
SELECT nocrm.cancel_queue_item(4);
SELECT id, state, lease_until, last_error FROM nocrm.queue WHERE id = 4;

-- Errors, and who may call it.
\set VERBOSITY terse
SELECT nocrm.cancel_queue_item(999);
SELECT nocrm.cancel_queue_item(NULL);
SET ROLE regress_cancel_agent;
SELECT nocrm.cancel_queue_item(5);
RESET ROLE;
\set VERBOSITY default
SELECT state FROM nocrm.queue WHERE id = 5;

-- nocrm.drain_enabled: off drains nothing (a NOTICE), on drains.
UPDATE nocrm.queue SET run_at = now() WHERE id = 5;
SET nocrm.drain_enabled = off;
CALL nocrm.drain(0);
SELECT state, attempts FROM nocrm.queue WHERE id = 5;
SET nocrm.drain_enabled = on;
CALL nocrm.drain(0);
SELECT state, attempts FROM nocrm.queue WHERE id = 5;
SELECT count(*) AS comments FROM nocrm.comments WHERE lead_id = 5;
SET nocrm.drain_enabled = banana;
RESET nocrm.drain_enabled;
SHOW nocrm.drain_enabled;

-- No drain runs now.
SELECT drains_running FROM nocrm.queue_status;

DROP ROLE regress_cancel_admin;
DROP ROLE regress_cancel_agent;
