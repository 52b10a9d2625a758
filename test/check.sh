#!/usr/bin/env bash
# The test command:  bash test/check.sh   (as root; a fresh Debian 12 is fine)
#
#  1. installs the build and test dependencies with apt (skipped when they are
#     all installed already, unless NOCRM_FORCE_APT=1);
#  2. builds the extension with PGXS and installs it (as root);
#  3. runs `make installcheck` as the postgres user: pg_regress (sql/*.sql),
#     pg_isolation_regress (specs/*.spec) and prove (TAP_TESTS), each on
#     its own temporary instance (see the Makefile);
#  4. counts the results and ends with the line "N passed, N failed".
#
# initdb and postgres refuse to run as root, and the postgres user may not be
# able to reach the checkout (e.g. under /root), so steps 2-3 run in a copy of
# the tree in a mktemp directory owned by postgres.  The test outputs
# (results/, output_iso/, regression.diffs, tmp_check/log/) are copied back
# into the checkout afterwards (all git-ignored).
#
#   bash test/check.sh --install-only   dependencies + build + install only (used by test/demo.sh)
#   NOCRM_KEEP_TMP=1                    keep the temporary copy
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PG_CONFIG=/usr/bin/pg_config
export DEBIAN_FRONTEND=noninteractive
# initdb of the temporary instances takes the locale from the environment; a
# CI environment may name one that is not generated.  C.UTF-8 always exists.
export LANG=C.UTF-8 LC_ALL=C.UTF-8

PACKAGES=(postgresql-15 postgresql-server-dev-15 postgresql-15-cron libcurl4-openssl-dev
          build-essential gcc make python3-aiosmtpd libipc-run-perl postfix openssl)
# The test MTA (test/sinks/postfixctl.sh) runs its own instance on 127.0.0.1;
# the package's own configuration only needs to install without questions.
POSTFIX_DIR=/var/tmp/nocrm-postfix

if [ "$(id -u)" -ne 0 ]; then
    echo "check.sh: run me as root (I install packages and the extension)" >&2
    exit 1
fi

# ---------------------------------------------------------------- packages
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -qx 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ] && [ "${NOCRM_FORCE_APT:-0}" != 1 ]; then
    echo "== dependencies already installed (NOCRM_FORCE_APT=1 to reinstall)"
else
    echo "== apt-get install (missing: ${missing[*]:-none})"
    printf '%s\n' "postfix postfix/main_mailer_type select Local only" \
        "postfix postfix/mailname string nocrm-test.localdomain" | debconf-set-selections
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" </dev/null
fi

# ---------------------------------------------------------------- build + install
WORK=$(mktemp -d /tmp/nocrm_check.XXXXXX)
cleanup() {
    if [ "${NOCRM_KEEP_TMP:-0}" = 1 ]; then echo "== kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# Copy the tree without git metadata or build and test leftovers.
tar -C "$ROOT" -cf - --exclude=./.git --exclude='./tmp_check*' --exclude=./results \
    --exclude=./output_iso --exclude=./log --exclude='*.o' --exclude='*.so' --exclude='*.bc' \
    --exclude=regression.diffs --exclude=regression.out . | tar -C "$WORK" -xf -

echo "== make && make install"
if ! { make -C "$WORK" --no-print-directory -j2 PG_CONFIG="$PG_CONFIG" && make -C "$WORK" --no-print-directory install PG_CONFIG="$PG_CONFIG"; }; then
    echo "BUILD FAILED"
    echo "0 passed, 1 failed"
    exit 1
fi
if [ "${1:-}" = --install-only ]; then
    echo "== installed"
    exit 0
fi
chown -R postgres:postgres "$WORK"

# ---------------------------------------------------------------- test MTA
# postfix's master starts as root, so it is started here and stopped on exit;
# test/t/110_postfix.pl skips when it is not running (e.g. prove by hand).
mta_failed=0
if bash "$ROOT/test/sinks/postfixctl.sh" start "$POSTFIX_DIR"; then
    trap 'bash "$ROOT/test/sinks/postfixctl.sh" stop "$POSTFIX_DIR"; cleanup' EXIT
else
    echo "!! the test postfix did not start: counted as 1 failure (110_postfix.pl will skip)"
    mta_failed=1
fi

# ---------------------------------------------------------------- tests
# One make call per suite, so that a failing regression suite does not hide
# the isolation and TAP results (PGXS runs them in one recipe and stops at the
# first failure).  A variable set empty on the command line turns its suite
# off; the TAP pass does nothing unless the Makefile sets TAP_TESTS.
# --verbose makes prove print one "ok N"/"not ok N" line per test.
SUITES=(
    "regress|ISOLATION= TAP_TESTS="
    "isolation|REGRESS= TAP_TESTS="
    "tap|REGRESS= ISOLATION="
)
passed=0 failed=$mta_failed tap_failed=0
for suite in "${SUITES[@]}"; do
    name=${suite%%|*}
    read -r -a vars <<<"${suite#*|}"
    echo "== make installcheck: $name"
    set +e
    (cd "$WORK" && runuser -u postgres -- make installcheck PG_CONFIG="$PG_CONFIG" \
        PROVE_FLAGS=--verbose "${vars[@]}") 2>&1 | tee "$WORK/check_$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    # pg_regress / pg_isolation_regress (PG 15):
    #   "test foo          ... ok       12 ms"    "     foo  ... FAILED"   (parallel group)
    # prove --verbose, and pg_regress from PG 16 on:  "ok 3 - foo"  "not ok 4 - bar"
    # (indented TAP lines are subtests, already summed up by their parent line).
    read -r p f < <(awk '
        /^(test +| +)[^ ]+ +\.\.\. +ok( |$)/                 { p++; next }
        /^(test +| +)[^ ]+ +\.\.\. +FAILED/                  { f++; next }
        /^(test +| +)[^ ]+ +\.\.\. +diff: /                  { f++; next }   # no expected file: pg_regress stops
        /^(not )?ok [0-9]+.*# *TODO/                          { next }        # known gaps: neither
        /^not ok [0-9]+/                                     { f++; next }
        /^ok [0-9]+/                                         { p++; next }
        END { print p + 0, f + 0 }' "$WORK/check_$name.log")
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        echo "!! $name: make installcheck exited with status $rc without a failing test: counted as 1 failure"
        f=1
    fi
    echo "== $name: $p passed, $f failed"
    if [ "$name" = tap ] && [ "$f" -ne 0 ]; then tap_failed=1; fi
    passed=$((passed + p)) failed=$((failed + f))
done

# Bring the outputs back into the checkout (git-ignored), replacing old ones,
# so that results/*.out can be inspected or copied to expected/.
rm -rf "$ROOT/results" "$ROOT/output_iso" "$ROOT/regression.diffs" "$ROOT/regression.out" "$ROOT/tmp_check"
for f in results output_iso regression.diffs regression.out tmp_check/log; do
    if [ -e "$WORK/$f" ]; then
        mkdir -p "$(dirname "$ROOT/$f")"
        cp -r "$WORK/$f" "$ROOT/$f"
    fi
done

if [ "$failed" -ne 0 ]; then
    for d in regression.diffs output_iso/regression.diffs; do
        if [ -s "$WORK/$d" ]; then
            echo "================ $d"
            cat "$WORK/$d"
        fi
    done
    if [ "$tap_failed" = 1 ]; then echo "(TAP test logs: $ROOT/tmp_check/log)"; fi
fi
if [ $((passed + failed)) -eq 0 ]; then
    echo "!! no test ran"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
