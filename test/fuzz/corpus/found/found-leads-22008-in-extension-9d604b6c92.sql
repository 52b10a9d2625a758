-- nocrm_automation fuzz finding: 22008/in-extension
-- phase leads, case 4119, seed 1
-- message: timestamp out of range |  | PL/pgSQL function nocrm.describe_actions(integer,jsonb,bigint,text) line 78 at assignment SQL statement "SELECT nocrm.describe_actions($1, $2, $3, $4)::text" 
-- regenerate: python3 test/fuzz/fuzz_definitions.py --seed 1 --case leads:4119
-- run: psql -X -v ON_ERROR_STOP=0 -f THIS_FILE  (a database with test/fixtures/crm.sql loaded)
BEGIN;
DO $d$ BEGIN INSERT INTO nocrm.automations (name, event, target, conditions, actions, mode) VALUES ('auto', 'lead.creation', NULL, '{"lacks_tag": ["B2B", "VIP"]}'::jsonb, '[{"tags": ["B2B", "\u00e9t\u00e9"], "type": "remove_tags"}, {"delay": "178000000 years", "type": "send_email", "template": "quote_followup"}]'::jsonb, 'test'); EXCEPTION WHEN invalid_parameter_value OR undefined_object OR invalid_datetime_format OR not_null_violation OR check_violation THEN NULL; END $d$;  INSERT INTO nocrm.leads (title, description, contact_email, status, user_id, pipeline_id, step_id) VALUES ('Ünïcödé', 'H+񇓨jG!삙6둩\񇔅H)zY
dxȹW4+D踦	箧󇄇񳧎bDżB鈴𨢮%ƃò˗s淒㟆Wk`Z󈡕#x騅zCȄ4谲-򌅟:ʃGɺ鎉ʰ򷴽3=󊤇Y񫙀񀹈±7锅ʔ)	1UȘ啭<Ɔ]Q<GVMȍZ 𭏇aY񼊦蠕', '﻿q𻨴%s%s%s%n', 'lost', 1, 2, 5); UPDATE nocrm.leads SET description = '{{lead.title', pipeline_id = 2, step_id = 6 WHERE id = currval('nocrm.leads_id_seq'); INSERT INTO nocrm.tags (lead_id, name) VALUES (currval('nocrm.leads_id_seq'), '濟K:[H㖵FlȔ넭');
ROLLBACK;
