# Round robin under 8 concurrent clients: no deadlocks, no failed
# transaction, and the counts among committed leads stay within one.
# (A waiter used to keep rows its re-checks had locked; two waiters could
# then hold what the other needed.)
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('assign');
$node->init;
$node->append_conf('postgresql.conf', "deadlock_timeout = '100ms'\nlog_lock_waits = off");
$node->start;
$node->safe_psql('postgres', q{
	CREATE EXTENSION nocrm_automation;
	INSERT INTO nocrm.users (name, email) VALUES
	  ('Anna', 'anna@example.com'), ('Matteo', 'matteo@example.com'), ('Giovanni', 'giovanni@example.com');
	SELECT nocrm.create_automation(name => 'rr', event => 'lead.creation',
	  actions => '[{"type": "assign_round_robin", "users": [1, 2, 3]}]');
	SELECT nocrm.create_automation(name => 'also tag', event => 'lead.creation',
	  conditions => '{"lacks_tag": "x"}', actions => '[{"type": "add_tags", "tags": "seen"}]');
});

$node->pgbench('--no-vacuum --client=8 --jobs=8 --transactions=200', 0,
	[qr{processed: 1600/1600}, qr{number of failed transactions: 0 \(0\.000%\)}],
	[qr{^$}], 'round robin: 8 clients x 200 leads, every transaction commits',
	{ '080_rr' => q{INSERT INTO nocrm.leads (title) VALUES ('lead');} });

is($node->safe_psql('postgres', 'SELECT count(*) FROM nocrm.leads WHERE user_id IS NULL'),
	'0', 'every lead got an owner');
my $spread = $node->safe_psql('postgres',
	'SELECT max(n) - min(n) FROM (SELECT count(*) AS n FROM nocrm.leads GROUP BY user_id) c');
cmp_ok($spread, '<=', 1, "counts among committed leads within one (spread $spread)");
is($node->safe_psql('postgres',
	q{SELECT string_agg(assigned::text, ' ' ORDER BY position) FROM nocrm.assignment_counters}),
	$node->safe_psql('postgres',
	q{SELECT string_agg(n::text, ' ' ORDER BY user_id) FROM (SELECT user_id, count(*) n FROM nocrm.leads GROUP BY user_id) c}),
	'the counters agree with the leads');
my $log = slurp_file($node->logfile);
unlike($log, qr/deadlock detected/, 'no deadlock in the server log');

$node->stop;
done_testing();
