#!/usr/bin/env bash
# The demo:  bash test/demo.sh   (as root; a fresh Debian 12 is fine)
#
# Installs the dependencies, builds and installs the extension (via
# test/check.sh --install-only), starts the test SMTP/HTTP sink
# (test/sinks/sinkctl.sh) on 127.0.0.1, then a throwaway PostgreSQL server as
# the postgres user whose delivery settings point at the sink.  It creates
# database "demo" with pg_cron and nocrm_automation, runs test/demo.sql (the
# automations of noCRM's help page at work, then the drain delivering the
# queue), and prints what the sink received.  The sink, the server and its
# directory are removed on exit.
#
#   NOCRM_SMTP_PORT / NOCRM_HTTP_PORT   sink ports (default 25251 / 28081)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export LANG=C.UTF-8 LC_ALL=C.UTF-8

bash "$HERE/check.sh" --install-only </dev/null

BIN=$(/usr/bin/pg_config --bindir)
PY=/usr/bin/python3                          # with python3-aiosmtpd (check.sh installs it)
PORT=54329                                   # only names the socket: no TCP listener
export NOCRM_SMTP_PORT=${NOCRM_SMTP_PORT:-25251} NOCRM_HTTP_PORT=${NOCRM_HTTP_PORT:-28081}
SECRET=demo-webhook-secret
TMP=$(mktemp -d /tmp/nocrm_demo.XXXXXX)      # data directory, socket, log and sink files
SINK=$TMP/sink
chown postgres:postgres "$TMP"
cd "$TMP"                                    # a cwd the postgres user can enter

as_pg() { runuser -u postgres -- "$@"; }
cleanup() {
    if [ -f "$TMP/data/postmaster.pid" ]; then
        as_pg "$BIN/pg_ctl" -D "$TMP/data" -m fast -w stop >/dev/null || true
    fi
    if [ -f "$SINK/sink.pid" ]; then
        bash "$HERE/sinks/sinkctl.sh" stop "$SINK" >/dev/null || true
    fi
    cd / && rm -rf "$TMP"
}
trap cleanup EXIT

echo "== starting the test mail and HTTP sink (SMTP port $NOCRM_SMTP_PORT, HTTP port $NOCRM_HTTP_PORT)"
bash "$HERE/sinks/sinkctl.sh" start "$SINK" >/dev/null

echo "== starting a throwaway server in $TMP"
as_pg "$BIN/initdb" -D "$TMP/data" -U postgres -A trust -E UTF8 >/dev/null
cat >>"$TMP/data/postgresql.conf" <<EOF
listen_addresses = ''
port = $PORT
unix_socket_directories = '$TMP'
shared_preload_libraries = 'pg_cron'
cron.database_name = 'demo'
cron.host = '$TMP'                          # pg_cron's jobs connect over the socket
# Where the drain delivers: the test sink.
nocrm.smtp_url = 'smtp://127.0.0.1:$NOCRM_SMTP_PORT'
nocrm.smtp_tls = none
nocrm.mail_from = 'crm@vendite.example'
nocrm.push_url = 'http://127.0.0.1:$NOCRM_HTTP_PORT/push'
nocrm.webhook_secret = '$SECRET'
EOF
if ! as_pg "$BIN/pg_ctl" -D "$TMP/data" -l "$TMP/server.log" -w start >/dev/null; then
    cat "$TMP/server.log"
    exit 1
fi

# psql reads demo.sql from stdin: the postgres user may not be able to read the checkout.
PSQL=(as_pg "$BIN/psql" -X -q -h "$TMP" -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -P pager=off)
"${PSQL[@]}" -d postgres -c 'CREATE DATABASE demo'
"${PSQL[@]}" -d demo -c 'CREATE EXTENSION pg_cron' -c 'CREATE EXTENSION nocrm_automation'
"${PSQL[@]}" -d demo -v erp_url="http://127.0.0.1:$NOCRM_HTTP_PORT/erp/won" -f - <"$HERE/demo.sql"

echo
echo "=== 12. What the sink received"
"$PY" - "$SINK" "$SECRET" <<'EOF'
import email, email.policy, hashlib, hmac, json, os, sys

sink, secret = sys.argv[1], sys.argv[2].encode()

def records(name):
    path = os.path.join(sink, name)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

mails = records("mail.jsonl")
print("--- %d emails (SMTP); subjects decoded from RFC 2047" % len(mails))
for m in mails:
    msg = email.message_from_string(m["data"], policy=email.policy.default)
    print("  to %-36s %s" % (", ".join(m["rcpt_tos"]), msg["Subject"]))
if mails:
    data = mails[-1]["data"]
    msg = email.message_from_string(data, policy=email.policy.default)
    print("--- the last one as sent (the Date header left out), then its body decoded from base64")
    head, _, raw_body = data.partition("\r\n\r\n")
    for line in head.split("\r\n"):
        if not line.startswith("Date:"):
            print("  " + line)
    print("")
    for line in raw_body.split("\r\n"):
        if line:
            print("  " + line)
    for line in msg.get_content().splitlines():
        print("  | " + line)

reqs = records("http.jsonl")
print("--- %d HTTP POSTs (mobile pushes and webhooks)" % len(reqs))
for r in reqs:
    h = r["headers"]
    sig = h.get("x-nocrm-signature")
    if sig is None:
        check = "unsigned"
    else:
        good = "sha256=" + hmac.new(secret, r["body"].encode("utf-8"), hashlib.sha256).hexdigest()
        check = "signature ok" if hmac.compare_digest(good, sig) else "SIGNATURE WRONG"
    body = json.loads(r["body"])
    what = body.get("message") or "lead %r" % body.get("lead", {}).get("title")
    print("  %-8s %-24s %-13s %s" % (r["path"], h.get("x-nocrm-event"), check, what))
EOF
echo "== demo done; stopping the server and the sink"
