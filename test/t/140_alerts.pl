# Failure alerts against the sinks: a webhook that dies (HTTP 400) tells the
# admin by browser notification (with its NOTIFY), by email (template
# "alert") and by the alert webhook, signed like any webhook; a second dead
# letter within nocrm.alert_interval tells nobody; an alert webhook that
# dies itself raises no alert.
use strict;
use warnings;
use utf8;

use FindBin;
use lib "$FindBin::RealBin/lib";

use Digest::SHA qw(hmac_sha256_hex);
use Encode qw(encode_utf8);
use JSON::PP;
use NocrmTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $sink = start_sink();
my $node = nocrm_node('alerts', $sink,
	settings => { alert_webhook_url => $sink->url('/alerts'), max_attempts => 3, retry_base => 0 });
my $json = JSON::PP->new->utf8;

sql($node, q{
	INSERT INTO nocrm.users (name, email, is_admin) VALUES ('Ada Admin', 'ada@example.com', true),
	                                                       ('Bob', 'bob@example.com', false);
});
my $hook = $sink->url('/status/400');
sql($node, qq{SELECT nocrm.create_automation(name => 'ERP hook', event => 'lead.creation',
	actions => '[{"type": "webhook", "url": "$hook"}]')});
sql($node, q{INSERT INTO nocrm.leads (title) VALUES ('Ferrari')});

# The drain: the webhook dies, the alert is queued in that transaction, and
# the next round of the same run delivers the alert's email and webhook.
my $out = sql($node, "LISTEN nocrm_notifications; CALL nocrm.drain(0);");
is(sql($node, q{SELECT state || ' ' || attempts FROM nocrm.queue WHERE id = 1}), 'dead 1',
	'the 400 webhook is a dead letter at once');
my @payloads = $out =~ /Asynchronous notification "nocrm_notifications" with payload "(.*)" received/g;
is(scalar @payloads, 1, 'one NOTIFY: one admin') or diag $out;
my ($nid, $message) = split /\|/, sql($node, 'SELECT id, message FROM nocrm.notifications');
like($message, qr/^Dead letter: webhook of automation 1 "ERP hook" \(queue item 1, lead 1\) gave up: HTTP 400/,
	'the notification says what died and why');
my $payload = $json->decode(encode_utf8($payloads[0] // '{}'));
is_deeply($payload,
	{ id => $nid, user_id => 1, lead_id => 1, automation_id => 1, message => $message,
	  truncated => JSON::PP::false, alert_id => 1, alert => 'dead_letter' },
	'the usual browser payload, with the alert');

my @mails = grep { grep { $_ eq 'ada@example.com' } @{ $_->{rcpt_tos} } } @{ $sink->mails };
is(scalar @mails, 1, 'one email to the admin');
is(scalar @{ $sink->mails }, 1, 'and none to anyone else');
SKIP:
{
	skip 'no alert email', 3 unless @mails;
	my $m = parse_email($mails[0]{data});
	is($m->{header}{subject}, "[CRM alert] $message", 'Subject from the alert template');
	like($m->{body}, qr/^\Q$message\E\n\nOpen problems: SELECT \* FROM nocrm\.problems;\n/,
		'the body from the alert template');
	is($mails[0]{mail_from}, 'butler@nocrm.test', 'sent like any email, from nocrm.mail_from');
}

my @alerts = grep { $_->{path} eq '/alerts' } @{ $sink->requests };
is(scalar @alerts, 1, 'one POST to nocrm.alert_webhook_url');
SKIP:
{
	skip 'no alert webhook', 6 unless @alerts;
	my $h = $alerts[0];
	is($h->{headers}{'x-nocrm-event'}, 'alert.dead_letter', 'X-Nocrm-Event: alert.dead_letter');
	is($h->{headers}{'x-nocrm-signature'}, 'sha256=' . hmac_sha256_hex(encode_utf8($h->{body}), 'test-secret'),
		'signed with nocrm.webhook_secret, as every webhook');
	is($h->{headers}{'idempotency-key'},
		sql($node, q{SELECT idempotency_key FROM nocrm.queue WHERE kind = 'webhook' AND payload ? 'alert_id'}),
		'with its queue row\'s idempotency key');
	my $b = $json->decode($h->{body});
	is($b->{event}, 'alert.dead_letter', 'body: event');
	is($b->{message}, $message, 'body: message');
	is_deeply([ @{ $b->{alert} }{qw(id kind subject automation_id automation queue_id lead_id occurrences)} ],
		[ 1, 'dead_letter', 'automation 1', 1, 'ERP hook', 1, 1, 1 ], 'body: the problem');
}

# A second dead letter of the same automation within the hour: counted only.
sql($node, q{INSERT INTO nocrm.leads (title) VALUES ('Ferrari 2')});
drain($node);
is(sql($node, q{SELECT occurrences || ' ' || alerts_sent FROM nocrm.alerts}), '2 1',
	'the second dead letter is counted, not told');
is(scalar @{ $sink->mails }, 1, 'no second email');
is(scalar(grep { $_->{path} eq '/alerts' } @{ $sink->requests }), 1, 'no second alert webhook');
is(sql($node, q{SELECT dead_now FROM nocrm.problems WHERE kind = 'dead_letter'}), 2, 'nocrm.problems: 2 dead now');

# An alert webhook that dies itself raises nothing: no loop.
set_nocrm_conf($node, alert_interval => 0, alert_webhook_url => $sink->url('/status/410'));
sql($node, q{INSERT INTO nocrm.leads (title) VALUES ('Ferrari 3')});
drain($node);
drain($node);
is(sql($node, q{SELECT count(*) FROM nocrm.queue WHERE payload ? 'alert_id' AND recipient LIKE '%/status/410' AND state = 'dead'}),
	1, 'the alert webhook to the failing receiver is dead');
is(sql($node, q{SELECT occurrences || ' ' || alerts_sent FROM nocrm.alerts}), '3 2',
	'told once more (interval 0), and the dead alert webhook raised no alert');
is(scalar(grep { $_->{path} eq '/status/410' } @{ $sink->requests }), 1, 'it was tried once');
is(scalar @{ $sink->mails }, 2, 'the admin got the second alert email');
is(sql($node, q{SELECT count(*) FROM nocrm.alerts}), 1, 'still one problem');

$sink->stop;
done_testing();
