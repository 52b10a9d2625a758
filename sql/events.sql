-- Events raised by lead, tag, comment and email changes, with no automations,
-- as recorded in nocrm.lead_history; lead maintenance by the BEFORE trigger;
-- nocrm.actor; the Butler; nocrm.history.
\i test/fixtures/crm.sql

-- History, oldest first.  Timestamps (closed_at, created_at) depend on the
-- clock, so their values are masked.
CREATE FUNCTION pg_temp.mask(j jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN j IS NULL THEN NULL ELSE
        (SELECT coalesce(jsonb_object_agg(key,
                    CASE WHEN key IN ('closed_at', 'created_at') AND value <> 'null'
                         THEN '"<timestamp>"'::jsonb ELSE value END), '{}')
           FROM jsonb_each(j)) END
$$;
CREATE TEMP VIEW hist AS
SELECT row_number() OVER (ORDER BY id) AS n, lead_id, event, actor_id, automation_id,
       chain_depth, pg_temp.mask(old_value) AS old_value, pg_temp.mask(new_value) AS new_value,
       detail
  FROM nocrm.lead_history;

SELECT count(*) AS automations FROM nocrm.automations;

------------------------------------------------------------------------
-- lead.creation, then lead.assigned or lead.unassigned
------------------------------------------------------------------------
INSERT INTO nocrm.leads (title, user_id) VALUES ('Alpha', 1);          -- lead 1
INSERT INTO nocrm.leads (title) VALUES ('Beta');                       -- lead 2
-- an INSERT raises only these two, whatever else it sets (no status/step/content event)
INSERT INTO nocrm.leads (title, pipeline_id, status, user_id, amount)
VALUES ('Gamma', 1, 'won', 2, 1000);                                   -- lead 3
SELECT * FROM hist ORDER BY n;
DELETE FROM nocrm.lead_history;

------------------------------------------------------------------------
-- lead.any_update: a field change, a tag added, a tag removed
------------------------------------------------------------------------
-- created_at is not content: any_update alone
UPDATE nocrm.leads SET created_at = '2020-01-01 00:00:00+00' WHERE id = 1;
INSERT INTO nocrm.tags (lead_id, name) VALUES (1, 'vip'), (1, 'b2b');
DELETE FROM nocrm.tags WHERE lead_id = 1 AND name = 'vip';
SELECT * FROM hist ORDER BY n;
DELETE FROM nocrm.lead_history;

------------------------------------------------------------------------
-- lead.status.changed.to (with lead.any_update, no content change)
------------------------------------------------------------------------
UPDATE nocrm.leads SET status = 'standby' WHERE id = 2;
SELECT * FROM hist ORDER BY n;
DELETE FROM nocrm.lead_history;

------------------------------------------------------------------------
-- lead.step.changed.to
------------------------------------------------------------------------
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Delta', 1);      -- lead 4, step 1
DELETE FROM nocrm.lead_history;
UPDATE nocrm.leads SET step_id = 2 WHERE id = 4;
-- another pipeline: the step follows (first step of Onboarding = 5)
UPDATE nocrm.leads SET pipeline_id = 2 WHERE id = 4;
-- leaving the pipelines: the new step is NULL, so no lead.step.changed.to
UPDATE nocrm.leads SET pipeline_id = NULL, step_id = NULL WHERE id = 4;
-- entering a pipeline from none: the lead lands on the first step, which is a step change
UPDATE nocrm.leads SET pipeline_id = 1 WHERE id = 4;
SELECT * FROM hist ORDER BY n;
DELETE FROM nocrm.lead_history;

------------------------------------------------------------------------
-- lead.assigned (new owner, different owner), lead.unassigned
------------------------------------------------------------------------
UPDATE nocrm.leads SET user_id = 2 WHERE id = 2;     -- nobody -> Matteo
UPDATE nocrm.leads SET user_id = 3 WHERE id = 2;     -- Matteo -> Giovanni
UPDATE nocrm.leads SET user_id = 3 WHERE id = 2;     -- same owner: nothing
UPDATE nocrm.leads SET user_id = NULL WHERE id = 2;  -- Giovanni -> nobody
UPDATE nocrm.leads SET user_id = NULL WHERE id = 2;  -- still nobody: nothing
SELECT * FROM hist ORDER BY n;
DELETE FROM nocrm.lead_history;

------------------------------------------------------------------------
-- lead.content_has_changed: content columns, one event per UPDATE
------------------------------------------------------------------------
UPDATE nocrm.leads SET title = 'Beta 2' WHERE id = 2;
UPDATE nocrm.leads SET amount = 250.5 WHERE id = 2;
UPDATE nocrm.leads SET description = 'Needs a quote' WHERE id = 2;
UPDATE nocrm.leads SET contact_email = 'buyer@client.example' WHERE id = 2;
UPDATE nocrm.leads SET probability = 40 WHERE id = 2;
UPDATE nocrm.leads SET next_action_at = '2030-01-02 09:30:00+00' WHERE id = 2;
-- several content columns at once: one event naming them all
UPDATE nocrm.leads SET title = 'Beta 3', amount = 300, description = NULL WHERE id = 2;
SELECT * FROM hist ORDER BY n;
DELETE FROM nocrm.lead_history;

-- and not for workflow columns alone: status, step, owner (pipeline with step)
UPDATE nocrm.leads SET status = 'todo' WHERE id = 2;
UPDATE nocrm.leads SET step_id = 3 WHERE id = 4;
UPDATE nocrm.leads SET user_id = 4 WHERE id = 2;
UPDATE nocrm.leads SET pipeline_id = 2 WHERE id = 4;
SELECT * FROM hist ORDER BY n;
DELETE FROM nocrm.lead_history;

------------------------------------------------------------------------
-- lead.commented, lead.email.received
------------------------------------------------------------------------
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (2, 1, 'Called, will call back');
INSERT INTO nocrm.emails (lead_id, from_address, subject, body)
VALUES (2, 'buyer@client.example', 'Re: your quote', 'Looks good.');
SELECT * FROM hist ORDER BY n;
DELETE FROM nocrm.lead_history;

------------------------------------------------------------------------
-- One UPDATE changing status, step, owner and title: the documented order
-- status.changed.to, step.changed.to, assigned, content_has_changed, any_update
------------------------------------------------------------------------
INSERT INTO nocrm.leads (title, pipeline_id, user_id) VALUES ('Epsilon', 1, 1);  -- lead 5, step 1
DELETE FROM nocrm.lead_history;
UPDATE nocrm.leads SET status = 'won', step_id = 4, user_id = 2, title = 'Epsilon (won)'
 WHERE id = 5;
SELECT * FROM hist ORDER BY n;
DELETE FROM nocrm.lead_history;
-- the same with the owner removed: unassigned takes assigned's place
UPDATE nocrm.leads SET status = 'todo', step_id = 2, user_id = NULL, title = 'Epsilon'
 WHERE id = 5;
SELECT * FROM hist ORDER BY n;
DELETE FROM nocrm.lead_history;

------------------------------------------------------------------------
-- An UPDATE that changes nothing raises nothing and keeps updated_at
------------------------------------------------------------------------
SELECT updated_at AS before_noop FROM nocrm.leads WHERE id = 5 \gset
UPDATE nocrm.leads SET title = title, status = status, user_id = user_id WHERE id = 5;
UPDATE nocrm.leads SET amount = NULL, description = NULL WHERE id = 5;
UPDATE nocrm.leads SET step_id = 2 WHERE id = 5;
UPDATE nocrm.leads SET title = 'Epsilon' WHERE id = 5;
SELECT count(*) AS history_rows FROM nocrm.lead_history;
SELECT updated_at = :'before_noop' AS updated_at_unchanged FROM nocrm.leads WHERE id = 5;
-- a numeric equal after the column's typmod is applied is no change either
UPDATE nocrm.leads SET amount = 1000 WHERE id = 3;
SELECT count(*) AS history_rows FROM nocrm.lead_history;
-- a real change bumps updated_at
UPDATE nocrm.leads SET probability = 10 WHERE id = 5;
SELECT updated_at > :'before_noop' AS updated_at_bumped FROM nocrm.leads WHERE id = 5;
DELETE FROM nocrm.lead_history;

------------------------------------------------------------------------
-- lead.deleted; the cascaded tags (and comments, emails) raise nothing
------------------------------------------------------------------------
SELECT name FROM nocrm.tags WHERE lead_id = 1 ORDER BY name;
INSERT INTO nocrm.tags (lead_id, name) VALUES (1, 'hot');
INSERT INTO nocrm.comments (lead_id, body) VALUES (1, 'about to go');
DELETE FROM nocrm.lead_history;
DELETE FROM nocrm.leads WHERE id = 1;
SELECT * FROM hist ORDER BY n;
SELECT count(*) AS tags_left FROM nocrm.tags WHERE lead_id = 1;
DELETE FROM nocrm.lead_history;

------------------------------------------------------------------------
-- A column added to nocrm.leads is content
------------------------------------------------------------------------
ALTER TABLE nocrm.leads ADD COLUMN source text;
UPDATE nocrm.leads SET source = 'website' WHERE id = 2;
SELECT * FROM hist ORDER BY n;
DELETE FROM nocrm.lead_history;
ALTER TABLE nocrm.leads DROP COLUMN source;

------------------------------------------------------------------------
-- BEFORE trigger: place in the pipeline
------------------------------------------------------------------------
-- a pipeline without step: its first step by position (not by id)
INSERT INTO nocrm.pipelines (name) VALUES ('Rinnovi');                 -- pipeline 3
INSERT INTO nocrm.steps (pipeline_id, name, position) VALUES
  (3, 'Secondo', 2), (3, 'Primo', 1);                                  -- steps 7 (pos 2), 8 (pos 1)
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Zeta', 3);       -- lead 6
-- a step without pipeline: the pipeline is taken from the step
INSERT INTO nocrm.leads (title, step_id) VALUES ('Eta', 6);            -- lead 7
CREATE TEMP VIEW place AS
SELECT l.id, l.title, l.pipeline_id, p.name AS pipeline, l.step_id, s.name AS step
  FROM nocrm.leads l
  LEFT JOIN nocrm.pipelines p ON p.id = l.pipeline_id
  LEFT JOIN nocrm.steps s ON s.id = l.step_id;
SELECT * FROM place WHERE id IN (6, 7) ORDER BY id;
-- the same on UPDATE: a new pipeline alone moves the lead to its first step,
-- a step alone brings its pipeline
UPDATE nocrm.leads SET pipeline_id = 1 WHERE id = 6;
UPDATE nocrm.leads SET pipeline_id = NULL, step_id = NULL WHERE id = 7;
UPDATE nocrm.leads SET step_id = 7 WHERE id = 7;
SELECT * FROM place WHERE id IN (6, 7) ORDER BY id;
-- a step of another pipeline is refused by the foreign key
UPDATE nocrm.leads SET step_id = 5 WHERE id = 6;
SELECT * FROM place WHERE id = 6 ORDER BY id;
DELETE FROM nocrm.lead_history;

------------------------------------------------------------------------
-- BEFORE trigger: closed_at
------------------------------------------------------------------------
INSERT INTO nocrm.leads (title, status) VALUES ('Iota open', 'todo');   -- lead 8
INSERT INTO nocrm.leads (title, status) VALUES ('Kappa won', 'won');    -- lead 9
SELECT id, status, closed_at IS NOT NULL AS closed FROM nocrm.leads WHERE id IN (8, 9) ORDER BY id;
BEGIN;
UPDATE nocrm.leads SET status = 'won' WHERE id = 8;
SELECT status, closed_at = now() AS closed_now FROM nocrm.leads WHERE id = 8;
COMMIT;
SELECT closed_at AS won_at FROM nocrm.leads WHERE id = 8 \gset
-- closed to closed: closed_at stays as it was
UPDATE nocrm.leads SET status = 'lost' WHERE id = 8;
SELECT status, closed_at = :'won_at' AS closed_at_kept FROM nocrm.leads WHERE id = 8;
-- reopened: cleared
UPDATE nocrm.leads SET status = 'todo' WHERE id = 8;
SELECT status, closed_at IS NULL AS cleared FROM nocrm.leads WHERE id = 8;
UPDATE nocrm.leads SET status = 'cancelled' WHERE id = 8;
SELECT status, closed_at > :'won_at' AS closed_again FROM nocrm.leads WHERE id = 8;
UPDATE nocrm.leads SET status = 'standby' WHERE id = 8;
SELECT status, closed_at IS NULL AS cleared FROM nocrm.leads WHERE id = 8;
-- an open lead cannot carry a closed_at
UPDATE nocrm.leads SET closed_at = '2020-01-01 00:00:00+00' WHERE id = 8;
SELECT status, closed_at IS NULL AS cleared FROM nocrm.leads WHERE id = 8;
-- closed_at is bookkeeping: it is not reported as a change (no any_update);
-- a closed lead keeps a closed_at its writer sets
UPDATE nocrm.leads SET closed_at = '2020-01-01 00:00:00+00' WHERE id = 9;
SELECT status, closed_at FROM nocrm.leads WHERE id = 9;
SELECT * FROM hist ORDER BY n;
DELETE FROM nocrm.lead_history;

------------------------------------------------------------------------
-- nocrm.actor: by id, by email (any case); unknown user and the Butler refused
------------------------------------------------------------------------
SET nocrm.actor = '2';
UPDATE nocrm.leads SET probability = 20 WHERE id = 2;
SET nocrm.actor = 'GIOVANNI@example.com';
UPDATE nocrm.leads SET probability = 30 WHERE id = 2;
RESET nocrm.actor;
UPDATE nocrm.leads SET probability = 35 WHERE id = 2;
SELECT * FROM hist ORDER BY n;
DELETE FROM nocrm.lead_history;
SET nocrm.actor = '99';
UPDATE nocrm.leads SET probability = 40 WHERE id = 2;
\echo :SQLSTATE
SET nocrm.actor = 'nobody@example.com';
INSERT INTO nocrm.comments (lead_id, body) VALUES (2, 'who am I?');
\echo :SQLSTATE
SET nocrm.actor = '0';
UPDATE nocrm.leads SET probability = 40 WHERE id = 2;
\echo :SQLSTATE
SET nocrm.actor = 'butler@nocrm.invalid';
UPDATE nocrm.leads SET probability = 40 WHERE id = 2;
\echo :SQLSTATE
RESET nocrm.actor;
-- the refused changes were rolled back
SELECT probability FROM nocrm.leads WHERE id = 2;
SELECT count(*) AS comments FROM nocrm.comments WHERE body = 'who am I?';
SELECT count(*) AS history_rows FROM nocrm.lead_history;

------------------------------------------------------------------------
-- The Butler: not deleted, not deactivated, renamed with nocrm.set_butler
------------------------------------------------------------------------
SELECT nocrm.butler_id();
DELETE FROM nocrm.users WHERE id = 0;
\echo :SQLSTATE
UPDATE nocrm.users SET active = false WHERE is_butler;
\echo :SQLSTATE
UPDATE nocrm.users SET is_butler = false WHERE id = 0;
\echo :SQLSTATE
SELECT nocrm.set_butler('Alfred');
SELECT id, name, email, active, is_butler FROM nocrm.users WHERE is_butler;
SELECT nocrm.set_butler('Jeeves', 'jeeves@example.com');
SELECT id, name, email, active, is_butler FROM nocrm.users WHERE is_butler;
SELECT nocrm.butler_id();
-- still the Butler under its new email
SET nocrm.actor = 'jeeves@example.com';
UPDATE nocrm.leads SET probability = 45 WHERE id = 2;
\echo :SQLSTATE
RESET nocrm.actor;
SELECT probability FROM nocrm.leads WHERE id = 2;

------------------------------------------------------------------------
-- nocrm.history = 'none' records nothing; 'actions' records no plain event
------------------------------------------------------------------------
SET nocrm.history = 'none';
INSERT INTO nocrm.leads (title, user_id) VALUES ('Lambda', 1);          -- lead 10
UPDATE nocrm.leads SET status = 'won', title = 'Lambda won' WHERE id = 10;
INSERT INTO nocrm.tags (lead_id, name) VALUES (10, 'quiet');
INSERT INTO nocrm.comments (lead_id, body) VALUES (10, 'quiet');
INSERT INTO nocrm.emails (lead_id, from_address) VALUES (10, 'x@client.example');
DELETE FROM nocrm.leads WHERE id = 10;
SELECT count(*) AS history_rows FROM nocrm.lead_history;
-- a bad actor is still refused when nothing is recorded
SET nocrm.actor = '99';
UPDATE nocrm.leads SET probability = 50 WHERE id = 2;
RESET nocrm.actor;
SET nocrm.history = 'actions';
INSERT INTO nocrm.leads (title) VALUES ('Mu');                           -- lead 11
UPDATE nocrm.leads SET title = 'Mu 2' WHERE id = 11;
SELECT count(*) AS history_rows FROM nocrm.lead_history;
RESET nocrm.history;
UPDATE nocrm.leads SET title = 'Mu 3' WHERE id = 11;
SELECT * FROM hist ORDER BY n;

-- (last, as a failed INSERT uses up a lead id) the foreign key on INSERT
INSERT INTO nocrm.leads (title, pipeline_id, step_id) VALUES ('Theta', 1, 6);
SELECT count(*) AS theta FROM nocrm.leads WHERE title = 'Theta';

------------------------------------------------------------------------
-- Later fixes: tag renames/moves, closed_at on closed leads, actor cache
------------------------------------------------------------------------
TRUNCATE nocrm.lead_history;
INSERT INTO nocrm.tags (lead_id, name) VALUES (2, 'old-name');
UPDATE nocrm.tags SET name = 'new-name' WHERE lead_id = 2 AND name = 'old-name';
UPDATE nocrm.tags SET lead_id = 11 WHERE lead_id = 2 AND name = 'new-name';
UPDATE nocrm.tags SET created_at = created_at WHERE lead_id = 11;       -- no change: no event
SELECT lead_id, event, old_value, new_value, detail FROM nocrm.lead_history ORDER BY id;

-- A closed lead always has a closed_at: clearing it stamps it again.
UPDATE nocrm.leads SET status = 'won' WHERE id = 11;
UPDATE nocrm.leads SET closed_at = NULL WHERE id = 11;
SELECT status, closed_at IS NOT NULL AS has_closed_at FROM nocrm.leads WHERE id = 11;

-- The actor is looked up again when nocrm.users changes.
INSERT INTO nocrm.users (id, name, email) VALUES (50, 'Temp', 'temp@example.com');
SET nocrm.actor = 'temp@example.com';
UPDATE nocrm.leads SET probability = 11 WHERE id = 11;
UPDATE nocrm.users SET email = 'temp2@example.com' WHERE id = 50;
UPDATE nocrm.leads SET probability = 12 WHERE id = 11;                  -- refused: no such email now
\echo :SQLSTATE
SET nocrm.actor = '50';
DELETE FROM nocrm.users WHERE id = 50;
UPDATE nocrm.leads SET probability = 13 WHERE id = 11;                  -- refused: user deleted
\echo :SQLSTATE
RESET nocrm.actor;
SELECT event, actor_id, new_value FROM nocrm.lead_history WHERE event = 'lead.content_has_changed' ORDER BY id;
