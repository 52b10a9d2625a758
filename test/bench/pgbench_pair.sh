#!/bin/bash
# pgbench_pair.sh — pgbench -c 8 -j 2, rule set seed3, handwritten against
# engine on one throwaway server (a quick form of core_bench's pgbench part).
#   PRELOAD=1 SC=on T=10 REP=2 W=lead_insert|status_upd bash test/bench/pgbench_pair.sh
# PRELOAD=1: shared_preload_libraries = 'nocrm_automation' and
# nocrm.worker_database = engine (the notify relay); SC: synchronous_commit;
# HIST: nocrm.history (actions); PERF=1: perf record of the engine's backends.
set -e
H="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. $H/server.sh; . $H/rulesets.sh
bench_scratch /tmp/nocrm_pgb_pair; PG=$PGBIN
echo "INSERT INTO nocrm.leads (title, pipeline_id, contact_email) VALUES ('pgbench lead', 1, 'pgb@bench.test');" > $WORK/lead_insert.sql
printf '%s\n' '\set id random(1, 10000)' "UPDATE nocrm.leads SET status = CASE WHEN status = 'won' THEN 'todo' ELSE 'won' END WHERE id = :id;" > $WORK/status_upd.sql
chown postgres $WORK/*
bench_server_start pgb <<EOF
shared_buffers = 256MB
max_connections = 30
max_wal_size = 4GB
synchronous_commit = ${SC:-on}
${PRELOAD:+shared_preload_libraries = 'nocrm_automation'}
${PRELOAD:+nocrm.worker_database = 'engine'}
EOF
RULES_VARIANT=engine; psql_() { q engine "$@"; }
for v in handwritten engine; do
  runuser -u postgres -- $PG/createdb -h $WORK $v
  q $v >/dev/null <<EOF
SET client_min_messages = warning;
CREATE EXTENSION nocrm_automation;
$BENCH_CRM_SQL
EOF
  q bench -c "ALTER DATABASE $v SET nocrm.history = '${HIST:-actions}'"
done
q handwritten -v rules=seed3 -f $WORK/handwritten_rules.sql >/dev/null; q handwritten -c "SELECT anchor.enable()" >/dev/null
load_rules seed3 >/dev/null
W=${W:-lead_insert}
reset() {
  local extra=""
  case $1 in handwritten) extra="ALTER SEQUENCE anchor.rr_vendite RESTART;";; engine) extra="UPDATE nocrm.assignment_counters SET assigned = 0; TRUNCATE nocrm.assignment_increments;";; esac
  q $1 -c "SET client_min_messages = warning; TRUNCATE nocrm.leads, nocrm.tags, nocrm.comments, nocrm.emails, nocrm.lead_history, nocrm.automation_runs, nocrm.notifications, nocrm.queue RESTART IDENTITY CASCADE; $extra" >/dev/null
  if [ $W = status_upd ]; then q $1 -c "SET session_replication_role = replica" -c "INSERT INTO nocrm.leads (title, pipeline_id, step_id, user_id, contact_email) SELECT 'L' || g, 1, 1, 1 + g % 3, 'l' || g || '@bench.test' FROM generate_series(1, 10000) g" >/dev/null; fi
  q $1 -c "VACUUM ANALYZE" -c CHECKPOINT >/dev/null
}
for r in $(seq ${REP:-2}); do
  line=""
  for v in handwritten engine; do
    reset $v
    [ -n "$PERF" ] && [ $v = engine ] && { ( sleep 2; perf record -F 999 -g -o $WORK/perf.data -p $(pgrep -d, -f "postgres: postgres engine") -- sleep 5 >/dev/null 2>&1 ) & PP=$!; }
    tps=$(runuser -u postgres -- $PG/pgbench -h $WORK -n -c 8 -j 2 -T ${T:-10} -f $WORK/$W.sql $v 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
    [ -n "$PERF" ] && [ $v = engine ] && { wait $PP 2>/dev/null || true; }
    line+="$v $tps | "
  done
  echo "rep $r $W: $line"
done
runuser -u postgres -- $PG/pg_ctl -D $PGDATA -m fast stop >/dev/null
