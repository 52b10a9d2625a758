# The background worker (shared_preload_libraries = 'nocrm_automation',
# nocrm.worker_database) drains without any CALL and without pg_cron:
#  - an email queued by a committed lead reaches the sink;
#  - a rolled-back transaction queues and sends nothing;
#  - a delayed action is run after its due time, without a minute's polling;
#  - a worker killed with SIGKILL comes back (crash restart) and delivers;
#  - nocrm.stop_worker() stops its run and no drain starts while it holds
#    its lock; nocrm.drain_enabled = off stops it sending (reload);
#  - nocrm.worker_database = '' (reload) stops the worker, and naming the
#    database again starts it.
# No timing assertions beyond "within 30 s".
use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";

use NocrmTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $sink = start_sink();
my $node = nocrm_node(
	'bgworker', $sink,
	settings => { worker_database => 'postgres' },
	conf => "shared_preload_libraries = 'nocrm_automation'\nrestart_after_crash = on\n");

sub worker_pid
{
	return sql($node,
		"SELECT coalesce((SELECT pid FROM pg_stat_activity WHERE backend_type = 'nocrm drain worker'), 0)");
}

# How many emails to $rcpt (now@ by default) the sink received for the lead titled $title.
sub mails_for
{
	my ($title, $rcpt) = @_;
	$rcpt //= 'now@client.example';
	return scalar grep {
		my $m = $_;
		($m->{data} // '') =~ /\Q$title\E/ && grep { $_ eq $rcpt } @{ $m->{rcpt_tos} }
	} @{ $sink->mails };
}

sub state_of
{
	my ($title) = @_;
	return sql($node,
		"SELECT string_agg(q.state, ',' ORDER BY q.id) FROM nocrm.queue q JOIN nocrm.leads l ON l.id = q.lead_id WHERE l.title = '$title'");
}

ok(wait_for(sub { worker_pid() != 0 }, 30, 'the worker in pg_stat_activity'), 'the worker runs');
is(sql($node, "SELECT datname FROM pg_stat_activity WHERE backend_type = 'nocrm drain worker'"),
	'postgres', 'it is connected to nocrm.worker_database');

sql($node, q{SELECT nocrm.create_automation(name => 'mail', event => 'lead.creation',
  actions => '[{"type": "send_email", "template": "notification", "to": "now@client.example"}]')});
sql($node, q{SELECT nocrm.create_automation(name => 'later', event => 'lead.creation',
  conditions => '{"status": "standby"}',
  actions => '[{"type": "send_email", "template": "notification", "to": "later@client.example", "delay": "2 seconds"}]')});

# --- a committed lead: delivered without any CALL ---------------------------------

sql($node, "INSERT INTO nocrm.leads (title) VALUES ('Committed')");
ok(wait_for(sub { mails_for('Committed') == 1 }, 30, 'the email of the committed lead'),
	'an email queued by a committed lead reaches the sink without a CALL');
ok(wait_for(sub { state_of('Committed') eq 'done' }, 30, 'its queue row done'), 'and its queue row is done');

# --- a rollback: nothing queued, nothing sent -------------------------------------

sql($node, "BEGIN; INSERT INTO nocrm.leads (title) VALUES ('Rolled back'); ROLLBACK;");
sql($node, "INSERT INTO nocrm.leads (title) VALUES ('After rollback')");
ok(wait_for(sub { mails_for('After rollback') == 1 }, 30, 'the email of the next lead'),
	'the next committed lead is delivered');
is(sql($node, "SELECT count(*) FROM nocrm.leads WHERE title = 'Rolled back'"), '0', 'the rolled-back lead is gone');
is(mails_for('Rolled back'), 0, 'the rolled-back lead sent nothing');
is(scalar @{ $sink->mails }, 2, 'the sink has the two committed leads\' emails only');

# --- a delayed action: run after its due time, not a minute later ------------------

sql($node, "INSERT INTO nocrm.leads (title, status) VALUES ('Delayed', 'standby')");
ok(wait_for(sub { mails_for('Delayed', 'later@client.example') == 1 }, 30, 'the delayed email'),
	'the delayed action ran after its due time and its email reached the sink');
is(sql($node, "SELECT bool_and(q.delivered_at >= l.created_at + interval '2 seconds')
  FROM nocrm.queue q JOIN nocrm.leads l ON l.id = q.lead_id
 WHERE l.title = 'Delayed' AND q.recipient = 'later\@client.example'"), 't',
	'the delayed email left no earlier than its due time');

# --- SIGKILL of the worker: crash restart, then it delivers again -----------------

my $pid = worker_pid();
is(kill('KILL', $pid), 1, 'SIGKILL sent to the worker');
ok(wait_for(sub { $node->psql('postgres', 'SELECT 1') == 0 && worker_pid() != 0 && worker_pid() != $pid },
		60, 'the worker after the crash restart'),
	'the worker is back after the crash restart');
sql($node, "INSERT INTO nocrm.leads (title) VALUES ('After crash')");
ok(wait_for(sub { mails_for('After crash') == 1 }, 30, 'the email after the crash'),
	'the restarted worker delivers');

# --- stop_worker(): the worker's run is stopped, and none starts while it holds its lock --

my ($in, $out, $err) = ('', '', '');
my $stopper = IPC::Run::start(
	[ 'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres') ],
	'<', \$in, '>', \$out, '2>', \$err);
$in .= "BEGIN;\nSELECT nocrm.stop_worker();\nSELECT 'stopped';\n";
ok(wait_for(sub { $stopper->pump_nb; $out =~ /stopped/ }, 30, 'stop_worker() returning'),
	'stop_worker() returns (the worker does not hold it up)');
sql($node, "INSERT INTO nocrm.leads (title) VALUES ('While stopped')");
sleep 3;    # long enough for a woken worker to send it, were it not stopped
is(mails_for('While stopped'), 0, 'while stop_worker() holds its lock, the worker sends nothing');
is(state_of('While stopped'), 'pending', 'the item stays pending');
$in .= "COMMIT;\n\\q\n";
$stopper->finish;
ok(wait_for(sub { mails_for('While stopped') == 1 }, 30, 'the email after stop_worker() ended'),
	'once stop_worker() has committed, the worker (still configured) resumes');

# --- stop_worker() in the middle of a run: the run ends, the worker goes on ----------

sql($node, q{SELECT nocrm.create_automation(name => 'slow', event => 'lead.creation',
  conditions => '{"status": "lost"}',
  actions => '[{"type": "send_email", "template": "notification", "to": "slow8000-x@client.example"}]')});
my $before = worker_pid();
sql($node, "INSERT INTO nocrm.leads (title, status) VALUES ('Slow', 'lost')");
ok(wait_for(sub { sql($node, "SELECT drains_running FROM nocrm.queue_status") eq '1'
		  && sql($node, "SELECT count(*) FROM nocrm.queue WHERE recipient = 'slow8000-x\@client.example' AND state = 'processing'") eq '1' },
		30, 'the worker sending to the slow receiver'),
	'the worker is in the middle of a slow delivery');
sql($node, 'SELECT nocrm.stop_worker()');
is(sql($node, "SELECT drains_running FROM nocrm.queue_status"), '0', 'stop_worker() ended the run');
is(sql($node, "SELECT state FROM nocrm.queue WHERE recipient = 'slow8000-x\@client.example'"), 'pending',
	'the item cut short is pending again');
sql($node, "UPDATE nocrm.automations SET enabled = false WHERE name = 'slow'");
sql($node, "SELECT nocrm.cancel_queue_item(id) FROM nocrm.queue WHERE recipient = 'slow8000-x\@client.example'");
is(worker_pid(), $before, 'the worker process is the same (the cancel ended the run, not the worker)');
sql($node, "INSERT INTO nocrm.leads (title) VALUES ('After cancel')");
ok(wait_for(sub { mails_for('After cancel') == 1 }, 30, 'the email after the cancelled run'),
	'and its next run delivers');
sql($node, "SELECT pg_cancel_backend(" . worker_pid() . ")");    # idle: nothing to cancel
sleep 1;
is(worker_pid(), $before, 'a cancel while the worker is idle does not end it');

# --- nocrm.drain_enabled = off (reload): it sends nothing; on again: it does --------

NocrmTest::set_nocrm_conf($node, drain_enabled => 'off');
sql($node, "INSERT INTO nocrm.leads (title) VALUES ('Drain off')");
sleep 3;
is(state_of('Drain off'), 'pending', 'nocrm.drain_enabled = off: the worker leaves the item pending');
is(mails_for('Drain off'), 0, 'and sends nothing');
NocrmTest::set_nocrm_conf($node, drain_enabled => 'auto');
ok(wait_for(sub { mails_for('Drain off') == 1 }, 30, 'the email after drain_enabled = auto'),
	'after the reload back to auto the worker sends it (within its longest sleep)');

# --- nocrm.worker_database = '' (reload): no worker; the database again: back ------------

NocrmTest::set_nocrm_conf($node, worker_database => '');
ok(wait_for(sub { worker_pid() == 0 }, 30, 'the worker gone'),
	"nocrm.worker_database = '' and a reload: the worker leaves the database");
sql($node, "INSERT INTO nocrm.leads (title) VALUES ('No worker')");
sleep 3;
is(state_of('No worker'), 'pending', 'without a worker the item stays pending');
NocrmTest::set_nocrm_conf($node, worker_database => 'postgres');
ok(wait_for(sub { mails_for('No worker') == 1 }, 60, 'the email after the worker came back'),
	'naming the database again starts the worker, which sends the item');

like(slurp_file($node->logfile), qr/nocrm drain worker started for database "postgres"/,
	'the worker logs the database it drains');

$node->stop;
done_testing();
