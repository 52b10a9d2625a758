#!/bin/bash
# engine_bench.sh — cost of the nocrm_automation trigger engine, side by side
# with the same tables without triggers (bare) and a hand-written PL/pgSQL
# implementation of the same rules (plpgsql_rules.sql).
#
#   bash test/bench/engine_bench.sh [--quick] [--rows N] [--big] [--million]
#                                   (as root; the extension installed)
#
# Starts a throwaway PostgreSQL 15 (initdb in a mktemp dir, run as postgres,
# unix socket only), same settings for every variant, and points the C
# functions of its database at a copy of the installed library taken at the
# start.  Every measurement except --million is repeated REPEATS times;
# medians are reported.  Writes test/bench/results/engine.md (and prints it).
#
# Measures:
#   bulk     one INSERT ... SELECT of N leads, then UPDATE status = 'won' of
#            all of them, per variant / rule set / nocrm.history; wall clock,
#            and the backend's peak RssAnon (private memory) and VmHWM during
#            the INSERT, sampled from /proc/PID/status every SAMPLE_MS;
#   million  (--million, --big) one INSERT ... SELECT of 1,000,000 leads with
#            rule set (b) into pipeline Vendite, engine only, run once: time
#            and peak RssAnon (goal: under 256 MB);
#   pgbench  tps of a single-lead transaction (1, 2, 8 clients), a single-row
#            status update (1, 8 clients), round robin vs plain assign;
#   cache    size of the 'nocrm rule cache' memory context, 10/1,000/10,000 rules.
#
# Flags:
#   --rows N    leads per bulk insert (default 100000)
#   --big       --rows 1000000 and --million
#   --million   add the 1,000,000-row (b) insert (MILLION_ROWS)
#   --quick     smoke test of the script: --rows 2000, PGB_T=2, REPEATS=1
#               (PGB_T / REPEATS given in the environment still win; a later
#               --rows wins)
#   -h, --help  this text
# Knobs (environment):
#   PGB_T=15           seconds per pgbench run
#   REPEATS=3          repetitions of each bulk and pgbench measurement
#   PGB_ROWS=10000     leads the status-update workload picks from
#   SAMPLE_MS=50       memory sampling interval of the bulk inserts
#   MILLION_ROWS=1000000  rows of the --million insert (change only to test
#                      the script; the goal is stated for 1,000,000)
#   KEEP=1             keep the work directory (logs, data) after the run
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
ARGS="$*"
ROWS=100000
MILLION=0
QUICK=0
while [ $# -gt 0 ]; do
    case "$1" in
        --rows) [ $# -ge 2 ] && [[ $2 =~ ^[1-9][0-9]*$ ]] || { echo "engine_bench: --rows needs a positive integer" >&2; exit 2; }
                ROWS=$2; shift 2 ;;
        --big) ROWS=1000000; MILLION=1; shift ;;
        --million) MILLION=1; shift ;;
        --quick) QUICK=1; ROWS=2000; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "usage: $0 [--quick] [--rows N] [--big] [--million]   ($0 --help)" >&2; exit 2 ;;
    esac
done
if [ "$QUICK" = 1 ]; then
    PGB_T=${PGB_T:-2}; REPEATS=${REPEATS:-1}
else
    PGB_T=${PGB_T:-15}; REPEATS=${REPEATS:-3}
fi
PGB_ROWS=${PGB_ROWS:-10000}
SAMPLE_MS=${SAMPLE_MS:-50}
MILLION_ROWS=${MILLION_ROWS:-1000000}
for v in PGB_T REPEATS PGB_ROWS SAMPLE_MS MILLION_ROWS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "engine_bench: $v must be a positive integer" >&2; exit 2; }
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=server.sh
. "$HERE/server.sh"
# shellcheck source=rulesets.sh
. "$HERE/rulesets.sh"
ROOT="$(cd "$HERE/../.." && pwd)"
T_START=$(date +%s)
bench_preamble engine_bench

WORK="$(mktemp -d /tmp/nocrm_ebench.XXXXXX)"
chmod 755 "$WORK"
PGDATA="$WORK/data"; RUN="$WORK/run"
mkdir -p "$RUN" "$WORK/lib"
cp "$EXT_SO" "$WORK/lib/nocrm_automation.so"
SO_MD5="$(md5sum <"$WORK/lib/nocrm_automation.so" | cut -c1-12)"
chown postgres: "$WORK" "$RUN" "$WORK/lib"

psql_() {
    runuser -u postgres -- "$PGBIN/psql" -h "$WORK" -X -q -v ON_ERROR_STOP=1 -At -d bench "$@"
}
cleanup() {
    local rc=$?
    set +e
    bench_server_stop
    if [ "${KEEP:-0}" = 1 ]; then echo "engine_bench: kept $WORK" >&2; else rm -rf "$WORK"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "settings (rows=$ROWS, pgbench ${PGB_T}s, repeats=$REPEATS)"
bench_server_start "engine_bench.sh — the same for every variant" <<EOF
max_connections = 30
shared_buffers = 256MB
max_wal_size = 4GB
checkpoint_timeout = 30min
synchronous_commit = on
EOF

psql_ >/dev/null <<EOF
CREATE EXTENSION nocrm_automation;
$BENCH_CRM_SQL
UPDATE pg_catalog.pg_proc SET probin = '$WORK/lib/nocrm_automation.so' WHERE probin = '\$libdir/nocrm_automation';
EOF
psql_ -c "SET client_min_messages = warning" -f "$HERE/plpgsql_rules.sql" >/dev/null

# rule sets: RULES_B, extra_rules, load_rules (rulesets.sh)
ALL_TABLES="nocrm.leads nocrm.tags nocrm.comments nocrm.emails"
set_variant() {  # bare | engine | plpgsql
    local sql=""
    for t in $ALL_TABLES; do sql+="ALTER TABLE $t DISABLE TRIGGER USER;"; done
    case $1 in
        engine) for t in $ALL_TABLES; do sql+="ALTER TABLE $t ENABLE TRIGGER USER;"; done
                sql+="ALTER TABLE nocrm.leads DISABLE TRIGGER bench_lead_before; ALTER TABLE nocrm.leads DISABLE TRIGGER bench_lead_after;
                      ALTER TABLE nocrm.tags DISABLE TRIGGER bench_tag_after; ALTER TABLE nocrm.comments DISABLE TRIGGER bench_comment_after;
                      ALTER TABLE nocrm.emails DISABLE TRIGGER bench_email_after;" ;;
        plpgsql) sql+="ALTER TABLE nocrm.leads ENABLE TRIGGER bench_lead_before; ALTER TABLE nocrm.leads ENABLE TRIGGER bench_lead_after;
                      ALTER TABLE nocrm.tags ENABLE TRIGGER bench_tag_after; ALTER TABLE nocrm.comments ENABLE TRIGGER bench_comment_after;
                      ALTER TABLE nocrm.emails ENABLE TRIGGER bench_email_after;" ;;
    esac
    psql_ -c "$sql" >/dev/null
}
reset_data() {
    psql_ -c "TRUNCATE nocrm.leads, nocrm.tags, nocrm.comments, nocrm.emails, nocrm.lead_history, nocrm.automation_runs,
                       nocrm.notifications, nocrm.queue RESTART IDENTITY CASCADE;
              UPDATE nocrm.assignment_counters SET assigned = 0; TRUNCATE nocrm.assignment_increments; UPDATE public.bench_rr_counters SET assigned = 0;" \
          -c "VACUUM ANALYZE" -c "CHECKPOINT" >/dev/null
}
fsub() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f\n", a - b}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# nocrm.history for the sessions that follow (new connections read it).
set_history() {  # set_history all|actions|none ; "all" = the default, RESET
    if [ "$1" = all ]; then
        psql_ -c "ALTER DATABASE bench RESET nocrm.history" >/dev/null
    else
        psql_ -c "ALTER DATABASE bench SET nocrm.history = '$1'" >/dev/null
    fi
}

# Memory sampler, started by the measuring psql session itself (\!) just
# before its INSERT: max RssAnon and VmHWM (kB) of the backend every SAMPLE_MS
# until DIR/stop exists, or the backend is gone; then writes DIR/mem:
# "max_RssAnon max_VmHWM first_RssAnon samples".  RssAnon is the backend's
# private memory; VmHWM also counts the shared_buffers pages it touched.
cat >"$WORK/sample_mem.sh" <<'EOF'
#!/bin/bash
pid=$1 dir=$2 ms=$3
exec 3<> <(:)           # read -t on this pipe sleeps without forking sleep(1)
t=$(awk -v m="$ms" 'BEGIN {printf "%.3f", m / 1000}')
first="" maxa=0 maxh=0 n=0
sample() {
    local k v rest a="" h=""
    { while read -r k v rest; do
          case $k in RssAnon:) a=$v ;; VmHWM:) h=$v ;; esac
      done </proc/"$pid"/status; } 2>/dev/null || return 1
    [ -n "$a" ] && [ -n "$h" ] || return 1
    [ -n "$first" ] || first=$a
    if [ "$a" -gt "$maxa" ]; then maxa=$a; fi
    if [ "$h" -gt "$maxh" ]; then maxh=$h; fi
    n=$((n + 1))
}
sample
: >"$dir/mem.started"
while [ ! -e "$dir/stop" ]; do
    sample || break
    read -r -t "$t" -u 3 _ || :
done
sample || :
echo "$maxa $maxh ${first:-0} $n" >"$dir/mem.tmp"
mv "$dir/mem.tmp" "$dir/mem"
EOF
chown postgres: "$WORK/sample_mem.sh"

# One insert of N leads (and optionally UPDATE status = 'won' on all of them)
# in one session; wall clock taken around each statement by psql (\! date),
# memory sampled during the INSERT only.  Sets M_INS M_UPD M_ANON M_HWM
# M_ANON0 M_NS M_HIST (history rows per lead afterwards).
measure_insert() {  # measure_insert N PIPELINE UPDATE(0|1) [STEP(0|1)]
    local n=$1 pipe=$2 upd=$3 upd_sql="" step="" stepcol=""
    # STEP=1: write the pipeline's first step too, as the engine's BEFORE
    # trigger does (bare with the same final rows, and their foreign key check)
    if [ "${4:-0}" = 1 ]; then
        stepcol=", step_id"; step=", (SELECT min(id) FROM nocrm.steps WHERE pipeline_id = $pipe)"
    fi
    rm -f "$RUN"/t0 "$RUN"/t1 "$RUN"/u0 "$RUN"/u1 "$RUN"/mem "$RUN"/mem.tmp "$RUN"/mem.started "$RUN"/stop
    if [ "$upd" = 1 ]; then
        upd_sql="\\! date +%s.%N > $RUN/u0
UPDATE nocrm.leads SET status = 'won';
\\! date +%s.%N > $RUN/u1"
    fi
    psql_ <<EOF >/dev/null
SELECT pg_backend_pid() AS bpid \gset
\setenv BPID :bpid
SELECT count(*) FROM nocrm.leads;
-- warm-up, not timed: a long-lived backend has its rule cache, plans and
-- PL/pgSQL functions loaded; a new connection pays for that once.
BEGIN;
INSERT INTO nocrm.leads (title, pipeline_id, contact_email) VALUES ('warm-up', $pipe, 'warm@bench.test');
ROLLBACK;
\! bash $WORK/sample_mem.sh \$BPID $RUN $SAMPLE_MS </dev/null >/dev/null 2>>$WORK/sampler.err &
\! while [ ! -e $RUN/mem.started ]; do sleep 0.01; done
\! date +%s.%N > $RUN/t0
INSERT INTO nocrm.leads (title, pipeline_id, contact_email$stepcol)
SELECT 'Bench lead ' || g, $pipe, 'lead' || g || '@bench.test'$step FROM generate_series(1, $n) g;
\! date +%s.%N > $RUN/t1
\! touch $RUN/stop; while [ ! -e $RUN/mem ]; do sleep 0.01; done
$upd_sql
EOF
    M_INS=$(fsub "$(cat "$RUN/t1")" "$(cat "$RUN/t0")")
    M_UPD=""
    [ "$upd" = 1 ] && M_UPD=$(fsub "$(cat "$RUN/u1")" "$(cat "$RUN/u0")")
    read -r M_ANON M_HWM M_ANON0 M_NS <"$RUN/mem"
    M_HIST=$(psql_ -c "SELECT round(count(*)::numeric / $n, 2) FROM nocrm.lead_history")
}

declare -A R      # R[kind,name] = "v1 v2 v3"  (ins, upd, pgb, anon, hwm)
declare -A HLVL   # nocrm.history of a bulk variant
declare -A HROWS  # history rows per lead after insert + update (last repetition)
declare -A NSAMP  # memory samples taken during the insert (last repetition)

# bulk: REPEATS times, one insert of ROWS leads, then UPDATE status='won'.
bulk() {  # bulk NAME VARIANT RULES PIPELINE [HISTORY [STEP]]
    local name=$1 variant=$2 rules=$3 pipe=$4 hist=${5:-all} withstep=${6:-0} rep
    set_variant "$variant"; load_rules "$rules"; set_history "$hist"
    HLVL[$name]=$hist
    for rep in $(seq 1 "$REPEATS"); do
        reset_data
        measure_insert "$ROWS" "$pipe" 1 "$withstep"
        R[ins,$name]+="$M_INS "; R[upd,$name]+="$M_UPD "
        R[anon,$name]+="$M_ANON "; R[hwm,$name]+="$M_HWM "
        HROWS[$name]=$M_HIST; NSAMP[$name]=$M_NS
    done
    set_history all
    log "bulk $name (history=$hist): insert ${R[ins,$name]}s; update ${R[upd,$name]}s; peak RssAnon kB ${R[anon,$name]}; VmHWM kB ${R[hwm,$name]}; history rows/lead ${HROWS[$name]}"
}

# pgbench: tps, median of REPEATS runs of PGB_T seconds.
cat >"$WORK/lead_txn.sql" <<'EOF'
BEGIN;
INSERT INTO nocrm.leads (title, pipeline_id, contact_email) VALUES ('pgbench lead', 1, 'pgb@bench.test') RETURNING id AS lid \gset
UPDATE nocrm.leads SET step_id = 3 WHERE id = :lid;
COMMIT;
EOF
cat >"$WORK/insert_only.sql" <<'EOF'
INSERT INTO nocrm.leads (title, pipeline_id, contact_email) VALUES ('pgbench lead', 1, 'pgb@bench.test');
EOF
cat >"$WORK/status_upd.sql" <<EOF
\set id random(1, $PGB_ROWS)
UPDATE nocrm.leads SET status = CASE WHEN status = 'won' THEN 'todo' ELSE 'won' END WHERE id = :id;
EOF
chown postgres: "$WORK"/*.sql
pgb() {  # pgb NAME VARIANT RULES SCRIPT CLIENTS
    local name=$1 variant=$2 rules=$3 script=$4 c=$5 rep tps
    set_variant "$variant"; load_rules "$rules"
    for rep in $(seq 1 "$REPEATS"); do
        reset_data
        if [ "$script" = status_upd ]; then   # PGB_ROWS leads to update, written without triggers
            set_variant bare
            psql_ -c "INSERT INTO nocrm.leads (title, pipeline_id, step_id, contact_email)
                      SELECT 'L' || g, 1, 1, 'l' || g || '@bench.test' FROM generate_series(1, $PGB_ROWS) g" -c "VACUUM ANALYZE nocrm.leads" >/dev/null
            set_variant "$variant"
        fi
        tps=$(runuser -u postgres -- "$PGBIN/pgbench" -h "$WORK" -n -c "$c" -j "$c" -T "$PGB_T" \
                -f "$WORK/$script.sql" bench 2>"$WORK/pgbench.err" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -n1) || tps=""
        [ -n "$tps" ] || { cat "$WORK/pgbench.err" >&2; die "pgbench $name failed"; }
        R[pgb,$name]+="$tps "
    done
    log "pgbench $name: tps ${R[pgb,$name]}"
}

# ---------------------------------------------------------- measurements ---
bulk bare               bare    none        1
bulk bare_rows          bare    none        1 all 1
bulk engine_a           engine  none        1
bulk engine_a_hact      engine  none        1 actions
bulk engine_nm1000      engine  nomatch1000 3
bulk engine_nm1000_hact engine  nomatch1000 3 actions
bulk engine_o10         engine  other10     3
bulk engine_o10000      engine  other10000  3
bulk engine_b           engine  b           1
bulk plpgsql_b          plpgsql b           1
bulk engine_c           engine  c           1

# the 1,000,000-row insert with (b), engine, once
if [ "$MILLION" = 1 ]; then
    set_variant engine; load_rules b; set_history all
    reset_data
    log "million: INSERT of $MILLION_ROWS leads, engine, (b), pipeline Vendite (once)"
    measure_insert "$MILLION_ROWS" 1 0
    MIL_INS=$M_INS MIL_ANON=$M_ANON MIL_HWM=$M_HWM MIL_ANON0=$M_ANON0 MIL_NS=$M_NS MIL_HIST=$M_HIST
    log "million: insert ${MIL_INS}s; peak RssAnon $MIL_ANON kB (before: $MIL_ANON0 kB, $MIL_NS samples); VmHWM $MIL_HWM kB"
    reset_data
fi

TXN_CLIENTS="1 2 8"
ST_CLIENTS="1 8"
for c in $TXN_CLIENTS; do
    pgb "txn_bare_$c"    bare    none lead_txn "$c"
    pgb "txn_engine_$c"  engine  b    lead_txn "$c"
    pgb "txn_plpgsql_$c" plpgsql b    lead_txn "$c"
done
for c in $ST_CLIENTS; do
    pgb "st_bare_$c"    bare    none status_upd "$c"
    pgb "st_engine_$c"  engine  b    status_upd "$c"
    pgb "st_plpgsql_$c" plpgsql b    status_upd "$c"
done
pgb rr_engine_8    engine  rr     insert_only 8
pgb as_engine_8    engine  assign insert_only 8

# rule cache size after a forced load (a lead inserted and rolled back)
set_variant engine
declare -A CACHE CLOAD
CACHE_RULES="10:other10 1000:nomatch1000 10000:other10000"
for nr in $CACHE_RULES; do
    n=${nr%%:*}
    load_rules "${nr#*:}"
    # the first statement of a new backend loads the cache: timed here, apart
    read -r CACHE[$n] CLOAD[$n] < <(psql_ <<'EOF' | tail -n1
SELECT clock_timestamp() AS t0 \gset
BEGIN;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('cache load', 3);
ROLLBACK;
SELECT coalesce(sum(total_bytes), 0) || ' ' ||
       round(extract(epoch FROM clock_timestamp() - :'t0'::timestamptz)::numeric * 1000)
  FROM pg_backend_memory_contexts WHERE name = 'nocrm rule cache';
EOF
)
    log "rule cache with $n rules: ${CACHE[$n]} bytes, first statement ${CLOAD[$n]} ms"
done

# ---------------------------------------------------------------- report ---
m() { median ${R[$1]}; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b == 0) print "n/a"; else printf "%.2f", a / b}'; }
verdict() {  # verdict VALUE GOAL le|ge|lt
    awk -v v="$1" -v g="$2" -v d="$3" 'BEGIN {
        if (v == "n/a") { print "n/a"; exit }
        ok = (d == "le") ? (v <= g) : (d == "lt") ? (v < g) : (v >= g); print ok ? "met" : "**missed**" }'
}
mb() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
CPU_MODEL="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
ELAPSED=$(( $(date +%s) - T_START ))
# ×bare is against bare writing the same rows (with the first step the
# engine's BEFORE trigger fills in, and so the same foreign key checks)
B_INS=$(m ins,bare_rows); B_UPD=$(m upd,bare_rows)
{
    echo "# nocrm_automation engine benchmark"
    echo
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- Machine: nproc=$(nproc), CPU: $CPU_MODEL"
    echo "- $PGVER; shared_buffers=256MB, max_wal_size=4GB, synchronous_commit=on, same server and settings for every variant"
    echo "- nocrm_automation: installed library at start (md5 $SO_MD5…); tree $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "- Run: \`bash test/bench/engine_bench.sh${ARGS:+ $ARGS}\` (rows=$ROWS, PGB_T=$PGB_T, REPEATS=$REPEATS, PGB_ROWS=$PGB_ROWS, SAMPLE_MS=$SAMPLE_MS$( [ "$MILLION" = 1 ] && echo ", MILLION_ROWS=$MILLION_ROWS")); took ${ELAPSED} s"
    echo "- Medians of $REPEATS; all runs listed below. Variants: *bare* = extension triggers disabled (DISABLE TRIGGER USER);"
    echo "  *engine* = this extension; *plpgsql* = test/bench/plpgsql_rules.sql (same rules, same rows written)."
    echo "- Rule sets: (a) none; (b) the five help-page examples (notify on creation/deletion, round robin [pipeline Vendite],"
    echo "  balanced [pipeline Onboarding], step Preventivo in Vendite → send_email + add_tags, status won → add_tags Upsell Opportunity);"
    echo "  (c) = (b) + 1,000 extra enabled rules (¾ on lead.commented/lead.email.received/status lost, ¼ on lead.creation with"
    echo "  conditions {pipeline Onboarding, status lost} that never hold)."
    echo "- nocrm.history: *all* (default) writes one nocrm.lead_history row per event, *actions* only rows for automated actions;"
    echo "  set per variant with ALTER DATABASE bench SET nocrm.history (RESET afterwards). The plpgsql variant always writes"
    echo "  what *all* writes."
    echo
    echo "## Bulk: one INSERT … SELECT of $ROWS leads, then UPDATE status = 'won' on all of them"
    echo
    echo "Memory: the measuring backend's /proc status sampled every $SAMPLE_MS ms during the INSERT; *peak RssAnon* = its peak"
    echo "private memory; VmHWM (peak resident set) also counts the shared_buffers pages it touched, so it is not private memory."
    echo
    echo "| variant | rules | nocrm.history | leads inserted into | insert s | ×bare | update s | ×bare | history rows/lead | peak RssAnon (insert) | VmHWM (insert) |"
    echo "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
    row() {
        local n=$1 h=${HLVL[$1]}
        case $2 in engine) ;; *) h="n/a" ;; esac
        echo "| $2 | $3 | $h | $4 | $(m ins,$n) | $(ratio "$(m ins,$n)" "$B_INS") | $(m upd,$n) | $(ratio "$(m upd,$n)" "$B_UPD") | ${HROWS[$n]} | $(m anon,$n) kB | $(m hwm,$n) kB |"
    }
    row bare bare "–" "Vendite (no step: the same statement)"
    row bare_rows bare "–" "Vendite (with its first step: the same rows)"
    row engine_a engine "(a) none" "Vendite"
    row engine_a_hact engine "(a) none" "Vendite"
    row engine_nm1000 engine "1,000 non-matching ((c) extras only)" "Altro"
    row engine_nm1000_hact engine "1,000 non-matching ((c) extras only)" "Altro"
    row engine_o10 engine "10 on other events" "Altro"
    row engine_o10000 engine "10,000 on other events" "Altro"
    row engine_b engine "(b)" "Vendite (round robin + notify fire)"
    row plpgsql_b plpgsql "(b)" "Vendite (round robin + notify fire)"
    row engine_c engine "(c)" "Vendite"
    echo
    echo "*×bare* is against *bare, the same rows*: the engine's BEFORE trigger gives each lead its pipeline's first"
    echo "step, so its rows carry a step and PostgreSQL checks that foreign key too; *bare, the same statement* leaves the step"
    echo "empty and skips that check."
    echo
    echo "With (b)/(c), each inserted Vendite lead gets a notification and a round-robin owner (5 history rows, 2 run-log rows);"
    echo "the bulk UPDATE adds the tag Upsell Opportunity (4 history rows, 1 run-log row, 1 tag per lead)."
    echo "*history rows/lead* counts nocrm.lead_history after the insert and the update (last repetition)."
    echo
    echo "## One INSERT … SELECT of $MILLION_ROWS leads, engine, rule set (b), pipeline Vendite (run once)"
    echo
    if [ "$MILLION" = 1 ]; then
        echo "| rows | insert s | peak RssAnon | RssAnon before | VmHWM | samples | history rows/lead |"
        echo "|---:|---:|---:|---:|---:|---:|---:|"
        echo "| $MILLION_ROWS | $MIL_INS | $MIL_ANON kB ($(mb "$MIL_ANON") MB) | $MIL_ANON0 kB | $MIL_HWM kB | $MIL_NS | $MIL_HIST |"
    else
        echo "Not measured (run with \`--million\` or \`--big\`)."
    fi
    echo
    echo "## pgbench (tps, -n -c N -j N -T $PGB_T)"
    echo
    echo "| workload | clients | bare | engine (b) | plpgsql (b) | engine/bare | engine/plpgsql |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    for c in $TXN_CLIENTS; do
        echo "| txn: INSERT lead (Vendite) + UPDATE step → Preventivo | $c | $(m pgb,txn_bare_$c) | $(m pgb,txn_engine_$c) | $(m pgb,txn_plpgsql_$c) | $(ratio "$(m pgb,txn_engine_$c)" "$(m pgb,txn_bare_$c)") | $(ratio "$(m pgb,txn_engine_$c)" "$(m pgb,txn_plpgsql_$c)") |"
    done
    for c in $ST_CLIENTS; do
        echo "| single-row status toggle won/todo on $PGB_ROWS leads | $c | $(m pgb,st_bare_$c) | $(m pgb,st_engine_$c) | $(m pgb,st_plpgsql_$c) | $(ratio "$(m pgb,st_engine_$c)" "$(m pgb,st_bare_$c)") | $(ratio "$(m pgb,st_engine_$c)" "$(m pgb,st_plpgsql_$c)") |"
    done
    echo
    echo "Round robin vs plain assign (engine, one rule on lead.creation, INSERT-only, 8 clients): round robin $(m pgb,rr_engine_8) tps,"
    echo "assign $(m pgb,as_engine_8) tps, ratio $(ratio "$(m pgb,rr_engine_8)" "$(m pgb,as_engine_8)")."
    echo
    echo "## Rule cache (pg_backend_memory_contexts, 'nocrm rule cache', after a forced load)"
    echo
    echo "| enabled rules | bytes | first statement of a new backend (loads the cache) |"
    echo "|---:|---:|---:|"
    echo "| 10 (other events) | ${CACHE[10]} | ${CLOAD[10]} ms |"
    echo "| 1,000 (mixed, as in (c)) | ${CACHE[1000]} | ${CLOAD[1000]} ms |"
    echo "| 10,000 (other events) | ${CACHE[10000]} | ${CLOAD[10000]} ms |"
    echo
    echo "Bulk timings above are taken after a rolled-back warm-up insert in the same session (a pooled"
    echo "backend has its cache loaded); this table shows what the first statement of a new backend pays."
    echo
    echo "## Goals"
    echo
    g1a=$(ratio "$(m ins,engine_nm1000_hact)" "$B_INS"); g1=$(ratio "$(m ins,engine_nm1000)" "$B_INS")
    g2=$(ratio "$(m ins,engine_o10000)" "$(m ins,engine_o10)")
    g3i=$(ratio "$(m ins,plpgsql_b)" "$(m ins,engine_b)"); g3u=$(ratio "$(m upd,plpgsql_b)" "$(m upd,engine_b)")
    g4=$(ratio "$(m pgb,txn_engine_8)" "$(m pgb,txn_bare_8)"); g4s=$(ratio "$(m pgb,st_engine_8)" "$(m pgb,st_bare_8)")
    g5=$(ratio "$(m pgb,rr_engine_8)" "$(m pgb,as_engine_8)")
    echo "| goal | measured | |"
    echo "|---|---:|---|"
    echo "| engine/bare ≤ 1.15, bulk insert, 1,000 rules none matching | history=actions: $g1a; history=all: $g1 | history=actions: $(verdict "$g1a" 1.15 le); history=all: $(verdict "$g1" 1.15 le) |"
    echo "| 10,000 vs 10 rules on other events ≤ 1.05 (bulk insert) | $g2 | $(verdict "$g2" 1.05 le) |"
    echo "| plpgsql/engine ≥ 3, (b), bulk insert | $g3i | $(verdict "$g3i" 3 ge) |"
    echo "| plpgsql/engine ≥ 3, (b), bulk update | $g3u | $(verdict "$g3u" 3 ge) |"
    echo "| pgbench 8 clients engine/bare ≥ 0.90 (lead txn) | $g4 | $(verdict "$g4" 0.90 ge) |"
    echo "| pgbench 8 clients engine/bare ≥ 0.90 (status update) | $g4s | $(verdict "$g4s" 0.90 ge) |"
    echo "| round robin / plain assign ≥ 0.80, 8 clients | $g5 | $(verdict "$g5" 0.80 ge) |"
    if [ "$MILLION" = 1 ] && [ "$MILLION_ROWS" = 1000000 ]; then
        echo "| 1,000,000-row insert, (b), engine: backend peak RssAnon < 256 MB | $(mb "$MIL_ANON") MB | $(verdict "$MIL_ANON" 262144 lt) |"
    elif [ "$MILLION" = 1 ]; then
        echo "| 1,000,000-row insert, (b), engine: backend peak RssAnon < 256 MB | not measured (MILLION_ROWS=$MILLION_ROWS: $(mb "$MIL_ANON") MB) | – |"
    else
        echo "| 1,000,000-row insert, (b), engine: backend peak RssAnon < 256 MB | not measured (\`--million\`) | – |"
    fi
    echo
    echo "## All runs"
    echo
    for k in $(printf '%s\n' "${!R[@]}" | sort); do
        case $k in anon,*|hwm,*) u=" (kB)" ;; *) u="" ;; esac
        echo "- $k$u: ${R[$k]}"
    done
    for k in $(printf '%s\n' "${!NSAMP[@]}" | sort); do echo "- memory samples during the insert, $k: ${NSAMP[$k]}"; done
} >"$WORK/engine.md"
mkdir -p "$HERE/results"
cp "$WORK/engine.md" "$HERE/results/engine.md"
echo; cat "$WORK/engine.md"
