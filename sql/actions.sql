-- Every action type, what it writes, and when it is skipped.
\i test/fixtures/crm.sql

INSERT INTO nocrm.leads (title, pipeline_id, user_id, contact_email) VALUES
  ('Alpha', 1, 1, 'alpha@client.example'),   -- lead 1
  ('Beta', NULL, NULL, NULL);                 -- lead 2: no pipeline, no owner, no contact
INSERT INTO nocrm.tags (lead_id, name) VALUES (1, 'cold'), (1, 'B2B');

-- Every action fires on a comment containing its keyword, so each can be tried alone.
CREATE FUNCTION pg_temp.on_comment(keyword text, actions jsonb) RETURNS integer
LANGUAGE sql AS $$
  SELECT nocrm.create_automation(name => 'on ' || keyword, event => 'lead.commented',
                                 conditions => jsonb_build_object('has_tag', keyword), actions => actions)
$$;
CREATE FUNCTION pg_temp.try(lead bigint, keyword text) RETURNS void
LANGUAGE sql AS $$
  INSERT INTO nocrm.tags (lead_id, name) VALUES (lead, keyword) ON CONFLICT DO NOTHING;
  INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (lead, 3, 'try ' || keyword);
  DELETE FROM nocrm.tags WHERE lead_id = lead AND name = keyword;
$$;
CREATE VIEW pg_temp.log AS
  SELECT id, lead_id, event, actor_id, automation_id, old_value, new_value, detail
    FROM nocrm.lead_history WHERE event LIKE 'action.%' OR event = 'automation.stopped';

SELECT pg_temp.on_comment('tags', '[{"type": "add_tags", "tags": ["hot", "B2B"]},
                                    {"type": "remove_tags", "tags": ["cold", "never-there"]}]');
SELECT pg_temp.on_comment('status', '[{"type": "set_status", "status": "standby"}]');
SELECT pg_temp.on_comment('step', '[{"type": "set_step", "step": "Preventivo"}]');
SELECT pg_temp.on_comment('stepid', '[{"type": "set_step", "step": 5}]');
SELECT pg_temp.on_comment('comment', '[{"type": "comment", "body": "Butler was here"}]');
SELECT pg_temp.on_comment('notify', '[{"type": "notify", "user": "owner", "message": "Look at this",
                                        "channels": ["browser", "email", "mobile"]}]');
SELECT pg_temp.on_comment('email', '[{"type": "send_email", "template": "quote_followup"},
                                     {"type": "send_email", "template": "quote_followup", "to": "boss@client.example"}]');
SELECT pg_temp.on_comment('later', '[{"type": "add_tags", "tags": "followed-up", "delay": "2 days"},
                                     {"type": "notify", "user": 4, "message": "Reminder", "delay": "PT30M"}]');

-- add_tags / remove_tags: only real changes are made and logged.
SELECT pg_temp.try(1, 'tags');
SELECT name FROM nocrm.tags WHERE lead_id = 1 ORDER BY name;
-- Again: nothing left to change, and the log says so.
SELECT pg_temp.try(1, 'tags');

-- set_status
SELECT pg_temp.try(1, 'status');
SELECT status FROM nocrm.leads WHERE id = 1;
SELECT pg_temp.try(1, 'status');   -- already standby

-- set_step by name, within the lead's pipeline (Vendite's Preventivo, not Onboarding's)
SELECT pg_temp.try(1, 'step');
SELECT pipeline_id, step_id FROM nocrm.leads WHERE id = 1;
-- by id, which can move the lead to another pipeline
SELECT pg_temp.try(1, 'stepid');
SELECT pipeline_id, step_id FROM nocrm.leads WHERE id = 1;
-- a lead in no pipeline has no step "Preventivo": skipped
SELECT pg_temp.try(2, 'step');

-- comment: written by the Butler (user 0); it raises lead.commented, and the
-- automation that wrote it is not re-run by it.
SELECT pg_temp.try(1, 'comment');
SELECT lead_id, user_id, body FROM nocrm.comments ORDER BY id;

-- notify the owner on every channel; a lead without owner is skipped
SELECT pg_temp.try(1, 'notify');
SELECT pg_temp.try(2, 'notify');
SELECT user_id, lead_id, message FROM nocrm.notifications ORDER BY id;

-- send_email to the contact, and to an explicit address; no contact: skipped
SELECT pg_temp.try(1, 'email');
SELECT pg_temp.try(2, 'email');

-- delayed actions are queued with their run time, not run now
SELECT pg_temp.try(1, 'later');
SELECT count(*) AS followed_up_now FROM nocrm.tags WHERE name = 'followed-up';

SELECT event, automation_id, old_value, new_value, detail FROM pg_temp.log ORDER BY id;
SELECT id, kind, automation_id, action_no, lead_id, event, recipient, payload, state, attempts,
       run_at - created_at AS delay
  FROM nocrm.queue ORDER BY id;

-- Everything above was done by the Butler on behalf of an automation.
SELECT count(*) FILTER (WHERE actor_id = 0 AND automation_id IS NOT NULL) AS by_butler,
       count(*) AS actions
  FROM pg_temp.log WHERE event LIKE 'action.%';
