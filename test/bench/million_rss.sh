#!/bin/bash
# million_rss.sh — one INSERT of N (1,000,000) leads with the seed5 rules:
# the backend's peak RssAnon, sampled every 50 ms (fsync off).
#   bash test/bench/million_rss.sh   (N=..., HIST=..., RULES=...)
set -e
H="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. $H/server.sh; . $H/rulesets.sh
bench_scratch /tmp/nocrm_million; PG=$PGBIN
printf 'shared_buffers = 256MB\nmax_wal_size = 8GB\nfsync = off\nsynchronous_commit = off\n' | bench_server_start mil
runuser -u postgres -- $PG/createdb -h $WORK engine
q engine -c "SET client_min_messages=warning; CREATE EXTENSION nocrm_automation;" -c "$BENCH_CRM_SQL" >/dev/null
q bench -c "ALTER DATABASE engine SET nocrm.history = '${HIST:-actions}'"
RULES_VARIANT=engine; psql_() { q engine "$@"; }
load_rules ${RULES:-seed5} >/dev/null
cat > $WORK/run.sql <<SQL
SELECT pg_backend_pid() AS pid \gset
\setenv PID :pid
\! (peak=0; while kill -0 \$PID 2>/dev/null && [ ! -f $WORK/stop ]; do r=\$(awk '/RssAnon/ {print \$2}' /proc/\$PID/status); [ "\$r" -gt "\$peak" ] && peak=\$r; echo \$peak > $WORK/peak; sleep 0.05; done) &
INSERT INTO nocrm.leads (title, pipeline_id, contact_email) SELECT 'lead ' || g, 1, 'l' || g || '@b.test' FROM generate_series(1, ${N:-1000000}) g;
\! sleep 0.3; touch $WORK/stop; echo "peak RssAnon kB: \$(cat $WORK/peak)"
SQL
chown postgres $WORK/run.sql
q engine -f $WORK/run.sql
q engine -c "SELECT count(*), count(user_id) FROM nocrm.leads" -c "SELECT count(*) FROM nocrm.notifications"
runuser -u postgres -- $PG/pg_ctl -D $PGDATA -m fast stop >/dev/null
