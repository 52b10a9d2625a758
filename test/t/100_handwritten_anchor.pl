# The benchmark anchor (test/bench/handwritten_rules.sql, the seed rules as
# hand-written PL/pgSQL triggers) writes what the engine writes for the same
# rules: the same workload in two databases, one with the seed5 automations
# of test/bench/rulesets.sh, one with the anchor's triggers, must end with
# the same leads, owners, tags, queue rows, notifications and NOTIFYs.  So
# core_bench.sh keeps comparing like with like when the engine changes.
use strict;
use warnings;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $bench = abs_path(dirname(__FILE__) . '/../bench');
my $anchor_sql = "$bench/handwritten_rules.sql";

# The CRM and the rule set as the benchmarks define them (rulesets.sh).
sub rulesets_var
{
	my ($name) = @_;
	my $out = `bash -c '. "\$1" && printf %s "\$$name"' _ '$bench/rulesets.sh'`;
	die "could not read $name from rulesets.sh" if $? != 0 || $out eq '';
	return $out;
}
my $crm_sql = rulesets_var('BENCH_CRM_SQL');
my $seed5_sql = rulesets_var('RULES_SEED5');

my $node = PostgreSQL::Test::Cluster->new('anchor');
$node->init;
$node->start;

for my $db (qw(engine handwritten))
{
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	$node->safe_psql($db, "CREATE EXTENSION nocrm_automation;\n$crm_sql");
	$node->safe_psql($db, 'ALTER DATABASE ' . $db . ' SET nocrm.history = actions');
}
$node->safe_psql('engine', $seed5_sql);

sub load_anchor
{
	my ($rules) = @_;
	$node->command_ok(
		[ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-v', "rules=$rules",
			'-d', 'handwritten', '-f', $anchor_sql ],
		"handwritten_rules.sql with rules=$rules");
}
# Loading twice must give the same as once (idempotent), and the triggers
# come disabled.
load_anchor('seed3');
load_anchor('seed5');
load_anchor('seed5');
is($node->safe_psql('handwritten',
	q{SELECT string_agg(tgname || ':' || tgenabled::text, ' ' ORDER BY tgname) FROM pg_trigger
	   WHERE tgrelid = 'nocrm.leads'::regclass AND tgname LIKE 'anchor%'}),
	'anchor_lead_before:D anchor_leads_deleted:D anchor_leads_inserted:D anchor_leads_updated:D',
	'the anchor triggers are created disabled');
$node->safe_psql('handwritten', 'SELECT anchor.enable()');
is($node->safe_psql('handwritten',
	q{SELECT count(*) FROM pg_trigger WHERE tgrelid = 'nocrm.leads'::regclass AND tgname LIKE 'nocrm%'
	     AND tgenabled <> 'D'}),
	'0', 'anchor.enable() turns the extension\'s lead triggers off');

# The workload: 30 leads into Vendite without owner (single-row statements
# and one multi-row insert; every 7th without contact_email, so send_email
# skips it), 10 won, 10 moved to Preventivo (overlapping the won ones),
# 5 deleted.  One psql session that LISTENs, so the NOTIFYs are captured.
my $workload = q{
LISTEN nocrm_notifications;
} . join('', map {
	my $email = $_ % 7 ? "'lead$_\@example.net'" : 'NULL';
	"INSERT INTO nocrm.leads (title, pipeline_id, contact_email) VALUES ('Lead $_', 1, $email);\n"
} 1 .. 20) . q{
INSERT INTO nocrm.leads (title, pipeline_id, contact_email)
SELECT 'Lead ' || g, 1, CASE WHEN g % 7 <> 0 THEN 'lead' || g || '@example.net' END
  FROM generate_series(21, 30) g;
UPDATE nocrm.leads SET status = 'won' WHERE id BETWEEN 1 AND 10;
UPDATE nocrm.leads SET step_id = (SELECT id FROM nocrm.steps WHERE pipeline_id = 1 AND name = 'Preventivo')
 WHERE id BETWEEN 6 AND 15;
DELETE FROM nocrm.leads WHERE id IN (2, 7, 20, 21, 29);
};

my %notifies;
for my $db (qw(engine handwritten))
{
	my ($stdout, $stderr);
	$node->psql($db, $workload, stdout => \$stdout, stderr => \$stderr, on_error_die => 1);
	my @payloads = ("$stdout\n$stderr") =~ /Asynchronous notification "nocrm_notifications" with payload "(.*)" received/g;
	$notifies{$db} = join("\n", @payloads);
}

# Timestamps differ between the databases (other transactions): each is
# shown as its rank among the leads' timestamps, so "closed by the status
# update, changed again by the step move" still has to match.
my %checks = (
	'leads' => q{
		WITH ts AS (SELECT t, dense_rank() OVER (ORDER BY t) AS r
		              FROM (SELECT created_at FROM nocrm.leads UNION SELECT updated_at FROM nocrm.leads
		                    UNION SELECT closed_at FROM nocrm.leads) x(t))
		SELECT l.id, l.title, l.pipeline_id, l.step_id, l.status, u.email, l.contact_email,
		       (SELECT r FROM ts WHERE t = l.created_at), (SELECT r FROM ts WHERE t = l.updated_at),
		       (SELECT r FROM ts WHERE t = l.closed_at)
		  FROM nocrm.leads l LEFT JOIN nocrm.users u ON u.id = l.user_id ORDER BY l.id},
	'owners (leads per user)' => q{
		SELECT u.email, count(*) FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id
		 GROUP BY u.email ORDER BY u.email},
	'tags' => q{SELECT lead_id, name FROM nocrm.tags ORDER BY lead_id, name},
	'queue rows' => q{
		SELECT id, kind, automation_id, action_no, lead_id, event, recipient, payload ->> 'template',
		       payload ->> 'to', payload, state, attempts, actor_id, run_at = created_at
		  FROM nocrm.queue ORDER BY id},
	'notification rows' => q{
		SELECT n.id, u.email, n.lead_id, n.automation_id, n.message, n.read_at
		  FROM nocrm.notifications n JOIN nocrm.users u ON u.id = n.user_id ORDER BY n.id},
);
for my $what (sort keys %checks)
{
	my $engine = $node->safe_psql('engine', $checks{$what});
	my $hand = $node->safe_psql('handwritten', $checks{$what});
	is($hand, $engine, "$what: handwritten as engine");
}
is($notifies{handwritten}, $notifies{engine}, 'NOTIFY payloads: handwritten as engine');

# And what both wrote is the rules' effect, not two empty results.
is($node->safe_psql('engine', q{
	SELECT u.email || '=' || count(*) FROM nocrm.leads l JOIN nocrm.users u ON u.id = l.user_id
	 GROUP BY u.email ORDER BY u.email}),
	"anna\@example.com=9\ngiovanni\@example.com=9\nmatteo\@example.com=7",
	'round robin: 30 leads in rotation; deleted 2, 20, 29 (matteo), 7 (anna), 21 (giovanni)');
is($node->safe_psql('engine', q{SELECT name || '=' || count(*) FROM nocrm.tags GROUP BY name ORDER BY name}),
	"Preventivo inviato=9\nUpsell Opportunity=8", 'tags of the surviving leads');
is($node->safe_psql('engine',
	q{SELECT count(*) || ' ' || string_agg(DISTINCT payload ->> 'template', ',') FROM nocrm.queue}),
	'8 quote_followup', 'one email per lead moved to Preventivo with a contact_email (6..15 but 7 and 14)');
is($node->safe_psql('engine', q{
	SELECT count(*) FILTER (WHERE message LIKE 'Nuovo lead: %') || ' ' ||
	       count(*) FILTER (WHERE message LIKE 'Lead eliminato: %') || ' ' || string_agg(DISTINCT u.email, ',')
	  FROM nocrm.notifications n JOIN nocrm.users u ON u.id = n.user_id}),
	'30 5 sara@example.com', 'notifications: 30 on creation, 5 on deletion, all to Sara');
is(scalar(() = $notifies{engine} =~ /"id" : /g), 35, 'one NOTIFY per notification');

# rules=none takes the anchor away again.
load_anchor('none');
is($node->safe_psql('handwritten', q{
	SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'anchor') +
	       (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'anchor%')}),
	'0', 'rules=none drops the schema and the triggers');

$node->stop;
done_testing();
