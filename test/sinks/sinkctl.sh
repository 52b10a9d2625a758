#!/bin/bash
# Control the nocrm SMTP/HTTP test sink (test/sinks/sink.py).
#
#   sinkctl.sh start DIR   start sink in background (ports from NOCRM_SMTP_PORT
#                          [25250] / NOCRM_HTTP_PORT [28080]; 0 = pick free),
#                          wait up to 10 s for DIR/ready, print
#                          "smtp=N http=M" on stdout
#   sinkctl.sh stop DIR    SIGTERM via DIR/sink.pid, wait up to 10 s (then KILL)
#   sinkctl.sh ports DIR   print "smtp=N http=M" of a running sink
#   sinkctl.sh smtp-down|smtp-up|http-fail|http-ok|reset [DIR]
#                          POST to the control endpoint. The HTTP port is taken
#                          from DIR/ports.json if DIR is given, else from
#                          NOCRM_HTTP_PORT (default 28080).
#
# Extra sink.py options (e.g. --smtp-user U --smtp-password P) can be passed in
# NOCRM_SINK_ARGS.  The sink's stderr goes to DIR/sink.log.
set -euo pipefail

PY=/usr/bin/python3
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
    echo "usage: $0 start|stop|ports DIR | smtp-down|smtp-up|http-fail|http-ok|reset [DIR]" >&2
    exit 2
}

ports_of() {
    "$PY" -c 'import json,sys; p=json.load(open(sys.argv[1])); print("smtp=%d http=%d" % (p["smtp"], p["http"]))' "$1/ports.json"
}

http_port() {
    local dir="${1:-}"
    if [ -n "$dir" ] && [ -f "$dir/ports.json" ]; then
        "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["http"])' "$dir/ports.json"
    else
        echo "${NOCRM_HTTP_PORT:-28080}"
    fi
}

control() {
    local path="$1" port
    port="$(http_port "${2:-}")"
    "$PY" - "$port" "$path" <<'EOF'
import sys, urllib.request
port, path = sys.argv[1], sys.argv[2]
req = urllib.request.Request("http://127.0.0.1:%s%s" % (port, path), data=b"", method="POST")
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(req, timeout=15) as r:
        r.read()
except Exception as e:
    print("sinkctl: %s failed: %s" % (path, e), file=sys.stderr)
    sys.exit(1)
EOF
}

cmd="${1:-}"
[ -n "$cmd" ] || usage

case "$cmd" in
start)
    dir="${2:-}"; [ -n "$dir" ] || usage
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if [ -f "$dir/sink.pid" ] && kill -0 "$(cat "$dir/sink.pid")" 2>/dev/null; then
        echo "sinkctl: sink already running (pid $(cat "$dir/sink.pid"))" >&2
        exit 1
    fi
    rm -f "$dir/ready" "$dir/ports.json" "$dir/sink.pid"
    # shellcheck disable=SC2086
    nohup "$PY" "$HERE/sink.py" --dir "$dir" \
        --smtp-port "${NOCRM_SMTP_PORT:-25250}" \
        --http-port "${NOCRM_HTTP_PORT:-28080}" \
        --pidfile "$dir/sink.pid" ${NOCRM_SINK_ARGS:-} \
        </dev/null >>"$dir/sink.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do
        if [ -f "$dir/ready" ]; then
            ports_of "$dir"
            exit 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "sinkctl: sink exited during startup; log:" >&2
            tail -n 20 "$dir/sink.log" >&2 || true
            exit 1
        fi
        sleep 0.1
    done
    echo "sinkctl: sink not ready after 10 s; log:" >&2
    tail -n 20 "$dir/sink.log" >&2 || true
    kill "$pid" 2>/dev/null || true
    exit 1
    ;;
stop)
    dir="${2:-}"; [ -n "$dir" ] || usage
    pidf="$dir/sink.pid"
    if [ ! -f "$pidf" ]; then
        echo "sinkctl: no pidfile $pidf (not running?)" >&2
        exit 0
    fi
    pid="$(cat "$pidf")"
    kill -TERM "$pid" 2>/dev/null || { rm -f "$pidf" "$dir/ready"; exit 0; }
    # The sink removes its pidfile as the very last step of a clean exit (the
    # process may linger as a zombie until reaped, so don't rely on kill -0).
    for _ in $(seq 1 200); do
        [ -f "$pidf" ] || exit 0
        if ! kill -0 "$pid" 2>/dev/null ||
           [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = Z ]; then
            rm -f "$pidf" "$dir/ready"; exit 0
        fi
        sleep 0.05
    done
    echo "sinkctl: sink $pid did not stop after 10 s, killing" >&2
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidf" "$dir/ready"
    ;;
ports)
    dir="${2:-}"; [ -n "$dir" ] || usage
    ports_of "$dir"
    ;;
smtp-down) control /control/smtp/down "${2:-}" ;;
smtp-up)   control /control/smtp/up "${2:-}" ;;
http-fail) control /control/http/fail "${2:-}" ;;
http-ok)   control /control/http/ok "${2:-}" ;;
reset)     control /control/reset "${2:-}" ;;
*) usage ;;
esac
