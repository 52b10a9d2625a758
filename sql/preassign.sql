-- Owners chosen before the row is written: a creation rule that assigns,
-- judged on the new row alone, writes the owner into the INSERT itself (no
-- second UPDATE), and records and raises exactly what the UPDATE did.
\i test/fixtures/crm.sql

-- Counts the UPDATEs of leads and remembers each inserted row's owner as written.
CREATE TABLE pg_temp.seen (lead_id bigint, op text, user_id bigint);
CREATE FUNCTION pg_temp.watch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO pg_temp.seen VALUES (NEW.id, TG_OP, NEW.user_id);
  RETURN NULL;
END $$;
CREATE TRIGGER zz_watch AFTER INSERT OR UPDATE ON nocrm.leads
  FOR EACH ROW EXECUTE FUNCTION pg_temp.watch();

SELECT nocrm.create_automation(name => 'notify Sara', event => 'lead.creation',
  actions => '[{"type": "notify", "user": "sara.manager@example.com", "message": "New: {{lead.title}}"}]');
SELECT nocrm.create_automation(name => 'round robin', event => 'lead.creation',
  conditions => '{"pipeline": "Vendite", "owner": null}',
  actions => '[{"type": "assign_round_robin", "users": ["anna@example.com", "matteo@example.com", "giovanni@example.com"]},
               {"type": "notify", "user": "owner", "message": "Yours: {{lead.title}}"}]');
-- a chained rule: runs inside the round robin's chain, as the Butler
SELECT nocrm.create_automation(name => 'tag assigned', event => 'lead.assigned',
  actions => '[{"type": "add_tags", "tags": ["assigned"]}]');

INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Lead ' || g, 1 FROM generate_series(1, 4) g;
-- each row was inserted with its owner, and never updated
SELECT s.lead_id, s.op, u.name AS written_owner FROM pg_temp.seen s JOIN nocrm.users u ON u.id = s.user_id ORDER BY 1, 2;
-- the timeline is the one the UPDATE made: the assignment, then lead.assigned
-- and lead.any_update by the round robin, the chained tag, the owner's notification
SELECT lead_id, event, automation_id, chain_depth, actor_id, old_value, new_value, detail
  FROM nocrm.lead_history WHERE lead_id = 1 ORDER BY id;
SELECT automation_id, lead_id, event, outcome, chain_depth, actions FROM nocrm.automation_runs WHERE lead_id = 1 ORDER BY id;
SELECT user_id, lead_id, message FROM nocrm.notifications ORDER BY id;
SELECT lead_id, name FROM nocrm.tags ORDER BY lead_id;
SELECT user_id, assigned FROM nocrm.assignment_counters ORDER BY position;

-- ON CONFLICT DO NOTHING: the skipped row's turn is given back (Matteo was
-- next, and still is).
CREATE UNIQUE INDEX leads_title_uq ON nocrm.leads (title);
TRUNCATE pg_temp.seen;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Lead 1', 1) ON CONFLICT DO NOTHING;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Lead 5', 1), ('Lead 2', 1) ON CONFLICT DO NOTHING;
SELECT l.title, u.name FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'Lead 5';
-- an upsert that updates instead of inserting: the existing lead keeps its owner
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Lead 3', 1)
  ON CONFLICT (title) DO UPDATE SET contact_email = 'upsert@example.com';
SELECT l.title, u.name, l.contact_email FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'Lead 3';
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Lead 6', 1);
SELECT l.title, u.name FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'Lead 6';
SELECT user_id, assigned FROM nocrm.assignment_counters ORDER BY position;
DROP INDEX nocrm.leads_title_uq;

-- A later BEFORE trigger that skips the row: the turn is given back too, at
-- the statement's end, so within the statement the next leads were dealt on
-- (Matteo, Anna) and the counts end within one of each other.
CREATE FUNCTION pg_temp.skip_spam() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.title LIKE 'spam%' THEN RETURN NULL; END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER zz_skip_spam BEFORE INSERT ON nocrm.leads FOR EACH ROW EXECUTE FUNCTION pg_temp.skip_spam();
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('spam 1', 1), ('Lead 7', 1), ('spam 2', 1), ('Lead 8', 1);
SELECT l.title, u.name FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title IN ('Lead 7', 'Lead 8') ORDER BY l.id;
DROP TRIGGER zz_skip_spam ON nocrm.leads;
SELECT user_id, assigned FROM nocrm.assignment_counters ORDER BY position;

-- A later BEFORE trigger that gives the lead another owner: the rule does not
-- assign it (its condition is owner: null) and the turn is given back.
CREATE FUNCTION pg_temp.vip_to_sara() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.title LIKE 'VIP%' THEN NEW.user_id := 4; END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER zz_vip BEFORE INSERT ON nocrm.leads FOR EACH ROW EXECUTE FUNCTION pg_temp.vip_to_sara();
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('VIP 1', 1);
DROP TRIGGER zz_vip ON nocrm.leads;
SELECT l.title, u.name FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'VIP 1';
SELECT event FROM nocrm.lead_history WHERE lead_id = (SELECT id FROM nocrm.leads WHERE title = 'VIP 1') ORDER BY id;
SELECT user_id, assigned FROM nocrm.assignment_counters ORDER BY position;

-- A lead inserted by a user's trigger while another INSERT is under way:
-- each statement keeps its own choices.
CREATE FUNCTION pg_temp.spawn_child() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.title LIKE 'parent%' THEN
    INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('child of ' || NEW.title, 1);
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER zz_spawn AFTER INSERT ON nocrm.leads FOR EACH ROW EXECUTE FUNCTION pg_temp.spawn_child();
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('parent 1', 1), ('parent 2', 1);
DROP TRIGGER zz_spawn ON nocrm.leads;
SELECT l.title, u.name FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id
 WHERE l.title LIKE '%parent%' ORDER BY l.id;
SELECT l.title, count(*) FILTER (WHERE h.event = 'action.assign_round_robin') AS assignments
  FROM nocrm.leads l JOIN nocrm.lead_history h ON h.lead_id = l.id
 WHERE l.title LIKE '%parent%' GROUP BY l.id, l.title ORDER BY l.id;
SELECT user_id, assigned FROM nocrm.assignment_counters ORDER BY position;

-- A savepoint rolled back takes its choices with it; the rotation goes on.
BEGIN;
SAVEPOINT s;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Rolled back', 1);
ROLLBACK TO SAVEPOINT s;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Lead 9', 1);
COMMIT;
SELECT l.title, u.name FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'Lead 9';

-- An earlier creation rule that changes the lead: the owner is set after
-- the insert, by the UPDATE, as before; the timeline is the same.
SELECT nocrm.delete_automation(id) FROM nocrm.automations WHERE name = 'round robin';
SELECT nocrm.create_automation(name => 'tag first', event => 'lead.creation',
  actions => '[{"type": "add_tags", "tags": ["new"]}]');
SELECT nocrm.create_automation(name => 'round robin', event => 'lead.creation',
  conditions => '{"pipeline": "Vendite", "owner": null}',
  actions => '[{"type": "assign_round_robin", "users": ["anna@example.com", "matteo@example.com", "giovanni@example.com"]},
               {"type": "notify", "user": "owner", "message": "Yours: {{lead.title}}"}]');
TRUNCATE pg_temp.seen;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Lead 10', 1);
SELECT s.op, u.name AS owner FROM pg_temp.seen s LEFT JOIN nocrm.users u ON u.id = s.user_id ORDER BY s.op;
SELECT event, automation_id, chain_depth, old_value, new_value, detail
  FROM nocrm.lead_history WHERE lead_id = (SELECT id FROM nocrm.leads WHERE title = 'Lead 10') ORDER BY id;

-- A rule that notifies the lead's owner: it reads the owner, so the assignment after it waits for the UPDATE.
SELECT nocrm.delete_automation(id) FROM nocrm.automations WHERE name IN ('tag first', 'round robin');
SELECT nocrm.create_automation(name => 'notify owner first', event => 'lead.creation',
  actions => '[{"type": "notify", "user": "owner", "message": "hi"}]');
SELECT nocrm.create_automation(name => 'round robin', event => 'lead.creation',
  conditions => '{"pipeline": "Vendite", "owner": null}',
  actions => '[{"type": "assign_round_robin", "users": ["anna@example.com", "matteo@example.com", "giovanni@example.com"]},
               {"type": "notify", "user": "owner", "message": "Yours: {{lead.title}}"}]');
TRUNCATE pg_temp.seen;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Lead 11', 1);
SELECT s.op, u.name AS owner FROM pg_temp.seen s LEFT JOIN nocrm.users u ON u.id = s.user_id ORDER BY s.op;
SELECT event, automation_id, detail FROM nocrm.lead_history
 WHERE lead_id = (SELECT id FROM nocrm.leads WHERE title = 'Lead 11') AND event LIKE 'action.%' ORDER BY id;
SELECT nocrm.delete_automation(id) FROM nocrm.automations WHERE name = 'notify owner first';

-- Owners given by the writer, leads in another pipeline, and automations off: no rule chooses.
TRUNCATE pg_temp.seen;
INSERT INTO nocrm.leads (title, pipeline_id, user_id) VALUES ('Lead 12', 1, 4);
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Lead 13', 2);
SET nocrm.automations_enabled = off;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Lead 14', 1);
RESET nocrm.automations_enabled;
SELECT l.title, s.op, u.name AS owner FROM pg_temp.seen s JOIN nocrm.leads l ON l.id = s.lead_id
  LEFT JOIN nocrm.users u ON u.id = s.user_id ORDER BY l.id;

-- With the event trigger disabled no rule runs, so none may choose an owner.
ALTER TABLE nocrm.leads DISABLE TRIGGER nocrm_lead_events_insert;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Lead 15', 1);
ALTER TABLE nocrm.leads ENABLE TRIGGER nocrm_lead_events_insert;
SELECT title, user_id FROM nocrm.leads WHERE title = 'Lead 15';

-- Test mode: a rule in test mode assigns nobody, before or after the insert.
UPDATE nocrm.automations SET mode = 'test' WHERE name = 'round robin';
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Lead 16', 1);
SELECT title, user_id FROM nocrm.leads WHERE title = 'Lead 16';
SELECT outcome, actions FROM nocrm.automation_runs
 WHERE lead_id = (SELECT id FROM nocrm.leads WHERE title = 'Lead 16') ORDER BY id;

-- A fixed owner: chosen before the insert while the user is active; an
-- inactive one is skipped with the same history row as before.
SELECT nocrm.delete_automation(id) FROM nocrm.automations WHERE name = 'round robin';
SELECT nocrm.create_automation(name => 'to Matteo', event => 'lead.creation',
  conditions => '{"owner": null}', actions => '[{"type": "assign", "user": "matteo@example.com"}]');
TRUNCATE pg_temp.seen;
INSERT INTO nocrm.leads (title) VALUES ('Lead 17');
UPDATE nocrm.users SET active = false WHERE email = 'matteo@example.com';
INSERT INTO nocrm.leads (title) VALUES ('Lead 18');
SELECT l.title, s.op, u.name AS owner FROM pg_temp.seen s JOIN nocrm.leads l ON l.id = s.lead_id
  LEFT JOIN nocrm.users u ON u.id = s.user_id ORDER BY l.id, s.op;
SELECT l.title, h.event, h.new_value, h.detail FROM nocrm.lead_history h JOIN nocrm.leads l ON l.id = h.lead_id
 WHERE l.title IN ('Lead 17', 'Lead 18') AND h.event LIKE 'action.assign%' ORDER BY h.id;

-- A bulk statement: after the first picks the group's members are held in
-- memory for the rest of the statement (picks without a query); the rows are
-- still written with their owners, the rotation stays strict, each
-- assignment recorded by the Butler.
SELECT nocrm.delete_automation(id) FROM nocrm.automations WHERE name = 'to Matteo';
UPDATE nocrm.users SET active = true WHERE email = 'matteo@example.com';
SELECT nocrm.create_automation(name => 'bulk robin', event => 'lead.creation',
  conditions => '{"owner": null}',
  actions => '[{"type": "assign_round_robin", "users": ["anna@example.com", "matteo@example.com", "giovanni@example.com"]}]');
CREATE TEMP TABLE before_bulk AS
  SELECT c.user_id, c.assigned FROM nocrm.group_counts c JOIN nocrm.automations a ON a.id = c.automation_id
   WHERE a.name = 'bulk robin';
TRUNCATE pg_temp.seen;
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Bulk ' || g, 1 FROM generate_series(1, 30) g;
SELECT count(*) FILTER (WHERE op = 'INSERT') AS inserted, count(*) FILTER (WHERE op = 'UPDATE') AS updated,
       count(*) FILTER (WHERE user_id IS NULL) AS without_owner FROM pg_temp.seen;
SELECT u.name, b.assigned AS before, c.assigned - b.assigned AS got
  FROM nocrm.group_counts c JOIN nocrm.automations a ON a.id = c.automation_id
  JOIN before_bulk b USING (user_id) JOIN nocrm.users u ON u.id = c.user_id
 WHERE a.name = 'bulk robin' ORDER BY c.position;
SELECT count(*) AS same_owner_twice_in_a_row FROM (
  SELECT user_id, lag(user_id) OVER (ORDER BY id) AS prev FROM nocrm.leads WHERE title LIKE 'Bulk %') x
 WHERE user_id = prev;
SELECT count(*) AS recorded FROM nocrm.lead_history h JOIN nocrm.leads l ON l.id = h.lead_id
 WHERE l.title LIKE 'Bulk %' AND h.event = 'action.assign_round_robin' AND h.actor_id = 0
   AND h.new_value->>'user_id' = l.user_id::text;
