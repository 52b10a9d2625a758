
# Two drains at the same time share the queue without sending anything twice:
# claims use FOR UPDATE SKIP LOCKED and a lease.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";

use NocrmTest;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my $n = 2000;
my $sink = start_sink();
my $node = nocrm_node('concurrent', $sink,
	settings => { drain_batch_size => 50, retry_base => 1 });

sql($node, <<"SQL");
INSERT INTO nocrm.email_templates (name, subject, body)
  VALUES ('hello', 'Hello {{lead.title}}', 'Hello {{lead.title}}');
SELECT nocrm.create_automation(name => 'mail', event => 'lead.creation',
  actions => '[{"type": "send_email", "template": "hello"}]');
INSERT INTO nocrm.leads (title, contact_email)
  SELECT 'Lead ' || i, 'c' || i || '\@client.example' FROM generate_series(1, $n) i;
SQL
my %all = map { $_ => 1 }
  split /\n/, sql($node, q{SELECT idempotency_key FROM nocrm.queue WHERE kind = 'email'});
is(scalar keys %all, $n, "$n emails queued");

# Each drain sends as its own envelope sender (same domain, so the
# Message-IDs do not change): the sink then tells who delivered what.
my $start = time;
my @drains = map {
	start_drain($node, before => ["SET nocrm.mail_from = 'drain-$_\@nocrm.test'"])
} qw(a b);
my @ok = map { finish_drain($_) } @drains;
note sprintf('two drains delivered %d emails in %.1f s', $n, time - $start);
ok($ok[0], 'drain a finished without error') or diag $drains[0]{stderr};
ok($ok[1], 'drain b finished without error') or diag $drains[1]{stderr};

is(sql($node, q{SELECT string_agg(state || ' ' || n, ', ') FROM (SELECT state, count(*) AS n FROM nocrm.queue GROUP BY state) s}),
	"done $n", "all $n items are done");
is(sql($node, q{SELECT count(*) FROM nocrm.queue WHERE attempts <> 1}), 0,
	'each was claimed exactly once (attempts = 1)');

my @mails = @{ $sink->mails };
my %count;
$count{ $_->{message_id} // 'none' }++ for @mails;
is(scalar @mails, $n, "the sink received $n messages");
is(scalar(grep { $count{$_} > 1 } keys %count), 0, 'no Message-ID was received twice');
is_deeply([ sort keys %count ], [ sort map { "<$_\@nocrm.test>" } keys %all ],
	'each queued item was received exactly once');

my %by;
$by{ $_->{mail_from} }++ for @mails;
note join(', ', map { "$_: $by{$_}" } sort keys %by);
is_deeply([ sort keys %by ], [ 'drain-a@nocrm.test', 'drain-b@nocrm.test' ],
	'both drains delivered part of the queue');

$sink->stop;
$node->stop;
done_testing();
