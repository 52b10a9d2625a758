
# The drain keeps its own limits and stops when told to:
#  - a role's statement_timeout and lock_timeout do not cancel it;
#  - an admin's cancel of an item in flight, or UPDATE to 'dead', is not
#    overwritten, and an item cancelled before its turn is not sent;
#  - nocrm.stop_worker() (a cancel) stops a drain in the middle of a
#    transfer: what was sent is recorded, the item cut short and the rest go
#    back to pending, nothing stays processing, and no drain starts while
#    stop_worker() holds its lock;
#  - a hanging receiver holds up neither the other receivers' items nor its
#    own other items for more than nocrm.request_timeout a round, and every
#    item's times (last_attempt_at, run_at of a retry, delivered_at) are its own.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";

use JSON::PP;
use NocrmTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $sink = start_sink();
my $other = start_sink();    # a second receiving host (another port)
my $node = nocrm_node(
	'control', $sink,
	settings => {
		retry_base => 60,
		request_timeout => 10000,
		lease_time => 300,
		drain_batch_size => 100,
	});

sub hook_rule
{
	my ($name, $url) = @_;
	return sql($node,
		"SELECT nocrm.create_automation(name => '$name', event => 'lead.creation',
		   conditions => '{\"status\": \"standby\"}',
		   actions => '[{\"type\": \"webhook\", \"url\": \"$url\"}]')");
}

# Queues one webhook to $url per lead title; returns the queue ids in order.
sub hooks
{
	my ($url, @titles) = @_;
	my $before = sql($node, 'SELECT coalesce(max(id), 0) FROM nocrm.queue');
	my $rule = hook_rule('hook', $url);
	for my $t (@titles)
	{
		sql($node, "INSERT INTO nocrm.leads (title, status) VALUES ('$t', 'standby')");
	}
	sql($node, "SELECT nocrm.delete_automation($rule)");
	return split /\n/, sql($node, "SELECT id FROM nocrm.queue WHERE id > $before ORDER BY id");
}

sub key_of { sql($node, "SELECT idempotency_key FROM nocrm.queue WHERE id = $_[0]") }

sub received
{
	my ($s, $id) = @_;
	my $key = key_of($id);
	return scalar grep { ($_->{headers}{'idempotency-key'} // '') eq $key } @{ $s->requests };
}

sub row
{
	my ($id) = @_;
	return JSON::PP->new->decode(
		sql($node, "SELECT row_to_json(q) FROM nocrm.queue q WHERE id = $id"));
}

# --- a role's statement_timeout and lock_timeout ------------------------------------

sql($node, <<'SQL');
CREATE ROLE cron_runner SUPERUSER LOGIN;
ALTER ROLE cron_runner SET statement_timeout = '200ms';
ALTER ROLE cron_runner SET lock_timeout = '50ms';
SQL
my ($rc, $out, $err) = $node->psql('postgres', 'SELECT pg_sleep(0.5)', extra_params => [ '-U', 'cron_runner' ]);
like($err, qr/canceling statement due to statement timeout/,
	'the role setting bites: a plain 0.5 s statement of cron_runner is cancelled');

my @slow = hooks($sink->url('/slow/400'), 'Slow 1', 'Slow 2', 'Slow 3');
# a delayed action on a lead that another session holds locked for a while
my $later = sql($node,
	q{SELECT nocrm.create_automation(name => 'later', event => 'lead.creation',
	    conditions => '{"status": "todo"}',
	    actions => '[{"type": "comment", "body": "waited", "delay": "1 hour"}]')});
sql($node, q{INSERT INTO nocrm.leads (title) VALUES ('Locked')});
my $lead = sql($node, q{SELECT id FROM nocrm.leads WHERE title = 'Locked'});
my $action = sql($node, "SELECT id FROM nocrm.queue WHERE kind = 'action' AND lead_id = $lead");
sql($node, "UPDATE nocrm.queue SET run_at = now() WHERE id = $action");

my $holder = $node->background_psql('postgres');
$holder->query_safe("BEGIN; SELECT id FROM nocrm.leads WHERE id = $lead FOR UPDATE");
my $drain = start_drain($node, user => 'cron_runner');
ok( wait_for(
		sub {
			sql($node,
				q{SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
				   WHERE NOT l.granted AND a.query LIKE 'CALL nocrm.drain%'}) > 0;
		},
		30, 'the drain to wait for the lead lock'),
	'the drain\'s delayed action waits for the locked lead');
usleep(300_000);    # well past the role's lock_timeout of 50 ms
$holder->query_safe('COMMIT');
ok(finish_drain($drain), 'CALL nocrm.drain(0) as cron_runner (statement_timeout 200 ms) finished without error')
  or diag $drain->{stderr};
unlike($drain->{stderr}, qr/timeout/, 'no timeout was raised');
is(sql($node, 'SELECT string_agg(state || \'/\' || attempts, \',\' ORDER BY id) FROM nocrm.queue WHERE id IN (' . join(',', @slow) . ')'),
	'done/1,done/1,done/1', 'the three 0.4 s webhooks were delivered, once each');
is(join(',', map { received($sink, $_) } @slow), '1,1,1', 'the sink received each once');
is(sql($node, "SELECT state || '/' || attempts FROM nocrm.queue WHERE id = $action"), 'done/1',
	'the delayed action waited for the locked lead (past the role\'s 50 ms lock_timeout) and ran');
is(sql($node, "SELECT count(*) FROM nocrm.comments WHERE lead_id = $lead AND body = 'waited'"), 1,
	'its comment is there once');
$holder->quit;
sql($node, "SELECT nocrm.delete_automation($later)");

# --- an admin cancels items of a batch in flight ------------------------------------

sql($node, 'CREATE ROLE sara LOGIN IN ROLE nocrm_admin');
$sink->control('reset');
my ($first, $second, $third) = hooks($sink->url('/slow/3000'), 'Cancel 1', 'Cancel 2', 'Cancel 3');
$drain = start_drain($node);
ok(wait_for(sub { received($sink, $first) == 1 }, 30, 'the first webhook to arrive'),
	'the drain is sending the first item of the batch');
is(sql($node, "SELECT string_agg(state, ',' ORDER BY id) FROM nocrm.queue WHERE id IN ($first, $second, $third)"),
	'processing,processing,processing', 'all three are claimed (processing)');
is($node->safe_psql('postgres', "SELECT nocrm.cancel_queue_item($first, 'wrong customer')", extra_params => [ '-U', 'sara' ]),
	'processing', 'sara cancels the item in flight: cancel_queue_item says it was processing');
$node->safe_psql('postgres', "UPDATE nocrm.queue SET state = 'dead' WHERE id = $second", extra_params => [ '-U', 'sara' ]);
ok(finish_drain($drain), 'the drain finished') or diag $drain->{stderr};
my $r1 = row($first);
is($r1->{state}, 'cancelled', 'the cancelled item in flight stays cancelled (the drain did not overwrite it)');
is($r1->{last_error}, 'cancelled by sara: wrong customer', 'with who cancelled it and why');
ok(defined $r1->{delivered_at}, 'and delivered_at tells that it reached the receiver anyway');
is(received($sink, $first), 1, 'it was sent once');
is(row($second)->{state}, 'dead', 'the item set to dead by UPDATE stays dead');
is(received($sink, $second), 0, 'and, cancelled before its turn, it was never sent');
is(row($third)->{state}, 'done', 'the third item was delivered');
is(sql($node, 'SELECT count(*) FROM nocrm.queue WHERE claim_token IS NOT NULL AND state <> \'processing\' AND id IN (' . join(',', $first, $third) . ')'),
	0, 'recorded rows carry no claim token');

# A session holds the row locked when the drain records: the drain waits for
# no lock, tries again, and records once the lock is gone.
$sink->control('reset');
my ($locked_row) = hooks($sink->url('/slow/1000'), 'Held');
$drain = start_drain($node);
ok(wait_for(sub { received($sink, $locked_row) == 1 }, 30, 'the webhook to arrive'), 'the drain is sending');
my $locker = $node->background_psql('postgres');
$locker->query_safe("BEGIN; SELECT id FROM nocrm.queue WHERE id = $locked_row FOR UPDATE");
ok( wait_for(
		sub {
			sql($node, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'CALL nocrm.drain%' AND wait_event = 'Extension'") > 0
			  && sql($node, "SELECT state FROM nocrm.queue WHERE id = $locked_row") eq 'processing';
		},
		30, 'the drain to wait between its tries to record'),
	'the delivery is over and the drain waits (the row is locked), without blocking on the lock');
$locker->query_safe('COMMIT');
$locker->quit;
ok(finish_drain($drain), 'the drain finished') or diag $drain->{stderr};
unlike($drain->{stderr}, qr/could not record/, 'without a warning');
is(row($locked_row)->{state}, 'done', 'the outcome was recorded once the lock was gone');

# --- stop_worker() stops a drain mid-transfer ---------------------------------------

$sink->control('reset');
my @batch = hooks($sink->url('/slow/8000'), map { "Stop $_" } 1 .. 6);
$drain = start_drain($node);
ok(wait_for(sub { received($sink, $batch[0]) == 1 }, 30, 'the first webhook to arrive'),
	'the drain is in the middle of the first transfer (the receiver takes 8 s)');
my $drain_pid = sql($node,
	q{SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = 'nocrm.queue'::regclass AND objid = 1 AND objsubid = 2 AND granted});
like($drain_pid, qr/^\d+$/, 'the running drain holds the drain lock');
is(sql($node, 'SELECT drains_running FROM nocrm.queue_status'), 1, 'queue_status.drains_running says one drain runs');
is(sql($node, 'SELECT nocrm.stop_worker()'), 'f', 'stop_worker() without pg_cron: no job removed (false)');
is(sql($node, q{SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 'nocrm.queue'::regclass AND objid = 1 AND objsubid = 2}),
	0, 'when stop_worker() returns, no drain is running');
is(sql($node, 'SELECT drains_running FROM nocrm.queue_status'), 0, 'queue_status.drains_running: 0');
ok(!finish_drain($drain), 'the stopped drain reports an error');
like($drain->{stderr}, qr/canceling statement due to user request/, 'a cancel');
is(sql($node, 'SELECT count(*) FROM nocrm.queue WHERE state = \'processing\''), 0, 'nothing is left processing');
my $cut = row($batch[0]);
is("$cut->{state}/$cut->{attempts}", 'pending/0',
	'the item cut short is pending again, its attempt given back');
like($cut->{last_error}, qr/^delivery interrupted by a cancel of the drain/, 'with why');
is(sql($node, 'SELECT string_agg(state || \'/\' || attempts, \',\' ORDER BY id) FROM nocrm.queue WHERE id IN (' . join(',', @batch[ 1 .. 5 ]) . ')'),
	'pending/0,pending/0,pending/0,pending/0,pending/0', 'the rest of the batch is pending, untried');
is(scalar @{ $sink->requests }, 1, 'the receiver got only the item in flight');

# While stop_worker()'s transaction is open, no drain starts.
my $stopper = $node->background_psql('postgres');
$stopper->query_safe('BEGIN; SELECT nocrm.stop_worker()');
($rc, $out, $err) = $node->psql('postgres', 'CALL nocrm.drain(0)');
is($rc, 0, 'a drain started meanwhile returns without error');
like($err, qr/NOTICE:  nocrm\.drain\(\) does not start while nocrm\.stop_worker\(\) stops the drains/,
	'with a NOTICE');
$stopper->query_safe('COMMIT');
$stopper->quit;
is(scalar @{ $sink->requests }, 1, 'and sent nothing');

sql($node, 'SELECT nocrm.cancel_queue_item(id) FROM nocrm.queue WHERE id IN (' . join(',', @batch) . ')');

# pg_cancel_backend in the middle of an SMTP transfer (the server waits 6 s
# before its answer to RCPT): the email was not sent, it goes again.
$sink->control('reset');
my $mail_rule = sql($node, <<'SQL');
INSERT INTO nocrm.email_templates (name, subject, body) VALUES ('hello', 'Hello {{lead.title}}', 'Hello');
SELECT nocrm.create_automation(name => 'slow mail', event => 'lead.creation', conditions => '{"status": "lost"}',
  actions => '[{"type": "send_email", "template": "hello", "to": "slow6000-anna@client.example"}]');
SQL
sql($node, q{INSERT INTO nocrm.leads (title, status) VALUES ('Slow mail', 'lost')});
sql($node, "SELECT nocrm.delete_automation($mail_rule)");
my $mail = sql($node, q{SELECT id FROM nocrm.queue WHERE kind = 'email' AND recipient LIKE 'slow6000-%'});
$drain = start_drain($node);
ok(wait_for(sub { sql($node, "SELECT state FROM nocrm.queue WHERE id = $mail") eq 'processing' }, 30,
	'the drain to claim the email'), 'the drain claimed the email');
usleep(1_500_000);    # in the middle of the server's 6 s wait
is( sql($node,
		q{SELECT pg_cancel_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND classid = 'nocrm.queue'::regclass AND objid = 1 AND objsubid = 2}),
	't', 'pg_cancel_backend() of the drain');
my $cancelled_at = time;
ok(!finish_drain($drain), 'the cancelled drain reports an error');
note sprintf('the drain ended %.1f s after the cancel', time - $cancelled_at);
like($drain->{stderr}, qr/canceling statement due to user request/, 'the cancel');
my $m = row($mail);
is("$m->{state}/$m->{attempts}", 'pending/0', 'the email cut short is pending, its attempt given back');
like($m->{last_error}, qr/^delivery interrupted by a cancel of the drain/, 'with why');
is(scalar @{ $sink->mails }, 0, 'the server did not accept it');
drain($node);
is(row($mail)->{state}, 'done', 'the next drain delivers it');
is(scalar @{ $sink->mails }, 1, 'once');

# pg_terminate_backend in the middle of a transfer: recorded the same way, then the session ends.
$sink->control('reset');
my ($term) = hooks($sink->url('/slow/8000'), 'Terminate');
$drain = start_drain($node);
ok(wait_for(sub { received($sink, $term) == 1 }, 30, 'the webhook to arrive'), 'the drain is in the middle of a transfer');
is( sql($node,
		q{SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND classid = 'nocrm.queue'::regclass AND objid = 1 AND objsubid = 2}),
	't', 'pg_terminate_backend() of the drain');
ok(!finish_drain($drain), 'the terminated drain reports an error');
like($drain->{stderr}, qr/terminating connection due to administrator command/, 'the termination');
my $t = row($term);
is("$t->{state}/$t->{attempts}", 'pending/0', 'the row cut short is pending, its attempt given back (recorded before the session ended)');
sql($node, "SELECT nocrm.cancel_queue_item($term)");

set_nocrm_conf($node, request_timeout => 2000);

# --- a hanging receiver and the others ------------------------------------------------

$sink->control('reset');
$other->control('reset');
my @hang = hooks($sink->url('/slow/10000'), map { "Hang $_" } 1 .. 3);
my @fast = hooks($other->url('/fast'), map { "Fast $_" } 1 .. 3);
drain($node);
my %h = map { $_ => row($_) } @hang;
my %f = map { $_ => row($_) } @fast;
is(join(',', map { $f{$_}{state} } @fast), 'done,done,done', 'the other host\'s items were delivered');
is(join(',', map { "$h{$_}{state}/$h{$_}{attempts}" } @hang), 'pending/1,pending/1,pending/1',
	'each hanging item was tried once (timed out after request_timeout) and waits for its retry');
like($h{ $hang[0] }{last_error}, qr/Timeout/i, 'the error says it timed out');
ok( sql($node,
		"SELECT max(delivered_at) < (SELECT min(last_attempt_at) FROM nocrm.queue WHERE id IN ($hang[1], $hang[2])) FROM nocrm.queue WHERE id IN ("
		  . join(',', @fast) . ')') eq 't',
	'the other host\'s items were delivered before the hanging host\'s second item was tried');
is( sql($node,
		"SELECT bool_and(b.last_attempt_at >= a.last_attempt_at + interval '2 s')
		   FROM nocrm.queue a JOIN nocrm.queue b ON b.id = a.id + 1 WHERE a.id IN ($hang[0], $hang[1])"),
	't', 'each hanging item has its own attempt time: the next one was tried after the previous timed out');
is( sql($node,
		'SELECT bool_and(run_at - last_attempt_at BETWEEN interval \'30 s\' + interval \'2 s\' AND interval \'90 s\' + interval \'4 s\') FROM nocrm.queue WHERE id IN ('
		  . join(',', @hang) . ')'),
	't', 'and its retry is counted from its own attempt: run_at = its end + retry_base × [0.5, 1.5)');
is( sql($node,
		'SELECT count(DISTINCT delivered_at) FROM nocrm.queue WHERE delivered_at >= last_attempt_at AND id IN ('
		  . join(',', @fast) . ')'),
	3, 'delivered_at is each item\'s own time, after its own attempt');
for my $id (@fast)
{
	my ($req) = grep { $_->{headers}{'idempotency-key'} eq key_of($id) } @{ $other->requests };
	ok($req && sql($node, "SELECT extract(epoch FROM delivered_at) FROM nocrm.queue WHERE id = $id") >= $req->{received_at} - 0.01,
		"item $id: delivered_at is not before the receiver got it");
}

$sink->stop;
$other->stop;
$node->stop;
done_testing();
