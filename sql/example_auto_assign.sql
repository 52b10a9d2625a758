-- noCRM example: "Automatically assign a lead, or distribute it randomly".
\i test/fixtures/crm.sql

-- Leads of pipeline Vendite go to Anna; leads of Onboarding are spread at random.
SELECT nocrm.create_automation(
  name       => 'Vendite to Anna',
  event      => 'lead.creation',
  conditions => '{"pipeline": "Vendite"}',
  actions    => '[{"type": "assign", "user": "anna@example.com"}]');
SELECT nocrm.create_automation(
  name       => 'Onboarding at random',
  event      => 'lead.creation',
  conditions => '{"pipeline": "Onboarding"}',
  actions    => '[{"type": "assign_random", "users": [2, "giovanni@example.com"]}]');

INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Vendite 1', 1), ('Vendite 2', 1);
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Onboarding ' || i, 2 FROM generate_series(1, 40) i;

SELECT l.title, u.name AS owner FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id
 WHERE l.pipeline_id = 1 ORDER BY l.id;

-- Random: every Onboarding lead went to Matteo or Giovanni, and (40 draws) both got some.
SELECT count(*) FILTER (WHERE user_id IN (2, 3)) AS to_group,
       count(*) FILTER (WHERE user_id IS NULL OR user_id NOT IN (2, 3)) AS elsewhere,
       count(DISTINCT user_id) AS distinct_owners
  FROM nocrm.leads WHERE pipeline_id = 2;

-- The rule holds for leads created with an owner too: Sara's lead goes to Anna.
-- (Add "owner": null to the conditions to touch unassigned leads only.)
INSERT INTO nocrm.leads (title, pipeline_id, user_id) VALUES ('Owned', 1, 4);
SELECT title, user_id FROM nocrm.leads WHERE title = 'Owned';

-- Each assignment is in history as the Butler's, followed by the lead.assigned it raised.
SELECT event, actor_id, automation_id, old_value, new_value
  FROM nocrm.lead_history WHERE lead_id IN (1, 2) ORDER BY id;

-- An inactive user is not assigned; the skip is logged.
UPDATE nocrm.users SET active = false WHERE email = 'anna@example.com';
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Anna is away', 1);
SELECT title, user_id FROM nocrm.leads WHERE title = 'Anna is away';
SELECT event, detail FROM nocrm.lead_history
 WHERE lead_id = (SELECT id FROM nocrm.leads WHERE title = 'Anna is away') ORDER BY id;

-- Random assignment skips inactive members too.
UPDATE nocrm.users SET active = false WHERE id = 2;
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Late ' || i, 2 FROM generate_series(1, 10) i;
SELECT DISTINCT user_id FROM nocrm.leads WHERE title LIKE 'Late %';
