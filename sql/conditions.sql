-- Rule conditions (has_tag, lacks_tag, status, owner, pipeline, step, and
-- several at once) and the targets of lead.status.changed.to and
-- lead.step.changed.to.
\i test/fixtures/crm.sql

------------------------------------------------------------------------
-- Six leads that differ in every condition
------------------------------------------------------------------------
--  lead  pipeline / step                 owner          status     tags
--  1     Vendite / Nuovo (1)             Anna (1)       todo       b2b, hot
--  2     Vendite / Preventivo (3)        Matteo (2)     standby    b2b
--  3     Onboarding / Preventivo (6)     Giovanni (3)   won        hot
--  4     Onboarding / Kickoff (5)        nobody         lost       -
--  5     no pipeline                     Sara (4)       cancelled  b2b, hot, vip
--  6     no pipeline                     nobody         todo       vip
INSERT INTO nocrm.leads (title, pipeline_id, step_id, user_id, status) VALUES
  ('L1', 1, 1, 1, 'todo'),
  ('L2', 1, 3, 2, 'standby'),
  ('L3', 2, 6, 3, 'won'),
  ('L4', 2, 5, NULL, 'lost'),
  ('L5', NULL, NULL, 4, 'cancelled'),
  ('L6', NULL, NULL, NULL, 'todo');
INSERT INTO nocrm.tags (lead_id, name) VALUES
  (1, 'b2b'), (1, 'hot'), (2, 'b2b'), (3, 'hot'),
  (5, 'b2b'), (5, 'hot'), (5, 'vip'), (6, 'vip');
SELECT l.id, l.title, p.name AS pipeline, s.name AS step, l.user_id, l.status,
       (SELECT string_agg(t.name, ', ' ORDER BY t.name) FROM nocrm.tags t WHERE t.lead_id = l.id) AS tags
  FROM nocrm.leads l
  LEFT JOIN nocrm.pipelines p ON p.id = l.pipeline_id
  LEFT JOIN nocrm.steps s ON s.id = l.step_id
 ORDER BY l.id;

------------------------------------------------------------------------
-- One automation per case, all on lead.commented; automation N tags the
-- leads it matches with 'mN'.  Then every lead gets a comment.
------------------------------------------------------------------------
SELECT nocrm.create_automation(name => 'no conditions', event => 'lead.commented',
       actions => '[{"type": "add_tags", "tags": ["m1"]}]');
SELECT nocrm.create_automation(name => 'has_tag one', event => 'lead.commented',
       conditions => '{"has_tag": "b2b"}', actions => '[{"type": "add_tags", "tags": ["m2"]}]');
SELECT nocrm.create_automation(name => 'has_tag list: all required', event => 'lead.commented',
       conditions => '{"has_tag": ["b2b", "hot"]}', actions => '[{"type": "add_tags", "tags": ["m3"]}]');
SELECT nocrm.create_automation(name => 'has_tag list with a tag nobody has', event => 'lead.commented',
       conditions => '{"has_tag": ["b2b", "nope"]}', actions => '[{"type": "add_tags", "tags": ["m4"]}]');
SELECT nocrm.create_automation(name => 'lacks_tag one', event => 'lead.commented',
       conditions => '{"lacks_tag": "hot"}', actions => '[{"type": "add_tags", "tags": ["m5"]}]');
SELECT nocrm.create_automation(name => 'lacks_tag list: none present', event => 'lead.commented',
       conditions => '{"lacks_tag": ["hot", "vip"]}', actions => '[{"type": "add_tags", "tags": ["m6"]}]');
SELECT nocrm.create_automation(name => 'status one', event => 'lead.commented',
       conditions => '{"status": "todo"}', actions => '[{"type": "add_tags", "tags": ["m7"]}]');
SELECT nocrm.create_automation(name => 'status list: any of', event => 'lead.commented',
       conditions => '{"status": ["won", "lost", "cancelled"]}', actions => '[{"type": "add_tags", "tags": ["m8"]}]');
SELECT nocrm.create_automation(name => 'owner by id', event => 'lead.commented',
       conditions => '{"owner": 1}', actions => '[{"type": "add_tags", "tags": ["m9"]}]');
SELECT nocrm.create_automation(name => 'owner by email, any case', event => 'lead.commented',
       conditions => '{"owner": "MATTEO@Example.com"}', actions => '[{"type": "add_tags", "tags": ["m10"]}]');
SELECT nocrm.create_automation(name => 'owner list: any of', event => 'lead.commented',
       conditions => '{"owner": [1, "giovanni@example.com"]}', actions => '[{"type": "add_tags", "tags": ["m11"]}]');
SELECT nocrm.create_automation(name => 'owner null: unassigned', event => 'lead.commented',
       conditions => '{"owner": null}', actions => '[{"type": "add_tags", "tags": ["m12"]}]');
SELECT nocrm.create_automation(name => 'pipeline by name', event => 'lead.commented',
       conditions => '{"pipeline": "Vendite"}', actions => '[{"type": "add_tags", "tags": ["m13"]}]');
SELECT nocrm.create_automation(name => 'pipeline by id', event => 'lead.commented',
       conditions => '{"pipeline": 2}', actions => '[{"type": "add_tags", "tags": ["m14"]}]');
SELECT nocrm.create_automation(name => 'pipeline list: any of', event => 'lead.commented',
       conditions => '{"pipeline": ["Vendite", 2]}', actions => '[{"type": "add_tags", "tags": ["m15"]}]');
SELECT nocrm.create_automation(name => 'step name in two pipelines', event => 'lead.commented',
       conditions => '{"step": "Preventivo"}', actions => '[{"type": "add_tags", "tags": ["m16"]}]');
SELECT nocrm.create_automation(name => 'step by id', event => 'lead.commented',
       conditions => '{"step": 3}', actions => '[{"type": "add_tags", "tags": ["m17"]}]');
SELECT nocrm.create_automation(name => 'step list: any of', event => 'lead.commented',
       conditions => '{"step": ["Nuovo", "Kickoff"]}', actions => '[{"type": "add_tags", "tags": ["m18"]}]');
SELECT nocrm.create_automation(name => 'pipeline and step', event => 'lead.commented',
       conditions => '{"pipeline": "Vendite", "step": "Preventivo"}', actions => '[{"type": "add_tags", "tags": ["m19"]}]');
SELECT nocrm.create_automation(name => 'has_tag, status and owner', event => 'lead.commented',
       conditions => '{"has_tag": "hot", "status": ["todo", "won"], "owner": [1, 3]}',
       actions => '[{"type": "add_tags", "tags": ["m20"]}]');
SELECT nocrm.create_automation(name => 'has_tag, status and pipeline: no lead has all', event => 'lead.commented',
       conditions => '{"has_tag": "hot", "status": "won", "pipeline": "Vendite"}',
       actions => '[{"type": "add_tags", "tags": ["m21"]}]');
SELECT nocrm.create_automation(name => 'lacks_tag and owner null', event => 'lead.commented',
       conditions => '{"lacks_tag": "vip", "owner": null}', actions => '[{"type": "add_tags", "tags": ["m22"]}]');
SELECT nocrm.create_automation(name => 'status, owner null and lacks_tag', event => 'lead.commented',
       conditions => '{"status": "todo", "owner": null, "lacks_tag": "b2b"}',
       actions => '[{"type": "add_tags", "tags": ["m23"]}]');
SELECT nocrm.create_automation(name => 'all six keys', event => 'lead.commented',
       conditions => '{"has_tag": "b2b", "lacks_tag": "hot", "status": "standby", "owner": "matteo@example.com", "pipeline": 1, "step": "Preventivo"}',
       actions => '[{"type": "add_tags", "tags": ["m24"]}]');

INSERT INTO nocrm.comments (lead_id, body) SELECT id, 'ping' FROM nocrm.leads ORDER BY id;

-- which leads each automation matched
SELECT a.id, a.name, a.conditions,
       coalesce((SELECT string_agg(t.lead_id::text, ', ' ORDER BY t.lead_id)
                   FROM nocrm.tags t WHERE t.name = 'm' || a.id), '-') AS matched_leads
  FROM nocrm.automations a
 ORDER BY a.id;

-- each match ran once, as the Butler, one level down the chain: an
-- action.add_tags row and the lead.any_update of the tag it added
SELECT event, actor_id, automation_id IS NOT NULL AS by_automation, chain_depth, count(*)
  FROM nocrm.lead_history
 GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4;
-- per lead, the automations in id order
SELECT lead_id, string_agg(automation_id::text, ',' ORDER BY id) AS automations
  FROM nocrm.lead_history
 WHERE event = 'action.add_tags'
 GROUP BY lead_id ORDER BY lead_id;

------------------------------------------------------------------------
-- Targets: lead.status.changed.to and lead.step.changed.to
------------------------------------------------------------------------
DELETE FROM nocrm.automations;
DELETE FROM nocrm.tags WHERE name LIKE 'm%';
DELETE FROM nocrm.lead_history;

SELECT nocrm.create_automation(name => 'to won', event => 'lead.status.changed.to',
       target => 'won', actions => '[{"type": "add_tags", "tags": ["to won"]}]');         -- 25
SELECT nocrm.create_automation(name => 'to lost in Vendite', event => 'lead.status.changed.to',
       target => 'lost', conditions => '{"pipeline": "Vendite"}',
       actions => '[{"type": "add_tags", "tags": ["to lost in Vendite"]}]');               -- 26
SELECT nocrm.create_automation(name => 'to Preventivo', event => 'lead.step.changed.to',
       target => 'Preventivo', actions => '[{"type": "add_tags", "tags": ["to Preventivo"]}]');    -- 27
SELECT nocrm.create_automation(name => 'to Preventivo in Onboarding', event => 'lead.step.changed.to',
       target => 'Preventivo', conditions => '{"pipeline": "Onboarding"}',
       actions => '[{"type": "add_tags", "tags": ["to Preventivo in Onboarding"]}]');      -- 28
SELECT nocrm.create_automation(name => 'to step 2', event => 'lead.step.changed.to',
       target => '2', actions => '[{"type": "add_tags", "tags": ["to step 2"]}]');         -- 29
SELECT nocrm.create_automation(name => 'to Qualificato', event => 'lead.step.changed.to',
       target => 'Qualificato', actions => '[{"type": "add_tags", "tags": ["to Qualificato"]}]');  -- 30
SELECT nocrm.create_automation(name => 'to Nuovo', event => 'lead.step.changed.to',
       target => 'Nuovo', actions => '[{"type": "add_tags", "tags": ["to Nuovo"]}]');      -- 31
SELECT nocrm.create_automation(name => 'to step 6', event => 'lead.step.changed.to',
       target => '6', actions => '[{"type": "add_tags", "tags": ["to step 6"]}]');         -- 32
SELECT id, name, event, target, conditions FROM nocrm.automations ORDER BY id;

INSERT INTO nocrm.leads (title, pipeline_id) VALUES
  ('T7', 1), ('T8', 1), ('T9', 2), ('T10', 1), ('T11', NULL), ('T12', 2);
SELECT count(*) AS tags_after_insert FROM nocrm.tags WHERE name LIKE 'to %';

-- status targets
UPDATE nocrm.leads SET status = 'won' WHERE id = 7;                 -- to won
UPDATE nocrm.leads SET status = 'lost' WHERE id = 8;                -- to lost in Vendite
UPDATE nocrm.leads SET status = 'lost' WHERE id = 9;                -- lost, but in Onboarding: none
UPDATE nocrm.leads SET status = 'standby' WHERE id = 10;            -- none
UPDATE nocrm.leads SET title = 'L3 (still won)' WHERE id = 3;       -- won already, no status change: none
SELECT lead_id, name FROM nocrm.tags WHERE name LIKE 'to %' ORDER BY lead_id, name;
DELETE FROM nocrm.tags WHERE name LIKE 'to %';

-- step targets
UPDATE nocrm.leads SET step_id = 3 WHERE id = 7;      -- Vendite/Preventivo: to Preventivo
UPDATE nocrm.leads SET step_id = 6 WHERE id = 9;      -- Onboarding/Preventivo: to Preventivo, in Onboarding, step 6
UPDATE nocrm.leads SET step_id = 2 WHERE id = 8;      -- Qualificato = step 2: by id and by name
UPDATE nocrm.leads SET step_id = 4 WHERE id = 10;     -- Chiusura: none
UPDATE nocrm.leads SET pipeline_id = 1 WHERE id = 11; -- into Vendite, lands on Nuovo: to Nuovo
UPDATE nocrm.leads SET pipeline_id = 1 WHERE id = 12; -- Onboarding/Kickoff -> Vendite/Nuovo: to Nuovo
SELECT lead_id, name FROM nocrm.tags WHERE name LIKE 'to %' ORDER BY lead_id, name;

-- a step name stands for every step so named, also one added after the rule
DELETE FROM nocrm.tags WHERE name LIKE 'to %';
INSERT INTO nocrm.pipelines (name) VALUES ('Rinnovi');                        -- pipeline 3
INSERT INTO nocrm.steps (pipeline_id, name, position) VALUES
  (3, 'Inizio', 1), (3, 'Preventivo', 2);                                     -- steps 7, 8
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('T13', 3);               -- lead 13, at Inizio
UPDATE nocrm.leads SET step_id = 8 WHERE id = 13;     -- Rinnovi/Preventivo: to Preventivo only
SELECT lead_id, name FROM nocrm.tags WHERE name LIKE 'to %' ORDER BY lead_id, name;

-- A tag listed twice in has_tag is required once.
SELECT nocrm.create_automation(name => 'has_tag duplicate', event => 'lead.commented',
       conditions => '{"has_tag": ["b2b", "b2b"]}', actions => '[{"type": "add_tags", "tags": ["dup-ok"]}]');
SELECT conditions FROM nocrm.automations WHERE name = 'has_tag duplicate';
INSERT INTO nocrm.comments (lead_id, body)
  SELECT lead_id, 'dup' FROM nocrm.tags WHERE name = 'b2b' ORDER BY lead_id LIMIT 1;
SELECT count(*) AS matched FROM nocrm.tags WHERE name = 'dup-ok';
