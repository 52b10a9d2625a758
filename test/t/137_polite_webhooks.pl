
# Polite webhooks, against test/sinks/sink.py (each sink is one receiving
# host: 127.0.0.1 and its own port):
#  - a 429 or 503 with Retry-After (delta-seconds or an HTTP-date) sets the
#    item's next attempt to that time (capped by nocrm.webhook_max_retry_after)
#    and pauses the host: its other items wait, untried, in this round and in
#    later ones (nocrm.webhook_hosts), while other hosts go on;
#  - 410 Gone is dead at once;
#  - nocrm.webhook_rate spreads a host's items over time: never dropped,
#    never a failed attempt;
#  - HTTP goes through libcurl's multi interface: a hanging host holds back
#    neither other hosts' webhooks nor the emails of the same round.
use strict;
use warnings;
use utf8;

use FindBin;
use lib "$FindBin::RealBin/lib";

use IPC::Run;
use JSON::PP;
use NocrmTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $fast = start_sink();     # the SMTP server, and a fast webhook host
my $a429 = start_sink();     # answers 429 with Retry-After in seconds
my $b503 = start_sink();     # answers 503 with Retry-After as an HTTP-date
my $capped = start_sink();   # asks for far too long a pause
my $plain = start_sink();    # 410, and 503 without Retry-After
my $rated = start_sink();    # under nocrm.webhook_rate
my $hang = start_sink();     # never answers
my $node = nocrm_node(
	'polite', $fast,
	settings => {
		retry_base => 60,
		retry_max => 3600,
		max_attempts => 5,
		request_timeout => 5000,
		webhook_max_retry_after => 600,
	});

sql($node, q{INSERT INTO nocrm.email_templates (name, subject, body) VALUES ('hello', 'Hello {{lead.title}}', 'Hello')});

# Queues one webhook to $url per title; returns the queue ids in order.
sub hooks
{
	my ($url, @titles) = @_;
	my $before = sql($node, 'SELECT coalesce(max(id), 0) FROM nocrm.queue');
	my $rule = sql($node,
		"SELECT nocrm.create_automation(name => 'hook', event => 'lead.creation',
		   conditions => '{\"status\": \"standby\"}',
		   actions => '[{\"type\": \"webhook\", \"url\": \"$url\"}]')");
	sql($node, "INSERT INTO nocrm.leads (title, status) VALUES ('$_', 'standby')") for @titles;
	sql($node, "SELECT nocrm.delete_automation($rule)");
	return split /\n/, sql($node, "SELECT id FROM nocrm.queue WHERE id > $before ORDER BY id");
}

# Queues one email per recipient.
sub mails
{
	my @to = @_;
	my $before = sql($node, 'SELECT coalesce(max(id), 0) FROM nocrm.queue');
	for my $to (@to)
	{
		my $rule = sql($node,
			"SELECT nocrm.create_automation(name => 'mail', event => 'lead.creation',
			   conditions => '{\"status\": \"standby\"}',
			   actions => '[{\"type\": \"send_email\", \"template\": \"hello\", \"to\": \"$to\"}]')");
		sql($node, "INSERT INTO nocrm.leads (title, status) VALUES ('Mail $to', 'standby')");
		sql($node, "SELECT nocrm.delete_automation($rule)");
	}
	return split /\n/, sql($node, "SELECT id FROM nocrm.queue WHERE id > $before ORDER BY id");
}

sub row
{
	return JSON::PP->new->decode(
		sql($node, "SELECT row_to_json(q) FROM nocrm.queue q WHERE id = $_[0]"));
}

sub st { my $r = row($_[0]); return "$r->{state}/$r->{attempts}" }

sub key_of { sql($node, "SELECT idempotency_key FROM nocrm.queue WHERE id = $_[0]") }

# Requests a sink got for this item.
sub received
{
	my ($s, $id) = @_;
	my $key = key_of($id);
	return grep { ($_->{headers}{'idempotency-key'} // '') eq $key } @{ $s->requests };
}

sub make_due
{
	sql($node, 'UPDATE nocrm.queue SET run_at = now() WHERE state = \'pending\' AND id IN (' . join(',', @_) . ')');
}

sub host_of { my $u = $_[0]->url(''); $u =~ s{^http://}{}; return $u }

# --- 429 with Retry-After in seconds ------------------------------------------------

my ($limited) = hooks($a429->url('/status/429?retry_after=120'), 'Limited');
my ($same_host) = hooks($a429->url('/ok'), 'Same host');
my ($elsewhere) = hooks($fast->url('/elsewhere'), 'Elsewhere');
drain($node);
my $l = row($limited);
is("$l->{state}/$l->{attempts}", 'pending/1', '429: pending after its attempt');
like($l->{last_error}, qr/^HTTP 429 \(Retry-After: 120 s\)/, '429: last_error says what the host asked');
is( sql($node,
		"SELECT run_at - last_attempt_at BETWEEN interval '120 s' AND interval '126 s' FROM nocrm.queue WHERE id = $limited"),
	't', '429 Retry-After: 120: the next attempt is 120 s after this one (not the 60 s backoff)');
my $host = host_of($a429);
is(sql($node, "SELECT pause_status FROM nocrm.webhook_hosts WHERE host = '$host'"), 429,
	'the host is paused in nocrm.webhook_hosts, by its 429');
is( sql($node,
		"SELECT paused_until BETWEEN q.last_attempt_at + interval '120 s' AND q.run_at + interval '1 s'
		   FROM nocrm.webhook_hosts, nocrm.queue q WHERE host = '$host' AND q.id = $limited"),
	't', 'for the 120 s it asked for');
my $s = row($same_host);
is("$s->{state}/$s->{attempts}", 'pending/0', 'the same host\'s other item is pending, its attempt not used');
is($s->{last_error}, undef, 'with no error');
is(scalar(received($a429, $same_host)), 0, 'and it was not sent');
is( sql($node,
		"SELECT q.run_at >= w.paused_until - interval '1 s' FROM nocrm.queue q, nocrm.webhook_hosts w
		  WHERE q.id = $same_host AND w.host = '$host'"),
	't', 'it waits for the end of the pause');
is(st($elsewhere), 'done/1', 'another host\'s item of the same round was delivered');

# a later round (another session: the pause comes from nocrm.webhook_hosts)
make_due($same_host);
drain($node);
is(st($same_host), 'pending/0', 'a later drain does not send to the paused host either');
is(scalar(received($a429, $same_host)), 0, 'nothing reached it');
sql($node, "UPDATE nocrm.webhook_hosts SET paused_until = now() - interval '1 s' WHERE host = '$host'");
make_due($same_host);
drain($node);
is(st($same_host), 'done/1', 'once the pause is over, it is delivered in one attempt');
sql($node, "SELECT nocrm.cancel_queue_item($limited)");

# --- 503 with Retry-After as an HTTP-date --------------------------------------------

my ($unavailable) = hooks($b503->url('/status/503?retry_after_date=300'), 'Unavailable');
drain($node);
my $u = row($unavailable);
is("$u->{state}/$u->{attempts}", 'pending/1', '503: pending after its attempt');
like($u->{last_error}, qr/^HTTP 503 \(Retry-After: (29[89]|300) s\)/, '503: the HTTP-date was read as about 300 s');
is( sql($node,
		"SELECT run_at - last_attempt_at BETWEEN interval '298 s' AND interval '306 s' FROM nocrm.queue WHERE id = $unavailable"),
	't', '503 Retry-After: <HTTP-date in 300 s>: the next attempt is then');
is(sql($node, "SELECT pause_status FROM nocrm.webhook_hosts WHERE host = '" . host_of($b503) . "'"), 503,
	'the host is paused, by its 503');
sql($node, "SELECT nocrm.cancel_queue_item($unavailable)");

# --- a Retry-After beyond nocrm.webhook_max_retry_after -------------------------------

my ($greedy) = hooks($capped->url('/status/429?retry_after=999999'), 'Greedy');
drain($node);
is(st($greedy), 'pending/1', 'a 429 asking for 11 days: pending');
is( sql($node,
		"SELECT run_at - last_attempt_at BETWEEN interval '600 s' AND interval '606 s' FROM nocrm.queue WHERE id = $greedy"),
	't', 'retried after nocrm.webhook_max_retry_after (600 s), not 11 days');
is( sql($node,
		"SELECT w.paused_until <= q.run_at + interval '1 s' FROM nocrm.webhook_hosts w, nocrm.queue q
		  WHERE w.host = '" . host_of($capped) . "' AND q.id = $greedy"),
	't', 'and the host is paused no longer than that');
sql($node, "SELECT nocrm.cancel_queue_item($greedy)");

# --- 410 Gone; 503 without Retry-After ----------------------------------------------

my ($gone, $busy) = (hooks($plain->url('/status/410'), 'Gone'), hooks($plain->url('/status/503'), 'Busy'));
drain($node);
my $g = row($gone);
is("$g->{state}/$g->{attempts}", 'dead/1', '410 Gone: dead at once');
like($g->{last_error}, qr/^HTTP 410 Gone: the receiver says \S+ no longer exists; not retried/,
	'410: last_error says the URL is gone for good');
is(scalar(received($plain, $gone)), 1, '410: sent once');
is(sql($node, "SELECT count(*) FROM nocrm.dead_letters WHERE id = $gone"), 1, '410: in dead_letters');
is(st($busy), 'pending/1', '503 without Retry-After: pending');
is( sql($node,
		"SELECT run_at - last_attempt_at BETWEEN interval '29 s' AND interval '96 s' FROM nocrm.queue WHERE id = $busy"),
	't', '503 without Retry-After: the usual backoff (retry_base 60 s × [0.5, 1.5))');
is(sql($node, "SELECT count(*) FROM nocrm.webhook_hosts WHERE host = '" . host_of($plain) . "'"), 0,
	'and no pause of the host');
sql($node, "SELECT nocrm.cancel_queue_item($busy)");

# --- nocrm.webhook_rate -------------------------------------------------------------

set_nocrm_conf($node, webhook_rate => '3/min');
my @rated = hooks($rated->url('/rated'), map { "Rated $_" } 1 .. 5);
drain($node);
is(join(',', map { st($_) } @rated), 'done/1,done/1,done/1,pending/0,pending/0',
	'3/min: the first three go at once, the other two wait untried');
is(scalar @{ $rated->requests }, 3, 'the host got three requests');
is(sql($node, 'SELECT count(*) FROM nocrm.queue WHERE last_error IS NOT NULL AND id IN (' . join(',', @rated) . ')'),
	0, 'no item has an error: waiting for the rate is no failure');
is( sql($node,
		"SELECT (b.run_at - a.run_at) BETWEEN interval '19 s' AND interval '21 s'
		        AND a.run_at > now() + interval '5 s'
		   FROM nocrm.queue a, nocrm.queue b WHERE a.id = $rated[3] AND b.id = $rated[4]"),
	't', 'they are spread: the fourth about 20 s on, the fifth 20 s after it')
  or diag sql($node, "SELECT id, run_at - now(), last_attempt_at, run_at FROM nocrm.queue WHERE id IN ($rated[3], $rated[4])");
make_due(@rated[ 3, 4 ]);
drain($node);
is(join(',', map { st($_) } @rated[ 3, 4 ]), 'pending/0,pending/0',
	'made due at once, a new drain still keeps to the rate (nocrm.webhook_hosts)');
is(scalar @{ $rated->requests }, 3, 'the host still got three requests');
set_nocrm_conf($node, webhook_rate => '');
make_due(@rated[ 3, 4 ]);
drain($node);
is(join(',', map { st($_) } @rated), 'done/1,done/1,done/1,done/1,done/1',
	'without the limit the two are delivered: five items, five attempts, none failed');
is(scalar @{ $rated->requests }, 5, 'each reached the host once');

# --- a hanging host, other hosts and the mail of the same round ------------------------

$fast->control('reset');
my @hung = hooks($hang->url('/hang'), map { "Hung $_" } 1 .. 3);
my @quick = hooks($fast->url('/quick'), map { "Quick $_" } 1 .. 3);
my @mail = mails(map { "m$_\@client.example" } 1 .. 3);
is(sql($node, "SELECT count(*) FROM nocrm.queue WHERE state = 'pending' AND run_at <= now()"), 9,
	'nine items are due: three to a hanging host (queued first), three to a fast one, three emails');
drain($node);
my $h1 = row($hung[0]);
is("$h1->{state}/$h1->{attempts}", 'pending/1', 'the first hanging item was tried and timed out');
like($h1->{last_error}, qr/Timeout/i, 'its error says so');
is(join(',', map { st($_) } @quick), 'done/1,done/1,done/1', 'the fast host\'s three were delivered');
is(join(',', map { st($_) } @mail), 'done/1,done/1,done/1', 'the three emails were delivered');
is(scalar @{ $fast->mails }, 3, 'the SMTP server got three messages');
# The hanging attempt cannot end before request_timeout after it started:
# what arrived before that was sent while it hung, not after.
my $hang_end = sql($node, "SELECT extract(epoch FROM last_attempt_at + interval '5 s') FROM nocrm.queue WHERE id = $hung[0]");
is(scalar(grep { $_->{received_at} < $hang_end } @{ $fast->requests }), 3,
	'the fast host got its three while the hanging request was still waiting');
is(scalar(grep { $_->{received_at} < $hang_end } @{ $fast->mails }), 3,
	'and the SMTP server its three messages');
is( sql($node,
		"SELECT count(*) FROM nocrm.queue WHERE delivered_at < (SELECT last_attempt_at + interval '5 s' FROM nocrm.queue WHERE id = $hung[0])
		    AND id IN (" . join(',', @quick, @mail) . ')'),
	6, 'all six were recorded as delivered before the hanging attempt could end');
# drain(0) goes on while items are due: the hanging host's others, one a round
is(join(',', map { st($_) } @hung[ 1, 2 ]), 'pending/1,pending/1',
	'the hanging host\'s other items were each tried once, in later rounds');
is( sql($node,
		"SELECT bool_and(b.last_attempt_at >= a.last_attempt_at + interval '5 s')
		   FROM nocrm.queue a JOIN nocrm.queue b ON b.id = a.id + 1 WHERE a.id IN ($hung[0], $hung[1])"),
	't', 'one after the other: a host that hangs gets one request in flight (nocrm.webhook_host_concurrency = 1)');
is(scalar @{ $hang->requests }, 3, 'the hanging host got three requests in all');

# --- nocrm.webhook_host_concurrency ----------------------------------------------------

set_nocrm_conf($node, webhook_host_concurrency => 3);
$rated->control('reset');
my @together = hooks($rated->url('/slow/1500'), map { "Together $_" } 1 .. 3);
drain($node);
is(join(',', map { st($_) } @together), 'done/1,done/1,done/1', 'concurrency 3: the three slow items were delivered');
my $first_answer = sql($node,
	'SELECT extract(epoch FROM min(delivered_at)) FROM nocrm.queue WHERE id IN (' . join(',', @together) . ')');
is(scalar(grep { $_->{received_at} < $first_answer } @{ $rated->requests }), 3,
	'all three were in flight at once: each reached the host before the first answer (the host takes 1.5 s)');

# --- a cancel stops a round with several hosts in flight --------------------------------

$hang->control('reset');
$fast->control('reset');
set_nocrm_conf($node, request_timeout => 60000);
my @stuck = (hooks($hang->url('/hang'), 'Stuck 1', 'Stuck 2'), hooks($fast->url('/slow/60000'), 'Stuck 3'));
my $d = start_drain($node);
ok( wait_for(sub { @{ $hang->requests } == 2 && @{ $fast->requests } == 1 }, 30, 'three requests in flight'),
	'three requests are in flight at once, to two hosts');
is(sql($node, 'SELECT nocrm.stop_worker()'), 'f', 'stop_worker() returns');
ok(!finish_drain($d), 'the stopped drain reports an error');
like($d->{stderr}, qr/canceling statement due to user request/, 'a cancel');
is(join(',', map { st($_) } @stuck), 'pending/0,pending/0,pending/0',
	'every item cut short is pending again, its attempt given back');
is( sql($node,
		'SELECT count(*) FROM nocrm.queue WHERE last_error LIKE \'delivery interrupted by a cancel of the drain%\' AND id IN ('
		  . join(',', @stuck) . ')'),
	3, 'each says it was interrupted');
is(sql($node, "SELECT count(*) FROM nocrm.queue WHERE state = 'processing'"), 0, 'nothing is left processing');
sql($node, 'SELECT nocrm.cancel_queue_item(id) FROM nocrm.queue WHERE id IN (' . join(',', @stuck) . ')');

# --- the mail connection in the multi handle: a reused connection the server
# closes is reopened at once, while a webhook host hangs -------------------------------

set_nocrm_conf($node, request_timeout => 5000);
for my $mode ('', '--close')
{
	my $dir = PostgreSQL::Test::Utils::tempdir('smtp421');
	my $server = IPC::Run::start([ 'python3', "$FindBin::RealBin/../sinks/smtp_421.py", '--dir', $dir, $mode ? $mode : () ],
		'<', \undef, '>', "$dir/out.log", '2>', "$dir/err.log");
	ok(wait_for(sub { -s "$dir/port" }, 20, 'smtp_421.py port'), "smtp_421.py $mode runs");
	my $port = slurp_file("$dir/port");
	chomp $port;
	set_nocrm_conf($node, smtp_url => "smtp://127.0.0.1:$port");
	$hang->control('reset');
	my @stalled = hooks($hang->url('/hang'), 'Stalled');
	my @once = mails(map { "once$_\@client.example" } 1 .. 3);
	my @utf8 = $mode ? () : mails('zoë@example.com', 'once4@client.example');
	drain($node);
	my $what = $mode ? 'closed without a word' : 'ended with 421';
	is(join(',', map { st($_) } @once), 'done/1,done/1,done/1',
		"reused connection $what: each email sent at once on a new one, in its first attempt, while a webhook hung");
	my @got = map { JSON::PP->new->decode($_) } split /\n/, slurp_file("$dir/mail.jsonl");
	is(scalar(keys %{ { map { $_->{connection} => 1 } @got } }), scalar(@got), 'one message per connection');
	if (!$mode)
	{
		is(join(',', map { row($_)->{state} } @utf8), 'dead,done',
			'no SMTPUTF8 offered: the UTF-8 address is dead before its message is sent, the next email delivered');
		is(scalar @got, 4, 'the server received the four ASCII messages');
	}
	is(st($stalled[0]), 'pending/1', 'the hanging webhook timed out meanwhile');
	sql($node, "SELECT nocrm.cancel_queue_item($stalled[0])");
	$server->kill_kill;
}

$_->stop for ($fast, $a429, $b503, $capped, $plain, $rated, $hang);
$node->stop;
done_testing();
