-- The company calendar (time zone, weekly hours, holidays): working time for
-- users without hours of their own and leads without owner; delays in
-- business time; validation.  Fixed instants, so the results do not depend
-- on when the test runs; what runs at now() is compared with the functions.
\i test/fixtures/crm.sql

-- SQLSTATE, message and detail of a statement's error ('ok' if none).
CREATE FUNCTION pg_temp.try(sql text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    st text;
    msg text;
    det text;
BEGIN
    EXECUTE sql;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL;
    RETURN st || ': ' || msg || coalesce(' / ' || nullif(det, ''), '');
END $$;

------------------------------------------------------------------------
-- 1. No company calendar: as before, everyone without hours (and nobody)
--    works at any time; a business delay counts plain time, and a rule
--    that uses one is accepted with a WARNING.
------------------------------------------------------------------------
SELECT nocrm.is_working(NULL, '2026-12-12 03:00+00') AS nobody_works,
       nocrm.is_working(3, '2026-12-12 03:00+00') AS giovanni_works,
       nocrm.next_working_time(NULL, '2026-12-12 03:00+00') AS nobody_next,
       nocrm.delay_until(NULL, '2 business hours', '2026-12-12 03:00+00') AS two_business_hours,
       nocrm.delay_until(3, '1 business day', '2026-12-12 03:00+00') AS one_business_day;
SELECT nocrm.create_automation(name => 'follow up', event => 'lead.commented',
  actions => '[{"type": "comment", "body": "follow up", "delay": "2 business hours"}]');

------------------------------------------------------------------------
-- 2. Setting it up, and what is refused (nothing changes then).
------------------------------------------------------------------------
SELECT pg_temp.try($$INSERT INTO nocrm.business_hours VALUES (1, '09:00', '13:00')$$) AS hours_first;
SELECT pg_temp.try($$INSERT INTO nocrm.holidays VALUES ('2026-12-25', 'Natale')$$) AS holiday_first;
SELECT pg_temp.try($$INSERT INTO nocrm.business_calendar (timezone) VALUES ('Mars/Olympus')$$) AS bad_zone;
INSERT INTO nocrm.business_calendar (timezone) VALUES ('Europe/Rome');
SELECT pg_temp.try($$INSERT INTO nocrm.business_calendar (timezone) VALUES ('UTC')$$) AS second_calendar;
SELECT pg_temp.try($$UPDATE nocrm.business_calendar SET timezone = 'Europe/Atlantis'$$) AS bad_zone_update;
-- Rome, Monday to Friday, 9-13 and 14-18.
INSERT INTO nocrm.business_hours (weekday, starts, ends)
SELECT d, h.s, h.e FROM generate_series(1, 5) d, (VALUES (time '09:00', time '13:00'), ('14:00', '18:00')) h(s, e);
SELECT pg_temp.try($$INSERT INTO nocrm.business_hours VALUES (8, '09:00', '10:00')$$) AS weekday_8;
SELECT pg_temp.try($$INSERT INTO nocrm.business_hours VALUES (6, '12:00', '09:00')$$) AS end_before_start;
SELECT pg_temp.try($$INSERT INTO nocrm.business_hours VALUES (6, '22:00', '02:00')$$) AS across_midnight;
SELECT pg_temp.try($$INSERT INTO nocrm.business_hours VALUES (2, '12:00', '15:00')$$) AS overlap;
SELECT pg_temp.try($$INSERT INTO nocrm.business_hours VALUES (6, '09:00', '12:00'), (6, '11:00', '13:00')$$) AS overlap_in_one_statement;
SELECT pg_temp.try($$UPDATE nocrm.business_hours SET ends = '14:30' WHERE weekday = 3 AND starts = '09:00'$$) AS overlap_by_update;
SELECT pg_temp.try($$UPDATE nocrm.business_hours SET ends = '13:30' WHERE weekday = 3 AND starts = '09:00'$$) AS own_row_is_no_overlap;
UPDATE nocrm.business_hours SET ends = '13:00' WHERE weekday = 3 AND starts = '09:00';
INSERT INTO nocrm.holidays (day, name) VALUES
  ('2026-12-08', 'Immacolata'), ('2026-12-25', 'Natale'), ('2026-12-26', 'Santo Stefano');
SELECT pg_temp.try($$INSERT INTO nocrm.holidays VALUES ('2026-12-31', '  ')$$) AS blank_name;
SELECT pg_temp.try($$INSERT INTO nocrm.holidays VALUES ('infinity', 'Forever')$$) AS infinite_day;
SELECT pg_temp.try($$INSERT INTO nocrm.holidays VALUES ('2026-12-25', 'Natale again')$$) AS same_day;
SELECT (SELECT count(*) FROM nocrm.business_calendar) AS calendars,
       (SELECT count(*) FROM nocrm.business_hours) AS periods,
       (SELECT string_agg(day || ' ' || name, ', ' ORDER BY day) FROM nocrm.holidays) AS holidays;

------------------------------------------------------------------------
-- 3. Who follows it: nobody (NULL) and users without hours (Giovanni);
--    Anna keeps her own hours (New York, 9-17, holidays not hers);
--    an unknown user works at any time, as before.
------------------------------------------------------------------------
UPDATE nocrm.users SET timezone = 'America/New_York' WHERE name = 'Anna';
INSERT INTO nocrm.working_hours (user_id, weekday, starts, ends)
SELECT 1, d, '09:00', '17:00' FROM generate_series(1, 5) d;
SELECT t AT TIME ZONE 'Europe/Rome' AS rome, nocrm.is_working(NULL, t) AS company,
       nocrm.is_working(3, t) AS giovanni, nocrm.is_working(1, t) AS anna, nocrm.is_working(999, t) AS unknown
  FROM (VALUES (timestamptz '2026-12-07 08:30+01'),   -- Monday, before opening
               ('2026-12-07 09:00+01'),               -- opening
               ('2026-12-07 13:30+01'),               -- lunch
               ('2026-12-07 17:59:59+01'),            -- last second
               ('2026-12-07 18:00+01'),               -- closed (ends excluded); 12:00 in New York
               ('2026-12-08 16:00+01'),               -- Tuesday, a holiday in Rome; 10:00 in New York
               ('2026-12-12 10:00+01')) v(t)          -- Saturday
 ORDER BY t;

-- next_working_time: lunch, evening before a holiday, the weekend, Christmas;
-- Giovanni's absence on Wednesday 9 keeps him away one more day.
INSERT INTO nocrm.absences (user_id, starts_at, ends_at, reason)
VALUES (3, '2026-12-09 00:00+01', '2026-12-10 00:00+01', 'dentist');
SELECT t AT TIME ZONE 'Europe/Rome' AS after_rome,
       nocrm.next_working_time(NULL, t) AT TIME ZONE 'Europe/Rome' AS company_next,
       nocrm.next_working_time(3, t) AT TIME ZONE 'Europe/Rome' AS giovanni_next
  FROM (VALUES (timestamptz '2026-12-07 13:10+01'),
               ('2026-12-07 18:30+01'),
               ('2026-12-11 19:00+01'),
               ('2026-12-24 18:00+01')) v(t)
 ORDER BY t;
DELETE FROM nocrm.absences;

------------------------------------------------------------------------
-- 4. Business hours and minutes: open time added up, nights, lunch,
--    weekends and holidays left out.  A delay that ends exactly at closing
--    ends then (18:00).
------------------------------------------------------------------------
SELECT start AT TIME ZONE 'Europe/Rome' AS start_rome, delay,
       nocrm.delay_until(NULL, delay, start) AT TIME ZONE 'Europe/Rome' AS due_rome
  FROM (VALUES (timestamptz '2026-12-07 16:00+01', '2 business hours'),   -- Monday
               ('2026-12-07 12:30+01', '1 business hour'),                -- over lunch
               ('2026-12-07 09:00+01', '8 business hours'),               -- one whole day
               ('2026-12-07 09:00+01', '9 business hours'),               -- Tuesday is a holiday
               ('2026-12-07 17:00+01', '2 business hours'),
               ('2026-12-11 17:30+01', '90 business minutes'),            -- Friday into Monday
               ('2026-12-12 10:00+01', '1 business hour'),                -- from a Saturday
               ('2026-12-24 17:00+01', '2 Business Hours')) v(start, delay)   -- over Christmas
 ORDER BY start, delay;

------------------------------------------------------------------------
-- 5. Business days: the same business-clock time N business days later.
--    The clock stands still when closed, so a start outside the hours
--    counts from the next opening; a day closed at that time gives its
--    next opening.
------------------------------------------------------------------------
SELECT start AT TIME ZONE 'Europe/Rome' AS start_rome, delay,
       nocrm.delay_until(NULL, delay, start) AT TIME ZONE 'Europe/Rome' AS due_rome
  FROM (VALUES (timestamptz '2026-12-07 10:00+01', '1 business day'),     -- Tuesday is a holiday
               ('2026-12-11 15:00+01', '1 business day'),                 -- Friday to Monday
               ('2026-12-11 20:00+01', '1 business day'),                 -- Friday evening = Monday 9:00
               ('2026-12-07 13:30+01', '1 business day'),                 -- lunch = 14:00
               ('2026-12-12 11:00+01', '1 business day'),                 -- Saturday = Monday 9:00
               ('2026-12-23 11:00+01', '3 business days')) v(start, delay)  -- over Christmas
 ORDER BY start, delay;

------------------------------------------------------------------------
-- 6. DST in the calendar's zone: Rome goes to UTC+2 on Sunday 2027-03-28
--    and back to UTC+1 on Sunday 2026-10-25; 9:00 stays 9:00.
------------------------------------------------------------------------
SELECT start, delay, nocrm.delay_until(NULL, delay, start) AS due_utc,
       nocrm.delay_until(NULL, delay, start) AT TIME ZONE 'Europe/Rome' AS due_rome
  FROM (VALUES (timestamptz '2027-03-26 16:00+00', '2 business hours'),   -- Friday 17:00+01
               ('2027-03-26 09:00+00', '1 business day'),                 -- Friday 10:00+01
               ('2026-10-23 08:00+00', '1 business day'),                 -- Friday 10:00+02
               ('2026-10-23 15:30+00', '1 business hour')) v(start, delay)  -- Friday 17:30+02
 ORDER BY start;
SELECT nocrm.next_working_time(NULL, '2027-03-27 12:00+00') AS monday_after_spring,
       nocrm.next_working_time(NULL, '2026-10-24 12:00+00') AS monday_after_autumn;

------------------------------------------------------------------------
-- 7. The owner's hours first: Anna (New York, no Rome holidays); Giovanni
--    (no hours) gets the company's; an unknown user plain time.  Plain
--    intervals and NULL work as for any delay.
------------------------------------------------------------------------
SELECT who, start AT TIME ZONE 'America/New_York' AS start_new_york, delay,
       nocrm.delay_until(who, delay, start) AT TIME ZONE 'America/New_York' AS due_new_york
  FROM (VALUES (1, timestamptz '2026-12-11 16:00-05', '2 business hours'),   -- Anna: Friday into Monday
               (1, '2026-12-07 10:00-05', '1 business day'),                 -- Anna: Tuesday 8 is no holiday for her
               (3, '2026-12-07 10:00-05', '1 business day'),                 -- Giovanni: Rome's calendar
               (999, '2026-12-07 10:00-05', '2 business hours'),             -- unknown: plain time
               (NULL, '2026-12-07 10:00-05', '90 minutes'),
               (NULL, '2026-12-07 10:00-05', NULL)) v(who, start, delay)
 ORDER BY who NULLS LAST, start, delay NULLS LAST;
SELECT pg_temp.try($$SELECT nocrm.delay_until(NULL, '2.5 business hours', now())$$) AS fraction;
SELECT pg_temp.try($$SELECT nocrm.delay_until(NULL, '0 business days', now())$$) AS zero;
SELECT pg_temp.try($$SELECT nocrm.delay_until(NULL, '2 business weeks', now())$$) AS weeks;
SELECT pg_temp.try($$SELECT nocrm.delay_until(NULL, 'soon', now())$$) AS not_an_interval;

------------------------------------------------------------------------
-- 8. Business delays in rules: checked when written.
------------------------------------------------------------------------
\set VERBOSITY terse
SELECT nocrm.create_automation(name => 'bad', event => 'lead.commented',
  actions => '[{"type": "comment", "body": "x", "delay": "2.5 business hours"}]');
SELECT nocrm.create_automation(name => 'bad', event => 'lead.commented',
  actions => '[{"type": "comment", "body": "x", "delay": "0 business days"}]');
SELECT nocrm.create_automation(name => 'bad', event => 'lead.commented',
  actions => '[{"type": "comment", "body": "x", "delay": "4000 business days"}]');
SELECT nocrm.create_automation(name => 'bad', event => 'lead.commented',
  actions => '[{"type": "comment", "body": "x", "delay": "3 business weeks"}]');
SELECT nocrm.create_automation(name => 'bad', event => 'lead.deleted',
  actions => '[{"type": "webhook", "url": "https://h.example/x", "delay": "1 business day"}]');
\set VERBOSITY default
SELECT count(*) AS automations FROM nocrm.automations;

------------------------------------------------------------------------
-- 9. The engine queues what the functions say (the calendar exists now:
--    no warning).  Anna's lead counts on her hours, the unowned one on the
--    company's; explain tells the same time.
------------------------------------------------------------------------
SELECT nocrm.update_automation(1, actions => '[{"type": "comment", "body": "follow up", "delay": "2 business hours"},
                                               {"type": "comment", "body": "next day", "delay": "1 business day", "recheck": false}]');
INSERT INTO nocrm.leads (title, user_id) VALUES ('Anna''s', 1);
INSERT INTO nocrm.leads (title) VALUES ('Nobody''s');
INSERT INTO nocrm.comments (lead_id, body) SELECT id, 'hello' FROM nocrm.leads WHERE title IN ('Anna''s', 'Nobody''s');
SELECT l.title, q.action_no, q.payload ->> 'delay' AS delay,
       q.run_at = nocrm.delay_until(l.user_id, q.payload ->> 'delay', q.created_at) AS as_delay_until,
       q.run_at > q.created_at AS later
  FROM nocrm.queue q JOIN nocrm.leads l ON l.id = q.lead_id ORDER BY q.id;
SELECT l.title, h.event, h.detail FROM nocrm.lead_history h JOIN nocrm.leads l ON l.id = h.lead_id
 WHERE h.event LIKE 'action.%' ORDER BY h.id;
SELECT l.title,
       (nocrm.describe_actions(1, a.actions, l.id) -> 1 ->> 'runs_at')::timestamptz
         = nocrm.delay_until(l.user_id, '1 business day', now()) AS explain_agrees
  FROM nocrm.leads l, nocrm.automations a WHERE a.id = 1 ORDER BY l.id;
-- When due, the drain runs them as queued.
UPDATE nocrm.queue SET run_at = now() - interval '1 second' WHERE kind = 'action';
CALL nocrm.drain(0);
SELECT state, count(*) FROM nocrm.queue GROUP BY state ORDER BY state;
SELECT l.title, string_agg(c.body, ', ' ORDER BY c.id) AS comments
  FROM nocrm.leads l JOIN nocrm.comments c ON c.lead_id = l.id GROUP BY l.id, l.title ORDER BY l.id;
SELECT nocrm.delete_automation(1);

------------------------------------------------------------------------
-- 10. respect_working_hours without owner waits for the company calendar;
--     a group with only_working_hours takes members without hours only
--     while the company is open.  Today is made a holiday (closed), then
--     the hours are removed (open all day on days not holidays).
------------------------------------------------------------------------
INSERT INTO nocrm.holidays (day, name)
SELECT d::date, 'test day ' || o FROM generate_series((now() AT TIME ZONE 'Europe/Rome')::date,
                                                       (now() AT TIME ZONE 'Europe/Rome')::date + 1, '1 day') WITH ORDINALITY g(d, o)
ON CONFLICT (day) DO NOTHING;
TRUNCATE nocrm.queue;
SELECT nocrm.create_automation(name => 'polite', event => 'lead.creation', conditions => '{"pipeline": "Onboarding"}',
  actions => '[{"type": "add_tags", "tags": "polite", "respect_working_hours": true},
               {"type": "add_tags", "tags": "now"}]');
SELECT nocrm.create_automation(name => 'group', event => 'lead.creation', conditions => '{"pipeline": "Vendite"}',
  actions => '[{"type": "assign_round_robin", "users": [3, 4], "only_working_hours": true}]');
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('closed: polite', 2), ('closed: group', 1);
SELECT l.title, l.user_id, array(SELECT t.name FROM nocrm.tags t WHERE t.lead_id = l.id ORDER BY t.name) AS tags
  FROM nocrm.leads l WHERE l.title LIKE 'closed:%' ORDER BY l.id;
SELECT q.kind, q.payload ->> 'tags' AS tags, q.run_at = nocrm.next_working_time(NULL, q.created_at) AS at_company_opening,
       q.run_at >= ((now() AT TIME ZONE 'Europe/Rome')::date + 2)::timestamp AT TIME ZONE 'Europe/Rome' AS after_the_holidays
  FROM nocrm.queue q ORDER BY q.id;
SELECT l.title, h.detail FROM nocrm.lead_history h JOIN nocrm.leads l ON l.id = h.lead_id
 WHERE l.title LIKE 'closed:%' AND h.event LIKE 'action.%' ORDER BY h.id;
-- A member with hours of their own covering now is still picked.
INSERT INTO nocrm.working_hours (user_id, weekday, starts, ends) SELECT 4, d, '00:00', '24:00' FROM generate_series(1, 7) d;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('closed: Sara has hours', 1);
SELECT u.name FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'closed: Sara has hours';
DELETE FROM nocrm.working_hours WHERE user_id = 4;
-- Open all day: no hours, no holiday today.
DELETE FROM nocrm.holidays WHERE day BETWEEN (now() AT TIME ZONE 'Europe/Rome')::date AND (now() AT TIME ZONE 'Europe/Rome')::date + 1;
DELETE FROM nocrm.business_hours;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('open: polite', 2), ('open: group', 1);
SELECT l.title, u.name AS owner, array(SELECT t.name FROM nocrm.tags t WHERE t.lead_id = l.id ORDER BY t.name) AS tags
  FROM nocrm.leads l LEFT JOIN nocrm.users u ON u.id = l.user_id WHERE l.title LIKE 'open:%' ORDER BY l.id;
SELECT nocrm.delete_automation(id) FROM nocrm.automations ORDER BY id;

------------------------------------------------------------------------
-- 11. The calendar is read once per transaction, but a change is seen at
--     once by the transaction that makes it, and a rolled-back change is
--     forgotten.
------------------------------------------------------------------------
INSERT INTO nocrm.business_hours (weekday, starts, ends)
SELECT d, h.s, h.e FROM generate_series(1, 5) d, (VALUES (time '09:00', time '13:00'), ('14:00', '18:00')) h(s, e);
-- Wednesday 2026-12-09 01:30 UTC is 02:30 in Rome, Tuesday 20:30 in New
-- York and 10:30 in Tokyo: three different next openings.
BEGIN;
SELECT nocrm.next_working_time(NULL, '2026-12-09 01:30+00') AS rome_opens;
UPDATE nocrm.business_calendar SET timezone = 'America/New_York';
SELECT nocrm.next_working_time(NULL, '2026-12-09 01:30+00') AS new_york_opens;
SAVEPOINT s;
UPDATE nocrm.business_calendar SET timezone = 'Asia/Tokyo';
SELECT nocrm.next_working_time(NULL, '2026-12-09 01:30+00') AS tokyo_is_open;
ROLLBACK TO s;
SELECT nocrm.next_working_time(NULL, '2026-12-09 01:30+00') AS new_york_again;
ROLLBACK;
SELECT nocrm.next_working_time(NULL, '2026-12-09 01:30+00') AS rome_again;

-- A shorter Friday: Thursday 15:00 + 1 business day is Friday 15:00,
-- closed then, so Monday's opening.
DELETE FROM nocrm.business_hours WHERE weekday = 5 AND starts = '14:00';
SELECT nocrm.delay_until(NULL, '1 business day', '2026-12-10 15:00+01') AT TIME ZONE 'Europe/Rome' AS thursday_plus_one,
       nocrm.delay_until(NULL, '1 business day', '2026-12-10 11:00+01') AT TIME ZONE 'Europe/Rome' AS thursday_morning_plus_one;

-- A calendar with next to no working time: an error, not an endless walk.
BEGIN;
DELETE FROM nocrm.business_hours;
INSERT INTO nocrm.business_hours VALUES (1, '09:00', '09:00:00.000001');   -- a microsecond on Mondays
SELECT pg_temp.try($$SELECT nocrm.delay_until(NULL, '1 business hour', '2026-12-07 10:00+01')$$) AS one_microsecond_a_week;
INSERT INTO nocrm.holidays SELECT d, 'closed' FROM generate_series(date '2026-12-14', '2037-01-05', '7 days') d;
SELECT pg_temp.try($$SELECT nocrm.next_working_time(NULL, '2026-12-08 10:00+01')$$) AS every_monday_a_holiday;
ROLLBACK;

------------------------------------------------------------------------
-- 12. Without the calendar row (hours and holidays kept, not used): a
--     business delay on an unowned lead is plain time, and says so.
------------------------------------------------------------------------
DELETE FROM nocrm.business_calendar;
SELECT (SELECT count(*) FROM nocrm.business_hours) AS periods_kept, nocrm.is_working(NULL, '2026-12-12 03:00+00') AS open;
TRUNCATE nocrm.queue;
SELECT nocrm.create_automation(name => 'plain', event => 'lead.commented',
  actions => '[{"type": "comment", "body": "later", "delay": "3 business days"}]');
INSERT INTO nocrm.leads (title) VALUES ('Plain');
INSERT INTO nocrm.comments (lead_id, body) SELECT id, 'hi' FROM nocrm.leads WHERE title = 'Plain';
SELECT q.run_at = q.created_at + interval '3 days' AS three_days FROM nocrm.queue q;
SELECT h.detail FROM nocrm.lead_history h JOIN nocrm.leads l ON l.id = h.lead_id
 WHERE l.title = 'Plain' AND h.event = 'action.comment';
-- Agents read the calendar; only admins change it.
SET ROLE nocrm_agent;
SELECT count(*) > 0 AS sees_holidays FROM nocrm.holidays;
SELECT pg_temp.try($$INSERT INTO nocrm.business_calendar (timezone) VALUES ('UTC')$$) AS agent_sets_calendar;
RESET ROLE;
