
# The drain scheduled by pg_cron: nocrm.start_worker() / stop_worker(),
# queue_status.worker_scheduled, repair of a disabled job, and pg_cron really
# running CALL nocrm.drain() and delivering, under a database
# statement_timeout shorter than its run.  Without pg_cron, start_worker()
# fails clearly and the drain still works by hand.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";

use NocrmTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my $sink = start_sink();

# --- with pg_cron --------------------------------------------------------------

my $node = nocrm_node(
	'cron', $sink,
	settings => { drain_run_time => 5 },
	conf => sub {
		my ($node) = @_;
		# pg_cron connects with libpq; the test node listens on a socket only.
		return "shared_preload_libraries = 'pg_cron'\n"
		  . "cron.database_name = 'postgres'\n"
		  . "cron.host = '" . $node->host . "'\n";
	});
sql($node, 'CREATE EXTENSION pg_cron');
sql($node, <<'SQL');
INSERT INTO nocrm.email_templates (name, subject, body)
  VALUES ('hello', 'Hello {{lead.title}}', 'Hello {{lead.title}}');
SELECT nocrm.create_automation(name => 'mail', event => 'lead.creation',
  actions => '[{"type": "send_email", "template": "hello"}]');
SQL

is(sql($node, 'SELECT worker_scheduled FROM nocrm.queue_status'), 'f',
	'pg_cron installed, no job yet: worker_scheduled is false');
my ($ret, $job, $err) = $node->psql('postgres', 'SELECT nocrm.start_worker()');
ok($ret == 0 && $job =~ /^\d+$/, 'start_worker() returns a job id')
  or diag "start_worker() failed: $err";
my $scheduled = $ret == 0;
my ($queued_at, $key);
SKIP:
{
	skip 'start_worker() failed', 8 unless $scheduled;
	is(sql($node, 'SELECT worker_scheduled FROM nocrm.queue_status'), 't',
		'queue_status.worker_scheduled is true');
	is(sql($node, "SELECT jobname, schedule, command, database, active FROM cron.job WHERE jobid = $job"),
		'nocrm-drain-postgres|* * * * *|CALL nocrm.drain()|postgres|t',
		'cron.job runs CALL nocrm.drain() every minute in this database');

	sql($node, "UPDATE cron.job SET active = false WHERE jobid = $job");
	is(sql($node, 'SELECT worker_scheduled FROM nocrm.queue_status'), 'f',
		'a disabled job: worker_scheduled is false');
	is(sql($node, 'SELECT nocrm.start_worker()'), $job, 'start_worker() again repairs the same job');
	is(sql($node, 'SELECT worker_scheduled FROM nocrm.queue_status'), 't', 'worker_scheduled is true again');
	is(sql($node, "SELECT count(*) FROM cron.job WHERE jobname = 'nocrm-drain-postgres' AND active"),
		1, 'one active job');

	# The real thing: pg_cron starts the drain at the next whole minute, in a
	# database whose statement_timeout (200 ms) is far below the run (5 s)
	# and below two slow webhooks (0.5 s each).
	my $slow = $sink->url('/slow/500');
	sql($node, qq{SELECT nocrm.create_automation(name => 'slow', event => 'lead.creation',
	  conditions => '{"status": "standby"}', actions => '[{"type": "webhook", "url": "$slow"}]')});
	sql($node, q{INSERT INTO nocrm.leads (title, status) VALUES ('Slow 1', 'standby'), ('Slow 2', 'standby')});
	sql($node, q{ALTER DATABASE postgres SET statement_timeout = '200ms'});
	$queued_at = time;
	sql($node, q{INSERT INTO nocrm.leads (title, contact_email) VALUES ('By cron', 'cron@client.example')});
	$key = sql($node, q{SELECT idempotency_key FROM nocrm.queue WHERE recipient = 'cron@client.example'});
	like($key, qr/^[0-9a-f-]{36}$/, 'an email is queued for pg_cron\'s drain');
	is(sql($node, 'SELECT due FROM nocrm.queue_status'), 3, 'queue_status shows it due (with the two webhooks)');
}

# --- without pg_cron (while pg_cron's minute comes) -------------------------------

my $plain = nocrm_node('plain', $sink);
($ret, my $out, $err) = $plain->psql('postgres', 'SELECT nocrm.start_worker()',
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
isnt($ret, 0, 'without pg_cron start_worker() fails');
like($err, qr/ERROR:\s+42704: pg_cron is not installed in this database/,
	'with SQLSTATE 42704 (undefined_object) and a clear message');
like($err, qr/HINT:.*shared_preload_libraries.*CALL nocrm\.drain\(\)/, 'and a hint');
is(sql($plain, 'SELECT worker_scheduled IS NULL FROM nocrm.queue_status'), 't',
	'without pg_cron queue_status.worker_scheduled is NULL');
is(sql($plain, 'SELECT nocrm.stop_worker()'), 'f', 'stop_worker() without pg_cron: false');
sql($plain, <<'SQL');
SELECT nocrm.create_automation(name => 'mail', event => 'lead.creation',
  actions => '[{"type": "send_email", "template": "notification", "to": "by-hand@client.example"}]');
INSERT INTO nocrm.leads (title) VALUES ('By hand');
SQL
drain($plain);
is(sql($plain, q{SELECT state FROM nocrm.queue WHERE recipient = 'by-hand@client.example'}),
	'done', 'CALL nocrm.drain(0) by hand works without pg_cron');
my $hand_key = sql($plain, q{SELECT idempotency_key FROM nocrm.queue WHERE recipient = 'by-hand@client.example'});
is(scalar(grep { ($_->{message_id} // '') eq "<$hand_key\@nocrm.test>" } @{ $sink->mails }),
	1, 'and the sink received that email');
$plain->stop;

# --- pg_cron delivers ----------------------------------------------------------------

SKIP:
{
	skip 'start_worker() failed', 9 unless $scheduled;
	ok( wait_for(
			sub { grep { ($_->{message_id} // '') eq "<$key\@nocrm.test>" } @{ $sink->mails } },
			75 - (time - $queued_at),
			'pg_cron to run the drain'),
		'pg_cron ran the drain and the email was delivered (within 75 s)');
	note sprintf('delivered %.1f s after it was queued', time - $queued_at);
	ok( wait_for(
			sub { sql($node, q{SELECT state FROM nocrm.queue WHERE recipient = 'cron@client.example'}) eq 'done' },
			15, 'the batch to be recorded'),
		'the item is done');
	ok( wait_for(
			sub {
				sql($node, "SELECT count(*) FROM cron.job_run_details WHERE jobid = $job AND status = 'succeeded'") > 0;
			},
			15, 'the cron run (drain_run_time = 5 s) to end'),
		'cron.job_run_details records a successful run of the job');
	is(sql($node, "SELECT count(*) FROM cron.job_run_details WHERE jobid = $job AND status = 'failed'"),
		0, 'and no failed run (the database statement_timeout of 200 ms did not cancel it)');
	is(sql($node, q{SELECT string_agg(state, ',' ORDER BY id) FROM nocrm.queue WHERE kind = 'webhook'}),
		'done,done', 'the two 0.5 s webhooks were delivered by that run');
	is(scalar(grep { $_->{path} eq '/slow/500' } @{ $sink->requests }), 2, 'once each');
	sql($node, q{ALTER DATABASE postgres RESET statement_timeout});

	# --- stop_worker ---
	is(sql($node, 'SELECT nocrm.stop_worker()'), 't', 'stop_worker() returns true');
	is(sql($node, "SELECT count(*) FROM cron.job WHERE jobname = 'nocrm-drain-postgres'"), 0,
		'the job is gone from cron.job');
	is(sql($node, 'SELECT worker_scheduled FROM nocrm.queue_status'), 'f', 'worker_scheduled is false');
}
is(sql($node, 'SELECT nocrm.stop_worker()'), 'f', 'stop_worker() with no job: false, nothing to remove');

$sink->stop;
$node->stop;
done_testing();
