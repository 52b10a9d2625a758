# The NOTIFY sent for a browser notification: one per notification, at
# commit, with the row's id and a JSON payload (message clipped to 1,000
# characters); none for a rolled-back transaction; in bulk past the first
# 1,000 of a transaction.  Checked from a psql
# session that LISTENs (psql prints notifications with the sender's pid,
# which a pg_regress expected file cannot hold).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('notify');
$node->init;
$node->start;
$node->safe_psql('postgres', q{
	CREATE EXTENSION nocrm_automation;
	INSERT INTO nocrm.users (name, email) VALUES ('Anna', 'anna@example.com');
	SELECT nocrm.create_automation(name => 'tell Anna', event => 'lead.creation',
	  actions => '[{"type": "notify", "user": "anna@example.com", "message": "New: {{lead.title}}"}]');
});

my $out = $node->safe_psql('postgres', q{
	LISTEN nocrm_notifications;
	INSERT INTO nocrm.leads (id, title) VALUES (100007, 'Quote "A" — ünïcode');
	BEGIN;
	INSERT INTO nocrm.leads (id, title) VALUES (100008, 'Never');
	ROLLBACK;
	INSERT INTO nocrm.leads (id, title) VALUES (100009, repeat('é', 1200));
});
my @payloads = $out =~ /Asynchronous notification "nocrm_notifications" with payload "(.*)" received/g;
is(scalar @payloads, 2, 'two notifications: none for the rolled-back lead') or diag $out;

my ($first_id, $second_id) = split /\n/,
  $node->safe_psql('postgres', 'SELECT id FROM nocrm.notifications ORDER BY id');
is($payloads[0],
	qq({"id" : $first_id, "user_id" : 1, "lead_id" : 100007, "automation_id" : 1, "message" : "New: Quote \\"A\\" — ünïcode", "truncated" : false}),
	'the payload names the row, as json_build_object would write it');
like($payloads[1], qr/^\{"id" : $second_id, "user_id" : 1, "lead_id" : 100009, "automation_id" : 1, "message" : "New: (é){995}", "truncated" : true\}$/,
	'a long message is clipped to 1,000 characters, whole characters, and flagged');
is($node->safe_psql('postgres', 'SELECT length(message) FROM nocrm.notifications WHERE lead_id = 100009'),
	'1205', 'the row keeps the whole message');

# A bulk statement: the first 1,000 notifications of a transaction get a
# NOTIFY each, the rest one NOTIFY per user and batch of writes.
$node->safe_psql('postgres', 'TRUNCATE nocrm.notifications');
$out = $node->safe_psql('postgres', q{
	LISTEN nocrm_notifications;
	INSERT INTO nocrm.leads (title) SELECT 'Bulk ' || g FROM generate_series(1, 1500) g;
});
@payloads = $out =~ /Asynchronous notification "nocrm_notifications" with payload "(.*)" received/g;
my @each = grep { /"message"/ } @payloads;
my @bulk = grep { /"bulk" : true/ } @payloads;
is(scalar @each, 1000, '1,000 notifications with a NOTIFY each');
is(scalar @bulk, 1, 'and one bulk NOTIFY for the rest') or diag join("\n", @bulk);
my ($first_bulk, $last) = split /\|/, $node->safe_psql('postgres',
	'SELECT (SELECT id FROM nocrm.notifications ORDER BY id OFFSET 1000 LIMIT 1), max(id) FROM nocrm.notifications');
is($bulk[0], qq({"user_id" : 1, "count" : 500, "first_id" : $first_bulk, "last_id" : $last, "bulk" : true}),
	'the bulk NOTIFY: user, count and id range');
is($node->safe_psql('postgres', 'SELECT count(*) FROM nocrm.notifications'), 1500, 'every notification has its row');

$node->stop;
done_testing();
