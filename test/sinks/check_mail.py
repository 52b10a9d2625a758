#!/usr/bin/python3
"""Strict check of delivered messages (used by test/t/110_postfix.pl).

    check_mail.py FILE...

For each Maildir file prints one JSON line: the file, "errors" (what a strict
reader objects to; empty when the message is fine) and what the tests
compare: decoded headers, addresses, the body.  The message is read as UTF-8
(RFC 6532 allows UTF-8 headers) and parsed with email.policy.strict, which
raises on any defect.  Checked besides: every line within 998 characters,
header lines within 78 (except the trace headers postfix adds), base64 body
lines of at most 76 characters that decode strictly, CRLF line ends inside
the decoded text (RFC 2045 canonical form), encoded words within 75
characters, Date and Message-ID syntax, one of each required header.
"""
import binascii
import email
import email.errors
import email.policy
import email.utils
import json
import re
import sys

TRACE = {"received", "return-path", "delivered-to", "x-original-to"}
ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[BbQq]\?[^?\s]*\?=")


def check(path):
    out = {"file": path, "errors": []}
    err = out["errors"].append
    raw = open(path, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        err("not UTF-8: %s" % e)
        return out
    head, sep, body = text.replace("\r\n", "\n").partition("\n\n")
    if not sep:
        err("no blank line between header and body")
    # Physical lines: postfix stores them with LF.
    name = None
    for line in head.split("\n"):
        if line[:1] not in (" ", "\t"):
            name = line.split(":", 1)[0].lower()
        if len(line) > 998:
            err("line over 998 characters: %s..." % line[:40])
        elif len(line) > 78 and name not in TRACE:
            err("%s: line of %d characters (over 78)" % (name, len(line)))
        for word in ENCODED_WORD.findall(line):
            if len(word) > 75:
                err("%s: encoded word of %d characters (over 75)" % (name, len(word)))
    try:
        msg = email.message_from_string(text, policy=email.policy.strict.clone(utf8=True))
    except Exception as e:  # policy.strict raises on the first defect
        err("email.policy.strict: %s: %s" % (type(e).__name__, e))
        return out
    headers = {}
    for key in ("From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted",
                "X-Auto-Response-Suppress", "Precedence", "MIME-Version",
                "Content-Type", "Content-Transfer-Encoding", "X-Nocrm-Idempotency-Key",
                "Delivered-To"):
        values = msg.get_all(key) or []
        if len(values) > 1 and key not in ("Delivered-To",):
            err("%s appears %d times" % (key, len(values)))
        if values:
            try:
                headers[key.lower()] = str(values[0])
                for d in getattr(values[0], "defects", []):
                    # RFC 6532 allows a UTF-8 local part; Python reports it whatever the policy.
                    if not isinstance(d, email.errors.NonASCIILocalPartDefect):
                        err("%s: %s" % (key, d))
            except Exception as e:
                err("%s: %s" % (key, e))
    for key in ("from", "to", "subject", "date", "message-id"):
        if key not in headers:
            err("no %s header" % key)
    out["headers"] = headers
    out["received"] = [str(v) for v in (msg.get_all("Received") or [])]
    raw_subject = re.search(r"^Subject:(.*(?:\n[ \t].*)*)", head, re.M | re.I)
    out["raw_subject"] = raw_subject.group(1) if raw_subject else None
    for key in ("from", "to"):
        try:
            out[key] = [{"name": a.display_name, "local": a.username, "domain": a.domain}
                        for a in msg[key].addresses]
        except Exception as e:
            err("%s addresses: %s" % (key, e))
    if "date" in headers:
        try:
            out["date_epoch"] = email.utils.parsedate_to_datetime(headers["date"]).timestamp()
        except Exception as e:
            err("Date: %s" % e)
    if not re.fullmatch(r"<[^<>@\s]+@[^<>@\s]+>", headers.get("message-id", "")):
        err("Message-ID is not <id@domain>: %r" % headers.get("message-id"))
    if msg.get_content_type() != "text/plain":
        err("Content-Type %s" % msg.get_content_type())
    if msg.get("Content-Transfer-Encoding", "").lower() == "base64":
        lines = body.rstrip("\n").split("\n")
        for line in lines:
            if len(line) > 76 or not re.fullmatch(r"[A-Za-z0-9+/=]*", line):
                err("base64 body line not within RFC 2045: %r" % line[:80])
        try:
            decoded = binascii.a2b_base64("".join(lines).encode(), strict_mode=True)
            if re.search(rb"(?<!\r)\n|\r(?!\n)", decoded):
                err("the decoded text has line ends other than CRLF")
            out["body"] = decoded.decode("utf-8")
        except Exception as e:
            err("base64 body: %s" % e)
    else:
        out["body"] = body
    try:
        out["content"] = msg.get_content()
    except Exception as e:
        err("get_content: %s" % e)
    return out


def clean(v):
    """Lone surrogates (undecodable bytes) as U+FFFD, so any JSON reader takes the line."""
    if isinstance(v, str):
        return v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(v, list):
        return [clean(x) for x in v]
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    return v


def main():
    for path in sys.argv[1:]:
        try:
            res = check(path)
        except Exception as e:
            res = {"file": path, "errors": ["checker failed: %s: %s" % (type(e).__name__, e)]}
        print(json.dumps(clean(res), ensure_ascii=True, sort_keys=True))


if __name__ == "__main__":
    main()
