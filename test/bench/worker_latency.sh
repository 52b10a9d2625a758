#!/bin/bash
# worker_latency.sh — commit -> accepted by the SMTP sink, with the
# background worker (shared_preload_libraries = 'nocrm_automation',
# nocrm.worker_database) and no CALL nocrm.drain() at all.
#
#   bash test/bench/worker_latency.sh       (as root; the extension installed)
#
# A throwaway PostgreSQL 15 (server.sh) and the sink of test/sinks; N_LAT
# single-lead transactions, LAT_GAP_MS apart, each queueing one email; the
# commit time is clock_timestamp() of the next statement on the same
# connection, the acceptance time the sink's received_at.  Prints p50, p90,
# p99 and max (seconds).  Not part of the test suite.
#
# Knobs (environment): N_LAT=200 LAT_GAP_MS=100 KEEP=1 keeps the work directory.
set -euo pipefail

N_LAT=${N_LAT:-200}
LAT_GAP_MS=${LAT_GAP_MS:-100}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=server.sh
. "$HERE/server.sh"
ROOT="$(cd "$HERE/../.." && pwd)"
PY=/usr/bin/python3
UTIL="$HERE/bench_util.py"
SINKCTL="$ROOT/test/sinks/sinkctl.sh"
bench_preamble worker_latency

WORK="$(mktemp -d /tmp/nocrm_wbench.XXXXXX)"
chmod 755 "$WORK"
PGDATA="$WORK/data"
SINKDIR="$WORK/sink"
mkdir -p "$SINKDIR"
chown postgres: "$WORK"

psql_() {
    runuser -u postgres -- "$PGBIN/psql" -h "$WORK" -X -q -v ON_ERROR_STOP=1 -At -d bench "$@"
}
cleanup() {
    local rc=$?
    set +e
    bench_server_stop
    [ -f "$SINKDIR/sink.pid" ] && bash "$SINKCTL" stop "$SINKDIR" >/dev/null 2>&1
    if [ "${KEEP:-0}" = 1 ]; then echo "worker_latency: kept $WORK" >&2; else rm -rf "$WORK"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ports="$(NOCRM_SMTP_PORT=0 NOCRM_HTTP_PORT=0 bash "$SINKCTL" start "$SINKDIR")"
SMTP_PORT="$(sed -n 's/.*smtp=\([0-9]*\).*/\1/p' <<<"$ports")"
bench_server_start "worker_latency.sh" <<EOF
shared_preload_libraries = 'nocrm_automation'
nocrm.worker_database = 'bench'
nocrm.smtp_url = 'smtp://127.0.0.1:$SMTP_PORT'
nocrm.smtp_tls = none
nocrm.mail_from = 'bench@nocrm.test'
EOF
psql_ >/dev/null <<'EOF'
CREATE EXTENSION nocrm_automation;
INSERT INTO nocrm.email_templates (name, subject, body) VALUES
  ('bench', 'Benvenuto, {{lead.title}}', E'Buongiorno,\n\n{{lead.title}}\n\n-- \n{{butler.name}}');
SELECT nocrm.create_automation(name => 'bench email', event => 'lead.creation',
    actions => '[{"type": "send_email", "template": "bench"}]');
CREATE TABLE public.bench_commits (seq integer PRIMARY KEY, committed_at double precision NOT NULL);
EOF
# the worker is up once it has connected
for _ in $(seq 1 100); do
    [ "$(psql_ -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'nocrm drain worker'")" = 1 ] && break
    sleep 0.1
done
sleep 0.5

log "latency: $N_LAT emails, one committed every ${LAT_GAP_MS} ms, drained by the background worker"
gap=$(awk -v ms="$LAT_GAP_MS" 'BEGIN {printf "%.3f", ms / 1000}')
for i in $(seq 1 "$N_LAT"); do
    printf "INSERT INTO nocrm.leads (title, contact_email) VALUES ('Latency %d', 'lat-%d@bench.test');\n" "$i" "$i"
    printf "INSERT INTO bench_commits VALUES (%d, extract(epoch FROM clock_timestamp()));\n" "$i"
    printf "SELECT pg_sleep(%s);\n" "$gap"
done >"$WORK/latency.sql"
psql_ -o /dev/null -f "$WORK/latency.sql"
end=$((SECONDS + 60))
while [ "$("$PY" "$UTIL" count "$SINKDIR/mail.jsonl")" -lt "$N_LAT" ] && [ $SECONDS -lt $end ]; do sleep 0.1; done
psql_ -c "COPY bench_commits TO STDOUT WITH CSV" >"$WORK/commits.csv"
POLL_S=0.5 "$PY" "$UTIL" latency "$WORK/commits.csv" "$SINKDIR/mail.jsonl"
echo "queue: $(psql_ -c "SELECT string_agg(state || '=' || n, ' ') FROM (SELECT state, count(*) n FROM nocrm.queue GROUP BY 1 ORDER BY 1) s")"
