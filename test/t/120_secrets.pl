
# Secrets in the user mapping of server nocrm_credentials: an admin sets them
# and cannot read them back; the drain uses them from its next round (no
# reload), over the settings; they appear in no table, dump or log.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";

use Digest::SHA qw(hmac_sha256_hex);
use NocrmTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $sink = start_sink();
my $node = nocrm_node('secrets', $sink);	# nocrm.webhook_secret = 'test-secret'
my $hook_url = $sink->url('/hook');
sql($node, <<"SQL");
CREATE ROLE regress_admin LOGIN;
GRANT nocrm_admin TO regress_admin;
-- what reference.md advises: the statement that sets a secret carries it,
-- so the role that sets secrets does not have its statements logged
ALTER ROLE regress_admin SET log_statement = 'none';
INSERT INTO nocrm.users (name, email) VALUES ('Anna', 'anna\@example.com');
INSERT INTO nocrm.email_templates (name, subject, body) VALUES ('hello', 'Hello {{lead.title}}', 'Hi');
SELECT nocrm.create_automation(name => 'out', event => 'lead.creation',
  actions => '[{"type": "webhook", "url": "$hook_url"}, {"type": "send_email", "template": "hello", "to": "x\@client.example"}]');
SQL

sub as_admin
{
	my ($query) = @_;
	return $node->safe_psql('postgres', $query, extra_params => [ '-U', 'regress_admin' ]);
}

# Sends one lead's webhook and email; returns the webhook's signature check
# against each candidate secret and the email's AUTH user.
my $n = 0;
sub send_one
{
	$n++;
	sql($node, "INSERT INTO nocrm.leads (title) VALUES ('lead $n')");
	drain($node);
	my ($hook) = grep { $_->{path} eq '/hook' && $_->{body} =~ /"lead $n"/ } @{ $sink->requests };
	my ($mail) = grep { ($_->{data} // '') =~ /lead $n/ } @{ $sink->mails };
	return ($hook, $mail);
}

sub signed_with
{
	my ($hook, $secret) = @_;
	return $hook && $hook->{headers}{'x-nocrm-signature'} eq 'sha256=' . hmac_sha256_hex($hook->{body}, $secret);
}

my ($hook, $mail) = send_one();
ok(signed_with($hook, 'test-secret'), 'no secret set: the webhook is signed with nocrm.webhook_secret');
is($mail->{auth_user}, undef, 'no smtp_user anywhere: no AUTH');

# An admin sets them, and cannot read them back.
as_admin(q{SELECT nocrm.set_secret('webhook_secret', 'mapped-secret-1'),
                  nocrm.set_secret('smtp_user', 'crm-user'),
                  nocrm.set_secret('smtp_password', 'pw-9f3a')});
is(as_admin(q{SELECT string_agg(name || '=' || is_set, ' ' ORDER BY name) FROM nocrm.secrets()}),
	'smtp_password=true smtp_user=true webhook_secret=true', 'the admin sees which secrets are set');
is(as_admin(q{SELECT coalesce(umoptions::text, 'hidden') FROM pg_user_mappings WHERE srvname = 'nocrm_credentials'}),
	'hidden', 'but pg_user_mappings hides their values from the admin');
my ($ret, $out, $err) = $node->psql('postgres', q{SELECT umoptions FROM pg_user_mapping},
	extra_params => [ '-U', 'regress_admin' ]);
like($err, qr/permission denied/, 'and pg_user_mapping itself is closed to the admin');
($ret, $out, $err) = $node->psql('postgres',
	q{ALTER USER MAPPING FOR PUBLIC SERVER nocrm_credentials OPTIONS (SET smtp_password 'x')},
	extra_params => [ '-U', 'regress_admin' ]);
like($err, qr/must be owner|permission denied/, 'nor can the admin change the mapping directly');
($ret, $out, $err) = $node->psql('postgres', q{SELECT nocrm.set_secret('smtp_pasword', 'x')});
like($err, qr/unknown secret 'smtp_pasword'/, 'an unknown secret name is refused');
($ret, $out, $err) = $node->psql('postgres',
	q{ALTER USER MAPPING FOR PUBLIC SERVER nocrm_credentials OPTIONS (ADD api_key 'x')});
like($err, qr/invalid option "api_key"/, 'the mapping takes only the known names (the validator)');

($hook, $mail) = send_one();
ok(signed_with($hook, 'mapped-secret-1'), 'the drain signs with the secret, over the setting');
is($mail->{auth_user}, 'crm-user', 'and logs in to SMTP with the secret user');

# Rotated: the next round uses the new one, without a reload.
as_admin(q{SELECT nocrm.set_secret('webhook_secret', 'mapped-secret-2')});
($hook) = send_one();
ok(signed_with($hook, 'mapped-secret-2'), 'a rotated secret is used at once, no reload');

# Cleared: back to the setting.
as_admin(q{SELECT nocrm.set_secret('webhook_secret', NULL)});
($hook) = send_one();
ok(signed_with($hook, 'test-secret'), 'a cleared secret falls back to nocrm.webhook_secret');
is(as_admin(q{SELECT is_set FROM nocrm.secrets() WHERE name = 'webhook_secret'}), 'f', 'and shows as unset');

# Nowhere else: log (before the checks below, whose statements name them), tables, dump.
unlike(slurp_file($node->logfile), qr/pw-9f3a|mapped-secret/,
	'the server log (log_statement = all) does not show a secret');
is(sql($node, q{SELECT count(*) FROM nocrm.queue q WHERE q::text ~ 'pw-9f3a|mapped-secret|crm-user'})
	  + sql($node, q{SELECT count(*) FROM nocrm.lead_history h WHERE h::text ~ 'pw-9f3a|mapped-secret'})
	  + sql($node, q{SELECT count(*) FROM nocrm.automation_runs r WHERE r::text ~ 'pw-9f3a|mapped-secret'}),
	0, 'no queue, history or run log row holds a secret');
my $dump = `pg_dump -d '@{[ $node->connstr('postgres') ]}' 2>&1`;
like($dump, qr/nocrm/, 'pg_dump ran');
unlike($dump, qr/pw-9f3a/, 'the dump does not carry the SMTP password');

$node->stop;
done_testing();
