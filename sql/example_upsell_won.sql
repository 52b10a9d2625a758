-- noCRM example: 'Add the tag "Upsell Opportunity" when the status changes to won'.
\i test/fixtures/crm.sql

SELECT nocrm.create_automation(
  name    => 'Upsell',
  event   => 'lead.status.changed.to',
  target  => 'won',
  actions => '[{"type": "add_tags", "tags": ["Upsell Opportunity"]}]');

INSERT INTO nocrm.leads (title, user_id) VALUES ('Verdi', 1), ('Neri', 2), ('Gialli', 3);
UPDATE nocrm.leads SET status = 'won' WHERE title = 'Verdi';
UPDATE nocrm.leads SET status = 'lost' WHERE title = 'Neri';
UPDATE nocrm.leads SET status = 'standby' WHERE title = 'Gialli';

SELECT l.title, l.status, t.name AS tag, l.closed_at IS NOT NULL AS closed
  FROM nocrm.leads l LEFT JOIN nocrm.tags t ON t.lead_id = l.id ORDER BY l.id;

-- Winning inside a rolled-back transaction leaves no tag.
BEGIN;
UPDATE nocrm.leads SET status = 'won' WHERE title = 'Gialli';
SELECT count(*) AS tags_inside FROM nocrm.tags WHERE lead_id = 3;
ROLLBACK;
SELECT count(*) AS tags_after FROM nocrm.tags WHERE lead_id = 3;

-- The event sequence on Verdi: the status change, the Butler's action, the tag event.
SELECT event, actor_id, automation_id, chain_depth, old_value, new_value, detail
  FROM nocrm.lead_history WHERE lead_id = 1 ORDER BY id;

-- A human acting: the app sets nocrm.actor; the Butler still makes the automated change.
SET nocrm.actor = 'giovanni@example.com';
UPDATE nocrm.leads SET status = 'won' WHERE title = 'Gialli';
RESET nocrm.actor;
SELECT event, actor_id, automation_id, new_value FROM nocrm.lead_history WHERE lead_id = 3 ORDER BY id;
