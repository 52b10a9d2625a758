#!/bin/bash
# hosts_bench.sh — one drain round with webhooks to several hosts, one of
# which hangs or all of which are slow: how long until the other hosts'
# webhooks and the emails are delivered, and how long CALL nocrm.drain(0)
# takes in all.  Run it once per build to compare (e.g. before and after the
# libcurl multi interface).
#
#   PGBIN=/path/to/15/bin bash test/bench/hosts_bench.sh     (as root)
#
# PGBIN defaults to $(pg_config --bindir); the extension must be installed
# for that server.  Starts a throwaway server (unix socket in a mktemp dir,
# run as postgres) and four sinks of test/sinks (four hosts), removes them
# on exit.  Two cases, REPEATS times each, medians printed:
#   hang: 4 hosts x 5 webhooks, host 4 never answers (request_timeout 2 s),
#         plus 5 emails;
#   slow: 4 hosts x 5 webhooks, every answer takes 300 ms, plus 5 emails;
#   bulk: N_BULK webhooks to one fast host (throughput).
# Knobs: REPEATS=3 N_BULK=2000 CASES="hang slow bulk" PORT=55434 KEEP=1
set -euo pipefail

REPEATS=${REPEATS:-3}
N_BULK=${N_BULK:-2000}
PORT=${PORT:-55434}
PGBIN=${PGBIN:-$(pg_config --bindir)}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
SINKCTL="$ROOT/test/sinks/sinkctl.sh"
PY=/usr/bin/python3

die() { echo "hosts_bench: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (it starts PostgreSQL as postgres with runuser)"
WORK="$(mktemp -d /tmp/hosts_bench.XXXXXX)"
chown postgres "$WORK"
PGDATA="$WORK/data"
cleanup() {
    for i in 1 2 3 4; do
        [ -f "$WORK/sink$i/sink.pid" ] && bash "$SINKCTL" stop "$WORK/sink$i" >/dev/null 2>&1
    done
    [ -f "$PGDATA/postmaster.pid" ] &&
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1
    [ "${KEEP:-}" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT

for i in 1 2 3 4; do
    mkdir -p "$WORK/sink$i"
    NOCRM_SMTP_PORT=0 NOCRM_HTTP_PORT=0 bash "$SINKCTL" start "$WORK/sink$i" >/dev/null
done
http_port() { "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["http"])' "$WORK/sink$1/ports.json"; }
SMTP_PORT="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["smtp"])' "$WORK/sink1/ports.json")"

runuser -u postgres -- "$PGBIN/initdb" -D "$PGDATA" -A trust -U postgres -E UTF8 --locale=C \
    --no-instructions >"$WORK/initdb.log" 2>&1 || die "initdb failed"
cat >>"$PGDATA/postgresql.conf" <<EOF
listen_addresses = ''
port = $PORT
unix_socket_directories = '$WORK'
nocrm.smtp_url = 'smtp://127.0.0.1:$SMTP_PORT'
nocrm.smtp_tls = 'none'
nocrm.mail_from = 'butler@nocrm.test'
nocrm.request_timeout = '2s'
nocrm.connect_timeout = '2s'
nocrm.retry_base = '1h'
EOF
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/postgres.log" -w start >/dev/null ||
    die "PostgreSQL did not start"
psql_() { runuser -u postgres -- "$PGBIN/psql" -h "$WORK" -p "$PORT" -XAtq -v ON_ERROR_STOP=1 -d postgres "$@"; }
psql_ -c 'CREATE EXTENSION nocrm_automation' \
      -c "INSERT INTO nocrm.email_templates (name, subject, body) VALUES ('b', 'Hi {{lead.title}}', 'Hi')"

# one case: queue 4 x 5 webhooks (host 4's path $2, the others' $1) and 5 emails, drain
run_case() {
    local fast_path=$1 slow_path=$2
    local actions="[" i
    for i in 1 2 3; do actions+="{\"type\":\"webhook\",\"url\":\"http://127.0.0.1:$(http_port $i)$fast_path\"},"; done
    actions+="{\"type\":\"webhook\",\"url\":\"http://127.0.0.1:$(http_port 4)$slow_path\"},"
    actions+="{\"type\":\"send_email\",\"template\":\"b\",\"to\":\"m@client.example\"}]"
    psql_ -c "DELETE FROM nocrm.queue" -c "DELETE FROM nocrm.webhook_hosts" 2>/dev/null ||
        psql_ -c "DELETE FROM nocrm.queue"
    psql_ -c "SELECT nocrm.delete_automation(id) FROM nocrm.automations" >/dev/null
    psql_ -c "SELECT nocrm.create_automation(name => 'bench', event => 'lead.creation', actions => '$actions')" >/dev/null
    psql_ -c "INSERT INTO nocrm.leads (title) SELECT 'L' || i FROM generate_series(1, 5) i"
    psql_ -c "UPDATE nocrm.queue SET run_at = now()"
    # seconds: whole CALL, until the last fast webhook, until the last email
    psql_ <<'SQL'
\set QUIET on
SELECT clock_timestamp() AS t0 \gset
CALL nocrm.drain(0);
SELECT round(extract(epoch FROM clock_timestamp() - :'t0')::numeric, 2) || ' ' ||
       round(extract(epoch FROM max(delivered_at) FILTER (WHERE kind = 'webhook') - :'t0')::numeric, 2) || ' ' ||
       round(extract(epoch FROM max(delivered_at) FILTER (WHERE kind = 'email') - :'t0')::numeric, 2) || ' ' ||
       count(*) FILTER (WHERE state = 'done')
  FROM nocrm.queue;
SQL
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# throughput to one fast host: N_BULK webhooks, one CALL
bulk_case() {
    psql_ -c "DELETE FROM nocrm.queue" -c "SELECT nocrm.delete_automation(id) FROM nocrm.automations" >/dev/null
    psql_ -c "SELECT nocrm.create_automation(name => 'bulk', event => 'lead.creation', actions => '[{\"type\":\"webhook\",\"url\":\"http://127.0.0.1:$(http_port 1)/bulk\"}]')" >/dev/null
    psql_ -c "INSERT INTO nocrm.leads (title) SELECT 'B' || i FROM generate_series(1, $N_BULK) i"
    psql_ <<'SQL'
\set QUIET on
SELECT clock_timestamp() AS t0 \gset
CALL nocrm.drain(0);
SELECT round(extract(epoch FROM clock_timestamp() - :'t0')::numeric, 2) || ' ' || count(*) FILTER (WHERE state = 'done')
  FROM nocrm.queue;
SQL
}

for c in ${CASES:-hang slow bulk}; do
    [ "$c" = bulk ] && continue
    : >"$WORK/$c.txt"
    for r in $(seq "$REPEATS"); do
        if [ $c = hang ]; then run_case /ok /hang; else run_case /slow/300 /slow/300; fi >>"$WORK/$c.txt"
    done
    printf '%s: CALL %s s, last other-host webhook %s s, last email %s s, items done %s of 25 (median of %s)\n' "$c" \
        "$(cut -d' ' -f1 "$WORK/$c.txt" | median)" "$(cut -d' ' -f2 "$WORK/$c.txt" | median)" \
        "$(cut -d' ' -f3 "$WORK/$c.txt" | median)" "$(cut -d' ' -f4 "$WORK/$c.txt" | median)" "$REPEATS"
done
case " ${CASES:-bulk} " in *" bulk "*) ;; *) exit 0 ;; esac
: >"$WORK/bulk.txt"
for r in $(seq "$REPEATS"); do bulk_case >>"$WORK/bulk.txt"; done
printf 'bulk: CALL %s s for %s webhooks to one host, done %s (median of %s)\n' \
    "$(cut -d' ' -f1 "$WORK/bulk.txt" | median)" "$N_BULK" "$(cut -d' ' -f2 "$WORK/bulk.txt" | median)" "$REPEATS"
