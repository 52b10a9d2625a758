-- nocrm_automation fuzz finding: 22008/in-extension
-- phase leads, case 831, seed 1
-- message: timestamp out of range |  | SQL statement "INSERT INTO nocrm.queue (kind, automation_id, action_no, lead_id, event, recipient, payload, run_at, actor_id) VALUES ($1, $2, $3, $4, $5, $6,         CASE WHEN $10 IS NULL OR $7 ? 'lead' THEN $7              ELSE $7 || jsonb_build_object('lead', $10) END,         CASE WHEN $9 IS NULL
-- regenerate: python3 test/fuzz/fuzz_definitions.py --seed 1 --case leads:831
-- run: psql -X -v ON_ERROR_STOP=0 -f THIS_FILE  (a database with test/fixtures/crm.sql loaded)
BEGIN;
DO $d$ BEGIN INSERT INTO nocrm.automations (name, event, target, conditions, actions, mode) VALUES ('auto 748894', 'lead.unassigned', NULL, '{"pipeline": [1, 2, "Onboarding"]}'::jsonb, '[{"type": "comment", "body": "''); DROP TABLE nocrm.leads; --"}, {"type": "remove_tags", "tags": "{{lead.title}}"}, {"type": "webhook", "url": "https://hooks.example.com/crm", "delay": "178000000 years"}, {"type": "set_status", "status": "standby", "delay": "1 year"}, {"type": "send_email", "template": "notification", "delay": "1 day"}]'::jsonb, 'live'); EXCEPTION WHEN invalid_parameter_value OR undefined_object OR invalid_datetime_format OR not_null_violation OR check_violation THEN NULL; END $d$;  INSERT INTO nocrm.leads (title, contact_email, status, pipeline_id, step_id) VALUES ('%.*s', 'client@example.com', 'lost', NULL, 3); UPDATE nocrm.leads SET title = '[1,2]' WHERE id = currval('nocrm.leads_id_seq'); DELETE FROM nocrm.leads WHERE id = currval('nocrm.leads_id_seq');
ROLLBACK;
