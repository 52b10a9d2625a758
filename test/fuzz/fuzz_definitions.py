#!/usr/bin/python3
"""
fuzz_definitions.py -- a seeded, grammar-based fuzzer for nocrm_automation.

It starts a throwaway PostgreSQL 15 server of its own (initdb in a mktemp
directory, run as the postgres user through runuser, Unix socket only),
creates the extension with the fixture data of test/fixtures/crm.sql and
drives one long-lived psql session with batches of thousands of statements.

Targets (see README.md beside this file):
  definitions  SELECT nocrm.check_automation(...) and INSERT INTO nocrm.automations
               (src/definition.c nocrm_compile_rule)
  stage        INSERT INTO nocrm.stage_triggers (PL/pgSQL nocrm.stage_trigger_validate)
  templates    INSERT/UPDATE nocrm.email_templates (src/templates.c check_template_text)
  render       nocrm.render(text, jsonb) and nocrm.render_template(name, lead, message)
               (src/templates.c nocrm_render), with a Python oracle for nocrm.render
  leads        hostile lead rows (CR/LF, 1 MB fields, quotes, {{...}}, odd Unicode,
               invalid-UTF-8 attempts) through the triggers, with automations that
               notify / send_email / webhook / comment using those fields
  rules        ~90 committed valid rules with field conditions, any/all/not groups,
               lead.date.reached and the option columns; then single and bulk
               INSERT/UPDATE/DELETE of leads with extreme values under
               nocrm.history = actions/all/none, fire_due_date_rules() after due_at
               is pushed into the past, and ALTER TABLE nocrm.leads ADD / ALTER TYPE /
               DROP COLUMN in between (a drop of a column a rule reads must fail
               with 2BP01); any error of class 22/23/42/54/0A/55 is fine, XX000 or a
               crash is an engine bug (src/definition.c, fieldcmp.c, where.c,
               rules.c, gate.c, dates.c, events.c)

Definitions (and the lead phases' random rules) also use field conditions on
every column kind of nocrm.leads plus the harness's own columns (an enum, a
jsonb, a text[], a varchar(5), a domain over numeric...), every operator with
good and bad values, groups nested past the 8-level limit, lead.date.reached
targets and date_offset, and the options position / stop_processing /
once_per_lead / at_most_every / on_creation (INSERT, UPDATE,
set_automation_options, set_date_offset).

Every case runs as  SELECT fuzz.try(id, $q$<statement(s)>$q$)  : the statements
run in a PL/pgSQL block that catches the error (a subtransaction), always
rolls back, and returns id, SQLSTATE, milliseconds and the message.  After
each batch the harness checks that the backend and the postmaster are alive
and the server log has no "terminated by signal", samples the backend's
memory (/proc/PID/status and pg_backend_memory_contexts) and flags any
statement slower than 5 s (statement_timeout is 10 s, so a hang cannot stall
the run).

Only the Python standard library is used; PostgreSQL is driven through psql.

  python3 test/fuzz/fuzz_definitions.py                  # full run (seed 1)
  python3 test/fuzz/fuzz_definitions.py --seed 7 --cases 5000
  python3 test/fuzz/fuzz_definitions.py --seed 1 --case render:1234   # one case, verbose
  python3 test/fuzz/fuzz_definitions.py --replay test/fuzz/corpus     # re-run the corpus
"""

import argparse
import collections
import glob
import hashlib
import json
import os
import pwd
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
FIXTURE = os.path.join(ROOT, "test", "fixtures", "crm.sql")
CORPUS = os.path.join(HERE, "corpus")
SEEDS_DIR = os.path.join(CORPUS, "seeds")
FOUND_DIR = os.path.join(CORPUS, "found")
OUT_DIR = os.path.join(HERE, "out")

HANG_MS = 5000.0
MAX_JSON = 1_000_000          # bytes of one generated JSON argument
STATEMENT_TIMEOUT = "10s"
PHASES = ["definitions", "stage", "templates", "render", "leads", "rules"]

# ---------------------------------------------------------------------------
# Expected SQLSTATEs.  Anything else (XX000 internal errors, 21000, 22008 from
# inside a trigger, 57014 timeouts, ...) is "unexpected" and goes to the corpus.
# ---------------------------------------------------------------------------
# Input-parsing errors of the statement itself are always fine: bad JSON text
# (22P02), \u0000 in jsonb (22P05), JSON numbers beyond numeric (22003), nesting
# beyond max_stack_depth (54001), sizes beyond a limit (54000), NULL where the
# C function refuses it (22004).  22021 (bad UTF-8) only where the case tried
# to smuggle invalid bytes in on purpose.
COMMON_OK = {"22P02", "22P05", "22003", "54001", "54000", "22004"}
EXPECTED = {
    # definition.c raises 22023 (invalid), 42704 (unknown user/step/...), 22007
    # (bad delay); the automations table adds NOT NULL / CHECK (blank name).
    # field conditions: unknown column 42703; options: set_automation_options of
    # an unknown id P0002, interval overflow 22008/22015, position overflow 22003.
    "definitions": COMMON_OK | {"22023", "42704", "22007", "23502", "23514", "42703", "P0002", "22008",
                                "22015"},
    # the PL/pgSQL validator raises 22023; step_id is NOT NULL and a FK.
    "stage": COMMON_OK | {"22023", "23502", "23503"},
    # templates.c raises 22023; name is the PK (23505), NOT NULL, non-blank CHECK.
    "templates": COMMON_OK | {"22023", "23502", "23514", "23505"},
    # render never refuses a text; render_template: unknown template 42704.
    # 22023 is NOT expected here.
    "render": COMMON_OK | {"42704"},
    # leads: only the row's own constraints and literal parsing, and only when
    # raised by the statement itself, not from inside the extension's triggers
    # (see classify()).  22007/22008: bad next_action_at literals; 23505: a tag
    # the lead already has.
    "leads": COMMON_OK | {"23514", "23502", "23503", "23505", "22007", "22008"},
}

# The rules phase (field conditions, groups, date rules, options, ALTER TABLE
# of nocrm.leads in between) accepts any error of these classes: data (22),
# integrity (23), syntax/access (42: unknown column, ALTER TYPE without a
# cast), limits (54), unsupported (0A), object state (55), a refused drop of
# a column a rule reads (2BP01) and an unknown automation id (P0002).  Never
# XX000 (elog), a timeout or a crash: those are engine bugs.
RULES_OK_CLASSES = {"22", "23", "42", "54", "0A", "55"}
RULES_OK = {"2BP01", "P0002"}

# ---------------------------------------------------------------------------
# Vocabulary of the fixture (test/fixtures/crm.sql)
# ---------------------------------------------------------------------------
EVENTS = ["lead.creation", "lead.status.changed.to", "lead.step.changed.to", "lead.assigned",
          "lead.unassigned", "lead.content_has_changed", "lead.any_update", "lead.commented",
          "lead.email.received", "lead.deleted", "lead.date.reached"]
BAD_EVENTS = ["lead.created", "LEAD.CREATION", "lead.creation ", "", "lead.", "lead.status.changed",
              "lead.deleted\n", "lead.creation\u200b", "*"]
STATUSES = ["todo", "standby", "won", "lost", "cancelled"]
BAD_STATUSES = ["open", "WON", "won ", "", "todo,won", "closed", "null"]
USERS = [1, 2, 3, 4, 0, "anna@example.com", "MATTEO@EXAMPLE.COM", "giovanni@example.com",
         "sara.manager@example.com", "butler@nocrm.invalid", "Anna@Example.com"]
BAD_USERS = [5, 99, -1, 1.5, "1", "nobody@example.com", "", "owner", "anna", 9223372036854775807,
             10 ** 18, 10 ** 19, 123456789012345678]
PIPELINES = ["Vendite", "Onboarding", 1, 2]
BAD_PIPELINES = ["vendite", "Sales", 3, 0, "", " Vendite"]
STEPS = ["Nuovo", "Qualificato", "Preventivo", "Chiusura", "Kickoff", 1, 2, 3, 4, 5, 6]
BAD_STEPS = ["nuovo", "Won", 7, 0, "", "Preventivo ", 999999999999999999]
TEMPLATES = ["quote_followup", "notification"]
BAD_TEMPLATES = ["quote", "", "Notification", "nope"]
CHANNELS = ["browser", "email", "mobile"]
TAGS = ["B2B", "Priority", "VIP", "hot lead", "été", "日本", "a,b", "{{lead.title}}", "x" * 200]
PLACEHOLDERS = ["lead.id", "lead.title", "lead.amount", "lead.status", "lead.probability",
                "lead.description", "lead.contact_email", "lead.pipeline", "lead.step",
                "lead.next_action_at", "lead.created_at", "owner.name", "owner.email",
                "butler.name", "butler.email", "user.name", "user.email", "automation.name",
                "event", "message"]
BAD_PLACEHOLDERS = ["lead.name", "Lead.Title", "lead.title.x", "", "owner", "lead.", "lead title",
                    "{lead.title}", "lead.title\n", "日本"]
DELAYS = ["2 hours", "30 minutes", "1 day", "3 days", "P1D", "PT2H", "P1Y2M3DT4H5M6S",
          "1 week 2 days", "@ 1 hour", "1 mon", "1 year", "00:30:00", "1.5 hours", "1 day -1 hour",
          "10 seconds", "1 millisecond", "100 years", "1000 years", "300000 years",
          "178000000 years", "2147483647 days", "2147483647 hours"]
BAD_DELAYS = ["-1 hour", "0", "0 seconds", "", "   ", "soon", "2 fortnights", "1 hour ago",
              "-P1D", "P", "PT", "1e400 days", "P1e400D", "9999999999 years", "infinity",
              "2147483648 days", "1 hour 1 hour", "x" * 300, "1" * 300 + " days", "\t1 hour",
              "1 hour\u200b", "１ hour", "P1D1D", "1:2:3:4"]
URLS = ["https://hooks.example.com/crm", "http://127.0.0.1:9/x", "https://h/x?a=1&b={{lead.id}}"]
BAD_URLS = ["ftp://x", "https://a b", "http://x\r\nHost: evil", "javascript:alert(1)", "",
            "https://" + "a" * 2100, "HTTP://X", "http:/x"]
ACTION_TYPES = ["assign", "assign_round_robin", "assign_random", "assign_balanced", "add_tags",
                "remove_tags", "set_status", "set_step", "comment", "notify", "send_email",
                "webhook"]

HOSTILE_STRINGS = [
    "", " ", "\t", "\r\n", "line1\nline2", "a\r\nBcc: evil@example.com", "'", "''", '"', '\\',
    "\\u0000", "$$", "$q$", "'); DROP TABLE nocrm.leads; --", "%s%s%s%n", "%.*s", "{{", "}}",
    "{{lead.title}}", "{{ lead.title }}", "{{{{lead.title}}}}", "{{unknown}}", "{{lead.title",
    "}}{{", "Ünïcödé", "日本語のリード", "😀🎉👩‍👩‍👧", "שלום עולם", "e\u0301", "\u200b\u200c\u200d",
    "\ufeff", "\u2028\u2029", "\u00a0", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\ufffe\uffff", "\U0010ffff", "\x01\x02\x1f\x7f",
    "<script>alert(1)</script>", "=cmd|' /C calc'!A0", "\u202eevil", "NaN", "null", "true",
    "{\"a\": 1}", "[1,2]", "a" * 4001, '"' * 3000, "\\" * 3000, "\x01" * 1500,
]


def random_char(rng):
    r = rng.random()
    if r < 0.55:
        return chr(rng.randint(0x20, 0x7e))
    if r < 0.62:
        return rng.choice("\t\r\n\x01\x1b\x7f")
    if r < 0.75:
        return chr(rng.randint(0xa0, 0x2ff))
    if r < 0.90:
        while True:
            c = rng.randint(0x300, 0xfffd)
            if not 0xd800 <= c <= 0xdfff:
                return chr(c)
    return chr(rng.randint(0x10000, 0x10ffff))


def random_text(rng, n=None):
    if n is None:
        n = rng.choice([0, 1, 2, 5, 10, 20, 40, 100])
    return "".join(random_char(rng) for _ in range(n))


def long_text(rng, size):
    """About size characters, cheaply: a random chunk repeated."""
    kind = rng.random()
    if kind < 0.3:
        unit = "x"
    elif kind < 0.5:
        unit = rng.choice(['"', "\\", "\x01", "é", "日", "😀", "{{", "{{lead.title}}", "\r\n", "'"])
    else:
        unit = random_text(rng, rng.randint(1, 64)) or "y"
    return (unit * (size // len(unit) + 1))[:size]


def hostile_string(rng):
    r = rng.random()
    if r < 0.45:
        return rng.choice(HOSTILE_STRINGS)
    if r < 0.85:
        return random_text(rng)
    if r < 0.97:
        return rng.choice(HOSTILE_STRINGS) + random_text(rng) + rng.choice(HOSTILE_STRINGS)
    return long_text(rng, rng.choice([1000, 4000, 8001, 100_000]))


# ---------------------------------------------------------------------------
# JSON with the things json.dumps cannot write: duplicate keys and raw text
# ---------------------------------------------------------------------------
class Dup:
    """A JSON object written with these (possibly repeated) key/value pairs."""

    def __init__(self, pairs):
        self.pairs = pairs


class Raw:
    """Verbatim JSON text (odd numbers, deep nesting, broken escapes)."""

    def __init__(self, text):
        self.text = text


_SURROGATE = re.compile("[\ud800-\udfff]")


def dumps(v, ascii_only=False):
    out = []

    def w(x):
        if isinstance(x, Raw):
            out.append(x.text)
        elif isinstance(x, Dup):
            out.append("{")
            for i, (k, val) in enumerate(x.pairs):
                if i:
                    out.append(", ")
                out.append(json.dumps(k, ensure_ascii=ascii_only or _SURROGATE.search(k) is not None))
                out.append(": ")
                w(val)
            out.append("}")
        elif isinstance(x, dict):
            w(Dup(list(x.items())))
        elif isinstance(x, list):
            out.append("[")
            for i, e in enumerate(x):
                if i:
                    out.append(", ")
                w(e)
            out.append("]")
        elif x is True:
            out.append("true")
        elif x is False:
            out.append("false")
        elif x is None:
            out.append("null")
        elif isinstance(x, (int, float)):
            out.append(json.dumps(x))
        else:
            # a lone surrogate (from a decoded "\\ud800" escape) can only be written escaped
            out.append(json.dumps(x, ensure_ascii=ascii_only or _SURROGATE.search(x) is not None))

    w(v)
    return "".join(out)


def deep(rng, depth=None):
    if depth is None:
        depth = rng.choice([10, 100, 1000, 10_000, 10_000, 30_000])
    r = rng.random()
    if r < 0.5:
        return Raw("[" * depth + "]" * depth)
    if r < 0.8:
        return Raw('{"a": ' * depth + "1" + "}" * depth)
    return Raw('[{"user": ' * depth + "1" + "}]" * depth)


ODD_NUMBERS = ["1e1000000", "-1e1000000", "1e-1000000", "1E2", "1.0", "1.000000000000000000001",
               "-0", "0.0", "9223372036854775807", "9223372036854775808", "-9223372036854775809",
               "123456789012345678", "1234567890123456789", "2e0", "0.5", "1000000", "1000001",
               "999999999", "1000000000", "1" + "0" * 400, "3.", ".3", "01", "+1", "0x10",
               "Infinity", "NaN", "1e309"]


def random_value(rng, depth=0):
    r = rng.random()
    if r < 0.15:
        return None
    if r < 0.25:
        return rng.random() < 0.5
    if r < 0.40:
        return rng.choice([0, 1, 2, -1, 7, 1000, 1001, 10 ** 6, 2 ** 31, 2 ** 63, 1.5, -0.0])
    if r < 0.50:
        return Raw(rng.choice(ODD_NUMBERS))
    if r < 0.75:
        return hostile_string(rng)
    if r < 0.82:
        return rng.choice([[], {}, [[]], [{}], {"": None}])
    if r < 0.90 and depth < 3:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(1, 4))]
    if r < 0.97 and depth < 3:
        return {hostile_string(rng)[:40]: random_value(rng, depth + 1) for _ in range(rng.randint(1, 3))}
    return deep(rng, rng.choice([10, 100, 1000]))


# ---------------------------------------------------------------------------
# Definitions: grammar
# ---------------------------------------------------------------------------
def one_or_list(rng, pool, bad_pool=None, bad_p=0.05):
    def pick():
        if bad_pool and rng.random() < bad_p:
            return rng.choice(bad_pool)
        return rng.choice(pool)

    if rng.random() < 0.5:
        return pick()
    return [pick() for _ in range(rng.randint(1, 4))]


def gen_user(rng, bad_p=0.05):
    return rng.choice(BAD_USERS) if rng.random() < bad_p else rng.choice(USERS)


def gen_member(rng):
    u = gen_user(rng)
    if rng.random() < 0.6:
        return u
    m = {"user": u}
    if rng.random() < 0.6:
        m["weight"] = rng.choice([1, 2, 5, 1000, 0, 1001, -1, 1.5, "2", 10 ** 10]) if rng.random() < 0.3 \
            else rng.randint(1, 10)
    if rng.random() < 0.5:
        m["cap"] = rng.choice([1, 20, 1000000, 0, 1000001, -5, "3", 2 ** 31]) if rng.random() < 0.3 \
            else rng.randint(1, 50)
    if rng.random() < 0.03:
        m[rng.choice(["users", "Weight", "name", ""])] = 1
    return m


def gen_message(rng):
    parts = []
    for _ in range(rng.randint(1, 5)):
        r = rng.random()
        if r < 0.4:
            parts.append(random_text(rng, rng.randint(1, 30)))
        elif r < 0.8:
            parts.append("{{" + " " * rng.randint(0, 2) + rng.choice(PLACEHOLDERS) + " " * rng.randint(0, 2) + "}}")
        elif r < 0.9:
            parts.append("{{" + rng.choice(BAD_PLACEHOLDERS) + "}}")
        else:
            parts.append(rng.choice(["{{", "}}", "{", "}", "{{{", "\n"]))
    msg = "".join(parts)
    if rng.random() < 0.03:
        msg = long_text(rng, rng.choice([3999, 4000, 4001, 8000]))
    return msg


def gen_action(rng, event):
    t = rng.choice(ACTION_TYPES)
    if event == "lead.deleted" and rng.random() < 0.8:
        t = rng.choice(["notify", "send_email", "webhook"])
    a = {"type": t}
    if t == "assign":
        a["user"] = gen_user(rng)
    elif t in ("assign_round_robin", "assign_random", "assign_balanced"):
        users = []
        for u in (gen_member(rng) for _ in range(rng.randint(1, 4))):
            key = u["user"] if isinstance(u, dict) else u
            if all((x["user"] if isinstance(x, dict) else x) != key for x in users):
                users.append(u)
        a["users"] = users
        if rng.random() < 0.4:
            a["only_working_hours"] = rng.random() < 0.5
        if rng.random() < 0.4:
            a["fallback"] = rng.choice(["anyone", "unassigned"]) if rng.random() < 0.9 else rng.choice(
                ["nobody", "Anyone", ""])
    elif t in ("add_tags", "remove_tags"):
        a["tags"] = one_or_list(rng, TAGS, ["", " ", 7, None], 0.03)
    elif t == "set_status":
        a["status"] = rng.choice(BAD_STATUSES) if rng.random() < 0.05 else rng.choice(STATUSES)
    elif t == "set_step":
        a["step"] = rng.choice(BAD_STEPS) if rng.random() < 0.05 else rng.choice(STEPS)
    elif t == "comment":
        a["body"] = gen_message(rng) if rng.random() < 0.7 else hostile_string(rng)
    elif t == "notify":
        a["user"] = "owner" if rng.random() < 0.3 else gen_user(rng)
        a["message"] = gen_message(rng)
        if rng.random() < 0.5:
            a["channels"] = one_or_list(rng, CHANNELS, ["sms", "", "Email"], 0.05)
    elif t == "send_email":
        a["template"] = rng.choice(BAD_TEMPLATES) if rng.random() < 0.05 else rng.choice(TEMPLATES)
        if rng.random() < 0.4:
            a["to"] = rng.choice(["client@example.com", "a@b", "x@y.z"]) if rng.random() < 0.8 else rng.choice(
                ["no-at", "a@b\r\nBcc: c@d", "<a@b>", "a@b, c@d", "a @b", "@"])
    elif t == "webhook":
        a["url"] = rng.choice(BAD_URLS) if rng.random() < 0.05 else rng.choice(URLS)
    if rng.random() < 0.25:
        a["delay"] = rng.choice(BAD_DELAYS) if rng.random() < 0.15 else rng.choice(DELAYS)
        if rng.random() < 0.3:
            a["recheck"] = rng.random() < 0.5
    elif rng.random() < 0.02:
        a["recheck"] = True
    if rng.random() < 0.15:
        a["respect_working_hours"] = rng.random() < 0.6
    if rng.random() < 0.3:
        items = list(a.items())
        rng.shuffle(items)
        a = dict(items)
    return a


def gen_conditions(rng):
    c = {}
    for key in ["has_tag", "lacks_tag", "status", "owner", "pipeline", "step"]:
        if rng.random() < 0.25:
            if key in ("has_tag", "lacks_tag"):
                c[key] = one_or_list(rng, TAGS, ["", 3, None], 0.03)
            elif key == "status":
                c[key] = one_or_list(rng, STATUSES, BAD_STATUSES, 0.03)
            elif key == "owner":
                c[key] = None if rng.random() < 0.2 else one_or_list(rng, USERS, BAD_USERS, 0.03)
            elif key == "pipeline":
                c[key] = one_or_list(rng, PIPELINES, BAD_PIPELINES, 0.03)
            else:
                c[key] = one_or_list(rng, STEPS, BAD_STEPS, 0.03)
    if rng.random() < 0.02:
        c[rng.choice(["tag", "Status", "owner_id", "", "has_tags"])] = "x"
    return c


def gen_definition(rng):
    if rng.random() < 0.35:
        return gen_new_definition(rng, valid=rng.random() < 0.3)
    event = rng.choice(BAD_EVENTS) if rng.random() < 0.03 else rng.choice(EVENTS)
    target = None
    if event == "lead.status.changed.to":
        target = rng.choice(STATUSES) if rng.random() < 0.9 else rng.choice(BAD_STATUSES)
    elif event == "lead.step.changed.to":
        target = str(rng.choice(STEPS)) if rng.random() < 0.9 else rng.choice(
            ["", "7", "0", "Preventivo ", "12345678901234567890", "-1"])
    elif event == "lead.date.reached":
        target = rng.choice(DATE_COLUMNS) if rng.random() < 0.9 else rng.choice(BAD_DATE_TARGETS)
    elif rng.random() < 0.02:
        target = rng.choice(["won", "", "Nuovo"])
    name = rng.choice(["auto", "Welcome new leads", "A" * 300, "x'y", "日本", "\n", ""]) \
        if rng.random() < 0.1 else "auto %d" % rng.randint(1, 10 ** 6)
    return {
        "name": name, "event": event, "target": target,
        "conditions": gen_conditions(rng),
        "actions": [gen_action(rng, event) for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 5]))],
    }


# ---------------------------------------------------------------------------
# Field conditions, groups, date rules and options (definition.c compile_node /
# compile_field, fieldcmp.c, where.c, dates.c, rules.c)
# ---------------------------------------------------------------------------
# column -> kind, for the columns of nocrm.leads plus those HARNESS_SQL adds
FIELD_COLUMNS = {
    "title": "text", "description": "text", "contact_email": "text", "status": "text",
    "fz_code": "text", "fz_spare": "text",
    "amount": "numeric", "fz_money": "numeric", "fz_f": "float",
    "probability": "int",
    "id": "bigint", "pipeline_id": "bigint", "step_id": "bigint", "user_id": "bigint", "fz_n": "bigint",
    "fz_flag": "bool",
    "next_action_at": "ts", "created_at": "ts", "updated_at": "ts", "closed_at": "ts", "fz_ts": "ts",
    "fz_day": "date",
    "fz_kind": "enum", "fz_doc": "jsonb", "fz_tags": "array",
}
DATE_COLUMNS = ["next_action_at", "created_at", "updated_at", "closed_at", "fz_ts", "fz_day"]
BAD_COLUMNS = ["nope", "", "Title", "TITLE", "xmin", "ctid", "tableoid", "title ", "leads.title", 'id"',
               "title; DROP TABLE x", "fz_new_0", "日本", "oid", 5, None, ["title"], {"field": "title"}]
BAD_DATE_TARGETS = ["title", "amount", "fz_doc", "fz_kind", "nope", "", "Next_action_at", "xmin",
                    "next_action_at ", "id", "fz_flag", "fz_tags", "now", "lead.next_action_at"]
OPS_CMP = ["=", "==", "eq", "!=", "<>", "ne", "<", "lt", "<=", "le", ">", "gt", ">=", "ge"]
OPS_ALL = OPS_CMP + ["between", "in", "not_in", "is_empty", "is_not_empty", "contains", "starts_with", "changed"]
BAD_OPS = ["LIKE", "", "=~", "IN", "regex", "is empty", " =", "===", "Between", None, 1, ["="], "changed_to"]
UPDATE_EVENTS = ["lead.any_update", "lead.content_has_changed", "lead.status.changed.to",
                 "lead.step.changed.to", "lead.assigned", "lead.unassigned"]
ODD_INTERVALS = ["1 hour", "-3 days", "30 days", "0", "P1D", "-P1Y", "1 mon -1 day", "@ 1 hour ago",
                 "00:00:00.000001", "", " ", "soon", "1e400 days", "178000000 years", "-178000000 years",
                 "2147483647 days", "-2147483648 months", "infinity", "-infinity", "now", "1 fortnight",
                 "x" * 300, "1 day\u200b", None, 5, 1.5, True, [], {}, ["1 day"], {"now": "1 day"}]
DATE_OFFSETS = ["0", "-3 days", "14 days", "1 hour", "-1 year", "1 mon", "P1D", "-PT30M", "00:00:01"]
BAD_DATE_OFFSETS = ["1e400 days", "infinity", "-infinity", "178000000 years", "-178000000 years",
                    "2147483647 days", "-2147483648 days", "100000 years", "soon", "", "NULL", "'1 day'"]


def good_value(rng, kind):
    """A value the column's type reads."""
    if kind == "text":
        return rng.choice(["google", "ACME", "mr ", "won", "todo", "", "é", "日本", "a'b", "%", "_", "\\",
                           "abcde", random_text(rng, rng.randint(0, 5))])
    if kind == "numeric":
        return rng.choice([0, 1, 500, 999.99, 10000, "1000.50", 25000, "0.01", 12345678.9, 1.5])
    if kind == "float":
        return rng.choice([0, 1.5, -2, "1e10", 3.25, "NaN", "Infinity", "-Infinity"])
    if kind == "int":
        return rng.choice([0, 1, 50, 100, "42", -1])
    if kind == "bigint":
        return rng.choice([1, 2, 3, 6, "4", 9223372036854775807, -9223372036854775808, 0])
    if kind == "bool":
        return rng.choice([True, False, "true", "f", "yes", "off", "1"])
    if kind in ("ts", "date"):
        return rng.choice(["2026-12-31", "2000-01-01", "2026-12-31 10:00:00+02", "infinity", "-infinity",
                           {"now": "-3 days"}, {"now": "1 hour"}, {"now": "0"}, {"now": "P30D"},
                           "1970-01-01", "epoch"])
    if kind == "enum":
        return rng.choice(["cold", "warm", "hot"])
    if kind == "jsonb":
        return rng.choice(['{"a": 1}', "[]", "null", '"x"', "1"])
    return rng.choice(["{}", "{a,b}", "{NULL}", '{"a,b",""}'])


def bad_value(rng):
    r = rng.random()
    if r < 0.62:
        return rng.choice([
            None, "", " ", "NaN", "Infinity", "-Infinity", "nan", "now", "today", "tomorrow", "yesterday",
            "2024-02-30", "294277-01-01", "5874898-01-01", "4714-11-24 BC", "allballs", "1e1000", "abc",
            "abcdef", "bogus", "{", "{a", "[", "tru", "10:00", "9999999999999999999999", "-0",
            {}, [], [[]], {"now": None}, {"now": rng.choice(ODD_INTERVALS)}, {"now": "1 day", "x": 1},
            {"later": "1 day"}, [1, [2, [3]]], {"a": {"b": {"c": []}}}, True, False, 1.5, -1,
            "x" * rng.choice([6, 1000, 100_000]), "\ufffe", "\U0010ffff", "e\u0301", "\\x00",
        ])
    if r < 0.7:
        return Raw(rng.choice(ODD_NUMBERS + ['"\\ud800"', '"\\udc00x"', '"a\\u0000b"', '"\\uDBFF\\uDFFF"']))
    if r < 0.8:
        return {"now": rng.choice(ODD_INTERVALS)}
    return random_value(rng)


def gen_field_cond(rng, event, valid):
    """The keys of one field condition (merged into a condition object)."""
    if valid:
        col = rng.choice(list(FIELD_COLUMNS))
    else:
        col = rng.choice(BAD_COLUMNS) if rng.random() < 0.08 else rng.choice(list(FIELD_COLUMNS))
    kind = FIELD_COLUMNS.get(col, "text") if isinstance(col, str) else "text"
    ordered = kind not in ()
    ops = list(OPS_ALL)
    if valid:
        if kind != "text":
            ops = [o for o in ops if o not in ("contains", "starts_with")]
        if event not in UPDATE_EVENTS:
            ops.remove("changed")
        if kind in ("bool", "enum", "jsonb", "array") and rng.random() < 0.5:
            ops = ["=", "!=", "in", "is_empty", "is_not_empty"]
    op = rng.choice(BAD_OPS) if not valid and rng.random() < 0.05 else rng.choice(ops)
    c = {"field": col, "op": op}
    del ordered

    def val():
        return good_value(rng, kind) if valid or rng.random() < 0.7 else bad_value(rng)

    if op == "between":
        lo, hi = val(), val()
        if valid:
            lo, hi = {"numeric": (0, 1000), "float": (-1.5, 2), "int": (10, 90), "bigint": (1, 4),
                      "ts": ("2020-01-01", "2030-12-31 23:00:00+00"), "date": ("2020-01-01", "2030-12-31"),
                      "enum": ("cold", "warm"), "bool": (False, True), "text": ("a", "m"),
                      "jsonb": ("1", "2"), "array": ("{a}", "{b}")}[kind]
            c["value"] = [lo, hi]
        else:
            c["value"] = rng.choice([[lo, hi], [hi, lo], [lo], [lo, hi, lo], lo, [], [None, hi], {"low": lo}])
    elif op in ("in", "not_in"):
        n = rng.choice([1, 2, 3, 5])
        vals = [val() for _ in range(n)]
        if valid:
            # {"now": ...} stands alone: a list element that is an object is refused
            vals = [v if not isinstance(v, dict) else "2026-12-31" for v in vals]
            c["values"] = vals
        else:
            r = rng.random()
            if r < 0.6:
                c["values"] = vals
            elif r < 0.7:
                c["value"] = vals
            elif r < 0.8:
                c["values"] = rng.choice([[], vals[0], None, {"a": 1}])
            elif r < 0.9:
                c["values"] = [good_value(rng, kind) for _ in range(rng.choice([999, 1000, 1001, 1500]))]
            else:
                c["values"], c["value"] = vals, vals[0]
    elif op in ("is_empty", "is_not_empty"):
        if not valid and rng.random() < 0.2:
            c["value"] = val()
    elif op == "changed":
        if rng.random() < 0.4:
            c["from"] = None if rng.random() < 0.3 else val()
        if rng.random() < 0.4:
            c["to"] = None if rng.random() < 0.3 else val()
    else:
        if valid or rng.random() < 0.9:
            c["value"] = val() if op not in ("contains", "starts_with") or not valid else \
                rng.choice(["acme", "Mr", "é", "%", "_", "", "日本"])
        if not valid and rng.random() < 0.05:
            c["values"] = [val()]
    if not valid and rng.random() < 0.04:
        c[rng.choice(["from", "to", "Field", "ops", "value ", "x"])] = val()
    if not valid and rng.random() < 0.03:
        del c[rng.choice(["field", "op"])]
    return c


def gen_cond_obj(rng, event, valid, depth, max_depth):
    """A condition object: today's keys, maybe a field condition, maybe groups (nested)."""
    c = {}
    for key in ["has_tag", "lacks_tag", "status", "owner", "pipeline", "step"]:
        if rng.random() < 0.12:
            if key in ("has_tag", "lacks_tag"):
                c[key] = one_or_list(rng, TAGS, None if valid else ["", 3, None], 0.03)
            elif key == "status":
                c[key] = one_or_list(rng, STATUSES, None if valid else BAD_STATUSES, 0.03)
            elif key == "owner":
                c[key] = None if rng.random() < 0.2 else one_or_list(rng, USERS, None if valid else BAD_USERS, 0.03)
            elif key == "pipeline":
                c[key] = one_or_list(rng, PIPELINES, None if valid else BAD_PIPELINES, 0.03)
            else:
                c[key] = one_or_list(rng, STEPS, None if valid else BAD_STEPS, 0.03)
    if rng.random() < 0.6:
        c.update(gen_field_cond(rng, event, valid))
    if depth < max_depth:
        for g in ("all", "any", "not"):
            if rng.random() < 0.35:
                if g == "not":
                    sub = gen_cond_obj(rng, event, valid, depth + 1, max_depth)
                    if not valid and rng.random() < 0.1:
                        sub = rng.choice([[sub], {}, None, [], "x"])
                else:
                    sub = [gen_cond_obj(rng, event, valid, depth + 1, max_depth)
                           for _ in range(rng.choice([1, 1, 2, 3]))]
                    if not valid and rng.random() < 0.1:
                        sub = rng.choice([[], {}, [{}], None, sub[0], [sub]])
                if valid and sub == {}:
                    continue
                c[g] = sub
    if valid and not c:
        c = {"field": "title", "op": "is_not_empty"}
    return c


def deep_group(rng, event, levels, valid_leaf=True):
    """Exactly `levels` nested groups, a field condition at the bottom."""
    node = gen_field_cond(rng, event, valid_leaf)
    if levels > 100:      # as text: dumps() recurses
        g = rng.choice(['{"not": ', '{"all": [', '{"any": ['])
        close = "}" if g == '{"not": ' else "]}"
        return Raw(g * levels + dumps(node) + close * levels)
    for _ in range(levels):
        g = rng.choice(["all", "any", "not"])
        node = {g: node} if g == "not" else {g: [node]}
        if rng.random() < 0.3:
            node["status"] = rng.choice(STATUSES)
    return node


def gen_new_conditions(rng, event, valid):
    r = rng.random()
    if r < 0.1 and not valid:
        return deep_group(rng, event, rng.choice([7, 8, 9, 10, 12, 50, 1000]))
    if r < 0.15:
        return deep_group(rng, event, rng.choice([1, 3, 6]))
    return gen_cond_obj(rng, event, valid, 0, rng.choice([0, 1, 2, 3]) if valid else rng.choice([0, 1, 2, 3, 4, 9]))


def gen_options(rng, event, valid):
    """column -> SQL literal, for the automation's option columns."""
    o = {}
    if rng.random() < 0.4:
        o["position"] = str(rng.choice([0, 1, 10, -5, 100, 2147483647, -2147483648])) if valid or rng.random() < 0.7 \
            else rng.choice(["2147483648", "NULL", "'x'", "1.5", "'1e3'", "'-9223372036854775808'"])
    if rng.random() < 0.3:
        o["stop_processing"] = rng.choice(["true", "false"]) if valid or rng.random() < 0.8 else \
            rng.choice(["NULL", "'maybe'", "'2'"])
    r = rng.random()
    if r < 0.2:
        o["once_per_lead"] = "true" if valid or rng.random() < 0.8 else rng.choice(["NULL", "'y'"])
    elif r < 0.4:
        o["at_most_every"] = lit(rng.choice(["1 hour", "7 days", "1 microsecond", "100 years", "1 mon"])) \
            if valid or rng.random() < 0.6 else rng.choice(
                ["'0'", "'-1 hour'", "'1e400 days'", "'infinity'", "NULL", "'soon'", "'178000000 years'"])
    if not valid and rng.random() < 0.05:
        o["once_per_lead"], o["at_most_every"] = "true", "'1 day'"
    if rng.random() < 0.2 and (not valid or event in ("lead.status.changed.to", "lead.step.changed.to")):
        o["on_creation"] = "true" if valid or rng.random() < 0.8 else rng.choice(["NULL", "false", "'t'"])
    if event == "lead.date.reached" or (not valid and rng.random() < 0.05):
        if rng.random() < 0.7:
            o["date_offset"] = lit(rng.choice(DATE_OFFSETS)) if valid or rng.random() < 0.7 else \
                (lit(rng.choice(BAD_DATE_OFFSETS)) if rng.random() < 0.9 else "NULL")
    return o


def gen_new_definition(rng, valid=False):
    """A definition using the new keys: field conditions, groups, date rules."""
    r = rng.random()
    if r < 0.3:
        event = "lead.date.reached"
    elif r < 0.55:
        event = rng.choice(UPDATE_EVENTS)
    else:
        event = rng.choice(EVENTS)
    target = None
    if event == "lead.date.reached":
        target = rng.choice(DATE_COLUMNS) if valid or rng.random() < 0.8 else rng.choice(BAD_DATE_TARGETS + [None])
    elif event == "lead.status.changed.to":
        target = rng.choice(STATUSES)
    elif event == "lead.step.changed.to":
        target = str(rng.choice(STEPS))
    acts = []
    for _ in range(rng.choice([1, 1, 2])):
        a = gen_action(rng, event)
        if valid:
            t = rng.choice(["add_tags", "notify", "comment", "webhook", "send_email", "set_status", "assign"]
                           if event != "lead.deleted" else ["notify", "webhook"])
            a = {"add_tags": {"type": "add_tags", "tags": [rng.choice(["fz", "VIP", "hot lead", "été"])]},
                 "notify": {"type": "notify", "user": rng.choice([1, 2, "owner"]) if event != "lead.unassigned" else 1,
                            "message": "{{lead.title}} " + rng.choice(["", "{{lead.amount}}", "{{lead.next_action_at}}"])},
                 "comment": {"type": "comment", "body": "auto {{lead.title}}"},
                 "webhook": {"type": "webhook", "url": "https://hooks.example.com/crm"},
                 "send_email": {"type": "send_email", "template": "quote_followup"},
                 "set_status": {"type": "set_status", "status": rng.choice(STATUSES)},
                 "assign": {"type": "assign", "user": rng.choice([1, 2, 3])}}[t]
            if rng.random() < 0.1:
                a["delay"] = rng.choice(["2 hours", "1 day"])
        acts.append(a)
    return {"name": "fz %d" % rng.randint(1, 10 ** 6), "event": event, "target": target,
            "conditions": gen_new_conditions(rng, event, valid), "actions": acts}


# ---------------------------------------------------------------------------
# Mutators
# ---------------------------------------------------------------------------
def _containers(v, path=()):
    """Paths to every dict/list node and every value (for replacement)."""
    yield path, v
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _containers(x, path + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _containers(x, path + (i,))


def _set(root, path, value):
    if not path:
        return value
    node = root
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return root


def _get(root, path):
    for p in path:
        root = root[p]
    return root


def mutate_tree(rng, root):
    """One structural mutation of a JSON-like tree (dict/list/scalars/Raw/Dup)."""
    nodes = [(p, v) for p, v in _containers(root)]
    path, node = rng.choice(nodes)
    op = rng.random()
    if op < 0.25:
        return _set(root, path, random_value(rng))
    if op < 0.35:
        return _set(root, path, deep(rng))
    if op < 0.45 and isinstance(node, dict) and node:
        k = rng.choice(list(node))
        del node[k]
        return root
    if op < 0.55 and isinstance(node, dict):
        k = rng.choice(list(node)) if node and rng.random() < 0.7 else rng.choice(
            ["type", "delay", "recheck", "user", "users", "tags", "weight", "cap", "fallback",
             "only_working_hours", "respect_working_hours", "channels", "to", "x", "", "\u00e9"])
        pairs = list(node.items())
        pairs.insert(rng.randint(0, len(pairs)), (k, random_value(rng)))
        return _set(root, path, Dup(pairs))      # duplicate key (jsonb keeps the last)
    if op < 0.62 and isinstance(node, dict):
        node[rng.choice(["extra", "Type", "delay ", "users", "weight", hostile_string(rng)[:30]])] = random_value(rng)
        return root
    if op < 0.70:
        return _set(root, path, [node] if rng.random() < 0.7 else {"value": node})
    if op < 0.76 and isinstance(node, list):
        k = rng.choice([2, 50, 1000])
        if len(dumps(node)) * k > 300_000:
            k = 2
        return _set(root, path, [] if rng.random() < 0.5 else node * k)
    if op < 0.82 and isinstance(node, str):
        return _set(root, path, long_text(rng, rng.choice([1000, 100_000])))
    if op < 0.88 and isinstance(node, str):
        i = rng.randint(0, len(node))
        return _set(root, path, node[:i] + hostile_string(rng) + node[i:])
    if op < 0.94 and isinstance(node, (int, float)) and not isinstance(node, bool):
        return _set(root, path, Raw(rng.choice(ODD_NUMBERS)))
    if op < 0.97:
        return _set(root, path, rng.choice([None, [], {}, "", 0, False]))
    return _set(root, path, str(node) if not isinstance(node, (Raw, Dup)) else None)


def mutate_text(rng, text):
    """Character-level mutation of JSON text (result stays valid UTF-8, no NUL)."""
    if not text:
        return random_text(rng, 3)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        i = rng.randint(0, len(text))
        if op < 0.3:
            text = text[:i] + random_text(rng, rng.randint(1, 5)) + text[i:]
        elif op < 0.5:
            j = min(len(text), i + rng.randint(1, 10))
            text = text[:i] + text[j:]
        elif op < 0.6:
            text = text[:i]
        elif op < 0.7:
            j = min(len(text), i + rng.randint(1, 50))
            text = text[:j] + text[i:j] * rng.randint(1, 5) + text[j:]
        elif op < 0.85:
            text = text[:i] + rng.choice(['\\u0000', '\\ud800', '\\udc00\\ud800', '\\u00e9', '\\uD83D\\uDE00',
                                          '\\x41', '\\', '"', ',', ':', '{', '}', '[', ']', ',,']) + text[i:]
        else:
            text = text[:i] + rng.choice(["NaN", "Infinity", "undefined", "'x'", "/*c*/", "1e1000000"]) + text[i:]
    return text


def expand_seed(v):
    """Seed files write long strings as {"repeat": [unit, n]} and {"concat": [...]}."""
    if isinstance(v, dict):
        if set(v) == {"repeat"}:
            unit, n = v["repeat"]
            return expand_seed(unit) * n
        if set(v) == {"concat"}:
            return "".join(expand_seed(x) for x in v["concat"])
        return {k: expand_seed(x) for k, x in v.items()}
    if isinstance(v, list):
        return [expand_seed(x) for x in v]
    return v


def seed_case(seed, idx):
    """A seed as a statement, unmutated (for --replay)."""
    ph = seed["phase"]
    if ph == "definitions":
        sql = "SELECT nocrm.check_automation(%s, %s, %s, %s, %s)" % (
            lit(seed.get("name")), lit(seed.get("event")), lit(seed.get("target")), jlit(seed.get("conditions")),
            jlit(seed.get("actions")))
    elif ph == "templates":
        sql = "INSERT INTO nocrm.email_templates (name, subject, body) VALUES (%s, %s, %s)" % (
            lit(seed.get("name")), lit(seed.get("subject")), lit(seed.get("body")))
    elif ph == "render":
        sql = "SELECT convert_to(nocrm.render(%s, %s), 'UTF8')" % (lit(seed.get("text")), jlit(seed.get("context")))
    elif ph == "stage":
        sql = "INSERT INTO nocrm.stage_triggers (step_id, kind, params) VALUES (%s, %s, %s)" % (
            seed.get("step_id"), lit(seed.get("kind")), jlit(seed.get("params")))
    else:
        f = seed["fields"]
        sql = "INSERT INTO nocrm.leads (%s) VALUES (%s); SELECT fuzz.lead_invariants();" % (
            ", ".join(f), ", ".join(lit(v) if isinstance(v, str) else str(v) for v in f.values()))
    return Case(ph, idx, sql, note=seed.get("file", ""))


def parse_seed_json(text):
    """A seed's raw JSON text as a tree (duplicate keys kept), or None."""
    try:
        return json.loads(text, object_pairs_hook=lambda pairs: Dup(pairs) if len({k for k, _ in pairs}) < len(
            pairs) else dict(pairs))
    except (ValueError, RecursionError):
        return None


# ---------------------------------------------------------------------------
# SQL helpers
# ---------------------------------------------------------------------------
def lit(s):
    if s is None:
        return "NULL"
    return "'" + s.replace("'", "''") + "'"


def jlit(text):
    return "NULL" if text is None else lit(text) + "::jsonb"


def bad_bytes_expr(rng):
    """An expression that tries to produce invalid UTF-8 (PostgreSQL must refuse it)."""
    return rng.choice([
        "E'\\xff\\xfe'", "E'ok\\xc3\\x28'", "E'\\xed\\xa0\\x80'", "E'\\xf8\\x88\\x80\\x80\\x80'",
        "E'\\xc0\\xaf'", "convert_from('\\xff'::bytea, 'UTF8')",
        "convert_from('\\x41c328'::bytea, 'UTF8')", "convert_from('\\xe282'::bytea, 'UTF8')",
        "chr(55296)", "E'\\uD800'",
    ])


class Case:
    __slots__ = ("phase", "idx", "sql", "bad_bytes", "note", "oracle")

    def __init__(self, phase, idx, sql, bad_bytes=False, note="", oracle=False):
        self.phase, self.idx, self.sql, self.bad_bytes, self.note, self.oracle = \
            phase, idx, sql, bad_bytes, note, oracle


def case_rng(seed, phase, i):
    return random.Random("%s:%s:%d" % (seed, phase, i))


# ---------------------------------------------------------------------------
# Case generators, one per phase
# ---------------------------------------------------------------------------
class Generator:
    def __init__(self, seed):
        self.seed = seed
        self.seeds = collections.defaultdict(list)
        for path in sorted(glob.glob(os.path.join(SEEDS_DIR, "*.json"))):
            try:
                with open(path, encoding="utf-8") as f:
                    s = expand_seed(json.load(f))
                s["file"] = os.path.basename(path)
                self.seeds[s["phase"]].append(s)
            except (OSError, ValueError, KeyError) as e:
                print("warning: seed %s ignored: %s" % (path, e), file=sys.stderr)

    # -- definitions -------------------------------------------------------
    def definition_parts(self, rng, allow_mutation=True):
        """(name, event, target, conditions_text, actions_text)."""
        seed = None
        if allow_mutation and self.seeds["definitions"] and rng.random() < 0.15:
            seed = rng.choice(self.seeds["definitions"])
        if seed:
            d = {"name": seed.get("name", "seed"), "event": seed.get("event"), "target": seed.get("target"),
                 "conditions": parse_seed_json(seed["conditions"]) if seed.get("conditions") is not None else None,
                 "actions": parse_seed_json(seed["actions"]) if seed.get("actions") is not None else None}
            raw_c = seed.get("conditions")
            raw_a = seed.get("actions")
        else:
            d = gen_definition(rng)
            raw_c = raw_a = None
        nmut = 0 if not allow_mutation else rng.choice([0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 5])
        for _ in range(nmut):
            which = rng.random()
            if which < 0.45 and d["actions"] is not None:
                d["actions"] = mutate_tree(rng, d["actions"])
                raw_a = None
            elif which < 0.75 and d["conditions"] is not None:
                d["conditions"] = mutate_tree(rng, d["conditions"])
                raw_c = None
            elif which < 0.85:
                d["event"] = rng.choice(BAD_EVENTS + EVENTS + [None])
            elif which < 0.93:
                d["target"] = rng.choice([None, "", "won", "3", "Preventivo", hostile_string(rng)])
            else:
                d["name"] = rng.choice([None, "", " ", hostile_string(rng)])
        ascii_only = rng.random() < 0.3
        cond = raw_c if raw_c is not None else (None if d["conditions"] is None else dumps(d["conditions"], ascii_only))
        acts = raw_a if raw_a is not None else (None if d["actions"] is None else dumps(d["actions"], ascii_only))
        # several big mutations can pile up: keep one statement under ~1 MB
        if acts is not None and len(acts) > MAX_JSON:
            acts = acts[:MAX_JSON]
        if cond is not None and len(cond) > MAX_JSON:
            cond = cond[:MAX_JSON]
        if allow_mutation and rng.random() < 0.06:
            if rng.random() < 0.6 and acts is not None:
                acts = mutate_text(rng, acts)
            elif cond is not None:
                cond = mutate_text(rng, cond)
        return d["name"], d["event"], d["target"], cond, acts

    def definitions(self, i):
        rng = case_rng(self.seed, "definitions", i)
        if rng.random() < 0.0001:
            return Case("definitions", i, self.wide_definition(rng))
        name, event, target, cond, acts = self.definition_parts(rng)
        if rng.random() < 0.9:
            if cond is None and rng.random() < 0.5:
                sql = "SELECT nocrm.check_automation(%s, %s, %s, NULL, %s)" % (lit(name), lit(event), lit(target), jlit(acts))
            else:
                sql = "SELECT nocrm.check_automation(%s, %s, %s, %s, %s)" % (
                    lit(name), lit(event), lit(target), jlit(cond if cond is not None else "{}"), jlit(acts))
        elif rng.random() < 0.5:
            return Case("definitions", i, self.options_sql(rng, name, event, target, cond, acts))
        else:
            ins = ("INSERT INTO nocrm.automations (name, event, target, conditions, actions, mode) "
                   "VALUES (%s, %s, %s, %s, %s, %s)" % (lit(name), lit(event), lit(target),
                                                        jlit(cond if cond is not None else "{}"), jlit(acts),
                                                        lit(rng.choice(["live", "test"]))))
            if name and name.strip(" \t\r\n") and event is not None and acts is not None:
                # differential: the function and the table's trigger must agree
                chk = "SELECT nocrm.check_automation(%s, %s, %s, %s, %s)" % (
                    lit(name), lit(event), lit(target), jlit(cond if cond is not None else "{}"), jlit(acts))
                sql = "SELECT fuzz.same_verdict(%s, %s)" % (lit(chk), lit(ins))
            else:
                sql = ins
        return Case("definitions", i, sql)

    @staticmethod
    def options_sql(rng, name, event, target, cond, acts):
        """The option columns (position, stop_processing, once_per_lead, at_most_every,
        on_creation, date_offset) in an INSERT, then an UPDATE or set_automation_options."""
        opts = gen_options(rng, event, rng.random() < 0.5)
        cols = ["name", "event", "target", "conditions", "actions"] + list(opts)
        vals = [lit(name), lit(event), lit(target), jlit(cond if cond is not None else "{}"), jlit(acts)] + \
            list(opts.values())
        sql = "INSERT INTO nocrm.automations (%s) VALUES (%s);" % (", ".join(cols), ", ".join(vals))
        cur = "currval(pg_get_serial_sequence('nocrm.automations', 'id'))"
        r = rng.random()
        if r < 0.4:
            upd = gen_options(rng, rng.choice(EVENTS), False)
            if rng.random() < 0.3:
                upd["event"] = lit(rng.choice(EVENTS + BAD_EVENTS))
            if rng.random() < 0.3:
                upd["target"] = lit(rng.choice(DATE_COLUMNS + BAD_DATE_TARGETS + STATUSES + [None]))
            if rng.random() < 0.2:
                upd["enabled"] = rng.choice(["true", "false", "NULL"])
            if upd:
                sql += " UPDATE nocrm.automations SET %s WHERE id = %s;" % (
                    ", ".join("%s = %s" % kv for kv in upd.items()), cur)
        elif r < 0.7:
            args = []
            for k, v in gen_options(rng, event, rng.random() < 0.5).items():
                if k != "date_offset":
                    args.append('"%s" => %s%s' % (k, v, "::int" if k == "position" else ""))
            sql += " SELECT nocrm.set_automation_options(%s%s);" % (
                rng.choice([cur + "::int", "0", "-1", "2147483647", "NULL"]) if rng.random() < 0.1 else cur + "::int",
                "".join(", " + a for a in args))
        elif r < 0.9:
            sql += " SELECT nocrm.set_date_offset(%s::int, %s);" % (
                cur, lit(rng.choice(DATE_OFFSETS + BAD_DATE_OFFSETS)) if rng.random() < 0.95 else "NULL")
        return sql

    @staticmethod
    def wide_definition(rng):
        """A list argument with tens of thousands of distinct elements (cost of per-list checks)."""
        n = rng.choice([30_000, 60_000, 120_000])
        items = ["t%d" % k for k in range(n)]
        where = rng.choice(["tags", "has_tag", "lacks_tag", "channels"])
        if where == "tags":
            acts, cond = [{"type": rng.choice(["add_tags", "remove_tags"]), "tags": items}], {}
        elif where == "channels":
            acts, cond = [{"type": "notify", "user": 1, "message": "x", "channels": items}], {}
        else:
            acts, cond = [{"type": "add_tags", "tags": "x"}], {where: items}
        return "SELECT nocrm.check_automation('wide', 'lead.creation', NULL, %s, %s)" % (
            jlit(json.dumps(cond)), jlit(json.dumps(acts)))

    # -- stage triggers ----------------------------------------------------
    def stage(self, i):
        rng = case_rng(self.seed, "stage", i)
        kinds = ["owner_changed", "field_changed", "status_changed", "tag_added", "comment_added",
                 "email_received", "custom"]
        kind = rng.choice(kinds) if rng.random() < 0.9 else rng.choice(
            ["", "Custom", "field", None, hostile_string(rng)])
        params = {}
        if kind == "field_changed" and rng.random() < 0.8:
            params["field"] = rng.choice(["title", "amount", "description", "user_id", "status", "probability",
                                          "contact_email", "next_action_at", "id", "step_id", "updated_at",
                                          "nope", "", "Title", "title; DROP", "xmin", "ctid", "tableoid"])
        elif kind == "status_changed" and rng.random() < 0.8:
            params["status"] = rng.choice(STATUSES + BAD_STATUSES)
        elif kind == "tag_added" and rng.random() < 0.8:
            params["tag"] = rng.choice(TAGS) if rng.random() < 0.7 else hostile_string(rng)
        elif kind == "custom":
            if rng.random() < 0.9:
                params["code"] = rng.choice(["invoice_paid", "a.b:c-d_1", "x" * 100, "x" * 101, "a b", "",
                                             "é", "paid\n", "a" * rng.randint(1, 120)])
        params_v = params
        for _ in range(rng.choice([0, 0, 1, 2])):
            params_v = mutate_tree(rng, params_v)
        ptext = dumps(params_v, rng.random() < 0.3)
        if rng.random() < 0.05:
            ptext = mutate_text(rng, ptext)
        seed = self.seeds["stage"] and rng.random() < 0.1 and rng.choice(self.seeds["stage"])
        if seed:
            kind = seed.get("kind")
            ptext = seed.get("params") or "{}"
            if rng.random() < 0.7:
                ptext = mutate_text(rng, ptext)
        step = rng.choice([1, 2, 3, 4, 5, 6]) if rng.random() < 0.9 else rng.choice(
            ["7", "0", "NULL", "-1", "9223372036854775807", "9223372036854775808", "'3'", "'x'"])
        cols = "step_id, kind, params"
        vals = "%s, %s, %s" % (step, lit(kind), "NULL" if rng.random() < 0.02 else jlit(ptext))
        if rng.random() < 0.3:
            cols += ", allow_backward, name"
            vals += ", %s, %s" % (rng.choice(["true", "false", "NULL"]), lit(hostile_string(rng)))
        sql = "INSERT INTO nocrm.stage_triggers (%s) VALUES (%s)" % (cols, vals)
        if rng.random() < 0.1:
            sql += "; UPDATE nocrm.stage_triggers SET params = %s WHERE id = currval(pg_get_serial_sequence('nocrm.stage_triggers', 'id'))" % jlit(
                dumps(mutate_tree(rng, dict(params))))
        return Case("stage", i, sql)

    # -- templates ---------------------------------------------------------
    @staticmethod
    def template_text(rng, subject=False):
        parts = []
        for _ in range(rng.choice([0, 1, 2, 3, 5, 8])):
            r = rng.random()
            if r < 0.3:
                parts.append(random_text(rng, rng.randint(1, 25)))
            elif r < 0.6:
                parts.append("{{" + " " * rng.choice([0, 0, 1, 3]) + rng.choice(PLACEHOLDERS) +
                             " " * rng.choice([0, 0, 1, 3]) + "}}")
            elif r < 0.7:
                parts.append("{{" + rng.choice(BAD_PLACEHOLDERS + [random_text(rng, 5)]) + "}}")
            elif r < 0.8:
                parts.append(rng.choice(["{{", "}}", "{", "}", "{{{", "}}}", "{ {", "{{}}", "{{ }}", "\r\n", "\n"]))
            elif r < 0.9:
                # unclosed placeholder followed by multi-byte text (error detail cut at 20 bytes)
                parts.append("{{" + random_text(rng, rng.randint(0, 3)) +
                             rng.choice(["é", "日", "😀", "ü"]) * rng.randint(5, 30))
            else:
                parts.append(hostile_string(rng))
        t = "".join(parts)
        if rng.random() < 0.02:
            t = long_text(rng, rng.choice([10_000, 100_000]))
        if subject and rng.random() < 0.7:
            t = t.replace("\r", "").replace("\n", "")
        return t

    def templates(self, i):
        rng = case_rng(self.seed, "templates", i)
        bad = False
        seed = self.seeds["templates"] and rng.random() < 0.1 and rng.choice(self.seeds["templates"])
        if seed:
            name, subject, body = seed.get("name"), seed.get("subject"), seed.get("body")
            if rng.random() < 0.5 and body is not None:
                body = mutate_text(rng, body)
        else:
            name = rng.choice(["quote_followup", "notification", "", "  ", None, hostile_string(rng)]) \
                if rng.random() < 0.1 else "t%d" % rng.randint(0, 10 ** 9)
            subject = None if rng.random() < 0.01 else self.template_text(rng, subject=True)
            body = None if rng.random() < 0.01 else self.template_text(rng)
        vals = [lit(name), lit(subject), lit(body)]
        if rng.random() < 0.02:
            vals[rng.randint(0, 2)] = bad_bytes_expr(rng)
            bad = True
        r = rng.random()
        if r < 0.75:
            sql = "INSERT INTO nocrm.email_templates (name, subject, body) VALUES (%s)" % ", ".join(vals)
        elif r < 0.9:
            sql = ("INSERT INTO nocrm.email_templates (name, subject, body) VALUES (%s) "
                   "ON CONFLICT (name) DO UPDATE SET subject = EXCLUDED.subject, body = EXCLUDED.body"
                   % ", ".join(vals))
        else:
            sql = "UPDATE nocrm.email_templates SET subject = %s, body = %s WHERE name = %s" % (
                vals[1], vals[2], lit(rng.choice(["quote_followup", "notification", "hostile"])))
        return Case("templates", i, sql, bad_bytes=bad)

    # -- render ------------------------------------------------------------
    @staticmethod
    def context_value(rng):
        r = rng.random()
        if r < 0.6:
            return hostile_string(rng)
        if r < 0.7:
            return rng.choice([True, False, None])
        if r < 0.8:
            return rng.choice([0, 1, -7, 42, 10 ** 6])
        if r < 0.9:
            return rng.choice([[], {}, ["a"], {"a": "b"}])
        return long_text(rng, rng.choice([1000, 100_000]))

    @staticmethod
    def alias_array(rng):
        """
        A JSON array of strings laid out so that reading it as if it were an
        object finds a placeholder name: exercises callers that look keys up in
        a container without checking it is an object.
        """
        key = rng.choice([p for p in PLACEHOLDERS if len(p) > 8])
        kbytes = key.encode()
        k = len(kbytes)
        jentry = rng.choice([b"abc0", b"abc@", b"abcP", b"   \x01", b"\x01\x01\x01\x01", b"zzz\x02"])
        for n in range(3, 300):
            mid = n // 2
            pos = 4 * n + k * mid
            total = k * n
            if pos + k > total or 4 * mid + 4 > total:
                continue
            jb = 4 * mid
            if not (jb + 4 <= pos or jb >= pos + k):
                continue
            data = bytearray(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(total))
            data[pos:pos + k] = kbytes
            data[jb:jb + 4] = jentry
            return Raw(json.dumps([data[o:o + k].decode("latin-1") for o in range(0, total, k)]))
        return Raw("[]")

    def render(self, i):
        rng = case_rng(self.seed, "render", i)
        if rng.random() < 0.25:
            return self.render_template_case(rng, i)
        text = Generator.template_text(rng)
        seed = self.seeds["render"] and rng.random() < 0.05 and rng.choice(self.seeds["render"])
        oracle = False
        r = rng.random()
        if seed:
            text = seed.get("text", text)
            ctx_text = seed.get("context")
            if rng.random() < 0.5:
                text = mutate_text(rng, text)
            if ctx_text is not None and rng.random() < 0.7:
                ctx_text = mutate_text(rng, ctx_text)
        elif r < 0.85:
            keys = PLACEHOLDERS + BAD_PLACEHOLDERS + [" lead.title", "lead.title "]
            pairs = [(rng.choice(keys), self.context_value(rng)) for _ in range(rng.randint(0, 12))]
            # names the text uses, most of the time
            for name in placeholder_names(text):
                if rng.random() < 0.7:
                    pairs.append((name, self.context_value(rng)))
            rng.shuffle(pairs)
            ctx = Dup(pairs)
            ctx_text = dumps(ctx, rng.random() < 0.3)
            oracle = all(isinstance(v, (str, bool)) or v is None or isinstance(v, (list, dict)) or
                         (isinstance(v, int) and not isinstance(v, bool)) for _, v in pairs)
            if rng.random() < 0.05:
                ctx_text = mutate_text(rng, ctx_text)
                oracle = False
            if oracle:
                expected = oracle_render(text, pairs)
                if len(expected) > 2_000_000:
                    oracle = False
        elif r < 0.9:
            ctx_text = None
            oracle = True
            expected = oracle_render(text, None)
        else:
            # not an object: every placeholder renders empty
            if r < 0.998:
                ctx_text = dumps(rng.choice([[], [1, 2], ["lead.title", "x"], "lead.title", 1, None, True,
                                             [rng.choice(PLACEHOLDERS) for _ in range(rng.randint(1, 40))],
                                             [{"lead.title": "x"}], random_value(rng)]))
            else:
                ctx_text = dumps(self.alias_array(rng))
            oracle = True
            expected = oracle_render(text, [])
        bad = False
        targ = lit(text)
        if rng.random() < 0.01:
            targ = bad_bytes_expr(rng)
            bad = True
            oracle = False
        if oracle:
            sql = ("SELECT CASE WHEN nocrm.render(%s, %s) IS DISTINCT FROM %s "
                   "THEN fuzz.fail('nocrm.render differs from the oracle') END" % (targ, jlit(ctx_text), lit(expected)))
        else:
            sql = "SELECT convert_to(nocrm.render(%s, %s), 'UTF8')" % (targ, jlit(ctx_text))
        return Case("render", i, sql, bad_bytes=bad, oracle=oracle)

    def render_template_case(self, rng, i):
        name = rng.choice(["quote_followup", "notification", "hostile", "hostile_all", "nope", "", None])
        lead = rng.choice(["1", "2", "3", "5", "10", "20", "0", "-1", "NULL", "999999",
                           "9223372036854775807", "-9223372036854775808"])
        msg = rng.choice([None, hostile_string(rng), gen_message(rng)])
        pre = ""
        if rng.random() < 0.3:
            name = "tt%d" % rng.randint(0, 10 ** 6)
            ins = "INSERT INTO nocrm.email_templates (name, subject, body) VALUES (%s, %s, %s);" % (
                lit(name), lit(Generator.template_text(rng, subject=True)), lit(Generator.template_text(rng)))
            tag = dollar_tag(ins, "t")
            # a refused template is fine here: render_template then reports 42704
            pre = "DO %s BEGIN %s EXCEPTION WHEN invalid_parameter_value THEN NULL; END %s; " % (tag, ins, tag)
        sql = pre + "SELECT convert_to(r.subject || r.body, 'UTF8') FROM nocrm.render_template(%s, %s, %s) r" % (
            lit(name), lead, lit(msg))
        return Case("render", i, sql)

    # -- hostile leads -----------------------------------------------------
    @staticmethod
    def lead_text(rng, big_p=0.02):
        r = rng.random()
        if r < big_p:
            return long_text(rng, rng.choice([100_000, 1_000_000]))
        return hostile_string(rng)

    def lead_values(self, rng):
        """column -> SQL expression, and whether invalid bytes were attempted."""
        cols = collections.OrderedDict()
        bad = False
        title = self.lead_text(rng)
        if not title.strip(" \t\r\n") and rng.random() < 0.8:
            title = "T " + title
        cols["title"] = lit(title)
        if rng.random() < 0.7:
            cols["description"] = lit(self.lead_text(rng, 0.03))
        if rng.random() < 0.7:
            cols["contact_email"] = lit(rng.choice([
                "client@example.com", "a@b", "x\r\n@y", "a@b\r\nBcc: evil@example.com", "<a@b>", "a@b, c@d",
                "ü@ä.de", "@", "a@", "\"quoted\"@example.com", "a" * 300 + "@example.com", "",
                "{{lead.title}}@example.com", hostile_string(rng)]))
        if rng.random() < 0.5:
            cols["status"] = lit(rng.choice(STATUSES) if rng.random() < 0.95 else rng.choice(BAD_STATUSES))
        if rng.random() < 0.6:
            cols["user_id"] = rng.choice(["1", "2", "3", "4", "NULL", "0"] if rng.random() < 0.97 else ["99", "-1"])
        if rng.random() < 0.5:
            p, s = rng.choice([("1", "NULL"), ("1", "2"), ("2", "5"), ("2", "6"), ("1", "4"), ("NULL", "3"),
                               ("1", "5"), ("3", "NULL")])
            cols["pipeline_id"], cols["step_id"] = p, s
        if rng.random() < 0.4:
            cols["amount"] = rng.choice(["0", "12.50", "'1e5'", "'NaN'", "-1", "1e20", "'Infinity'",
                                         "123456789012.345", "'abc'"])
        if rng.random() < 0.3:
            cols["probability"] = rng.choice(["0", "50", "100", "101", "-5"])
        if rng.random() < 0.3:
            cols["next_action_at"] = rng.choice(["now() + interval '1 day'", "'infinity'", "'-infinity'",
                                                 "'epoch'", "'294277-01-01'", "'garbage'", "'2024-02-30'"])
        if rng.random() < 0.02:
            col = rng.choice([c for c in ("title", "description", "contact_email") if c in cols])
            cols[col] = bad_bytes_expr(rng)
            bad = True
        return cols, bad

    def random_automation_sql(self, rng):
        """A generated (unmutated) automation, stored unless its definition is refused."""
        name, event, target, cond, acts = self.definition_parts(rng, allow_mutation=False)
        body = ("INSERT INTO nocrm.automations (name, event, target, conditions, actions, mode) "
                "VALUES (%s, %s, %s, %s, %s, %s);" % (lit(name), lit(event), lit(target),
                                                      jlit(cond if cond is not None else "{}"), jlit(acts),
                                                      lit("test" if rng.random() < 0.25 else "live")))
        tag = dollar_tag(body, "d")
        # also the JSON text's own refusals: generated field conditions carry odd numbers
        return ("DO %s BEGIN %s EXCEPTION WHEN invalid_parameter_value OR undefined_object OR undefined_column "
                "OR invalid_datetime_format OR not_null_violation OR check_violation OR invalid_text_representation "
                "OR untranslatable_character OR numeric_value_out_of_range OR datetime_field_overflow "
                "OR statement_too_complex THEN NULL; END %s; " % (tag, body, tag))

    def leads(self, i):
        rng = case_rng(self.seed, "leads", i)
        stmts = []
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            stmts.append(self.random_automation_sql(rng))
        cols, bad = self.lead_values(rng)
        seed = self.seeds["leads"] and rng.random() < 0.1 and rng.choice(self.seeds["leads"])
        if seed:
            for k, v in seed["fields"].items():
                cols[k] = lit(v) if isinstance(v, str) else str(v)
        stmts.append("INSERT INTO nocrm.leads (%s) VALUES (%s);" % (", ".join(cols), ", ".join(cols.values())))
        cur = "currval('nocrm.leads_id_seq')"
        if rng.random() < 0.5:
            upd, bad2 = self.lead_values(rng)
            bad = bad or bad2
            keep = [c for c in upd if rng.random() < 0.5] or ["description"]
            sets = ", ".join("%s = %s" % (c, upd.get(c, lit(self.lead_text(rng)))) for c in keep)
            stmts.append("UPDATE nocrm.leads SET %s WHERE id = %s;" % (sets, cur))
        if rng.random() < 0.2:
            stmts.append("INSERT INTO nocrm.tags (lead_id, name) VALUES (%s, %s);" % (
                cur, lit(rng.choice(TAGS + ["hostile", "x\r\ny", hostile_string(rng) or "t"]))))
        if rng.random() < 0.2:
            stmts.append("INSERT INTO nocrm.comments (lead_id, user_id, body) VALUES (%s, %s, %s);" % (
                cur, rng.choice(["1", "2", "NULL"]), lit(self.lead_text(rng))))
        if rng.random() < 0.1:
            stmts.append("INSERT INTO nocrm.emails (lead_id, from_address, subject, body) VALUES (%s, %s, %s, %s);" % (
                cur, lit(rng.choice(["a@b", hostile_string(rng)])), lit(hostile_string(rng)), lit(self.lead_text(rng))))
        if rng.random() < 0.1:
            stmts.append("SELECT nocrm.fire_trigger(%s, %s);" % (cur, lit(rng.choice(["paid", "invoice_paid", hostile_string(rng)]))))
        if rng.random() < 0.1:
            ev = rng.choice(EVENTS)
            target = {"lead.status.changed.to": rng.choice(STATUSES),
                      "lead.step.changed.to": str(rng.randint(1, 6))}.get(ev)
            stmts.append("SELECT count(*) FROM nocrm.explain(%s, %s, %s);" % (cur, lit(ev), lit(target)))
        if rng.random() < 0.25:
            stmts.append("DELETE FROM nocrm.leads WHERE id = %s;" % cur)
        stmts.append("SELECT fuzz.lead_invariants();")
        return Case("leads", i, " ".join(stmts), bad_bytes=bad)


    # -- rules: many valid field/group/date rules, hostile leads, ALTER TABLE --
    READ_COLUMNS = ["fz_kind", "fz_doc", "fz_tags", "fz_code", "fz_money", "fz_day", "fz_ts", "fz_flag",
                    "fz_n", "fz_f", "amount", "probability", "contact_email", "next_action_at", "closed_at"]

    @staticmethod
    def anchor_rules_sql():
        """One committed, live rule reading each READ_COLUMNS column (their drops must be refused)."""
        out = []
        for n, col in enumerate(Generator.READ_COLUMNS):
            kind = FIELD_COLUMNS[col]
            if kind in ("ts", "date") and n % 2:
                ev, tgt, cond = "lead.date.reached", col, {"field": col, "op": "is_not_empty"}
            else:
                ev, tgt = ["lead.creation", "lead.any_update", "lead.content_has_changed"][n % 3], None
                cond = {"any": [{"field": col, "op": "is_not_empty"},
                                {"not": {"field": col, "op": "is_empty"}}]}
            acts = [{"type": "add_tags", "tags": ["anchor-%s" % col]},
                    {"type": "notify", "user": 1, "message": "{{lead.title}} %s" % col}]
            out.append("SELECT nocrm.create_automation(name => %s, event => %s, target => %s, "
                       "conditions => %s, actions => %s);" % (lit("anchor " + col), lit(ev), lit(tgt),
                                                             jlit(json.dumps(cond)), jlit(json.dumps(acts))))
        return "\n".join(out) + "\n"

    def valid_rule_sql(self, rng, name_prefix="fz"):
        """A valid new-style rule with options, in a DO block (a refusal is swallowed)."""
        d = gen_new_definition(rng, valid=True)
        opts = gen_options(rng, d["event"], True)
        cols = ["name", "event", "target", "conditions", "actions", "mode"] + list(opts)
        vals = [lit("%s %s" % (name_prefix, d["name"])), lit(d["event"]), lit(d["target"]),
                jlit(dumps(d["conditions"])), jlit(dumps(d["actions"])),
                lit("test" if rng.random() < 0.15 else "live")] + list(opts.values())
        body = "INSERT INTO nocrm.automations (%s) VALUES (%s);" % (", ".join(cols), ", ".join(vals))
        tag = dollar_tag(body, "r")
        # 22023/42703/42704 (definition refused) and 22007/22008 (interval): the rule is left out
        return ("DO %s BEGIN %s EXCEPTION WHEN invalid_parameter_value OR undefined_column OR undefined_object "
                "OR invalid_datetime_format OR datetime_field_overflow THEN NULL; END %s;" % (tag, body, tag))

    def committed_rules_sql(self, n=80):
        rng = random.Random("%s:committed-rules" % self.seed)
        return "\n".join(self.valid_rule_sql(rng, "committed") for _ in range(n)) + "\n"

    # column kind -> (values the column takes, values it refuses)
    EXTREMES = {
        "fz_code": (["'abcde'", "''", "'é日本語x'", "'a''b'", "'12345'"], ["'abcdef'"]),
        "fz_money": (["0", "'NaN'", "9999999999.99", "0.005", "'1e3'", "12.5"], ["-1", "99999999999", "'-NaN'"]),
        "numeric": (["0", "12.50", "'NaN'", "999999999999.99", "0.001", "10000", "25000", "'1e3'"],
                    ["-1", "1e20", "'Infinity'", "'abc'"]),
        "float": (["'NaN'", "'Infinity'", "'-Infinity'", "1e308", "-1e308", "'-0'", "1.5", "0"],
                  ["'1e309'", "'1e-400'"]),
        "int": (["0", "50", "100", "1"], ["101", "-5", "2147483648"]),
        "user_id": (["1", "2", "3", "4", "NULL"], ["99"]),
        "bigint": (["9223372036854775807", "-9223372036854775808", "0", "1"], ["9223372036854775808"]),
        "bool": (["true", "false", "'yes'"], ["'maybe'"]),
        "ts": (["now()", "now() + interval '1 day'", "now() - interval '3 days'", "'infinity'", "'-infinity'",
                "'294276-12-31 23:59:59'", "'4713-01-01 BC'", "'epoch'", "now() + interval '14 days'",
                "now() + interval '100000 years'", "'0001-01-01'", "now() - interval '6000 years'"],
               ["'294277-01-01'", "'2024-02-30'"]),
        "date": (["current_date", "current_date + 3", "current_date - 30", "'infinity'", "'-infinity'",
                  "'5874897-12-31'", "'294276-12-31'", "'294277-01-01'", "'4713-01-01 BC'", "'4714-11-24 BC'"],
                 ["'2024-02-30'", "'5874898-01-01'"]),
        "enum": (["'cold'", "'warm'", "'hot'"], ["'bogus'", "''"]),
        "jsonb": (["'{\"a\": [1, {\"b\": null}]}'", "'null'", "'\"x\"'", "'[]'", "'{}'", "'1e1000'",
                   "'" + "[" * 500 + "]" * 500 + "'"], ["'{\"a\": \"\\u0000\"}'", "'{'"]),
        "array": (["'{}'", "'{NULL}'", "'{\"a,b\",\"\"}'", "ARRAY[]::text[]", "ARRAY['x', NULL]", "'{{a},{b}}'"],
                  ["'{'"]),
    }

    @staticmethod
    def extreme_value(rng, col, bad_p=0.02):
        kind = FIELD_COLUMNS[col]
        bad = rng.random() < bad_p
        if col == "title":
            return rng.choice(["NULL", "''", "' '"]) if bad else lit("T " + hostile_string(rng)[:200])
        if rng.random() < 0.15 and col not in ("status", "created_at", "updated_at"):
            return "NULL"
        if col == "status":
            return lit(rng.choice(BAD_STATUSES) if bad else rng.choice(STATUSES))
        if col in ("pipeline_id", "step_id"):
            return rng.choice(["1", "2", "3", "4", "5", "6", "7"])
        if kind == "text" and col != "fz_code":
            return lit(hostile_string(rng)[:2000])
        good, worse = Generator.EXTREMES.get(col) or Generator.EXTREMES[kind]
        return rng.choice(worse if bad else good)

    def lead_row(self, rng, cols=None, bad_p=0.02):
        cols = cols or ["title"] + [c for c in FIELD_COLUMNS if c not in ("id", "title", "created_at", "updated_at")
                                    and rng.random() < 0.4]
        if "step_id" in cols and "pipeline_id" not in cols:
            cols.append("pipeline_id")
        pipeline, step = rng.choice([("1", "NULL"), ("1", "1"), ("1", "3"), ("1", "4"), ("2", "5"), ("2", "6"),
                                     ("NULL", "NULL")] + ([("1", "5")] if rng.random() < bad_p else []))
        vals = []
        for c in cols:
            if c == "pipeline_id":
                vals.append(pipeline)
            elif c == "step_id":
                vals.append(step)
            else:
                vals.append(self.extreme_value(rng, c, bad_p))
        return cols, vals

    def rules_op(self, rng, state):
        r = rng.random()
        cur = "currval('nocrm.leads_id_seq')"
        if r < 0.08:
            return "SET LOCAL nocrm.history = %s;" % rng.choice(["actions", "'all'", "'all'", "none"])
        if r < 0.26:
            cols, vals = self.lead_row(rng)
            state["inserted"] = True
            return "INSERT INTO nocrm.leads (%s) VALUES (%s);" % (", ".join(cols), ", ".join(vals))
        if r < 0.36:
            cols = ["title"] + [c for c in FIELD_COLUMNS if c not in ("id", "title", "created_at", "updated_at",
                                                                       "pipeline_id", "step_id") and rng.random() < 0.3]
            if rng.random() < 0.5:
                rows = [self.lead_row(rng, list(cols), 0.003)[1] for _ in range(rng.randint(2, 10))]
                state["inserted"] = True
                return "INSERT INTO nocrm.leads (%s) VALUES %s;" % (
                    ", ".join(cols), ", ".join("(%s)" % ", ".join(v) for v in rows))
            exprs = ["'bulk ' || g"] + [self.extreme_value(rng, c, 0.005) if rng.random() < 0.6 else
                                         {"numeric": "(g * 997 %% 30000)::numeric", "int": "g %% 101",
                                          "bigint": "g", "ts": "now() + g * interval '1 hour'",
                                          "date": "current_date + g", "bool": "g %% 2 = 0",
                                          "text": "'s' || (g %% 7)", "float": "g / 3.0",
                                          "enum": "(ARRAY['cold','warm','hot'])[1 + g %% 3]::fuzz.kind",
                                          "jsonb": "jsonb_build_object('g', g)",
                                          "array": "ARRAY['t' || g]"}[FIELD_COLUMNS[c]].replace("%%", "%")
                                         for c in cols[1:]]
            state["inserted"] = True
            return "INSERT INTO nocrm.leads (%s) SELECT %s FROM generate_series(1, %d) g;" % (
                ", ".join(cols), ", ".join(exprs), rng.choice([2, 10, 50]))
        if r < 0.52:
            cols = [c for c in FIELD_COLUMNS if c not in ("id", "created_at") and rng.random() < 0.25] or ["fz_kind"]
            if "step_id" in cols and "pipeline_id" not in cols:
                cols.remove("step_id")
            if "pipeline_id" in cols and "step_id" not in cols:
                cols.remove("pipeline_id")
            cols = cols or ["description"]
            _, vals = self.lead_row(rng, list(cols))
            sets = ", ".join("%s = %s" % (c, v) for c, v in zip(cols, vals))
            if state.get("inserted") and rng.random() < 0.5:
                where = "id = %s" % cur
            else:
                where = rng.choice(["true", "id %% %d = %d" % (rng.randint(2, 5), rng.randint(0, 1)),
                                    "id IN (1, 2, 3)", "status = 'todo'", "fz_kind IS NULL"])
            return "UPDATE nocrm.leads SET %s WHERE %s;" % (sets, where)
        if r < 0.58:
            if state.get("inserted") and rng.random() < 0.5:
                return "DELETE FROM nocrm.leads WHERE id = %s;" % cur
            return "DELETE FROM nocrm.leads WHERE %s;" % rng.choice(
                ["id %% %d = 0" % rng.randint(2, 7), "amount IS NULL AND id > 10", "fz_kind = 'hot'",
                 "title LIKE 'bulk%'"])
        if r < 0.68:
            return ("UPDATE nocrm.date_firings SET due_at = now() - interval %s WHERE state = 'pending'%s; "
                    "SELECT nocrm.fire_due_date_rules(%s);" % (
                        lit(rng.choice(["1 minute", "1 day", "1000 years"])),
                        rng.choice(["", " AND lead_id % 2 = 0"]), rng.choice(["100", "1", "1000", "0", "100", "1000"] + (["-1"] if rng.random() < 0.1 else []))))
        if r < 0.80:
            return self.alter_sql(rng, state)
        if r < 0.86:
            opts = gen_options(rng, rng.choice(EVENTS), rng.random() < 0.7)
            if not opts:
                opts = {"position": str(rng.randint(-5, 5))}
            return ("UPDATE nocrm.automations SET %s WHERE (name LIKE 'committed%%' OR name LIKE 'fz%%') "
                    "AND id %% %d = %d;" % (
                ", ".join("%s = %s" % kv for kv in opts.items()), rng.randint(2, 9), rng.randint(0, 1)))
        if r < 0.89:
            return ("UPDATE nocrm.automations SET enabled = NOT enabled WHERE name NOT LIKE 'anchor%%' "
                    "AND id %% %d = 0;" % rng.randint(2, 9))
        if r < 0.93:
            ev = rng.choice(EVENTS)
            tgt = {"lead.status.changed.to": rng.choice(STATUSES), "lead.step.changed.to": str(rng.randint(1, 6)),
                   "lead.date.reached": None, "lead.any_update": rng.choice(list(FIELD_COLUMNS) + [None])}.get(ev)
            lead = cur if state.get("inserted") else str(rng.randint(1, 40))
            return "SELECT count(*) FROM nocrm.explain(%s, %s, %s);" % (lead, lit(ev), lit(tgt))
        if r < 0.97:
            lead = cur if state.get("inserted") else str(rng.randint(1, 40))
            return "INSERT INTO nocrm.tags (lead_id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING;" % (
                lead, lit(rng.choice(TAGS)))
        return self.valid_rule_sql(rng)

    def alter_sql(self, rng, state):
        r = rng.random()
        n = state.setdefault("added", [])
        if r < 0.3:
            name = "fz_new_%d" % len(n)
            typ = rng.choice(["text", "numeric", "int", "date", "timestamptz", "boolean", "jsonb", "fuzz.kind",
                              "fuzz.money", "varchar(3)", "text[]", "bigint"])
            default = rng.choice(["", "", " DEFAULT NULL", {"text": " DEFAULT 'x'", "numeric": " DEFAULT 1",
                                                          "int": " DEFAULT 7", "date": " DEFAULT current_date",
                                                          "timestamptz": " DEFAULT now()",
                                                          "boolean": " DEFAULT true"}.get(typ, "")])
            n.append(name)
            return "ALTER TABLE nocrm.leads ADD COLUMN %s %s%s;" % (name, typ, default)
        if r < 0.6:
            col, typ = rng.choice([
                ("fz_code", "text"), ("fz_code", "varchar(2)"), ("fz_code", "int USING length(fz_code)"),
                ("fz_money", "numeric"), ("fz_money", "text"), ("fz_money", "int USING fz_money::int"),
                ("fz_f", "numeric USING fz_f::numeric"), ("fz_f", "real"), ("fz_n", "int"), ("fz_n", "text"),
                ("fz_day", "timestamptz"), ("fz_day", "text"), ("fz_ts", "timestamptz"), ("fz_ts", "date"),
                ("fz_kind", "text"), ("fz_doc", "json"), ("fz_doc", "text"), ("fz_tags", "text"),
                ("fz_flag", "int USING fz_flag::int"), ("fz_flag", "text"), ("amount", "numeric"),
                ("amount", "float8"), ("probability", "bigint"), ("probability", "text"),
                ("next_action_at", "timestamp"), ("next_action_at", "date"), ("contact_email", "varchar(10)"),
                ("closed_at", "timestamp"), ("closed_at", "text"), ("updated_at", "text"), ("updated_at", "date"), ("fz_spare", "int USING 0"), ("description", "varchar(3)")])
            return "ALTER TABLE nocrm.leads ALTER COLUMN %s TYPE %s;" % (col, typ)
        if r < 0.85:
            col = rng.choice(self.READ_COLUMNS)
            body = ("ALTER TABLE nocrm.leads DROP COLUMN %s; RAISE EXCEPTION 'drop of %s (read by a rule) was not "
                    "refused' USING ERRCODE = 'FZ004';" % (col, col))
            tag = dollar_tag(body, "x")
            return "DO %s BEGIN %s EXCEPTION WHEN dependent_objects_still_exist THEN NULL; END %s;" % (tag, body, tag)
        if n and rng.random() < 0.5:
            return "ALTER TABLE nocrm.leads DROP COLUMN %s;" % rng.choice(n)
        return "ALTER TABLE nocrm.leads %s;" % rng.choice([
            "DROP COLUMN fz_spare", "RENAME COLUMN fz_spare TO fz_spare2", "RENAME COLUMN fz_code TO fz_code2",
            "ALTER COLUMN fz_kind SET DEFAULT 'hot'", "ALTER COLUMN fz_code SET NOT NULL", "DROP COLUMN fz_kind CASCADE",
            "ADD CONSTRAINT fz_c CHECK (fz_n IS NULL OR fz_n > 0)", "DROP COLUMN IF EXISTS nope"])

    def oracle_cond(self, rng, depth=0):
        """Field conditions and groups only (no tags, no changed): what fuzz.cond_holds judges."""
        c = gen_field_cond(rng, "lead.creation", True)
        if c["op"] in ("contains", "starts_with") and not isinstance(c.get("value"), str):
            c["value"] = "a"
        if depth < 3:
            for g in ("all", "any", "not"):
                if rng.random() < 0.2:
                    c[g] = self.oracle_cond(rng, depth + 1) if g == "not" else \
                        [self.oracle_cond(rng, depth + 1) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.15 and depth == 0:
            c = {rng.choice(["all", "any"]): [c, self.oracle_cond(rng, 1)]}
        return c

    def oracle(self, i, rng):
        """A differential case: the engine's verdict (tag written by the rule, and explain)
        against the SQL meaning of the same field conditions."""
        cond = self.oracle_cond(rng)
        ctext = dumps(cond)
        stmts = ["UPDATE nocrm.automations SET enabled = false WHERE enabled;"]
        if rng.random() < 0.5:
            stmts.append("SET LOCAL nocrm.history = %s;" % rng.choice(["actions", "'all'", "none"]))
        stmts.append("INSERT INTO nocrm.automations (name, event, conditions, actions, position) VALUES "
                     "('oracle', 'lead.any_update', %s, '[{\"type\": \"add_tags\", \"tags\": [\"oracle-hit\"]}]', %d);"
                     % (jlit(ctext), rng.choice([0, -5, 2147483647])))
        if rng.random() < 0.5:
            cols, vals = self.lead_row(rng, bad_p=0)
            stmts.append("INSERT INTO nocrm.leads (%s) VALUES (%s);" % (", ".join(cols), ", ".join(vals)))
            cols = [c for c in cols if c not in ("title", "pipeline_id", "step_id", "status", "description")]
            upd = ["description = 'oracle ' || clock_timestamp()"]
            if cols and rng.random() < 0.7:
                c = rng.choice(cols)
                upd.append("%s = %s" % (c, self.extreme_value(rng, c, 0)))
            stmts.append("UPDATE nocrm.leads SET %s WHERE id = currval('nocrm.leads_id_seq');" % ", ".join(upd))
            stmts.append("SELECT fuzz.check_oracle(ARRAY[currval('nocrm.leads_id_seq')], %s, 'oracle');" % jlit(ctext))
        else:
            stmts.append("UPDATE nocrm.leads SET description = 'oracle ' || id WHERE id <= 60;")
            stmts.append("SELECT fuzz.check_oracle(ARRAY(SELECT id FROM nocrm.leads WHERE id <= 60 ORDER BY id), %s, "
                         "'oracle');" % jlit(ctext))
        return Case("rules", i, " ".join(stmts))

    def rules(self, i):
        rng = case_rng(self.seed, "rules", i)
        if rng.random() < 0.25:
            return self.oracle(i, rng)
        state = {}
        stmts = [self.valid_rule_sql(rng) for _ in range(rng.choice([0, 0, 1, 2]))]
        for _ in range(rng.randint(2, 8)):
            stmts.append(self.rules_op(rng, state))
        stmts.append("SELECT fuzz.lead_invariants();")
        return Case("rules", i, " ".join(stmts))

def placeholder_names(text, limit=50):
    """The trimmed names of the first {{placeholders}} of a text, scanned as templates.c does."""
    names = []
    pos = 0
    while len(names) < limit:
        o = text.find("{{", pos)
        if o < 0:
            break
        c = text.find("}}", o + 2)
        if c < 0:
            break
        names.append(text[o + 2:c].lstrip(" ").rstrip(" "))
        pos = c + 2
    return names


def oracle_render(text, pairs):
    """What nocrm.render(text, context) must return (one pass, no re-expansion)."""
    ctx = {}
    for k, v in (pairs or []):
        ctx[k] = v           # jsonb keeps the last of duplicate keys
    out = []
    pos = copied = 0
    while True:
        o = text.find("{{", pos)
        if o < 0:
            break
        c = text.find("}}", o + 2)
        if c < 0:
            break
        name = text[o + 2:c].lstrip(" ").rstrip(" ")
        out.append(text[copied:o])
        copied = pos = c + 2
        if name not in ctx:
            continue
        v = ctx[name]
        if isinstance(v, bool):
            out.append("true" if v else "false")
        elif isinstance(v, str):
            out.append(v)
        elif isinstance(v, int):
            out.append(str(v))
    out.append(text[copied:])
    return "".join(out)


# ---------------------------------------------------------------------------
# The throwaway server
# ---------------------------------------------------------------------------
def pg_bindir():
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
    if out.returncode == 0 and os.path.exists(os.path.join(out.stdout.strip(), "postgres")):
        return out.stdout.strip()
    return "/usr/lib/postgresql/15/bin"


class Server:
    def __init__(self, keep=False):
        self.bindir = pg_bindir()
        self.keep = keep
        self.tmp = tempfile.mkdtemp(prefix="nocrm_fuzz.")
        self.data = os.path.join(self.tmp, "data")
        self.sock = os.path.join(self.tmp, "sock")
        self.log = os.path.join(self.tmp, "server.log")
        self.log_pos = 0
        self.as_root = os.geteuid() == 0
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.tmp, pw.pw_uid, pw.pw_gid)
        os.mkdir(self.sock)
        if self.as_root:
            os.chown(self.sock, pw.pw_uid, pw.pw_gid)

    def pg(self, args, **kw):
        cmd = [os.path.join(self.bindir, args[0])] + args[1:]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--"] + cmd
        env = dict(os.environ, LANG="C.UTF-8", LC_ALL="C.UTF-8")
        return subprocess.run(cmd, env=env, cwd=self.tmp, **kw)

    def start(self):
        r = self.pg(["initdb", "-D", self.data, "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8", "-N",
                     "-U", "postgres"], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit("initdb failed:\n" + r.stdout + r.stderr)
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write("\n# nocrm fuzz harness\n"
                    "listen_addresses = ''\n"
                    "unix_socket_directories = '%s'\n"
                    "port = 5432\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                    "shared_buffers = 128MB\n"
                    "max_wal_size = 4GB\n"
                    "log_min_messages = log\n"          # keeps crash reports, drops ERROR noise
                    "log_min_error_statement = panic\n"
                    "log_line_prefix = '%%m [%%p] '\n"
                    "restart_after_crash = on\n" % self.sock)
        r = self.pg(["pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "120", "start"],
                    capture_output=True, text=True)
        if r.returncode:
            raise SystemExit("pg_ctl start failed:\n" + r.stdout + r.stderr + self.read_log_all())
        self.psql_file(FIXTURE, db="postgres", create_db=True)

    def psql_cmd(self, db="fuzz"):
        return [os.path.join(self.bindir, "psql"), "-X", "-q", "-h", self.sock, "-p", "5432", "-U",
                "postgres", "-d", db]

    def psql_file(self, path, db="postgres", create_db=False):
        if create_db:
            r = subprocess.run(self.psql_cmd("postgres") + ["-c", "CREATE DATABASE fuzz"],
                               capture_output=True, text=True)
            if r.returncode:
                raise SystemExit("CREATE DATABASE failed: " + r.stderr)
        r = subprocess.run(self.psql_cmd("fuzz") + ["-v", "ON_ERROR_STOP=1", "-f", path],
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit("loading %s failed:\n%s%s" % (path, r.stdout, r.stderr))

    def psql_sql(self, sql):
        r = subprocess.run(self.psql_cmd("fuzz") + ["-v", "ON_ERROR_STOP=1", "-At"], input=sql,
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit("setup SQL failed:\n%s\n%s" % (r.stderr, sql[:2000]))
        return r.stdout

    def postmaster_pid(self):
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def postmaster_alive(self):
        pid = self.postmaster_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False

    def ready(self, timeout=60):
        t0 = time.time()
        while time.time() - t0 < timeout:
            r = subprocess.run([os.path.join(self.bindir, "pg_isready"), "-h", self.sock, "-p", "5432", "-q"])
            if r.returncode == 0:
                return True
            time.sleep(0.2)
        return False

    def new_log(self):
        """Log lines written since the last call."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.log_pos)
                data = f.read()
                self.log_pos = f.tell()
            return data.decode("utf-8", "replace")
        except OSError:
            return ""

    def read_log_all(self):
        try:
            with open(self.log, "rb") as f:
                return f.read().decode("utf-8", "replace")[-5000:]
        except OSError:
            return ""

    def stop(self):
        self.pg(["pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop"], capture_output=True)
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


HARNESS_SQL = r"""
CREATE SCHEMA fuzz;
-- Columns of every kind for field conditions: an enum, a jsonb, a text[], a
-- varchar(5), a domain over numeric, and a few more (fz_spare is read by no rule).
CREATE TYPE fuzz.kind AS ENUM ('cold', 'warm', 'hot');
CREATE DOMAIN fuzz.money AS numeric(12,2) CHECK (VALUE >= 0);
ALTER TABLE nocrm.leads ADD COLUMN fz_kind fuzz.kind, ADD COLUMN fz_doc jsonb, ADD COLUMN fz_tags text[],
  ADD COLUMN fz_code varchar(5), ADD COLUMN fz_money fuzz.money, ADD COLUMN fz_day date,
  ADD COLUMN fz_ts timestamp, ADD COLUMN fz_flag boolean, ADD COLUMN fz_n bigint, ADD COLUMN fz_f float8,
  ADD COLUMN fz_spare text;
-- Runs one case; always rolls back; one line: @@R id sqlstate ms flags message | detail | context
CREATE FUNCTION fuzz.try(id bigint, q text) RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    t0 timestamptz := clock_timestamp();
    st text := '00000';
    msg text := '';
    det text;
    ctx text;
    flags text := '';
BEGIN
    BEGIN
        EXECUTE q;
        RAISE EXCEPTION 'fuzz rollback' USING ERRCODE = 'FZ000';
    EXCEPTION
        WHEN query_canceled THEN
            GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL,
                                    ctx = PG_EXCEPTION_CONTEXT;
        WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL,
                                    ctx = PG_EXCEPTION_CONTEXT;
    END;
    IF st = 'FZ000' THEN
        st := '00000'; msg := ''; det := NULL; ctx := NULL;
    ELSE
        -- Context left once the frames of fuzz.try's own EXECUTE are cut: the
        -- error was raised inside a trigger, an SPI statement or a function.
        ctx := regexp_replace(coalesce(ctx, ''), '\n?PL/pgSQL function fuzz\.try[^\n]*$', '');
        IF right(ctx, length(q) + 16) = 'SQL statement "' || q || '"' THEN
            ctx := left(ctx, length(ctx) - length(q) - 16);
        END IF;
        IF ctx ~ '\S' THEN
            flags := flags || 'C';
        END IF;
        -- error texts must be valid UTF-8 (clients decode them)
        BEGIN
            PERFORM convert_to(coalesce(msg, '') || coalesce(det, '') || coalesce(ctx, ''), 'UTF8');
        EXCEPTION WHEN OTHERS THEN
            flags := flags || 'U';
            msg := encode(textsend(msg), 'escape');
            det := encode(textsend(det), 'escape');
            ctx := encode(textsend(ctx), 'escape');
        END;
    END IF;
    RETURN '@@R' || E'\t' || id || E'\t' || st || E'\t'
        || round((extract(epoch FROM clock_timestamp() - t0) * 1000)::numeric, 3) || E'\t' || flags || E'\t'
        || translate(left(coalesce(msg, ''), 300) || ' | ' || left(coalesce(det, ''), 200) || ' | '
                     || left(coalesce(ctx, ''), 300),
                     E'\n\r\t', '   ');
END $fn$;

-- Runs two statements that must give the same verdict; raises the common
-- error, or FZ003 when they disagree.
CREATE FUNCTION fuzz.same_verdict(a text, b text) RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    sa text := '00000'; ma text := ''; sb text := '00000'; mb text := '';
BEGIN
    BEGIN
        EXECUTE a;
        RAISE EXCEPTION 'rollback' USING ERRCODE = 'FZ000';
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS sa = RETURNED_SQLSTATE, ma = MESSAGE_TEXT;
    END;
    BEGIN
        EXECUTE b;
        RAISE EXCEPTION 'rollback' USING ERRCODE = 'FZ000';
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS sb = RETURNED_SQLSTATE, mb = MESSAGE_TEXT;
    END;
    IF sa IS DISTINCT FROM sb OR (sa <> 'FZ000' AND ma IS DISTINCT FROM mb) THEN
        RAISE EXCEPTION 'verdicts differ: check_automation % (%), INSERT % (%)', sa, left(ma, 150), sb, left(mb, 150)
            USING ERRCODE = 'FZ003';
    END IF;
    IF sa <> 'FZ000' THEN
        RAISE EXCEPTION '%', ma USING ERRCODE = sa;
    END IF;
END $fn$;

-- Oracle of field conditions and groups (rules phase): what a condition object
-- holding only "field"/"op"/"value(s)" and all/any/not means, in plain SQL on
-- the lead's row, by the column's own type (docs/reference.md, Field conditions).
CREATE FUNCTION fuzz.cond_lit(v jsonb, typ text) RETURNS text LANGUAGE sql IMMUTABLE AS $fn$
    SELECT CASE WHEN jsonb_typeof(v) = 'object' THEN format('(now() + %L::interval)', v->>'now')
                ELSE format('%L::%s', v #>> '{}', typ) END
$fn$;
CREATE FUNCTION fuzz.cond_holds(lead bigint, c jsonb) RETURNS boolean LANGUAGE plpgsql AS $fn$
DECLARE
    col text := c->>'field';
    op text := c->>'op';
    typ text;
    istext boolean;
    x text;
    lits text;
    expr text;
    r boolean := true;
    sub jsonb;
BEGIN
    IF col IS NOT NULL THEN
        SELECT format_type(a.atttypid, NULL), t.typcategory = 'S' INTO typ, istext
          FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
         WHERE a.attrelid = 'nocrm.leads'::regclass AND a.attname = col AND NOT a.attisdropped;
        x := format('%I', col);
        IF op IN ('in', 'not_in') THEN
            SELECT string_agg(fuzz.cond_lit(e, typ), ', ') INTO lits
              FROM jsonb_array_elements(coalesce(c->'values', c->'value')) e;
        END IF;
        expr := CASE
            WHEN op IN ('=', '==', 'eq') THEN x || ' = ' || fuzz.cond_lit(c->'value', typ)
            WHEN op IN ('!=', '<>', 'ne') THEN x || ' <> ' || fuzz.cond_lit(c->'value', typ)
            WHEN op IN ('<', 'lt') THEN x || ' < ' || fuzz.cond_lit(c->'value', typ)
            WHEN op IN ('<=', 'le') THEN x || ' <= ' || fuzz.cond_lit(c->'value', typ)
            WHEN op IN ('>', 'gt') THEN x || ' > ' || fuzz.cond_lit(c->'value', typ)
            WHEN op IN ('>=', 'ge') THEN x || ' >= ' || fuzz.cond_lit(c->'value', typ)
            WHEN op = 'between' THEN x || ' BETWEEN ' || fuzz.cond_lit(c->'value'->0, typ) || ' AND '
                                     || fuzz.cond_lit(c->'value'->1, typ)
            WHEN op = 'in' THEN x || ' IN (' || lits || ')'
            WHEN op = 'not_in' THEN x || ' NOT IN (' || lits || ')'
            WHEN op = 'is_empty' THEN x || ' IS NULL' || CASE WHEN istext THEN ' OR ' || x || '::text = ''''' ELSE '' END
            WHEN op = 'is_not_empty' THEN x || ' IS NOT NULL' || CASE WHEN istext THEN ' AND ' || x || '::text <> ''''' ELSE '' END
            WHEN op = 'contains' THEN format('strpos(lower(%s), lower(%L)) > 0', x, c->>'value')
            WHEN op = 'starts_with' THEN format('starts_with(lower(%s), lower(%L))', x, c->>'value')
        END;
        IF expr IS NULL THEN
            RAISE EXCEPTION 'oracle: cannot judge %', c USING ERRCODE = 'FZ006';
        END IF;
        EXECUTE format('SELECT coalesce((%s), false) FROM nocrm.leads WHERE id = $1', expr) INTO r USING lead;
        r := coalesce(r, false);
    END IF;
    IF r AND c ? 'all' THEN
        FOR sub IN SELECT jsonb_array_elements(c->'all') LOOP
            r := r AND fuzz.cond_holds(lead, sub);
        END LOOP;
    END IF;
    IF r AND c ? 'any' THEN
        r := false;
        FOR sub IN SELECT jsonb_array_elements(c->'any') LOOP
            r := r OR fuzz.cond_holds(lead, sub);
        END LOOP;
    END IF;
    IF r AND c ? 'not' THEN
        r := NOT fuzz.cond_holds(lead, c->'not');
    END IF;
    RETURN r;
END $fn$;
-- The rule named rule_name (event lead.any_update, action: tag "oracle-hit")
-- must have tagged exactly the leads where its conditions hold, and explain()
-- must agree on the first lead.
CREATE FUNCTION fuzz.check_oracle(leads bigint[], cond jsonb, rule_name text) RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    l bigint;
    want boolean;
    tagged boolean;
    rsn text;
    val text;
BEGIN
    FOREACH l IN ARRAY leads LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM nocrm.leads WHERE id = l);
        want := fuzz.cond_holds(l, cond);
        tagged := EXISTS (SELECT 1 FROM nocrm.tags WHERE lead_id = l AND name = 'oracle-hit');
        IF want IS DISTINCT FROM tagged THEN
            EXECUTE format('SELECT (SELECT row_to_json(x)::text FROM nocrm.leads x WHERE id = %s)', l) INTO val;
            RAISE EXCEPTION 'oracle: the write path says %, SQL says % for lead %', tagged, want, l
                USING ERRCODE = 'FZ005', DETAIL = left(cond::text || ' on ' || val, 900);
        END IF;
        IF l = leads[1] THEN
            SELECT reason INTO rsn FROM nocrm.explain(l, 'lead.any_update') WHERE name = rule_name;
            IF (rsn IS NULL OR rsn NOT LIKE 'condition%') IS DISTINCT FROM want THEN
                EXECUTE format('SELECT (SELECT row_to_json(x)::text FROM nocrm.leads x WHERE id = %s)', l) INTO val;
                RAISE EXCEPTION 'oracle: explain says % (%), SQL says % for lead %', rsn IS NULL, rsn, want, l
                    USING ERRCODE = 'FZ005', DETAIL = left(cond::text || ' on ' || val, 900);
            END IF;
        END IF;
    END LOOP;
END $fn$;

CREATE FUNCTION fuzz.fail(msg text) RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION '%', msg USING ERRCODE = 'FZ002';
END $fn$;

-- What the lead phase checks after each case (inside its own transaction).
CREATE FUNCTION fuzz.lead_invariants() RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    bad text;
BEGIN
    SELECT 'notification ' || id || ' is ' || octet_length(message) || ' bytes' INTO bad
      FROM nocrm.notifications WHERE octet_length(message) > 4000 LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'invariant: %', bad USING ERRCODE = 'FZ001';
    END IF;
    PERFORM convert_to(string_agg(message, ''), 'UTF8') FROM nocrm.notifications;
    PERFORM convert_to(string_agg(payload::text || coalesce(recipient, ''), ''), 'UTF8') FROM nocrm.queue;
    PERFORM convert_to(string_agg(coalesce(detail, '') || coalesce(new_value::text, ''), ''), 'UTF8')
       FROM nocrm.lead_history;
END $fn$;
"""

# Data the render and lead phases use (committed before those phases).
HOSTILE_SETUP_SQL = r"""
INSERT INTO nocrm.email_templates (name, subject, body) VALUES
  ('hostile', '{{lead.title}} / {{owner.name}}', E'{{lead.description}}\n{{lead.contact_email}}\n{{message}}'),
  ('hostile_all', '{{lead.id}} {{lead.title}} {{lead.amount}} {{lead.status}} {{lead.probability}}',
   '{{lead.description}} {{lead.contact_email}} {{lead.pipeline}} {{lead.step}} {{lead.next_action_at}} {{lead.created_at}} {{owner.name}} {{owner.email}} {{butler.name}} {{butler.email}} {{user.name}} {{user.email}} {{automation.name}} {{event}} {{message}}');
INSERT INTO nocrm.working_hours (user_id, weekday, starts, ends)
  SELECT 2, d, '09:00', '17:00' FROM generate_series(1, 5) d;
INSERT INTO nocrm.absences (user_id, starts_at, ends_at, reason) VALUES (3, now() - interval '1 day', now() + interval '30 days', 'away');
"""

HOSTILE_AUTOMATIONS_SQL = r"""
SELECT nocrm.create_automation('hostile notify', 'lead.creation',
  '[{"type": "notify", "user": 1, "message": "New: {{lead.title}} / {{lead.description}} / {{lead.contact_email}}", "channels": ["browser", "email", "mobile"]}]');
SELECT nocrm.create_automation('hostile owner notify', 'lead.creation',
  '[{"type": "notify", "user": "owner", "message": "{{lead.title}}{{lead.title}}"}]');
SELECT nocrm.create_automation('hostile email', 'lead.creation',
  '[{"type": "send_email", "template": "hostile"}, {"type": "send_email", "template": "hostile_all", "to": "ops@example.com"}]');
SELECT nocrm.create_automation('hostile webhook', 'lead.creation', '[{"type": "webhook", "url": "https://hooks.example.com/crm"}]');
SELECT nocrm.create_automation('hostile comment', 'lead.creation', '[{"type": "comment", "body": "Auto: {{lead.title}}"}]');
SELECT nocrm.create_automation('hostile changed', 'lead.content_has_changed',
  '[{"type": "notify", "user": "owner", "message": "Changed: {{lead.title}} {{lead.description}}", "channels": ["browser", "email"]}, {"type": "webhook", "url": "http://127.0.0.1:9/changed"}]');
SELECT nocrm.create_automation('hostile any update', 'lead.any_update',
  '[{"type": "add_tags", "tags": ["hostile"]}]', conditions => '{"lacks_tag": "hostile"}');
SELECT nocrm.create_automation('hostile deleted', 'lead.deleted',
  '[{"type": "notify", "user": 2, "message": "Deleted {{lead.title}}: {{lead.description}}", "channels": ["browser", "email", "mobile"]}, {"type": "webhook", "url": "https://hooks.example.com/deleted"}, {"type": "send_email", "template": "hostile"}]');
SELECT nocrm.create_automation('hostile commented', 'lead.commented',
  '[{"type": "notify", "user": 4, "message": "Comment on {{lead.title}}"}]');
SELECT nocrm.create_automation('hostile test mode', 'lead.creation',
  '[{"type": "notify", "user": 1, "message": "{{lead.title}}"}, {"type": "send_email", "template": "hostile", "delay": "1 hour"}, {"type": "assign_round_robin", "users": [1, {"user": 2, "weight": 2}, 3], "only_working_hours": true}]',
  mode => 'test');
SELECT nocrm.create_automation('hostile delayed', 'lead.assigned',
  '[{"type": "notify", "user": "owner", "message": "later {{lead.title}}", "delay": "2 hours", "respect_working_hours": true}]');
SELECT nocrm.create_stage_trigger('2', 'field_changed', '{"field": "title"}');
SELECT nocrm.create_stage_trigger('3', 'tag_added', '{"tag": "hostile"}');
SELECT nocrm.create_stage_trigger('4', 'custom', '{"code": "paid"}');
SELECT nocrm.create_stage_trigger('3', 'comment_added', '{}', allow_backward => true);
"""


def committed_leads_sql(seed):
    """~20 committed hostile leads for render_template (before the automations exist)."""
    rng = random.Random("%s:committed-leads" % seed)
    rows = []
    for _ in range(20):
        title = hostile_string(rng)
        if not title.strip(" \t\r\n"):
            title = "T" + title
        rows.append("(%s, %s, %s, %s)" % (lit(title), lit(Generator.lead_text(rng, 0.1)),
                                          lit(rng.choice(["a@b", "x\r\ny@z", hostile_string(rng)])),
                                          rng.choice(["1", "2", "NULL"])))
    return "INSERT INTO nocrm.leads (title, description, contact_email, user_id) VALUES %s;\n" % ",\n".join(rows)


# ---------------------------------------------------------------------------
# The psql session
# ---------------------------------------------------------------------------
class Session:
    def __init__(self, server):
        self.server = server
        cmd = server.psql_cmd("fuzz") + ["-A", "-t", "-v", "ON_ERROR_STOP=0"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, bufsize=0)
        self.lines = queue.Queue()
        self.send_error = None
        self.errors = collections.deque(maxlen=200)
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()
        self.send("SET client_min_messages = error;\nSET statement_timeout = '%s';\n"
                  "SELECT '@@PID' || E'\\t' || pg_backend_pid();\n" % STATEMENT_TIMEOUT)
        line = self.lines.get(timeout=60)
        if line is None or not line.startswith(b"@@PID"):
            raise RuntimeError("psql session did not start: %r %r" % (line, list(self.errors)))
        self.pid = int(line.split(b"\t")[1])

    def _read_out(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip(b"\n"))
        self.lines.put(None)

    def _read_err(self):
        for line in self.proc.stderr:
            self.errors.append(line.decode("utf-8", "replace").rstrip())

    def send(self, text):
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:     # a harness bug, not a finding
            self.send_error = e
            self.lines.put(None)
            return False
        try:
            self.proc.stdin.write(data)
            return True
        except (BrokenPipeError, OSError):
            return False

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def kill(self):
        self.proc.kill()
        self.proc.wait()


def dollar_tag(body, base="q"):
    """A $tag$ that occurs nowhere in body, and not across its end either."""
    n = 0
    tag = "$%s$" % base
    while (body + tag).find(tag) != len(body):
        n += 1
        tag = "$%s%d$" % (base, n)
    return tag


def dollar_quote(sql):
    tag = dollar_tag(sql)
    return tag + sql + tag


def memory_sample(pid):
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "VmHWM"):
                    out[k] = int(v.split()[0])      # kB
    except OSError:
        pass
    return out


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------
def normalize(msg):
    m = msg.split(" | ")[0]
    m = re.sub(r'"[^"]*"', '"S"', m)
    m = re.sub(r"'[^']*'", "'S'", m)
    m = re.sub(r"\{\{.*?\}\}", "{{P}}", m)
    m = re.sub(r"\d+", "N", m)
    return m[:90]


class Runner:
    def __init__(self, args):
        self.args = args
        self.gen = Generator(args.seed)
        self.server = None
        self.session = None
        self.counts = {p: collections.Counter() for p in PHASES}
        self.ncases = collections.Counter()
        self.unexpected = []          # (phase, idx, code, flags, ms, msg)
        self.crashes = []             # (phase, idx, log excerpt)
        self.hangs = []
        self.max_ms = (0.0, None)
        self.mem = []                 # (phase, batch, session, VmRSS, RssAnon, contexts bytes)
        self.sessions = 0
        self.exemplars = {}           # signature -> list of (len, Case, code, msg)
        self.t0 = time.time()
        self.phase_time = {}
        self.setups = set()
        self.replayed = []
        self.leak = False
        self.in_extension = collections.Counter()   # rules phase: errors raised inside the extension
        self.in_extension_case = {}

    # -- server and session ------------------------------------------------
    def start(self):
        self.server = Server(keep=self.args.keep)
        self.server.start()
        self.server.psql_sql(HARNESS_SQL)
        self.server.new_log()

    def open_session(self):
        if self.session:
            self.session.close()
        self.session = Session(self.server)
        self.sessions += 1

    # -- classification ----------------------------------------------------
    def classify(self, case, code, flags, msg=""):
        if "U" in flags:
            return False
        if code == "00000":
            return True
        if case.bad_bytes and code in ("22021", "42601", "54000") and "C" not in flags:
            return True       # the invalid bytes were refused where they were written
        if case.phase == "leads" and "C" in flags:
            return False      # raised inside the extension's triggers on a lead write
        if case.phase == "rules":
            ctx = msg.split(" | ", 2)[2] if msg.count(" | ") >= 2 else ""
            # a context that is only the literal's own position ("JSON data, line 1") is not the extension
            if "C" in flags and code not in ("2BP01",) and re.search(r"SQL statement|function nocrm|trigger", ctx):
                self.in_extension[(code, normalize(msg))] += 1
                self.in_extension_case.setdefault((code, normalize(msg)), case)
            return code[:2] in RULES_OK_CLASSES or code in RULES_OK
        return code in EXPECTED[case.phase]

    def record(self, case, code, ms, flags, msg):
        if self.args.replay:
            self.replayed.append((case.idx, code, ms, flags))
        self.counts[case.phase][code] += 1
        if self.args.log_all and code != "00000":
            with open(os.path.join(OUT_DIR, "all-seed%s.tsv" % self.args.seed), "a", encoding="utf-8") as f:
                f.write("%s:%d\t%s\t%s\t%s\n" % (case.phase, case.idx, code, flags, msg.replace("\t", " ")[:400]))
        if ms > self.max_ms[0]:
            self.max_ms = (ms, "%s:%d" % (case.phase, case.idx))
        hang = ms > HANG_MS or code == "57014"
        if hang:
            self.hangs.append((case.phase, case.idx, ms, code))
        if hang or not self.classify(case, code, flags, msg):
            tag = ("HANG " if hang else "") + code + ("/invalid-UTF-8-message" if "U" in flags else "") + \
                  ("/in-extension" if "C" in flags else "")
            self.unexpected.append((case.phase, case.idx, tag, ms, msg))
            self.keep_exemplar(case, tag, msg)

    def keep_exemplar(self, case, tag, msg):
        sig = (case.phase, tag, normalize(msg))
        lst = self.exemplars.setdefault(sig, [])
        lst.append((len(case.sql), case, tag, msg))
        lst.sort(key=lambda x: x[0])
        del lst[3:]

    # -- batches -----------------------------------------------------------
    def run_batch(self, cases, phase, batch_no):
        """Runs cases in the session; after a crash or hang, reconnects and resumes."""
        pending = list(cases)
        while pending:
            if self.session is None:
                self.open_session()
            sent = pending
            done_ids = set()
            byid = {c.idx: c for c in sent}
            parts = ["SELECT fuzz.try(%d, %s);\n" % (c.idx, dollar_quote(c.sql)) for c in sent]
            parts.append("SELECT '@@M' || E'\\t' || sum(total_bytes) FROM pg_backend_memory_contexts;\n")
            parts.append("SELECT '@@DONE';\n")
            writer = threading.Thread(target=self.session.send, args=("".join(parts),), daemon=True)
            writer.start()
            status = None
            ctx_bytes = None
            last_line = time.time()
            while status is None:
                try:
                    line = self.session.lines.get(timeout=5)
                except queue.Empty:
                    if time.time() - last_line > 120:
                        status = "hang"     # no answer for 2 minutes despite statement_timeout
                    continue
                last_line = time.time()
                if line is None:
                    status = "crash"
                elif line.startswith(b"@@R\t"):
                    fields = line.split(b"\t", 5)
                    idx = int(fields[1])
                    code = fields[2].decode()
                    ms = float(fields[3])
                    flags = fields[4].decode()
                    raw = fields[5] if len(fields) > 5 else b""
                    try:
                        msg = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        msg = raw.decode("utf-8", "backslashreplace")
                        flags += "U"
                    done_ids.add(idx)
                    self.record(byid[idx], code, ms, flags, msg)
                elif line.startswith(b"@@M\t"):
                    ctx_bytes = int(line.split(b"\t")[1])
                elif line == b"@@DONE":
                    status = "done"
            writer.join(timeout=30)
            # Cases run in order: one that printed nothing although a later one
            # did (or the batch ended) failed outside fuzz.try's handler.
            pos = {c.idx: n for n, c in enumerate(sent)}
            last = len(sent) - 1 if status == "done" else max((pos[i] for i in done_ids), default=-1)
            for c in sent[:last + 1]:
                if c.idx not in done_ids:
                    errs = " ".join(list(self.session.errors)[-3:]) if self.session else ""
                    # statement_timeout firing only after fuzz.try's handler: an uninterruptible stretch
                    tag = "HANG OUTER-57014" if "statement timeout" in errs else "OUTER"
                    if tag != "OUTER":
                        self.hangs.append((c.phase, c.idx, float("nan"), "cancel came late"))
                    self.counts[c.phase][tag.split()[-1]] += 1
                    self.unexpected.append((c.phase, c.idx, tag, 0.0, errs))
                    self.keep_exemplar(c, tag, errs)
            pending = sent[last + 1:]
            if status == "done":
                break
            culprit = pending.pop(0) if pending else None
            if status == "hang":
                self.terminate_backend(self.session.pid)
                self.session.kill()
                self.session = None
                if culprit is not None:
                    self.hangs.append((culprit.phase, culprit.idx, 120000.0, "no answer"))
                    self.counts[culprit.phase]["HANG"] += 1
                    self.unexpected.append((culprit.phase, culprit.idx, "HANG no-answer", 120000.0, ""))
                    self.keep_exemplar(culprit, "HANG no-answer", "")
                continue
            # crash: the backend (or psql) is gone
            if self.session.send_error:
                raise SystemExit("harness bug: %s" % self.session.send_error)
            self.session.close()
            self.session = None
            time.sleep(0.5)
            log = self.server.new_log()
            if not self.server.postmaster_alive():
                raise SystemExit("postmaster died; log:\n" + log[-3000:])
            if not self.server.ready(120):
                raise SystemExit("server did not come back after a crash; log:\n" + log[-3000:])
            if culprit is not None:
                excerpt = "\n".join(l for l in log.splitlines() if "terminated by signal" in l
                                    or "PANIC" in l or "TRAP" in l)[:2000]
                self.crashes.append((culprit.phase, culprit.idx, excerpt or "connection lost"))
                self.counts[culprit.phase]["CRASH"] += 1
                self.unexpected.append((culprit.phase, culprit.idx, "CRASH", 0.0, excerpt[:300]))
                self.keep_exemplar(culprit, "CRASH", excerpt[:300])
                self.write_crash(culprit, excerpt)
                print("  !! backend crashed on %s:%d (%s)" % (
                    culprit.phase, culprit.idx, excerpt.splitlines()[0] if excerpt else "connection lost"), flush=True)
        # after each batch: postmaster alive, nothing killed by a signal, memory
        if not self.server.postmaster_alive():
            raise SystemExit("postmaster is gone")
        for l in self.server.new_log().splitlines():
            if "terminated by signal" in l or "PANIC" in l:
                self.crashes.append((phase, -1, l))
        if self.session is not None:
            m = memory_sample(self.session.pid)
            self.mem.append((phase, batch_no, self.sessions, m.get("VmRSS", 0), m.get("RssAnon", 0), ctx_bytes or 0))

    def terminate_backend(self, pid):
        subprocess.run(self.server.psql_cmd("fuzz") + ["-c", "SELECT pg_terminate_backend(%d)" % pid],
                       capture_output=True, timeout=60)

    def run_phase(self, phase, n):
        t0 = time.time()
        make = getattr(self.gen, phase)
        batch, size, bno = [], 0, 0
        limit_n, limit_bytes = self.args.batch, 8_000_000
        for i in range(n):
            c = make(i)
            batch.append(c)
            size += len(c.sql)
            if len(batch) >= limit_n or size >= limit_bytes:
                self.run_batch(batch, phase, bno)
                self.ncases[phase] += len(batch)
                batch, size, bno = [], 0, bno + 1
                if bno % 10 == 0:
                    self.progress(phase, i + 1, n, t0)
        if batch:
            self.run_batch(batch, phase, bno)
            self.ncases[phase] += len(batch)
        self.phase_time[phase] = time.time() - t0
        self.progress(phase, n, n, t0)

    def progress(self, phase, i, n, t0):
        m = self.mem[-1] if self.mem else None
        print("  %-11s %7d/%-7d %6.1fs  unexpected=%d crashes=%d  rss=%s kB ctx=%s" % (
            phase, i, n, time.time() - t0, len(self.unexpected), len(self.crashes),
            m[3] if m else "?", m[5] if m else "?"), flush=True)

    # -- corpus --------------------------------------------------------------
    def repro(self, case):
        return "python3 test/fuzz/fuzz_definitions.py --seed %s --case %s:%d" % (self.args.seed, case.phase, case.idx)

    def corpus_file(self, case, tag, msg, kind="found"):
        os.makedirs(FOUND_DIR, exist_ok=True)
        h = hashlib.sha1(case.sql.encode()).hexdigest()[:10]
        safe = re.sub(r"[^A-Za-z0-9]+", "-", tag).strip("-")
        path = os.path.join(FOUND_DIR, "%s-%s-%s-%s.sql" % (kind, case.phase, safe, h))
        body = case.sql.replace(" SELECT fuzz.lead_invariants();", "")   # needs the harness schema
        header = ["-- nocrm_automation fuzz finding: %s" % tag,
                  "-- phase %s, case %d, seed %s" % (case.phase, case.idx, self.args.seed),
                  "-- message: %s" % msg.replace("\n", " ")[:400],
                  "-- regenerate: %s" % self.repro(case),
                  "-- run: psql -X -v ON_ERROR_STOP=0 -f THIS_FILE  (a database with test/fixtures/crm.sql loaded)"]
        if len(body) > 65536:
            header.append("-- statement is %d bytes: only its first 4 KB are kept here; regenerate it with the command above"
                          % len(body))
            with open(path.replace(".sql", ".txt"), "w", encoding="utf-8") as f:
                f.write("\n".join(header) + "\n\n" + body[:4096] + "\n")
            return path.replace(".sql", ".txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(header) + "\nBEGIN;\n" + body.rstrip().rstrip(";") + ";\nROLLBACK;\n")
        return path

    def write_crash(self, case, excerpt):
        """The first crash of a phase is written at once (the run may not end well)."""
        if not self.args.no_corpus and sum(1 for c in self.crashes if c[0] == case.phase) == 1:
            self.corpus_file(case, "CRASH", excerpt)

    def write_corpus(self):
        written = []
        if self.args.no_corpus:
            return written
        for sig, lst in sorted(self.exemplars.items()):
            for _, case, tag, msg in lst[:2]:
                written.append(self.corpus_file(case, tag, msg))
        return written

    # -- report ----------------------------------------------------------------
    def summary(self, total_cases_requested):
        os.makedirs(OUT_DIR, exist_ok=True)
        lines = []
        p = lines.append
        wall = time.time() - self.t0
        p("== nocrm_automation fuzz summary")
        p("seed %s, cases %s, wall time %.0f s, psql sessions %d" % (self.args.seed, total_cases_requested, wall,
                                                                     self.sessions))
        p("")
        p("%-12s %8s %8s %8s %11s %8s" % ("phase", "cases", "ok", "errors", "unexpected", "time s"))
        for ph in PHASES:
            c = self.counts[ph]
            if not self.ncases[ph]:
                continue
            unexp = sum(1 for u in self.unexpected if u[0] == ph)
            p("%-12s %8d %8d %8d %11d %8.0f" % (ph, self.ncases[ph], c["00000"],
                                                 sum(v for k, v in c.items() if k != "00000"), unexp,
                                                 self.phase_time.get(ph, 0)))
        p("")
        p("SQLSTATE counts per phase:")
        for ph in PHASES:
            if self.counts[ph]:
                p("  %-12s %s" % (ph, ", ".join("%s=%d" % kv for kv in sorted(self.counts[ph].items()))))
        p("")
        p("crashes: %d" % len(self.crashes))
        for ph, idx, ex in self.crashes[:20]:
            p("  %s:%d  %s" % (ph, idx, ex.splitlines()[0] if ex else ""))
        p("hangs (> %.0f s): %d" % (HANG_MS / 1000, len(self.hangs)))
        for h in self.hangs[:10]:
            p("  %s:%d %.0f ms %s" % h)
        p("max statement time: %.1f ms (%s)" % self.max_ms)
        if self.mem:
            by_session = collections.OrderedDict()
            for m in self.mem:
                by_session.setdefault(m[2], []).append(m)
            longest = max(by_session.values(), key=len)
            first, last = longest[min(2, len(longest) - 1)], longest[-1]
            peak = max(longest, key=lambda m: m[4])
            p("backend memory (longest session, %d batches; start = after warm-up batch 3):" % len(longest))
            p("  VmRSS    start %7.1f MB  end %7.1f MB" % (first[3] / 1024, last[3] / 1024))
            p("  RssAnon  start %7.1f MB  end %7.1f MB  peak %7.1f MB" % (first[4] / 1024, last[4] / 1024,
                                                                         peak[4] / 1024))
            p("  memory contexts (pg_backend_memory_contexts) start %7.1f MB  end %7.1f MB" % (
                first[5] / 2 ** 20, last[5] / 2 ** 20))
            p("  per phase (VmRSS / memory contexts at the phase's first and last batch):")
            for ph in PHASES:
                ms = [m for m in self.mem if m[0] == ph]
                if ms:
                    p("    %-12s RSS %6.1f -> %6.1f MB   contexts %5.1f -> %5.1f MB" % (
                        ph, ms[0][3] / 1024, ms[-1][3] / 1024, ms[0][5] / 2 ** 20, ms[-1][5] / 2 ** 20))
            grow = (last[5] - first[5]) / 2 ** 20
            self.leak = grow > 64
            p("  verdict: %s" % ("GROWTH of %.1f MB in memory contexts: possible leak" % grow if self.leak
                                 else "no unbounded growth (%.1f MB difference in memory contexts)" % grow))
        else:
            self.leak = False
        p("")
        sigs = collections.Counter((u[0], u[2], normalize(u[4])) for u in self.unexpected)
        p("unexpected results: %d cases, %d distinct signatures" % (len(self.unexpected), len(sigs)))
        for (ph, tag, msg), n in sigs.most_common(40):
            ex = self.exemplars.get((ph, tag, msg))
            case = ex[0][1] if ex else None
            p("  %5d x %-11s %-28s %s" % (n, ph, tag, msg))
            if case:
                p("          e.g. %s" % self.repro(case))
        if self.in_extension:
            p("")
            p("rules phase: errors raised inside the extension (expected classes, listed to be read): %d" %
              sum(self.in_extension.values()))
            for (code, msg), n in self.in_extension.most_common(25):
                p("  %5d x %s %s" % (n, code, msg))
                p("          e.g. %s" % self.repro(self.in_extension_case[(code, msg)]))
        p("")
        p("reproduce this run: python3 test/fuzz/fuzz_definitions.py --seed %s%s" % (
            self.args.seed, "" if self.args.cases is None else " --cases %d" % self.args.cases))
        text = "\n".join(lines)
        print(text)
        with open(os.path.join(OUT_DIR, "summary-seed%s.txt" % self.args.seed), "w", encoding="utf-8") as f:
            f.write(text + "\n")
        with open(os.path.join(OUT_DIR, "unexpected-seed%s.tsv" % self.args.seed), "w", encoding="utf-8") as f:
            f.write("phase\tcase\ttag\tms\tmessage\trepro\n")
            for ph, idx, tag, ms, msg in self.unexpected:
                f.write("%s\t%d\t%s\t%.1f\t%s\tpython3 test/fuzz/fuzz_definitions.py --seed %s --case %s:%d\n" % (
                    ph, idx, tag, ms, msg.replace("\t", " ")[:500], self.args.seed, ph, idx))
        with open(os.path.join(OUT_DIR, "memory-seed%s.tsv" % self.args.seed), "w") as f:
            f.write("phase\tbatch\tsession\tVmRSS_kB\tRssAnon_kB\tcontexts_bytes\n")
            for m in self.mem:
                f.write("\t".join(str(x) for x in m) + "\n")


def phase_sizes(cases):
    if cases is None:
        return {"definitions": 100_000, "stage": 5_000, "templates": 20_000, "render": 20_000, "leads": 5_000,
                "rules": 5_000}
    return {"definitions": cases, "stage": max(1, cases // 20), "templates": max(1, cases // 5),
            "render": max(1, cases // 5), "leads": max(1, cases // 20), "rules": max(1, cases // 20)}


def setup_for(runner, phase):
    """Committed data a phase needs: hostile templates and leads, then the automations."""
    done = runner.setups
    if phase == "render" and "data" not in done:
        runner.server.psql_sql(HOSTILE_SETUP_SQL + committed_leads_sql(runner.args.seed))
        done.add("data")
    if phase in ("leads", "rules") and "data" not in done:
        runner.server.psql_sql(HOSTILE_SETUP_SQL + committed_leads_sql(runner.args.seed))
        done.add("data")
    if phase in ("leads", "rules") and "automations" not in done:
        runner.server.psql_sql(HOSTILE_AUTOMATIONS_SQL)
        done.add("automations")
    if phase == "rules" and "rules" not in done:
        g = runner.gen
        rng = random.Random("%s:committed-rule-leads" % runner.args.seed)
        rows = [g.lead_row(rng, ["title", "amount", "fz_kind", "fz_code", "fz_money", "fz_day", "fz_ts",
                                 "fz_flag", "fz_n", "fz_f", "next_action_at", "status", "user_id"])[1]
                for _ in range(40)]
        leads = "".join(
            "DO $l$ BEGIN INSERT INTO nocrm.leads (title, amount, fz_kind, fz_code, fz_money, fz_day, fz_ts, "
            "fz_flag, fz_n, fz_f, next_action_at, status, user_id) VALUES (%s); EXCEPTION WHEN OTHERS THEN "
            "IF SQLSTATE LIKE 'XX%%' THEN RAISE; END IF; END $l$;\n" % ", ".join(v) for v in rows)
        runner.server.psql_sql(g.anchor_rules_sql() + g.committed_rules_sql() + leads)
        n = runner.server.psql_sql("SELECT count(*) FROM nocrm.automations;").strip()
        print("   rules phase: %s committed automations" % n, flush=True)
        done.add("rules")


def run_single(args):
    phase, _, idx = args.case.partition(":")
    if phase not in PHASES:
        raise SystemExit("--case PHASE:N with PHASE one of " + ", ".join(PHASES))
    r = Runner(args)
    case = getattr(r.gen, phase)(int(idx))
    print("-- case %s:%s (seed %s), %d bytes of SQL" % (phase, idx, args.seed, len(case.sql)))
    print(case.sql if len(case.sql) < 20000 else case.sql[:20000] + "\n-- ... (cut)")
    if args.print_only:
        return 0
    r.start()
    try:
        setup_for(r, phase)
        r.open_session()
        r.run_batch([case], phase, 0)
        for u in r.unexpected:
            print("UNEXPECTED: %s" % (u,))
        print("result: %s" % dict(r.counts[phase]))
        if r.crashes:
            print("CRASH: %s" % (r.crashes,))
    finally:
        if r.session:
            r.session.close()
        r.server.stop()
    return 1 if (r.crashes or r.unexpected) else 0


def run_replay(args):
    """Runs every corpus/found/*.sql and seeds/*.json as-is; reports crashes."""
    args.no_corpus = True         # a replayed file that crashes is already in the corpus
    r = Runner(args)
    r.start()
    files = []
    for p in args.replay:
        files += sorted(glob.glob(os.path.join(p, "**", "*.sql"), recursive=True)) if os.path.isdir(p) else [p]
    try:
        setup_for(r, "leads")
        setup_for(r, "rules")
        r.open_session()
        cases = []
        for n, path in enumerate(files):
            with open(path, encoding="utf-8") as f:
                sql = "\n".join(l for l in f.read().splitlines()
                                if not l.startswith("--") and l.strip() not in ("BEGIN;", "ROLLBACK;"))
            m = re.search(r"-(definitions|stage|templates|render|leads|rules)-", os.path.basename(path))
            cases.append(Case(m.group(1) if m else "definitions", n, sql))
        if args.replay_seeds:
            for ph in PHASES:
                for s in r.gen.seeds[ph]:
                    files.append(os.path.join(SEEDS_DIR, s["file"]))
                    cases.append(seed_case(s, len(files) - 1))
        r.run_batch(cases, "replay", 0)
        for idx, code, ms, flags in r.replayed:
            print("  %-6s %9.1f ms %-3s %s" % (code, ms, flags, os.path.relpath(files[idx])))
        for ph, idx, tag, ms, msg in r.unexpected:
            print("%-9s %s  %s" % (tag, files[idx], msg[:150]))
        print("replayed %d files: %d crashes, %d unexpected" % (len(files), len(r.crashes), len(r.unexpected)))
    finally:
        if r.session:
            r.session.close()
        r.server.stop()
    return 1 if r.crashes else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", default="1", help="seed of every generated case (default 1)")
    ap.add_argument("--cases", type=int, default=None,
                    help="definitions to generate (templates and renders get N/5, stage triggers and "
                         "leads N/20); default: the full run (100000/20000/20000/5000/5000)")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ",".join(PHASES))
    ap.add_argument("--batch", type=int, default=2000, help="statements per batch (default 2000)")
    ap.add_argument("--case", help="run one case, PHASE:N, and print it")
    ap.add_argument("--print-only", action="store_true", help="with --case: only print the SQL")
    ap.add_argument("--replay", nargs="+", help="replay corpus .sql files or directories")
    ap.add_argument("--replay-seeds", action="store_true", help="with --replay: run the seeds too")
    ap.add_argument("--keep", action="store_true", help="keep the temporary server directory")
    ap.add_argument("--log-all", action="store_true", help="write every error to out/all-seedS.tsv")
    ap.add_argument("--no-corpus", action="store_true", help="do not write test/fuzz/corpus/found")
    args = ap.parse_args()
    # a SIGTERM (e.g. a CI timeout) still stops the server and writes the summary
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))

    if args.case:
        return run_single(args)
    if args.replay:
        return run_replay(args)
    if not os.path.exists(FIXTURE):
        raise SystemExit("fixture %s is missing" % FIXTURE)
    sizes = phase_sizes(args.cases)
    phases = [p for p in args.phases.split(",") if p]
    for p in phases:
        if p not in PHASES:
            raise SystemExit("unknown phase %s" % p)
    r = Runner(args)
    print("== nocrm_automation fuzz: seed %s, %s" % (args.seed, ", ".join("%s %d" % (p, sizes[p]) for p in phases)),
          flush=True)
    r.start()
    print("   server in %s" % r.server.tmp, flush=True)
    try:
        r.open_session()
        for ph in PHASES:
            if ph in phases:
                setup_for(r, ph)
                r.run_phase(ph, sizes[ph])
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        if r.session:
            r.session.close()
        written = r.write_corpus()
        r.summary(sum(sizes[p] for p in phases))
        if written:
            print("corpus: %d files written to %s" % (len(written), os.path.relpath(FOUND_DIR, ROOT)))
        r.server.stop()
    bad = r.crashes or r.hangs or r.leak or r.unexpected
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
