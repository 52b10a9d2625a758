-- Working hours in users' time zones (DST included), absences, and
-- availability-aware group assignment with weights, caps and fallbacks.
\i test/fixtures/crm.sql

-- Anna works in Rome, Mon-Fri 9-13 and 14-18; Matteo in New York, Mon-Fri 9-17.
UPDATE nocrm.users SET timezone = 'Europe/Rome' WHERE name = 'Anna';
UPDATE nocrm.users SET timezone = 'America/New_York' WHERE name = 'Matteo';
INSERT INTO nocrm.working_hours (user_id, weekday, starts, ends)
SELECT 1, d, h.s, h.e FROM generate_series(1, 5) d, (VALUES ('09:00'::time, '13:00'::time), ('14:00', '18:00')) h(s, e);
INSERT INTO nocrm.working_hours (user_id, weekday, starts, ends)
SELECT 2, d, '09:00', '17:00' FROM generate_series(1, 5) d;

-- is_working: the same instant is working time for one and not the other.
SELECT t, nocrm.is_working(1, t) AS anna, nocrm.is_working(2, t) AS matteo, nocrm.is_working(3, t) AS giovanni_no_hours
  FROM (VALUES (timestamptz '2026-11-23 08:30+00'),   -- Mon 09:30 Rome, 03:30 New York
               (timestamptz '2026-11-23 12:30+00'),   -- Mon 13:30 Rome (lunch), 07:30 NY
               (timestamptz '2026-11-23 15:00+00'),   -- Mon 16:00 Rome, 10:00 NY
               (timestamptz '2026-11-23 21:30+00'),   -- Mon 22:30 Rome, 16:30 NY
               (timestamptz '2026-11-28 10:00+00')) v(t)   -- Saturday
 ORDER BY t;

-- next_working_time: lunch, evening, weekend.
SELECT after, nocrm.next_working_time(1, after) AS anna_next, nocrm.next_working_time(2, after) AS matteo_next
  FROM (VALUES (timestamptz '2026-11-23 12:30+00'),
               (timestamptz '2026-11-27 22:00+00'),    -- Friday night
               (timestamptz '2026-11-23 08:30+00')) v(after)
 ORDER BY after;

-- Across DST: Rome moves from UTC+1 to UTC+2 on Sunday 2026-03-29, so
-- 09:00 local is 08:00 UTC on Friday 27 and 07:00 UTC on Monday 30.
SELECT nocrm.next_working_time(1, '2026-03-27 07:00+00') AS friday_before,
       nocrm.next_working_time(1, '2026-03-28 12:00+00') AS monday_after;
-- New York changes on Sunday 2026-03-08: 09:00 local is 14:00 UTC before, 13:00 UTC after.
SELECT nocrm.next_working_time(2, '2026-03-05 23:00+00') AS friday_before,
       nocrm.next_working_time(2, '2026-03-07 12:00+00') AS monday_after;

-- Absences: skipped over by next_working_time; nested and back-to-back periods too.
INSERT INTO nocrm.absences (user_id, starts_at, ends_at, reason) VALUES
  (1, '2026-11-23 00:00+00', '2026-11-25 00:00+00', 'holiday'),
  (1, '2026-11-24 12:00+00', '2026-11-25 12:00+00', 'extended');
SELECT nocrm.is_absent(1, '2026-11-24 09:00+00') AS absent,
       nocrm.next_working_time(1, '2026-11-23 09:00+00') AS back_at;
SELECT nocrm.is_available(1, '2026-11-24 09:00+00') AS anna_away,
       nocrm.is_available(2, '2026-11-24 09:00+00') AS matteo,
       nocrm.is_available(2, '2026-11-24 09:00+00', true) AS matteo_in_hours;

-- Group assignment at "now": make the test independent of when it runs by
-- giving everyone hours that cover every day, then switching one off.
DELETE FROM nocrm.working_hours;
DELETE FROM nocrm.absences;
INSERT INTO nocrm.working_hours (user_id, weekday, starts, ends)
SELECT u, d, '00:00', '23:59:59.999999' FROM generate_series(1, 3) u, generate_series(1, 7) d;

SELECT nocrm.create_automation(name => 'rr', event => 'lead.creation', conditions => '{"pipeline": "Vendite"}',
  actions => '[{"type": "assign_round_robin", "users": [1, 2, 3], "only_working_hours": true}]');

-- Matteo is absent: skipped; back, he catches up.
INSERT INTO nocrm.absences (user_id, starts_at, ends_at, reason) VALUES (2, now() - interval '1 day', now() + interval '1 day', 'sick');
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'absent ' || i, 1 FROM generate_series(1, 4) i;
SELECT l.title, u.name FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id ORDER BY l.id;
DELETE FROM nocrm.absences;
-- Giovanni is outside working hours now (no hours today), and only_working_hours is on.
DELETE FROM nocrm.working_hours WHERE user_id = 3;
INSERT INTO nocrm.working_hours (user_id, weekday, starts, ends)
SELECT 3, d, '00:00', '00:00:00.000001' FROM generate_series(1, 7) d;
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'hours ' || i, 1 FROM generate_series(1, 3) i;
SELECT l.title, u.name FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title LIKE 'hours%' ORDER BY l.id;

-- Nobody available: left unassigned and logged (default fallback) ...
INSERT INTO nocrm.absences (user_id, starts_at, ends_at) SELECT u, now() - interval '1 hour', now() + interval '1 hour' FROM generate_series(1, 2) u;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('nobody', 1);
SELECT user_id FROM nocrm.leads WHERE title = 'nobody';
SELECT event, detail FROM nocrm.lead_history WHERE lead_id = (SELECT id FROM nocrm.leads WHERE title = 'nobody') AND event LIKE 'action.%';
-- ... or assigned anyway with "fallback": "anyone".
SELECT nocrm.update_automation(1, actions => '[{"type": "assign_round_robin", "users": [1, 2, 3], "only_working_hours": true, "fallback": "anyone"}]');
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('anyone', 1);
SELECT u.name FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'anyone';
SELECT event, detail FROM nocrm.lead_history WHERE lead_id = (SELECT id FROM nocrm.leads WHERE title = 'anyone') AND event LIKE 'action.%' ORDER BY id;
DELETE FROM nocrm.absences;
DELETE FROM nocrm.working_hours;

-- Weights: Anna weight 2, Matteo 1: Anna gets two leads for each of Matteo's.
TRUNCATE nocrm.lead_history;
SELECT nocrm.create_automation(name => 'weighted', event => 'lead.creation', conditions => '{"pipeline": "Onboarding"}',
  actions => '[{"type": "assign_round_robin", "users": [{"user": "anna@example.com", "weight": 2}, {"user": 2}]}]');
SELECT user_id, position, assigned, weight, cap FROM nocrm.assignment_counters WHERE automation_id = 2 ORDER BY position;
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'w' || i, 2 FROM generate_series(1, 9) i;
SELECT string_agg(u.name, ' ' ORDER BY l.id) AS rotation
  FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title LIKE 'w%';

-- Caps: Matteo takes at most 2 open leads; after that Giovanni gets them.
SELECT nocrm.disable_automation(1), nocrm.disable_automation(2);
SELECT nocrm.create_automation(name => 'capped', event => 'lead.creation',
  actions => '[{"type": "assign_balanced", "users": [{"user": 2, "cap": 2}, 3]}]');
UPDATE nocrm.leads SET status = 'won' WHERE user_id IN (2, 3);
INSERT INTO nocrm.leads (title) SELECT 'cap ' || i FROM generate_series(1, 5) i;
SELECT string_agg(u.name, ' ' ORDER BY l.id) AS owners
  FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title LIKE 'cap %';
-- Winning one of Matteo's frees a place under his cap.
UPDATE nocrm.leads SET status = 'won' WHERE id = (SELECT min(id) FROM nocrm.leads WHERE title LIKE 'cap %' AND user_id = 2);
INSERT INTO nocrm.leads (title) VALUES ('cap 6');
SELECT u.name FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'cap 6';

-- Random draws follow weights too: 3 to 1 over 400 leads (a loose bound, not a timing).
SELECT nocrm.disable_automation(3);
SELECT nocrm.create_automation(name => 'weighted random', event => 'lead.creation',
  actions => '[{"type": "assign_random", "users": [{"user": 1, "weight": 3}, {"user": 4, "weight": 1}]}]');
INSERT INTO nocrm.leads (title) SELECT 'rand ' || i FROM generate_series(1, 400) i;
SELECT count(*) FILTER (WHERE user_id = 1) BETWEEN 240 AND 360 AS anna_about_300,
       count(*) FILTER (WHERE user_id = 4) BETWEEN 40 AND 160 AS sara_about_100
  FROM nocrm.leads WHERE title LIKE 'rand %';

-- respect_working_hours: outside the owner's working hours an action (the
-- email as well as the tag) is queued for their next working time; the
-- action without the option runs at once.
SELECT nocrm.disable_automation(4);
DELETE FROM nocrm.working_hours;
INSERT INTO nocrm.working_hours (user_id, weekday, starts, ends)
SELECT 2, d, '00:00', '00:00:00.000001' FROM generate_series(1, 7) d;
SELECT nocrm.create_automation(name => 'polite', event => 'lead.commented',
  actions => '[{"type": "send_email", "template": "quote_followup", "respect_working_hours": true},
               {"type": "add_tags", "tags": "polite", "respect_working_hours": true},
               {"type": "add_tags", "tags": "now"}]');
INSERT INTO nocrm.leads (title, user_id, contact_email) VALUES ('Polite', 2, 'p@client.example');
INSERT INTO nocrm.comments (lead_id, body) SELECT id, 'hi' FROM nocrm.leads WHERE title = 'Polite';
SELECT kind, state, run_at > now() AS waits, run_at = nocrm.next_working_time(2, now()) AS at_next_working_time
  FROM nocrm.queue ORDER BY id;
SELECT name FROM nocrm.tags WHERE lead_id = (SELECT id FROM nocrm.leads WHERE title = 'Polite') ORDER BY name;

-- Bad input is refused.
\set VERBOSITY terse
UPDATE nocrm.users SET timezone = 'Mars/Olympus' WHERE name = 'Giovanni';
INSERT INTO nocrm.working_hours VALUES (3, 8, '09:00', '10:00');
INSERT INTO nocrm.working_hours VALUES (3, 1, '10:00', '09:00');
INSERT INTO nocrm.absences (user_id, starts_at, ends_at) VALUES (3, '2026-01-02', '2026-01-01');
\set VERBOSITY default
SELECT nocrm.create_automation(name => 'bad', event => 'lead.creation',
  actions => '[{"type": "assign_round_robin", "users": [{"user": 1, "weight": 0}]}]');
SELECT nocrm.create_automation(name => 'bad', event => 'lead.creation',
  actions => '[{"type": "assign_round_robin", "users": [{"user": 1, "cap": 1.5}]}]');
SELECT nocrm.create_automation(name => 'bad', event => 'lead.creation',
  actions => '[{"type": "assign_round_robin", "users": [{"weight": 2}]}]');
SELECT nocrm.create_automation(name => 'bad', event => 'lead.creation',
  actions => '[{"type": "assign_round_robin", "users": [{"user": 1, "share": 2}]}]');
SELECT nocrm.create_automation(name => 'bad', event => 'lead.creation',
  actions => '[{"type": "assign_random", "users": [1], "fallback": "boss"}]');
SELECT nocrm.create_automation(name => 'bad', event => 'lead.creation',
  actions => '[{"type": "assign_random", "users": [1], "only_working_hours": "yes"}]');
SELECT nocrm.create_automation(name => 'bad', event => 'lead.creation',
  actions => '[{"type": "add_tags", "tags": "x", "respect_working_hours": 1}]');
