# server.sh — sourced by the benchmarks: a throwaway PostgreSQL 15 in $WORK,
# run as the postgres user, unix socket only.  The caller sets PGBIN, WORK
# and PGDATA and defines die() and log() (bench_preamble does both).

# bench_preamble NAME: die() and log() for the script NAME; checks that it
# runs as root with PostgreSQL 15 and nocrm_automation installed; sets
# PGBIN, PGVER and EXT_SO (the installed library).
bench_preamble() {
    BENCH_NAME=$1
    die() { echo "$BENCH_NAME: $*" >&2; exit 1; }
    log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
    [ "$(id -u)" = 0 ] || die "run as root (it starts PostgreSQL as the postgres user with runuser)"
    PGBIN="$(pg_config --bindir)"
    PGVER="$("$PGBIN/postgres" --version)"
    case "$PGVER" in *" 15."*) ;; *) die "needs PostgreSQL 15, found: $PGVER" ;; esac
    [ -f "$(pg_config --sharedir)/extension/nocrm_automation.control" ] || die "nocrm_automation is not installed"
    EXT_SO="$(pg_config --pkglibdir)/nocrm_automation.so"
}

# bench_scratch DIR: the quick benchmarks' common start: PGBIN (on PATH),
# WORK=DIR and PGDATA, plain die() and log(), a server left running there by
# an interrupted run stopped, DIR made afresh for the postgres user with a
# copy of the hand-written anchor, q DB ARGS... (psql to a database, as
# postgres, tuples only, stopping at the first error).
bench_scratch() {
    PGBIN="$(pg_config --bindir)"; export PATH="$PGBIN:$PATH"
    WORK=$1; PGDATA=$WORK/data
    log() { echo "$*" >&2; }; die() { echo "$*" >&2; exit 1; }
    [ -f "$PGDATA/postmaster.pid" ] &&
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1
    rm -rf "$WORK"; mkdir -p "$WORK"; chown postgres "$WORK"; chmod 755 "$WORK"
    cp "$(dirname "${BASH_SOURCE[0]}")/handwritten_rules.sql" "$WORK/"; chown postgres "$WORK"/*
    q() { local d=$1; shift; runuser -u postgres -- "$PGBIN/psql" -h "$WORK" -X -q -v ON_ERROR_STOP=1 -At -d "$d" "$@"; }
}

# bench_server_start NAME: initdb, start, create database "bench".  Extra
# postgresql.conf lines (the same for every variant of a run) come on stdin.
bench_server_start() {
    log "initdb + start PostgreSQL in $WORK"
    runuser -u postgres -- "$PGBIN/initdb" -D "$PGDATA" -A trust -U postgres -E UTF8 \
        --locale=C --no-instructions >"$WORK/initdb.log" 2>&1 || { cat "$WORK/initdb.log"; die "initdb failed"; }
    {
        echo "# $1"
        echo "listen_addresses = ''"
        echo "unix_socket_directories = '$WORK'"
        cat
    } >>"$PGDATA/postgresql.conf"
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/postgres.log" -w start >/dev/null ||
        { tail -n 30 "$WORK/postgres.log"; die "PostgreSQL did not start"; }
    runuser -u postgres -- "$PGBIN/createdb" -h "$WORK" bench
}

# bench_server_stop: fast shutdown, immediate if that fails; quiet.
bench_server_stop() {
    if [ -f "$PGDATA/postmaster.pid" ]; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1 ||
            runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate -w stop >/dev/null 2>&1
    fi
    return 0
}
