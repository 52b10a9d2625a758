-- nocrm_automation fuzz finding: backend crash (SIGSEGV) on any UPDATE of a lead once
-- nocrm.leads.updated_at has been altered to text (no automation needed).
-- found on e4c1b4e while reducing the closed_at crash; same cause: src/events.c nocrm_lead_before_trigger
-- writes now() into updated_at (on UPDATE) by heap_modify_tuple_by_cols whatever the column's type.
-- run: psql -X -v ON_ERROR_STOP=0 -f THIS_FILE  (a database with test/fixtures/crm.sql loaded)
BEGIN;
ALTER TABLE nocrm.leads ALTER COLUMN updated_at TYPE text;
INSERT INTO nocrm.leads (title) VALUES ('x');
UPDATE nocrm.leads SET title = 'y' WHERE title = 'x';
ROLLBACK;
