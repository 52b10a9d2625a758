
# Packaging: the versions of the control file, META.json, the CHANGELOG and
# the built library agree; the license is there.
use strict;
use warnings;

use FindBin;
use JSON::PP;
use PostgreSQL::Test::Utils;
use Test::More;

my $root = "$FindBin::RealBin/../..";
my ($control) = slurp_file("$root/nocrm_automation.control") =~ /^default_version = '([^']+)'/m;
ok($control, "the control file names the default version ($control)");
my $meta = decode_json(slurp_file("$root/META.json"));
like($meta->{version}, qr/^\Q$control\E\.\d+$/, 'META.json is at that version');
is($meta->{provides}{nocrm_automation}{version}, $meta->{version}, 'and so is the extension it provides');
is($meta->{license}, 'postgresql', 'META.json names the license');
like(slurp_file("$root/LICENSE"), qr/PostgreSQL License/, 'LICENSE is the PostgreSQL License');
like(slurp_file("$root/CHANGELOG.md"), qr/^## \Q$control\E\b/m, 'the CHANGELOG has an entry for it');
my @updates = glob("$root/nocrm_automation--*--$control.sql");
is(scalar(@updates), 1, "one update script reaches $control");
my $so = "$root/nocrm_automation.so";
SKIP:
{
	skip 'the library is not built here', 1 unless -e $so;
	my $lib = slurp_file($so);
	like($lib, qr{nocrm_automation/\Q$control\E\0}, 'the built library says it (webhook User-Agent)');
}
done_testing();
