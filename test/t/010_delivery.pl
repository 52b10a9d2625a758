
# Delivery by CALL nocrm.drain() against the SMTP/HTTP sink: what is sent,
# exactly; nothing for a rollback; no header injection; delays; retries with
# backoff, dead letters and requeueing; an SMTP outage; queue retention.
use strict;
use warnings;
use utf8;

use FindBin;
use lib "$FindBin::RealBin/lib";

use Digest::SHA qw(hmac_sha256_hex);
use Encode qw(decode encode_utf8);
use JSON::PP;
use MIME::Base64 qw(decode_base64);
use NocrmTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $sink = start_sink();
my $node = nocrm_node(
	'delivery', $sink,
	settings => {
		max_attempts => 3,
		retry_base => 60,
		retry_max => 3600,
		webhook_secret => 'test-secret',
	});
my $json = JSON::PP->new->canonical;

sql($node, <<'SQL');
INSERT INTO nocrm.users (name, email) VALUES ('Zoë Müller', 'zoe@example.com');
INSERT INTO nocrm.email_templates (name, subject, body) VALUES
  ('quote_followup', 'Quote for {{lead.title}}',
   E'Hello {{owner.name}},\nyour quote for {{lead.title}} is ready.\n\n-- \n{{butler.name}}');
SQL
my $zoe = sql($node, "SELECT id FROM nocrm.users WHERE email = 'zoe\@example.com'");

# --- helpers ---------------------------------------------------------------

sub sql_literal
{
	my ($s) = @_;
	$s =~ s/'/''/g;
	return "'$s'";
}

# Creates an automation on lead.creation with these actions, runs $leads_sql
# (which inserts leads), deletes the automation unless keep, and returns the
# ids of the queue items that this made.
sub queue_for
{
	my ($actions, $leads_sql, %opt) = @_;
	my $before = sql($node, 'SELECT coalesce(max(id), 0) FROM nocrm.queue');
	my $rule = sql($node,
		    "SELECT nocrm.create_automation(name => 'test', event => 'lead.creation', actions => "
		  . sql_literal($json->encode($actions)) . ')');
	sql($node, $leads_sql);
	sql($node, "SELECT nocrm.delete_automation($rule)") unless $opt{keep};
	return split /\n/,
	  sql($node, "SELECT id FROM nocrm.queue WHERE id > $before ORDER BY id");
}

# A queue row as a hash.
sub item
{
	my ($id) = @_;
	return $json->decode(
		sql($node, "SELECT row_to_json(q) FROM nocrm.queue q WHERE id = $id"));
}

sub states
{
	my @ids = @_;
	return sql($node,
		    'SELECT string_agg(state, \',\' ORDER BY id) FROM nocrm.queue WHERE id IN ('
		  . join(',', @ids) . ')');
}

# Makes these pending items due now.
sub make_due
{
	my @ids = @_;
	sql($node,
		'UPDATE nocrm.queue SET run_at = now() WHERE state = \'pending\' AND id IN ('
		  . join(',', @ids) . ')');
	return;
}

sub mails_to
{
	my ($rcpt) = @_;
	return grep { grep { $_ eq $rcpt } @{ $_->{rcpt_tos} } } @{ $sink->mails };
}

sub requests_to
{
	my ($path) = @_;
	return grep { $_->{path} eq $path } @{ $sink->requests };
}

# --- a rolled-back transaction sends nothing ---------------------------------

my $all_kinds = [
	{ type => 'send_email', template => 'quote_followup' },
	{
		type => 'notify',
		user => 'owner',
		channels => [ 'email', 'mobile' ],
		message => 'New lead {{lead.title}}'
	},
	{ type => 'webhook', url => $sink->url('/hook') },
];
my $rule = sql($node,
	    "SELECT nocrm.create_automation(name => 'all kinds', event => 'lead.creation', actions => "
	  . sql_literal($json->encode($all_kinds)) . ')');

my $in_tx = sql($node, <<"SQL");
BEGIN;
INSERT INTO nocrm.leads (title, user_id, contact_email)
  VALUES ('Never', $zoe, 'never\@client.example');
SELECT string_agg(kind, ',' ORDER BY id) FROM nocrm.queue;
ROLLBACK;
SQL
is($in_tx, 'email,email,mobile,webhook',
	'inside the transaction the automation queued an email, a notify email, a push and a webhook');
is(sql($node, 'SELECT count(*) FROM nocrm.queue'),
	0, 'after ROLLBACK the queue is empty');
drain($node);
is(scalar @{ $sink->mails }, 0, 'rolled back: the SMTP sink received nothing');
is(scalar @{ $sink->requests },
	0, 'rolled back: the HTTP sink received nothing');

# --- a commit delivers exactly the rendered messages -------------------------

my $title = 'Caffè Ü';
sql($node, <<"SQL");
INSERT INTO nocrm.leads (title, user_id, contact_email)
  VALUES ('$title', $zoe, 'anna\@client.example');
SQL
my $lead = sql($node, "SELECT id FROM nocrm.leads WHERE title = '$title'");
sql($node, "SELECT nocrm.delete_automation($rule)");
my %key = map { split /\|/ }
  split /\n/, sql($node,
	"SELECT CASE WHEN kind = 'email' AND recipient <> 'anna\@client.example' THEN 'notify-email'
	            ELSE kind END, idempotency_key
	   FROM nocrm.queue WHERE lead_id = $lead");
is(join(',', sort keys %key), 'email,mobile,notify-email,webhook',
	'commit: four items queued');

drain($node);
is(sql($node, "SELECT string_agg(DISTINCT state, ',') FROM nocrm.queue WHERE lead_id = $lead"),
	'done', 'every item of the committed lead is done');
is(sql($node, "SELECT count(*) FROM nocrm.queue WHERE lead_id = $lead AND attempts = 1 AND delivered_at IS NOT NULL"),
	4, 'each delivered in one attempt, with delivered_at');
is(scalar @{ $sink->mails }, 2, 'the SMTP sink received two messages');
is(scalar @{ $sink->requests },
	2, 'the HTTP sink received two requests (push and webhook)');

# The send_email message
my ($quote) = mails_to('anna@client.example');
ok($quote, 'the quote email reached the lead contact');
SKIP:
{
	skip 'no quote email', 12 unless $quote;
	is_deeply($quote->{rcpt_tos}, ['anna@client.example'], 'envelope: one recipient, the contact');
	is($quote->{mail_from}, 'butler@nocrm.test', 'envelope sender is nocrm.mail_from');
	my $m = parse_email($quote->{data});
	is($m->{header}{from}, 'butler@nocrm.test', 'From is nocrm.mail_from');
	is($m->{header}{to}, 'anna@client.example', 'To is the contact');
	is($m->{header}{subject}, "Quote for $title", 'Subject is the rendered template subject (RFC 2047 decoded)');
	like((grep { defined $_->[0] && $_->[0] eq 'Subject' } @{ $m->{headers} })[0][1],
		qr/^=\?UTF-8\?B\?/, 'the non-ASCII Subject is sent as encoded words');
	is($m->{header}{'message-id'}, "<$key{email}\@nocrm.test>",
		'Message-ID is <idempotency_key@domain of mail_from>');
	is($quote->{message_id}, "<$key{email}\@nocrm.test>", 'the sink parsed the same Message-ID');
	like($m->{header}{'content-type'}, qr{^text/plain; charset=UTF-8$}i, 'text/plain UTF-8');
	is($m->{header}{'content-transfer-encoding'}, 'base64', 'base64 body');
	is($m->{body},
		"Hello Zoë Müller,\nyour quote for $title is ready.\n\n-- \nThe Butler",
		'the decoded body is the rendered template');
	is($m->{body},
		sql($node, "SELECT body FROM nocrm.render_template('quote_followup', $lead)"),
		'and equals nocrm.render_template()');
}

# The notify email
my ($note) = mails_to('zoe@example.com');
ok($note, 'the notify email reached the owner');
SKIP:
{
	skip 'no notify email', 4 unless $note;
	my $m = parse_email($note->{data});
	is($m->{header}{subject}, "$title: New lead $title", 'notify email Subject (notification template)');
	is($m->{header}{'message-id'}, "<$key{'notify-email'}\@nocrm.test>",
		'notify email Message-ID is its idempotency key');
	is($m->{body},
		sql($node, "SELECT body FROM nocrm.render_template('notification', $lead, 'New lead $title')"),
		'notify email body is the rendered notification template');
	like($m->{body}, qr/^New lead \Q$title\E\n\nLead: \Q$title\E .*\nOwner: Zoë Müller\n/s,
		'notify email body names the lead and its owner');
}

# The mobile push
my ($push) = requests_to('/push');
ok($push, 'the push gateway (nocrm.push_url) got a POST');
SKIP:
{
	skip 'no push', 4 unless $push;
	is($push->{method}, 'POST', 'push is a POST');
	is($push->{headers}{'idempotency-key'}, $key{mobile}, 'push Idempotency-Key header is the item key');
	like($push->{headers}{'content-type'}, qr{^application/json}, 'push is JSON');
	is_deeply(
		JSON::PP->new->decode($push->{body}),
		{
			channel => 'mobile',
			user_id => $zoe + 0,
			user_email => 'zoe@example.com',
			message => "New lead $title",
			lead_id => $lead + 0,
			lead_title => $title,
			idempotency_key => $key{mobile},
		},
		'push body: channel, user, rendered message, lead, idempotency key');
}

# The webhook
my ($hook) = requests_to('/hook');
ok($hook, 'the webhook URL got a POST');
SKIP:
{
	skip 'no webhook', 7 unless $hook;
	my $body = JSON::PP->new->decode($hook->{body});
	is($hook->{headers}{'idempotency-key'}, $key{webhook}, 'webhook Idempotency-Key header is the item key');
	is($hook->{headers}{'x-nocrm-event'}, 'lead.creation', 'X-Nocrm-Event header');
	is($body->{event}, 'lead.creation', 'webhook body: event');
	is($body->{automation}, 'all kinds', 'webhook body: automation name');
	is_deeply(
		[ @{ $body->{lead} }{qw(id title user_id contact_email status)} ],
		[ $lead + 0, $title, $zoe + 0, 'anna@client.example', 'todo' ],
		'webhook body: the lead');
	is($hook->{headers}{'x-nocrm-signature'},
		'sha256=' . hmac_sha256_hex(encode_utf8($hook->{body}), 'test-secret'),
		'X-Nocrm-Signature is sha256=HMAC-SHA256(nocrm.webhook_secret, body)');
	isnt($hook->{headers}{'x-nocrm-signature'},
		'sha256=' . hmac_sha256_hex(encode_utf8($hook->{body}), 'other-secret'),
		'(and depends on the secret)');
}

# --- header injection --------------------------------------------------------

$sink->control('reset');
my @inj = queue_for(
	[
		{ type => 'send_email', template => 'quote_followup', to => 'inj@client.example' },
		{ type => 'send_email', template => 'quote_followup' },
	],
	<<"SQL");
INSERT INTO nocrm.leads (title, contact_email) VALUES
  (E'X\\r\\nBcc: evil\@x', 'ok\@client.example'),
  ('Crlf contact', E'victim\@client.example\\r\\nBcc: evil\@x'),
  ('Space contact', 'two words\@client.example'),
  ('Caffè Ü ' || repeat('€', 40) || ' fine', NULL);
SQL
is(scalar @inj, 7, 'header injection: 7 emails queued');
drain($node);

# The message of queue item $id, among the sink's.
sub mail_of
{
	my ($id) = @_;
	my $mid = '<' . item($id)->{idempotency_key} . '@nocrm.test>';
	my @m = grep { ($_->{message_id} // '') eq $mid } @{ $sink->mails };
	return $m[0];
}

my $injected = mail_of($inj[0]);
ok($injected, 'the email for the lead whose title holds CRLF + Bcc was sent');
SKIP:
{
	skip 'not sent', 6 unless $injected;
	my $m = parse_email($injected->{data});
	like($m->{header}{subject}, qr/^Quote for X\s+Bcc: evil\@x$/,
		'the CRLF and "Bcc:" ended up inside the Subject');
	unlike($m->{header}{subject}, qr/[\r\n]/, 'the Subject has no line break');
	ok(!exists $m->{header}{bcc}, 'no Bcc header');
	is_deeply([ grep { !defined $_->[0] || $_->[0] !~ /^(Date|From|To|Subject|Message-ID|X-Nocrm-Idempotency-Key|Auto-Submitted|X-Auto-Response-Suppress|MIME-Version|Content-Type|Content-Transfer-Encoding)$/ } @{ $m->{headers} } ],
		[], 'no header line but the engine\'s own');
	unlike($injected->{data}, qr/\r\nBcc:/i, 'no line of the raw message starts with Bcc:');
	is_deeply($injected->{rcpt_tos}, ['inj@client.example'], 'envelope has the one recipient');
}
is_deeply([ grep { /evil/ } map { @{ $_->{rcpt_tos} } } @{ $sink->mails } ],
	[], 'nothing was sent to evil@x');

for my $case ([ 3, 'CRLF' ], [ 5, 'a space' ])
{
	my $it = item($inj[ $case->[0] ]);
	is($it->{state}, 'dead', "contact_email with $case->[1]: the item is dead");
	like($it->{last_error}, qr/^invalid recipient address/, "contact_email with $case->[1]: 'invalid recipient address'");
	is($it->{attempts}, 1, "contact_email with $case->[1]: after one attempt");
}
is(states($inj[0], $inj[1], $inj[2], $inj[4], $inj[6]), 'done,done,done,done,done',
	'the other emails were delivered');
is(scalar @{ $sink->mails }, 5, 'and only those: 5 messages');

# A long non-ASCII Subject is folded into encoded words that each hold whole characters.
my $long = mail_of($inj[6]);
ok($long, 'the email with a long non-ASCII title was sent');
SKIP:
{
	skip 'not sent', 4 unless $long;
	my $m = parse_email($long->{data});
	is($m->{header}{subject}, 'Quote for Caffè Ü ' . ('€' x 40) . ' fine', 'long Subject decodes to the title');
	my ($raw_subject) = map { $_->[1] } grep { defined $_->[0] && $_->[0] eq 'Subject' } @{ $m->{headers} };
	my @words = $raw_subject =~ /=\?UTF-8\?B\?([^?]*)\?=/g;
	cmp_ok(scalar @words, '>', 1, 'it is folded into several encoded words');
	is(scalar(grep { !eval { decode('UTF-8', decode_base64($_), Encode::FB_CROAK); 1 } } @words),
		0, 'each encoded word is valid UTF-8 on its own (no character split)');
	is(scalar(grep { length($_) > 998 } split /\r\n/, $long->{data}), 0, 'no line longer than 998');
}

# --- a delay is honoured ------------------------------------------------------

$sink->control('reset');
my @delayed = queue_for(
	[ { type => 'send_email', template => 'quote_followup', to => 'later@client.example', delay => '3 seconds' } ],
	"INSERT INTO nocrm.leads (title) VALUES ('Later')",
	keep => 1);
is(scalar @delayed, 1, 'delay: one item queued');
is(sql($node, "SELECT kind || ',' || state || ',' || (run_at - created_at)::text FROM nocrm.queue WHERE id = $delayed[0]"),
	'action,pending,00:00:03', 'delay: a pending action item with run_at = created_at + 3 s');
my $early = sql($node, "CALL nocrm.drain(0); SELECT clock_timestamp() < run_at FROM nocrm.queue WHERE id = $delayed[0]");
SKIP:
{
	skip 'the machine was too slow to drain before run_at', 2 unless $early eq 't';
	is(states($delayed[0]), 'pending', 'a drain before run_at leaves the delayed action pending');
	is(scalar @{ $sink->mails }, 0, 'and sends nothing');
}
ok(wait_for(sub { sql($node, "SELECT now() >= run_at FROM nocrm.queue WHERE id = $delayed[0]") eq 't' }, 10,
	'run_at of the delayed action'), 'run_at passed');
drain($node);
is(states($delayed[0]), 'done', 'a drain after run_at runs the delayed action');
my @later = mails_to('later@client.example');
is(scalar @later, 1, 'the delayed email was sent once');
my $run_at = sql($node, "SELECT extract(epoch FROM run_at) FROM nocrm.queue WHERE id = $delayed[0]");
ok(@later && $later[0]{received_at} >= $run_at, 'not before run_at');
is(sql($node, "SELECT state FROM nocrm.queue WHERE kind = 'email' AND recipient = 'later\@client.example'"),
	'done', 'the email queued by the delayed action is done');
sql($node, q{SELECT nocrm.delete_automation(id) FROM nocrm.automations WHERE name = 'test'});

# --- backoff, dead letters ------------------------------------------------------

$sink->control('reset');
my ($tempfail, $reject) = queue_for(
	[ { type => 'send_email', template => 'quote_followup' } ],
	"INSERT INTO nocrm.leads (title, contact_email) VALUES ('Temp', 'tempfail\@client.example'), ('Rej', 'reject\@client.example')");
my ($h500, $h429, $h400) = queue_for(
	[
		{ type => 'webhook', url => $sink->url('/status/500') },
		{ type => 'webhook', url => $sink->url('/status/429') },
		{ type => 'webhook', url => $sink->url('/status/400') },
	],
	"INSERT INTO nocrm.leads (title) VALUES ('Hooks')");
drain($node);

my $t = item($tempfail);
is("$t->{state}/$t->{attempts}", 'pending/1', 'SMTP 451: pending after attempt 1');
like($t->{last_error}, qr/451/, 'SMTP 451: the error is recorded');
is(sql($node, "SELECT run_at > now() AND run_at - last_attempt_at BETWEEN interval '29 s' AND interval '91 s' FROM nocrm.queue WHERE id = $tempfail"),
	't', 'SMTP 451: retry in the future, retry_base (60 s) * [0.5, 1.5)');
drain($node);
is(item($tempfail)->{attempts}, 1, 'a drain before the retry time does not retry');
make_due($tempfail);
drain($node);
$t = item($tempfail);
is("$t->{state}/$t->{attempts}", 'pending/2', 'SMTP 451: pending after attempt 2');
is(sql($node, "SELECT run_at - last_attempt_at BETWEEN interval '59 s' AND interval '181 s' FROM nocrm.queue WHERE id = $tempfail"),
	't', 'SMTP 451: the second delay doubles (120 s * [0.5, 1.5))');
make_due($tempfail);
drain($node);
$t = item($tempfail);
is("$t->{state}/$t->{attempts}", 'dead/3', 'SMTP 451: dead after nocrm.max_attempts (3)');
like($t->{last_error}, qr/451/, 'SMTP 451: dead with the 451 error');

$t = item($reject);
is("$t->{state}/$t->{attempts}", 'dead/1', 'SMTP 550: dead after one attempt (permanent)');
like($t->{last_error}, qr/550/, 'SMTP 550: the error is recorded');

$t = item($h500);
is("$t->{state}/$t->{attempts}", 'pending/1', 'HTTP 500: pending for a retry');
like($t->{last_error}, qr/^HTTP 500/, 'HTTP 500: the error is recorded');
$t = item($h429);
is("$t->{state}/$t->{attempts}", 'pending/1', 'HTTP 429: pending for a retry');
like($t->{last_error}, qr/^HTTP 429/, 'HTTP 429: the error is recorded');
$t = item($h400);
is("$t->{state}/$t->{attempts}", 'dead/1', 'HTTP 400: dead at once');
like($t->{last_error}, qr/^HTTP 400/, 'HTTP 400: the error is recorded');

make_due($h500, $h429);
drain($node);
is(join(',', map { my $i = item($_); "$i->{state}/$i->{attempts}" } $h500, $h429),
	'pending/2,pending/2', 'HTTP 500 and 429 were retried');
my @r500 = requests_to('/status/500');
is(scalar @r500, 2, 'the sink got the 500 webhook twice');
is(scalar(grep { $_->{headers}{'idempotency-key'} eq item($h500)->{idempotency_key} } @r500),
	2, 'with the same Idempotency-Key both times');
is(scalar(requests_to('/status/400')), 1, 'the 400 webhook was sent once');
is(scalar @{ $sink->mails }, 0, 'no message was accepted by the failing SMTP recipients');

is(sql($node, q{SELECT string_agg(id || ':' || attempts || ':' || last_error, ',' ORDER BY id) FROM nocrm.dead_letters}),
	sql($node, q{SELECT string_agg(id || ':' || attempts || ':' || last_error, ',' ORDER BY id) FROM nocrm.queue WHERE state = 'dead'}),
	'nocrm.dead_letters lists every dead item with its attempts and error');
is(sql($node, "SELECT count(*) FROM nocrm.dead_letters WHERE id IN ($tempfail, $reject, $h400)"),
	3, 'dead_letters: the tempfail, rejected and HTTP 400 items are there');
like(sql($node, "SELECT kind || ' ' || recipient || ' ' || last_error FROM nocrm.dead_letters WHERE id = $tempfail"),
	qr/^email tempfail\@client\.example .*451/, 'dead_letters: the tempfail email');
like(sql($node, "SELECT kind || ' ' || last_error FROM nocrm.dead_letters WHERE id = $h400"),
	qr/^webhook HTTP 400/, 'dead_letters: the 400 webhook');

# --- requeue_dead after the sink is fixed --------------------------------------------

# Only these are dead-lettered from here on.
sql($node, q{UPDATE nocrm.queue SET state = 'cancelled' WHERE state IN ('dead', 'pending')});
$sink->control('reset');
$sink->control('smtp/down');
$sink->control('http/fail');
my ($down_mail) = queue_for([ { type => 'send_email', template => 'quote_followup', to => 'ok@client.example' } ],
	"INSERT INTO nocrm.leads (title) VALUES ('Outage mail')");
my ($fail_hook) = queue_for([ { type => 'webhook', url => $sink->url('/later') } ],
	"INSERT INTO nocrm.leads (title) VALUES ('Outage hook')");
($reject) = queue_for([ { type => 'send_email', template => 'quote_followup', to => 'reject@client.example' } ],
	"INSERT INTO nocrm.leads (title) VALUES ('Rejected')");
for (1 .. 3)
{
	make_due($down_mail, $fail_hook, $reject);
	drain($node);
}
is(states($down_mail, $fail_hook), 'dead,dead', 'SMTP down and HTTP 503: dead after 3 attempts');
like(item($down_mail)->{last_error}, qr/^SMTP /, 'SMTP down: the connection error is recorded');
like(item($fail_hook)->{last_error}, qr/^HTTP 503/, 'HTTP fail mode: the 503 is recorded');
is(sql($node, 'SELECT count(*) FROM nocrm.dead_letters'), 3, 'dead_letters shows the three');

$sink->control('smtp/up');
$sink->control('http/ok');
is(sql($node, 'SELECT nocrm.requeue_dead()'), 3, 'requeue_dead() puts the 3 dead items back');
is(sql($node, "SELECT string_agg(state || '/' || attempts, ',' ORDER BY id) FROM nocrm.queue WHERE id IN ($down_mail, $fail_hook, $reject)"),
	'pending/0,pending/0,pending/0', 'as pending with a fresh attempt count');
is(sql($node, 'SELECT count(*) FROM nocrm.dead_letters'), 0, 'dead_letters is empty');
drain($node);
is(states($down_mail, $fail_hook), 'done,done', 'a drain with the sink fixed delivers them');
is(states($reject), 'dead', 'the permanently rejected one is dead again');
my @ok_mails = mails_to('ok@client.example');
is(scalar @ok_mails, 1, 'the email was delivered once');
is($ok_mails[0]{message_id}, '<' . item($down_mail)->{idempotency_key} . '@nocrm.test>',
	'with its original idempotency key as Message-ID');
my @later_hooks = requests_to('/later');
is(join(',', map { $_->{status} } @later_hooks), '503,503,503,200', 'the webhook: 3 failures, then delivered');
is(scalar(grep { $_->{headers}{'idempotency-key'} eq item($fail_hook)->{idempotency_key} } @later_hooks),
	4, 'every attempt carried the same Idempotency-Key');

# --- SMTP down and back up loses nothing ------------------------------------------------

$sink->control('reset');
my @twenty = queue_for([ { type => 'send_email', template => 'quote_followup' } ],
	"INSERT INTO nocrm.leads (title, contact_email) SELECT 'Bulk ' || i, 'bulk' || i || '\@client.example' FROM generate_series(1, 20) i");
is(scalar @twenty, 20, 'outage: 20 emails queued');
$sink->control('smtp/down');
drain($node);
my $range = "id BETWEEN $twenty[0] AND $twenty[-1]";
is(sql($node, "SELECT count(*) FROM nocrm.queue WHERE $range AND state = 'pending' AND attempts = 1 AND last_error IS NOT NULL AND run_at > now()"),
	20, 'SMTP down: all 20 stay pending, with an error and a retry time');
is(scalar @{ $sink->mails }, 0, 'SMTP down: nothing received');
$sink->control('smtp/up');
make_due(@twenty);
drain($node);
is(sql($node, "SELECT count(*) FROM nocrm.queue WHERE $range AND state = 'done'"), 20, 'SMTP back: all 20 done');
my @bulk = @{ $sink->mails };
my %seen;
$seen{ $_->{message_id} }++ for @bulk;
is(scalar @bulk, 20, 'SMTP back: 20 messages received');
is(scalar keys %seen, 20, 'SMTP back: 20 distinct Message-IDs');
is_deeply([ sort keys %seen ],
	[ sort map { "<$_\@nocrm.test>" } split /\n/, sql($node, "SELECT idempotency_key FROM nocrm.queue WHERE $range") ],
	'exactly the queued items\' keys');

# --- retention ----------------------------------------------------------------------------

my $dead_before = sql($node, "SELECT count(*) FROM nocrm.queue WHERE state = 'dead'");
cmp_ok(sql($node, "SELECT count(*) FROM nocrm.queue WHERE state = 'done'"), '>', 0, 'there are done items');
cmp_ok($dead_before, '>', 0, 'and dead items');
drain($node);
cmp_ok(sql($node, "SELECT count(*) FROM nocrm.queue WHERE state = 'done'"), '>', 0,
	'with the default retention a drain keeps delivered items');
set_nocrm_conf($node, queue_retention => 1);
ok(wait_for(sub { sql($node, "SELECT max(delivered_at) < now() - interval '1.1 s' FROM nocrm.queue") eq 't' }, 10,
	'delivered items older than the retention'), 'delivered items are now older than 1 s');
drain($node);
is(sql($node, "SELECT count(*) FROM nocrm.queue WHERE state IN ('done', 'cancelled')"), 0,
	'queue_retention = 1 s: a later drain pruned delivered and cancelled items');
is(sql($node, "SELECT count(*) FROM nocrm.queue WHERE state = 'dead'"), $dead_before, 'dead items stay');

$sink->stop;
$node->stop;
done_testing();
