-- noCRM example: "Notify when a lead is created or deleted".
\i test/fixtures/crm.sql

SELECT nocrm.create_automation(
  name    => 'Tell Sara about new leads',
  event   => 'lead.creation',
  actions => '[{"type": "notify", "user": "sara.manager@example.com",
                "message": "A new lead was created", "channels": ["browser", "email", "mobile"]}]');
SELECT nocrm.create_automation(
  name    => 'Tell Sara about deleted leads',
  event   => 'lead.deleted',
  actions => '[{"type": "notify", "user": 4, "message": "A lead was deleted"}]');

INSERT INTO nocrm.leads (title, pipeline_id, contact_email) VALUES ('ACME srl', 1, 'info@acme.example');
DELETE FROM nocrm.leads WHERE title = 'ACME srl';
-- In-app notifications: one per event, for Sara.
SELECT n.id, u.name AS for_user, n.lead_id, a.name AS automation, n.message, n.read_at IS NULL AS unread
  FROM nocrm.notifications n JOIN nocrm.users u ON u.id = n.user_id
  JOIN nocrm.automations a ON a.id = n.automation_id
 ORDER BY n.id;

-- The email and mobile channels are queued for the drain, addressed to Sara.
SELECT id, kind, automation_id, lead_id, event, recipient, state, payload
  FROM nocrm.queue ORDER BY id;

-- History: the Butler (actor 0) did it, on behalf of the automations.
SELECT lead_id, event, actor_id, automation_id, chain_depth, new_value, detail
  FROM nocrm.lead_history ORDER BY id;

-- A rolled-back creation leaves no notification and nothing queued.
BEGIN;
INSERT INTO nocrm.leads (title) VALUES ('Never happened');
SELECT count(*) AS notifications_inside FROM nocrm.notifications;
ROLLBACK;
SELECT (SELECT count(*) FROM nocrm.notifications) AS notifications,
       (SELECT count(*) FROM nocrm.queue) AS queued;
