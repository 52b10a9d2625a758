# Task events delivered against the sinks: a task past its due time is
# raised task.overdue by the drain, whose rule tells the task's assignee by
# email and on mobile (both delivered in the same CALL, once; a second drain
# raises and sends nothing); completing the task raises task.completed,
# whose webhook reaches the receiver with the lead's data.
use strict;
use warnings;
use utf8;

use FindBin;
use lib "$FindBin::RealBin/lib";

use Encode qw(encode_utf8);
use JSON::PP;
use NocrmTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $sink = start_sink();
my $node = nocrm_node('tasks', $sink);
my $json = JSON::PP->new->utf8;
my $hook = $sink->url('/tasks');

sql($node, qq{
	INSERT INTO nocrm.users (name, email) VALUES ('Anna', 'anna\@example.com'), ('Matteo', 'matteo\@example.com');
	SELECT nocrm.create_automation(name => 'Late task', event => 'task.overdue',
	  actions => '[{"type": "notify", "user": "assignee", "channels": ["email", "mobile"],
	                "message": "In ritardo: {{lead.title}}"}]');
	SELECT nocrm.create_automation(name => 'Task done', event => 'task.completed',
	  actions => '[{"type": "webhook", "url": "$hook"}]');
	INSERT INTO nocrm.leads (title, user_id) VALUES ('Ferrari Logistica', 1);
	INSERT INTO nocrm.tasks (lead_id, assignee_id, title, due_at)
	VALUES (1, 2, 'Richiamare', now() - interval '1 hour'),
	       (1, 2, 'Più tardi', now() + interval '1 day');
});

drain($node);
is(sql($node, q{SELECT string_agg(title || '=' || (overdue_at IS NOT NULL)::text, ',' ORDER BY id) FROM nocrm.tasks}),
	'Richiamare=true,Più tardi=false', 'the drain raised task.overdue for the task past its due time only');
my @mails = @{ $sink->mails };
is(scalar @mails, 1, 'one email');
is_deeply($mails[0]{rcpt_tos}, ['matteo@example.com'], 'to the task\'s assignee, not the lead\'s owner');
my $m = parse_email($mails[0]{data});
like($m->{body}, qr/In ritardo: Ferrari Logistica/, 'with the rule\'s message');
my @push = grep { $_->{path} eq '/push' } @{ $sink->requests };
is(scalar @push, 1, 'one mobile push');
my $p = $json->decode(encode_utf8($push[0]{body} // '{}'));
is($p->{user_id}, 2, 'for the assignee');
is(sql($node, q{SELECT string_agg(state, ',') FROM nocrm.queue}), 'done,done', 'both queue rows done');

drain($node);
is(scalar @{ $sink->mails }, 1, 'a second drain sends nothing more: raised once');
is(sql($node, q{SELECT count(*) FROM nocrm.lead_history WHERE event = 'task.overdue'}), '1',
	'one task.overdue in the lead\'s timeline');

sql($node, q{SELECT nocrm.complete_task(1)});
drain($node);
my @hooks = grep { $_->{path} eq '/tasks' } @{ $sink->requests };
is(scalar @hooks, 1, 'completing the task sends its webhook once');
my $h = $json->decode(encode_utf8($hooks[0]{body} // '{}'));
is($h->{event}, 'task.completed', 'for task.completed');
is($h->{lead}{title}, 'Ferrari Logistica', 'with the task\'s lead');

$node->stop;
$sink->stop;
done_testing();
