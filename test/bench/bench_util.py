#!/usr/bin/python3
"""Helpers of queue_bench.sh (not a test; no third-party modules).

  count FILE                         lines in FILE (0 if missing)
  connections MAIL_JSONL             distinct SMTP client ports seen
  http-reqs HTTP_JSONL OUT           request file for plain_client (http)
  smtp-reqs MAIL_JSONL OUT           request file for plain_client (smtp)
  curl-http HTTP_JSONL URL OUT       curl --config file for the same POSTs
  curl-smtp MAIL_JSONL URL FROM DIR OUT
                                     curl --config file (+ one .eml per mail in DIR)
  latency COMMITS_CSV MAIL_JSONL
                                     JSON summary of commit -> SMTP acceptance
                                     (over_one_poll: slower than POLL_S + 50 ms)
  median V1 V2 ...                   median of numbers
"""
import json
import math
import os
import sys


def lines(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def rec(out, a, b, data):
    out.write(("%s\t%s\t%d\n" % (a, b, len(data))).encode())
    out.write(data)
    out.write(b"\n")


def cfg_quote(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace(
        "\r", "\\r").replace("\n", "\\n").replace("\t", "\\t") + '"'


def pct(sorted_vals, p):
    """Nearest-rank percentile."""
    if not sorted_vals:
        return float("nan")
    k = max(1, math.ceil(p / 100.0 * len(sorted_vals)))
    return sorted_vals[k - 1]


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "count":
        try:
            with open(args[0], "rb") as f:
                print(sum(1 for _ in f))
        except FileNotFoundError:
            print(0)
    elif cmd == "connections":
        print(len({tuple(m["peer"]) if isinstance(m["peer"], list) else m["peer"]
                   for m in lines(args[0])}))
    elif cmd == "http-reqs":
        with open(args[1], "wb") as out:
            for r in lines(args[0]):
                h = r["headers"]
                rec(out, h["idempotency-key"], h.get("x-nocrm-event", ""),
                    r["body"].encode("utf-8"))
    elif cmd == "smtp-reqs":
        with open(args[1], "wb") as out:
            for m in lines(args[0]):
                rec(out, m["rcpt_tos"][0], "-", m["data"].encode("utf-8"))
    elif cmd == "curl-http":
        src, url, outp = args
        with open(outp, "w", encoding="utf-8") as out:
            out.write("silent\nshow-error\n")
            for i, r in enumerate(lines(src)):
                h = r["headers"]
                if i:
                    out.write("next\n")
                out.write("url = %s\n" % cfg_quote(url))
                out.write("data-binary = %s\n" % cfg_quote(r["body"]))
                out.write('header = "Content-Type: application/json; charset=utf-8"\n')
                out.write("header = %s\n" % cfg_quote("Idempotency-Key: " + h["idempotency-key"]))
                out.write("header = %s\n" % cfg_quote("X-Nocrm-Event: " + h.get("x-nocrm-event", "")))
                out.write('header = "Expect:"\n')
                out.write('user-agent = "curl-cli"\n')
                out.write('output = "/dev/null"\n')
    elif cmd == "curl-smtp":
        src, url, mail_from, d, outp = args
        os.makedirs(d, exist_ok=True)
        with open(outp, "w", encoding="utf-8") as out:
            out.write("silent\nshow-error\n")
            for i, m in enumerate(lines(src)):
                path = os.path.join(d, "m%05d.eml" % i)
                with open(path, "wb") as f:
                    f.write(m["data"].encode("utf-8"))
                if i:
                    out.write("next\n")
                out.write("url = %s\n" % cfg_quote(url))
                out.write("mail-from = %s\n" % cfg_quote(mail_from))
                out.write("mail-rcpt = %s\n" % cfg_quote(m["rcpt_tos"][0]))
                out.write("upload-file = %s\n" % cfg_quote(path))
    elif cmd == "latency":
        commits_csv, mail_jsonl = args
        committed = {}
        with open(commits_csv) as f:
            for line in f:
                seq, t = line.strip().split(",")
                committed["lat-%s@bench.test" % seq] = float(t)
        received = {}
        for m in lines(mail_jsonl):
            for r in m["rcpt_tos"]:
                received.setdefault(r.lower(), m["received_at"])
        poll = float(os.environ.get("POLL_S", "0.2"))
        lat = []
        for rcpt, c in committed.items():
            if rcpt in received:
                lat.append(received[rcpt] - c)
        lat.sort()
        slow = sum(1 for x in lat if x > poll + 0.05)
        print(json.dumps({
            "sent": len(committed), "matched": len(lat),
            "p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99),
            "min": lat[0] if lat else None, "max": lat[-1] if lat else None,
            "mean": sum(lat) / len(lat) if lat else None,
            "over_one_poll": slow,
        }))
    elif cmd == "median":
        v = sorted(float(x) for x in args)
        n = len(v)
        print("%.3f" % (v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2))
    else:
        sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main()
