-- nocrm_automation fuzz finding: a valid lead write refused with 22008 "date out of range for timestamp"
-- raised inside the extension: a date rule targets a date column, and a date beyond timestamptz's range
-- (valid for date: up to 5874897 AD) is cast to timestamptz in the INSERT INTO nocrm.date_firings
-- (src/dates.c, scheduling: $3::timestamptz).  found on e4c1b4e (rules phase of seed 1: 77 of 1,000 cases).
-- run: psql -X -v ON_ERROR_STOP=0 -f THIS_FILE  (a database with test/fixtures/crm.sql loaded)
BEGIN;
ALTER TABLE nocrm.leads ADD COLUMN renew_on date;
SELECT nocrm.create_automation(name => 'far date', event => 'lead.date.reached', target => 'renew_on',
  actions => '[{"type": "add_tags", "tags": ["x"]}]');
INSERT INTO nocrm.leads (title, renew_on) VALUES ('far', '300000-01-01');
ROLLBACK;
