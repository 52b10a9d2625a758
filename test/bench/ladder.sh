#!/bin/bash
# ladder.sh — what each change of the optimisation round bought.
#
#   bash test/bench/ladder.sh [--rows N] [--brows N] [--quick]   (as root)
#
# Builds each commit of the round (git archive of the commit, make, make
# install), creates a fresh database with that build's extension on one
# throwaway server, and runs the same workloads on it, next to bare inserts
# measured on the same commit's database:
#   - no-match: INSERT ... SELECT of --rows leads (default 50,000) into a
#     pipeline none of 1,000 enabled rules can match, nocrm.history = actions,
#     then = all;
#   - (b): INSERT ... SELECT of --brows leads (default 10,000) with the five
#     help-page examples (notify + round robin fire on each), then UPDATE
#     status = 'won' on all of them (add_tags fires on each).
# Each is repeated REPEATS times (default 3); medians are reported, and
# ratios to bare measured in the same round.  Timed after a rolled-back
# warm-up insert in the same session.  Writes test/bench/results/ladder.md.
#
# The installed extension files are saved first and put back at the end.
# Knobs: REPEATS=3, COMMITS="sha:label ..." (default: the round's commits).
set -euo pipefail

ROWS=50000
BROWS=10000
REPEATS=${REPEATS:-3}
while [ $# -gt 0 ]; do
    case "$1" in
        --rows) ROWS=$2; shift 2 ;;
        --brows) BROWS=$2; shift 2 ;;
        --quick) ROWS=5000; BROWS=1000; REPEATS=1; shift ;;
        *) echo "usage: $0 [--rows N] [--brows N] [--quick]" >&2; exit 2 ;;
    esac
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
# shellcheck source=server.sh
. "$HERE/server.sh"
# shellcheck source=rulesets.sh
. "$HERE/rulesets.sh"
die() { echo "ladder: $*" >&2; exit 1; }
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

DEFAULT_COMMITS="9204bde:1.1,_before_the_round
0de2b87:gates_(WHEN_clauses),_step_cache_in_the_BEFORE_trigger,_which_runs_as_the_caller;_compact_rule_cache
e5a3f62:template_context_in_C_with_a_kept_plan;_generic_kept_plans
a6346f5:batched_writes_of_history,_run_log_and_notifications;_no_re-read_of_the_lead's_own_row
0ada76a:bulk_NOTIFY_past_1,000_per_transaction
17872ef:notify_messages_without_the_context_query
d202d60:actions_reuse_the_dispatcher's_lead_for_a_rule's_first_action
e4cf595:run_log_outcomes_built_as_jsonb;_tag_events_read_the_lead_only_when_rules_need_it
1823df7:lead_events_once_per_statement,_from_transition_tables
ca3295a:rules_of_*.changed.to_by_target;_cached_column_positions;_the_gate_reads_rows_in_place
7f75649:kept_plans_prepared_again_as_leads_and_tags_grow_(bulk_statements_on_a_fresh_CRM_were_quadratic)"
COMMITS=${COMMITS:-$DEFAULT_COMMITS}

[ "$(id -u)" = 0 ] || die "run as root (it installs each build and runs PostgreSQL as postgres)"
PGBIN="$(pg_config --bindir)"
PKGLIB="$(pg_config --pkglibdir)"
EXTDIR="$(pg_config --sharedir)/extension"
T_START=$(date +%s)

WORK="$(mktemp -d /tmp/nocrm_ladder.XXXXXX)"
chmod 755 "$WORK"
PGDATA="$WORK/data"
mkdir -p "$WORK/saved"
cp -p "$PKGLIB"/nocrm_automation.so "$EXTDIR"/nocrm_automation* "$WORK/saved/" 2>/dev/null || true
chown postgres: "$WORK"

cleanup() {
    local rc=$?
    set +e
    bench_server_stop
    if ls "$WORK/saved"/nocrm_automation.so >/dev/null 2>&1; then
        rm -f "$EXTDIR"/nocrm_automation*
        cp -p "$WORK/saved"/nocrm_automation.so "$PKGLIB/"
        cp -p "$WORK/saved"/nocrm_automation*.sql "$WORK/saved"/nocrm_automation.control "$EXTDIR/"
        log "the installed extension files are back as they were"
    fi
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bench_server_start "ladder.sh — the same for every commit" <<EOF
max_connections = 20
shared_buffers = 256MB
max_wal_size = 4GB
checkpoint_timeout = 30min
synchronous_commit = on
EOF

DB=bench
psql_() {
    runuser -u postgres -- "$PGBIN/psql" -h "$WORK" -X -q -v ON_ERROR_STOP=1 -At -d "$DB" "$@"
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }

TRIGGERS=on
triggers() {  # triggers on|off: the extension's triggers on the event tables
    local sql="" t
    TRIGGERS=$1
    for t in nocrm.leads nocrm.tags nocrm.comments nocrm.emails; do
        sql+="ALTER TABLE $t $([ "$1" = on ] && echo ENABLE || echo DISABLE) TRIGGER USER;"
    done
    psql_ -c "$sql" >/dev/null
}

# timed HISTORY PIPELINE N UPDATE: seconds of the insert (and of the update).
# With the triggers on, leads are written with a pipeline only (the BEFORE
# trigger places them on its first step); bare writes the same final rows.
timed() {
    local step="NULL"
    [ "$TRIGGERS" = off ] && step="(SELECT min(id) FROM nocrm.steps WHERE pipeline_id = $2)"
    psql_ <<EOF | tail -n1
SET client_min_messages = warning;
TRUNCATE nocrm.leads, nocrm.lead_history, nocrm.automation_runs, nocrm.notifications, nocrm.queue CASCADE;
UPDATE nocrm.assignment_counters SET assigned = 0; TRUNCATE nocrm.assignment_increments;
SET nocrm.history = '$1';
BEGIN;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('warm-up', $2);
ROLLBACK;
SELECT clock_timestamp() AS t0 \gset
INSERT INTO nocrm.leads (title, pipeline_id, step_id, contact_email)
SELECT 'Lead ' || g, $2, $step, 'l' || g || '@bench.test'
  FROM generate_series(1, $3) g;
SELECT clock_timestamp() AS t1 \gset
$([ "$4" = 1 ] && echo "UPDATE nocrm.leads SET status = 'won';")
SELECT round(extract(epoch FROM :'t1'::timestamptz - :'t0'::timestamptz)::numeric, 3) || ' ' ||
       round(extract(epoch FROM clock_timestamp() - :'t1'::timestamptz)::numeric, 3);
EOF
}

declare -A R
order=()
i=0
while read -r entry; do
    [ -n "$entry" ] || continue
    sha=${entry%%:*}; label=${entry#*:}; label=${label//_/ }
    i=$((i + 1))
    full=$(git -C "$ROOT" rev-parse --short "$sha")
    order+=("$i")
    R[label,$i]="$label"; R[sha,$i]="$full"
    log "[$i] $full: $label — build and install"
    mkdir -p "$WORK/src-$i"
    git -C "$ROOT" archive "$sha" | tar -x -C "$WORK/src-$i"
    make -s -C "$WORK/src-$i" PG_CONFIG=/usr/bin/pg_config >"$WORK/build-$i.log" 2>&1 || { tail "$WORK/build-$i.log"; die "build of $full failed"; }
    make -s -C "$WORK/src-$i" PG_CONFIG=/usr/bin/pg_config install >>"$WORK/build-$i.log" 2>&1 || die "install of $full failed"
    DB=bench
    psql_ -c "CREATE DATABASE c$i" >/dev/null
    DB=c$i
    psql_ >/dev/null <<EOF
SET client_min_messages = warning;
CREATE EXTENSION nocrm_automation;
$BENCH_CRM_SQL
EOF
    R[version,$i]=$(psql_ -c "SELECT extversion FROM pg_extension WHERE extname = 'nocrm_automation'")
    for rep in $(seq 1 "$REPEATS"); do
        load_rules nomatch1000
        triggers off; read -r ins _ < <(timed all 3 "$ROWS" 0); R[bare,$i]+="$ins "
        triggers on
        read -r ins _ < <(timed actions 3 "$ROWS" 0); R[nm_act,$i]+="$ins "
        read -r ins _ < <(timed all 3 "$ROWS" 0); R[nm_all,$i]+="$ins "
        load_rules b
        triggers off; read -r ins upd < <(timed all 1 "$BROWS" 1); R[bare_b_ins,$i]+="$ins "; R[bare_b_upd,$i]+="$upd "
        triggers on; read -r ins upd < <(timed all 1 "$BROWS" 1); R[b_ins,$i]+="$ins "; R[b_upd,$i]+="$upd "
    done
    log "[$i] bare ${R[bare,$i]}| no-match actions ${R[nm_act,$i]}| all ${R[nm_all,$i]}| (b) insert ${R[b_ins,$i]}| update ${R[b_upd,$i]}"
done <<<"$COMMITS"

m() { median ${R[$1]}; }
CPU_MODEL="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
{
    echo "# nocrm_automation: what each change of the optimisation round bought"
    echo
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); machine: nproc=$(nproc), $CPU_MODEL; $("$PGBIN/postgres" --version)"
    echo "- Run: \`bash test/bench/ladder.sh --rows $ROWS --brows $BROWS\`, REPEATS=$REPEATS (medians); took $(( $(date +%s) - T_START )) s"
    echo "- Each commit built and installed in turn, its own database on one server (shared_buffers=256MB, synchronous_commit=on)."
    echo "  *bare* = the same database with the extension's triggers disabled, measured in the same round."
    echo "- No-match: INSERT … SELECT of $ROWS leads into a pipeline none of 1,000 enabled rules matches (¼ on lead.creation)."
    echo "- (b): INSERT … SELECT of $BROWS leads, the five help-page examples (notify and round robin fire on each lead),"
    echo "  then UPDATE status = 'won' on all (add_tags fires on each). nocrm.history = all."
    echo
    echo "| # | commit | version | change | no-match ×bare, history=actions | no-match ×bare, history=all | (b) insert s | ×bare | (b) update s | ×bare |"
    echo "|---:|---|---|---|---:|---:|---:|---:|---:|---:|"
    for i in "${order[@]}"; do
        echo "| $i | ${R[sha,$i]} | ${R[version,$i]} | ${R[label,$i]} | $(ratio "$(m nm_act,$i)" "$(m bare,$i)") | $(ratio "$(m nm_all,$i)" "$(m bare,$i)") | $(m b_ins,$i) | $(ratio "$(m b_ins,$i)" "$(m bare_b_ins,$i)") | $(m b_upd,$i) | $(ratio "$(m b_upd,$i)" "$(m bare_b_upd,$i)") |"
    done
    echo
    echo "## All runs (seconds)"
    echo
    for k in $(printf '%s\n' "${!R[@]}" | grep -v '^label\|^sha\|^version' | sort -t, -k2n -k1); do echo "- $k: ${R[$k]}"; done
} >"$WORK/ladder.md"
mkdir -p "$HERE/results"
cp "$WORK/ladder.md" "$HERE/results/ladder.md"
cat "$WORK/ladder.md"
