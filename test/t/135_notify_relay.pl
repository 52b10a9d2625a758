# Browser notifications' NOTIFYs sent by the notify relay worker
# (shared_preload_libraries = 'nocrm_automation', nocrm.worker_database)
# after the user's transaction committed, instead of by that transaction:
#  - the same channel and payload, from the relay's pid, not the inserter's;
#  - nothing for a rolled-back transaction or savepoint;
#  - a bulk statement: 1,000 NOTIFYs, then one per user and batch, as before;
#  - a transaction with more payloads than the ring holds sends them itself;
#  - PREPARE TRANSACTION of a notifying transaction fails as it always did;
#  - with the relay off (nocrm.worker_database = ''), the transaction sends
#    them itself.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";

use NocrmTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $sink = start_sink();
my $node = nocrm_node(
	'relay', $sink,
	settings => { worker_database => 'postgres' },
	conf => "shared_preload_libraries = 'nocrm_automation'\nmax_prepared_transactions = 2\n");

sub relay_pid
{
	return sql($node,
		"SELECT coalesce((SELECT pid FROM pg_stat_activity WHERE backend_type = 'nocrm notify relay'), 0)");
}

sub wait_until
{
	my ($what, $cond) = @_;
	for (1 .. 300)
	{
		return 1 if $cond->();
		usleep(100_000);
	}
	fail("timed out waiting for $what");
	return 0;
}

sql($node, q{
	INSERT INTO nocrm.users (name, email) VALUES ('Anna', 'anna@example.com');
	SELECT nocrm.create_automation(name => 'tell Anna', event => 'lead.creation',
	  actions => '[{"type": "notify", "user": "anna@example.com", "message": "New: {{lead.title}}"}]');
});
wait_until('the relay', sub { relay_pid() != 0 });
my $relay = relay_pid();

my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN nocrm_notifications');
my $heard = '';

# Notifications heard until $pattern shows up (psql prints them after a command).
sub listen_until
{
	my ($pattern) = @_;
	wait_until("a notification matching $pattern", sub {
		$heard .= $listener->query_safe('SELECT 1');
		return $heard =~ $pattern;
	});
}

sub payloads_from
{
	my ($text) = @_;
	my @p;
	while ($text =~ /Asynchronous notification "nocrm_notifications" with payload "(.*)" received from server process with PID (\d+)\./g)
	{
		push @p, [ $1, $2 ];
	}
	return @p;
}

my $inserter = sql($node, q{
	INSERT INTO nocrm.leads (id, title) VALUES (100001, 'Ferrari');
	BEGIN;
	INSERT INTO nocrm.leads (id, title) VALUES (100002, 'Never');
	ROLLBACK;
	BEGIN;
	SAVEPOINT s;
	INSERT INTO nocrm.leads (id, title) VALUES (100003, 'Rolled back to the savepoint');
	ROLLBACK TO s;
	INSERT INTO nocrm.leads (id, title) VALUES (100004, 'Kept');
	COMMIT;
	SELECT pg_backend_pid();
});
listen_until(qr/"lead_id" : 100004/);
my @p = payloads_from($heard);
is(scalar @p, 2, 'two notifications: none for the rolled-back lead or savepoint') or diag $heard;
my ($id1, $id4) = split /\n/, sql($node, 'SELECT id FROM nocrm.notifications ORDER BY id');
is($p[0][0],
	qq({"id" : $id1, "user_id" : 1, "lead_id" : 100001, "automation_id" : 1, "message" : "New: Ferrari", "truncated" : false}),
	'the payload is the one the transaction would have sent');
like($p[1][0], qr/^\{"id" : $id4, "user_id" : 1, "lead_id" : 100004, /, 'the savepoint\'s survivor is notified');
is($p[0][1], $relay, 'sent by the relay worker');
isnt($p[0][1], $inserter, 'not by the inserting backend');

# A bulk statement: the same NOTIFYs as without the relay.
$heard = '';
sql($node, "INSERT INTO nocrm.leads (title) SELECT 'Bulk ' || g FROM generate_series(1, 1500) g");
listen_until(qr/"bulk" : true/);
@p = payloads_from($heard);
is(scalar(grep { $_->[0] =~ /"message"/ } @p), 1000, '1,000 notifications with a NOTIFY each');
is(scalar(grep { $_->[0] =~ /"count" : 500, .*"bulk" : true/ } @p), 1, 'and one bulk NOTIFY for the other 500');
is(scalar(grep { $_->[1] != $relay } @p), 0, 'all of them from the relay');

# More than the relay's ring holds (1 MB): that transaction sends its own.
$heard = '';
my $big = $listener->query_safe(q{
	INSERT INTO nocrm.leads (title) SELECT 'Big ' || g || ' ' || repeat('x', 1000) FROM generate_series(1, 1100) g;
	SELECT 'pid=' || pg_backend_pid();
});
$heard .= $big;
listen_until(qr/"bulk" : true/);
my ($big_pid) = $big =~ /pid=(\d+)/;
@p = payloads_from($heard);
is(scalar(grep { $_->[0] =~ /"message" : "New: Big / } @p), 1000, 'a transaction too big for the ring: 1,000 NOTIFYs each');
is(scalar(grep { $_->[1] != $big_pid } @p), 0, 'all sent by the transaction itself');

# PREPARE TRANSACTION cannot hold a NOTIFY: it fails as before, and rolls back.
my ($rc, $out, $err) = $node->psql('postgres', q{
	BEGIN;
	INSERT INTO nocrm.leads (id, title) VALUES (100005, 'Prepared');
	PREPARE TRANSACTION 'p1';
});
like($err, qr/cannot PREPARE a transaction that has executed LISTEN, UNLISTEN, or NOTIFY/,
	'PREPARE of a notifying transaction is refused');
is(sql($node, 'SELECT count(*) FROM nocrm.leads WHERE id = 100005'), '0', 'and the lead is not there');

# The relay off: the transaction sends its NOTIFY itself.
set_nocrm_conf($node, worker_database => '');
wait_until('the relay to stop', sub { relay_pid() == 0 });
$heard = '';
my $own = $listener->query_safe(q{
	INSERT INTO nocrm.leads (id, title) VALUES (100006, 'Sent by its own transaction');
	SELECT 'pid=' || pg_backend_pid();
});
$heard .= $own;
listen_until(qr/"lead_id" : 100006/);
my ($pid) = $own =~ /pid=(\d+)/;
@p = grep { $_->[0] =~ /"lead_id" : 100006/ } payloads_from($heard);
is(scalar @p, 1, 'one notification without the relay');
is($p[0][1], $pid, 'sent by the inserting backend itself');

$listener->quit;
$node->stop;
$sink->stop;
done_testing();
