
# A drain that dies is recovered by the next one: a backend killed with
# SIGKILL in the middle of a delivery (crash restart), and an immediate
# shutdown with 1,000 emails queued.  Nothing is lost; items in flight may be
# delivered twice, with the same idempotency key.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";

use JSON::PP;
use NocrmTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $sink = start_sink();
my $node = nocrm_node(
	'crash', $sink,
	settings => { lease_time => 2, retry_base => 1, drain_batch_size => 100 },
	conf => "restart_after_crash = on\n");

my $slow = $sink->url('/slow/5000');
sql($node, <<"SQL");
INSERT INTO nocrm.email_templates (name, subject, body)
  VALUES ('hello', 'Hello {{lead.title}}', 'Hello {{lead.title}}');
SELECT nocrm.create_automation(name => 'slow hook', event => 'lead.creation',
  conditions => '{"status": "standby"}',
  actions => '[{"type": "webhook", "url": "$slow"}]');
SELECT nocrm.create_automation(name => 'mail', event => 'lead.creation',
  conditions => '{"status": "todo"}',
  actions => '[{"type": "send_email", "template": "hello"}]');
INSERT INTO nocrm.leads (title, status) VALUES ('Slow', 'standby');
SQL
my $item = sql($node, q{SELECT id FROM nocrm.queue WHERE kind = 'webhook'});
ok($item, 'a webhook to /slow/5000 is queued');

sub requests_to
{
	my ($path) = @_;
	return grep { $_->{path} eq $path } @{ $sink->requests };
}

# --- SIGKILL of the drain's backend in the middle of the POST ---------------

my $drain = start_drain($node);
ok( wait_for(
		sub {
			@{ $sink->requests } >= 1
			  && sql($node, "SELECT state FROM nocrm.queue WHERE id = $item") eq 'processing';
		},
		30,
		'the sink to receive the slow webhook'),
	'the drain claimed the item and the sink got the request');
my $pid = sql($node,
	q{SELECT pid FROM pg_stat_activity WHERE query LIKE 'CALL nocrm.drain%' AND pid <> pg_backend_pid()});
like($pid, qr/^\d+$/, 'found the drain backend');
my $log_offset = -s $node->logfile;
is(kill('KILL', $pid), 1, 'SIGKILL sent to the drain backend');
ok(!finish_drain($drain), 'the killed drain failed');
like($drain->{stderr}, qr/server closed the connection|terminat|connection to server/i,
	'psql saw the connection die');

ok(wait_for(sub { $node->psql('postgres', 'SELECT 1') == 0 }, 60, 'the restart after the crash'),
	'the server restarted');
like(slurp_file($node->logfile, $log_offset), qr/terminated by signal 9/,
	'the postmaster saw a crash (not a clean termination)');

my $row = sql($node,
	"SELECT state, attempts, lease_until IS NOT NULL FROM nocrm.queue WHERE id = $item");
is($row, 'processing|1|t', 'after the restart the item is still processing, with its lease');
is(scalar @{ $sink->requests }, 1, 'the restart itself sent nothing');

ok( wait_for(
		sub { sql($node, "SELECT lease_until < now() FROM nocrm.queue WHERE id = $item") eq 't' },
		10, 'the lease to run out'),
	'the lease (nocrm.lease_time = 2 s) ran out');
drain($node);
is(sql($node, "SELECT state || '|' || attempts FROM nocrm.queue WHERE id = $item"),
	'done|2', 'the next drain re-delivered it: done after 2 attempts');
my @reqs = @{ $sink->requests };
is(scalar @reqs, 2, 'the sink received the webhook twice');
is(scalar(grep { $_->{headers}{'idempotency-key'} eq $reqs[0]{headers}{'idempotency-key'} } @reqs),
	2, 'both with the SAME Idempotency-Key');
is($reqs[0]{headers}{'idempotency-key'},
	sql($node, "SELECT idempotency_key FROM nocrm.queue WHERE id = $item"),
	'the key is the item\'s idempotency_key');
is($reqs[1]{body}, $reqs[0]{body}, 'and the same body');

# --- immediate shutdown with 10,000 emails queued ---------------------------------

# Lead 350 is also sent to the slow webhook: the drain sits in the middle of
# that batch (of 100) for 5 s, so the shutdown surely lands mid-drain.
$sink->control('reset');
sql($node,
	q{INSERT INTO nocrm.leads (title, contact_email, status)
	  SELECT 'Lead ' || i, 'c' || i || '@client.example', CASE WHEN i = 350 THEN 'standby' ELSE 'todo' END
	    FROM generate_series(1, 10001) i});
my %all = map { $_ => 1 }
  split /\n/, sql($node, q{SELECT idempotency_key FROM nocrm.queue WHERE kind = 'email'});
is(scalar keys %all, 10000, '10,000 emails queued (and a slow webhook among them)');
$item = sql($node, q{SELECT id FROM nocrm.queue WHERE kind = 'webhook' AND state = 'pending'});

$drain = start_drain($node);
ok(wait_for(sub { scalar requests_to('/slow/5000') }, 60, 'the drain to reach the slow webhook'),
	'the drain is in the middle of the queue');
$node->stop('immediate');
finish_drain($drain);
$node->start;

my %state_at_restart = map { split /\|/ }
  split /\n/, sql($node, q{SELECT state, count(*) FROM nocrm.queue WHERE kind = 'email' GROUP BY state});
my %in_flight = map { $_ => 1 }
  split /\n/, sql($node, q{SELECT idempotency_key FROM nocrm.queue WHERE kind = 'email' AND state = 'processing'});
note 'after the restart: ' . join(', ', map { "$_ $state_at_restart{$_}" } sort keys %state_at_restart);
cmp_ok($state_at_restart{pending} // 0, '>', 0, 'the shutdown interrupted the drain: items still pending');
cmp_ok(scalar keys %in_flight, '>', 0, 'and items in flight (processing)');
my %delivered_before;
for my $m (@{ $sink->mails })
{
	my ($key) = ($m->{message_id} // '') =~ /^<([0-9a-f-]+)\@nocrm\.test>$/;
	$delivered_before{$key}++ if $key;
}
my @done_not_sent = grep { !$delivered_before{$_} }
  split /\n/, sql($node, q{SELECT idempotency_key FROM nocrm.queue WHERE kind = 'email' AND state = 'done'});
is(scalar @done_not_sent, 0, 'every item recorded done before the shutdown had reached the sink');

ok( wait_for(
		sub { sql($node, q{SELECT coalesce(bool_and(lease_until < now()), true) FROM nocrm.queue WHERE state = 'processing'}) eq 't' },
		10, 'the leases to run out'),
	'the leases of the items in flight ran out');
drain($node);
is(sql($node, q{SELECT count(*) FROM nocrm.queue WHERE kind = 'email' AND state = 'done'}),
	10000, 'after restart and a drain all 10,000 are done');

my %count;
for my $m (@{ $sink->mails })
{
	my ($key) = ($m->{message_id} // '') =~ /^<([0-9a-f-]+)\@nocrm\.test>$/;
	$count{ $key // 'unparsable' }++;
}
is(scalar(grep { !$count{$_} } keys %all), 0, 'each Message-ID reached the sink at least once');
is(scalar(grep { !$all{$_} } keys %count), 0, 'and nothing else was sent');
my @dups = sort grep { $count{$_} > 1 } keys %count;
note scalar(@dups) . ' duplicates, ' . scalar(keys %in_flight) . ' items were in flight';
is(scalar(grep { !$in_flight{$_} } @dups), 0, 'duplicates only among the items in flight at the shutdown');
is_deeply(\@dups, [ sort grep { $delivered_before{$_} } keys %in_flight ],
	'exactly the in-flight items that had reached the sink were sent again');
is(scalar(grep { $count{$_} > 2 } keys %count), 0, 'none sent more than twice');

is(sql($node, "SELECT state FROM nocrm.queue WHERE id = $item"), 'done', 'the slow webhook is done too');
my @slow = requests_to('/slow/5000');
is(scalar @slow, 2, 'it was sent twice (in flight at the shutdown)');
is($slow[0]{headers}{'idempotency-key'}, $slow[1]{headers}{'idempotency-key'},
	'with the same Idempotency-Key');

$sink->stop;
$node->stop;
done_testing();
