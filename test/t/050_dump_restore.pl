# pg_dump and restore of a database that uses the extension, the ways a DBA
# restores: one-step pg_restore -d, pg_dump | psql (COPY and --inserts),
# --single-transaction, --data-only into a database that already has the
# extension, the old two-step recipe (--schema-only, then --data-only
# --disable-triggers), and parallel restore.  Every table of the extension
# (and the application's own) comes back row for row, with the sequences,
# the Butler and the edited notification template; the restore fires no
# automation, stage trigger, history row, notification, NOTIFY or
# delivery and validates nothing against half-loaded tables (restore.c: a
# session with check_function_bodies off, as pg_dump and pg_restore set
# it, is restoring).  Afterwards the restored database works: round robin
# takes up the rotation where it stopped, delayed actions pending in the
# dump run at the next drain, a processing row is claimable after its
# lease, stage triggers move leads.
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

# The extension's dumped tables (read from the catalog: every one is
# compared), and the application's.
my @tables;

# "rows md5" of a table, rows in a fixed order.
sub digest
{
	my ($db, $table) = @_;
	return sq($db,
		"SELECT count(*) || ' ' || coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text)), '-')
		   FROM $table t");
}

sub sequences
{
	my ($db) = @_;
	return sq($db,
		q{SELECT string_agg(schemaname || '.' || sequencename || '=' || coalesce(last_value::text, 'unused'), ', '
		                    ORDER BY schemaname, sequencename)
		    FROM pg_sequences WHERE schemaname IN ('nocrm', 'public')});
}

my $tmp = PostgreSQL::Test::Utils::tempdir();
my $dump = "$tmp/src.dump";

# Runs a command; returns (success, stderr).
sub run_cmd
{
	my (@cmd) = @_;
	my ($out, $err) = ('', '');
	my $ok = IPC::Run::run(@cmd, '>', \$out, '2>', \$err);
	return ($ok, $err);
}

sub pg_restore_into
{
	my ($db, @opts) = @_;
	return run_cmd([ 'pg_restore', @opts, '-d', $node->connstr($db), $dump ]);
}

# A session LISTENing on the notifications channel of $db, from before the
# restore on: what it heard is counted later.
sub listen_on
{
	my ($db) = @_;
	my %l = (db => $db, in => '', out => '', fences => 0,
		timer => IPC::Run::timer($PostgreSQL::Test::Utils::timeout_default));
	$l{h} = IPC::Run::start([ 'psql', '-X', '-At', '-d', $node->connstr($db) ],
		'<', \$l{in}, '>', \$l{out}, '2>', \$l{out}, $l{timer});
	$l{in} .= "LISTEN nocrm_notifications;\nLISTEN nocrm_test_fence;\nSELECT 'listening';\n";
	$l{h}->pump until $l{out} =~ /listening/ || $l{timer}->is_expired;
	die "listener did not start: $l{out}" unless $l{out} =~ /listening/;
	return \%l;
}

# NOTIFYs on nocrm_notifications heard so far: those committed before a
# fence NOTIFY, which arrives after them (psql prints what it received
# after each command).
sub heard
{
	my ($l) = @_;
	my $fences = ++$l->{fences};
	sq($l->{db}, 'NOTIFY nocrm_test_fence');
	$l->{timer}->start($PostgreSQL::Test::Utils::timeout_default);
	for (;;)
	{
		my @f = $l->{out} =~ /Asynchronous notification "nocrm_test_fence"/g;
		last if @f >= $fences;
		die "listener got no fence: $l->{out}" if $l->{timer}->is_expired;
		$l->{in} .= "SELECT 1;\n";
		$l->{h}->pump;
	}
	my @n = $l->{out} =~ /Asynchronous notification "nocrm_notifications"/g;
	return scalar @n;
}

sub stop_listening
{
	my ($l) = @_;
	$l->{in} .= "\\q\n";
	$l->{h}->finish;
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
SELECT nocrm.create_automation(name => 'Richiamo', event => 'lead.date.reached', target => 'next_action_at',
  actions => '[{"type": "comment", "body": "Oggi si richiama"}]');
SELECT nocrm.set_date_offset(id, '-1 day') FROM nocrm.automations WHERE name = 'Richiamo';
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
-- a date rule's firing: pending (10 days ahead)
UPDATE nocrm.leads SET next_action_at = now() + interval '10 days' WHERE title = 'Lead 2';
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
-- a drain held one 7-day action when the dump was taken (claimed, lease running)
UPDATE nocrm.queue SET state = 'processing', attempts = 1, claim_token = gen_random_uuid(),
       lease_until = now() + interval '1 hour', last_attempt_at = now()
 WHERE id = (SELECT min(id) FROM nocrm.queue WHERE state = 'pending' AND payload ->> 'delay' = '7 days');
-- the company calendar (after the leads: the source's story does not depend on it)
INSERT INTO nocrm.business_calendar (timezone) VALUES ('Europe/Rome');
INSERT INTO nocrm.business_hours (weekday, starts, ends)
  SELECT d, h.s, h.e FROM generate_series(1, 5) d, (VALUES (time '09:00', time '13:00'), ('14:00', '18:00')) h(s, e);
INSERT INTO nocrm.holidays (day, name) VALUES ('2031-12-25', 'Natale'), ('2031-12-26', 'Santo Stefano');
-- a problem: a dead letter of an automation, recorded as the drain does
INSERT INTO nocrm.queue (kind, automation_id, recipient, payload, state, attempts, last_error)
SELECT 'webhook', min(id), 'https://erp.example/hook', '{}', 'dead', 1, 'HTTP 400' FROM nocrm.automations;
SELECT nocrm.record_failures(ARRAY[(SELECT min(id) FROM nocrm.automations)], ARRAY[NULL::bigint],
                             ARRAY[(SELECT max(id) FROM nocrm.queue)], ARRAY['webhook'], ARRAY['HTTP 400'], ARRAY[true]);
-- the application's own table, referring to the extension's
CREATE TABLE public.call_notes (id serial PRIMARY KEY, lead_id bigint NOT NULL REFERENCES nocrm.leads, note text);
INSERT INTO public.call_notes (lead_id, note) SELECT id, 'chiamata ' || title FROM nocrm.leads;
SQL


sq('src', <<'SQL');
-- tasks: by a rule (on a comment), by hand; one done (its rule tags the lead),
-- one overdue and raised, one due later
SELECT nocrm.create_automation(name => 'Richiamare', event => 'lead.commented',
  actions => '[{"type": "create_task", "title": "Richiamare {{lead.title}}", "due": "3 days"}]');
SELECT nocrm.create_automation(name => 'Fatto', event => 'task.completed',
  actions => '[{"type": "add_tags", "tags": ["Task fatto"]}]');
INSERT INTO nocrm.comments (lead_id, user_id, body)
  SELECT id, 2, 'Da richiamare' FROM nocrm.leads WHERE title = 'Lead 2';
INSERT INTO nocrm.tasks (lead_id, assignee_id, title, due_at)
  SELECT id, user_id, 'In ritardo', now() - interval '1 hour' FROM nocrm.leads WHERE title = 'Lead 3';
INSERT INTO nocrm.tasks (lead_id, assignee_id, title) SELECT id, user_id, 'Preventivo' FROM nocrm.leads WHERE title = 'Lead 4';
SELECT nocrm.raise_overdue_tasks();
SELECT nocrm.complete_task(id) FROM nocrm.tasks WHERE title = 'Preventivo';
SQL

# --- the source, before the dump ------------------------------------------------

@tables = split /\n/, sq('src',
	q{SELECT c::regclass::text FROM pg_extension e, unnest(e.extconfig) c
	   WHERE e.extname = 'nocrm_automation' AND (SELECT relkind FROM pg_class WHERE oid = c) = 'r'
	     AND c <> 'nocrm.restore_loaded'::regclass   -- what this database's restore loaded, not dumped
	   ORDER BY 1});
cmp_ok(scalar(@tables), '>=', 19, 'the extension dumps its tables (' . scalar(@tables) . ')');
is( sq('src',
		q{SELECT string_agg(relname, ' ' ORDER BY relname) FROM pg_class
		   WHERE relnamespace = 'nocrm'::regnamespace AND relkind = 'r'
		     AND oid <> ALL ((SELECT extconfig FROM pg_extension WHERE extname = 'nocrm_automation')::oid[])}),
	'', 'every table of the extension is dumped');
is( sq('src',
		q{SELECT string_agg(c::regclass || ' ' || e.extcondition[i], ', ' ORDER BY c::regclass::text)
		    FROM pg_extension e, unnest(e.extconfig) WITH ORDINALITY AS x(c, i)
		   WHERE e.extname = 'nocrm_automation' AND e.extcondition[i] <> ''}),
	q{nocrm.email_templates WHERE name NOT IN ('notification', 'alert'), nocrm.restore_loaded WHERE false, nocrm.seeded_rows WHERE value IS NOT DISTINCT FROM nocrm.seeded_row(seed), nocrm.users WHERE NOT is_butler},
	'the seeded rows are dumped through nocrm.seeded_rows, not with their tables; restore_loaded not at all');
is( sq('src',
		q{SELECT count(*) FROM pg_extension e, unnest(e.extconfig) c
		   WHERE e.extname = 'nocrm_automation' AND (SELECT relkind FROM pg_class WHERE oid = c) = 'S'}),
	18, 'the 18 identity sequences are marked for dumping');
push @tables, 'public.call_notes';
# (tables added later are compared too, with or without rows)
for my $t (map { "nocrm.$_" } qw(absences alerts assignment_counters automation_failures automation_enrollments automation_runs automations
	business_calendar business_hours holidays comments email_templates emails firing_counts lead_history leads notifications pipelines queue seeded_rows stage_triggers steps
	tags tasks users working_hours))
{
	cmp_ok((split / /, digest('src', $t))[0], '>', 0, "source: $t has rows");
}
is( sq('src',
		q{SELECT string_agg(u.name || '=' || c.assigned, ' ' ORDER BY c.position)
		    FROM nocrm.assignment_counters c JOIN nocrm.users u ON u.id = c.user_id}),
	'Anna=3 Matteo=2 Giovanni=2',
	'source: round robin gave 7 leads in turn (Matteo is next)');
is( sq('src',
		q{SELECT string_agg(state || '=' || n, ' ' ORDER BY state)
		    FROM (SELECT state, count(*) AS n FROM nocrm.queue GROUP BY state) s}),
	'cancelled=2 dead=1 done=8 pending=10 processing=1',
	'source queue: delayed actions done, cancelled (deleted lead), pending and one held by a drain; a dead letter');
my $pending_due = sq('src',
	q{SELECT string_agg(id::text, ',' ORDER BY id) FROM nocrm.queue
	   WHERE state = 'pending' AND payload ->> 'delay' = '1 second'});
is(scalar(split /,/, $pending_due), 4, 'source: 4 delayed actions of Lead 6 and 7 pending (due in a second)');
my $processing = sq('src', q{SELECT id FROM nocrm.queue WHERE state = 'processing'});
is( sq('src', q{SELECT string_agg(outcome || '=' || n, ' ' ORDER BY outcome)
	             FROM (SELECT outcome, count(*) AS n FROM nocrm.automation_runs GROUP BY outcome) s}),
	'fired=25 test=8', 'source run log: fired (two by the task rules) and test-mode runs');
is( sq('src', q{SELECT (SELECT sum(fired) FROM nocrm.firing_counts) || ' = '
                       || (SELECT sum(fired) FROM nocrm.automation_stats) || ' + '
                       || (SELECT sum(fired) FROM nocrm.stage_trigger_stats)}),
	'25 = 24 + 1', 'source: every fired run counted in firing_counts: automation_stats and stage_trigger_stats');
is(sq('src', q{SELECT s.name FROM nocrm.leads l JOIN nocrm.steps s ON s.id = l.step_id WHERE l.title = 'Lead 2'}),
	'Preventivo', 'source: the stage trigger moved Lead 2');
is( sq('src', q{SELECT name || ' ' || email FROM nocrm.users WHERE is_butler}),
	'Alfred alfred@example.com', 'source: the Butler was renamed');

my %before = map { $_ => digest('src', $_) } @tables;
my $seq_before = sequences('src');
# Trigger states by name; foreign key triggers (internal, named by oid) by count.
my $triggers_sql = q{SELECT string_agg(c.relname || '.' || t.tgname || '=' || t.tgenabled::text, ' ' ORDER BY c.relname, t.tgname)
                            FILTER (WHERE NOT t.tgisinternal)
                            || ' internal:' || count(*) FILTER (WHERE t.tgisinternal AND t.tgenabled = 'O')
                            || '/' || count(*) FILTER (WHERE t.tgisinternal)
                       FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                      WHERE c.relnamespace = 'nocrm'::regnamespace};
my $triggers_before = sq('src', $triggers_sql);
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

command_ok([ 'pg_dump', '-Fc', '-f', $dump, '-d', $node->connstr('src') ], 'pg_dump -Fc');

# --- every way of restoring -------------------------------------------------------

# The restored database $db has every row and sequence value of the source.
sub same_as_source
{
	my ($db, $how, $todo_triggers) = @_;
	is(sq($db, q{SELECT extversion FROM pg_extension WHERE extname = 'nocrm_automation'}),
		'1.3', "$how: the extension is at 1.3");
	my @differ = grep { digest($db, $_) ne $before{$_} } @tables;
	is_deeply(\@differ, [], "$how: every table has the same rows (" . scalar(@tables) . ' tables)')
	  or diag join("\n", map { "$_: " . digest($db, $_) . " (source $before{$_})" } @differ);
	is(sequences($db), $seq_before, "$how: every sequence has its old value");
	local $TODO = $todo_triggers;
	is(sq($db, $triggers_sql), $triggers_before, "$how: every trigger (incl. foreign keys) is enabled as in the source");
}

# A restore into a new database, with a listener there from the start.
sub restore_test
{
	my ($db, $how, $restore, $todo_triggers) = @_;
	sq('postgres', "CREATE DATABASE $db");
	my $l = listen_on($db);
	my ($ok, $err) = $restore->($db);
	ok($ok, "$how: succeeds") or diag $err;
	is($err, '', "$how: no errors or warnings");
	same_as_source($db, $how, $todo_triggers);
	is(heard($l), 0, "$how: no NOTIFY during the restore");
	return $l;
}

# The restored database works: the next lead gets the next id and Matteo
# (round robin carries on), its history and notification are written, and
# the listener hears the NOTIFY (so it would have heard one before).
sub works_after
{
	my ($db, $how, $l) = @_;
	my ($id, $owner) = split /\|/, sq($db, <<'SQL');
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Dopo il restore 1', id FROM nocrm.pipelines WHERE name = 'Vendite';
SELECT l.id, u.name FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'Dopo il restore 1';
SQL
	is($id, $leads_seq + 1, "$how: a new lead gets the next id after the restored sequence value");
	is($owner, 'Matteo', "$how: round robin goes on where it stopped: Matteo's turn");
	is( sq($db, "SELECT (SELECT min(id) FROM nocrm.lead_history WHERE lead_id = $id) > $max{lead_history},
	                    (SELECT count(*) FROM nocrm.notifications WHERE lead_id = $id)"),
		't|1', "$how: its history and notification are written, with new ids");
	is(heard($l), 1, "$how: the listener hears the new lead's NOTIFY");
	is(sq($db, q{SELECT nocrm.delay_until(NULL, '1 business day', '2031-12-24 17:00+01') AT TIME ZONE 'Europe/Rome'}),
		'2031-12-29 17:00:00', "$how: the company calendar counts business days over the restored holidays");
	is(sq($db, 'SELECT nocrm.raise_overdue_tasks()'), '0', "$how: the overdue task raised in the source is not raised again");
	stop_listening($l);
}

my $l;

$l = restore_test('onestep', 'pg_restore -d (one step)', sub { pg_restore_into($_[0]) });
works_after('onestep', 'pg_restore -d', $l);

$l = restore_test('plain', 'pg_dump | psql', sub {
	my ($db) = @_;
	my ($sql_ok, $dump_err) = run_cmd([ 'pg_dump', '-f', "$tmp/plain.sql", '-d', $node->connstr('src') ]);
	return (0, $dump_err) unless $sql_ok;
	return run_cmd([ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr($db), '-f', "$tmp/plain.sql" ]);
});
works_after('plain', 'pg_dump | psql', $l);

$l = restore_test('inserts', 'pg_dump --inserts | psql', sub {
	my ($db) = @_;
	my ($sql_ok, $dump_err) = run_cmd([ 'pg_dump', '--inserts', '-f', "$tmp/inserts.sql", '-d', $node->connstr('src') ]);
	return (0, $dump_err) unless $sql_ok;
	return run_cmd([ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr($db), '-f', "$tmp/inserts.sql" ]);
});
works_after('inserts', 'pg_dump --inserts | psql', $l);

$l = restore_test('single', 'pg_restore --single-transaction', sub { pg_restore_into($_[0], '--single-transaction') });
works_after('single', 'pg_restore --single-transaction', $l);

$l = restore_test('dataonly', 'pg_restore --data-only into CREATE EXTENSION', sub {
	my ($db) = @_;
	sq($db, 'CREATE EXTENSION nocrm_automation');
	sq($db, 'CREATE TABLE public.call_notes (id serial PRIMARY KEY, lead_id bigint NOT NULL REFERENCES nocrm.leads, note text)');
	return pg_restore_into($db, '--data-only');
});
works_after('dataonly', 'pg_restore --data-only', $l);

# Parallel restore in one step.  pg_dump gives the data of extension tables
# no order among them in the archive (each TABLE DATA depends on its table
# only), so pg_restore -j loads a child table before its parent: the row
# waits in nocrm.restore_held and is inserted by the load that brings its
# last parent (src/restore_order.c); the application's foreign key to
# nocrm.leads waits for its data.  Three times with 4 workers (the order
# varies), once with 2.
for my $run (1 .. 3)
{
	$l = restore_test("parallel_$run", "pg_restore -j 4 (one step, run $run)",
		sub { pg_restore_into($_[0], '-j', '4') });
	is(sq("parallel_$run", 'SELECT count(*) FROM nocrm.restore_held'), 0,
		"pg_restore -j 4 (run $run): no row is left held");
	works_after("parallel_$run", "pg_restore -j 4 (run $run)", $l);
}
$l = restore_test('parallel_j2', 'pg_restore -j 2 (one step)', sub { pg_restore_into($_[0], '-j', '2') });
works_after('parallel_j2', 'pg_restore -j 2', $l);

# The same mechanism, deterministic: a serial restore of the data in the
# reverse of pg_dump's order, every child before its parents.
{
	my ($list_ok, $list_err) = run_cmd([ 'pg_restore', '-l', '-f', "$tmp/toc.list", $dump ]);
	die "pg_restore -l: $list_err" unless $list_ok;
	open(my $fh, '<', "$tmp/toc.list") or die;
	my @toc = <$fh>;
	close $fh;
	my @data = grep { / TABLE DATA nocrm / } @toc;
	my @rest = grep { !/ TABLE DATA nocrm / } @toc;
	# the extension's data right after the pre-data, reversed
	my ($first_data) = grep { $rest[$_] =~ / (TABLE DATA|SEQUENCE SET) / } 0 .. $#rest;
	open($fh, '>', "$tmp/reversed.list") or die;
	print $fh @rest[ 0 .. $first_data - 1 ], reverse(@data), @rest[ $first_data .. $#rest ];
	close $fh;
	cmp_ok(scalar(@data), '>=', 19, 'reversed list: the data of every extension table, children first');
}
$l = restore_test('reversed', 'pg_restore -L, children before parents', sub {
	return pg_restore_into($_[0], '-L', "$tmp/reversed.list");
});
is(sq('reversed', 'SELECT count(*) FROM nocrm.restore_held'), 0, 'children first: no row is left held');
works_after('reversed', 'children first', $l);

# Held rows that never get their parent: a data-only load of tags alone
# into a database without the leads keeps them, says so, and inserts them
# once the leads are loaded.
sq('postgres', 'CREATE DATABASE partial');
sq('partial', 'CREATE EXTENSION nocrm_automation');
my ($ok, $err) = run_cmd([ 'pg_restore', '--data-only', '-t', 'tags', '-d', $node->connstr('partial'), $dump ]);
ok($ok, 'a data-only restore of nocrm.tags alone succeeds') or diag $err;
is(sq('partial', 'SELECT count(*) FROM nocrm.tags'), 0, 'its rows are not inserted without their leads');
is(sq('partial', 'SELECT count(*) || \' \' || string_agg(DISTINCT tbl::text, \',\') FROM nocrm.restore_held'),
	(split / /, $before{'nocrm.tags'})[0] . ' nocrm.tags', 'they wait in nocrm.restore_held');
my ($hold_out, $hold_err) = ('', '');
$node->psql('partial', 'SET check_function_bodies = off; INSERT INTO nocrm.restore_held SELECT * FROM nocrm.restore_held WHERE false',
	stdout => \$hold_out, stderr => \$hold_err);
like($hold_err, qr/NOTICE:  \d+ restored rows wait in nocrm\.restore_held for their parent rows/,
	'a restore-mode load that leaves rows held says so');
is(sq('partial', 'SELECT nocrm.load_held_rows()'), (split / /, $before{'nocrm.tags'})[0],
	'load_held_rows(): all still held, their leads are not there');
($ok, $err) = run_cmd([ 'pg_restore', '--data-only', '-t', 'users', '-t', 'pipelines', '-t', 'steps', '-t', 'leads',
		'-d', $node->connstr('partial'), $dump ]);
ok($ok, 'then the leads with their users, pipelines and steps') or diag $err;
is(sq('partial', 'SELECT count(*) FROM nocrm.restore_held'), 0, 'nothing is held any more');
is(digest('partial', 'nocrm.tags'), $before{'nocrm.tags'}, 'the tags are as in the source');
is(sq('partial', 'SELECT count(*) FROM nocrm.lead_history'), 0, 'and they wrote no history');

# The parallel recipe: the extension's rows first, serially, then the rest in parallel.
$l = restore_test('parallel2', 'pg_restore -j 2, extension data first', sub {
	my ($db) = @_;
	my @r = pg_restore_into($db, '--section=pre-data');
	@r = pg_restore_into($db, '--section=data', '-n', 'nocrm') if $r[0] && $r[1] eq '';
	@r = pg_restore_into($db, '-j', '2', '--section=data', '--section=post-data', '-N', 'nocrm') if $r[0] && $r[1] eq '';
	return @r;
});
works_after('parallel2', 'pg_restore -j 2 recipe', $l);

# The old two-step recipe, triggers disabled: it still works; the seeded
# rows keep their CREATE EXTENSION values until restore_seeded_row().
$l = restore_test('twostep', 'two steps, --disable-triggers', sub {
	my ($db) = @_;
	my @r = pg_restore_into($db, '--schema-only');
	@r = pg_restore_into($db, '--data-only', '--disable-triggers') if $r[0] && $r[1] eq '';
	is(sq($db, 'SELECT name FROM nocrm.users WHERE is_butler'), 'The Butler',
		'two steps: with the triggers disabled the Butler is as CREATE EXTENSION made it');
	# the Butler, the edited notification template, the alert template's updated_at
	is(sq($db, 'SELECT count(*) FROM nocrm.seeded_rows WHERE value IS DISTINCT FROM nocrm.seeded_row(seed)'), 3,
		'two steps: the dumped seeded rows are loaded, not yet applied');
	sq($db, 'SELECT nocrm.restore_seeded_row(seed, value) FROM nocrm.seeded_rows');
	return @r;
}, 'pg_restore --disable-triggers ends with ENABLE TRIGGER ALL: ENABLE REPLICA triggers come back as ordinary ones');
is(sq('twostep', 'SELECT name || \' \' || email FROM nocrm.users WHERE is_butler'),
	'Alfred alfred@example.com', 'two steps: restore_seeded_row() gives the Butler back');
works_after('twostep', 'two steps', $l);

# --- the one-step restore, further ---------------------------------------------------

is(sq('onestep', 'SELECT name || \' \' || email FROM nocrm.users WHERE is_butler'),
	'Alfred alfred@example.com', 'restored: the Butler keeps the name set with set_butler()');
is(sq('onestep', q{SELECT md5(subject || body || updated_at) FROM nocrm.email_templates WHERE name = 'notification'}),
	sq('src', q{SELECT md5(subject || body || updated_at) FROM nocrm.email_templates WHERE name = 'notification'}),
	'restored: the edited notification template is kept');
is( sq('onestep',
		q{SELECT count(*) FROM nocrm.tags t WHERE NOT EXISTS (SELECT 1 FROM nocrm.leads l WHERE l.id = t.lead_id)}),
	0, 'restored: no orphan rows');

my $new_id = $leads_seq + 1;
my $lead = sq('onestep', <<'SQL');
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Dopo il restore 2', id FROM nocrm.pipelines WHERE name = 'Vendite';
SELECT u.name FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'Dopo il restore 2';
SQL
is($lead, 'Giovanni', 'and then Giovanni\'s');
is( sq('onestep',
		q{SELECT string_agg(u.name || '=' || c.assigned, ' ' ORDER BY c.position)
		    FROM nocrm.assignment_counters c JOIN nocrm.users u ON u.id = c.user_id}),
	'Anna=3 Matteo=3 Giovanni=3', 'the counters went on from the restored values');
is( sq('onestep',
		"SELECT string_agg(t.name, ',' ORDER BY t.name) FROM nocrm.tags t WHERE t.lead_id = $new_id"),
	'Nuovo', 'the new lead got its tag');

sq('onestep', <<"SQL");
SET nocrm.actor = 'anna\@example.com';
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES ($new_id, $uid{Anna}, 'Nuovo commento');
INSERT INTO nocrm.emails (lead_id, from_address, subject) VALUES ($new_id, 'x\@client.example', 'Domanda');
SQL
is( sq('onestep', <<"SQL"),
SELECT (SELECT min(id) FROM nocrm.comments WHERE lead_id = $new_id) > $max{comments},
       (SELECT min(id) FROM nocrm.emails WHERE lead_id = $new_id) > $max{emails},
       (SELECT min(id) FROM nocrm.lead_history WHERE lead_id = $new_id) > $max{lead_history},
       (SELECT min(id) FROM nocrm.automation_runs WHERE lead_id = $new_id) > $max{automation_runs},
       (SELECT min(id) FROM nocrm.notifications WHERE lead_id = $new_id) > $max{notifications},
       (SELECT min(id) FROM nocrm.queue WHERE lead_id = $new_id) > $max{queue}
SQL
	't|t|t|t|t|t',
	'new comments, emails, history, run log, notifications and queue items get ids above the restored ones');

# The queue: pending delayed actions run at the next drain, once; the row
# a drain held at dump time waits for its lease, then is claimable.
$node->poll_query_until('onestep',
	q{SELECT count(*) = 0 FROM nocrm.queue WHERE state = 'pending' AND run_at > now() AND payload ->> 'delay' = '1 second'})
  or die 'the delayed actions did not fall due';
is(sq('onestep', "SELECT string_agg(state, ',') FROM nocrm.queue WHERE id IN ($pending_due)"),
	'pending,pending,pending,pending', 'the restored delayed actions are pending and due');
sq('onestep', 'CALL nocrm.drain(0)');
is(sq('onestep', "SELECT string_agg(state, ',') FROM nocrm.queue WHERE id IN ($pending_due)"),
	'done,done,done,done', 'a drain ran the delayed actions that were pending in the dump');
is( sq('onestep',
		q{SELECT string_agg(l.title || ':' || (SELECT count(*) FROM nocrm.comments c
		                                         WHERE c.lead_id = l.id AND c.user_id = 0
		                                           AND c.body = 'Richiamare il cliente')
		                   || ':' || (SELECT count(*) FROM nocrm.tags t
		                               WHERE t.lead_id = l.id AND t.name = 'Da richiamare'), ' ' ORDER BY l.id)
		    FROM nocrm.leads l WHERE l.pipeline_id = (SELECT id FROM nocrm.pipelines WHERE name = 'Vendite')}),
	'Lead 1:1:1 Lead 2:1:1 Lead 3:1:1 Lead 4:1:1 Lead 6:1:1 Lead 7:1:1 Dopo il restore 1:1:1 Dopo il restore 2:1:1',
	'every Vendite lead has the Butler\'s comment and tag exactly once');
is(sq('onestep', "SELECT state || ' ' || attempts FROM nocrm.queue WHERE id = $processing"),
	'processing 1', 'the row a drain held at dump time waits for its lease');
sq('onestep', "UPDATE nocrm.queue SET lease_until = now() - interval '1 second' WHERE id = $processing");
sq('onestep', 'CALL nocrm.drain(0)');
is(sq('onestep', "SELECT state || ' ' || attempts FROM nocrm.queue WHERE id = $processing"),
	'done 2', 'after the lease a drain claims it and runs it (a second attempt)');
is( sq('onestep',
		q{SELECT count(*) FROM nocrm.lead_history h JOIN nocrm.automations a ON a.id = h.automation_id
		   WHERE a.name = 'Vendite: richiamare' AND h.event = 'action.comment' AND h.actor_id = 0
		     AND h.new_value ->> 'comment' = 'Richiamare il cliente' AND h.detail IS DISTINCT FROM 'delayed'
		     AND h.id > } . $max{lead_history}),
	4, 'history: the Butler\'s delayed comments ran for Lead 6, 7 and the two new leads');

# Stage triggers.
sq('onestep', q{INSERT INTO nocrm.tags (lead_id, name) SELECT id, 'Hot' FROM nocrm.leads WHERE title = 'Lead 3'});
is(sq('onestep', q{SELECT s.name FROM nocrm.leads l JOIN nocrm.steps s ON s.id = l.step_id WHERE l.title = 'Lead 3'}),
	'Preventivo', 'stage trigger (tag Hot) moves Lead 3 to Preventivo after the restore');
is( sq('onestep',
		q{SELECT count(*) FROM nocrm.lead_history h JOIN nocrm.leads l ON l.id = h.lead_id
		   WHERE l.title = 'Lead 3' AND h.event = 'trigger.fired'
		     AND h.stage_trigger_id = (SELECT id FROM nocrm.stage_triggers WHERE name = 'Hot: preventivo')}),
	1, 'and history records the trigger that fired');
is( sq('onestep',
		q{SELECT nocrm.fire_trigger(id, 'contratto_firmato') FROM nocrm.leads WHERE title = 'Lead 1'}),
	't', 'custom stage trigger: fire_trigger() moves Lead 1');
is(sq('onestep', q{SELECT s.name FROM nocrm.leads l JOIN nocrm.steps s ON s.id = l.step_id WHERE l.title = 'Lead 1'}),
	'Chiuso', 'to Chiuso');

# A dump of the restored database restores the same again (the seeded rows go on).
command_ok([ 'pg_dump', '-Fc', '-f', "$tmp/again.dump", '-d', $node->connstr('onestep') ], 'pg_dump of the restored database');
sq('postgres', 'CREATE DATABASE again');
($ok, $err) = run_cmd([ 'pg_restore', '-d', $node->connstr('again'), "$tmp/again.dump" ]);
ok($ok && $err eq '', 'restored again in one step') or diag $err;
is(join(' ', map { digest('again', $_) eq digest('onestep', $_) ? () : $_ } @tables), '',
	'with the same rows as the database it was dumped from');
is(sq('again', 'SELECT name FROM nocrm.users WHERE is_butler'), 'Alfred', 'the Butler too');

# A CRM that never changed the seeded rows: they come back with their
# timestamps too (kept from its first users on).
sq('postgres', 'CREATE DATABASE pristine');
sq('pristine', <<'SQL');
CREATE EXTENSION nocrm_automation;
INSERT INTO nocrm.users (name, email) VALUES ('Anna', 'anna@example.com');
SQL
is(sq('pristine', 'SELECT string_agg(seed, \' \' ORDER BY seed) FROM nocrm.seeded_rows'),
	'alert_template butler notification_template', 'pristine: the first user starts nocrm.seeded_rows');
command_ok([ 'pg_dump', '-Fc', '-f', "$tmp/pristine.dump", '-d', $node->connstr('pristine') ], 'pg_dump of a CRM with unchanged seeded rows');
sq('postgres', 'CREATE DATABASE pristine_restored');
($ok, $err) = run_cmd([ 'pg_restore', '-d', $node->connstr('pristine_restored'), "$tmp/pristine.dump" ]);
ok($ok && $err eq '', 'restored in one step') or diag $err;
is(join(' ', map { digest('pristine_restored', $_) eq digest('pristine', $_) ? () : $_ }
		qw(nocrm.users nocrm.email_templates nocrm.seeded_rows)), '',
	'the Butler (created_at) and the notification and alert templates (updated_at) are as they were');

$node->stop;
done_testing();
