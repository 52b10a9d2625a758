
# Logical replication of the nocrm tables to a subscriber that has the
# extension too: the apply worker runs no automation, stage trigger or
# history of its own (every nocrm table ends up row for row as on the
# publisher), the subscriber's drain sends nothing (nocrm.drain_enabled =
# auto refuses on a subscriber of nocrm.queue), the publisher's drain sends
# each item once and its outcomes replicate.  After a switchover (the
# subscription dropped, sequences moved past the replicated ids) the
# subscriber drains and runs the replicated automations, also in a session
# that was connected before they arrived.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";

use NocrmTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $sink_pub = start_sink();
my $sink_sub = start_sink();
my $pub = nocrm_node('publisher', $sink_pub, settings => { retry_base => 1 },
	conf => "wal_level = logical\nmax_wal_senders = 10\nmax_replication_slots = 10\n");
my $sub = nocrm_node('subscriber', $sink_sub, settings => { retry_base => 1 });

# Every nocrm table: both start from the same CREATE EXTENSION, so no initial copy.
$pub->safe_psql('postgres', 'CREATE PUBLICATION nocrm_pub FOR TABLES IN SCHEMA nocrm');
$sub->safe_psql('postgres',
	"CREATE SUBSCRIPTION nocrm_sub CONNECTION '" . $pub->connstr . " dbname=postgres'"
	  . ' PUBLICATION nocrm_pub WITH (copy_data = false)');
$sub->poll_query_until('postgres',
	q{SELECT count(*) = 0 FROM pg_subscription_rel WHERE srsubstate NOT IN ('r', 's')})
  or die 'the subscription did not become ready';

# A session on the subscriber that loads its rule cache now, before any rule exists.
my $early = $sub->background_psql('postgres');
$early->query_safe(q{BEGIN; INSERT INTO nocrm.leads (title) VALUES ('probe'); ROLLBACK});

sql($pub, <<'SQL');
INSERT INTO nocrm.users (name, email) VALUES ('Anna', 'anna@example.com'), ('Matteo', 'matteo@example.com');
INSERT INTO nocrm.pipelines (name) VALUES ('Vendite');
INSERT INTO nocrm.steps (pipeline_id, name, position) VALUES (1, 'Nuovo', 1), (1, 'Preventivo', 2);
INSERT INTO nocrm.email_templates (name, subject, body) VALUES ('hello', 'Hello {{lead.title}}', 'Hello');
SELECT nocrm.create_automation(name => 'Vendite', event => 'lead.creation',
  conditions => '{"pipeline": "Vendite"}',
  actions => '[{"type": "assign_round_robin", "users": ["anna@example.com", "matteo@example.com"]},
               {"type": "send_email", "template": "hello"},
               {"type": "add_tags", "tags": ["nuovo"]},
               {"type": "notify", "user": "owner", "channels": ["email"], "message": "Nuovo lead"},
               {"type": "comment", "body": "Richiamare", "delay": "1 second"}]');
INSERT INTO nocrm.leads (title, pipeline_id, contact_email)
  SELECT 'Lead ' || i, 1, 'c' || i || '@client.example' FROM generate_series(1, 4) i;
UPDATE nocrm.leads SET status = 'standby' WHERE id = 1;
INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (2, 1, 'chiamato');
SQL
$pub->wait_for_catchup('nocrm_sub');

# Every nocrm table, as text, in order; the rows each CREATE EXTENSION
# seeded itself (the Butler, the notification and alert templates) only by their content.
my $tables = $pub->safe_psql('postgres',
	q{SELECT string_agg(c.relname, ' ' ORDER BY c.relname) FROM pg_class c
	   WHERE c.relnamespace = 'nocrm'::regnamespace AND c.relkind = 'r'});
my %seeded = (
	users => q{CASE WHEN t.is_butler THEN (t.id, t.name, t.email)::text ELSE t::text END},
	email_templates => q{CASE WHEN t.name IN ('notification', 'alert') THEN (t.name, t.subject, t.body)::text ELSE t::text END});
sub contents
{
	my ($node) = @_;
	return { map {
			my $row = $seeded{$_} // 't::text';
			$_ => $node->safe_psql('postgres',
				"SELECT coalesce(string_agg($row, E'\\n' ORDER BY $row), '') FROM nocrm.$_ t")
	} split / /, $tables };
}
is(sql($pub, q{SELECT count(*) FROM nocrm.queue WHERE kind = 'email'}), 8,
	'publisher: the automation queued 8 emails (a send_email and a notify per lead)');
cmp_ok(sql($pub, 'SELECT count(*) FROM nocrm.lead_history'), '>', 0, 'publisher: history written');
my $before = contents($pub);
is_deeply(contents($sub), $before,
	'subscriber: every nocrm table is row for row the publisher\'s (the apply ran no automation, history or counter of its own)');
is($sub->safe_psql('postgres', q{SELECT string_agg(DISTINCT user_id::text, ',' ORDER BY user_id::text) FROM nocrm.leads}),
	'1,2', 'the owners the publisher assigned came through as they were');

is( $sub->safe_psql('postgres',
		q{SELECT string_agg(DISTINCT t.tgenabled::text || ':' || (t.tgname = 'nocrm_rules_changed_replica')::text, ',')
		    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
		   WHERE c.relnamespace = 'nocrm'::regnamespace AND NOT t.tgisinternal}),
	'O:false,R:true',
	'every trigger of the extension fires on origin only (none ENABLE ALWAYS), but the replica-mode cache invalidation');

# The subscriber's drain: a NOTICE, nothing sent, nothing changed.
$sub->poll_query_until('postgres', q{SELECT count(*) = 0 FROM nocrm.queue WHERE run_at > now()})
  or die 'the delayed comments did not fall due';
my ($rc, $out, $err) = $sub->psql('postgres', 'CALL nocrm.drain(0)');
is($rc, 0, 'subscriber: CALL nocrm.drain(0) succeeds');
like($err, qr/NOTICE:  nocrm\.drain\(\) does nothing on a subscriber of nocrm\.queue/, 'with a NOTICE');
like($err, qr/Subscription "nocrm_sub" replicates nocrm\.queue/, 'naming the subscription');
is(scalar @{ $sink_sub->mails } + scalar @{ $sink_sub->requests }, 0, 'the subscriber sent nothing');
is_deeply(contents($sub), $before, 'and changed nothing');

# The publisher drains; the outcomes reach the subscriber.
drain($pub);
$pub->wait_for_catchup('nocrm_sub');
is(sql($pub, q{SELECT string_agg(DISTINCT state, ',') FROM nocrm.queue}), 'done', 'publisher: every item done');
my %seen;
$seen{ $_->{message_id} }++ for @{ $sink_pub->mails };
is(scalar @{ $sink_pub->mails }, 8, 'the publisher sent the 8 emails');
is(scalar(grep { $seen{$_} > 1 } keys %seen), 0, 'each once');
is_deeply(contents($sub), contents($pub), 'the subscriber has the outcomes, the comments and their history');
($rc, $out, $err) = $sub->psql('postgres', 'CALL nocrm.drain(0)');
is(scalar @{ $sink_sub->mails } + scalar @{ $sink_sub->requests }, 0, 'the subscriber still sent nothing');

# nocrm.drain_enabled = off switches a drain off anywhere.
($rc, $out, $err) = $pub->psql('postgres', 'SET nocrm.drain_enabled = off; CALL nocrm.drain(0)');
like($err, qr/NOTICE:  nocrm\.drain\(\) is switched off in this database/, 'drain_enabled = off: a NOTICE on the publisher');

# --- switchover: the subscriber takes over ---------------------------------------------

$sub->safe_psql('postgres', 'DROP SUBSCRIPTION nocrm_sub');
# Sequences are not replicated: move each past the ids that came through.
$sub->safe_psql('postgres', <<'SQL');
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT c.oid::regclass AS tbl, a.attname AS col
               FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
              WHERE c.relnamespace = 'nocrm'::regnamespace AND c.relkind = 'r' AND a.attidentity <> ''
    LOOP
        EXECUTE format('SELECT setval(pg_get_serial_sequence(%L, %L), max(%I)) FROM %s HAVING max(%I) IS NOT NULL',
                       r.tbl, r.col, r.col, r.tbl, r.col);
    END LOOP;
END $$;
SQL
my $last = sql($sub, 'SELECT max(id) FROM nocrm.leads');
$early->query_safe(q{INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Dopo', 1)});
my ($id, $owner, $tags) = split /\|/, sql($sub,
	q{SELECT l.id, u.name, (SELECT string_agg(name, ',') FROM nocrm.tags t WHERE t.lead_id = l.id)
	    FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'Dopo'});
cmp_ok($id, '>', $last, 'after the switchover a lead gets an id after the replicated ones');
is($tags, 'nuovo', 'the replicated automation fired, in a session connected before it arrived');
is($owner, 'Anna', 'round robin went on from the replicated counters (Anna, Matteo, Anna, Matteo: Anna)');
drain($sub);
is(join(',', map { @{ $_->{rcpt_tos} } } @{ $sink_sub->mails }), 'anna@example.com',
	'the new primary drains: it sent the new lead\'s notify email to its owner, and nothing that had replicated');
$early->quit;

# A bulk statement's tags: with wal_level = logical by INSERT ... ON CONFLICT
# (a row taken out again would decode as an insert), elsewhere directly.
my $bulk_tags = q{SET nocrm.history = actions;
  SELECT count(*) >= 0 FROM nocrm.record_writes(reset => true);
  INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Bulk ' || i, 1 FROM generate_series(1, 100) i;
  SELECT direct || '/' || by_sql FROM nocrm.record_writes() WHERE table_name = 'tags'};
is((split /\n/, sql($pub, $bulk_tags))[-1], '0/100', 'wal_level = logical: a bulk statement\'s 100 tags by INSERT');
is((split /\n/, sql($sub, $bulk_tags))[-1], '100/0', 'wal_level = replica: directly');
is(sql($sub, q{SELECT count(*) FROM nocrm.tags WHERE name = 'nuovo' AND lead_id IN (SELECT id FROM nocrm.leads WHERE title LIKE 'Bulk %')}),
	100, 'each of the 100 leads has its tag');

$sink_pub->stop;
$sink_sub->stop;
$pub->stop;
$sub->stop;
done_testing();
