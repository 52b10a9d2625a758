#!/bin/bash
# core_bench.sh — the engine against its anchor: the five seed rules written
# by hand in PL/pgSQL (handwritten_rules.sql), and the same tables without
# any trigger (bare), side by side in one run on one server.  Optionally a
# second build of the engine (BASELINE_SO) is measured in the same run, so
# a change can be judged before/after on the same machine minutes apart.
#
#   bash test/bench/core_bench.sh [--quick] [--rows N] [NAME=VALUE ...]
#                                 (as root; the extension installed)
#
# Each variant has its own database on one throwaway server (initdb in a
# mktemp dir, run as postgres, unix socket only):
#   bare             the extension's triggers disabled (DISABLE TRIGGER USER)
#   handwritten      handwritten_rules.sql, with the extension's triggers disabled
#   engine           the installed nocrm_automation.so (a copy taken at the start)
#   engine@baseline  BASELINE_SO (a copy), only when BASELINE_SO is set
# Every database has nocrm.history = actions (ALTER DATABASE ... SET); the
# engine databases have rule set seed5 (rulesets.sh) unless said otherwise.
#
# Measures:
#   equivalence  once, not timed: 30 leads inserted, 10 won, 10 moved to
#                Preventivo, 5 deleted in handwritten and each engine
#                database; owners, tags, queue and notification rows compared
#                (a WARNING line when they differ)
#   bulk         INSERT ... SELECT of N leads into Vendite without owner, then
#                UPDATE status = 'won' of all, then UPDATE of all to step
#                Preventivo; timed in the session, median of REPEATS
#                (truncate + VACUUM ANALYZE + CHECKPOINT before each, a
#                rolled-back warm-up insert first); WAL bytes per lead of the
#                insert (pg_current_wal_lsn before/after)
#   statements   one more insert run per variant with pg_stat_statements.track
#                = all: nested statement calls per lead, top 8 statements by
#                total_exec_time
#   no match     engine insert with no rules and with 1,000 non-matching rules
#                (nomatch1000), nocrm.history = actions and = all, vs bare; 1,000
#                rules whose field conditions fail (fields1000), history = actions
#   pgbench      seed3 rules, -c 8 -j 2 -T PGB_T, median of REPEATS: one lead
#                per transaction (INSERT into Vendite, no owner) and one
#                status toggle per transaction on PGB_ROWS pre-filled leads;
#                deadlocks and serialization failures in the server log;
#                round-robin fairness (max - min leads per owner) of the
#                insert run
# Writes test/bench/results/core.md and prints it.
#
# Flags:
#   --rows N    leads per bulk insert (default 100000)
#   --quick     smoke test of the script: --rows 2000, PGB_T=3, REPEATS=1
#               (PGB_T / REPEATS given in the environment still win; a later
#               --rows wins)
#   NAME=VALUE  the same as setting NAME in the environment (the knobs below)
#   -h, --help  this text
# Knobs (environment):
#   REPEATS=3          repetitions of each bulk and pgbench measurement (medians)
#   PGB_T=15           seconds per pgbench run
#   PGB_ROWS=10000     leads the status-update workload picks from
#   BASELINE_SO=path   a nocrm_automation.so to measure as engine@baseline
#                      (built from the same extension SQL as the installed one)
#   KEEP=1             keep the work directory (logs, data) after the run
#   RELAY=0            no notify relay for the engine database (default 1: the
#                      library preloaded, nocrm.worker_database = engine; off
#                      with BASELINE_SO)
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
ARGS="$*"
ROWS=""
QUICK=0
while [ $# -gt 0 ]; do
    case "$1" in
        --rows) [ $# -ge 2 ] && [[ $2 =~ ^[1-9][0-9]*$ ]] || { echo "core_bench: --rows needs a positive integer" >&2; exit 2; }
                ROWS=$2; shift 2 ;;
        --quick) QUICK=1; ROWS=${ROWS:-2000}; shift ;;
        REPEATS=*|PGB_T=*|PGB_ROWS=*|BASELINE_SO=*|KEEP=*|RELAY=*) export "${1?}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "usage: $0 [--quick] [--rows N] [NAME=VALUE ...]   ($0 --help)" >&2; exit 2 ;;
    esac
done
if [ "$QUICK" = 1 ]; then
    PGB_T=${PGB_T:-3}; REPEATS=${REPEATS:-1}
else
    PGB_T=${PGB_T:-15}; REPEATS=${REPEATS:-3}
fi
ROWS=${ROWS:-100000}
PGB_ROWS=${PGB_ROWS:-10000}
for v in PGB_T REPEATS PGB_ROWS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "core_bench: $v must be a positive integer" >&2; exit 2; }
done
BASELINE_SO=${BASELINE_SO:-}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=server.sh
. "$HERE/server.sh"
# shellcheck source=rulesets.sh
. "$HERE/rulesets.sh"
ROOT="$(cd "$HERE/../.." && pwd)"
T_START=$(date +%s)
bench_preamble core_bench
[ -f "$(pg_config --pkglibdir)/pg_stat_statements.so" ] || die "pg_stat_statements is not installed (postgresql-contrib)"
[ -z "$BASELINE_SO" ] || [ -f "$BASELINE_SO" ] || die "BASELINE_SO: no such file: $BASELINE_SO"

WORK="$(mktemp -d /tmp/nocrm_cbench.XXXXXX)"
chmod 755 "$WORK"
PGDATA="$WORK/data"
# Copies: a `make install` during the run must not change what is measured
# (with the relay, the server preloaded the installed one at its start).
mkdir -p "$WORK/lib/installed" "$WORK/lib/baseline"
cp "$EXT_SO" "$WORK/lib/installed/nocrm_automation.so"
SO_MD5="$(md5sum <"$WORK/lib/installed/nocrm_automation.so" | cut -c1-12)"
VARIANTS="bare handwritten engine"
declare -A DB=([bare]=bare [handwritten]=handwritten [engine]=engine)
declare -A SO=([bare]=installed [handwritten]=installed [engine]=installed)
if [ -n "$BASELINE_SO" ]; then
    cp "$BASELINE_SO" "$WORK/lib/baseline/nocrm_automation.so"
    BASE_MD5="$(md5sum <"$WORK/lib/baseline/nocrm_automation.so" | cut -c1-12)"
    VARIANTS+=" engine@baseline"
    DB[engine@baseline]=engine_baseline; SO[engine@baseline]=baseline
fi
ENGINES=$(for v in $VARIANTS; do case $v in engine*) echo "$v" ;; esac; done)
cp "$HERE/handwritten_rules.sql" "$WORK/handwritten_rules.sql"
chown -R postgres: "$WORK"

psql_db() {  # psql_db DB [psql args]
    local db=$1; shift
    runuser -u postgres -- "$PGBIN/psql" -h "$WORK" -X -q -v ON_ERROR_STOP=1 -At -d "$db" "$@"
}
psql_v() { local v=$1; shift; psql_db "${DB[$v]}" "$@"; }
cleanup() {
    local rc=$?
    set +e
    bench_server_stop
    if [ "${KEEP:-0}" = 1 ]; then echo "core_bench: kept $WORK" >&2; else rm -rf "$WORK"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The engine database has the notify relay (relay.c): the library preloaded,
# nocrm.worker_database = engine.  Not with BASELINE_SO: a backend cannot load
# two builds of the library.  Nothing is delivered (drain_enabled = off).
if [ -z "$BASELINE_SO" ] && [ "${RELAY:-1}" = 1 ]; then
    PRELOAD="pg_stat_statements,nocrm_automation"; WORKER_DB=engine
else
    PRELOAD="pg_stat_statements"; WORKER_DB=""
fi
log "rows=$ROWS, pgbench ${PGB_T}s, repeats=$REPEATS, variants: $VARIANTS, preload: $PRELOAD"
# pg_stat_statements is loaded for the whole run but tracks nothing
# (track = none) except in the one session that sets track = all: its
# per-statement bookkeeping must not weigh on the timed runs.
bench_server_start "core_bench.sh — the same for every variant" <<EOF
max_connections = 30
shared_buffers = 256MB
max_wal_size = 4GB
checkpoint_timeout = 30min
synchronous_commit = on
shared_preload_libraries = '$PRELOAD'
pg_stat_statements.track = none
nocrm.worker_database = '$WORKER_DB'
nocrm.drain_enabled = off
pg_stat_statements.max = 10000
EOF
LOGFILE="$WORK/postgres.log"

# ------------------------------------------------------------- databases ---
CRM_TABLES="nocrm.leads nocrm.tags nocrm.comments nocrm.emails"
triggers_off() { local t s=""; for t in $CRM_TABLES; do s+="ALTER TABLE $t DISABLE TRIGGER USER;"; done; echo "$s"; }

# handwritten_rules.sql with rule set seed5|seed3, switched on
load_handwritten() {
    psql_v handwritten -v rules="$1" -f "$WORK/handwritten_rules.sql" >/dev/null
    psql_v handwritten -c "SELECT anchor.enable()" >/dev/null
}
# load_rules (rulesets.sh) for one engine variant; it runs psql_
RULES_VARIANT=""
psql_() { psql_v "$RULES_VARIANT" "$@"; }
load_engine_rules() {  # load_engine_rules VARIANT RULESET
    RULES_VARIANT=$1
    load_rules "$2"
}
set_history() {  # set_history VARIANT all|actions
    psql_db bench -c "ALTER DATABASE ${DB[$1]} SET nocrm.history = '$2'" >/dev/null
}

for v in $VARIANTS; do
    runuser -u postgres -- "$PGBIN/createdb" -h "$WORK" "${DB[$v]}"
    psql_v "$v" >/dev/null <<EOF
SET client_min_messages = warning;
CREATE EXTENSION nocrm_automation;
CREATE EXTENSION pg_stat_statements;
$BENCH_CRM_SQL
$( [ -n "$WORKER_DB" ] && [ "${SO[$v]}" = installed ] ||
   echo "UPDATE pg_catalog.pg_proc SET probin = '$WORK/lib/${SO[$v]}/nocrm_automation.so' WHERE probin = '\$libdir/nocrm_automation';" )
EOF
    set_history "$v" actions
    case $v in
        bare) psql_v "$v" -c "$(triggers_off)" >/dev/null ;;
        handwritten) load_handwritten seed5 ;;
        engine*) load_engine_rules "$v" seed5 ;;
    esac
done

reset_data() {  # reset_data VARIANT
    local extra=""
    case $1 in
        handwritten) extra="ALTER SEQUENCE anchor.rr_vendite RESTART;" ;;
        engine*) extra="UPDATE nocrm.assignment_counters SET assigned = 0; TRUNCATE nocrm.assignment_increments;" ;;
    esac
    psql_v "$1" -c "SET client_min_messages = warning;
              TRUNCATE nocrm.leads, nocrm.tags, nocrm.comments, nocrm.emails, nocrm.lead_history, nocrm.automation_runs,
                       nocrm.notifications, nocrm.queue RESTART IDENTITY CASCADE; $extra" \
          -c "VACUUM ANALYZE" -c "CHECKPOINT" >/dev/null
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "" || b == "" || b == 0) print "n/a"; else printf "%.2f", a / b}'; }

# The columns the bare variant writes itself to end with the same rows as
# the bookkeeping triggers (the first step of Vendite): the same foreign key
# checks.  It gets no owner: nothing assigns one.
insert_sql() {  # insert_sql VARIANT N TITLE_PREFIX
    if [ "$1" = bare ]; then
        echo "INSERT INTO nocrm.leads (title, pipeline_id, step_id, contact_email)
              SELECT '$3 ' || g, 1, 1, 'lead' || g || '@bench.test' FROM generate_series(1, $2) g;"
    else
        echo "INSERT INTO nocrm.leads (title, pipeline_id, contact_email)
              SELECT '$3 ' || g, 1, 'lead' || g || '@bench.test' FROM generate_series(1, $2) g;"
    fi
}

# --------------------------------------------------------- equivalence ---
# The same small workload in handwritten and every engine database; what the
# rules wrote must be the same (the engine's own history and run log aside).
EQUIV_SQL="
SELECT 'owners ' || coalesce(string_agg(u.email || '=' || c.n, ' ' ORDER BY u.email), '-')
  FROM (SELECT user_id, count(*) AS n FROM nocrm.leads GROUP BY user_id) c LEFT JOIN nocrm.users u ON u.id = c.user_id;
SELECT 'tags ' || coalesce(string_agg(name || '=' || n, ' ' ORDER BY name), '-')
  FROM (SELECT name, count(*) AS n FROM nocrm.tags GROUP BY name) t;
SELECT 'queue ' || count(*) || ' ' || coalesce(string_agg(DISTINCT kind || '/' || (payload->>'template'), ','), '-')
       || ' recipients=' || count(DISTINCT recipient) FROM nocrm.queue;
SELECT 'notifications ' || count(*) || ' to ' || coalesce(string_agg(DISTINCT u.email, ','), '-')
  FROM nocrm.notifications n JOIN nocrm.users u ON u.id = n.user_id;
SELECT 'notification text ' || md5(coalesce(string_agg(lead_id || ':' || message, ',' ORDER BY lead_id, message), ''))
  FROM nocrm.notifications;"
EQUIV_WARN=""
declare -A EQUIV
for v in $VARIANTS; do
    [ "$v" = bare ] && continue
    reset_data "$v"
    psql_v "$v" >/dev/null <<EOF
$(insert_sql "$v" 30 'Equiv lead')
UPDATE nocrm.leads SET status = 'won' WHERE id % 3 = 0;
UPDATE nocrm.leads SET step_id = 3 WHERE id % 3 = 1;
DELETE FROM nocrm.leads WHERE id % 6 = 5;
EOF
    EQUIV[$v]="$(psql_v "$v" -c "$EQUIV_SQL")"
done
for v in $ENGINES; do
    if [ "${EQUIV[$v]}" != "${EQUIV[handwritten]}" ]; then
        EQUIV_WARN+="$v "
        echo "core_bench: WARNING: $v and handwritten wrote different rows for the same workload:" >&2
        diff <(echo "${EQUIV[handwritten]}") <(echo "${EQUIV[$v]}") >&2 || :
    fi
done
log "equivalence: ${EQUIV_WARN:-handwritten and every engine wrote the same rows}"

# ------------------------------------------------------------------ bulk ---
declare -A R   # R[kind,variant] = "v1 v2 ..."
# One session: warm-up, the insert, the status update, the step move.
# Prints "insert_s update_s step_s wal_bytes_per_lead".
measure_bulk() {  # measure_bulk VARIANT N [STEP(1|0)]
    local v=$1 n=$2 step=${3:-1} upd=""
    if [ "$step" = 1 ]; then
        upd="UPDATE nocrm.leads SET status = 'won';
SELECT extract(epoch FROM clock_timestamp()) AS t2 \\gset
UPDATE nocrm.leads SET step_id = 3;
SELECT extract(epoch FROM clock_timestamp()) AS t3 \\gset"
    else
        upd="SELECT :t1 AS t2, :t1 AS t3 \\gset"
    fi
    psql_v "$v" <<EOF | tail -n 1
-- warm-up, not timed: a pooled backend has its caches, plans and
-- PL/pgSQL functions loaded; a new connection pays for that once.
BEGIN;
INSERT INTO nocrm.leads (title, pipeline_id, contact_email) VALUES ('warm-up', 1, 'warm@bench.test');
ROLLBACK;
SELECT pg_current_wal_lsn() AS l0, extract(epoch FROM clock_timestamp()) AS t0 \gset
$(insert_sql "$v" "$n" 'Bench lead')
SELECT pg_current_wal_lsn() AS l1, extract(epoch FROM clock_timestamp()) AS t1 \gset
$upd
SELECT round(:t1 - :t0, 3) || ' ' || round(:t2 - :t1, 3) || ' ' || round(:t3 - :t2, 3) || ' '
       || round(pg_wal_lsn_diff(:'l1', :'l0') / $n);
EOF
}
for rep in $(seq 1 "$REPEATS"); do
    for v in $VARIANTS; do     # interleaved: drift of a busy machine hits every variant alike
        reset_data "$v"
        read -r ins upd step wal < <(measure_bulk "$v" "$ROWS") || :
        [ -n "${wal:-}" ] || die "bulk $v failed"
        R[ins,$v]+="$ins "; R[upd,$v]+="$upd "; R[step,$v]+="$step "; R[wal,$v]+="$wal "
        log "bulk $v ($rep/$REPEATS): insert ${ins}s, status ${upd}s, step ${step}s, WAL ${wal} B/lead"
    done
    # the engine without its own records (history and run log): what the rules alone cost
    set_history engine none
    reset_data engine
    read -r ins upd step wal < <(measure_bulk engine "$ROWS") || :
    [ -n "${wal:-}" ] || die "bulk engine (history = none) failed"
    R[ins,engine:none]+="$ins "; R[upd,engine:none]+="$upd "; R[step,engine:none]+="$step "; R[wal,engine:none]+="$wal "
    log "bulk engine history=none ($rep/$REPEATS): insert ${ins}s, status ${upd}s, step ${step}s, WAL ${wal} B/lead"
    set_history engine actions
done

# ---------------------------------------------------- pg_stat_statements ---
declare -A CALLS TOP
for v in $VARIANTS; do
    reset_data "$v"
    psql_v "$v" >/dev/null <<EOF
BEGIN;
INSERT INTO nocrm.leads (title, pipeline_id, contact_email) VALUES ('warm-up', 1, 'warm@bench.test');
ROLLBACK;
SELECT pg_stat_statements_reset();
SET pg_stat_statements.track = 'all';
$(insert_sql "$v" "$ROWS" 'Bench lead')
SET pg_stat_statements.track = 'none';
EOF
    # top-level statements are the INSERT and the two SETs; the rest ran inside
    CALLS[$v]=$(psql_v "$v" -c "SELECT round(coalesce(sum(calls) FILTER (WHERE NOT toplevel), 0)::numeric / $ROWS, 2)
                                  FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())")
    TOP[$v]=$(psql_v "$v" -F ' | ' -c "
        SELECT '| ' || CASE WHEN toplevel THEN 'top' ELSE 'nested' END,
               '\`' || replace(left(regexp_replace(query, '\\s+', ' ', 'g'), 80), '|', '\\|') || '\`',
               calls, round(total_exec_time::numeric, 1) || ' |'
          FROM pg_stat_statements
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND query NOT LIKE 'SET pg_stat_statements%'
         ORDER BY total_exec_time DESC LIMIT 8")
    log "statements $v: ${CALLS[$v]} nested calls per lead"
done

# ------------------------------------------------------------- no match ---
NM_CASES="none:actions none:all nomatch1000:actions nomatch1000:all fields1000:actions"
for rep in $(seq 1 "$REPEATS"); do
    # bare again, next to these inserts: the ratios compare runs minutes
    # apart at most, not the bulk section's bare run
    reset_data bare
    ins=""; read -r ins _ < <(measure_bulk bare "$ROWS" 0) || :
    [ -n "$ins" ] || die "no-match insert bare failed"
    R[nm,bare]+="$ins "
    log "no match bare ($rep/$REPEATS): insert ${ins}s"
    for v in $ENGINES; do
        for c in $NM_CASES; do
            # field conditions are new in 1.3: an older build refuses them
            [ "${c%%:*}" = fields1000 ] && [ "$v" != engine ] && continue
            load_engine_rules "$v" "${c%%:*}"; set_history "$v" "${c#*:}"
            reset_data "$v"
            ins=""; read -r ins _ < <(measure_bulk "$v" "$ROWS" 0) || :
            [ -n "$ins" ] || die "no-match insert $v failed"
            R[nm,$v,$c]+="$ins "
            log "no match $v ${c%%:*} history=${c#*:} ($rep/$REPEATS): insert ${ins}s"
        done
        load_engine_rules "$v" seed5; set_history "$v" actions
    done
done

# -------------------------------------------------------------- pgbench ---
cat >"$WORK/lead_insert.sql" <<'EOF'
INSERT INTO nocrm.leads (title, pipeline_id, contact_email) VALUES ('pgbench lead', 1, 'pgb@bench.test');
EOF
cat >"$WORK/status_upd.sql" <<EOF
\set id random(1, $PGB_ROWS)
UPDATE nocrm.leads SET status = CASE WHEN status = 'won' THEN 'todo' ELSE 'won' END WHERE id = :id;
EOF
chown postgres: "$WORK"/*.sql
load_handwritten seed3
for v in $ENGINES; do load_engine_rules "$v" seed3; done
log_errors() {  # log_errors FROM_BYTE: "deadlocks serialization_failures" logged since
    local d s
    d=$(tail -c +"$(($1 + 1))" "$LOGFILE" | grep -c 'deadlock detected') || :
    s=$(tail -c +"$(($1 + 1))" "$LOGFILE" | grep -c 'could not serialize access') || :
    echo "${d:-0} ${s:-0}"
}
declare -A DEADLOCKS SERFAIL FAIR
for rep in $(seq 1 "$REPEATS"); do
    for w in lead_insert status_upd; do
        for v in $VARIANTS; do
            reset_data "$v"
            if [ "$w" = status_upd ]; then   # the leads to toggle, written without triggers
                psql_v "$v" -c "SET session_replication_role = replica" \
                    -c "INSERT INTO nocrm.leads (title, pipeline_id, step_id, user_id, contact_email)
                        SELECT 'L' || g, 1, 1, 1 + g % 3, 'l' || g || '@bench.test' FROM generate_series(1, $PGB_ROWS) g" \
                    -c "VACUUM ANALYZE nocrm.leads" >/dev/null
            fi
            off=$(stat -c %s "$LOGFILE")
            tps=$(runuser -u postgres -- "$PGBIN/pgbench" -h "$WORK" -n -c 8 -j 2 -T "$PGB_T" \
                    -f "$WORK/$w.sql" "${DB[$v]}" 2>"$WORK/pgbench.err" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -n1) || tps=""
            [ -n "$tps" ] || { cat "$WORK/pgbench.err" >&2; die "pgbench $w $v failed"; }
            tps=$(printf '%.0f' "$tps")
            R[pgb,$w,$v]+="$tps "
            read -r d s < <(log_errors "$off")
            DEADLOCKS[$w,$v]=$(( ${DEADLOCKS[$w,$v]:-0} + d )); SERFAIL[$w,$v]=$(( ${SERFAIL[$w,$v]:-0} + s ))
            if [ "$w" = lead_insert ] && [ "$v" != bare ]; then
                FAIR[$v]+="$(psql_v "$v" -c "SELECT max(n) - min(n) FROM (SELECT u.id, count(l.id) AS n
                    FROM nocrm.users u LEFT JOIN nocrm.leads l ON l.user_id = u.id
                   WHERE u.email IN ('anna@example.com', 'matteo@example.com', 'giovanni@example.com') GROUP BY u.id) c") "
            fi
            log "pgbench $w $v ($rep/$REPEATS): $tps tps, deadlocks $d, serialization failures $s"
        done
    done
done

# --------------------------------------------------------------- report ---
m() { median ${R[$1]}; }
CPU_MODEL="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
ELAPSED=$(( $(date +%s) - T_START ))
TREE="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
[ -z "$(git -C "$ROOT" status --porcelain -- src 2>/dev/null)" ] || TREE+=" (src/ has uncommitted changes)"
{
    echo "# nocrm_automation core benchmark: engine vs hand-written PL/pgSQL vs bare"
    echo
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- Machine: nproc=$(nproc), CPU: $CPU_MODEL"
    echo "- $PGVER; shared_buffers=256MB, max_wal_size=4GB, synchronous_commit=on; one server, one database per variant"
    echo "- shared_preload_libraries = '$PRELOAD', nocrm.worker_database = '$WORKER_DB' (the notify relay sends the engine's NOTIFYs after commit), drain off"
    echo "- engine: installed nocrm_automation.so at start, md5 $SO_MD5…; tree $TREE"
    if [ -n "$BASELINE_SO" ]; then
        echo "- engine@baseline: $BASELINE_SO, md5 $BASE_MD5…$( [ -f "$(dirname "$BASELINE_SO")/COMMIT" ] && echo " (COMMIT $(head -c 12 "$(dirname "$BASELINE_SO")/COMMIT"))")"
    fi
    echo "- Run: \`bash test/bench/core_bench.sh${ARGS:+ $ARGS}\` (rows=$ROWS, REPEATS=$REPEATS, PGB_T=$PGB_T, PGB_ROWS=$PGB_ROWS); took ${ELAPSED} s"
    echo "- Variants: *bare* = extension triggers disabled; *handwritten* = test/bench/handwritten_rules.sql (extension"
    echo "  triggers disabled); *engine* = this extension with the rules as automations (rulesets.sh seed5 / seed3)."
    echo "  nocrm.history = actions everywhere. Medians of $REPEATS; all runs at the end."
    echo "- What they write: the same leads, owners, tags, queue rows, notifications and NOTIFYs; the engine also writes"
    echo "  its nocrm.lead_history action rows and nocrm.automation_runs rows (history = actions keeps those)."
    echo
    echo "## Equivalence (30 leads: insert, 10 won, 10 to Preventivo, 5 deleted; not timed)"
    echo
    if [ -z "$EQUIV_WARN" ]; then
        echo "handwritten and $(echo $ENGINES | sed 's/ /, /g') wrote the same owners, tags, queue rows and notifications:"
    else
        echo "**WARNING: different rows from: $EQUIV_WARN** — handwritten wrote:"
    fi
    echo
    echo "${EQUIV[handwritten]}" | sed 's/^/    /'
    for v in $EQUIV_WARN; do echo; echo "$v wrote:"; echo; echo "${EQUIV[$v]}" | sed 's/^/    /'; done
    echo
    echo "## Bulk, rule set seed5: INSERT … SELECT of $ROWS leads (Vendite, no owner), UPDATE status = 'won' of all, UPDATE of all to step Preventivo"
    echo
    echo "| variant | insert s | ÷bare | ÷handwritten | status s | ÷bare | ÷handwritten | step s | ÷bare | ÷handwritten | WAL B/lead (insert) |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for v in $VARIANTS engine:none; do
        line="| $v"
        [ "$v" = engine:none ] && line="| engine, nocrm.history = none"
        for k in ins upd step; do
            line+=" | $(m $k,$v) | $(ratio "$(m $k,$v)" "$(m $k,bare)") | $(ratio "$(m $k,$v)" "$(m $k,handwritten)")"
        done
        echo "$line | $(m wal,$v) |"
    done
    echo
    echo "÷bare, ÷handwritten: this variant's time over bare's / handwritten's (engine rows: engine/bare, engine/handwritten)."
    echo "Bare writes the first step itself (the same rows and foreign key checks) but no owner, tags, queue or notifications."
    echo "*engine, nocrm.history = none*: the same database and rules without the engine's own records (no lead_history,"
    echo "no automation_runs rows): the difference to *engine* is the cost of the audit trail, which handwritten does not keep."
    if [ -n "$BASELINE_SO" ]; then
        echo
        echo "engine ÷ engine@baseline: insert $(ratio "$(m ins,engine)" "$(m ins,engine@baseline)"),"
        echo "status $(ratio "$(m upd,engine)" "$(m upd,engine@baseline)"), step $(ratio "$(m step,engine)" "$(m step,engine@baseline)") (below 1: the installed build is faster)."
    fi
    echo
    echo "## Statements of one insert of $ROWS leads (pg_stat_statements, track = all)"
    echo
    echo "| variant | nested statement calls per lead |"
    echo "|---|---:|"
    for v in $VARIANTS; do echo "| $v | ${CALLS[$v]} |"; done
    for v in $VARIANTS; do
        echo
        echo "Top 8 by total_exec_time, $v (nested times are included in the time of the statement that ran them):"
        echo
        echo "| level | query (80 chars) | calls | ms |"
        echo "|---|---|---:|---:|"
        echo "${TOP[$v]}"
    done
    echo
    echo "## No match: bulk insert of $ROWS leads (Vendite) with rules that do nothing, vs bare"
    echo
    echo "| build | rules | nocrm.history | insert s | ÷bare |"
    echo "|---|---|---|---:|---:|"
    echo "| bare | – | – | $(m nm,bare) | 1.00 |"
    for v in $ENGINES; do
        for c in $NM_CASES; do
            [ "${c%%:*}" = fields1000 ] && [ "$v" != engine ] && continue
            case ${c%%:*} in
                none) r="(a) none" ;;
                fields1000) r="1,000 failing field conditions (fields1000)" ;;
                *) r="1,000 non-matching (nomatch1000)" ;;
            esac
            echo "| $v | $r | ${c#*:} | $(m nm,$v,$c) | $(ratio "$(m nm,$v,$c)" "$(m nm,bare)") |"
        done
    done
    echo
    echo "Bare is measured again in each repetition of this section, next to these inserts."
    echo "The insert here is the bulk section's: Vendite, no owner; no rule can act on it."

    echo
    echo "## pgbench, rule set seed3 (notify on creation, round robin, won → tag), -c 8 -j 2 -T $PGB_T"
    echo
    echo "| workload | variant | tps | engine÷handwritten | ÷bare | deadlocks | serialization failures | round-robin max−min |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|"
    for w in lead_insert status_upd; do
        case $w in
            lead_insert) wl="INSERT one lead (Vendite, no owner)" ;;
            status_upd) wl="status toggle won/todo, 1 of $PGB_ROWS leads" ;;
        esac
        for v in $VARIANTS; do
            t=$(m "pgb,$w,$v")
            eh="–"; case $v in engine*) eh=$(ratio "$t" "$(m "pgb,$w,handwritten")") ;; esac
            fair="–"; [ "$w" = lead_insert ] && [ "$v" != bare ] && fair=$(median ${FAIR[$v]})
            echo "| $wl | $v | $t | $eh | $(ratio "$t" "$(m "pgb,$w,bare")") | ${DEADLOCKS[$w,$v]} | ${SERFAIL[$w,$v]} | $fair |"
        done
    done
    echo
    echo "Deadlocks and serialization failures: 'deadlock detected' / 'could not serialize access' lines in the server"
    echo "log during that variant's runs (all repetitions). Round-robin max−min: leads per owner among anna, matteo and"
    echo "giovanni after the insert run (median over repetitions); every lead of that run is counted."
    echo
    echo "## All runs"
    echo
    for k in $(printf '%s\n' "${!R[@]}" | sort); do echo "- $k: ${R[$k]}"; done
    for v in "${!FAIR[@]}"; do echo "- round-robin max−min,$v: ${FAIR[$v]}"; done
} >"$WORK/core.md"
mkdir -p "$HERE/results"
cp "$WORK/core.md" "$HERE/results/core.md"
echo; cat "$WORK/core.md"
