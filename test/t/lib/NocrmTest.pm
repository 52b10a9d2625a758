# Shared helpers of the nocrm_automation TAP tests: the SMTP/HTTP sink of
# test/sinks, a node with the extension and delivery settings, email parsing.
package NocrmTest;

use strict;
use warnings;

use Cwd qw(abs_path);
use Encode qw(decode encode_utf8 decode_utf8);
use Exporter qw(import);
use File::Basename qw(dirname);
use HTTP::Tiny;
use IPC::Run;
use JSON::PP;
use MIME::Base64 qw(decode_base64);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

our @EXPORT = qw(start_sink nocrm_node set_nocrm_conf drain start_drain finish_drain wait_for
  parse_email decode_words sql);

# libcurl in the backends reads these: the sink is on 127.0.0.1, never proxied.
BEGIN
{
	delete $ENV{$_}
	  for qw(http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY
	  ftp_proxy FTP_PROXY no_proxy);
	$ENV{NO_PROXY} = '127.0.0.1';
	$ENV{PGCLIENTENCODING} = 'UTF8';
}

my $sinks_dir = abs_path(dirname(__FILE__) . '/../../sinks');
my @running_sinks;

# ------------------------------------------------------------------ sink ---

# Starts test/sinks/sink.py on free ports in a fresh temporary directory.
sub start_sink
{
	my $dir = PostgreSQL::Test::Utils::tempdir('sink');
	local $ENV{NOCRM_SMTP_PORT} = 0;
	local $ENV{NOCRM_HTTP_PORT} = 0;
	my $out = `$sinks_dir/sinkctl.sh start '$dir' 2>&1`;
	die "sink did not start: $out" if $? != 0;
	my $ports = decode_json(slurp_file("$dir/ports.json"));
	my $self = bless {
		dir => $dir,
		smtp_port => $ports->{smtp},
		http_port => $ports->{http},
		http => HTTP::Tiny->new(proxy => undef, http_proxy => undef, timeout => 15),
	}, 'NocrmTest::Sink';
	push @running_sinks, $self;
	note "sink in $dir: smtp $self->{smtp_port}, http $self->{http_port}";
	return $self;
}

END
{
	$_->stop for @running_sinks;
}

package NocrmTest::Sink;

use JSON::PP;
use Time::HiRes qw(usleep);

sub dir { $_[0]{dir} }
sub smtp_url { "smtp://127.0.0.1:$_[0]{smtp_port}" }

# A URL of the HTTP sink, e.g. $sink->url('/status/500').
sub url { "http://127.0.0.1:$_[0]{http_port}$_[1]" }

sub control
{
	my ($self, $what) = @_;
	my $r = $self->{http}->post($self->url("/control/$what"), { content => '' });
	die "sink control $what failed: $r->{status} $r->{content}" unless $r->{success};
	return;
}

sub _jsonl
{
	my ($self, $file) = @_;
	my $path = "$self->{dir}/$file";
	return [] unless -e $path;
	open my $fh, '<:raw', $path or die "cannot open $path: $!";
	my @rows;
	while (my $line = <$fh>)
	{
		# a line is complete once its newline is there
		last unless $line =~ /\n\z/;
		push @rows, JSON::PP->new->utf8->decode($line);
	}
	close $fh;
	return \@rows;
}

# Everything the SMTP sink accepted, oldest first.
sub mails { $_[0]->_jsonl('mail.jsonl') }

# Every request the HTTP sink recorded, oldest first.
sub requests { $_[0]->_jsonl('http.jsonl') }

sub stop
{
	my ($self) = @_;
	return if $self->{stopped};
	$self->{stopped} = 1;
	system("$sinks_dir/sinkctl.sh", 'stop', $self->{dir}) == 0
	  or warn "stopping the sink in $self->{dir} failed";
	return;
}

package NocrmTest;

# ------------------------------------------------------------------ node ---

# A started node with the extension, delivering to $sink.  %opts: conf (extra
# postgresql.conf text, or a sub returning it given the node), settings
# (hashref of nocrm.* settings).
sub nocrm_node
{
	my ($name, $sink, %opts) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(extra => [ '--encoding=UTF8', '--locale=C' ]);
	my %settings = (
		smtp_url => $sink->smtp_url,
		smtp_tls => 'none',
		mail_from => 'butler@nocrm.test',
		push_url => $sink->url('/push'),
		webhook_secret => 'test-secret',
		connect_timeout => 2000,
		drain_poll_interval => 50,
		%{ $opts{settings} // {} });
	$node->append_conf('postgresql.conf',
		join('', map { "nocrm.$_ = '$settings{$_}'\n" } sort keys %settings)
		  . (ref $opts{conf} eq 'CODE' ? $opts{conf}->($node) : $opts{conf} // ''));
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION nocrm_automation');
	return $node;
}

# Changes nocrm.* settings in postgresql.conf, reloads, and waits until new
# sessions see them (values in the settings' base units: seconds, ms).
sub set_nocrm_conf
{
	my ($node, %settings) = @_;
	$node->append_conf('postgresql.conf',
		join('', map { "nocrm.$_ = '$settings{$_}'\n" } sort keys %settings));
	$node->reload;
	my $check = join(' AND ',
		map { "(SELECT setting FROM pg_settings WHERE name = 'nocrm.$_') = '$settings{$_}'" }
		  sort keys %settings);
	wait_for(
		sub {
			$node->safe_psql('postgres',
				"LOAD 'nocrm_automation'; SELECT $check") eq 't';
		},
		30,
		'settings reloaded: ' . join(', ', map { "$_=$settings{$_}" } sort keys %settings))
	  or die 'configuration reload not seen';
	return;
}

# CALL nocrm.drain(0): delivers whatever is due now.
sub drain
{
	my ($node) = @_;
	$node->safe_psql('postgres', 'CALL nocrm.drain(0)');
	return;
}

# Starts psql running CALL nocrm.drain($run_time) in the background, after
# the optional SET statements (each sent on its own, so the CALL stays outside
# a transaction block), as the optional user.  Returns a hash with the
# IPC::Run harness (h) and its stdout/stderr; finish_drain waits for it.
sub start_drain
{
	my ($node, %opts) = @_;
	my $run_time = $opts{run_time} // 0;
	my %d = (stdout => '', stderr => '');
	my @cmd = (
		'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d',
		$node->connstr('postgres') . ($opts{user} ? " user=$opts{user}" : ''),
		(map { ('-c', $_) } @{ $opts{before} // [] }),
		'-c', "CALL nocrm.drain($run_time)");
	{
		local %ENV = $node->_get_env();
		$d{h} = IPC::Run::start(\@cmd, '<', \undef, '>', \$d{stdout}, '2>', \$d{stderr});
	}
	return \%d;
}

# Waits for a drain started by start_drain; returns true when psql succeeded.
sub finish_drain
{
	my ($d) = @_;
	my $ok = $d->{h}->finish;
	return $ok;
}

# Polls $cond every 0.1 s until it returns true or $timeout seconds pass.
sub wait_for
{
	my ($cond, $timeout, $what) = @_;
	my $deadline = time() + $timeout;
	while (1)
	{
		return 1 if $cond->();
		if (time() > $deadline)
		{
			diag "timed out after $timeout s waiting for: $what";
			return 0;
		}
		usleep(100_000);
	}
}

# safe_psql on database postgres with character strings in and out (UTF-8
# on the wire), so non-ASCII text can be written as it is.
sub sql
{
	my ($node, $query) = @_;
	return decode_utf8($node->safe_psql('postgres', encode_utf8($query)));
}

# ----------------------------------------------------------------- email ---

# Decodes RFC 2047 encoded words (UTF-8, B or Q); whitespace between adjacent
# encoded words is dropped, as the RFC says.  Returns a character string.
sub decode_words
{
	my ($value) = @_;
	$value =~ s/(\?=)\s+(?==\?)/$1/g;
	my $bytes = '';
	my $pos = 0;
	while ($value =~ /=\?([^?]+)\?([BbQq])\?([^?]*)\?=/g)
	{
		my ($charset, $enc, $text, $start, $end) = ($1, uc $2, $3, $-[0], $+[0]);
		die "unexpected charset $charset" unless $charset =~ /^utf-8$/i;
		$bytes .= encode_utf8(substr($value, $pos, $start - $pos));
		if ($enc eq 'B')
		{
			$bytes .= decode_base64($text);
		}
		else
		{
			$text =~ tr/_/ /;
			$text =~ s/=([0-9A-Fa-f]{2})/chr(hex($1))/ge;
			$bytes .= $text;
		}
		$pos = $end;
	}
	$bytes .= encode_utf8(substr($value, $pos));
	return decode('UTF-8', $bytes, Encode::FB_CROAK);
}

# Splits a raw RFC 5322 message (CRLF line ends) into
#   header_lines: the physical header lines as sent,
#   headers: [ [name, unfolded raw value], ... ] in order,
#   header: { lc name => decoded value } (last one wins),
#   body_raw, body (base64 and UTF-8 decoded when so declared, CRLF as \n).
sub parse_email
{
	my ($raw) = @_;
	my ($head, $body) = split /\r\n\r\n/, $raw, 2;
	die "no header/body separator" unless defined $body;
	my @lines = split /\r\n/, $head, -1;
	my @headers;
	for my $line (@lines)
	{
		if ($line =~ /^[ \t]/ && @headers)
		{
			$headers[-1][1] .= $line;    # unfold: CRLF removed, WSP kept
		}
		elsif ($line =~ /^([!-9;-~]+):[ \t]*(.*)\z/s)
		{
			push @headers, [ $1, $2 ];
		}
		else
		{
			push @headers, [ undef, $line ];    # not a header line at all
		}
	}
	my %header;
	for my $h (@headers)
	{
		next unless defined $h->[0];
		(my $v = $h->[1]) =~ s/^\s+|\s+$//g;
		$header{ lc $h->[0] } = decode_words($v);
	}
	my $decoded = $body;
	if (lc($header{'content-transfer-encoding'} // '') eq 'base64')
	{
		$decoded = decode('UTF-8', decode_base64($body), Encode::FB_CROAK);
		# text is sent with CRLF line ends (RFC 2045); a reader turns them into its own
		$decoded =~ s/\r\n/\n/g if ($header{'content-type'} // '') =~ m{^text/}i;
	}
	return {
		header_lines => \@lines,
		headers => \@headers,
		header => \%header,
		body_raw => $body,
		body => $decoded,
	};
}

1;
