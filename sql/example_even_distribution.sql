-- noCRM example: "Distribute new leads evenly among Anna, Matteo and Giovanni".
\i test/fixtures/crm.sql

SELECT nocrm.create_automation(
  name    => 'Even split among SDRs',
  event   => 'lead.creation',
  actions => '[{"type": "assign_balanced",
                "users": ["anna@example.com", "matteo@example.com", "giovanni@example.com"]}]');

-- Matteo already carries two open leads and one won lead (won does not count).
SET nocrm.automations_enabled = off;
INSERT INTO nocrm.leads (title, user_id, status) VALUES
  ('Matteo open 1', 2, 'todo'), ('Matteo open 2', 2, 'standby'), ('Matteo won', 2, 'won');
RESET nocrm.automations_enabled;

-- Six new leads: Anna and Giovanni catch up first, then everyone takes turns.
INSERT INTO nocrm.leads (title) SELECT 'New ' || i FROM generate_series(1, 6) i;
SELECT l.title, u.name AS owner FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id
 WHERE l.title LIKE 'New %' ORDER BY l.id;

SELECT u.name, count(*) FILTER (WHERE l.status IN ('todo', 'standby')) AS open_leads
  FROM nocrm.users u LEFT JOIN nocrm.leads l ON l.user_id = u.id
 WHERE u.id IN (1, 2, 3) GROUP BY u.name ORDER BY u.name;

-- Closing leads frees capacity: Anna wins two, so she gets the next one; the tie after it goes by rotation.
UPDATE nocrm.leads SET status = 'won'
 WHERE id IN (SELECT id FROM nocrm.leads WHERE user_id = 1 ORDER BY id LIMIT 2);
INSERT INTO nocrm.leads (title) VALUES ('After wins 1'), ('After wins 2');
SELECT l.title, u.name AS owner FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id
 WHERE l.title LIKE 'After wins %' ORDER BY l.id;
