#!/bin/bash
# engine_bench.sh — cost of the nocrm_automation trigger engine, side by side
# with the same tables without triggers (bare) and a hand-written PL/pgSQL
# implementation of the same rules (plpgsql_rules.sql).
#
#   bash test/bench/engine_bench.sh [--rows N] [--big]   (as root; extension installed)
#
# Starts a throwaway PostgreSQL 15 (initdb in a mktemp dir, run as postgres,
# unix socket only), same settings for every variant.  Every measurement is
# repeated REPEATS times; medians are reported.  Writes test/bench/results/engine.md.
# Knobs: --rows N (default 100000; --big = 1000000), PGB_T=15 (pgbench seconds),
# REPEATS=3, KEEP=1 keeps the work directory.
set -euo pipefail

ROWS=100000
while [ $# -gt 0 ]; do
    case "$1" in
        --rows) ROWS=$2; shift 2 ;;
        --big) ROWS=1000000; shift ;;
        *) echo "usage: $0 [--rows N] [--big]" >&2; exit 2 ;;
    esac
done
PGB_T=${PGB_T:-15}
REPEATS=${REPEATS:-3}
PGB_ROWS=${PGB_ROWS:-10000}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
T_START=$(date +%s)
die() { echo "engine_bench: $*" >&2; exit 1; }
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

[ "$(id -u)" = 0 ] || die "run as root (it starts PostgreSQL as the postgres user with runuser)"
PGBIN="$(pg_config --bindir)"
PGVER="$("$PGBIN/postgres" --version)"
case "$PGVER" in *" 15."*) ;; *) die "needs PostgreSQL 15, found: $PGVER" ;; esac
[ -f "$(pg_config --sharedir)/extension/nocrm_automation.control" ] || die "nocrm_automation is not installed"
EXT_SO="$(pg_config --pkglibdir)/nocrm_automation.so"

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
    if [ -f "$PGDATA/postmaster.pid" ]; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1 ||
            runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate -w stop >/dev/null 2>&1
    fi
    if [ "${KEEP:-0}" = 1 ]; then echo "engine_bench: kept $WORK" >&2; else rm -rf "$WORK"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "initdb + start PostgreSQL in $WORK (rows=$ROWS, pgbench ${PGB_T}s, repeats=$REPEATS)"
runuser -u postgres -- "$PGBIN/initdb" -D "$PGDATA" -A trust -U postgres -E UTF8 \
    --locale=C --no-instructions >"$WORK/initdb.log" 2>&1 || { cat "$WORK/initdb.log"; die "initdb failed"; }
cat >>"$PGDATA/postgresql.conf" <<EOF
# engine_bench.sh — the same for every variant
listen_addresses = ''
unix_socket_directories = '$WORK'
max_connections = 30
shared_buffers = 256MB
max_wal_size = 4GB
checkpoint_timeout = 30min
synchronous_commit = on
EOF
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/postgres.log" -w start >/dev/null ||
    { tail -n 30 "$WORK/postgres.log"; die "PostgreSQL did not start"; }
runuser -u postgres -- "$PGBIN/createdb" -h "$WORK" bench

psql_ >/dev/null <<EOF
CREATE EXTENSION nocrm_automation;
INSERT INTO nocrm.users (name, email) VALUES ('Anna','anna@example.com'),('Matteo','matteo@example.com'),
  ('Giovanni','giovanni@example.com'),('Sara','sara@example.com');
-- pipeline 1 Vendite (steps 1..3, Preventivo = 3), 2 Onboarding (4, 5), 3 Altro (6)
INSERT INTO nocrm.pipelines (name) VALUES ('Vendite'), ('Onboarding'), ('Altro');
INSERT INTO nocrm.steps (pipeline_id, name, position) VALUES (1,'Nuovo',1),(1,'Qualificato',2),(1,'Preventivo',3),
  (2,'Kickoff',1),(2,'Preventivo',2),(3,'Inizio',1);
INSERT INTO nocrm.email_templates (name, subject, body) VALUES ('quote_followup','Il suo preventivo: {{lead.title}}','Gentile cliente');
UPDATE pg_catalog.pg_proc SET probin = '$WORK/lib/nocrm_automation.so' WHERE probin = '\$libdir/nocrm_automation';
EOF
psql_ -f "$HERE/plpgsql_rules.sql" >/dev/null

# ------------------------------------------------------------ rule sets ---
RULES_B="
SELECT nocrm.create_automation(name=>'notify on creation', event=>'lead.creation',
  actions=>'[{\"type\":\"notify\",\"user\":\"sara@example.com\",\"message\":\"Nuovo lead: {{lead.title}}\"}]');
SELECT nocrm.create_automation(name=>'notify on deletion', event=>'lead.deleted',
  actions=>'[{\"type\":\"notify\",\"user\":\"sara@example.com\",\"message\":\"Lead eliminato: {{lead.title}}\"}]');
SELECT nocrm.create_automation(name=>'round robin', event=>'lead.creation', conditions=>'{\"pipeline\":\"Vendite\",\"owner\":null}',
  actions=>'[{\"type\":\"assign_round_robin\",\"users\":[\"anna@example.com\",\"matteo@example.com\",\"giovanni@example.com\"]}]');
SELECT nocrm.create_automation(name=>'balanced', event=>'lead.creation', conditions=>'{\"pipeline\":\"Onboarding\",\"owner\":null}',
  actions=>'[{\"type\":\"assign_balanced\",\"users\":[\"anna@example.com\",\"matteo@example.com\",\"giovanni@example.com\"]}]');
SELECT nocrm.create_automation(name=>'Preventivo', event=>'lead.step.changed.to', target=>'Preventivo', conditions=>'{\"pipeline\":\"Vendite\"}',
  actions=>'[{\"type\":\"send_email\",\"template\":\"quote_followup\"},{\"type\":\"add_tags\",\"tags\":[\"Preventivo inviato\"]}]');
SELECT nocrm.create_automation(name=>'won upsell', event=>'lead.status.changed.to', target=>'won',
  actions=>'[{\"type\":\"add_tags\",\"tags\":[\"Upsell Opportunity\"]}]');
"
# N rules on other events (comments, emails, status lost), or on lead.creation
# with a condition that never holds for the benchmark's leads.
extra_rules() {  # extra_rules N MODE  (MODE: mixed | other)
    cat <<EOF
INSERT INTO nocrm.automations (name, event, target, conditions, actions)
SELECT 'extra ' || g,
       CASE WHEN '$2' = 'mixed' AND g % 4 = 0 THEN 'lead.creation'
            WHEN g % 3 = 0 THEN 'lead.commented' WHEN g % 3 = 1 THEN 'lead.email.received'
            ELSE 'lead.status.changed.to' END,
       CASE WHEN ('$2' <> 'mixed' OR g % 4 <> 0) AND g % 3 = 2 THEN 'lost' END,
       CASE WHEN '$2' = 'mixed' AND g % 4 = 0 THEN '{"pipeline": "Onboarding", "status": "lost"}'::jsonb
            ELSE '{}'::jsonb END,
       jsonb_build_array(jsonb_build_object('type', 'add_tags', 'tags', jsonb_build_array('extra ' || g)))
  FROM generate_series(1, $1) g;
EOF
}
load_rules() {  # load_rules none|b|c|nomatch1000|other10|other10000|rr|assign
    local sql="TRUNCATE nocrm.automations RESTART IDENTITY CASCADE;"
    case $1 in
        none) ;;
        b) sql+="$RULES_B" ;;
        c) sql+="$RULES_B $(extra_rules 1000 mixed)" ;;
        nomatch1000) sql+="$(extra_rules 1000 mixed)" ;;
        other10) sql+="$(extra_rules 10 other)" ;;
        other10000) sql+="$(extra_rules 10000 other)" ;;
        rr) sql+="SELECT nocrm.create_automation(name=>'rr', event=>'lead.creation', conditions=>'{\"pipeline\":\"Vendite\",\"owner\":null}',
              actions=>'[{\"type\":\"assign_round_robin\",\"users\":[\"anna@example.com\",\"matteo@example.com\",\"giovanni@example.com\"]}]');" ;;
        assign) sql+="SELECT nocrm.create_automation(name=>'assign', event=>'lead.creation', conditions=>'{\"pipeline\":\"Vendite\",\"owner\":null}',
              actions=>'[{\"type\":\"assign\",\"user\":\"anna@example.com\"}]');" ;;
    esac
    psql_ -c "$sql" >/dev/null
}
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
              UPDATE nocrm.assignment_counters SET assigned = 0; UPDATE public.bench_rr_counters SET assigned = 0;" \
          -c "VACUUM ANALYZE" -c "CHECKPOINT" >/dev/null
}
fsub() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f\n", a - b}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

declare -A R   # R[name] = "v1 v2 v3"
declare -A HWM

# bulk: one insert of ROWS leads, then UPDATE status='won' on all of them;
# wall clock measured inside the backend; VmHWM of that backend after the insert.
bulk() {  # bulk NAME VARIANT RULES PIPELINE
    local name=$1 variant=$2 rules=$3 pipe=$4 rep
    set_variant "$variant"; load_rules "$rules"
    for rep in $(seq 1 "$REPEATS"); do
        reset_data
        psql_ <<EOF >/dev/null
SELECT pg_backend_pid() AS bpid \gset
\setenv BPID :bpid
SELECT count(*) FROM nocrm.leads;
\! date +%s.%N > $RUN/t0
INSERT INTO nocrm.leads (title, pipeline_id, contact_email)
SELECT 'Bench lead ' || g, $pipe, 'lead' || g || '@bench.test' FROM generate_series(1, $ROWS) g;
\! date +%s.%N > $RUN/t1; grep VmHWM /proc/\$BPID/status | awk '{print \$2}' > $RUN/hwm
\! date +%s.%N > $RUN/u0
UPDATE nocrm.leads SET status = 'won';
\! date +%s.%N > $RUN/u1
EOF
        R[ins,$name]+="$(fsub "$(cat "$RUN/t1")" "$(cat "$RUN/t0")") "
        R[upd,$name]+="$(fsub "$(cat "$RUN/u1")" "$(cat "$RUN/u0")") "
        HWM[$name]+="$(cat "$RUN/hwm") "
    done
    log "bulk $name: insert ${R[ins,$name]}s; update ${R[upd,$name]}s; VmHWM kB ${HWM[$name]}"
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
                -f "$WORK/$script.sql" bench 2>"$WORK/pgbench.err" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -n1)
        [ -n "$tps" ] || { cat "$WORK/pgbench.err" >&2; die "pgbench $name failed"; }
        R[pgb,$name]+="$tps "
    done
    log "pgbench $name: tps ${R[pgb,$name]}"
}

# ---------------------------------------------------------- measurements ---
bulk bare          bare    none        1
bulk engine_a      engine  none        1
bulk engine_nm1000 engine  nomatch1000 3
bulk engine_o10    engine  other10     3
bulk engine_o10000 engine  other10000  3
bulk engine_b      engine  b           1
bulk plpgsql_b     plpgsql b           1
bulk engine_c      engine  c           1

pgb txn_bare_1     bare    none lead_txn 1
pgb txn_engine_1   engine  b    lead_txn 1
pgb txn_plpgsql_1  plpgsql b    lead_txn 1
pgb txn_bare_8     bare    none lead_txn 8
pgb txn_engine_8   engine  b    lead_txn 8
pgb txn_plpgsql_8  plpgsql b    lead_txn 8
pgb st_bare_8      bare    none status_upd 8
pgb st_engine_8    engine  b    status_upd 8
pgb st_plpgsql_8   plpgsql b    status_upd 8
pgb rr_engine_8    engine  rr     insert_only 8
pgb as_engine_8    engine  assign insert_only 8

# rule cache size after a forced load (a lead inserted and rolled back)
set_variant engine
declare -A CACHE
for n in 1000 10000; do
    load_rules "$( [ $n = 1000 ] && echo nomatch1000 || echo other10000 )"
    CACHE[$n]=$(psql_ <<'EOF' | tail -n1
BEGIN;
INSERT INTO nocrm.leads (title, pipeline_id) VALUES ('cache load', 3);
ROLLBACK;
SELECT coalesce(sum(total_bytes), 0) FROM pg_backend_memory_contexts WHERE name = 'nocrm rule cache';
EOF
)
    log "rule cache with $n rules: ${CACHE[$n]} bytes"
done

# ---------------------------------------------------------------- report ---
m() { median ${R[$1]}; }
mh() { median ${HWM[$1]}; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
verdict() { awk -v v="$1" -v g="$2" -v d="$3" 'BEGIN {ok = (d == "le") ? (v <= g) : (v >= g); print ok ? "met" : "**missed**"}'; }
CPU_MODEL="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
ELAPSED=$(( $(date +%s) - T_START ))
B_INS=$(m ins,bare); B_UPD=$(m upd,bare)
{
    echo "# nocrm_automation engine benchmark"
    echo
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- Machine: nproc=$(nproc), CPU: $CPU_MODEL"
    echo "- $PGVER; shared_buffers=256MB, max_wal_size=4GB, synchronous_commit=on, same server and settings for every variant"
    echo "- nocrm_automation: installed library at start (md5 $SO_MD5…); tree $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "- Run: \`bash test/bench/engine_bench.sh --rows $ROWS\` with PGB_T=$PGB_T REPEATS=$REPEATS; took ${ELAPSED} s"
    echo "- Medians of $REPEATS; all runs listed below. Variants: *bare* = extension triggers disabled (DISABLE TRIGGER USER);"
    echo "  *engine* = this extension; *plpgsql* = test/bench/plpgsql_rules.sql (same rules, same rows written)."
    echo "- Rule sets: (a) none; (b) the five help-page examples (notify on creation/deletion, round robin [pipeline Vendite],"
    echo "  balanced [pipeline Onboarding], step Preventivo in Vendite → send_email + add_tags, status won → add_tags Upsell Opportunity);"
    echo "  (c) = (b) + 1,000 extra enabled rules (¾ on lead.commented/lead.email.received/status lost, ¼ on lead.creation with"
    echo "  conditions {pipeline Onboarding, status lost} that never hold)."
    echo
    echo "## Bulk: one INSERT … SELECT of $ROWS leads, then UPDATE status = 'won' on all of them"
    echo
    echo "| variant | rules | leads inserted into | insert s | ×bare | update s | ×bare | backend VmHWM (insert) |"
    echo "|---|---|---|---:|---:|---:|---:|---:|"
    row() { local n=$1; echo "| $2 | $3 | $4 | $(m ins,$n) | $(ratio "$(m ins,$n)" "$B_INS") | $(m upd,$n) | $(ratio "$(m upd,$n)" "$B_UPD") | $(mh $n) kB |"; }
    row bare bare "–" "Vendite"
    row engine_a engine "(a) none" "Vendite"
    row engine_nm1000 engine "1,000 non-matching ((c) extras only)" "Altro"
    row engine_o10 engine "10 on other events" "Altro"
    row engine_o10000 engine "10,000 on other events" "Altro"
    row engine_b engine "(b)" "Vendite (round robin + notify fire)"
    row plpgsql_b plpgsql "(b)" "Vendite (round robin + notify fire)"
    row engine_c engine "(c)" "Vendite"
    echo
    echo "With (b)/(c), each inserted Vendite lead gets a notification and a round-robin owner (5 history rows, 2 run-log rows);"
    echo "the bulk UPDATE adds the tag Upsell Opportunity (4 history rows, 1 run-log row, 1 tag per lead)."
    echo
    echo "## pgbench (tps, -n -c N -j N -T $PGB_T)"
    echo
    echo "| workload | clients | bare | engine (b) | plpgsql (b) | engine/bare | engine/plpgsql |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    for c in 1 8; do
        echo "| txn: INSERT lead (Vendite) + UPDATE step → Preventivo | $c | $(m pgb,txn_bare_$c) | $(m pgb,txn_engine_$c) | $(m pgb,txn_plpgsql_$c) | $(ratio "$(m pgb,txn_engine_$c)" "$(m pgb,txn_bare_$c)") | $(ratio "$(m pgb,txn_engine_$c)" "$(m pgb,txn_plpgsql_$c)") |"
    done
    echo "| single-row status toggle won/todo on $PGB_ROWS leads | 8 | $(m pgb,st_bare_8) | $(m pgb,st_engine_8) | $(m pgb,st_plpgsql_8) | $(ratio "$(m pgb,st_engine_8)" "$(m pgb,st_bare_8)") | $(ratio "$(m pgb,st_engine_8)" "$(m pgb,st_plpgsql_8)") |"
    echo
    echo "Round robin vs plain assign (engine, one rule on lead.creation, INSERT-only, 8 clients): round robin $(m pgb,rr_engine_8) tps,"
    echo "assign $(m pgb,as_engine_8) tps, ratio $(ratio "$(m pgb,rr_engine_8)" "$(m pgb,as_engine_8)")."
    echo
    echo "## Rule cache (pg_backend_memory_contexts, 'nocrm rule cache', after a forced load)"
    echo
    echo "| enabled rules | bytes |"
    echo "|---:|---:|"
    echo "| 1,000 (mixed, as in (c)) | ${CACHE[1000]} |"
    echo "| 10,000 (other events) | ${CACHE[10000]} |"
    echo
    echo "## Goals"
    echo
    g1=$(ratio "$(m ins,engine_nm1000)" "$B_INS")
    g2=$(ratio "$(m ins,engine_o10000)" "$(m ins,engine_o10)")
    g3i=$(ratio "$(m ins,plpgsql_b)" "$(m ins,engine_b)"); g3u=$(ratio "$(m upd,plpgsql_b)" "$(m upd,engine_b)")
    g4=$(ratio "$(m pgb,txn_engine_8)" "$(m pgb,txn_bare_8)"); g4s=$(ratio "$(m pgb,st_engine_8)" "$(m pgb,st_bare_8)")
    g5=$(ratio "$(m pgb,rr_engine_8)" "$(m pgb,as_engine_8)")
    echo "| goal | measured | |"
    echo "|---|---:|---|"
    echo "| engine/bare ≤ 1.15, bulk insert, 1,000 rules none matching | $g1 | $(verdict "$g1" 1.15 le) |"
    echo "| 10,000 vs 10 rules on other events ≤ 1.05 (bulk insert) | $g2 | $(verdict "$g2" 1.05 le) |"
    echo "| plpgsql/engine ≥ 3, (b), bulk insert | $g3i | $(verdict "$g3i" 3 ge) |"
    echo "| plpgsql/engine ≥ 3, (b), bulk update | $g3u | $(verdict "$g3u" 3 ge) |"
    echo "| pgbench 8 clients engine/bare ≥ 0.90 (lead txn) | $g4 | $(verdict "$g4" 0.90 ge) |"
    echo "| pgbench 8 clients engine/bare ≥ 0.90 (status update) | $g4s | $(verdict "$g4s" 0.90 ge) |"
    echo "| round robin / plain assign ≥ 0.80, 8 clients | $g5 | $(verdict "$g5" 0.80 ge) |"
    echo
    echo "## All runs"
    echo
    for k in $(printf '%s\n' "${!R[@]}" | sort); do echo "- $k: ${R[$k]}"; done
    for k in $(printf '%s\n' "${!HWM[@]}" | sort); do echo "- VmHWM $k (kB): ${HWM[$k]}"; done
} >"$WORK/engine.md"
mkdir -p "$HERE/results"
cp "$WORK/engine.md" "$HERE/results/engine.md"
echo; cat "$WORK/engine.md"
