-- add_tags in a bulk statement (64 rows or more, nothing listening to tag
-- events): the tags the statement's leads already have are read once per
-- 10,000 leads, the new ones written in batches.  The history rows, the
-- run log and the tags must be those of the per-lead path, which small
-- statements take: each workload runs both ways and is compared.
\i test/fixtures/crm.sql
SET nocrm.history = actions;
SET nocrm.run_log = 'all';   -- fired runs too, to compare them
SELECT nocrm.create_automation(name => 'tag new', event => 'lead.creation',
  actions => '[{"type": "add_tags", "tags": ["Nuovo", "Web", "Nuovo"]}]');
-- overlaps the first: records only what it adds
SELECT nocrm.create_automation(name => 'tag inbound', event => 'lead.creation',
  actions => '[{"type": "add_tags", "tags": ["Web", "Inbound"]}]');
-- sees the tag the first rule added in the same statement
SELECT nocrm.create_automation(name => 'vip if web', event => 'lead.creation',
  conditions => '{"has_tag": "Web"}', actions => '[{"type": "add_tags", "tags": ["VIP"]}]');
-- on won: a removal (per-lead statement) between two adds of the same lead
SELECT nocrm.create_automation(name => 'tag won', event => 'lead.status.changed.to', target => 'won',
  actions => '[{"type": "add_tags", "tags": ["Won", "VIP"]}]');
SELECT nocrm.create_automation(name => 'untag won', event => 'lead.status.changed.to', target => 'won',
  conditions => '{"field": "title", "op": "starts_with", "value": "lead 1"}',
  actions => '[{"type": "remove_tags", "tags": ["Nuovo"]}]');
SELECT nocrm.create_automation(name => 'retag won', event => 'lead.status.changed.to', target => 'won',
  actions => '[{"type": "add_tags", "tags": ["Nuovo", "Cliente"]}]');

-- a user's trigger tags some leads as they are written: the bulk path must find those tags
CREATE FUNCTION public.pretag() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.title LIKE '%7' THEN
    INSERT INTO nocrm.tags (lead_id, name) VALUES (NEW.id, 'Inbound');
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER pretag AFTER INSERT ON nocrm.leads FOR EACH ROW EXECUTE FUNCTION public.pretag();

CREATE TEMP TABLE outcome (way text, what text, automation_id int, detail text, value text, n bigint);
CREATE FUNCTION pg_temp.record(way text) RETURNS void LANGUAGE sql AS $$
  INSERT INTO outcome
  SELECT way, 'history', automation_id, detail, new_value::text, count(*)
    FROM nocrm.lead_history GROUP BY automation_id, detail, new_value::text
  UNION ALL
  SELECT way, 'run', automation_id, NULL, actions::text, count(*)
    FROM nocrm.automation_runs GROUP BY automation_id, actions::text
  UNION ALL
  SELECT way, 'tag', NULL, name, NULL, count(*) FROM nocrm.tags GROUP BY name
$$;
CREATE FUNCTION pg_temp.reset() RETURNS void LANGUAGE sql AS $$
  TRUNCATE nocrm.leads, nocrm.tags, nocrm.lead_history, nocrm.automation_runs RESTART IDENTITY CASCADE
$$;

-- bulk: 100 leads in one statement, then all won in one statement
INSERT INTO nocrm.leads (title) SELECT 'lead ' || g FROM generate_series(1, 100) g;
UPDATE nocrm.leads SET status = 'won';
SELECT pg_temp.record('bulk');
SELECT what, automation_id, detail, value, n FROM outcome WHERE way = 'bulk' ORDER BY what, automation_id, detail, value;

-- per lead: the same, one row per statement
SET client_min_messages = warning;
SELECT pg_temp.reset();
RESET client_min_messages;
DO $$
BEGIN
  FOR g IN 1..100 LOOP
    INSERT INTO nocrm.leads (title) VALUES ('lead ' || g);
  END LOOP;
  FOR g IN 1..100 LOOP
    UPDATE nocrm.leads SET status = 'won' WHERE id = g;
  END LOOP;
END $$;
SELECT pg_temp.record('per lead');
-- no difference either way
(SELECT what, automation_id, detail, value, n FROM outcome WHERE way = 'bulk'
 EXCEPT SELECT what, automation_id, detail, value, n FROM outcome WHERE way = 'per lead')
UNION ALL
(SELECT what, automation_id, detail, value, n FROM outcome WHERE way = 'per lead'
 EXCEPT SELECT what, automation_id, detail, value, n FROM outcome WHERE way = 'bulk');
-- and the tags of each lead are the same as in the bulk run's lead 7 and 17
SELECT lead_id, string_agg(name, ',' ORDER BY name) FROM nocrm.tags WHERE lead_id IN (1, 7, 17) GROUP BY lead_id ORDER BY lead_id;

-- a rolled-back savepoint takes its tags and their records with it
SET client_min_messages = warning;
SELECT pg_temp.reset();
RESET client_min_messages;
BEGIN;
SAVEPOINT s;
INSERT INTO nocrm.leads (title) SELECT 'lead ' || g FROM generate_series(1, 80) g;
ROLLBACK TO s;
INSERT INTO nocrm.leads (title) SELECT 'again ' || g FROM generate_series(1, 80) g;
COMMIT;
SELECT count(*) AS leads, (SELECT count(*) FROM nocrm.tags) AS tags,
       (SELECT count(*) FROM nocrm.lead_history) AS history FROM nocrm.leads;

-- more leads than one chunk of 10,000: every lead tagged once, recorded once
DROP TRIGGER pretag ON nocrm.leads;
SELECT nocrm.set_automation_enabled(id, false) FROM nocrm.automations WHERE name <> 'tag new';
SET client_min_messages = warning;
SELECT pg_temp.reset();
RESET client_min_messages;
INSERT INTO nocrm.leads (title) SELECT 'lead ' || g FROM generate_series(1, 12000) g;
SELECT name, count(*) FROM nocrm.tags GROUP BY name ORDER BY name;
SELECT new_value, count(*) FROM nocrm.lead_history GROUP BY new_value;
-- a bulk update over the chunk boundary, after a user's tags in the same transaction
SELECT nocrm.set_automation_enabled(id, true) FROM nocrm.automations WHERE name = 'tag won';
BEGIN;
INSERT INTO nocrm.tags (lead_id, name) VALUES (5, 'VIP'), (10001, 'Won'), (10002, 'VIP'), (10002, 'Won');
UPDATE nocrm.leads SET status = 'won';
COMMIT;
SELECT automation_id, new_value, detail, count(*) FROM nocrm.lead_history
 WHERE automation_id = 4 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;
SELECT name, count(*) FROM nocrm.tags GROUP BY name ORDER BY name;
