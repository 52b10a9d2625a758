-- Email as the owner: "from": "owner" / "reply_to" on send_email and on
-- notify's email channel, users.sender_verified and sender_name, what the
-- queue row carries and the message built from it.
\i test/fixtures/crm.sql
SET nocrm.mail_from = 'butler@crm.example';
SET nocrm.mail_from_name = 'Acme CRM';
SET client_min_messages = warning;
DROP ROLE IF EXISTS regress_owner_agent;
DROP ROLE IF EXISTS regress_owner_admin;
RESET client_min_messages;
CREATE ROLE regress_owner_agent IN ROLE nocrm_agent;
CREATE ROLE regress_owner_admin IN ROLE nocrm_admin;

-- A header of a message, unfolded; encoded words decoded.
CREATE FUNCTION pg_temp.header(msg text, name text) RETURNS text
LANGUAGE sql AS $$
  SELECT substring(regexp_replace(split_part(msg, E'\r\n\r\n', 1), E'\r\n[ \t]', ' ', 'g')
                   FROM '(?:^|\r\n)' || name || ': ([^\r\n]*)')
$$;
CREATE FUNCTION pg_temp.decoded(value text) RETURNS text
LANGUAGE sql AS $$
  SELECT coalesce(string_agg(convert_from(decode(m[1], 'base64'), 'UTF8'), '' ORDER BY n), value)
    FROM regexp_matches(value, '=\?UTF-8\?B\?([^?]*)\?=', 'g') WITH ORDINALITY AS t(m, n)
$$;
-- The message the drain would send for queue row q (its template rendered now).
CREATE FUNCTION pg_temp.message(q bigint) RETURNS text
LANGUAGE sql AS $$
  SELECT nocrm.email_message(x.recipient, r.subject, r.body, x.idempotency_key::text, x.payload)
    FROM nocrm.queue x,
         nocrm.render_template(coalesce(x.payload ->> 'template', 'notification'), x.lead_id,
                               x.payload ->> 'message') r
   WHERE x.id = q
$$;
CREATE FUNCTION pg_temp.sent(q bigint) RETURNS TABLE (from_header text, reply_to text, message_id_domain text)
LANGUAGE sql AS $$
  SELECT pg_temp.decoded(pg_temp.header(m, 'From')), pg_temp.decoded(pg_temp.header(m, 'Reply-To')),
         substring(pg_temp.header(m, 'Message-ID') FROM '@([^>]*)>')
    FROM pg_temp.message(q) m
$$;

\set VERBOSITY terse
-- Rule-time validation: bad values are 22023.
SELECT nocrm.create_automation(name => 'bad from', event => 'lead.creation',
  actions => '[{"type": "send_email", "template": "quote_followup", "from": "boss"}]');
SELECT nocrm.create_automation(name => 'bad from', event => 'lead.creation',
  actions => '[{"type": "send_email", "template": "quote_followup", "from": true}]');
SELECT nocrm.create_automation(name => 'bad reply_to', event => 'lead.creation',
  actions => '[{"type": "send_email", "template": "quote_followup", "reply_to": 7}]');
SELECT nocrm.create_automation(name => 'bad reply_to', event => 'lead.creation',
  actions => '[{"type": "send_email", "template": "quote_followup", "reply_to": "Sales <sales@acme.example>"}]');
SELECT nocrm.create_automation(name => 'no owner', event => 'lead.unassigned',
  actions => '[{"type": "send_email", "template": "quote_followup", "from": "owner"}]');
SELECT nocrm.create_automation(name => 'notify browser', event => 'lead.creation',
  actions => '[{"type": "notify", "user": "owner", "message": "x", "reply_to": "owner"}]');
SELECT nocrm.create_automation(name => 'misspelt', event => 'lead.creation',
  actions => '[{"type": "send_email", "template": "quote_followup", "form": "owner"}]');
\set VERBOSITY default
SELECT nocrm.create_automation(name => 'bad from', event => 'lead.creation',
  actions => '[{"type": "send_email", "template": "quote_followup", "from": "boss"}]');
\set VERBOSITY terse

-- Users: sender_verified only by admins; it needs an email; sender_name one line.
SET ROLE regress_owner_agent;
UPDATE nocrm.users SET sender_verified = true WHERE id = 1;   -- no UPDATE on users at all
RESET ROLE;
-- even with a column grant, an agent cannot verify (itself or anyone)
GRANT UPDATE (sender_verified, sender_name) ON nocrm.users TO regress_owner_agent;
SET ROLE regress_owner_agent;
\set VERBOSITY default
UPDATE nocrm.users SET sender_verified = true WHERE id = 1;
\set VERBOSITY terse
RESET ROLE;
REVOKE UPDATE (sender_verified, sender_name) ON nocrm.users FROM regress_owner_agent;
SET ROLE regress_owner_admin;
UPDATE nocrm.users SET sender_verified = true WHERE id = 1;
INSERT INTO nocrm.users (name, sender_verified) VALUES ('Nobody', true);
UPDATE nocrm.users SET sender_name = E'Anna\nBcc: x@y' WHERE id = 1;
UPDATE nocrm.users SET sender_name = '  ' WHERE id = 1;
RESET ROLE;
SELECT id, name, sender_name, sender_verified FROM nocrm.users WHERE id IN (1, 2) ORDER BY id;
-- a new address is not verified: changing the email clears the flag
UPDATE nocrm.users SET email = 'anna.r@example.com' WHERE id = 1;
SELECT sender_verified FROM nocrm.users WHERE id = 1;
UPDATE nocrm.users SET email = 'anna@example.com' WHERE id = 1;
UPDATE nocrm.users SET sender_verified = true WHERE id = 1;
-- Giovanni (3) has a non-ASCII display name and is verified; Matteo (2) is not.
UPDATE nocrm.users SET sender_name = 'Giovanni Rossì', sender_verified = true WHERE id = 3;

-- The rules.
SELECT nocrm.create_automation(name => 'quote as owner', event => 'lead.step.changed.to',
  target => 'Preventivo',
  actions => '[{"type": "send_email", "template": "quote_followup", "from": "owner"}]');
SELECT nocrm.create_automation(name => 'reply to owner', event => 'lead.commented',
  conditions => '{"has_tag": "reply"}',
  actions => '[{"type": "send_email", "template": "quote_followup", "reply_to": "owner"}]');
SELECT nocrm.create_automation(name => 'reply to sales', event => 'lead.commented',
  conditions => '{"has_tag": "sales"}',
  actions => '[{"type": "send_email", "template": "quote_followup", "from": "owner", "reply_to": "sales@acme.example"}]');
SELECT nocrm.create_automation(name => 'tell the manager', event => 'lead.step.changed.to',
  target => 'Chiusura',
  actions => '[{"type": "notify", "user": 4, "message": "{{lead.title}} closing", "channels": ["browser", "email"], "from": "owner"}]');

INSERT INTO nocrm.leads (title, user_id, contact_email) VALUES
  ('Verified owner', 1, 'c1@client.example'),   -- 1
  ('Unverified owner', 2, 'c2@client.example'), -- 2
  ('No owner', NULL, 'c3@client.example'),      -- 3
  ('Accented owner', 3, 'c4@client.example');   -- 4
UPDATE nocrm.leads SET step_id = 3 WHERE id IN (1, 2, 3, 4);

-- What each queue row carries and what its history row says.
SELECT q.lead_id, q.recipient, q.payload - 'template' - 'to' AS sender, h.detail
  FROM nocrm.queue q
  JOIN nocrm.lead_history h ON h.new_value ->> 'queue_id' = q.id::text
 WHERE q.kind = 'email' ORDER BY q.id;
-- The headers as they would be sent; the Message-ID keeps nocrm.mail_from's domain.
SELECT q.lead_id, s.* FROM nocrm.queue q, pg_temp.sent(q.id) s WHERE q.kind = 'email' ORDER BY q.id;
-- The raw From line of the accented name: encoded words, the address bare.
SELECT pg_temp.header(pg_temp.message(id), 'From') FROM nocrm.queue WHERE lead_id = 4 AND kind = 'email';

-- Reply-To the owner, and a fixed Reply-To (From owner verified: the fixed one stays).
INSERT INTO nocrm.leads (title, user_id, contact_email) VALUES ('Reply', 2, 'c5@client.example'); -- 5
INSERT INTO nocrm.leads (title, user_id, contact_email) VALUES ('Sales', 1, 'c6@client.example'); -- 6
INSERT INTO nocrm.tags (lead_id, name) VALUES (5, 'reply'), (6, 'sales');
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (5, 2, 'call me'), (6, 1, 'call me');
SELECT q.lead_id, q.payload - 'template' - 'to' AS sender, h.detail
  FROM nocrm.queue q
  JOIN nocrm.lead_history h ON h.new_value ->> 'queue_id' = q.id::text
 WHERE q.kind = 'email' AND q.lead_id IN (5, 6) ORDER BY q.id;
SELECT q.lead_id, s.* FROM nocrm.queue q, pg_temp.sent(q.id) s
 WHERE q.kind = 'email' AND q.lead_id IN (5, 6) ORDER BY q.id;

-- notify by email From the owner: to the manager, From the verified owner.
UPDATE nocrm.leads SET step_id = 4 WHERE id IN (1, 2);
SELECT q.lead_id, q.recipient, q.payload ->> 'from' AS "from", q.payload ->> 'reply_to' AS reply_to, h.detail
  FROM nocrm.queue q
  JOIN nocrm.lead_history h ON h.new_value ->> 'queue_id' = q.id::text
 WHERE q.kind = 'email' AND q.payload ? 'channel' ORDER BY q.id;
SELECT q.lead_id, s.* FROM nocrm.queue q, pg_temp.sent(q.id) s
 WHERE q.kind = 'email' AND q.payload ? 'channel' ORDER BY q.id;

-- An inactive owner is not used; nor an owner since deleted.
UPDATE nocrm.users SET active = false WHERE id = 3;
UPDATE nocrm.leads SET step_id = 2 WHERE id = 4;
UPDATE nocrm.leads SET step_id = 3 WHERE id = 4;
SELECT payload - 'template' - 'to' AS sender, h.detail FROM nocrm.queue q
  JOIN nocrm.lead_history h ON h.new_value ->> 'queue_id' = q.id::text
 WHERE q.lead_id = 4 ORDER BY q.id DESC LIMIT 1;

-- Without the options nothing changes: no sender keys, From nocrm.mail_from.
SELECT nocrm.create_automation(name => 'plain', event => 'lead.creation',
  actions => '[{"type": "send_email", "template": "quote_followup"}]');
INSERT INTO nocrm.leads (title, user_id, contact_email) VALUES ('Plain', 1, 'c7@client.example');
SELECT q.payload, h.detail, s.*
  FROM nocrm.queue q JOIN nocrm.lead_history h ON h.new_value ->> 'queue_id' = q.id::text,
       pg_temp.sent(q.id) s
 WHERE q.lead_id = 7;
-- A payload whose From was edited to something unusable falls back to nocrm.mail_from.
SELECT pg_temp.header(nocrm.email_message('a@client.example', 's', 'b', 'k',
         '{"from": "x\r\nBcc: evil@x", "from_name": "Evil"}'), 'From');
-- admins may preview; agents may not
SET ROLE regress_owner_admin;
SELECT pg_temp.header(nocrm.email_message('a@client.example', 's', 'b', 'k',
         '{"reply_to": "anna@example.com", "reply_to_name": "Anna \"the\" Boss"}'), 'Reply-To');
RESET ROLE;
SET ROLE regress_owner_agent;
SELECT nocrm.email_message('a@client.example', 's', 'b', 'k', '{}');
RESET ROLE;

-- explain() and describe_actions() show the From and Reply-To the engine
-- would choose for each lead now (the same words as the history's detail):
-- verified owner, unverified (Reply-To the owner), no owner, inactive owner.
SELECT l.id, d ->> 'from' AS "from", d ->> 'from_name' AS from_name, d ->> 'reply_to' AS reply_to,
       d ->> 'reply_to_name' AS reply_to_name, d ->> 'sender' AS sender
  FROM nocrm.leads l, nocrm.automations a, jsonb_array_elements(nocrm.describe_actions(a.id, a.actions, l.id)) d
 WHERE a.name = 'quote as owner' AND l.id IN (1, 2, 3, 4) ORDER BY l.id;
-- Reply-To the owner; From the owner with a fixed Reply-To; notify by email.
SELECT a.name, d ->> 'from' AS "from", d ->> 'reply_to' AS reply_to, d ->> 'sender' AS sender
  FROM nocrm.automations a, jsonb_array_elements(nocrm.describe_actions(a.id, a.actions, 6)) d
 WHERE a.name IN ('reply to owner', 'reply to sales', 'tell the manager') ORDER BY a.id;
-- Without the options: no sender keys.
SELECT nocrm.describe_actions(a.id, a.actions, 7) -> 0 ?| ARRAY['from', 'reply_to', 'sender'] AS has_sender_keys
  FROM nocrm.automations a WHERE a.name = 'plain';
-- explain() as an admin: the actions column carries them.
SET ROLE regress_owner_admin;
SELECT name, would_fire, actions -> 0 ->> 'from' AS "from", actions -> 0 ->> 'reply_to' AS reply_to,
       actions -> 0 ->> 'sender' AS sender
  FROM nocrm.explain(5, 'lead.commented') WHERE kind = 'automation' ORDER BY id;
RESET ROLE;

DROP EXTENSION nocrm_automation CASCADE;
DROP ROLE regress_owner_agent;
DROP ROLE regress_owner_admin;
