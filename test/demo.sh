#!/usr/bin/env bash
# The demo:  bash test/demo.sh   (as root; a fresh Debian 12 is fine)
#
# Installs the dependencies, builds and installs the extension (via
# test/check.sh --install-only), then starts a throwaway PostgreSQL server as
# the postgres user, creates database "demo" with pg_cron and
# nocrm_automation, and runs test/demo.sql: the automations of noCRM's help
# page at work.  The server and its directory are removed on exit.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export LANG=C.UTF-8 LC_ALL=C.UTF-8

bash "$HERE/check.sh" --install-only </dev/null

BIN=$(/usr/bin/pg_config --bindir)
PORT=54329                                   # only names the socket: no TCP listener
TMP=$(mktemp -d /tmp/nocrm_demo.XXXXXX)      # data directory, socket and log
chown postgres:postgres "$TMP"
cd "$TMP"                                    # a cwd the postgres user can enter

as_pg() { runuser -u postgres -- "$@"; }
cleanup() {
    if [ -f "$TMP/data/postmaster.pid" ]; then
        as_pg "$BIN/pg_ctl" -D "$TMP/data" -m fast -w stop >/dev/null || true
    fi
    cd / && rm -rf "$TMP"
}
trap cleanup EXIT

echo "== starting a throwaway server in $TMP"
as_pg "$BIN/initdb" -D "$TMP/data" -U postgres -A trust -E UTF8 >/dev/null
cat >>"$TMP/data/postgresql.conf" <<EOF
listen_addresses = ''
port = $PORT
unix_socket_directories = '$TMP'
shared_preload_libraries = 'pg_cron'
cron.database_name = 'demo'
EOF
if ! as_pg "$BIN/pg_ctl" -D "$TMP/data" -l "$TMP/server.log" -w start >/dev/null; then
    cat "$TMP/server.log"
    exit 1
fi

# psql reads demo.sql from stdin: the postgres user may not be able to read the checkout.
PSQL=(as_pg "$BIN/psql" -X -q -h "$TMP" -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -P pager=off)
"${PSQL[@]}" -d postgres -c 'CREATE DATABASE demo'
"${PSQL[@]}" -d demo -c 'CREATE EXTENSION pg_cron' -c 'CREATE EXTENSION nocrm_automation'
"${PSQL[@]}" -d demo -f - <"$HERE/demo.sql"
echo "== demo done; stopping the server"
