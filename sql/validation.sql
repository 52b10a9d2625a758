-- Validation of automation definitions: every refused definition, its SQLSTATE,
-- message, detail and hint; nothing stored after a refusal; direct SQL on
-- nocrm.automations validated too; the management functions on a missing id.
\i test/fixtures/crm.sql
\set VERBOSITY default
\set SHOW_CONTEXT never

-- Control characters in messages are shown escaped, so that every case is one line.
CREATE FUNCTION pg_temp.visible(t text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT replace(replace(replace(t, E'\r', '\r'), E'\n', '\n'), E'\t', '\t')
$$;

-- Runs one statement; returns the error it raises, or code 'none' when it
-- succeeds (whatever it did is then rolled back, so a wrongly accepted case
-- shows up here and stores nothing).
CREATE FUNCTION pg_temp.try_sql(stmt text,
    OUT code text, OUT message text, OUT detail text, OUT hint text)
LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        EXECUTE stmt;
        RAISE EXCEPTION USING ERRCODE = 'ZZ999', MESSAGE = 'no error';
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, message = MESSAGE_TEXT,
                                detail = PG_EXCEPTION_DETAIL, hint = PG_EXCEPTION_HINT;
        IF code = 'ZZ999' THEN
            code := 'none';
        END IF;
        message := pg_temp.visible(message);
        detail := pg_temp.visible(detail);
        hint := pg_temp.visible(hint);
    END;
END $$;

-- One create_automation call (automation name 'rule').
CREATE FUNCTION pg_temp.try_automation(event text, target text, conditions jsonb, actions jsonb,
    OUT code text, OUT message text, OUT detail text, OUT hint text)
LANGUAGE sql AS $$
    SELECT * FROM pg_temp.try_sql(format(
        'SELECT nocrm.create_automation(name => %L, event => %L, actions => %L, target => %L, conditions => %L)',
        'rule', event, actions, target, conditions))
$$;

CREATE TEMP TABLE cases (
    n           serial PRIMARY KEY,
    label       text NOT NULL,
    event       text NOT NULL,
    target      text,
    conditions  jsonb NOT NULL DEFAULT '{}',
    actions     jsonb NOT NULL DEFAULT '[{"type": "comment", "body": "hi"}]'
);

-- event and target
INSERT INTO cases (label, event, target) VALUES
  ('unknown event',                      'lead.created',             NULL),
  ('event names are case-sensitive',     'Lead.Creation',            NULL),
  ('status.changed.to without target',   'lead.status.changed.to',   NULL),
  ('step.changed.to with empty target',  'lead.step.changed.to',     ''),
  ('target on lead.creation',            'lead.creation',            'won'),
  ('empty target on lead.commented',     'lead.commented',           ''),
  ('unknown status target',              'lead.status.changed.to',   'closed'),
  ('unknown step target (name)',         'lead.step.changed.to',     'Fatturato'),
  ('unknown step target (id)',           'lead.step.changed.to',     '99');

-- conditions
INSERT INTO cases (label, event, conditions) VALUES
  ('conditions: an array',               'lead.creation', '[{"status": "won"}]'),
  ('conditions: a string',               'lead.creation', '"won"'),
  ('conditions: null',                   'lead.creation', 'null'),
  ('unknown condition key',              'lead.creation', '{"tag": "B2B"}'),
  ('has_tag: a number',                  'lead.creation', '{"has_tag": 5}'),
  ('has_tag: empty list',                'lead.creation', '{"has_tag": []}'),
  ('has_tag: nested list',               'lead.creation', '{"has_tag": [["B2B"]]}'),
  ('has_tag: blank tag',                 'lead.creation', '{"has_tag": ["B2B", " "]}'),
  ('lacks_tag: an object',               'lead.creation', '{"lacks_tag": {"B2B": true}}'),
  ('status: unknown value',              'lead.creation', '{"status": ["won", "closed"]}'),
  ('status: a number',                   'lead.creation', '{"status": 1}'),
  ('status: empty list',                 'lead.creation', '{"status": []}'),
  ('owner: unknown id',                  'lead.creation', '{"owner": 99}'),
  ('owner: unknown email',               'lead.creation', '{"owner": ["anna@example.com", "nobody@example.com"]}'),
  ('owner: a boolean',                   'lead.creation', '{"owner": true}'),
  ('owner: empty list',                  'lead.creation', '{"owner": []}'),
  ('pipeline: unknown name',             'lead.creation', '{"pipeline": "Acquisti"}'),
  ('pipeline: unknown id',               'lead.creation', '{"pipeline": 99}'),
  ('pipeline: a boolean',                'lead.creation', '{"pipeline": false}'),
  ('step: unknown name',                 'lead.creation', '{"step": "Fatturato"}'),
  ('step: unknown id',                   'lead.creation', '{"step": [1, 99]}'),
  ('step: a boolean',                    'lead.creation', '{"step": true}');

-- the actions array and each action's shape
INSERT INTO cases (label, event, actions) VALUES
  ('actions: an object',                 'lead.creation', '{"type": "comment", "body": "hi"}'),
  ('actions: a string',                  'lead.creation', '"comment"'),
  ('actions: null',                      'lead.creation', 'null'),
  ('actions: empty array',               'lead.creation', '[]'),
  ('action: a string',                   'lead.creation', '["comment"]'),
  ('action: an array',                   'lead.creation', '[[]]'),
  ('action 2: a number',                 'lead.creation', '[{"type": "comment", "body": "hi"}, 5]'),
  ('action: no type',                    'lead.creation', '[{"user": 1}]'),
  ('action: unknown type',               'lead.creation', '[{"type": "assign_user", "user": 1}]'),
  ('action: type is a number',           'lead.creation', '[{"type": 1}]'),
  ('assign: misspelt argument',          'lead.creation', '[{"type": "assign", "usr": 1}]'),
  ('notify: misspelt argument',          'lead.creation', '[{"type": "notify", "user": 1, "message": "m", "chanels": ["email"]}]');

-- a required argument missing, for each action type
INSERT INTO cases (label, event, actions) VALUES
  ('assign without user',                'lead.creation', '[{"type": "assign"}]'),
  ('assign_round_robin without users',   'lead.creation', '[{"type": "assign_round_robin"}]'),
  ('assign_random without users',        'lead.creation', '[{"type": "assign_random"}]'),
  ('assign_balanced without users',      'lead.creation', '[{"type": "assign_balanced"}]'),
  ('add_tags without tags',              'lead.creation', '[{"type": "add_tags"}]'),
  ('remove_tags without tags',           'lead.creation', '[{"type": "remove_tags"}]'),
  ('set_status without status',          'lead.creation', '[{"type": "set_status"}]'),
  ('set_step without step',              'lead.creation', '[{"type": "set_step"}]'),
  ('comment without body',               'lead.creation', '[{"type": "comment"}]'),
  ('notify without user',                'lead.creation', '[{"type": "notify", "message": "m"}]'),
  ('notify without message',             'lead.creation', '[{"type": "notify", "user": 1}]'),
  ('send_email without template',        'lead.creation', '[{"type": "send_email", "to": "a@example.com"}]');

-- argument values
INSERT INTO cases (label, event, actions) VALUES
  ('assign: unknown user id',            'lead.creation', '[{"type": "assign", "user": 99}]'),
  ('assign: unknown user email',         'lead.creation', '[{"type": "assign", "user": "nobody@example.com"}]'),
  ('assign: user is a boolean',          'lead.creation', '[{"type": "assign", "user": true}]'),
  ('assign: user is a list',             'lead.creation', '[{"type": "assign", "user": [1, 2]}]'),
  ('round_robin: users a number',        'lead.creation', '[{"type": "assign_round_robin", "users": 1}]'),
  ('random: users a string',             'lead.creation', '[{"type": "assign_random", "users": "anna@example.com"}]'),
  ('balanced: users empty',              'lead.creation', '[{"type": "assign_balanced", "users": []}]'),
  ('round_robin: duplicate user',        'lead.creation', '[{"type": "assign_round_robin", "users": [1, 2, "ANNA@example.com"]}]'),
  ('random: duplicate user',             'lead.creation', '[{"type": "assign_random", "users": [2, 2]}]'),
  ('balanced: unknown user',             'lead.creation', '[{"type": "assign_balanced", "users": [1, 99]}]'),
  ('round_robin: unknown email',         'lead.creation', '[{"type": "assign_round_robin", "users": ["anna@example.com", "x@example.com"]}]'),
  ('round_robin: null member',           'lead.creation', '[{"type": "assign_round_robin", "users": [1, null]}]'),
  ('add_tags: a number',                 'lead.creation', '[{"type": "add_tags", "tags": 5}]'),
  ('add_tags: empty tag',                'lead.creation', '[{"type": "add_tags", "tags": ""}]'),
  ('remove_tags: empty list',            'lead.creation', '[{"type": "remove_tags", "tags": []}]'),
  ('set_status: unknown status',         'lead.creation', '[{"type": "set_status", "status": "closed"}]'),
  ('set_status: a number',               'lead.creation', '[{"type": "set_status", "status": 2}]'),
  ('set_step: unknown step name',        'lead.creation', '[{"type": "set_step", "step": "Fatturato"}]'),
  ('set_step: unknown step id',          'lead.creation', '[{"type": "set_step", "step": 99}]'),
  ('comment: empty body',                'lead.creation', '[{"type": "comment", "body": ""}]'),
  ('comment: body a number',             'lead.creation', '[{"type": "comment", "body": 5}]'),
  ('notify: empty message',              'lead.creation', '[{"type": "notify", "user": 1, "message": ""}]'),
  ('notify: unknown user',               'lead.creation', '[{"type": "notify", "user": "nobody@example.com", "message": "m"}]'),
  ('notify: bad channel',                'lead.creation', '[{"type": "notify", "user": 1, "message": "m", "channels": ["browser", "sms"]}]'),
  ('notify: channels empty',             'lead.creation', '[{"type": "notify", "user": 1, "message": "m", "channels": []}]'),
  ('notify: channels a number',          'lead.creation', '[{"type": "notify", "user": 1, "message": "m", "channels": 1}]'),
  ('send_email: unknown template',       'lead.creation', '[{"type": "send_email", "template": "welcome"}]'),
  ('send_email: template a number',      'lead.creation', '[{"type": "send_email", "template": 1}]'),
  ('send_email: to not an email',        'lead.creation', '[{"type": "send_email", "template": "quote_followup", "to": "anna"}]'),
  ('send_email: to a number',            'lead.creation', '[{"type": "send_email", "template": "quote_followup", "to": 5}]'),
  ('send_email: to with CR-LF',          'lead.creation', '[{"type": "send_email", "template": "quote_followup", "to": "a@example.com\r\nBcc: x@example.com"}]'),
  ('send_email: to with comma',          'lead.creation', '[{"type": "send_email", "template": "quote_followup", "to": "a@example.com,x@example.com"}]'),
  ('delay: not an interval',             'lead.creation', '[{"type": "comment", "body": "hi", "delay": "soon"}]'),
  ('delay: misspelt unit',               'lead.creation', '[{"type": "comment", "body": "hi", "delay": "2 hourz"}]'),
  ('delay: zero',                        'lead.creation', '[{"type": "comment", "body": "hi", "delay": "0 minutes"}]'),
  ('delay: negative',                    'lead.creation', '[{"type": "comment", "body": "hi", "delay": "-1 hour"}]'),
  ('delay: negative (ago)',              'lead.creation', '[{"type": "comment", "body": "hi", "delay": "1 day ago"}]'),
  ('delay: a number',                    'lead.creation', '[{"type": "comment", "body": "hi", "delay": 3600}]'),
  ('delay: a boolean',                   'lead.creation', '[{"type": "comment", "body": "hi", "delay": true}]');

-- actions that cannot run on this event
INSERT INTO cases (label, event, actions) VALUES
  ('notify owner on lead.unassigned',    'lead.unassigned', '[{"type": "notify", "user": "owner", "message": "m"}]'),
  ('assign on lead.deleted',             'lead.deleted', '[{"type": "assign", "user": 1}]'),
  ('assign_round_robin on lead.deleted', 'lead.deleted', '[{"type": "assign_round_robin", "users": [1, 2]}]'),
  ('add_tags on lead.deleted',           'lead.deleted', '[{"type": "add_tags", "tags": "gone"}]'),
  ('remove_tags on lead.deleted',        'lead.deleted', '[{"type": "remove_tags", "tags": "gone"}]'),
  ('set_status on lead.deleted',         'lead.deleted', '[{"type": "set_status", "status": "lost"}]'),
  ('set_step on lead.deleted',           'lead.deleted', '[{"type": "set_step", "step": "Nuovo"}]'),
  ('comment (action 2) on lead.deleted', 'lead.deleted', '[{"type": "notify", "user": 1, "message": "m"}, {"type": "comment", "body": "bye"}]'),
  ('assign: fractional user id',         'lead.creation', '[{"type": "assign", "user": 1.5}]'),
  ('round_robin: fractional member id',  'lead.creation', '[{"type": "assign_round_robin", "users": [1.5, 3]}]'),
  ('assign: huge user id',               'lead.creation', '[{"type": "assign", "user": 1e20}]'),
  ('action: type null',                  'lead.creation', '[{"type": null}]'),
  ('comment: blank body',                'lead.creation', '[{"type": "comment", "body": "  "}]'),
  ('notify: blank message',              'lead.creation', '[{"type": "notify", "user": 1, "message": "\t"}]');
INSERT INTO cases (label, event, actions) VALUES
  ('delay: longer than 10 years (fuzzer)', 'lead.creation', '[{"type": "webhook", "url": "https://h.example/x", "delay": "300000 years"}]'),
  ('tags: more than 1000 (fuzzer)',        'lead.creation',
     jsonb_build_array(jsonb_build_object('type', 'add_tags', 'tags', (SELECT jsonb_agg('t' || g) FROM generate_series(1, 1001) g)))),
  ('users: more than 1000 in a group',     'lead.creation',
     jsonb_build_array(jsonb_build_object('type', 'assign_random', 'users', (SELECT jsonb_agg(1) FROM generate_series(1, 1001) g))));
INSERT INTO cases (label, event, conditions) VALUES
  ('pipeline: negative id',              'lead.creation', '{"pipeline": -1}'),
  ('step: fractional id',                'lead.creation', '{"step": 2.5}');

\pset format unaligned
\pset fieldsep ' | '
SELECT c.n, c.label, r.code AS sqlstate, r.message, r.detail, r.hint
  FROM cases c, pg_temp.try_automation(c.event, c.target, c.conditions, c.actions) r
 ORDER BY c.n;
\pset format aligned

-- Every case was refused with one of the documented SQLSTATEs ...
SELECT r.code AS sqlstate, count(*)
  FROM cases c, pg_temp.try_automation(c.event, c.target, c.conditions, c.actions) r
 GROUP BY r.code ORDER BY r.code;
-- ... and nothing was stored.
SELECT count(*) AS automations FROM nocrm.automations;
SELECT count(*) AS counters FROM nocrm.assignment_counters;

-- Direct SQL on nocrm.automations is validated too.
\pset format unaligned
\pset fieldsep ' | '
SELECT code AS sqlstate, message, detail, hint FROM pg_temp.try_sql($$
    INSERT INTO nocrm.automations (name, event, actions)
    VALUES ('direct', 'lead.creation', '[{"type": "assign", "user": 99}]') $$);
SELECT code AS sqlstate, message, detail, hint FROM pg_temp.try_sql($$
    INSERT INTO nocrm.automations (name, event, target, actions)
    VALUES ('direct', 'lead.creation', 'won', '[{"type": "comment", "body": "hi"}]') $$);
\pset format aligned
SELECT count(*) AS automations FROM nocrm.automations;

-- Failed calls used identity values; start the good automations at id 1.
ALTER TABLE nocrm.automations ALTER COLUMN id RESTART WITH 1;

-- A valid automation with each action type.
SELECT nocrm.create_automation('assign', 'lead.creation',
         '[{"type": "assign", "user": "Anna@Example.com"}]') AS id;
SELECT nocrm.create_automation('round robin', 'lead.unassigned',
         '[{"type": "assign_round_robin", "users": [1, "matteo@example.com", 3]}]',
         conditions => '{"pipeline": "Vendite", "owner": null}') AS id;
SELECT nocrm.create_automation('random', 'lead.unassigned',
         '[{"type": "assign_random", "users": [2, 3]}]',
         conditions => '{"pipeline": 2}') AS id;
SELECT nocrm.create_automation('balanced', 'lead.status.changed.to',
         '[{"type": "assign_balanced", "users": ["giovanni@example.com", 4]}]', target => 'standby') AS id;
SELECT nocrm.create_automation('tags', 'lead.step.changed.to',
         '[{"type": "add_tags", "tags": ["B2B", "hot"]}, {"type": "remove_tags", "tags": "cold"}]',
         target => 'Preventivo', conditions => '{"has_tag": "B2B", "lacks_tag": ["spam"]}') AS id;
SELECT nocrm.create_automation('status and step', 'lead.commented',
         '[{"type": "set_status", "status": "standby"}, {"type": "set_step", "step": "Qualificato"}, {"type": "set_step", "step": 5}]',
         conditions => '{"status": ["todo", "standby"], "step": ["Nuovo", 5]}') AS id;
SELECT nocrm.create_automation('comment later', 'lead.email.received',
         '[{"type": "comment", "body": "Reply to this email", "delay": "2 hours"}, {"type": "comment", "body": "Still open?", "delay": "P1D"}]') AS id;
SELECT nocrm.create_automation('notify', 'lead.assigned',
         '[{"type": "notify", "user": "owner", "message": "New lead", "channels": ["browser", "email", "mobile"]}, {"type": "notify", "user": 4, "message": "FYI"}]',
         conditions => '{"owner": [1, "matteo@example.com"]}') AS id;
SELECT nocrm.create_automation('email', 'lead.status.changed.to',
         '[{"type": "send_email", "template": "quote_followup"}, {"type": "send_email", "template": "quote_followup", "to": "boss@example.com", "delay": "30 minutes"}]',
         target => 'won') AS id;
SELECT nocrm.create_automation('goodbye', 'lead.deleted',
         '[{"type": "notify", "user": "owner", "message": "Lead deleted"}, {"type": "send_email", "template": "quote_followup", "to": "sara.manager@example.com"}]',
         enabled => false) AS id;
SELECT id, name, event, target, enabled FROM nocrm.automations ORDER BY id;
-- The round-robin and balanced groups have their counters.
SELECT automation_id, action_no, user_id, position, assigned
  FROM nocrm.assignment_counters ORDER BY automation_id, action_no, position;

-- A bad UPDATE is refused and the old definition stays.
\pset format unaligned
\pset fieldsep ' | '
SELECT code AS sqlstate, message, detail, hint FROM pg_temp.try_sql($$ UPDATE nocrm.automations SET actions = '[]' WHERE id = 1 $$);
SELECT code AS sqlstate, message, detail, hint FROM pg_temp.try_sql($$ UPDATE nocrm.automations SET conditions = '{"owner": "nobody@example.com"}' WHERE id = 1 $$);
SELECT code AS sqlstate, message, detail, hint FROM pg_temp.try_sql($$ SELECT nocrm.update_automation(5, actions => '[{"type": "set_step", "step": "Fatturato"}]') $$);
-- Changing the event of a rule with a target needs clear_target.
SELECT code AS sqlstate, message, detail, hint FROM pg_temp.try_sql($$ SELECT nocrm.update_automation(9, event => 'lead.creation') $$);
\pset format aligned
SELECT id, name, event, target, conditions, actions FROM nocrm.automations WHERE id IN (1, 5, 9) ORDER BY id;

-- update_automation changes only what it is given.
SELECT nocrm.update_automation(5, actions => '[{"type": "add_tags", "tags": "quoted"}]');
SELECT id, name, event, target, conditions, actions, enabled FROM nocrm.automations WHERE id = 5;
SELECT nocrm.update_automation(5, target => 'Chiusura', conditions => '{}');
SELECT id, name, event, target, conditions, actions, enabled FROM nocrm.automations WHERE id = 5;
SELECT nocrm.update_automation(9, event => 'lead.creation', clear_target => true);
SELECT id, name, event, target, conditions, actions, enabled FROM nocrm.automations WHERE id = 9;
-- The round-robin group follows its users list.
SELECT nocrm.update_automation(2, actions => '[{"type": "assign_round_robin", "users": [3, 4]}]');
SELECT automation_id, action_no, user_id, position, assigned
  FROM nocrm.assignment_counters WHERE automation_id = 2 ORDER BY position;

-- rename, disable, enable
SELECT nocrm.rename_automation(1, 'assign to Anna');
SELECT nocrm.disable_automation(1);
SELECT id, name, enabled FROM nocrm.automations WHERE id = 1;
SELECT nocrm.enable_automation(1);
SELECT id, name, enabled FROM nocrm.automations WHERE id = 1;
SELECT nocrm.delete_automation(10);
SELECT count(*) AS automations FROM nocrm.automations;

-- Each management function on a missing id: no_data_found.
\pset format unaligned
\pset fieldsep ' | '
SELECT f AS function, r.code AS sqlstate, r.message, r.detail, r.hint
  FROM (VALUES
    (1, 'update_automation',  $$SELECT nocrm.update_automation(999, actions => '[{"type": "comment", "body": "hi"}]')$$),
    (2, 'enable_automation',  $$SELECT nocrm.enable_automation(999)$$),
    (3, 'disable_automation', $$SELECT nocrm.disable_automation(999)$$),
    (4, 'rename_automation',  $$SELECT nocrm.rename_automation(999, 'x')$$),
    (5, 'delete_automation',  $$SELECT nocrm.delete_automation(10)$$)) v(n, f, stmt),
       pg_temp.try_sql(stmt) r
 ORDER BY v.n;
\pset format aligned

-- A notify message must fit a pg_notify payload.
SELECT code AS sqlstate, message, detail, hint FROM pg_temp.try_automation('lead.creation', NULL, '{}',
  jsonb_build_array(jsonb_build_object('type', 'notify', 'user', 1, 'message', repeat('x', 4001))));
-- A user named by email in a rule cannot lose that email.
SELECT nocrm.create_automation(name => 'by email', event => 'lead.creation',
  actions => '[{"type": "assign", "user": "giovanni@example.com"}]') > 0 AS created;
UPDATE nocrm.users SET email = NULL WHERE email = 'giovanni@example.com';
SELECT email FROM nocrm.users WHERE name = 'Giovanni';
