-- nocrm_automation fuzz finding: 22008 "timestamp out of range" from inside the lead triggers (OPEN on fb4bb5e)
-- minimal form of found-leads-22008-in-extension-*.sql (seed 1, leads:4119 and 9 more)
-- check_automation / the automations trigger accept any positive interval as "delay" (definition.c
-- parse_delay has no upper bound), e.g. "300000 years", "178000000 years", "2147483647 days".
-- When the automation fires, actions.c enqueue() computes run_at = now() + delay (and
-- describe_actions() in test mode computes runs_at the same way): timestamp out of range, so every
-- matching lead write fails, although the definition was accepted.
-- run: psql -X -v ON_ERROR_STOP=0 -f THIS_FILE  (a database with test/fixtures/crm.sql loaded)
BEGIN;
SELECT nocrm.check_automation('d', 'lead.creation', NULL, '{}', '[{"type": "webhook", "url": "https://h/x", "delay": "300000 years"}]'); SELECT nocrm.create_automation('d', 'lead.creation', '[{"type": "webhook", "url": "https://h/x", "delay": "300000 years"}]'); INSERT INTO nocrm.leads (title) VALUES ('t');
ROLLBACK;
