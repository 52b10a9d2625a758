#!/bin/bash
# cpu_bulk.sh — the core_bench bulk section (seed5 rules; INSERT of N leads,
# UPDATE status = 'won' of all, UPDATE of all to step Preventivo) timed by the
# backend's CPU time (/proc/<pid>/stat, 1/100 s), which a busy machine
# disturbs less than wall time: bare, handwritten (handwritten_rules.sql) and
# engine side by side on one throwaway server.  As root, the extension installed.
#   N=100000 REP=3 HIST=actions|none bash test/bench/cpu_bulk.sh
# Knobs: N rows, REP repetitions, HIST (nocrm.history, default actions),
# RULES (rulesets.sh set, default seed5), ONLY (variants), PERF=ins|won|step
# (perf record -g of that engine statement into $WORK/perf.data), ENGINE_SQL
# (run in the engine's database after the rules are loaded, for experiments).
set -e
H="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. $H/server.sh; . $H/rulesets.sh
bench_scratch /tmp/nocrm_cpu_bulk; PG=$PGBIN
bench_server_start sb <<EOF
shared_buffers = 256MB
max_wal_size = 4GB
checkpoint_timeout = 30min
# reset() vacuums each variant: a worker vacuuming the previous variant's
# tables would share the CPU (and its caches) with the next one
autovacuum = off
EOF
N=${N:-100000}; REP=${REP:-3}
triggers_off="ALTER TABLE nocrm.leads DISABLE TRIGGER USER; ALTER TABLE nocrm.tags DISABLE TRIGGER USER; ALTER TABLE nocrm.comments DISABLE TRIGGER USER; ALTER TABLE nocrm.emails DISABLE TRIGGER USER;"
RULES_VARIANT=engine
psql_() { q engine "$@"; }
for v in bare handwritten engine; do
  runuser -u postgres -- $PG/createdb -h $WORK $v
  q $v >/dev/null <<EOF
SET client_min_messages = warning;
CREATE EXTENSION nocrm_automation;
$BENCH_CRM_SQL
EOF
  q bench -c "ALTER DATABASE $v SET nocrm.history = '${HIST:-actions}'"
done
q bare -c "$triggers_off" >/dev/null
q handwritten -v rules=seed5 -f $WORK/handwritten_rules.sql >/dev/null; q handwritten -c "SELECT anchor.enable()" >/dev/null
load_rules ${RULES:-seed5} >/dev/null
[ -n "$ENGINE_SQL" ] && q engine -c "$ENGINE_SQL" >/dev/null
reset() {
  local extra=""
  case $1 in handwritten) extra="ALTER SEQUENCE anchor.rr_vendite RESTART;";; engine) extra="UPDATE nocrm.assignment_counters SET assigned = 0; TRUNCATE nocrm.assignment_increments;";; esac
  q $1 -c "SET client_min_messages = warning; TRUNCATE nocrm.leads, nocrm.tags, nocrm.comments, nocrm.emails, nocrm.lead_history, nocrm.automation_runs, nocrm.notifications, nocrm.queue RESTART IDENTITY CASCADE; $extra" -c "VACUUM ANALYZE" -c CHECKPOINT >/dev/null
}
run() { # v -> "ins upd step" cpu seconds
  local v=$1 st=""; [ $v = bare ] && st="step_id, "
  local sv=""; [ $v = bare ] && sv="1, "
  q $v <<SQL | tr '\n' ' '
SELECT pg_backend_pid() AS pid \gset
\setenv PID :pid
\o /dev/null
BEGIN; INSERT INTO nocrm.leads (title, pipeline_id, ${st}contact_email) SELECT 'w ' || g, 1, ${sv}'w' || g || '@b.test' FROM generate_series(1, 2000) g; ROLLBACK;
\o
\! awk '{print \$14+\$15}' /proc/\$PID/stat > $WORK/c0
$( [ "$PERF" = ins ] && [ $v = engine ] && echo "\\! perf record -F 2000 -g -o $WORK/perf.data -p \$PID >/dev/null 2>&1 & echo \$! > $WORK/perfpid; sleep 1" )
INSERT INTO nocrm.leads (title, pipeline_id, ${st}contact_email) SELECT 'lead ' || g, 1, ${sv}'lead' || g || '@b.test' FROM generate_series(1, $N) g;
$( [ "$PERF" = ins ] && [ $v = engine ] && echo "\\! kill -INT \$(cat $WORK/perfpid); sleep 2" )
\! awk '{print \$14+\$15}' /proc/\$PID/stat > $WORK/c1
$( [ "$PERF" = won ] && [ $v = engine ] && echo "\\! perf record -F 2000 -g -o $WORK/perf.data -p \$PID >/dev/null 2>&1 & echo \$! > $WORK/perfpid; sleep 1" )
UPDATE nocrm.leads SET status = 'won';
$( [ "$PERF" = won ] && [ $v = engine ] && echo "\\! kill -INT \$(cat $WORK/perfpid); sleep 2" )
\! awk '{print \$14+\$15}' /proc/\$PID/stat > $WORK/c2
$( [ "$PERF" = step ] && [ $v = engine ] && echo "\\! perf record -F 2000 -g -o $WORK/perf.data -p \$PID >/dev/null 2>&1 & echo \$! > $WORK/perfpid; sleep 1" )
UPDATE nocrm.leads SET step_id = 3;
$( [ "$PERF" = step ] && [ $v = engine ] && echo "\\! kill -INT \$(cat $WORK/perfpid); sleep 2" )
\! awk '{print \$14+\$15}' /proc/\$PID/stat > $WORK/c3
\! echo \$(( \$(cat $WORK/c1) - \$(cat $WORK/c0) )) \$(( \$(cat $WORK/c2) - \$(cat $WORK/c1) )) \$(( \$(cat $WORK/c3) - \$(cat $WORK/c2) ))
SQL
}
for r in $(seq $REP); do
  line=""
  for v in ${ONLY:-bare handwritten engine}; do reset $v; line+="$v $(run $v)| "; done
  echo "rep $r (cs = 1/100 s cpu: ins won step): $line"
done
q engine -c "SELECT count(*) FROM nocrm.lead_history" -c "SELECT count(*) FROM nocrm.automation_runs"
runuser -u postgres -- $PG/pg_ctl -D $PGDATA -m fast stop >/dev/null
