-- nocrm_automation fuzz finding: HANG, uninterruptible (OPEN on fb4bb5e)
-- phase definitions, Generator.wide_definition(); seed 1 cases definitions:35780 and definitions:52858
-- (those statements are 0.6-1.3 MB: this file builds the same list in SQL instead)
-- string_list() in src/definition.c drops duplicates with a nested loop (strcmp of every pair), with no
-- CHECK_FOR_INTERRUPTS: 20,000 tags take 0.4 s, 50,000 take 2.4 s, 100,000 take 9.7 s, and
-- with statement_timeout = 10 s a list of 150,000 tags was cancelled only after 21.6 s.  It applies to
-- tags, has_tag, lacks_tag and channels, in check_automation, in the automations trigger, and in every
-- backend's rule-cache reload (nocrm_compile_stored) after any change to users, pipelines, steps,
-- templates or automations.
-- run: psql -X -v ON_ERROR_STOP=0 -f THIS_FILE  (a database with test/fixtures/crm.sql loaded)
BEGIN;
SET LOCAL statement_timeout = '2s';
SELECT nocrm.check_automation('wide', 'lead.creation', NULL, '{}', jsonb_build_array(jsonb_build_object('type', 'add_tags', 'tags', (SELECT jsonb_agg('t' || g) FROM generate_series(1, 100000) g))));
ROLLBACK;
