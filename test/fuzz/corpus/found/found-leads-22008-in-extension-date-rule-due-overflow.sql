-- nocrm_automation fuzz finding: a valid lead write refused with 22008 "timestamp out of range"
-- raised inside the extension: a date rule's due time (date value + date_offset) passes the end of
-- timestamptz, and the INSERT INTO nocrm.date_firings (src/dates.c, scheduling) fails the lead's write.
-- found on e4c1b4e (rules phase of seed 1: 136 of 1,000 cases).  Like found-leads-22008-huge-delay-minimal.sql:
-- an accepted automation must never make a valid lead write fail.
-- run: psql -X -v ON_ERROR_STOP=0 -f THIS_FILE  (a database with test/fixtures/crm.sql loaded)
BEGIN;
SELECT nocrm.create_automation(name => 'date overflow', event => 'lead.date.reached', target => 'next_action_at',
  actions => '[{"type": "add_tags", "tags": ["x"]}]');
UPDATE nocrm.automations SET date_offset = '1 day' WHERE name = 'date overflow';
INSERT INTO nocrm.leads (title, next_action_at) VALUES ('near the end of time', '294276-12-31 23:59:59');
ROLLBACK;
