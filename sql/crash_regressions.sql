-- Backend crashes found by the fuzzer, each reduced to a deterministic case.
\i test/fixtures/crm.sql

-- 1. The rule cache reloaded through a connection it did not own.  The
-- fuzzer's crash (SIGSEGV in the BEFORE trigger, rules phase) needed an
-- ANALYZE of nocrm.leads by autovacuum to land while a trigger was loading
-- the rules: the load ended invalid, and the next read of the rules (the
-- pre-assignment's) loaded them again through the SPI connection of the
-- PL/pgSQL function running the INSERT, which freed that INSERT's executor
-- state under the trigger.  Here a domain check run by the rule's compile
-- invalidates nocrm.leads (a GRANT) on every load, in the same way.
CREATE FUNCTION public.crash_touch_leads(v numeric) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
  GRANT SELECT ON nocrm.leads TO PUBLIC;   -- a relcache invalidation of nocrm.leads
  RETURN v >= 0;
END $$;
CREATE DOMAIN public.crash_score AS numeric CHECK (public.crash_touch_leads(VALUE));
ALTER TABLE nocrm.leads ADD COLUMN score public.crash_score;
SELECT nocrm.create_automation(name => 'High score', event => 'lead.creation',
  conditions => '{"field": "score", "op": ">=", "value": 50}',
  actions => '[{"type": "add_tags", "tags": ["high"]}]');
-- the INSERT runs inside a PL/pgSQL block, on its SPI connection (was a crash)
DO $$ BEGIN
  INSERT INTO nocrm.leads (title, pipeline_id, score, description)
    VALUES ('Low', 1, 5, repeat('x', 3000)), ('High', 1, 70, repeat('y', 3000));
END $$;
-- both rows written whole, placed at the pipeline's first step, the rule fired on one
SELECT l.title, l.step_id, l.score, length(l.description) AS description,
       coalesce(string_agg(t.name, ','), '') AS tags
  FROM nocrm.leads l LEFT JOIN nocrm.tags t ON t.lead_id = l.id
 WHERE l.title IN ('Low', 'High') GROUP BY l.id ORDER BY l.title;
-- and a write at top level, with no connection to borrow
INSERT INTO nocrm.leads (title, pipeline_id, score) VALUES ('Top', 1, 99);
SELECT l.title, l.step_id, string_agg(t.name, ',') AS tags
  FROM nocrm.leads l LEFT JOIN nocrm.tags t ON t.lead_id = l.id
 WHERE l.title = 'Top' GROUP BY l.id;
-- (the rule reads the column: it goes first, then the domain can take the column)
DELETE FROM nocrm.automations;
DROP DOMAIN public.crash_score CASCADE;
DROP FUNCTION public.crash_touch_leads(numeric);
