-- Round robin: strict rotation, rollbacks skip nobody, members leave and join fairly.
\i test/fixtures/crm.sql

SELECT nocrm.create_automation(
  name    => 'Round robin SDRs',
  event   => 'lead.creation',
  actions => '[{"type": "assign_round_robin",
                "users": ["anna@example.com", "matteo@example.com", "giovanni@example.com"]}]');
-- One counter per member, in list order.
SELECT automation_id, action_no, user_id, position, assigned FROM nocrm.assignment_counters ORDER BY position;

-- Strict rotation, row by row, also within one multi-row INSERT.
INSERT INTO nocrm.leads (title) SELECT 'RR ' || i FROM generate_series(1, 7) i;
SELECT l.title, u.name AS owner FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id ORDER BY l.id;

-- A rollback skips nobody: Matteo was next, and stays next.
BEGIN;
INSERT INTO nocrm.leads (title) VALUES ('Rolled back');
SELECT u.name AS would_get FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'Rolled back';
ROLLBACK;
INSERT INTO nocrm.leads (title) VALUES ('After rollback');
SELECT u.name AS owner FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'After rollback';

-- A savepoint rolled back inside a committed transaction skips nobody either.
BEGIN;
SAVEPOINT s;
INSERT INTO nocrm.leads (title) VALUES ('Savepoint rolled back');
ROLLBACK TO SAVEPOINT s;
INSERT INTO nocrm.leads (title) VALUES ('After savepoint');
COMMIT;
SELECT u.name AS owner FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'After savepoint';

-- A statement that fails after some of its rows were assigned (here a later
-- trigger rejects the second row) undoes those assignments: inside a caught
-- exception, Anna is still next afterwards.
CREATE FUNCTION pg_temp.reject_boom() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.title = 'boom' THEN RAISE EXCEPTION 'boom rejected'; END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER zz_reject_boom AFTER INSERT ON nocrm.leads
  FOR EACH ROW EXECUTE FUNCTION pg_temp.reject_boom();
SELECT u.name, c.assigned FROM nocrm.assignment_counters c JOIN nocrm.users u ON u.id = c.user_id ORDER BY c.position;
DO $$
BEGIN
  INSERT INTO nocrm.leads (title) VALUES ('fine'), ('boom');
EXCEPTION WHEN raise_exception THEN
  RAISE NOTICE 'caught: %', SQLERRM;
END $$;
INSERT INTO nocrm.leads (title) VALUES ('After failed statement');
DROP TRIGGER zz_reject_boom ON nocrm.leads;
SELECT u.name AS owner FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'After failed statement';
SELECT u.name, c.assigned FROM nocrm.assignment_counters c JOIN nocrm.users u ON u.id = c.user_id ORDER BY c.position;

-- Inactive members are skipped while away; the rotation continues among the others.
UPDATE nocrm.users SET active = false WHERE name = 'Matteo';
INSERT INTO nocrm.leads (title) SELECT 'Away ' || i FROM generate_series(1, 4) i;
SELECT l.title, u.name AS owner FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id
 WHERE l.title LIKE 'Away %' ORDER BY l.id;
-- Back: Matteo is behind, so he takes the next turns until counts are level again.
UPDATE nocrm.users SET active = true WHERE name = 'Matteo';
INSERT INTO nocrm.leads (title) SELECT 'Back ' || i FROM generate_series(1, 4) i;
SELECT l.title, u.name AS owner FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id
 WHERE l.title LIKE 'Back %' ORDER BY l.id;

-- Counts per member never differ by more than one after a full rotation.
SELECT u.name, c.assigned FROM nocrm.assignment_counters c JOIN nocrm.users u ON u.id = c.user_id ORDER BY c.position;

-- A member joins: Sara starts at the group's lowest count, not at zero, so she
-- is not handed every new lead until she catches up.
SELECT nocrm.update_automation(1, actions => '[{"type": "assign_round_robin",
  "users": ["anna@example.com", "matteo@example.com", "giovanni@example.com", "sara.manager@example.com"]}]');
SELECT u.name, c.position, c.assigned FROM nocrm.assignment_counters c JOIN nocrm.users u ON u.id = c.user_id ORDER BY c.position;
INSERT INTO nocrm.leads (title) SELECT 'Four ' || i FROM generate_series(1, 5) i;
SELECT l.title, u.name AS owner FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id
 WHERE l.title LIKE 'Four %' ORDER BY l.id;

-- A member leaves: their counter goes, the others keep theirs.
SELECT nocrm.update_automation(1, actions => '[{"type": "assign_round_robin",
  "users": ["anna@example.com", "giovanni@example.com"]}]');
SELECT u.name, c.position, c.assigned FROM nocrm.assignment_counters c JOIN nocrm.users u ON u.id = c.user_id ORDER BY c.position;

-- Every member inactive: the lead stays unassigned and the skip is logged.
UPDATE nocrm.users SET active = false WHERE name IN ('Anna', 'Giovanni');
INSERT INTO nocrm.leads (title) VALUES ('Nobody home');
SELECT user_id FROM nocrm.leads WHERE title = 'Nobody home';
SELECT event, detail FROM nocrm.lead_history
 WHERE lead_id = (SELECT id FROM nocrm.leads WHERE title = 'Nobody home') ORDER BY id;

-- Deleting the automation removes its counters.
SELECT nocrm.delete_automation(1);
SELECT count(*) AS counters FROM nocrm.assignment_counters;

-- A capped member is skipped while they hold their cap of open leads
-- (one-lead statements pick by query, a bulk one in memory; both honour it),
-- and takes turns again once a lead of theirs is closed.
UPDATE nocrm.users SET active = true;
SELECT nocrm.create_automation(name => 'capped', event => 'lead.creation',
  actions => '[{"type": "assign_round_robin", "users": [{"user": "anna@example.com", "cap": 1}, "matteo@example.com"]}]') AS capped_id \gset
SELECT u.name, COALESCE((SELECT count(*) FROM nocrm.leads l WHERE l.user_id = u.id AND l.status IN ('todo', 'standby')), 0) AS open
  FROM nocrm.users u WHERE u.name IN ('Anna', 'Matteo') ORDER BY u.id;
UPDATE nocrm.leads SET status = 'won' WHERE user_id IN (1, 2);
INSERT INTO nocrm.leads (title) VALUES ('Cap 1');
INSERT INTO nocrm.leads (title) VALUES ('Cap 2');
INSERT INTO nocrm.leads (title) VALUES ('Cap 3');
INSERT INTO nocrm.leads (title) SELECT 'Cap bulk ' || i FROM generate_series(1, 3) i;
SELECT l.title, u.name AS owner FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id
 WHERE l.title LIKE 'Cap %' ORDER BY l.id;
UPDATE nocrm.leads SET status = 'lost' WHERE title = 'Cap 1';
INSERT INTO nocrm.leads (title) VALUES ('Cap 4');
SELECT l.title, u.name AS owner FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id
 WHERE l.title = 'Cap 4';
-- A bulk statement longer than the picks made one by one before a group is
-- held in memory: a capped group is never held.  Anna, under her cap but 10
-- assignments ahead, is first picked after that point, and only once.
UPDATE nocrm.leads SET status = 'won' WHERE title = 'Cap 4';
UPDATE nocrm.assignment_counters a SET assigned = m.assigned + 10
  FROM nocrm.assignment_counters m
 WHERE a.automation_id = :capped_id AND m.automation_id = :capped_id AND a.user_id = 1 AND m.user_id = 2;
INSERT INTO nocrm.leads (title) SELECT 'Cap long ' || i FROM generate_series(1, 30) i;
SELECT u.name AS owner, count(*), min(l.title) FILTER (WHERE u.name = 'Anna') AS anna_got
  FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id
 WHERE l.title LIKE 'Cap long %' GROUP BY u.name ORDER BY u.name;
SELECT nocrm.delete_automation(:capped_id);
