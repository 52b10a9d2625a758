
# pg_dump and restore of a database that uses the extension: every row of the
# extension's tables comes back as it was, the identity sequences carry on
# after the restored ids, round robin takes up the rotation where it stopped,
# the queue's pending delayed actions run at the next drain, and automations
# and stage triggers work on the restored database.
#
# The restore that keeps the triggers quiet during the data load is the one
# PostgreSQL documents for pg_restore --disable-triggers, which "is relevant
# only when performing a data-only restore":
#   pg_restore --schema-only -d newdb dump          (CREATE EXTENSION ...)
#   pg_restore --data-only --disable-triggers -d newdb dump
# A one-step pg_restore, with or without --disable-triggers, loads the
# extension's tables with their triggers on: that is recorded below (TODO).
use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('dump');
$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
$node->start;

sub sq
{
	my ($db, $sql) = @_;
	return $node->safe_psql($db, $sql);
}

# The extension's tables, all of them dumped (pg_extension_config_dump).
my @tables = qw(absences assignment_counters automation_enrollments automation_runs automations comments email_templates
  emails lead_history leads notifications pipelines queue stage_triggers steps tags users
  working_hours);

# Rows the install script makes are not dumped: CREATE EXTENSION makes them
# again in the new database (with a new created_at / updated_at).
my %not_seeded = (
	users => 'WHERE NOT is_butler',
	email_templates => q{WHERE name <> 'notification'});

# "rows md5" of a table, rows in a fixed order.
sub digest
{
	my ($db, $table) = @_;
	my $where = $not_seeded{$table} // '';
	return sq($db,
		"SELECT count(*) || ' ' || coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text)), '-')
		   FROM nocrm.$table t $where");
}

sub sequences
{
	my ($db) = @_;
	return sq($db,
		q{SELECT string_agg(sequencename || '=' || coalesce(last_value::text, 'unused'), ', ' ORDER BY sequencename)
		    FROM pg_sequences WHERE schemaname = 'nocrm'});
}

my $dump = PostgreSQL::Test::Utils::tempdir() . '/src.dump';

# pg_restore @opts of the dump into database $db; returns (success, stderr).
sub pg_restore_into
{
	my ($db, @opts) = @_;
	my ($out, $err);
	my $ok = IPC::Run::run([ 'pg_restore', @opts, '-d', $node->connstr($db), $dump ],
		'>', \$out, '2>', \$err);
	return ($ok, $err);
}

# --- a CRM with some history -------------------------------------------------

sq('postgres', 'CREATE DATABASE src');
sq('src', <<'SQL');
CREATE EXTENSION nocrm_automation;
INSERT INTO nocrm.users (name, email, timezone) VALUES
  ('Anna', 'anna@example.com', 'Europe/Rome'), ('Matteo', 'matteo@example.com', 'UTC'),
  ('Giovanni', 'giovanni@example.com', 'UTC'), ('Sara', 'sara@example.com', 'America/New_York');
INSERT INTO nocrm.working_hours (user_id, weekday, starts, ends)
  SELECT u.id, d, '09:00', '18:00' FROM nocrm.users u, generate_series(1, 5) d WHERE u.email = 'sara@example.com';
INSERT INTO nocrm.absences (user_id, starts_at, ends_at, reason)
  SELECT id, '2031-08-01', '2031-08-15', 'Ferie' FROM nocrm.users WHERE email = 'sara@example.com';
INSERT INTO nocrm.pipelines (name) VALUES ('Vendite'), ('Onboarding');
INSERT INTO nocrm.steps (pipeline_id, name, position)
  SELECT p.id, s.name, s.pos FROM nocrm.pipelines p,
    (VALUES ('Nuovo', 1), ('Qualificato', 2), ('Preventivo', 3), ('Chiuso', 4)) s(name, pos)
   WHERE p.name = 'Vendite';
INSERT INTO nocrm.steps (pipeline_id, name, position)
  SELECT id, 'Kickoff', 1 FROM nocrm.pipelines WHERE name = 'Onboarding';

-- templates: one edited after it was made, one as made
INSERT INTO nocrm.email_templates (name, subject, body) VALUES
  ('quote_followup', 'Preventivo {{lead.title}}', 'prima versione'),
  ('welcome', 'Benvenuto {{lead.title}}', 'Ciao!');
UPDATE nocrm.email_templates
   SET body = E'Gentile cliente,\nil preventivo per {{lead.title}}.\n\n{{owner.name}}', updated_at = now()
 WHERE name = 'quote_followup';

SELECT nocrm.create_automation(name => 'Vendite: round robin', event => 'lead.creation',
  conditions => '{"pipeline": "Vendite", "owner": null}',
  actions => '[{"type": "assign_round_robin",
                "users": ["anna@example.com", "matteo@example.com", "giovanni@example.com"]},
               {"type": "add_tags", "tags": ["Nuovo"]},
               {"type": "notify", "user": "owner", "message": "Nuovo lead {{lead.title}}"}]');
SELECT nocrm.create_automation(name => 'Vendite: richiamare', event => 'lead.creation',
  conditions => '{"pipeline": "Vendite"}',
  actions => '[{"type": "comment", "body": "Richiamare il cliente", "delay": "1 second"},
               {"type": "add_tags", "tags": ["Da richiamare"], "delay": "1 second"},
               {"type": "comment", "body": "Una settimana dopo", "delay": "7 days"}]');
SELECT nocrm.set_automation_options(id, once_per_lead => true) FROM nocrm.automations
 WHERE name = 'Vendite: richiamare';
SELECT nocrm.create_automation(name => 'Prova standby', event => 'lead.creation', mode => 'test',
  actions => '[{"type": "set_status", "status": "standby"}]');
SELECT nocrm.create_stage_trigger(pipeline => 'Vendite', step => 'Preventivo', kind => 'tag_added',
  params => '{"tag": "Hot"}', name => 'Hot: preventivo');
SELECT nocrm.create_stage_trigger(pipeline => 'Vendite', step => 'Chiuso', kind => 'custom',
  params => '{"code": "contratto_firmato"}', name => 'Contratto firmato');

-- first batch: five leads, anna, matteo, giovanni, anna, matteo
INSERT INTO nocrm.leads (title, pipeline_id, contact_email, amount)
  SELECT t, (SELECT id FROM nocrm.pipelines WHERE name = 'Vendite'), lower(replace(t, ' ', '')) || '@client.example', 1000
    FROM unnest(ARRAY['Lead 1', 'Lead 2', 'Lead 3', 'Lead 4', 'Da cancellare']) WITH ORDINALITY AS x(t, o)
   ORDER BY o;
SET nocrm.actor = 'anna@example.com';
INSERT INTO nocrm.comments (lead_id, user_id, body)
  SELECT id, 1, 'Chiamato il cliente' FROM nocrm.leads WHERE title = 'Lead 1';
INSERT INTO nocrm.emails (lead_id, from_address, subject, body)
  SELECT id, 'lead1@client.example', 'Re: preventivo', 'Grazie' FROM nocrm.leads WHERE title = 'Lead 1';
DELETE FROM nocrm.leads WHERE title = 'Da cancellare';
RESET nocrm.actor;
SQL

my %uid = map { split /\|/ } split /\n/, sq('src', 'SELECT name, id FROM nocrm.users');

$node->poll_query_until('src',
	q{SELECT count(*) = 0 FROM nocrm.queue WHERE state = 'pending' AND run_at > now() AND payload ->> 'delay' = '1 second'})
  or die 'the first delayed actions did not fall due';
sq('src', 'CALL nocrm.drain(0)');

sq('src', <<'SQL');
-- second batch: giovanni, anna; their delayed actions stay pending in the dump
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Lead 6', id FROM nocrm.pipelines WHERE name = 'Vendite';
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Lead 7', id FROM nocrm.pipelines WHERE name = 'Vendite';
-- an Onboarding lead: no automation applies
INSERT INTO nocrm.leads (title, pipeline_id, user_id, status)
  SELECT 'Cliente vinto', p.id, u.id, 'won' FROM nocrm.pipelines p, nocrm.users u
   WHERE p.name = 'Onboarding' AND u.email = 'sara@example.com';
-- the stage trigger moves Lead 2 to Preventivo
INSERT INTO nocrm.tags (lead_id, name) SELECT id, 'Hot' FROM nocrm.leads WHERE title = 'Lead 2';
UPDATE nocrm.notifications SET read_at = now() WHERE id = (SELECT min(id) FROM nocrm.notifications);
-- changes to the rows the install script made
SELECT nocrm.set_butler('Alfred', 'alfred@example.com');
UPDATE nocrm.email_templates SET body = E'{{message}}\n\n-- \nIl vostro CRM' WHERE name = 'notification';
SQL

# --- the source, before the dump ------------------------------------------------

is( sq('src',
		q{SELECT string_agg(c::regclass::text, ' ' ORDER BY c::regclass::text)
		    FROM pg_extension e, unnest(e.extconfig) c
		   WHERE e.extname = 'nocrm_automation' AND (SELECT relkind FROM pg_class WHERE oid = c) = 'r'}),
	join(' ', map { "nocrm.$_" } @tables),
	'the dumped tables are the ones this test compares');
is( sq('src',
		q{SELECT count(*) FROM pg_extension e, unnest(e.extconfig) c
		   WHERE e.extname = 'nocrm_automation' AND (SELECT relkind FROM pg_class WHERE oid = c) = 'S'}),
	13, 'the 13 identity sequences are marked for dumping');
for my $t (@tables)
{
	cmp_ok((split / /, digest('src', $t))[0], '>', 0, "source: nocrm.$t has rows");
}
is( sq('src',
		q{SELECT string_agg(u.name || '=' || c.assigned, ' ' ORDER BY c.position)
		    FROM nocrm.assignment_counters c JOIN nocrm.users u ON u.id = c.user_id}),
	'Anna=3 Matteo=2 Giovanni=2',
	'source: round robin gave 7 leads in turn (Matteo is next)');
is( sq('src',
		q{SELECT string_agg(state || '=' || n, ' ' ORDER BY state)
		    FROM (SELECT state, count(*) AS n FROM nocrm.queue GROUP BY state) s}),
	'cancelled=2 done=8 pending=11',
	'source queue: delayed actions done, cancelled (deleted lead) and pending');
my $pending_due = sq('src',
	q{SELECT string_agg(id::text, ',' ORDER BY id) FROM nocrm.queue
	   WHERE state = 'pending' AND payload ->> 'delay' = '1 second'});
is(scalar(split /,/, $pending_due), 4, 'source: 4 delayed actions of Lead 6 and 7 pending (due in a second)');
is( sq('src', q{SELECT string_agg(outcome || '=' || n, ' ' ORDER BY outcome)
	             FROM (SELECT outcome, count(*) AS n FROM nocrm.automation_runs GROUP BY outcome) s}),
	'fired=23 test=8', 'source run log: fired and test-mode runs');
is(sq('src', q{SELECT s.name FROM nocrm.leads l JOIN nocrm.steps s ON s.id = l.step_id WHERE l.title = 'Lead 2'}),
	'Preventivo', 'source: the stage trigger moved Lead 2');

my %before = map { $_ => digest('src', $_) } @tables;
my $seq_before = sequences('src');
my %max = map { split /\|/ } split /\n/, sq('src', <<'SQL');
SELECT 'leads', max(id) FROM nocrm.leads UNION ALL
SELECT 'comments', max(id) FROM nocrm.comments UNION ALL
SELECT 'emails', max(id) FROM nocrm.emails UNION ALL
SELECT 'lead_history', max(id) FROM nocrm.lead_history UNION ALL
SELECT 'automation_runs', max(id) FROM nocrm.automation_runs UNION ALL
SELECT 'notifications', max(id) FROM nocrm.notifications UNION ALL
SELECT 'queue', max(id) FROM nocrm.queue
SQL
my $leads_seq = sq('src', q{SELECT last_value FROM pg_sequences WHERE sequencename = 'leads_id_seq'});

# --- dump, and restore: schema, then data with the triggers disabled -------------

command_ok([ 'pg_dump', '-Fc', '-f', $dump, '-d', $node->connstr('src') ], 'pg_dump -Fc');

sq('postgres', 'CREATE DATABASE restored');
my ($ok, $err) = pg_restore_into('restored', '--schema-only');
ok($ok, 'pg_restore --schema-only into a new database') or diag $err;
is(sq('restored', 'SELECT count(*) FROM nocrm.leads'), 0, 'the schema restore made the extension, without data');
($ok, $err) = pg_restore_into('restored', '--data-only', '--disable-triggers');
ok($ok, 'pg_restore --data-only --disable-triggers') or diag $err;
is($err, '', 'and no errors or warnings');

is(sq('restored', q{SELECT extversion FROM pg_extension WHERE extname = 'nocrm_automation'}),
	'1.3', 'restored: the extension is at 1.3');
for my $t (@tables)
{
	is(digest('restored', $t), $before{$t}, "restored: nocrm.$t has the same rows");
}
is(sequences('restored'), $seq_before, 'restored: every identity sequence has its old value');
is( sq('restored',
		q{SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
		   WHERE c.relnamespace = 'nocrm'::regnamespace AND t.tgenabled <> 'O'}),
	0, 'restored: every trigger (incl. foreign keys) is enabled again');
is( sq('restored',
		q{SELECT count(*) FROM nocrm.tags t WHERE NOT EXISTS (SELECT 1 FROM nocrm.leads l WHERE l.id = t.lead_id)}),
	0, 'restored: no orphan rows (foreign keys were not checked during the load)');

# Rows made by the install script, then changed: not in the dump (TODO).
TODO:
{
	local $TODO = 'the Butler row and the notification template are excluded from dumps: changes to them are lost';
	is(sq('restored', 'SELECT name || \' \' || email FROM nocrm.users WHERE is_butler'),
		'Alfred alfred@example.com', 'restored: the Butler keeps the name set with set_butler()');
	is(sq('restored', q{SELECT md5(subject || body) FROM nocrm.email_templates WHERE name = 'notification'}),
		sq('src', q{SELECT md5(subject || body) FROM nocrm.email_templates WHERE name = 'notification'}),
		'restored: the edited notification template is kept');
}

# --- the restored database works ------------------------------------------------

my $lead = sq('restored', <<'SQL');
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Dopo il restore 1', id FROM nocrm.pipelines WHERE name = 'Vendite';
SELECT l.id || ' ' || u.name FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id
 WHERE l.title = 'Dopo il restore 1';
SQL
my ($new_id, $owner) = split / /, $lead;
is($new_id, $leads_seq + 1, 'a new lead gets the next id after the restored sequence value');
cmp_ok($new_id, '>', $max{leads}, 'above the old highest lead id');
is($owner, 'Matteo', 'round robin goes on where it stopped: Matteo\'s turn');
$lead = sq('restored', <<'SQL');
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Dopo il restore 2', id FROM nocrm.pipelines WHERE name = 'Vendite';
SELECT u.name FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'Dopo il restore 2';
SQL
is($lead, 'Giovanni', 'and then Giovanni\'s');
is( sq('restored',
		q{SELECT string_agg(u.name || '=' || c.assigned, ' ' ORDER BY c.position)
		    FROM nocrm.assignment_counters c JOIN nocrm.users u ON u.id = c.user_id}),
	'Anna=3 Matteo=3 Giovanni=3', 'the counters went on from the restored values');
is( sq('restored',
		"SELECT string_agg(t.name, ',' ORDER BY t.name) FROM nocrm.tags t WHERE t.lead_id = $new_id"),
	'Nuovo', 'the new lead got its tag');

sq('restored', <<"SQL");
SET nocrm.actor = 'anna\@example.com';
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES ($new_id, $uid{Anna}, 'Nuovo commento');
INSERT INTO nocrm.emails (lead_id, from_address, subject) VALUES ($new_id, 'x\@client.example', 'Domanda');
SQL
is( sq('restored', <<"SQL"),
SELECT (SELECT min(id) FROM nocrm.comments WHERE lead_id = $new_id) > $max{comments},
       (SELECT min(id) FROM nocrm.emails WHERE lead_id = $new_id) > $max{emails},
       (SELECT min(id) FROM nocrm.lead_history WHERE lead_id = $new_id) > $max{lead_history},
       (SELECT min(id) FROM nocrm.automation_runs WHERE lead_id = $new_id) > $max{automation_runs},
       (SELECT min(id) FROM nocrm.notifications WHERE lead_id = $new_id) > $max{notifications},
       (SELECT min(id) FROM nocrm.queue WHERE lead_id = $new_id) > $max{queue}
SQL
	't|t|t|t|t|t',
	'new comments, emails, history, run log, notifications and queue items get ids above the restored ones');

# The pending delayed actions: those from before the dump and the new ones.
$node->poll_query_until('restored',
	q{SELECT count(*) = 0 FROM nocrm.queue WHERE state = 'pending' AND run_at > now() AND payload ->> 'delay' = '1 second'})
  or die 'the delayed actions did not fall due';
is(sq('restored', "SELECT string_agg(state, ',') FROM nocrm.queue WHERE id IN ($pending_due)"),
	'pending,pending,pending,pending', 'the restored delayed actions are pending and due');
sq('restored', 'CALL nocrm.drain(0)');
is(sq('restored', "SELECT string_agg(state, ',') FROM nocrm.queue WHERE id IN ($pending_due)"),
	'done,done,done,done', 'a drain ran the delayed actions that were pending in the dump');
is( sq('restored',
		q{SELECT string_agg(l.title || ':' || (SELECT count(*) FROM nocrm.comments c
		                                         WHERE c.lead_id = l.id AND c.user_id = 0
		                                           AND c.body = 'Richiamare il cliente')
		                   || ':' || (SELECT count(*) FROM nocrm.tags t
		                               WHERE t.lead_id = l.id AND t.name = 'Da richiamare'), ' ' ORDER BY l.id)
		    FROM nocrm.leads l WHERE l.pipeline_id = (SELECT id FROM nocrm.pipelines WHERE name = 'Vendite')}),
	'Lead 1:1:1 Lead 2:1:1 Lead 3:1:1 Lead 4:1:1 Lead 6:1:1 Lead 7:1:1 Dopo il restore 1:1:1 Dopo il restore 2:1:1',
	'every Vendite lead has the Butler\'s comment and tag exactly once');
is( sq('restored',
		q{SELECT string_agg(state || '=' || n, ' ' ORDER BY state)
		    FROM (SELECT state, count(*) AS n FROM nocrm.queue GROUP BY state) s}),
	'cancelled=2 done=16 pending=9',
	'queue: only the 7-day actions are still pending (7 restored, 2 new)');
is( sq('restored',
		q{SELECT count(*) FROM nocrm.lead_history h JOIN nocrm.automations a ON a.id = h.automation_id
		   WHERE a.name = 'Vendite: richiamare' AND h.event = 'action.comment' AND h.actor_id = 0
		     AND h.new_value ->> 'comment' = 'Richiamare il cliente' AND h.detail IS DISTINCT FROM 'delayed'
		     AND h.id > } . $max{lead_history}),
	4, 'history: the Butler\'s delayed comments ran for Lead 6, 7 and the two new leads');

# Stage triggers.
sq('restored', q{INSERT INTO nocrm.tags (lead_id, name) SELECT id, 'Hot' FROM nocrm.leads WHERE title = 'Lead 3'});
is(sq('restored', q{SELECT s.name FROM nocrm.leads l JOIN nocrm.steps s ON s.id = l.step_id WHERE l.title = 'Lead 3'}),
	'Preventivo', 'stage trigger (tag Hot) moves Lead 3 to Preventivo after the restore');
is( sq('restored',
		q{SELECT count(*) FROM nocrm.lead_history h JOIN nocrm.leads l ON l.id = h.lead_id
		   WHERE l.title = 'Lead 3' AND h.event = 'trigger.fired'
		     AND h.stage_trigger_id = (SELECT id FROM nocrm.stage_triggers WHERE name = 'Hot: preventivo')}),
	1, 'and history records the trigger that fired');
is( sq('restored',
		q{SELECT nocrm.fire_trigger(id, 'contratto_firmato') FROM nocrm.leads WHERE title = 'Lead 1'}),
	't', 'custom stage trigger: fire_trigger() moves Lead 1');
is(sq('restored', q{SELECT s.name FROM nocrm.leads l JOIN nocrm.steps s ON s.id = l.step_id WHERE l.title = 'Lead 1'}),
	'Chiuso', 'to Chiuso');

# --- a restore in one step --------------------------------------------------------

# pg_restore --disable-triggers does nothing outside a data-only restore, so
# this is a plain restore: the triggers of the extension's tables are there
# when the data is loaded.
sq('postgres', 'CREATE DATABASE onestep');
($ok, $err) = pg_restore_into('onestep', '--disable-triggers');
note "one-step pg_restore --disable-triggers: exit " . ($ok ? 0 : 'non-zero') . "\n$err";
TODO:
{
	local $TODO = 'a one-step pg_restore loads the extension\'s tables with their triggers enabled';
	ok($ok, 'one-step pg_restore --disable-triggers succeeds');
	is(digest('onestep', $_), $before{$_}, "one-step restore: nocrm.$_ has the same rows")
	  for qw(automations assignment_counters comments lead_history);
}

sq('postgres', 'CREATE DATABASE plain');
($ok, $err) = pg_restore_into('plain');
note "plain pg_restore: exit " . ($ok ? 0 : 'non-zero') . "\n$err";
note 'plain restore: nocrm.' . $_ . ' ' . digest('plain', $_) . ' (source: ' . $before{$_} . ')'
  for qw(automations assignment_counters comments lead_history);

$node->stop;
done_testing();
