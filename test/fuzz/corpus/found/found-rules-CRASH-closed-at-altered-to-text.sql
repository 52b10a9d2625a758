-- nocrm_automation fuzz finding: backend crash (SIGSEGV) on any write that closes a lead once
-- nocrm.leads.closed_at has been altered to another type (no automation needed).
-- found on e4c1b4e (rules:58, rules:223, rules:724 of seed 1): heap_compute_data_size_ext <- heap_form_tuple
-- <- heap_modify_tuple_by_cols <- nocrm_lead_before_trigger (src/events.c:189)
-- the BEFORE trigger stamps closed_at with now() (a by-value timestamptz Datum) without looking at
-- the column's type: in a text column that Datum is read as a varlena pointer.
-- run: psql -X -v ON_ERROR_STOP=0 -f THIS_FILE  (a database with test/fixtures/crm.sql loaded)
BEGIN;
ALTER TABLE nocrm.leads ALTER COLUMN closed_at TYPE text;
INSERT INTO nocrm.leads (title, status) VALUES ('closed at creation', 'won');
ROLLBACK;
