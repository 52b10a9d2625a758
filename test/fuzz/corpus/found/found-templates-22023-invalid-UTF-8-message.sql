-- nocrm_automation fuzz finding: 22023 with invalid UTF-8 in the error DETAIL, found by this harness on 77f3f27, fixed in 6e2af86
-- phase templates (1,358 of 20,000 cases of seed 1 on 77f3f27); seed file corpus/seeds/tpl-unclosed-multibyte.json
-- check_template_text() (src/templates.c) quoted the text after an unclosed "{{" with "%.20s", which cut
-- the 2-byte "é" in half: DETAIL:  "{{" at "{{xéééééééé\xc3" has no matching "}}".  Clients that
-- decode messages strictly (psycopg, JDBC, ...) fail on it, and GET STACKED DIAGNOSTICS text is invalid.
-- run: psql -X -v ON_ERROR_STOP=0 -f THIS_FILE  (a database with test/fixtures/crm.sql loaded)
BEGIN;
INSERT INTO nocrm.email_templates (name, subject, body) VALUES ('mb', 'x', 'ab{{xéééééééééééééééééééé');
ROLLBACK;
