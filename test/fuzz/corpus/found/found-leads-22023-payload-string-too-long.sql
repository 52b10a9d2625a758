-- nocrm_automation fuzz finding: a valid lead refused with 22023 "payload string too long" (pg_notify),
-- found on 77f3f27 (leads:11 of seed 1, --cases 2000), fixed in ac6c04e (payload bounded to 1,000 characters)
-- notify() (src/actions.c) cut the rendered message to 4,000 bytes, but the pg_notify payload is
-- row_to_json(...)::text, where '"' becomes '\"' and a control character '\u0001' (6 bytes): the
-- payload passed 8,000 bytes and the INSERT of the lead failed.
-- run: psql -X -v ON_ERROR_STOP=0 -f THIS_FILE  (a database with test/fixtures/crm.sql loaded)
BEGIN;
SELECT nocrm.create_automation('n', 'lead.creation', '[{"type": "notify", "user": 1, "message": "{{lead.title}}"}]'); INSERT INTO nocrm.leads (title) VALUES (repeat('"', 4000)); INSERT INTO nocrm.leads (title) VALUES (repeat(chr(1), 1500));
ROLLBACK;
