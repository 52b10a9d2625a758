-- noCRM automations demo: run by test/demo.sh in a database that has
-- CREATE EXTENSION pg_cron; CREATE EXTENSION nocrm_automation;
-- It sets up a small sales team, the five automations from noCRM's help page,
-- then works some leads and shows what The Butler did, and how the drain
-- delivers the queue (to the test sink that test/demo.sh starts).
-- psql variable erp_url: where the webhook of automation 5 posts.
\set ON_ERROR_STOP 1
\pset null '-'

\echo
\echo '=== 1. The team, the pipelines and an email template'
INSERT INTO nocrm.users (name, email) VALUES
    ('Anna Rossi',       'anna@example.com'),
    ('Matteo Bianchi',   'matteo@example.com'),
    ('Giovanni Esposito','giovanni@example.com'),
    ('Laura Conti',      'laura.manager@example.com');   -- the sales manager

INSERT INTO nocrm.pipelines (name) VALUES ('Vendite'), ('Rinnovi');
INSERT INTO nocrm.steps (pipeline_id, name, position)
SELECT p.id, s.name, s.position
  FROM nocrm.pipelines p
  JOIN (VALUES ('Vendite', 'Nuovo', 1), ('Vendite', 'Qualificato', 2),
               ('Vendite', 'Preventivo', 3), ('Vendite', 'Chiusura', 4),
               ('Rinnovi', 'Da contattare', 1), ('Rinnovi', 'Rinnovato', 2))
       AS s(pipeline, name, position) ON s.pipeline = p.name
 ORDER BY p.id, s.position;

-- {{placeholders}} are checked when the template is saved, filled in when the mail is sent.
INSERT INTO nocrm.email_templates (name, subject, body) VALUES
    ('quote_followup', 'Il preventivo è pronto – {{lead.title}}',
     E'Gentile cliente,\nin allegato trova il preventivo richiesto. Restiamo a disposizione.\n\n{{owner.name}}\n{{owner.email}}');
-- notify's email channel uses the template "notification", created with the extension.
UPDATE nocrm.email_templates SET subject = '[Vendite] {{message}}' WHERE name = 'notification';

SELECT id, name, email, is_butler FROM nocrm.users ORDER BY id;
SELECT p.name AS pipeline, s.position, s.name AS step
  FROM nocrm.steps s JOIN nocrm.pipelines p ON p.id = s.pipeline_id
 ORDER BY p.id, s.position;

\echo
\echo '=== 2. The five automations of noCRM''s help page'
-- (\gset keeps each new id in a psql variable; the list below shows them.)

-- 1. Notify the manager when a lead is created (in the app and by email) or deleted
--    (in the app and on her phone).
SELECT nocrm.create_automation(
    name       => 'Notifica il manager: nuovo lead',
    event      => 'lead.creation',
    actions    => '[{"type": "notify", "user": "laura.manager@example.com",
                     "channels": ["browser", "email"], "message": "Nuovo lead: {{lead.title}}"}]') AS notify_created \gset
SELECT nocrm.create_automation(
    name       => 'Notifica il manager: lead eliminato',
    event      => 'lead.deleted',
    actions    => '[{"type": "notify", "user": "laura.manager@example.com",
                     "channels": ["browser", "mobile"], "message": "Un lead è stato eliminato"}]') AS notify_deleted \gset

-- 2. Round robin: new unassigned leads of "Vendite" go to Anna, Matteo, Giovanni in turn.
SELECT nocrm.create_automation(
    name       => 'Vendite: assegnazione a rotazione',
    event      => 'lead.creation',
    conditions => '{"pipeline": "Vendite", "owner": null}',
    actions    => '[{"type": "assign_round_robin",
                     "users": ["anna@example.com", "matteo@example.com", "giovanni@example.com"]}]') AS round_robin \gset

-- 3. Even distribution: new unassigned leads of "Rinnovi" go to whoever has the fewest open leads.
SELECT nocrm.create_automation(
    name       => 'Rinnovi: distribuzione equilibrata',
    event      => 'lead.creation',
    conditions => '{"pipeline": "Rinnovi", "owner": null}',
    actions    => '[{"type": "assign_balanced",
                     "users": ["anna@example.com", "matteo@example.com", "giovanni@example.com"]}]') AS balanced \gset

-- 4. A lead reaching step "Preventivo" of "Vendite": email the quote follow-up and tag it;
--    in three days, remind the owner to call (if the lead is still at that step).
SELECT nocrm.create_automation(
    name       => 'Preventivo: email di follow-up',
    event      => 'lead.step.changed.to',
    target     => 'Preventivo',
    conditions => '{"pipeline": "Vendite"}',
    actions    => '[{"type": "send_email", "template": "quote_followup"},
                    {"type": "add_tags", "tags": ["Preventivo Inviato"]},
                    {"type": "notify", "user": "owner", "channels": ["browser", "mobile"],
                     "message": "Richiama {{lead.title}}: preventivo inviato 3 giorni fa", "delay": "3 days"}]') AS quote_followup \gset

-- 5. A won lead is an upsell opportunity, and the ERP hears of it (a signed webhook).
SELECT nocrm.create_automation(
    name       => 'Vinto: opportunità di upsell',
    event      => 'lead.status.changed.to',
    target     => 'won',
    actions    => jsonb_build_array(
                    '{"type": "add_tags", "tags": "Upsell Opportunity"}'::jsonb,
                    jsonb_build_object('type', 'webhook', 'url', :'erp_url'))) AS won_upsell \gset

SELECT id, name, event, target, conditions FROM nocrm.automations ORDER BY id;

\echo
\echo '=== 3. Leads arrive (the app listens on channel nocrm_notifications)'
LISTEN nocrm_notifications;

-- Anna already follows two renewals by hand: the balanced rule will see her load.
INSERT INTO nocrm.leads (title, pipeline_id, user_id, contact_email)
SELECT t.title, p.id, u.id, t.contact
  FROM (VALUES ('Hotel Miramare - rinnovo', 'info@miramare.example'),
               ('Studio Gallo - rinnovo',   'studio@gallo.example')) AS t(title, contact),
       nocrm.pipelines p, nocrm.users u
 WHERE p.name = 'Rinnovi' AND u.email = 'anna@example.com';

-- Four new sales leads, nobody assigned: round robin.  (The test sink refuses
-- addresses that start with "reject": Pasticceria Romano's will be a dead letter.)
INSERT INTO nocrm.leads (title, pipeline_id, amount, contact_email)
SELECT t.title, p.id, t.amount, t.contact
  FROM (VALUES (1, 'Ferrari Logistica - nuovo sito', 12000, 'acquisti@ferrari-logistica.example'),
               (2, 'Pasticceria Romano - e-commerce', 4500, 'reject.ordini@pasticceria-romano.example'),
               (3, 'Greco & Figli - CRM',             8000, 'info@grecoefigli.example'),
               (4, 'Lombardi SpA - consulenza',       15000, 'm.lombardi@lombardi.example'))
       AS t(n, title, amount, contact)
 CROSS JOIN nocrm.pipelines p
 WHERE p.name = 'Vendite'
 ORDER BY t.n;

-- Three renewals, nobody assigned: balanced (Anna already has two open leads).
INSERT INTO nocrm.leads (title, pipeline_id, contact_email)
SELECT t.title, p.id, t.contact
  FROM (VALUES (1, 'Bar Centrale - rinnovo',   'bar@centrale.example'),
               (2, 'Farmacia Ricci - rinnovo', 'farmacia@ricci.example'),
               (3, 'Officina Marino - rinnovo','officina@marino.example'))
       AS t(n, title, contact)
 CROSS JOIN nocrm.pipelines p
 WHERE p.name = 'Rinnovi'
 ORDER BY t.n;

-- A lead entered by mistake.
INSERT INTO nocrm.leads (title, contact_email) VALUES ('Lead di prova', 'test@example.com');

\echo '--- open leads per salesperson: round robin took turns, balanced filled the least loaded'
SELECT u.name AS owner, count(l.id) AS open_leads
  FROM nocrm.users u
  LEFT JOIN nocrm.leads l ON l.user_id = u.id AND l.status IN ('todo', 'standby')
 WHERE u.email IN ('anna@example.com', 'matteo@example.com', 'giovanni@example.com')
 GROUP BY u.id, u.name
 ORDER BY u.id;

\echo
\echo '=== 4. The team works the leads'
-- Changes below are made by Anna (nocrm.actor); automated ones by The Butler.
SET nocrm.actor = 'anna@example.com';

\echo '--- Ferrari Logistica and Pasticceria Romano move to step "Preventivo"'
UPDATE nocrm.leads
   SET step_id = (SELECT s.id FROM nocrm.steps s JOIN nocrm.pipelines p ON p.id = s.pipeline_id
                   WHERE p.name = 'Vendite' AND s.name = 'Preventivo')
 WHERE title IN ('Ferrari Logistica - nuovo sito', 'Pasticceria Romano - e-commerce');

\echo '--- Greco & Figli is won'
UPDATE nocrm.leads SET status = 'won' WHERE title = 'Greco & Figli - CRM';

\echo '--- the test lead is deleted'
DELETE FROM nocrm.leads WHERE title = 'Lead di prova';

RESET nocrm.actor;
UNLISTEN *;

\echo
\echo '=== 5. What The Butler did (nocrm.butler_activity)'
SELECT to_char(created_at, 'HH24:MI:SS.MS') AS at, lead_id, lead, automation, event,
       new_value, detail
  FROM nocrm.butler_activity
 ORDER BY created_at, lead_id;

\echo
\echo '=== 6. Leads, owners and tags'
SELECT l.id, l.title, p.name AS pipeline, s.name AS step, l.status, u.name AS owner,
       (SELECT string_agg(t.name, ', ' ORDER BY t.name) FROM nocrm.tags t WHERE t.lead_id = l.id) AS tags
  FROM nocrm.leads l
  LEFT JOIN nocrm.pipelines p ON p.id = l.pipeline_id
  LEFT JOIN nocrm.steps s ON s.id = l.step_id
  LEFT JOIN nocrm.users u ON u.id = l.user_id
 ORDER BY l.id;

\echo
\echo '=== 7. Notifications in the app (nocrm.notifications)'
SELECT n.id, u.name AS recipient, n.lead_id, l.title AS lead, a.name AS automation, n.message
  FROM nocrm.notifications n
  JOIN nocrm.users u ON u.id = n.user_id
  LEFT JOIN nocrm.leads l ON l.id = n.lead_id
  LEFT JOIN nocrm.automations a ON a.id = n.automation_id
 ORDER BY n.id;

\echo
\echo '=== 8. Work waiting for the drain (nocrm.queue: emails, pushes, webhooks, delayed actions)'
SELECT q.id, q.kind, q.recipient, l.title AS lead, a.name AS automation, q.state,
       to_char(q.run_at - q.created_at, 'FMDD "days"') AS delay,
       coalesce(q.payload ->> 'template', q.payload ->> 'message', q.payload ->> 'event') AS what
  FROM nocrm.queue q
  LEFT JOIN nocrm.leads l ON l.id = q.lead_id
  LEFT JOIN nocrm.automations a ON a.id = q.automation_id
 ORDER BY q.id;

\echo
\echo '=== 9. Full history of Ferrari Logistica: who did what'
SELECT h.id, h.event, coalesce(u.name, '-') AS actor, a.name AS automation, h.chain_depth AS depth,
       h.old_value, h.new_value
  FROM nocrm.lead_history h
  LEFT JOIN nocrm.users u ON u.id = h.actor_id
  LEFT JOIN nocrm.automations a ON a.id = h.automation_id
 WHERE h.lead_id = (SELECT id FROM nocrm.leads WHERE title = 'Ferrari Logistica - nuovo sito')
 ORDER BY h.id;

\echo
\echo '=== 10. The drain delivers (CALL nocrm.drain(0): what is due now, then return)'
-- The delivery settings are in postgresql.conf (see test/demo.sh): nocrm.smtp_url,
-- nocrm.smtp_tls, nocrm.mail_from, nocrm.push_url, nocrm.webhook_secret.
SELECT name, setting FROM pg_settings
 WHERE name IN ('nocrm.smtp_url', 'nocrm.smtp_tls', 'nocrm.mail_from', 'nocrm.push_url')
 ORDER BY name;
CALL nocrm.drain(0);
SELECT q.id, q.kind, q.recipient, q.state, q.attempts, q.last_error
  FROM nocrm.queue q
 ORDER BY q.id;
\echo '--- the status view: the delayed reminders wait three days; one address was refused for good'
\x on
SELECT pending, due, processing, done, dead, cancelled, oldest_due_age, per_minute_5m,
       last_error, worker_scheduled
  FROM nocrm.queue_status;
\x off
\echo '--- dead letters (fix the cause, then SELECT nocrm.requeue_dead();)'
SELECT id, kind, recipient, attempts, last_error FROM nocrm.dead_letters;

\echo
\echo '=== 11. pg_cron runs the drain every minute (cron.database_name = demo)'
-- The job runs CALL nocrm.drain() at every whole minute, with the settings of
-- postgresql.conf; each run returns half a second before the next one starts.
SELECT nocrm.start_worker() IS NOT NULL AS scheduled;
SELECT jobname, schedule, command, database, username, active FROM cron.job ORDER BY jobid;
SELECT worker_scheduled FROM nocrm.queue_status;
