#!/usr/bin/python3
"""
Test sink for nocrm_automation: one process running an SMTP sink and an HTTP
sink on 127.0.0.1 that record everything they receive as JSON lines and can be
told to misbehave.

Usage:
    /usr/bin/python3 sink.py --dir DIR --smtp-port P --http-port Q
                             [--pidfile F] [--smtp-user U --smtp-password PW]

Port 0 picks a free port.  The actual ports are always written to
DIR/ports.json ({"smtp": n, "http": m}); DIR/ready is written (atomically,
after ports.json) once both listeners accept connections.  DIR/ready and the
pidfile are removed again on a clean exit (SIGTERM / SIGINT).

Needs Debian's python3-aiosmtpd (use /usr/bin/python3).

Files (one JSON object per line, flushed after each line):

DIR/mail.jsonl
    {"mail_from", "rcpt_tos" (accepted recipients only), "data" (raw message,
     UTF-8, errors='replace', CRLF line ends as received, dot-unstuffed),
     "message_id" (Message-ID header value as sent, e.g. "<x@y>", or null),
     "received_at" (float unix time), "auth_user" (AUTH login or null),
     "peer" ([host, port])}

DIR/http.jsonl
    {"method", "path" (without query string), "query" (raw query string, ""
     if none), "raw_path" (request target as sent), "headers" (dict, lower-case
     names; repeated headers joined with ", "), "body" (text, UTF-8,
     errors='replace'), "status" (status code the sink answered with),
     "received_at" (float unix time, taken when the request arrives)}

SMTP behaviour by recipient address (case-insensitive prefix of the address):
    tempfail...      -> 451 4.3.0 try again later     (at RCPT)
    reject...        -> 550 5.1.1 no such user        (at RCPT)
    datatempfail...  -> 451 4.3.0 try again later     (at end of DATA; not recorded)
    datafail...      -> 554 5.6.0 message rejected    (at end of DATA; not recorded)
    slowMS-...       -> wait MS milliseconds before answering RCPT, then 250
                        (a client that gives up meanwhile has sent no message),
                        e.g. slow3000-a@x.example
  Everything else is accepted with 250.
  AUTH PLAIN/LOGIN is always advertised (no TLS needed).  Without
  --smtp-user any credentials are accepted and AUTH is optional; with
  --smtp-user/--smtp-password AUTH is required (530 before MAIL otherwise) and
  wrong credentials get 535.

HTTP behaviour (POST, PUT, PATCH and DELETE are all treated alike):
    any path         -> 200 {"ok":true}
    /status/NNN      -> status NNN (body {"ok":false,"status":NNN})
    /slow/MS         -> sleep MS milliseconds, then 200
    /hang            -> never answers (sleeps an hour; the client gives up)
    ?retry_after=V   -> adds the header "Retry-After: V" to the answer (V as
                        given: delta-seconds, or any text)
    ?retry_after_date=N
                     -> adds "Retry-After: <HTTP-date N seconds from now>"
                        (IMF-fixdate, e.g. "Sun, 06 Nov 1994 08:49:37 GMT")
    ?fail_first=N    -> 503 for the first N requests per (Idempotency-Key, path)
                        (requests without the header share one counter per path)
    GET /health      -> 200 "ok" (not recorded); other GETs -> 404 (not recorded)
  Control (POST, never recorded):
    /control/smtp/down  close the SMTP listening socket (new connections are
                        refused) and drop all open SMTP sessions
    /control/smtp/up    listen again on the same port
    /control/http/fail  every non-control request answers 503 (still recorded)
    /control/http/ok    back to normal
    /control/reset      truncate mail.jsonl and http.jsonl, clear fail_first
                        counters, SMTP up, HTTP ok
"""

import argparse
import asyncio
import email.parser
import email.utils
import email.policy
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit, parse_qs

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

HOST = "127.0.0.1"


class JsonlWriter:
    """Thread-safe appender; one write+flush per line."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.f = open(path, "a", encoding="utf-8")

    def append(self, obj):
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        with self.lock:
            self.f.write(line)
            self.f.flush()

    def truncate(self):
        with self.lock:
            self.f.flush()
            self.f.truncate(0)
            self.f.seek(0)

    def close(self):
        with self.lock:
            self.f.close()


def atomic_write(path, text):
    tmp = path + ".tmp.%d" % os.getpid()
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- SMTP ---

_header_parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)


def parse_message_id(raw):
    try:
        msg = _header_parser.parsebytes(raw)
        mid = msg.get("Message-ID")
        if mid is None:
            return None
        mid = " ".join(str(mid).split())
        return mid or None
    except Exception:
        return None


class SmtpHandler:
    def __init__(self, mail_log):
        self.mail_log = mail_log

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        a = address.lower()
        m = re.match(r"slow(\d+)-", a)
        if m:
            await asyncio.sleep(int(m.group(1)) / 1000.0)
        if a.startswith("tempfail"):
            return "451 4.3.0 try again later"
        if a.startswith("reject"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        rcpts = [r.lower() for r in envelope.rcpt_tos]
        if any(r.startswith("datatempfail") for r in rcpts):
            return "451 4.3.0 try again later"
        if any(r.startswith("datafail") for r in rcpts):
            return "554 5.6.0 message rejected"
        raw = envelope.original_content
        if raw is None:
            raw = envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        auth_user = None
        ad = getattr(session, "auth_data", None)
        if isinstance(ad, LoginPassword):
            auth_user = ad.login.decode("utf-8", "replace")
        peer = session.peer
        self.mail_log.append({
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "data": raw.decode("utf-8", errors="replace"),
            "message_id": parse_message_id(raw),
            "received_at": time.time(),
            "auth_user": auth_user,
            "peer": list(peer[:2]) if isinstance(peer, tuple) else peer,
        })
        return "250 2.0.0 Message accepted for delivery"


class SmtpService:
    """Owns the SMTP listening socket inside the asyncio loop."""

    def __init__(self, loop, port, mail_log, user=None, password=None):
        self.loop = loop
        self.port = port
        self.handler = SmtpHandler(mail_log)
        self.user = user.encode() if user is not None else None
        self.password = (password or "").encode()
        self.server = None
        self.sessions = set()

    def _authenticator(self, server, session, envelope, mechanism, auth_data):
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        if self.user is None or (auth_data.login == self.user
                                 and auth_data.password == self.password):
            return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)

    def _factory(self):
        svc = self

        class TrackedSMTP(SMTP):
            def connection_made(self, transport):
                svc.sessions.add(self)
                super().connection_made(transport)

            def connection_lost(self, exc):
                svc.sessions.discard(self)
                super().connection_lost(exc)

        return TrackedSMTP(
            self.handler,
            hostname="nocrm-sink.local",
            ident="nocrm test sink",
            enable_SMTPUTF8=True,
            auth_required=self.user is not None,
            auth_require_tls=False,
            authenticator=self._authenticator,
            timeout=300,
            loop=self.loop,
        )

    async def up(self):
        if self.server is not None:
            return
        self.server = await self.loop.create_server(
            self._factory, host=HOST, port=self.port,
            reuse_address=True, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]

    async def down(self):
        if self.server is None:
            return
        srv, self.server = self.server, None
        srv.close()
        for s in list(self.sessions):
            t = s.transport
            if t is not None:
                t.abort()
        await srv.wait_closed()


# ---------------------------------------------------------------- HTTP ---

class SinkState:
    def __init__(self):
        self.lock = threading.Lock()
        self.http_fail = False
        self.fail_counts = {}


class HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nocrm-sink/1.0"

    def version_string(self):
        return self.server_version
    disable_nagle_algorithm = True
    timeout = 300  # idle keep-alive connections are closed after this

    # set on the class by main()
    sink = None

    def log_message(self, fmt, *args):  # quiet
        pass

    def _read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    break
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers
                    while True:
                        t = self.rfile.readline(65537)
                        if not t or t in (b"\r\n", b"\n"):
                            break
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)  # CRLF after chunk
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _send(self, status, body, ctype="application/json", extra=()):
        if isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        for k, v in extra:
            self.send_header(k, v)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/health":
            self._send(200, "ok", "text/plain")
        else:
            self._send(404, '{"ok":false}')

    do_HEAD = do_GET

    def do_POST(self):
        arrived = time.time()
        body = self._read_body()
        parts = urlsplit(self.path)
        path = parts.path
        if path.startswith("/control/"):
            self._control(path)
            return
        sink = self.sink
        headers = {}
        for k, v in self.headers.items():
            k = k.lower()
            headers[k] = headers[k] + ", " + v if k in headers else v

        status = 200
        sleep_ms = 0
        m = re.fullmatch(r"/status/(\d{3})", path)
        if m:
            status = int(m.group(1))
        m = re.fullmatch(r"/slow/(\d+)", path)
        if m:
            sleep_ms = int(m.group(1))
        if path == "/hang":
            sleep_ms = 3600 * 1000
        qs = parse_qs(parts.query)
        extra = []
        if "retry_after" in qs:
            extra.append(("Retry-After", qs["retry_after"][0]))
        if "retry_after_date" in qs:
            extra.append(("Retry-After", email.utils.formatdate(
                time.time() + int(qs["retry_after_date"][0]), usegmt=True)))
        if "fail_first" in qs:
            try:
                n = int(qs["fail_first"][0])
            except ValueError:
                n = 0
            key = (headers.get("idempotency-key"), path)
            with sink.state.lock:
                c = sink.state.fail_counts.get(key, 0)
                sink.state.fail_counts[key] = c + 1
            if c < n:
                status = 503
        if sink.state.http_fail:
            status = 503

        sink.http_log.append({
            "method": self.command,
            "path": path,
            "query": parts.query,
            "raw_path": self.path,
            "headers": headers,
            "body": body.decode("utf-8", errors="replace"),
            "status": status,
            "received_at": arrived,
        })
        if sleep_ms:
            time.sleep(sleep_ms / 1000.0)
        if status == 200:
            self._send(200, '{"ok":true}', extra=extra)
        elif status in (204, 304) or status < 200:
            self.send_response(status)
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
        else:
            self._send(status, '{"ok":false,"status":%d}' % status, extra=extra)

    do_PUT = do_POST
    do_PATCH = do_POST
    do_DELETE = do_POST

    def _control(self, path):
        sink = self.sink
        try:
            if path == "/control/smtp/down":
                sink.run_in_loop(sink.smtp.down())
            elif path == "/control/smtp/up":
                sink.run_in_loop(sink.smtp.up())
            elif path == "/control/http/fail":
                sink.state.http_fail = True
            elif path == "/control/http/ok":
                sink.state.http_fail = False
            elif path == "/control/reset":
                sink.mail_log.truncate()
                sink.http_log.truncate()
                with sink.state.lock:
                    sink.state.fail_counts.clear()
                sink.state.http_fail = False
                sink.run_in_loop(sink.smtp.up())
            else:
                self._send(404, '{"ok":false,"error":"unknown control"}')
                return
        except Exception as e:  # report, keep serving
            self._send(500, json.dumps({"ok": False, "error": repr(e)}))
            return
        self._send(200, '{"ok":true}')


class HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


# ---------------------------------------------------------------- main ---

class Sink:
    def __init__(self, args):
        self.args = args
        self.dir = os.path.abspath(args.dir)
        os.makedirs(self.dir, exist_ok=True)
        for f in ("ready", "ports.json"):
            try:
                os.unlink(os.path.join(self.dir, f))
            except FileNotFoundError:
                pass
        self.mail_log = JsonlWriter(os.path.join(self.dir, "mail.jsonl"))
        self.http_log = JsonlWriter(os.path.join(self.dir, "http.jsonl"))
        self.state = SinkState()
        self.loop = None
        self.smtp = None
        self.httpd = None

    def run_in_loop(self, coro, timeout=10):
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    async def main(self):
        self.loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, stop.set)

        self.smtp = SmtpService(self.loop, self.args.smtp_port, self.mail_log,
                                self.args.smtp_user, self.args.smtp_password)
        await self.smtp.up()

        HttpHandler.sink = self
        self.httpd = HttpServer((HOST, self.args.http_port), HttpHandler)
        http_port = self.httpd.server_address[1]
        t = threading.Thread(target=self.httpd.serve_forever,
                             kwargs={"poll_interval": 0.2},
                             name="http", daemon=True)
        t.start()

        if self.args.pidfile:
            atomic_write(self.args.pidfile, "%d\n" % os.getpid())
        atomic_write(os.path.join(self.dir, "ports.json"),
                     json.dumps({"smtp": self.smtp.port, "http": http_port}) + "\n")
        atomic_write(os.path.join(self.dir, "ready"),
                     "%d\n" % os.getpid())
        print("sink ready pid=%d smtp=%d http=%d dir=%s"
              % (os.getpid(), self.smtp.port, http_port, self.dir),
              file=sys.stderr, flush=True)

        await stop.wait()

        try:
            os.unlink(os.path.join(self.dir, "ready"))
        except FileNotFoundError:
            pass
        await self.loop.run_in_executor(None, self.httpd.shutdown)
        self.httpd.server_close()
        await self.smtp.down()
        self.mail_log.close()
        self.http_log.close()
        # last: the pidfile disappearing means "listeners closed, files flushed"
        if self.args.pidfile:
            try:
                os.unlink(self.args.pidfile)
            except FileNotFoundError:
                pass
        print("sink stopped", file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description="nocrm SMTP+HTTP test sink")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--smtp-port", type=int, default=0)
    ap.add_argument("--http-port", type=int, default=0)
    ap.add_argument("--pidfile")
    ap.add_argument("--smtp-user")
    ap.add_argument("--smtp-password")
    args = ap.parse_args()
    if (args.smtp_user is None) != (args.smtp_password is None):
        ap.error("--smtp-user and --smtp-password go together")
    if args.pidfile:
        args.pidfile = os.path.abspath(args.pidfile)
    import warnings
    warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
    import logging
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    try:
        asyncio.run(Sink(args).main())
    except OSError as e:  # typically "address already in use"
        print("sink: startup failed: %s" % e, file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
