#!/bin/bash
# txn_cpu.sh — what one-lead transactions cost the backend: a DO block that
# commits after every statement (N inserts of one lead, then N status flips
# won/todo of one lead), rule set seed3 (pgbench_pair's), timed by the
# backend's CPU time (/proc/<pid>/stat, 1/100 s), handwritten and engine side
# by side on one throwaway server.  A steadier view of pgbench's per-
# transaction cost than tps on a shared machine (no client, no fsync wait,
# no other session).  As root, the extension installed.
#   N=20000 REP=3 HIST=actions [PERF=ins|upd] bash test/bench/txn_cpu.sh
# PERF: perf record -g of the engine's loop of that kind into $WORK/perf.data.
set -e
H="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. $H/server.sh; . $H/rulesets.sh
bench_scratch /tmp/nocrm_txn_cpu; PG=$PGBIN
printf '%s\n' "shared_buffers = 256MB" "max_wal_size = 4GB" "checkpoint_timeout = 30min" \
  "synchronous_commit = off" "autovacuum = off" | bench_server_start tc   # reset() vacuums
N=${N:-20000}; REP=${REP:-3}
RULES_VARIANT=engine
psql_() { q engine "$@"; }
for v in handwritten engine; do
  runuser -u postgres -- $PG/createdb -h $WORK $v
  printf '%s\n' "SET client_min_messages = warning;" "CREATE EXTENSION nocrm_automation;" "$BENCH_CRM_SQL" | q $v >/dev/null
  q bench -c "ALTER DATABASE $v SET nocrm.history = '${HIST:-actions}'"
done
q handwritten -v rules=seed3 -f $WORK/handwritten_rules.sql >/dev/null; q handwritten -c "SELECT anchor.enable()" >/dev/null
load_rules seed3 >/dev/null
[ -n "$ENGINE_SQL" ] && q engine -c "$ENGINE_SQL" >/dev/null
reset() {
  local extra=""
  case $1 in
    handwritten) extra="ALTER SEQUENCE anchor.rr_vendite RESTART;" ;;
    engine) extra="UPDATE nocrm.assignment_counters SET assigned = 0; TRUNCATE nocrm.assignment_increments;" ;;
  esac
  q $1 -c "SET client_min_messages = warning; TRUNCATE nocrm.leads, nocrm.tags, nocrm.lead_history, nocrm.automation_runs, nocrm.notifications, nocrm.queue RESTART IDENTITY CASCADE; $extra" \
       -c "VACUUM ANALYZE" -c CHECKPOINT >/dev/null
}
stat_to() { echo "\\! awk '{print \$14+\$15}' /proc/\$PID/stat > $WORK/$1"; }
perf_on() { [ "$PERF" = $2 ] && [ $1 = engine ] && echo "\\! perf record -F 2000 -g -o $WORK/perf.data -p \$PID >/dev/null 2>&1 & echo \$! > $WORK/perfpid; sleep 1"; true; }
perf_off() { [ "$PERF" = $2 ] && [ $1 = engine ] && echo "\\! kill -INT \$(cat $WORK/perfpid); sleep 2"; true; }
run() { # v -> "ins upd" in cpu centiseconds
  {
    echo 'SELECT pg_backend_pid() AS pid \gset'
    echo '\setenv PID :pid'
    perf_on $1 ins
    stat_to c0
    echo "DO \$\$ BEGIN FOR i IN 1..$N LOOP
  INSERT INTO nocrm.leads (title, pipeline_id, contact_email) VALUES ('lead ' || i, 1, 'l' || i || '@b.test'); COMMIT;
END LOOP; END \$\$;"
    stat_to c1
    perf_off $1 ins
    perf_on $1 upd
    echo "DO \$\$ BEGIN FOR i IN 1..$N LOOP
  UPDATE nocrm.leads SET status = CASE WHEN status = 'won' THEN 'todo' ELSE 'won' END WHERE id = 1 + (i * 7919) % $N; COMMIT;
END LOOP; END \$\$;"
    stat_to c2
    perf_off $1 upd
    echo "\\! echo \$(( \$(cat $WORK/c1) - \$(cat $WORK/c0) )) \$(( \$(cat $WORK/c2) - \$(cat $WORK/c1) ))"
  } | q $1 | tr '\n' ' '
}
for r in $(seq $REP); do
  line=""
  for v in handwritten engine; do reset $v; line+="$v $(run $v)| "; done
  echo "rep $r (cs cpu: ins upd): $line"
done
bench_server_stop
