#!/bin/bash
# queue_bench.sh — latency and throughput of nocrm.drain() against the local
# test sinks, side by side with plain clients sending the same requests.
#
#   bash test/bench/queue_bench.sh          (as root; the extension installed)
#
# Starts a throwaway PostgreSQL 15 (initdb in a mktemp dir, run as postgres,
# unix socket in that dir, no TCP) and the SMTP+HTTP sink of test/sinks, and
# removes both on exit.  Measures:
#   1. latency, commit -> accepted by the SMTP sink, of N_LAT single-lead
#      transactions (LAT_GAP_MS apart) while CALL nocrm.drain(120) runs with
#      the default 200 ms poll interval;
#   2. throughput: N_TP webhooks, then N_TP emails, queued by one bulk INSERT
#      each with no drain running, then CALL nocrm.drain(0) timed until the
#      queue is done; the same requests (captured by the sink) are then sent
#      by plain_client.c (libcurl, one reused easy handle, sequential) and by
#      the curl command line (one invocation, --next between requests);
#   3. each throughput measurement REPEATS times; medians reported.
# Writes test/bench/results/queue.md.  Not part of the test suite.
#
# Knobs (environment): N_LAT=1000 LAT_GAP_MS=20 N_TP=10000 REPEATS=3
# KEEP=1 keeps the work directory.
set -euo pipefail

N_LAT=${N_LAT:-1000}
LAT_GAP_MS=${LAT_GAP_MS:-20}
N_TP=${N_TP:-10000}
REPEATS=${REPEATS:-3}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=server.sh
. "$HERE/server.sh"
ROOT="$(cd "$HERE/../.." && pwd)"
PY=/usr/bin/python3
UTIL="$HERE/bench_util.py"
SINKCTL="$ROOT/test/sinks/sinkctl.sh"
T_START=$(date +%s)

die() { echo "queue_bench: $*" >&2; exit 1; }
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

[ "$(id -u)" = 0 ] || die "run as root (it starts PostgreSQL as the postgres user with runuser)"
id postgres >/dev/null 2>&1 || die "no postgres user"
PGBIN="$(pg_config --bindir)"
PGVER="$("$PGBIN/postgres" --version)"
case "$PGVER" in *" 15."*) ;; *) die "needs PostgreSQL 15, found: $PGVER" ;; esac
[ -f "$(pg_config --sharedir)/extension/nocrm_automation.control" ] ||
    die "nocrm_automation is not installed (cd $ROOT && make && make install)"
"$PY" -c 'import aiosmtpd' 2>/dev/null || die "the sink needs python3-aiosmtpd (apt-get install python3-aiosmtpd)"
if ! command -v curl >/dev/null; then
    log "installing curl"
    apt-get install -y -q curl >/dev/null || die "could not install curl"
fi
command -v gcc >/dev/null || die "needs gcc"
# Another `make install` during the run would make new backends load a
# different library than the schema was created with.  So the library is
# copied when the run starts, the extension is created from the install of
# that same moment (checked below), and the throwaway database's C functions
# are pointed at the copy.
EXT_SO="$(pg_config --pkglibdir)/nocrm_automation.so"
EXT_FILES="$EXT_SO $(pg_config --sharedir)/extension/nocrm_automation--1.0.sql $(pg_config --sharedir)/extension/nocrm_automation.control"
# shellcheck disable=SC2086
EXT_STAMP="$(stat -c '%n %Y %s' $EXT_FILES | md5sum)"
check_install() {
    # shellcheck disable=SC2086
    [ "$(stat -c '%n %Y %s' $EXT_FILES | md5sum)" = "$EXT_STAMP" ] ||
        die "the installed nocrm_automation changed while the run was starting (make install?); run again"
}
CURL_FLAGS="$(curl-config --cflags --libs 2>/dev/null || echo -lcurl)"
TCK=$(getconf CLK_TCK)

WORK="$(mktemp -d /tmp/nocrm_bench.XXXXXX)"
chmod 755 "$WORK"
PGDATA="$WORK/data"
SINKDIR="$WORK/sink"
RUN="$WORK/run"            # files written by psql's \! (as postgres)
mkdir -p "$RUN" "$SINKDIR" "$WORK/lib"
cp "$EXT_SO" "$WORK/lib/nocrm_automation.so"
SO_MD5="$(md5sum <"$WORK/lib/nocrm_automation.so" | cut -c1-12)"
chown postgres: "$WORK" "$RUN" "$WORK/lib"
DRAIN_BG=""

psql_() {
    runuser -u postgres -- env PGAPPNAME="${APP:-bench}" "$PGBIN/psql" -h "$WORK" -X -q \
        -v ON_ERROR_STOP=1 -At -d bench "$@"
}

cleanup() {
    local rc=$?
    set +e
    if [ -n "$DRAIN_BG" ] && kill -0 "$DRAIN_BG" 2>/dev/null; then
        psql_ -c "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'bench_drain'" >/dev/null 2>&1
        wait "$DRAIN_BG" 2>/dev/null
    fi
    bench_server_stop
    if [ -f "$SINKDIR/sink.pid" ]; then
        bash "$SINKCTL" stop "$SINKDIR" >/dev/null 2>&1
    fi
    if [ "${KEEP:-0}" = 1 ]; then
        echo "queue_bench: kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- setup ---

log "compiling plain_client"
# shellcheck disable=SC2086
gcc -O2 -Wall -o "$WORK/plain_client" "$HERE/plain_client.c" $CURL_FLAGS

log "starting the sink"
ports="$(NOCRM_SMTP_PORT=0 NOCRM_HTTP_PORT=0 bash "$SINKCTL" start "$SINKDIR")"
SMTP_PORT="$(sed -n 's/.*smtp=\([0-9]*\).*/\1/p' <<<"$ports")"
HTTP_PORT="$(sed -n 's/.*http=\([0-9]*\).*/\1/p' <<<"$ports")"
SINK_PID="$(cat "$SINKDIR/sink.pid")"
SMTP_URL="smtp://127.0.0.1:$SMTP_PORT"
HOOK_URL="http://127.0.0.1:$HTTP_PORT/hook"
MAIL_FROM="bench@nocrm.test"

bench_server_start "queue_bench.sh" <<EOF
max_connections = 20
shared_buffers = 256MB
nocrm.smtp_url = '$SMTP_URL'
nocrm.smtp_tls = none
nocrm.mail_from = '$MAIL_FROM'
EOF

psql_ >/dev/null <<EOF
CREATE EXTENSION nocrm_automation;
INSERT INTO nocrm.email_templates (name, subject, body) VALUES
  ('bench', 'Benvenuto, {{lead.title}}',
   E'Buongiorno,\n\ngrazie per il suo interesse: {{lead.title}} ({{lead.status}}).\nLe scriveremo presto.\n\n-- \n{{butler.name}}');
SELECT nocrm.create_automation(name => 'bench email', event => 'lead.creation',
    actions => '[{"type": "send_email", "template": "bench"}]', enabled => false);
SELECT nocrm.create_automation(name => 'bench webhook', event => 'lead.creation',
    actions => '[{"type": "webhook", "url": "$HOOK_URL"}]', enabled => false);
CREATE TABLE public.bench_commits (seq integer PRIMARY KEY, committed_at double precision NOT NULL);
UPDATE pg_catalog.pg_proc SET probin = '$WORK/lib/nocrm_automation.so'
 WHERE probin = '\$libdir/nocrm_automation';
EOF
check_install
[ "$(psql_ -c "SELECT count(*) FROM pg_proc WHERE probin = '$WORK/lib/nocrm_automation.so'")" -gt 0 ] ||
    die "could not point the C functions at the library snapshot"

only_automation() {  # only_automation 'bench email' | 'bench webhook'
    psql_ -c "SELECT nocrm.set_automation_enabled(id, name = '$1') FROM nocrm.automations" >/dev/null
}
reset_sink() { bash "$SINKCTL" reset "$SINKDIR"; }
count() { "$PY" "$UTIL" count "$1"; }
sink_cpu() { awk -v t="$TCK" '{printf "%.3f\n", ($14 + $15) / t}' "/proc/$SINK_PID/stat"; }
fsub() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f\n", a - b}'; }
wait_lines() {  # wait_lines FILE N TIMEOUT_S
    local end=$((SECONDS + $3))
    while [ "$(count "$1")" -lt "$2" ]; do
        [ $SECONDS -lt $end ] || return 1
        sleep 0.1
    done
}

# ---------------------------------------------------------- 1. latency ---

log "latency: $N_LAT emails, one committed every ${LAT_GAP_MS} ms, CALL nocrm.drain(120) polling every 200 ms"
only_automation 'bench email'
reset_sink
APP=bench_drain psql_ -c "CALL nocrm.drain(120)" >"$WORK/drain_bg.log" 2>&1 &
DRAIN_BG=$!
for _ in $(seq 1 100); do
    [ "$(psql_ -c "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'bench_drain' AND state = 'active'")" = 1 ] && break
    sleep 0.1
done
sleep 0.5
gap=$(awk -v ms="$LAT_GAP_MS" 'BEGIN {printf "%.3f", ms / 1000}')
for i in $(seq 1 "$N_LAT"); do
    # autocommit: each statement is its own transaction, so the second one
    # runs (and reads the clock) right after the lead's COMMIT returned.
    printf "INSERT INTO nocrm.leads (title, contact_email) VALUES ('Latency %d', 'lat-%d@bench.test');\n" "$i" "$i"
    printf "INSERT INTO bench_commits VALUES (%d, extract(epoch FROM clock_timestamp()));\n" "$i"
    printf "SELECT pg_sleep(%s);\n" "$gap"
done >"$WORK/latency.sql"
t0=$(date +%s.%N)
psql_ -o /dev/null -f "$WORK/latency.sql"
t1=$(date +%s.%N)
wait_lines "$SINKDIR/mail.jsonl" "$N_LAT" 60 || log "WARNING: only $(count "$SINKDIR/mail.jsonl") of $N_LAT emails arrived"
psql_ -c "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'bench_drain'" >/dev/null
wait "$DRAIN_BG" || true
DRAIN_BG=""
grep -v "canceling statement due to user request" "$WORK/drain_bg.log" >&2 || true
psql_ -c "COPY bench_commits TO STDOUT WITH CSV" >"$WORK/commits.csv"
LAT_JSON="$("$PY" "$UTIL" latency "$WORK/commits.csv" "$SINKDIR/mail.jsonl")"
LAT_STATES="$(psql_ -c "SELECT string_agg(state || '=' || n, ' ') FROM (SELECT state, count(*) n FROM nocrm.queue GROUP BY 1 ORDER BY 1) s")"
LAT_CONNS="$("$PY" "$UTIL" connections "$SINKDIR/mail.jsonl")"
jget() { "$PY" -c 'import json,sys; v=json.loads(sys.argv[1])[sys.argv[2]]; print(v if isinstance(v, int) else "%.3f" % v)' "$LAT_JSON" "$1"; }
log "latency: $LAT_JSON (driver took $(fsub "$t1" "$t0") s; queue: $LAT_STATES)"

# ------------------------------------------------------- 2. throughput ---

declare -A RES   # RES[kind,who,rep] = wall seconds; RESC = client CPU; RESS = sink CPU
declare -A RESC RESS NOTE

timed_drain() {  # timed_drain TAG -> sets D_WALL D_CPU
    local tag=$1
    APP=bench_tp psql_ <<EOF >/dev/null
SELECT pg_backend_pid() AS bpid \gset
\setenv BPID :bpid
\! date +%s.%N > $RUN/$tag.t0; awk '{print \$14 + \$15}' /proc/\$BPID/stat > $RUN/$tag.c0
CALL nocrm.drain(0);
\! date +%s.%N > $RUN/$tag.t1; awk '{print \$14 + \$15}' /proc/\$BPID/stat > $RUN/$tag.c1
EOF
    D_WALL=$(fsub "$(cat "$RUN/$tag.t1")" "$(cat "$RUN/$tag.t0")")
    D_CPU=$(awk -v a="$(cat "$RUN/$tag.c1")" -v b="$(cat "$RUN/$tag.c0")" -v t="$TCK" 'BEGIN {printf "%.3f", (a - b) / t}')
}

for rep in $(seq 1 "$REPEATS"); do
    for kind in http smtp; do
        if [ $kind = http ]; then
            only_automation 'bench webhook'; jsonl="$SINKDIR/http.jsonl"; qkind=webhook
        else
            only_automation 'bench email'; jsonl="$SINKDIR/mail.jsonl"; qkind=email
        fi
        reset_sink
        done_before=$(psql_ -c "SELECT count(*) FROM nocrm.queue WHERE state = 'done' AND kind = '$qkind'")
        t0=$(date +%s.%N)
        psql_ -c "INSERT INTO nocrm.leads (title, contact_email)
                  SELECT format('Bench %s %s lead %s', '$kind', $rep, g), format('tp-%s-%s-%s@bench.test', '$kind', $rep, g)
                    FROM generate_series(1, $N_TP) g"
        t1=$(date +%s.%N)
        NOTE[insert,$kind,$rep]=$(fsub "$t1" "$t0")
        psql_ -c "VACUUM ANALYZE nocrm.queue" -c "CHECKPOINT"
        pending=$(psql_ -c "SELECT count(*) FROM nocrm.queue WHERE state = 'pending'")
        [ "$pending" = "$N_TP" ] || die "expected $N_TP pending items, found $pending"
        log "rep $rep $kind: queued $N_TP in $(fsub "$t1" "$t0") s (bulk INSERT); draining"

        s0=$(sink_cpu)
        timed_drain "drain_${kind}_$rep"
        s1=$(sink_cpu)
        RES[$kind,drain,$rep]=$D_WALL; RESC[$kind,drain,$rep]=$D_CPU; RESS[$kind,drain,$rep]=$(fsub "$s1" "$s0")
        wait_lines "$jsonl" "$N_TP" 10 || die "drain: sink got $(count "$jsonl") of $N_TP"
        left=$(psql_ -c "SELECT count(*) FROM nocrm.queue WHERE state <> 'done'")
        done_after=$(psql_ -c "SELECT count(*) FROM nocrm.queue WHERE state = 'done' AND kind = '$qkind'")
        [ "$left" = 0 ] && [ $((done_after - done_before)) = "$N_TP" ] ||
            die "drain left $left items not done ($(psql_ -c "SELECT state, count(*), max(last_error) FROM nocrm.queue WHERE state <> 'done' GROUP BY 1"))"
        [ $kind = smtp ] && NOTE[drain_conns,$rep]=$("$PY" "$UTIL" connections "$jsonl")
        log "rep $rep $kind: drain ${D_WALL} s (backend CPU ${D_CPU} s, sink CPU ${RESS[$kind,drain,$rep]} s)"

        # The same requests, as the sink received them, for the plain clients.
        cp "$jsonl" "$WORK/capture_${kind}_$rep.jsonl"
        if [ $kind = http ]; then
            "$PY" "$UTIL" http-reqs "$jsonl" "$WORK/reqs"
            "$PY" "$UTIL" curl-http "$jsonl" "$HOOK_URL" "$WORK/curl.cfg"
        else
            "$PY" "$UTIL" smtp-reqs "$jsonl" "$WORK/reqs"
            rm -rf "$WORK/eml"
            "$PY" "$UTIL" curl-smtp "$jsonl" "$SMTP_URL" "$MAIL_FROM" "$WORK/eml" "$WORK/curl.cfg"
        fi

        reset_sink
        s0=$(sink_cpu)
        if [ $kind = http ]; then
            out=$("$WORK/plain_client" http "$HOOK_URL" "$WORK/reqs")
        else
            out=$("$WORK/plain_client" smtp "$SMTP_URL" "$MAIL_FROM" "$WORK/reqs")
        fi
        s1=$(sink_cpu)
        RES[$kind,plain,$rep]=$(sed -n 's/.*wall=\([0-9.]*\).*/\1/p' <<<"$out")
        RESC[$kind,plain,$rep]=$(sed -n 's/.*cpu=\([0-9.]*\).*/\1/p' <<<"$out")
        RESS[$kind,plain,$rep]=$(fsub "$s1" "$s0")
        wait_lines "$jsonl" "$N_TP" 10 || die "plain_client: sink got $(count "$jsonl") of $N_TP"
        [ $kind = smtp ] && NOTE[plain_conns,$rep]=$("$PY" "$UTIL" connections "$jsonl")
        log "rep $rep $kind: plain_client $out (sink CPU ${RESS[$kind,plain,$rep]} s)"

        reset_sink
        s0=$(sink_cpu)
        t0=$(date +%s.%N)
        curl --config "$WORK/curl.cfg" || die "curl failed"
        t1=$(date +%s.%N)
        s1=$(sink_cpu)
        RES[$kind,cli,$rep]=$(fsub "$t1" "$t0")
        RESS[$kind,cli,$rep]=$(fsub "$s1" "$s0")
        wait_lines "$jsonl" "$N_TP" 10 || die "curl: sink got $(count "$jsonl") of $N_TP"
        [ $kind = smtp ] && NOTE[cli_conns,$rep]=$("$PY" "$UTIL" connections "$jsonl")
        log "rep $rep $kind: curl CLI ${RES[$kind,cli,$rep]} s (sink CPU ${RESS[$kind,cli,$rep]} s)"
    done
done

# ------------------------------------------------------------- report ---

med() {  # med ARRAYNAME kind who
    local -n arr=$1
    local v=()
    for r in $(seq 1 "$REPEATS"); do v+=("${arr[$2,$3,$r]}"); done
    "$PY" "$UTIL" median "${v[@]}"
}
list() {
    local -n arr=$1
    local v=()
    for r in $(seq 1 "$REPEATS"); do v+=("${arr[$2,$3,$r]}"); done
    (IFS=' '; echo "${v[*]}")
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
peritem() { awk -v n="$N_TP" -v a="$1" -v b="$2" 'BEGIN {printf "%.0f", (a - b) / n * 1e6}'; }
rate() { awk -v n="$N_TP" -v t="$1" 'BEGIN {printf "%.0f", n / t}'; }
verdict() { awk -v v="$1" -v g="$2" 'BEGIN {print (v <= g) ? "met" : "**missed**"}'; }

P50=$(jget p50); P99=$(jget p99)
CPU_MODEL="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
ELAPSED=$(( $(date +%s) - T_START ))
{
    echo "# nocrm_automation queue benchmark"
    echo
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- Machine: nproc=$(nproc), CPU: $CPU_MODEL"
    echo "- $PGVER; $(curl --version | head -n 1 | cut -d' ' -f1-3)"
    echo "- nocrm_automation: the installed library as of the start (md5 $SO_MD5…); source tree at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "- Run by \`bash test/bench/queue_bench.sh\` (N_LAT=$N_LAT, LAT_GAP_MS=$LAT_GAP_MS, N_TP=$N_TP, REPEATS=$REPEATS), took ${ELAPSED} s"
    echo
    echo "## Latency: COMMIT -> accepted by the SMTP sink"
    echo
    echo "$N_LAT single-lead transactions, one every ${LAT_GAP_MS} ms, each queueing one email;"
    echo "\`CALL nocrm.drain(120)\` running with \`nocrm.drain_poll_interval\` at its default (200 ms)."
    echo
    echo "| emails | p50 | p90 | p99 | max | goal | |"
    echo "|---:|---:|---:|---:|---:|---|---|"
    echo "| $(jget matched)/$(jget sent) | $(jget p50) s | $(jget p90) s | $(jget p99) s | $(jget max) s | p50 ≤ 1 s | $(verdict "$P50" 1) |"
    echo
    echo "## Drain throughput: $N_TP items queued first, then \`CALL nocrm.drain(0)\`"
    echo
    echo "Wall seconds, median of $REPEATS runs. *plain* = test/bench/plain_client.c (libcurl, one reused"
    echo "easy handle, sequential, same payloads and headers, no database); *curl CLI* = one \`curl --config\`"
    echo "invocation with \`next\` between the same requests. Ratio = drain / plain (goal ≤ 1.5×);"
    echo "*extra/item* = (drain − plain) / items, the drain's own cost per item, whatever the sink costs."
    echo
    echo "| workload | drain | plain | curl CLI | drain/plain | drain/curl CLI | drain items/s | extra/item | goal |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---|"
    for kind in http smtp; do
        d=$(med RES $kind drain); p=$(med RES $kind plain); c=$(med RES $kind cli)
        name=$([ $kind = http ] && echo "webhooks (HTTP POST)" || echo "emails (SMTP)")
        echo "| $N_TP $name | $d s | $p s | $c s | $(ratio "$d" "$p")× | $(ratio "$d" "$c")× | $(rate "$d") | $(peritem "$d" "$p") µs | $(verdict "$(ratio "$d" "$p")" 1.5) |"
    done
    echo
    echo "Every run, wall seconds (client CPU seconds; sink CPU seconds):"
    echo
    for kind in http smtp; do
        for who in drain plain cli; do
            line="- $kind $who:"
            for r in $(seq 1 "$REPEATS"); do
                line+=" ${RES[$kind,$who,$r]}"
                [ "$who" = cli ] && line+=" (–; ${RESS[$kind,$who,$r]})" || line+=" (${RESC[$kind,$who,$r]}; ${RESS[$kind,$who,$r]})"
            done
            echo "$line"
        done
    done
    echo
    echo "SMTP connections seen by the sink per run: drain $(for r in $(seq 1 "$REPEATS"); do printf '%s ' "${NOTE[drain_conns,$r]}"; done)| plain $(for r in $(seq 1 "$REPEATS"); do printf '%s ' "${NOTE[plain_conns,$r]}"; done)| curl CLI $(for r in $(seq 1 "$REPEATS"); do printf '%s ' "${NOTE[cli_conns,$r]}"; done)"
    echo
    echo "Notes: the drain and the plain clients hit the same sink (test/sinks/sink.py, Python, one"
    echo "process), so the sink's cost is in both columns; *sink CPU* close to *wall* means the sink was"
    echo "the bottleneck. Drain CPU is the backend running the CALL only (WAL writer, etc. not counted)."
    echo "Latency: $(jget over_one_poll) of $(jget matched) emails took longer than one poll interval + 50 ms"
    echo "(0.25 s); mean $(jget mean) s, min $(jget min) s. Bulk INSERT of $N_TP leads (queueing, untimed above):"
    echo "$(for r in $(seq 1 "$REPEATS"); do printf '%s/%s ' "${NOTE[insert,http,$r]}" "${NOTE[insert,smtp,$r]}"; done)s (webhook/email runs)."
} >"$WORK/queue.md"

mkdir -p "$HERE/results"
cp "$WORK/queue.md" "$HERE/results/queue.md"
echo
cat "$WORK/queue.md"
