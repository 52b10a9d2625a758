-- nocrm_automation fuzz finding: documented relative dates refused.  docs/reference.md (Field
-- conditions) gives {"now": "-3 days"} as a value, and the refusal's own hint suggests
-- {"now": "0 days"} and {"now": "-1 day"}; both are refused with 22023 "delay '-3 days' is not
-- positive" (and anything over 10 years with "delay ... is longer than 10 years").
-- found on c81c018 by the rules phase's oracle (seed 31, rules:127 and rules:181).
-- cause: src/definition.c field_value() reads the offset with parse_delay(), the validator of an
-- action's delay (positive, at most 10 years), instead of a plain interval check.
-- Until fixed this file raises FZ007 (unexpected in every phase); after the fix it passes.
-- run: psql -X -v ON_ERROR_STOP=0 -f THIS_FILE  (a database with test/fixtures/crm.sql loaded)
BEGIN;
DO $d$
BEGIN
    PERFORM nocrm.check_automation('three days ago', 'lead.any_update', NULL,
        '{"field": "next_action_at", "op": "<=", "value": {"now": "-3 days"}}', '[{"type": "add_tags", "tags": ["x"]}]');
    PERFORM nocrm.check_automation('right now', 'lead.any_update', NULL,
        '{"field": "next_action_at", "op": "<=", "value": {"now": "0 days"}}', '[{"type": "add_tags", "tags": ["x"]}]');
EXCEPTION WHEN invalid_parameter_value THEN
    RAISE EXCEPTION 'documented relative date refused: %', SQLERRM USING ERRCODE = 'FZ007';
END $d$;
ROLLBACK;
