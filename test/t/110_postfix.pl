
# Delivery through a real MTA: Debian's postfix with strict settings
# (test/sinks/postfixctl.sh, started as root by test/check.sh), delivering to
# a Maildir that test/sinks/check_mail.py parses with email.policy.strict.
# Covers the EHLO name, configuration errors, TLS trust, mail hygiene,
# internationalized addresses and a server that closes a reused connection.
use strict;
use warnings;
use utf8;

use FindBin;
use lib "$FindBin::RealBin/lib";

use Encode qw(decode_utf8 encode_utf8);
use IO::Socket::INET;
use IPC::Run;
use JSON::PP;
use NocrmTest;
use PostgreSQL::Test::Utils;
use Test::More;

my $pfdir = $ENV{NOCRM_POSTFIX_DIR} // '/var/tmp/nocrm-postfix';
my %pf;
if (open my $fh, '<', "$pfdir/env")
{
	while (my $line = <$fh>)
	{
		chomp $line;
		my ($k, $v) = split /=/, $line, 2;
		$pf{$k} = $v if defined $v;
	}
	close $fh;
}
plan skip_all => "the test postfix is not running (as root: bash test/sinks/postfixctl.sh start $pfdir; test/check.sh does it)"
  unless $pf{smtp_port}
  && IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $pf{smtp_port}, Timeout => 3);

my $checker = "$FindBin::RealBin/../sinks/check_mail.py";
# The Maildir is the tests' own: start empty.
unlink glob("$pf{maildir}/new/* $pf{maildir}/cur/*");
my $plain_url = "smtp://127.0.0.1:$pf{smtp_port}";
my $tls_url = "smtp://127.0.0.1:$pf{tls_port}";
my $sink = start_sink();    # HTTP only; mail goes to postfix
my $node = nocrm_node(
	'postfix', $sink,
	settings => {
		smtp_url => $plain_url,
		smtp_tls => 'try',
		mail_from => 'butler@nocrm.test',
		mail_from_name => encode_utf8('Zoë from the CRM'),    # postgresql.conf is bytes
		max_attempts => 5,
		retry_base => 600,
	});

sql($node, <<'SQL');
INSERT INTO nocrm.email_templates (name, subject, body) VALUES
  ('pf', '{{lead.title}}', E'Line one\nLine two: {{lead.title}}\n\n-- \n{{butler.name}}');
SELECT nocrm.create_automation(name => 'pf', event => 'lead.creation',
  actions => '[{"type": "send_email", "template": "pf"}]');
SQL

# --- helpers ---------------------------------------------------------------

sub dq { my ($s) = @_; return '$q$' . $s . '$q$' }

# Queues one email per [title, contact]; returns the queue ids.
sub queue_mails
{
	my @pairs = @_;
	my $before = sql($node, 'SELECT coalesce(max(id), 0) FROM nocrm.queue');
	sql($node,
		'INSERT INTO nocrm.leads (title, contact_email) VALUES '
		  . join(', ', map { '(' . dq($_->[0]) . ', ' . dq($_->[1]) . ')' } @pairs));
	return split /\n/, sql($node, "SELECT id FROM nocrm.queue WHERE id > $before ORDER BY id");
}

sub item
{
	my ($id) = @_;
	return JSON::PP->new->utf8->decode(
		encode_utf8(sql($node, "SELECT row_to_json(q) FROM nocrm.queue q WHERE id = $id")));
}

sub make_due
{
	my @ids = @_;
	sql($node, "UPDATE nocrm.queue SET run_at = now() WHERE state = 'pending' AND id IN ("
		  . join(',', @ids) . ')');
	return;
}

# CALL nocrm.drain(0); returns its stderr (warnings).
sub drain_stderr
{
	my ($out, $err) = ('', '');
	$node->psql('postgres', 'CALL nocrm.drain(0)', stdout => \$out, stderr => \$err,
		on_error_die => 1);
	return $err;
}

# The checked messages in the Maildir, by Message-ID (cached per file).
my %checked;

sub maildir_messages
{
	my @files = grep { !$checked{$_} } map { glob("$pf{maildir}/$_/*") } qw(new cur);
	if (@files)
	{
		for my $line (split /\n/, `python3 '$checker' @files`)
		{
			my $m = JSON::PP->new->decode($line);
			$checked{ $m->{file} } = $m;
		}
	}
	return values %checked;
}

# Waits for the message of queue item $id (Message-ID <key@nocrm.test>).
sub message_of
{
	my ($id, $domain) = @_;
	my $mid = '<' . item($id)->{idempotency_key} . '@' . ($domain // 'nocrm.test') . '>';
	my $found;
	wait_for(
		sub {
			($found) = grep { ($_->{headers}{'message-id'} // '') eq $mid } maildir_messages();
			return $found;
		},
		30,
		"message $mid in the Maildir");
	return $found;
}

sub postfix_log_count
{
	my ($re) = @_;
	open my $fh, '<', "$pfdir/postfix.log" or return 0;
	my $n = grep { /$re/ } <$fh>;
	close $fh;
	return $n;
}

# --- messages as a strict reader sees them ------------------------------------

my $long_ascii = join(' ', ('Preventivo numero') x 12);
my $lookalike = '=?UTF-8?B?SGFja2Vk?=';
my %titles = (
	plain => 'Plain subject',
	utf8 => 'Caffè Ü ' . ('€' x 30) . ' fine',
	lookalike => $lookalike,
	long => $long_ascii,
);
my @kinds = sort keys %titles;
my @ids = queue_mails(map { [ $titles{$_}, "$_\@client.example" ] } @kinds);
is(scalar @ids, 4, 'four emails queued');
drain($node);
is(sql($node, "SELECT string_agg(state || '/' || attempts, ',') FROM nocrm.queue WHERE id IN (" . join(',', @ids) . ')'),
	'done/1,done/1,done/1,done/1', 'postfix accepted all four at the first attempt');

for my $i (0 .. $#kinds)
{
	my ($kind, $id) = ($kinds[$i], $ids[$i]);
	my $m = message_of($id);
	ok($m, "$kind: delivered to the Maildir");
	next unless $m;
	is_deeply($m->{errors}, [], "$kind: email.policy.strict and the line checks find nothing wrong");
	is($m->{headers}{subject}, $titles{$kind}, "$kind: the Subject decodes to the title");
	is_deeply($m->{to}, [ { name => '', local => $kind, domain => 'client.example' } ], "$kind: To is the bare address");
	is_deeply($m->{from}, [ { name => 'Zoë from the CRM', local => 'butler', domain => 'nocrm.test' } ],
		"$kind: From has nocrm.mail_from_name and nocrm.mail_from");
	is($m->{headers}{'auto-submitted'}, 'auto-generated', "$kind: Auto-Submitted: auto-generated");
	is($m->{headers}{'x-auto-response-suppress'}, 'All', "$kind: X-Auto-Response-Suppress: All");
	ok(!exists $m->{headers}{precedence}, "$kind: no Precedence header");
	is($m->{headers}{'x-nocrm-idempotency-key'}, item($id)->{idempotency_key}, "$kind: X-Nocrm-Idempotency-Key");
	cmp_ok(abs($m->{date_epoch} - time()), '<', 86400, "$kind: Date parses and is today");
	like($m->{received}[0] // '', qr/^from nocrm\.test \(localhost \[127\.0\.0\.1\]\)/,
		"$kind: EHLO name is the domain of nocrm.mail_from (postfix's Received header)");
	my $body = $m->{body} // '';
	like($body, qr/\r\n/, "$kind: the decoded body has CRLF line ends");
	(my $lf = $body) =~ s/\r\n/\n/g;
	my $lead = sql($node, "SELECT lead_id FROM nocrm.queue WHERE id = $id");
	is($lf, sql($node, "SELECT body FROM nocrm.render_template('pf', $lead)"),
		"$kind: the body is the rendered template");
}
my $look = message_of($ids[ (grep { $kinds[$_] eq 'lookalike' } 0 .. $#kinds)[0] ]);
if ($look)
{
	like($look->{raw_subject}, qr/^ =\?UTF-8\?B\?/, 'a title that looks like an encoded word is itself encoded');
	unlike($look->{raw_subject}, qr/\Q$lookalike\E/, 'and not passed through');
}

# --- a refused EHLO name is a configuration error, reported once ----------------

set_nocrm_conf($node, smtp_helo_name => 'vm');
my $rejected_before = postfix_log_count(qr/Helo command rejected/);
my @helo = queue_mails(map { [ "Helo $_", "helo$_\@client.example" ] } 1 .. 3);
my $warnings = drain_stderr();
my @w = $warnings =~ /no email can be sent with the current settings/g;
is(scalar @w, 1, 'EHLO refused: one WARNING for the run, not one per email');
like($warnings, qr/nocrm\.smtp_helo_name/, 'the WARNING names nocrm.smtp_helo_name');
is(postfix_log_count(qr/Helo command rejected/) - $rejected_before, 1,
	'postfix was asked once; the other emails of the run were not tried');
is(sql($node, "SELECT string_agg(DISTINCT state, ',') FROM nocrm.queue WHERE id IN (" . join(',', @helo) . ')'),
	'pending', 'no email is a dead letter: all three stay pending');
like(item($helo[0])->{last_error},
	qr/^SMTP configuration error: the server refused the EHLO name "vm": set nocrm\.smtp_helo_name .*504 5\.5\.2 <vm>: Helo command rejected/,
	'last_error says what to set, with the server\'s answer');
is(item($helo[2])->{last_error}, item($helo[0])->{last_error}, 'the untried ones carry the same error');

set_nocrm_conf($node, smtp_helo_name => 'crm.nocrm.test');
make_due(@helo);
drain($node);
is(sql($node, "SELECT string_agg(DISTINCT state, ',') FROM nocrm.queue WHERE id IN (" . join(',', @helo) . ')'),
	'done', 'with nocrm.smtp_helo_name fixed they are delivered');
my $m = message_of($helo[0]);
like($m ? $m->{received}[0] : '', qr/^from crm\.nocrm\.test /, 'greeting with nocrm.smtp_helo_name');

# --- refusals about the message stay per message ------------------------------

my ($rej, $temp) = queue_mails([ 'Rejected', 'reject@client.example' ], [ 'Deferred', 'tempfail@client.example' ]);
drain($node);
my $r = item($rej);
is("$r->{state}/$r->{attempts}", 'dead/1', 'a refused recipient is dead at once');
like($r->{last_error}, qr/server said "5\d\d 5\.1\.1 <reject\@client\.example>: Recipient address rejected: test user refused"/,
	'with the server\'s answer');
is(item($temp)->{state}, 'pending', 'a deferred recipient is retried');
like(item($temp)->{last_error}, qr/450 4\.2\.0/, 'with the 4xx answer');
sql($node, "UPDATE nocrm.queue SET state = 'cancelled' WHERE id = $temp");

# --- TLS trust ------------------------------------------------------------------

set_nocrm_conf($node, smtp_url => $tls_url, smtp_tls => 'require', smtp_helo_name => '',
	mail_from_name => 'The "Butler", CRM');
my ($t1) = queue_mails([ 'TLS without CA', 'tls1@client.example' ]);
drain($node);
is(item($t1)->{state}, 'pending', 'STARTTLS, private CA not configured: not sent, not dead');
like(item($t1)->{last_error},
	qr/^SMTP TLS: the server's certificate was not accepted \(SSL peer certificate or SSH remote key was not OK: SSL certificate problem: unable to get local issuer certificate\); set nocrm\.smtp_ca_file /,
	'the error names nocrm.smtp_ca_file');

set_nocrm_conf($node, smtp_tls => 'try');
make_due($t1);
drain($node);
like(item($t1)->{last_error}, qr/certificate was not accepted/, 'smtp_tls = try does not fall back to plain text on a bad certificate');

set_nocrm_conf($node, smtp_ca_file => $pf{ca_file});
make_due($t1);
drain($node);
is(item($t1)->{state}, 'done', 'with nocrm.smtp_ca_file the email is delivered');
$m = message_of($t1);
like($m ? $m->{received}[0] : '', qr/using TLS/, 'over TLS (postfix\'s Received header)');
is_deeply($m ? $m->{from} : [], [ { name => 'The "Butler", CRM', local => 'butler', domain => 'nocrm.test' } ],
	'an ASCII display name with quotes and a comma survives quoting');
is_deeply($m ? $m->{errors} : ['none'], [], 'and passes the strict checks');

set_nocrm_conf($node, smtp_tls_server_name => 'other.nocrm.test');
my ($t2) = queue_mails([ 'TLS wrong name', 'tls2@client.example' ]);
drain($node);
like(item($t2)->{last_error}, qr/certificate was not accepted .*no alternative certificate subject name matches target host name 'other\.nocrm\.test'/,
	'nocrm.smtp_tls_server_name is what the certificate is checked against');
set_nocrm_conf($node, smtp_tls_server_name => $pf{hostname});
make_due($t2);
drain($node);
is(item($t2)->{state}, 'done', "the server's own name ($pf{hostname}) verifies, connecting by IP");

set_nocrm_conf($node, smtp_tls_server_name => '', smtp_ca_file => '', smtp_tls_verify => 'off');
my ($t3) = queue_mails([ 'TLS unverified', 'tls3@client.example' ]);
drain($node);
is(item($t3)->{state}, 'done', 'nocrm.smtp_tls_verify = off: encrypted without checking');
$m = message_of($t3);
like($m ? $m->{received}[0] : '', qr/using TLS/, 'still over TLS');

# A CA directory (openssl rehash) instead of a file.
my $ca_dir = PostgreSQL::Test::Utils::tempdir('cadir');
system("cp '$pf{ca_file}' '$ca_dir/nocrm-test-ca.pem' && openssl rehash '$ca_dir'") == 0
  or die 'openssl rehash failed';
set_nocrm_conf($node, smtp_tls_verify => 'on', smtp_ca_path => $ca_dir);
my ($t4) = queue_mails([ 'TLS CA directory', 'tls4@client.example' ]);
drain($node);
is(item($t4)->{state}, 'done', 'nocrm.smtp_ca_path: verified against a hashed CA directory');
set_nocrm_conf($node, smtp_ca_path => '');

# smtps:// (TLS from the first byte), whatever nocrm.smtp_tls says.
set_nocrm_conf($node, smtp_url => "smtps://127.0.0.1:$pf{smtps_port}", smtp_tls => 'none');
my ($t5) = queue_mails([ 'smtps without CA', 'tls5@client.example' ]);
drain($node);
like(item($t5)->{last_error}, qr/^SMTP TLS: the server's certificate was not accepted .*nocrm\.smtp_ca_file/,
	'smtps://: the private CA is needed as well');
set_nocrm_conf($node, smtp_ca_file => $pf{ca_file});
make_due($t5);
drain($node);
is(item($t5)->{state}, 'done', 'smtps:// with nocrm.smtp_ca_file: delivered');
$m = message_of($t5);
like($m ? $m->{received}[0] : '', qr/using TLS/, 'over TLS');

# A pinned public key: trusted without a CA, and nothing else is.
my $pin = `openssl x509 -in '$pfdir/tls/server.crt' -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64`;
chomp $pin;
like($pin, qr{^[A-Za-z0-9+/]{43}=$}, 'the server key\'s SHA-256 pin');
set_nocrm_conf($node, smtp_url => $tls_url, smtp_tls => 'require', smtp_ca_file => '', smtp_tls_verify => 'off',
	smtp_tls_pinned_key => 'sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=');
my ($p1) = queue_mails([ 'Pinned, wrong key', 'pin1@client.example' ]);
drain($node);
is(item($p1)->{state}, 'pending', 'a key that does not match the pin: not sent, not dead');
like(item($p1)->{last_error}, qr/^SMTP TLS: the server's public key does not match nocrm\.smtp_tls_pinned_key /,
	'the error names nocrm.smtp_tls_pinned_key');
set_nocrm_conf($node, smtp_tls_pinned_key => "sha256//$pin");
drain($node);
is(item($p1)->{state}, 'done', 'with the right pin it is delivered (no CA needed)');
set_nocrm_conf($node, smtp_tls_pinned_key => '', smtp_tls_verify => 'on');

# A refused sender is a configuration error too (postfix says so at RCPT).
set_nocrm_conf($node, smtp_url => $plain_url, smtp_tls => 'try', smtp_ca_file => '', mail_from => 'butler@nodot',
	smtp_helo_name => 'crm.nocrm.test');
my ($s1) = queue_mails([ 'Sender refused', 'sender1@client.example' ]);
my $sender_warn = drain_stderr();
is(item($s1)->{state}, 'pending', 'sender refused: not a dead letter');
like(item($s1)->{last_error},
	qr/^SMTP configuration error: the server refused the sender: check nocrm\.mail_from .*Sender address rejected: need fully-qualified address/,
	'the error says to check nocrm.mail_from, with the server\'s answer');
like($sender_warn, qr/WARNING:  nocrm: no email can be sent with the current settings/, 'with the WARNING');
set_nocrm_conf($node, mail_from => 'butler@nocrm.test', smtp_helo_name => '');
drain($node);
is(item($s1)->{state}, 'done', 'delivered once nocrm.mail_from is fixed (no attempt was used up, so it is due at once)');

# --- internationalized addresses --------------------------------------------------

set_nocrm_conf($node, smtp_url => $plain_url, smtp_tls_verify => 'on');
my @intl = queue_mails([ 'IDN', 'anna@caffè.example' ], [ 'IDN 2', 'info@bücher-ünd-straße.example' ],
	[ 'UTF-8 local part', 'zoë@example.com' ], [ 'Too long', 'x@' . ('è' x 60) . '.example' ]);
drain($node);
is(sql($node, "SELECT string_agg(state, ',' ORDER BY id) FROM nocrm.queue WHERE id IN (" . join(',', @intl) . ')'),
	'done,done,done,dead', 'three internationalized addresses delivered, one refused');
$m = message_of($intl[0]);
is_deeply($m ? $m->{to} : [], [ { name => '', local => 'anna', domain => 'xn--caff-8oa.example' } ],
	'a non-ASCII domain is IDNA-encoded in To');
is($m ? $m->{headers}{'delivered-to'} : '', 'anna@xn--caff-8oa.example', 'and in the envelope');
is_deeply($m ? $m->{errors} : ['none'], [], 'strict checks pass');
$m = message_of($intl[1]);
is($m ? $m->{headers}{'delivered-to'} : '', 'info@xn--bcher-nd-strae-dgb56bfa.example',
	'each label encoded on its own, ß kept (IDNA2008, not mapped to ss)');
$m = message_of($intl[2]);
is_deeply($m ? $m->{to} : [], [ { name => '', local => 'zoë', domain => 'example.com' } ],
	'a non-ASCII local part is written in UTF-8 (RFC 6532), not as an encoded word');
is($m ? $m->{headers}{'delivered-to'} : '', 'zoë@example.com', 'and sent with SMTPUTF8');
is_deeply($m ? $m->{errors} : ['none'], [], 'strict checks pass');
like(item($intl[3])->{last_error}, qr/^invalid recipient address "x\@è+\.example": a label of its domain is longer than 63 characters once IDNA-encoded$/,
	'an address whose domain cannot be IDNA-encoded is refused with the reason');

my ($ret, $out, $err) = $node->psql('postgres',
	encode_utf8(q|SELECT nocrm.create_automation(name => 'bad to', event => 'lead.creation', actions => '[{"type": "send_email", "template": "pf", "to": "x@| . ('è' x 60) . q|.example"}]')|));
isnt($ret, 0, 'a constant "to" that cannot be sent is refused when the rule is written');
like(decode_utf8($err), qr/cannot be sent to: a label of its domain is longer than 63 characters once IDNA-encoded/,
	'with the reason');

# --- a reused connection the server closes with 421 is reopened at once -------------

my $once_dir = PostgreSQL::Test::Utils::tempdir('once');
my $once = IPC::Run::start([ 'python3', "$FindBin::RealBin/../sinks/smtp_421.py", '--dir', $once_dir ],
	'<', \undef, '>', "$once_dir/out.log", '2>', "$once_dir/err.log");
ok(wait_for(sub { -s "$once_dir/port" }, 20, 'smtp_421.py port'), 'the one-message-per-connection server runs');
my $once_port = slurp_file("$once_dir/port");
chomp $once_port;
set_nocrm_conf($node, smtp_url => "smtp://127.0.0.1:$once_port", smtp_tls => 'none');
my @once = queue_mails(map { [ "Once $_", "once$_\@client.example" ] } 1 .. 3);
drain($node);
is(sql($node, "SELECT string_agg(state || '/' || attempts, ',' ORDER BY id) FROM nocrm.queue WHERE id IN (" . join(',', @once) . ')'),
	'done/1,done/1,done/1', '421 on the reused connection: each email sent at once on a new one, in the same run');
my @got = map { JSON::PP->new->decode($_) } split /\n/, slurp_file("$once_dir/mail.jsonl");
is(scalar @got, 3, 'the server received three messages');
is(scalar(keys %{ { map { $_->{connection} => 1 } @got } }), 3, 'on three connections');

# The same server closing the reused connection without a word.
my $close_dir = PostgreSQL::Test::Utils::tempdir('close');
my $closer = IPC::Run::start([ 'python3', "$FindBin::RealBin/../sinks/smtp_421.py", '--dir', $close_dir, '--close' ],
	'<', \undef, '>', "$close_dir/out.log", '2>', "$close_dir/err.log");
ok(wait_for(sub { -s "$close_dir/port" }, 20, 'smtp_421.py --close port'), 'the closing server runs');
my $close_port = slurp_file("$close_dir/port");
chomp $close_port;
set_nocrm_conf($node, smtp_url => "smtp://127.0.0.1:$close_port");
my @closed = queue_mails(map { [ "Closed $_", "closed$_\@client.example" ] } 1 .. 3);
drain($node);
is(sql($node, "SELECT string_agg(state || '/' || attempts, ',' ORDER BY id) FROM nocrm.queue WHERE id IN (" . join(',', @closed) . ')'),
	'done/1,done/1,done/1', 'a reused connection closed under the next MAIL: each email sent at once on a new one');
is(scalar(split /\n/, slurp_file("$close_dir/mail.jsonl")), 3, 'the server received three messages');
$closer->kill_kill;
set_nocrm_conf($node, smtp_url => "smtp://127.0.0.1:$once_port");

# A non-ASCII local part to a server that does not offer SMTPUTF8: refused
# before the message is sent; the next email goes out.
my @noutf8 = queue_mails([ 'UTF-8 to old server', 'zoë@example.com' ], [ 'ASCII after it', 'once4@client.example' ]);
drain($node);
is(sql($node, "SELECT string_agg(state, ',' ORDER BY id) FROM nocrm.queue WHERE id IN (" . join(',', @noutf8) . ')'),
	'dead,done', 'no SMTPUTF8 offered: the UTF-8 address is dead, the next email delivered');
like(item($noutf8[0])->{last_error},
	qr/^SMTP: the recipient "zoë\@example\.com" has a non-ASCII local part, which needs SMTPUTF8 \(RFC 6531\), and the server at nocrm\.smtp_url does not offer it; the message was not sent$/,
	'with the reason');
@got = map { JSON::PP->new->decode($_) } split /\n/, slurp_file("$once_dir/mail.jsonl");
is(join(',', map { @{ $_->{rcpt} } } @got[ 3 .. $#got ]), '<once4@client.example>',
	'the server received the ASCII one only');
$once->kill_kill;

# --- webhooks over https with a private CA -------------------------------------------

my $tls_dir = PostgreSQL::Test::Utils::tempdir('https');
my $openssl_ok = system(<<"SH") == 0;
set -e
cd '$tls_dir'
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj '/CN=nocrm hook CA' -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj '/CN=127.0.0.1' -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\n' > ext.cnf
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile ext.cnf -out server.crt 2>/dev/null
SH
ok($openssl_ok, 'a private CA and a server certificate for 127.0.0.1');
my $https = IPC::Run::start(
	[ 'python3', "$FindBin::RealBin/../sinks/https_sink.py", '--dir', $tls_dir, '--cert', "$tls_dir/server.crt",
		'--key', "$tls_dir/server.key" ],
	'<', \undef, '>', "$tls_dir/out.log", '2>', "$tls_dir/err.log");
ok(wait_for(sub { -s "$tls_dir/port" }, 20, 'https_sink.py port'), 'the https receiver runs');
my $https_port = slurp_file("$tls_dir/port");
chomp $https_port;
my $hook_rule = sql($node, "SELECT nocrm.create_automation(name => 'https hook', event => 'lead.creation', actions => "
	  . "'[{\"type\": \"webhook\", \"url\": \"https://127.0.0.1:$https_port/hook\"}]')");
my $before = sql($node, 'SELECT coalesce(max(id), 0) FROM nocrm.queue');
sql($node, "INSERT INTO nocrm.leads (title) VALUES ('Hook over TLS')");
my ($hook1) = split /\n/, sql($node, "SELECT id FROM nocrm.queue WHERE id > $before AND kind = 'webhook'");
drain($node);
is(item($hook1)->{state}, 'dead', 'https with a private CA not configured: dead at once');
like(item($hook1)->{last_error},
	qr/^HTTP TLS: the server's certificate was not accepted \(.*unable to get local issuer certificate\); set nocrm\.http_ca_file /,
	'the error names nocrm.http_ca_file');
set_nocrm_conf($node, http_ca_file => "$tls_dir/ca.crt");
is(sql($node, "SELECT nocrm.requeue_dead(ARRAY[$hook1])"), 1, 'requeued');
drain($node);
is(item($hook1)->{state}, 'done', 'with nocrm.http_ca_file the webhook is delivered');
is(scalar(split /\n/, slurp_file("$tls_dir/requests.jsonl")), 1, 'the receiver got it once');
sql($node, "SELECT nocrm.delete_automation($hook_rule)");
$https->kill_kill;

$sink->stop;
$node->stop;
done_testing();
