
# Email as the owner, through CALL nocrm.drain() to the SMTP sink: "from":
# "owner" puts a verified owner in From (display name encoded when not
# ASCII), falls back to nocrm.mail_from with Reply-To the owner when the
# owner is not verified; "reply_to": "owner" on notify's email channel; the
# envelope sender and the Message-ID domain stay nocrm.mail_from's.
use strict;
use warnings;
use utf8;

use FindBin;
use lib "$FindBin::RealBin/lib";

use JSON::PP;
use NocrmTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $sink = start_sink();
my $node = nocrm_node('owner_sender', $sink, settings => { mail_from_name => 'Acme CRM' });

sql($node, <<'SQL');
INSERT INTO nocrm.users (name, email, sender_name, sender_verified) VALUES
  ('Zoë Müller', 'zoe@example.com', 'Zoë Müller, Sales', true),
  ('Marco', 'marco@example.com', NULL, false),
  ('Lià', 'lià@example.com', NULL, true),
  ('Sara', 'sara@example.com', NULL, false);
INSERT INTO nocrm.email_templates (name, subject, body) VALUES
  ('hello', 'Hello from {{owner.name}}', 'Your lead {{lead.title}}.');
SQL
my %user = map { split /\|/ } split /\n/,
  sql($node, "SELECT name, id FROM nocrm.users WHERE NOT is_butler");

sql($node, <<"SQL");
SELECT nocrm.create_automation(name => 'as owner', event => 'lead.creation', actions =>
  '[{"type": "send_email", "template": "hello", "from": "owner"},
    {"type": "notify", "user": $user{Sara}, "message": "{{lead.title}} is new",
     "channels": ["email"], "reply_to": "owner"}]');
INSERT INTO nocrm.leads (title, user_id, contact_email) VALUES
  ('Verified', $user{'Zoë Müller'}, 'c1\@client.example'),
  ('Unverified', $user{Marco}, 'c2\@client.example'),
  ('UTF-8 owner', $user{'Lià'}, 'c3\@client.example'),
  ('No owner', NULL, 'c4\@client.example');
SQL
drain($node);
is(sql($node, "SELECT string_agg(DISTINCT state, ',') FROM nocrm.queue WHERE kind = 'email'"),
	'done', 'every email was delivered');

sub mail_to
{
	my ($rcpt, $title) = @_;
	my @m = grep {
		(grep { $_ eq $rcpt } @{ $_->{rcpt_tos} })
		  && (!defined $title || parse_email($_->{data})->{body} =~ /\Q$title\E/)
	} @{ $sink->mails };
	is(scalar @m, 1, "one email to $rcpt" . (defined $title ? " about $title" : ''));
	return $m[0] ? ($m[0], parse_email($m[0]->{data})) : ({}, { header => {}, headers => [] });
}

sub raw_header
{
	my ($m, $name) = @_;
	my ($h) = grep { defined $_->[0] && lc $_->[0] eq lc $name } @{ $m->{headers} };
	return $h ? $h->[1] : undef;
}

# The envelope and Message-ID never change, whoever is in From.
for my $sent (@{ $sink->mails })
{
	my $m = parse_email($sent->{data});
	is($sent->{mail_from}, 'butler@nocrm.test',
		"MAIL FROM is nocrm.mail_from (to $sent->{rcpt_tos}[0])");
	like($m->{header}{'message-id'}, qr/^<[^@]+\@nocrm\.test>$/,
		"Message-ID has nocrm.mail_from's domain (to $sent->{rcpt_tos}[0])");
}

# A verified owner: From the owner, with the sender name, no Reply-To.
my ($s, $m) = mail_to('c1@client.example');
is($m->{header}{from}, 'Zoë Müller, Sales <zoe@example.com>',
	'verified owner: From is the owner, with sender_name as display name');
like(raw_header($m, 'From'), qr/^=\?UTF-8\?B\?[^ ]+\?=( =\?UTF-8\?B\?[^ ]+\?=)* <zoe\@example\.com>$/,
	'the non-ASCII display name is sent as encoded words, the address bare');
is($m->{header}{'reply-to'}, undef, 'no Reply-To when From is the owner');
is($m->{header}{subject}, 'Hello from Zoë Müller', 'the template rendered as usual');

# Not verified: From nocrm.mail_from, Reply-To the owner.
($s, $m) = mail_to('c2@client.example');
is($m->{header}{from}, '"Acme CRM" <butler@nocrm.test>', 'unverified owner: From stays nocrm.mail_from');
is($m->{header}{'reply-to'}, '"Marco" <marco@example.com>', 'and Reply-To is the owner');
like(sql($node, "SELECT h.detail FROM nocrm.lead_history h JOIN nocrm.leads l ON l.id = h.lead_id"
	  . " WHERE l.title = 'Unverified' AND h.event = 'action.send_email'"),
	qr/^From nocrm\.mail_from: owner \d+ is not a verified sender \(users\.sender_verified\); Reply-To the owner <marco\@example\.com>$/,
	'the history row says why');

# A verified owner whose local part is UTF-8: sent with SMTPUTF8 (the sink offers it).
($s, $m) = mail_to('c3@client.example');
is($m->{header}{from}, 'Lià <lià@example.com>', 'a UTF-8 owner address is in From as it is (RFC 6532)');

# No owner: nothing changes.
($s, $m) = mail_to('c4@client.example');
is($m->{header}{from}, '"Acme CRM" <butler@nocrm.test>', 'no owner: From nocrm.mail_from');
is($m->{header}{'reply-to'}, undef, 'no owner: no Reply-To');

# notify's email channel with "reply_to": "owner": to Sara, replies to the owner.
($s, $m) = mail_to('sara@example.com', 'Verified');
is($m->{header}{from}, '"Acme CRM" <butler@nocrm.test>', 'notify email: From nocrm.mail_from');
is($m->{header}{'reply-to'}, 'Zoë Müller, Sales <zoe@example.com>', 'notify email: Reply-To the owner');
($s, $m) = mail_to('sara@example.com', 'No owner');
is($m->{header}{'reply-to'}, undef, 'notify email, no owner: no Reply-To');

# The From is chosen when the email is queued: a verification withdrawn
# later does not change a queued email, the next one falls back.
sql($node, "UPDATE nocrm.users SET sender_verified = false WHERE id = $user{'Zoë Müller'}");
sql($node, "INSERT INTO nocrm.leads (title, user_id, contact_email) VALUES ('Later', $user{'Zoë Müller'}, 'c5\@client.example')");
drain($node);
($s, $m) = mail_to('c5@client.example');
is($m->{header}{from}, '"Acme CRM" <butler@nocrm.test>', 'after the flag is cleared: From nocrm.mail_from');
is($m->{header}{'reply-to'}, 'Zoë Müller, Sales <zoe@example.com>', 'and Reply-To the owner');

# An agent cannot verify itself, even with a column grant.
sql($node, "CREATE ROLE agent_ann LOGIN IN ROLE nocrm_agent;"
	  . " GRANT UPDATE (sender_verified) ON nocrm.users TO agent_ann");
my ($rc, $out, $err) = $node->psql('postgres',
	"UPDATE nocrm.users SET sender_verified = true WHERE id = $user{Marco}",
	extra_params => [ '-U', 'agent_ann', '-v', 'VERBOSITY=verbose' ]);
like($err, qr/ERROR:  42501: only an admin can mark a user as a verified sender/,
	'an agent setting sender_verified gets 42501');
is(sql($node, "SELECT sender_verified FROM nocrm.users WHERE id = $user{Marco}"), 'f', 'and nothing changed');

done_testing();
