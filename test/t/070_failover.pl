
# A streaming standby and a failover: the standby gets the extension and the
# queue through WAL; CALL nocrm.drain() there does nothing (a NOTICE, every
# item left as it was); once the standby is promoted, a drain runs every
# item the old primary had queued, nothing lost and nothing twice, and new
# leads fire automations as before.  A second failover in the middle of a
# drain: the item in flight is sent again after its lease (same key), the
# rest of its batch and what was queued after the claim once each.  A
# third failover to a standby with the background worker preloaded: no
# worker in recovery; promoted, the worker starts and delivers by itself,
# with the same at-least-once window.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";

use NocrmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $sink = start_sink();
my $primary = PostgreSQL::Test::Cluster->new('primary');
$primary->init(allows_streaming => 1, extra => [ '--encoding=UTF8', '--locale=C' ]);
# (copied to the standbys with the backups)
$primary->append_conf('postgresql.conf', join('', map { "nocrm.$_\n" }
	"smtp_url = '" . $sink->smtp_url . "'", "smtp_tls = 'none'", "mail_from = 'butler\@nocrm.test'",
	"lease_time = 3", "drain_poll_interval = 50", "request_timeout = 20000"));
$primary->start;
$primary->backup('before_extension');

my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'before_extension', has_streaming => 1);
$standby->start;

# The extension, the CRM and the queue: all made on the primary after the backup.
$primary->safe_psql('postgres', <<'SQL');
CREATE EXTENSION nocrm_automation;
INSERT INTO nocrm.users (name, email) VALUES
  ('Anna', 'anna@example.com'), ('Matteo', 'matteo@example.com'), ('Giovanni', 'giovanni@example.com');
INSERT INTO nocrm.pipelines (name) VALUES ('Vendite');
INSERT INTO nocrm.steps (pipeline_id, name, position) VALUES (1, 'Nuovo', 1), (1, 'Preventivo', 2);
SELECT nocrm.create_automation(name => 'Vendite', event => 'lead.creation',
  conditions => '{"pipeline": "Vendite"}',
  actions => '[{"type": "assign_round_robin", "users": ["anna@example.com", "matteo@example.com", "giovanni@example.com"]},
               {"type": "comment", "body": "Richiamare il cliente", "delay": "1 second"},
               {"type": "add_tags", "tags": ["Da richiamare"], "delay": "1 second"},
               {"type": "comment", "body": "Una settimana dopo", "delay": "7 days"}]');
INSERT INTO nocrm.leads (title, pipeline_id) SELECT 'Lead ' || i, 1 FROM generate_series(1, 5) i;
SQL

my $due_items = q{SELECT string_agg(id::text, ',' ORDER BY id) FROM nocrm.queue WHERE payload ->> 'delay' = '1 second'};
my $due = $primary->safe_psql('postgres', $due_items);
is(scalar(split /,/, $due), 10, 'primary: 10 delayed actions (a comment and a tag for 5 leads) queued');
$primary->poll_query_until('postgres',
	q{SELECT count(*) = 0 FROM nocrm.queue WHERE state = 'pending' AND run_at > now() AND payload ->> 'delay' = '1 second'})
  or die 'the delayed actions did not fall due';
$primary->wait_for_catchup($standby, 'replay', $primary->lsn('insert'));

my $queue_state = q{SELECT string_agg(id || ':' || state || ':' || attempts, ' ' ORDER BY id) FROM nocrm.queue};
my $all_pending = $primary->safe_psql('postgres', $queue_state);
is( $primary->safe_psql('postgres',
		q{SELECT string_agg(DISTINCT state || '/' || attempts, ',') FROM nocrm.queue}),
	'pending/0', 'primary: every item pending, never attempted');

# --- the standby -----------------------------------------------------------------

is($standby->safe_psql('postgres', q{SELECT extversion FROM pg_extension WHERE extname = 'nocrm_automation'}),
	'1.3', 'standby: the extension came through WAL');
is($standby->safe_psql('postgres', $queue_state), $all_pending, 'standby: the same queue as the primary');
is( $standby->safe_psql('postgres',
		q{SELECT count(*) FROM nocrm.queue WHERE state = 'pending' AND run_at <= now()}),
	10, 'standby: 10 items are due');

# A session on the standby that stays connected through the promotion.
my $session = $standby->background_psql('postgres');

my ($out, $err);
my $rc = $standby->psql('postgres', 'CALL nocrm.drain(0)', stdout => \$out, stderr => \$err);
is($rc, 0, 'standby: CALL nocrm.drain(0) succeeds');
like($err, qr/NOTICE:  nocrm\.drain\(\) does nothing on a standby/, 'with a NOTICE that it does nothing here');
unlike($err, qr/ERROR/, 'and no error');
$session->query('CALL nocrm.drain(0)');
like($session->{stderr}, qr/NOTICE:  nocrm\.drain\(\) does nothing on a standby/,
	'the long-lived session gets the same NOTICE');
$session->{stderr} = '';
is($standby->safe_psql('postgres', $queue_state), $all_pending, 'standby: the queue is untouched');
is($standby->safe_psql('postgres', 'SELECT count(*) FROM nocrm.comments'), 0, 'standby: no comment written');

is($primary->safe_psql('postgres', $queue_state), $all_pending,
	'primary: the queue is untouched too (the standby claimed nothing)');

# --- failover ----------------------------------------------------------------------

my $lead_max = $primary->safe_psql('postgres', 'SELECT max(id) FROM nocrm.leads');
my $queue_max = $primary->safe_psql('postgres', 'SELECT max(id) FROM nocrm.queue');
my $history_max = $primary->safe_psql('postgres', 'SELECT max(id) FROM nocrm.lead_history');
$primary->stop('immediate');
$standby->promote;
$standby->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()')
  or die 'the standby was not promoted';
is($standby->safe_psql('postgres', $queue_state), $all_pending, 'promoted: the queue is as the primary left it');

$rc = $standby->psql('postgres', 'CALL nocrm.drain(0)', stdout => \$out, stderr => \$err);
is($rc, 0, 'promoted: CALL nocrm.drain(0) succeeds');
is($err, '', 'without the standby NOTICE');
is( $standby->safe_psql('postgres',
		"SELECT string_agg(DISTINCT state || '/' || attempts, ',') FROM nocrm.queue WHERE id IN ($due)"),
	'done/1', 'promoted: all 10 due items are done, in one attempt each');
is( $standby->safe_psql('postgres',
		q{SELECT count(*) FROM nocrm.queue WHERE state = 'pending' AND payload ->> 'delay' = '7 days'}),
	5, 'the 7-day actions are still pending');
is( $standby->safe_psql('postgres', <<'SQL'),
SELECT string_agg(l.title || ':' ||
         (SELECT count(*) FROM nocrm.comments c
           WHERE c.lead_id = l.id AND c.user_id = 0 AND c.body = 'Richiamare il cliente') || ':' ||
         (SELECT count(*) FROM nocrm.tags t WHERE t.lead_id = l.id AND t.name = 'Da richiamare'), ' ' ORDER BY l.id)
  FROM nocrm.leads l
SQL
	'Lead 1:1:1 Lead 2:1:1 Lead 3:1:1 Lead 4:1:1 Lead 5:1:1',
	'every lead has the Butler\'s comment and its tag, once');
is( $standby->safe_psql('postgres',
		q{SELECT count(*) FROM nocrm.automation_runs WHERE automation_id = 1 AND outcome = 'fired'}),
	15, 'run log: 5 creations and the 10 delayed actions');

# --- life goes on on the new primary ---------------------------------------------------

$standby->safe_psql('postgres', q{INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('Dopo il failover', 1)});
my ($id, $owner) = split /\|/, $standby->safe_psql('postgres',
	q{SELECT l.id, u.name FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id WHERE l.title = 'Dopo il failover'});
cmp_ok($id, '>', $lead_max, 'a lead inserted after the promotion gets a new id');
is( $standby->safe_psql('postgres',
		q{SELECT string_agg(u.name || '=' || c.assigned, ' ' ORDER BY c.position)
		    FROM nocrm.assignment_counters c JOIN nocrm.users u ON u.id = c.user_id}),
	'Anna=2 Matteo=2 Giovanni=2', 'round robin went on with the counters from before the failover');
is($owner, 'Giovanni', 'after Anna, Matteo, Giovanni, Anna, Matteo: the new lead is Giovanni\'s');
is( $standby->safe_psql('postgres',
		"SELECT count(*) FROM nocrm.queue WHERE lead_id = $id AND state = 'pending' AND id > $queue_max"),
	3, 'its delayed actions are queued, with new ids');
cmp_ok($standby->safe_psql('postgres', "SELECT min(id) FROM nocrm.lead_history WHERE lead_id = $id"),
	'>', $history_max, 'and its history has new ids');

$standby->poll_query_until('postgres',
	"SELECT count(*) = 0 FROM nocrm.queue WHERE lead_id = $id AND state = 'pending' AND run_at > now()
	    AND payload ->> 'delay' = '1 second'")
  or die 'the new delayed actions did not fall due';
$session->query('CALL nocrm.drain(0)');
is($session->{stderr}, '', 'the session connected since before the promotion now drains, without a NOTICE');
is( $standby->safe_psql('postgres',
		"SELECT (SELECT count(*) FROM nocrm.comments WHERE lead_id = $id AND user_id = 0 AND body = 'Richiamare il cliente')
		     || ':' || (SELECT count(*) FROM nocrm.tags WHERE lead_id = $id AND name = 'Da richiamare')"),
	'1:1', 'and runs the new lead\'s delayed actions');
$session->quit;

# --- a second failover, in the middle of a drain ---------------------------------------

$standby->backup('after_promotion');
my $standby2 = PostgreSQL::Test::Cluster->new('standby2');
$standby2->init_from_backup($standby, 'after_promotion', has_streaming => 1);
$standby2->start;
my $slow = $sink->url('/slow/8000');
$standby->safe_psql('postgres', <<"SQL");
INSERT INTO nocrm.email_templates (name, subject, body) VALUES ('hello', 'Hello {{lead.title}}', 'Hello');
SELECT nocrm.create_automation(name => 'hook', event => 'lead.creation', conditions => '{"status": "lost"}',
  actions => '[{"type": "webhook", "url": "$slow"}]');
SELECT nocrm.create_automation(name => 'mail', event => 'lead.creation', conditions => '{"status": "standby"}',
  actions => '[{"type": "send_email", "template": "hello"}]');
INSERT INTO nocrm.leads (title, status) VALUES ('Hook', 'lost');
INSERT INTO nocrm.leads (title, status, contact_email)
  SELECT 'Mail ' || i, 'standby', 'm' || i || '\@client.example' FROM generate_series(1, 3) i;
SQL
my $batch = q{SELECT string_agg(id::text, ',' ORDER BY id) FROM nocrm.queue WHERE kind IN ('email', 'webhook')};
my $claimed = $standby->safe_psql('postgres', $batch);
my $drain = start_drain($standby);
ok(wait_for(sub { grep { $_->{path} eq '/slow/8000' } @{ $sink->requests } }, 30, 'the slow webhook to arrive'),
	'the drain is in the middle of the webhook (the first of its batch)');
# the emails go meanwhile (another host), and are recorded while the webhook still runs
ok( wait_for(
		sub {
			$standby->safe_psql('postgres', q{SELECT count(*) FROM nocrm.queue WHERE kind = 'email' AND state = 'done'}) == 3;
		},
		30, 'the three emails to be recorded'),
	'the three emails of the batch were delivered and recorded while the webhook was in flight');
$standby->safe_psql('postgres', q{INSERT INTO nocrm.leads (title, status, contact_email)
  VALUES ('Mail later', 'standby', 'later@client.example')});
$standby->wait_for_catchup($standby2, 'replay', $standby->lsn('insert'));
$standby->stop('immediate');
finish_drain($drain);
$standby2->promote;
$standby2->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()')
  or die 'standby2 was not promoted';
is( $standby2->safe_psql('postgres',
		"SELECT string_agg(state || '/' || attempts, ',' ORDER BY id) FROM nocrm.queue WHERE id IN ($claimed)"),
	'processing/1,done/1,done/1,done/1',
	'promoted: the webhook the old primary had in flight is processing, under its lease; its emails are done');
is(scalar @{ $sink->mails }, 3, 'the three emails had gone out before the failover');
ok( wait_for(sub { $standby2->safe_psql('postgres', 'SELECT bool_and(lease_until < now()) FROM nocrm.queue WHERE state = \'processing\'') eq 't' },
		30, 'the leases to run out'),
	'the leases ran out');
drain($standby2);
is($standby2->safe_psql('postgres', q{SELECT string_agg(DISTINCT state, ',') FROM nocrm.queue WHERE kind IN ('email', 'webhook')}),
	'done', 'the new primary delivered everything');
my %count;
$count{ join(',', @{ $_->{rcpt_tos} }) }++ for @{ $sink->mails };
is_deeply(\%count, { 'later@client.example' => 1, map { ("m$_\@client.example" => 1) } 1 .. 3 },
	'each email was sent once: the three recorded before the failover are not sent again, the one queued after the claim is sent');
my @hooks = grep { $_->{path} eq '/slow/8000' } @{ $sink->requests };
is(scalar @hooks, 2, 'the webhook in flight at the failover was sent again (at least once)');
is($hooks[0]{headers}{'idempotency-key'}, $hooks[1]{headers}{'idempotency-key'}, 'with the same Idempotency-Key');

# --- a promoted standby's background worker ------------------------------------------
# standby3 preloads the worker (nocrm.worker_database = 'postgres').  In
# recovery it has none (BgWorkerStart_RecoveryFinished) and the queue stays
# as the primary has it; promoted, its worker starts by itself and
# delivers, without any CALL, what the old primary queued: the batch the old
# primary's drain held (its webhook in flight: sent again after the lease,
# same key; its emails once) and an email queued after that claim.
$standby2->backup('for_worker');
my $standby3 = PostgreSQL::Test::Cluster->new('standby3');
$standby3->init_from_backup($standby2, 'for_worker', has_streaming => 1);
$standby3->append_conf('postgresql.conf',
	"shared_preload_libraries = 'nocrm_automation'\nnocrm.worker_database = 'postgres'\n");
$standby3->start;

sub drain_workers
{
	my ($node) = @_;
	return $node->safe_psql('postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'nocrm drain worker'});
}

my $hooks_before = scalar grep { $_->{path} eq '/slow/8000' } @{ $sink->requests };
$standby2->safe_psql('postgres', <<'SQL');
INSERT INTO nocrm.leads (title, status) VALUES ('Hook 2', 'lost');
INSERT INTO nocrm.leads (title, status, contact_email)
  SELECT 'Worker ' || i, 'standby', 'w' || i || '@client.example' FROM generate_series(1, 3) i;
SQL
my $batch2 = q{SELECT string_agg(id::text, ',' ORDER BY id) FROM nocrm.queue
                WHERE kind IN ('email', 'webhook') AND state = 'pending'};
my $claimed2 = $standby2->safe_psql('postgres', $batch2);
is(scalar(split /,/, $claimed2), 4, 'new primary: a webhook and 3 emails pending');
$standby2->wait_for_catchup($standby3, 'replay', $standby2->lsn('insert'));
is(drain_workers($standby3), 0, 'standby3 (worker preloaded) runs no drain worker in recovery');
is( $standby3->safe_psql('postgres',
		"SELECT string_agg(state || '/' || attempts, ',' ORDER BY id) FROM nocrm.queue WHERE id IN ($claimed2)"),
	'pending/0,pending/0,pending/0,pending/0', 'and its queue is the primary\'s, untouched');

$drain = start_drain($standby2);
ok( wait_for(sub { (grep { $_->{path} eq '/slow/8000' } @{ $sink->requests }) > $hooks_before }, 30,
		'the second slow webhook to arrive'),
	'the old primary\'s drain is in the middle of the webhook');
$standby2->safe_psql('postgres', q{INSERT INTO nocrm.leads (title, status, contact_email)
  VALUES ('Worker later', 'standby', 'wlater@client.example')});
$standby2->wait_for_catchup($standby3, 'replay', $standby2->lsn('insert'));
$standby2->stop('immediate');
finish_drain($drain);
my $mails_at_failover = scalar @{ $sink->mails };
$standby3->promote;
$standby3->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()')
  or die 'standby3 was not promoted';
ok(wait_for(sub { drain_workers($standby3) == 1 }, 30, 'the drain worker on the promoted standby'),
	'promoted: the drain worker starts by itself');
is( $standby3->safe_psql('postgres',
		q{SELECT datname FROM pg_stat_activity WHERE backend_type = 'nocrm drain worker'}),
	'postgres', 'connected to nocrm.worker_database');
my $all2 = q{SELECT string_agg(DISTINCT state, ',') FROM nocrm.queue WHERE kind IN ('email', 'webhook')};
ok(wait_for(sub { $standby3->safe_psql('postgres', $all2) eq 'done' }, 60, 'the worker to deliver everything'),
	'the worker delivered everything, with no CALL nocrm.drain()');
is( $standby3->safe_psql('postgres',
		"SELECT string_agg(state || '/' || attempts, ',' ORDER BY id) FROM nocrm.queue WHERE id IN ($claimed2)"),
	'done/2,done/2,done/2,done/2', 'the held batch: each item done at its second attempt (after the lease)');
my %count2;
$count2{ join(',', @{ $_->{rcpt_tos} }) }++ for @{ $sink->mails }[ $mails_at_failover .. $#{ $sink->mails } ];
is_deeply(\%count2, { 'wlater@client.example' => 1, map { ("w$_\@client.example" => 1) } 1 .. 3 },
	'each email sent once: the three of the held batch and the one queued after the claim');
is(scalar(@{ $sink->mails }) - $mails_at_failover, 4, 'and no other email (nothing of before sent again)');
my @hooks2 = (grep { $_->{path} eq '/slow/8000' } @{ $sink->requests })[ $hooks_before .. $hooks_before + 2 ];
@hooks2 = grep { defined } @hooks2;
is(scalar @hooks2, 2, 'the webhook in flight at the failover was sent again by the worker (at least once)');
is($hooks2[0]{headers}{'idempotency-key'}, $hooks2[1]{headers}{'idempotency-key'}, 'with the same Idempotency-Key');
isnt($hooks2[0]{headers}{'idempotency-key'}, $hooks[0]{headers}{'idempotency-key'}, '(another webhook than the first failover\'s)');

$standby3->stop;
$sink->stop;
done_testing();
