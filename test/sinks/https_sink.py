#!/usr/bin/python3
"""A small HTTPS receiver for test/t/110_postfix.pl (webhooks over TLS with a
private CA): answers 200 to every POST and appends {"path", "bytes"} to
DIR/requests.jsonl.

    https_sink.py --dir DIR --cert CERT --key KEY

Listens on 127.0.0.1, a free port written to DIR/port.
"""
import argparse
import http.server
import json
import os
import ssl


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    args = p.parse_args()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with open(os.path.join(args.dir, "requests.jsonl"), "a") as f:
                f.write(json.dumps({"path": self.path, "bytes": len(body)}) + "\n")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    tmp = os.path.join(args.dir, "port.tmp")
    with open(tmp, "w") as f:
        f.write("%d\n" % server.server_address[1])
    os.rename(tmp, os.path.join(args.dir, "port"))
    server.serve_forever()


if __name__ == "__main__":
    main()
