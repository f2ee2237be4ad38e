"""A mapping as a file (docs/mapping-file.md): its mistakes reported with file, line and fix before
anything runs; every Redis type read into rows (large collections and streams a part at a time);
`mapping --init` from a live keyspace; the shop's file mapping run end to end from the command line."""
from __future__ import annotations

import json
import pickle
import uuid
import zlib
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import psycopg2
import pytest

import migrator.core.batch

from migrator.apps.shop.demo import seed_shop
from migrator.core.config import ConfigError, Settings
from migrator.core.mapping import REDISJSON, SourceRecord
from migrator.core.mapping_file import MappingFileError, load_file, parse_key
from migrator.core.options import RunOptions
from migrator.core.registry import digest
from migrator.execution.runner import plan_run
from migrator.core.schema import empty_tables, init_db
from migrator.core.source import CHUNK_READ_MEMBERS, REDISJSON_MODULE, decode, loaded_modules, read_keys, read_parts
from migrator.core.values import stable_id
from migrator.core import ledger
from migrator.views.mapping_init import _guess
from migrator.views.report import monitoring, render
from helpers import ROOT, Workers, by_pattern, cli, fingerprint, migrate, throwaway_database, verify, worker_env

SHOP_FILE = ROOT / "migrator" / "apps" / "shop" / "mapping.toml"
SHOP = load_file(SHOP_FILE)


# --- mistakes: every one reported, with its line and its fix, before anything runs ------------------------


def mistakes(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(MappingFileError) as caught:
        load_file(path)
    assert all(line.startswith(f"{path}:") and " — " in line for line in caught.value.problems)
    return caught.value.problems


def said(problems: list[str], words: str) -> tuple[int, str]:
    """The line number and text of the one problem saying `words`."""
    found = [p for p in problems if words in p]
    assert len(found) == 1, (words, problems)
    return int(found[0].split(":")[1]), found[0]


HOSTILE = '''\
[mapping]
name = "bad"

[[pattern]]
name = "product"
key = "shop:product:{sku}"
type = "hsh"
tabel = "products"

[[pattern]]
name = "views"
key = "shop:views:{sku}"
type = "hash"
table = "products"

[pattern.columns]
sku = "key.sku"
views = "score"

[[pattern]]
name = "views"
key = 'shop:day:{day:\\d{4}-(}'
type = "string"
table = "products"

[pattern.columns]
sku = "key.nope"

[tables.products]
columns = { sku = "text", views = "bigint" }
'''


def test_every_mistake_is_reported_at_once_with_its_file_line_and_fix(tmp_path):
    problems = mistakes(tmp_path, HOSTILE)
    assert [int(p.split(":")[1]) for p in problems] == [4, 7, 8, 18, 21, 22, 29]  # in the file's order
    line, text = said(problems, "has neither table nor skip")  # (its table is misspelt)
    assert line == 4 and 'add table = "..."' in text
    line, text = said(problems, "unknown key 'tabel'")
    assert line == 8 and text.endswith("did you mean 'table'?")
    line, text = said(problems, "type 'hsh'")
    assert line == 7 and text.endswith("did you mean 'hash'?")
    line, text = said(problems, "takes 'score'")  # a source the type has not, with the ones it has
    assert line == 18 and "a hash has not" in text and "field.<name>" in text
    assert said(problems, "declared twice")[0] == 21
    line, text = said(problems, "no regular expression")
    assert line == 22 and text.endswith("fix it (Python syntax)")
    line, text = said(problems, "names no key columns")
    assert line == 29 and 'add key = ["..."]' in text
    # (the broken key has no fields to check key.nope against: only the grammar's mistake is said)
    assert not any("key.nope" in p for p in problems)


@pytest.mark.parametrize("text, line, words, fix", [
    ('[mapping]\nname = "x"\n[[pattern]]\nname = "a"\nkey = "a:{id}"\ntype = "string"\npriority = 3\nskip = "s"\n',
     7, "priority is an integer", 'priority = "high"'),
    ('[mapping]\nname = "x"\n[[pattern]]\nname = "a"\nkey = "a:*"\ntype = "string"\nskip = "s"\n',
     5, "'*' is no wildcard", "{name}"),
    ('[mapping]\nname = "x"\n[[pattern]]\nname = "a"\nkey = "a:{id}"\ntype = "string"\npriority = "urgent"\n'
     'skip = "s"\n', 7, "unknown priority 'urgent'", "choose one of: critical"),
    ('[mapping]\nname = "x"\n[[pattern]]\nname = "a"\nkey = "a:{id}"\ntype = "hash"\nformat = "json"\nskip = "s"\n',
     7, "format applies to strings", "remove format"),
    ('[mapping]\nname = "x"\n[[pattern]]\nname = "a"\nkey = "a:{id}"\ntype = "string"\ntable = "t"\n'
     '[pattern.columns]\nk = "key.user"\n[tables.t]\nkey = ["k"]\ncolumns = { k = "text" }\n',
     9, "the key has no field 'user' (its fields: id)", "add {user} to the key"),
    ('[mapping]\nname = "x"\n[[pattern]]\nname = "a"\nkey = "a:{id}"\ntype = "string"\ntable = "t"\n'
     '[pattern.columns]\nk = "key.id"\n[tables.t]\nkey = ["k"]\nrequired = ["v"]\ncolumns = { k = "text", v = "text" }\n',
     8, "without its column(s) v", "every pattern writing a table gives all of its columns"),
    ('[mapping]\nname = "x"\n[[pattern]]\nname = "a"\nkey = "a:{id}"\ntype = "string"\ntable = "t"\n'
     '[pattern.columns]\nk = "key.id"\n[tables.t]\nkey = ["k"]\n[tables.t.columns]\nk = "text"\nid = "uuid"\n',
     14, "column name 'id' cannot be used", "are the engine's own"),
    ('[mapping]\nname = "x"\n[[pattern]]\nname = "a"\nkey = "a:{id}"\ntype = "string"\ntable = "migration_runs"\n'
     '[pattern.columns]\nk = "key.id"\n[tables.migration_runs]\nkey = ["k"]\ncolumns = { k = "text" }\n',
     10, "not a name a table of yours can have (the engine's own)", "not a migrator table's name"),
    ('[mapping]\nname = "x"\n[[pattern]]\nname = "a"\nkey = "a:{id}"\ntype = "string"\ntable = "t"\n'
     '[pattern.columns]\nk = "key.id"\n[tables.t]\nkey = ["k"]\ncolumns = { k = "text", n = "int" }\n', 12,
     "column n has type 'int'", "did you mean 'bigint'?"),
    ('[mapping]\nname = "x"\n[[pattern]]\nname = "a"\nkey = "a:{id}"\ntype = "string"\ntable = "t"\n'
     '[pattern.columns]\nk = "key.id"\nn = "value"\n[tables.t]\nkey = ["k"]\ncolumns = { k = "text", n = "text" }\n'
     'merge = { greatest = ["n"] }\n', 14, "merge orders by 'n', a text column", "greatest and version take"),
    ('[mapping]\nname = "x"\n[[pattern]]\nname = "a"\nkey = "a:{id}"\ntype = "string"\ntable = "t"\n'
     '[pattern.columns]\nk = "key.id"\n[tables.t]\nkey = ["k"]\ncolumns = { k = "text" }\n[tables.u]\nkey = ["k"]\n'
     'columns = { k = "text" }\n', 13, "table 'u' is written by no pattern", 'table = "u"'),
    ('[mapping]\nname = "x"\n[[pattern]]\nname = "a"\nkey = "a:{id}"\ntype = "string"\n', 3,
     "has neither table nor skip", "add table"),
    ('[mapping]\nname = "x"\n[[pattern]]\nname = "a"\nkey = "a:{id}"\ntype = "string"\nskip = "s"\n'
     '[[pattern]]\nname = "b"\nkey = "a:{other}"\ntype = "string"\nskip = "s"\n', 10, "same key as pattern 'a'",
     "never own a key"),
    ('[mapping]\nname = "x"\n[[pattern]]\nname = "a"\nkey = "a:{id}"\ntype = "string"\nskip = "s"\n'
     'max_dead_ratio = 5\n', 8, "max_dead_ratio 5 is no share", "from 0 to 1"),
    ('[mapping]\nname = "x"\ndemo = "no.such.module:seed"\n[[pattern]]\nname = "a"\nkey = "a:{id}"\n'
     'type = "string"\nskip = "s"\n', 3, "cannot be imported", "package.module:function"),
    ('[[pattern]]\nname = "a"\nkey = "a:{id}"\ntype = "string"\nskip = "s"\n', 1, "no [mapping] table", "name ="),
    ('[mapping]\nname = "x"\n[[patterns]]\nname = "a"\n', 3, "unknown key 'patterns'", "did you mean 'pattern'?"),
])
def test_each_kind_of_mistake_names_its_line_and_the_fix(tmp_path, text, line, words, fix):
    problems = mistakes(tmp_path, text)
    found, message = said(problems, words)
    assert found == line and fix in message, problems


def test_broken_toml_and_bytes_that_are_not_utf8_say_where(tmp_path):
    problems = mistakes(tmp_path, '[mapping]\nname = "x"\n\n[[pattern]]\nname = "a\nkey = 1\n')
    line, text = said(problems, "not valid TOML")
    assert line == 5 and "fix the syntax at column" in text
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[mapping]\nname = "caf\xe9"\n')
    with pytest.raises(MappingFileError) as caught:
        load_file(path)
    assert caught.value.problems == [f"{path}:2: the file is not UTF-8 (byte 0xe9) — save it as UTF-8"]


def test_a_mistaken_file_is_refused_before_redis_or_postgres_is_touched(settings, r, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(HOSTILE)
    r.set("shop:views:SKU-1", 5)
    with throwaway_database(settings.database_url) as url:
        for command in (["init-db"], ["run", "--local"], ["audit"], ["check", "--no-workers"]):
            done = cli(Settings(settings.redis_url, url, settings.broker_url), *command, "--mapping", str(bad))
            assert done.returncode == 2 and f"{bad}:8: " in done.stderr and "Traceback" not in done.stderr, done.stderr
        conn = psycopg2.connect(url)
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            assert cur.fetchone()[0] == 0  # not even the ledger
        conn.close()
    assert r.dbsize() == 1


@pytest.mark.parametrize("key, matches, refuses", [
    ("shop:product:{sku}", ["shop:product:SKU-1"], ["shop:product:a:b", "shop:product:"]),
    (r"usage:{ip:.+}:{day:\d{4}-\d{2}-\d{2}}", ["usage:::1:2024-05-01"], ["usage:1.2.3.4:2024-5-1"]),
    ("odd.{x}[1]?{{y}}", ["odd.Z[1]?{y}"], ["oddXZ[1]?{y}", "odd.Z1?{y}"]),
])
def test_the_key_grammar_anchors_its_fields_and_keeps_other_characters_literal(key, matches, refuses):
    import re

    grammar, glob, _ = parse_key(key)
    assert all(re.fullmatch(grammar, k) for k in matches) and not any(re.fullmatch(grammar, k) for k in refuses)
    from fnmatch import fnmatchcase

    assert all(fnmatchcase(k, glob) for k in matches)


GRANTS = """
[mapping]
name = "grants"

[[pattern]]
name = "by_ip"
key = "app:{{grant}}:ip:{ip:.+}"
type = "string"
format = "json"
table = "grants"
[pattern.columns]
ip = "key.ip"
email = "json.email"
granted = "json.granted"

[[pattern]]
name = "by_email"
key = "app:{{grant}}:email:{email}"
type = "string"
format = "json"
table = "grants"
[pattern.columns]
ip = "json.ip"
email = "key.email"
granted = "json.granted"

[[pattern]]
name = "by_day"
key = "app:day:{day}"
type = "string"
format = "json"
table = "days"
[pattern.columns]
day = "key.day"
count = "json.count"

[tables.grants]
key = ["granted"]
[tables.grants.columns]
ip = "text"
email = "text"
granted = "text"

[tables.days]
key = ["day"]
[tables.days.columns]
day = "date"
count = "integer"
"""


def test_a_file_pattern_spells_the_key_of_its_row_from_its_key_fields(tmp_path):
    """Two patterns whose keys give one row (by its value): each key is spelled again from the row's
    columns (`migrator follow` looks for the other before it retires the row); a key whose field a
    column converts (a date) is not."""
    path = tmp_path / "grants.toml"
    path.write_text(GRANTS)
    mapping = load_file(path)
    by_ip, by_email, by_day = mapping.patterns
    assert mapping.sharing("grants") == (by_ip, by_email) and mapping.sharing("days") == ()
    assert by_day.row_key is None
    value = json.dumps({"ip": "2001:db8::1", "email": "Ann@X.io", "granted": "2026-12-01T10:00:00"}).encode()
    keys = ("app:{grant}:ip:2001:db8::1", "app:{grant}:email:Ann@X.io")
    rows = []
    for key in keys:
        pattern, fields = mapping.classify(key)
        rows += pattern.transform(SourceRecord(key, fields, decode(value, "json"), None, datetime.now(timezone.utc),
                                               timezone.utc))
    assert rows[0].values["id"] == rows[1].values["id"]  # one row
    assert [p.row_key.render(rows[0].values) for p in (by_ip, by_email)] == list(keys)


def test_the_digest_is_the_declaration_and_moves_with_any_change_to_the_file(tmp_path):
    again = tmp_path / "shop.toml"
    again.write_text(SHOP_FILE.read_text())
    assert digest(load_file(again)) == digest(SHOP)
    again.write_text(SHOP_FILE.read_text().replace('units_sold = "bigint"', 'units_sold = "numeric"'))
    assert digest(load_file(again)) != digest(SHOP)


# --- every Redis type into rows ---------------------------------------------------------------------------------

KINDS = '''\
[mapping]
name = "kinds"

[[pattern]]
name = "note"
key = "k:note:{id}"
type = "string"
table = "notes"
columns = { note_id = "key.id", body = "value" }

[[pattern]]
name = "doc"
key = "k:doc:{id}"
type = "string"
format = "json"
priority = "high"
table = "docs"
max_dead_ratio = 0
max_dead_keys = 0

[pattern.columns]
doc_id = "key.id"
title = "json.title"
city = "json.address.city"
first_tag = "json.tags.0"
price = "json.price"
seen_at = "json.seen_at"
active = "json.active"
raw = "value"

[[pattern]]
name = "count"
key = 'k:count:{day:\\d{4}-\\d{2}-\\d{2}}'
type = "string"
format = "int"
table = "counts"
columns = { day = "key.day", n = "value" }

[[pattern]]
name = "profile"
key = "k:profile:{user}"
type = "hash"
table = "profiles"
columns = { user_name = "key.user", name = "field.name", age = "field.age", score = "field.score", extra = "field.extra" }

[[pattern]]
name = "counters"
key = "k:counters"
type = "hash"
rows = "member"
table = "counters"
columns = { name = "field", n = "value" }

[[pattern]]
name = "queue"
key = "k:queue:{q}"
type = "list"
table = "queue_items"
columns = { queue = "key.q", position = "index", item = "value" }

[[pattern]]
name = "tags"
key = "k:tags:{user}"
type = "set"
table = "tags"
columns = { user_name = "key.user", tag = "member" }

[[pattern]]
name = "board"
key = "k:board"
type = "zset"
table = "board"
columns = { player = "member", points = "score" }

[[pattern]]
name = "log"
key = "k:log:{app}"
type = "stream"
table = "log"
columns = { app = "key.app", entry = "id", at = "id.time", level = "field.level", message = "field.message" }

[[pattern]]
name = "cache"
key = "k:cache:{x}"
type = "string"
skip = "ephemeral: rebuilt by the app"

[tables.notes]
key = ["note_id"]
columns = { note_id = "text", body = "text" }

[tables.docs]
key = ["doc_id"]
required = ["title"]
columns = { doc_id = "text", title = "text", city = "text", first_tag = "text", price = "numeric", seen_at = "timestamptz", active = "boolean", raw = "jsonb" }

[tables.counts]
key = ["day"]
columns = { day = "date", n = "bigint" }
merge = { greatest = ["n"] }

[tables.profiles]
key = ["user_name"]
columns = { user_name = "text", name = "text", age = "integer", score = "double precision", extra = "jsonb" }

[tables.counters]
key = ["name"]
columns = { name = "text", n = "bigint" }

[tables.queue_items]
key = ["queue", "position"]
columns = { queue = "text", position = "integer", item = "text" }

[tables.tags]
key = ["user_name", "tag"]
columns = { user_name = "text", tag = "text" }

[tables.board]
key = ["player"]
columns = { player = "text", points = "double precision" }

[tables.log]
key = ["app", "entry"]
columns = { app = "text", entry = "text", at = "timestamptz", level = "text", message = "text" }
'''


@pytest.fixture(scope="module")
def target(database_url):
    """A database of this module's own, holding the engine's schema (each test adds its mapping's)."""
    with throwaway_database(database_url) as url:
        yield url


@pytest.fixture
def kinds(tmp_path):
    path = tmp_path / "kinds.toml"
    path.write_text(KINDS)
    return load_file(path)


def prepared(settings: Settings, target: str, mapping) -> Settings:
    """Settings on the module's database, `mapping`'s schema applied and its tables and the ledger emptied."""
    here = Settings(settings.redis_url, target, settings.broker_url)
    conn = here.postgres()
    try:
        init_db(conn, mapping)
        empty_tables(conn, [*mapping.table_names(), *ledger.TABLES])
    finally:
        conn.close()
    return here


def rows(settings: Settings, query: str, *args) -> list[tuple]:
    conn = settings.postgres()
    try:
        with conn.cursor() as cur:
            cur.execute(query, args)
            return cur.fetchall()
    finally:
        conn.close()


def seed_kinds(r) -> None:
    r.set("k:note:1", "plain text, ünïcode")
    r.set("k:note:big", "x" * (3 * 1024 * 1024))  # read whole, written in a sub-batch of its own
    r.set("k:doc:1", json.dumps({"title": "First", "address": {"city": "Lyon"}, "tags": ["a", "b"], "price": "19.90",
                                 "seen_at": "2024-05-01T10:00:00+02:00", "active": True, "x": [1, 2]}))
    r.set("k:doc:2", json.dumps({"title": "Second", "price": 3, "seen_at": 1714550400, "active": "no"}))
    r.set("k:count:2024-05-01", 42)
    r.hset("k:profile:ann", mapping={"name": "Ann", "age": "37", "score": "4.5", "extra": '{"likes": ["tea"]}'})
    r.hset("k:profile:bob", mapping={"name": "Bob", "age": ""})  # an empty field is no value
    r.hset("k:counters", mapping={f"c{i}": i for i in range(2500)})  # three parts
    r.rpush("k:queue:jobs", *[f"job-{i}" for i in range(2500)])
    r.sadd("k:tags:ann", "red", "green", "blue")
    r.zadd("k:board", {"ann": 12.5, "bob": 3, "top": float("inf"), "last": float("-inf")})  # (RQ's registries hold +inf)
    r.xadd("k:log:web", {"level": "info", "message": "started"}, id="1714550400000-0")
    r.xadd("k:log:web", {"level": "warn", "message": "slow"}, id="1714550400123-1")
    r.set("k:cache:x", "whatever")


def test_every_type_is_read_into_its_rows(settings, r, target, kinds):
    here = prepared(settings, target, kinds)
    seed_kinds(r)
    report = migrate(here, mapping=kinds)
    assert report["status"] == "completed" and report["balanced"], report
    found = by_pattern(report)
    assert {name: (p["migrated"], p["rows"]) for name, p in found.items() if name != "cache"} == {
        "note": (2, 2), "doc": (2, 2), "count": (1, 1), "profile": (2, 2), "counters": (1, 2500),
        "queue": (1, 2500), "tags": (1, 3), "board": (1, 4), "log": (1, 2)}
    assert found["cache"]["skipped"] == 1 and found["cache"]["skip_reason"] == "ephemeral: rebuilt by the app"

    assert rows(here, "SELECT body FROM notes WHERE note_id = '1'") == [("plain text, ünïcode",)]
    assert rows(here, "SELECT length(body) FROM notes WHERE note_id = 'big'") == [(3 * 1024 * 1024,)]
    assert rows(here, "SELECT doc_id, title, city, first_tag, price, seen_at, active, raw->'x' FROM docs ORDER BY 1") == [
        ("1", "First", "Lyon", "a", Decimal("19.90"), datetime(2024, 5, 1, 8, tzinfo=timezone.utc), True, [1, 2]),
        ("2", "Second", None, None, Decimal(3), datetime(2024, 5, 1, 8, tzinfo=timezone.utc), False, None)]
    assert rows(here, "SELECT day::text, n FROM counts") == [("2024-05-01", 42)]
    assert rows(here, "SELECT user_name, name, age, score, extra FROM profiles ORDER BY 1") == [
        ("ann", "Ann", 37, 4.5, {"likes": ["tea"]}), ("bob", "Bob", None, None, None)]
    assert rows(here, "SELECT count(*), sum(n) FROM counters") == [(2500, 2500 * 2499 // 2)]
    # each element at its own position, across the parts it was read in
    assert rows(here, "SELECT count(*), bool_and(item = 'job-' || position) FROM queue_items") == [(2500, True)]
    assert rows(here, "SELECT tag FROM tags ORDER BY 1") == [("blue",), ("green",), ("red",)]
    assert rows(here, "SELECT player, points FROM board ORDER BY 1") == [
        ("ann", 12.5), ("bob", 3.0), ("last", float("-inf")), ("top", float("inf"))]
    assert rows(here, "SELECT entry, at, level, message FROM log ORDER BY 1") == [
        ("1714550400000-0", datetime(2024, 5, 1, 8, tzinfo=timezone.utc), "info", "started"),
        ("1714550400123-1", datetime(2024, 5, 1, 8, 0, 0, 123000, tzinfo=timezone.utc), "warn", "slow")]
    # ids are stable: uuid5 of the table and its key columns
    assert rows(here, "SELECT id::text FROM queue_items WHERE position = 7") == [(stable_id("queue_items", "jobs", "7"),)]
    assert verify(here, report["run_id"], mapping=kinds)["verdict"] == "clean"
    # a rerun writes nothing
    assert migrate(here, mapping=kinds)["figures"]["rows_written"] == 0


@pytest.mark.parametrize("key, write, reason", [
    ("k:doc:3", lambda r, k: r.set(k, '{"title": "T", "price": "cheap"}'), "column price (json.price): expected a number"),
    ("k:doc:4", lambda r, k: r.set(k, '{"price": 1}'), "column title (json.title): missing, and the table requires it"),
    ("k:doc:5", lambda r, k: r.set(k, '{"title": "T", "seen_at": "yesterday"}'), "column seen_at (json.seen_at)"),
    ("k:doc:6", lambda r, k: r.set(k, '{"title": '), "value is not valid JSON"),
    ("k:doc:7", lambda r, k: r.set(k, b'{"title": "\xff"}'), "not valid UTF-8 (byte 0xff"),
    ("k:doc:8", lambda r, k: r.hset(k, "title", "T"), "wrong Redis type: expected string, found hash"),
    ("k:doc:9", lambda r, k: r.set(k, '{"title": "T", "active": "maybe"}'), "column active (json.active): expected true"),
    ("k:doc:10", lambda r, k: r.set(k, '{"title": "T\\u0000"}'), "column title (json.title): holds a NUL"),
    ("k:doc:11", lambda r, k: r.set(k, '{"title": "T", "price": "NaN"}'), "expected a finite number"),
])
def test_a_value_its_columns_refuse_is_a_dead_letter_naming_the_column_and_fails_a_budget_of_none(
        settings, r, target, kinds, key, write, reason):
    here = prepared(settings, target, kinds)
    r.set("k:doc:1", '{"title": "fine"}')
    clean = migrate(here, mapping=kinds, priorities=("high",))
    assert clean["status"] == "completed" and by_pattern(clean)["doc"]["dead"] == 0
    write(r, key)
    report = migrate(here, mapping=kinds, priorities=("high",))
    doc = by_pattern(report)["doc"]
    assert report["balanced"] and (doc["migrated"], doc["dead"]) == (1, 1)
    # the pattern declares max_dead_keys = 0: one dead letter fails its priority
    assert report["status"] != "completed"
    [(error,)] = rows(here, "SELECT error FROM migration_dead_letters WHERE run_id = %s", report["run_id"])
    assert reason in error, error


def test_a_member_its_columns_refuse_makes_the_whole_collection_one_dead_letter(settings, r, target, kinds):
    here = prepared(settings, target, kinds)
    r.hset("k:counters", mapping={f"c{i}": i for i in range(2500)})
    r.zadd("k:board", {"ann": 1})
    assert by_pattern(migrate(here, mapping=kinds))["counters"]["rows"] == 2500
    # every counter moved and one refused: the parts read before the refused one are taken back
    r.hset("k:counters", mapping={f"c{i}": i + 1 if i != 2400 else "many" for i in range(2500)})
    r.zadd("k:board", {b"\xffbad": 2})
    r.xadd("k:log:app", {"level": "info", "message": b"caf\xe9"}, id="5-1")
    report = migrate(here, mapping=kinds)
    found = by_pattern(report)
    assert (found["counters"]["dead"], found["board"]["dead"], found["log"]["dead"]) == (1, 1, 1) and report["balanced"]
    dead = {key: (error, raw) for key, error, raw in rows(
        here, "SELECT key_text, error, raw_value FROM migration_dead_letters WHERE run_id = %s", report["run_id"])}
    assert "column n (value): expected an integer, got 'many'" in dead["k:counters"][0]
    # (named by the text column that refused it: a bytea column would take it)
    assert "column player (member): is not valid UTF-8 (byte 0xff at offset 0): a bytea column takes it" in dead["k:board"][0]
    # a stream's dead letter keeps its entries as JSON, ids and fields, the bad bytes escaped
    assert "is not valid UTF-8 (byte 0xe9" in dead["k:log:app"][0] and "a bytea column takes it" in dead["k:log:app"][0]
    assert json.loads(bytes(dead["k:log:app"][1])) == [["5-1", {"level": "info", "message": "caf\\xe9"}]]
    # the rows of the first run stand as they were: this run wrote nothing of the refused collection
    assert rows(here, "SELECT count(*), sum(n) FROM counters") == [(2500, 2500 * 2499 // 2)]


def test_a_large_stream_is_read_and_verified_a_part_at_a_time_with_its_ids_kept(settings, r, target, kinds, parts):
    here = prepared(settings, target, kinds)
    n = 50_000
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd("k:log:big", {"level": "info", "message": f"m{i}"}, id=f"{1714550400000 + i}-0")
    pipe.execute()
    report = migrate(here, mapping=kinds, priorities=("medium",))
    assert report["status"] == "completed" and by_pattern(report)["log"]["rows"] == n
    # read by the run in parts of CHUNK_READ_MEMBERS entries, each part's rows sealed (its validation reads none)
    assert parts[b"k:log:big"] == n // CHUNK_READ_MEMBERS and report["validated_by"] == {"medium": "sealed"}
    assert rows(here, "SELECT count(*), count(DISTINCT entry), min(entry), max(entry) FROM log") == [
        (n, n, "1714550400000-0", f"{1714550400000 + n - 1}-0")]
    assert rows(here, "SELECT message FROM log WHERE entry = '1714550412345-0'") == [("m12345",)]

    # damage: a row deleted, one changed, one no entry gives: verify names them
    conn = here.postgres()
    with conn, conn.cursor() as cur:
        cur.execute("DELETE FROM log WHERE entry = '1714550400007-0'")
        cur.execute("UPDATE log SET message = 'edited' WHERE entry = '1714550440000-0'")
    conn.close()
    r.xdel("k:log:big", f"{1714550400000 + 49_999}-0")
    result = verify(here, report["run_id"], mapping=kinds)
    assert parts[b"k:log:big"] >= 2 * (n // CHUNK_READ_MEMBERS)  # read again by verify, a part at a time
    log = next(p for p in result["patterns"] if p["pattern"] == "log")
    assert result["verdict"] == "differences" and (log["missing"], log["different"], log["extra"]) == (1, 1, 1)


def test_the_reader_gives_streams_lists_in_parts_and_their_digests_follow_their_content(r):
    r.xadd("s", {"a": "1"}, id="1-1")
    r.xadd("s", {"a": "2", "b": "x"}, id="2-1")
    r.rpush("l", *[str(i) for i in range(CHUNK_READ_MEMBERS + 5)])
    [stream, listed] = read_keys(r, [(b"s", "stream"), (b"l", "list")])
    assert stream.raw == [(b"1-1", {b"a": b"1"}), (b"2-1", {b"a": b"2", b"b": b"x"})] and stream.resume is None
    read = list(read_parts(r, listed))
    assert [len(p.raw) for p in read] == [CHUNK_READ_MEMBERS, 5] and read[1].raw.start == CHUNK_READ_MEMBERS
    from migrator.core.source import value_digest

    before = value_digest(stream.raw)
    r.xadd("s", {"a": "3"}, id="3-1")
    assert value_digest(read_keys(r, [(b"s", "stream")])[0].raw) != before


# --- RedisJSON -----------------------------------------------------------------------------------------------

JSON_FILE = '''\
[mapping]
name = "documents"

[[pattern]]
name = "doc"
key = "j:doc:{id}"
type = "json"
table = "json_docs"
columns = { doc_id = "key.id", title = "json.title", whole = "value" }

[tables.json_docs]
key = ["doc_id"]
columns = { doc_id = "text", title = "text", whole = "jsonb" }
'''


BINARY = """
[mapping]
name = "jobs"

[[pattern]]
name = "job"
key = "q:job:{job}"
type = "hash"
table = "jobs"
columns = { job = "key.job", status = "field.status", payload = "field.data" }

[[pattern]]
name = "session"
key = "q:session:{sid}"
type = "string"
format = "bytes"
table = "sessions_kept"
columns = { sid = "key.sid", body = "value" }

[tables.jobs]
key = ["job"]
columns = { job = "text", status = "text", payload = "bytea" }

[tables.sessions_kept]
key = ["sid"]
columns = { sid = "text", body = "bytea" }
"""


def test_binary_values_go_to_bytea_columns_and_a_binary_field_no_column_takes_fails_nothing(settings, r, target, tmp_path):
    """What RQ, cachelib and Flask-Session write: pickles, compressed blobs. A bytea column takes a
    string of format bytes, or a hash field, as it is; a hash's field that no column takes is never
    decoded, and one a text column takes that is not UTF-8 is a dead letter saying what takes it."""
    path = tmp_path / "jobs.toml"
    path.write_text(BINARY)
    mapping = load_file(path)
    here = prepared(settings, target, mapping)
    blob = zlib.compress(pickle.dumps({"args": (1, "ünï"), "kwargs": {}}))
    r.hset("q:job:a", mapping={"status": "finished", "data": blob, "exc_info": b"\x80\xff\xfe"})
    r.hset("q:job:b", mapping={"status": "queued", "data": b""})
    r.set("q:session:s1", pickle.dumps({"user": 7}))
    r.hset("q:job:bad", mapping={"status": b"\xffdone", "data": blob})
    report = migrate(here, mapping=mapping)
    found = by_pattern(report)
    assert (found["job"]["migrated"], found["job"]["dead"], found["session"]["migrated"]) == (2, 1, 1), report
    assert [(job, status, bytes(payload)) for job, status, payload in rows(here, "SELECT job, status, payload FROM jobs ORDER BY 1")] \
        == [("a", "finished", blob), ("b", "queued", b"")]
    assert [bytes(body) for (body,) in rows(here, "SELECT body FROM sessions_kept")] == [pickle.dumps({"user": 7})]
    [(error,)] = rows(here, "SELECT error FROM migration_dead_letters WHERE run_id = %s", report["run_id"])
    assert "column status (field.status): is not valid UTF-8 (byte 0xff at offset 0)" in error, error
    assert verify(here, report["run_id"], mapping=mapping)["verdict"] == "clean"
    assert migrate(here, mapping=mapping)["figures"]["rows_written"] == 0  # the same bytes: nothing to write again
    r.hset("q:job:a", "data", blob + b"\x00")
    told = verify(here, report["run_id"], mapping=mapping)
    assert (told["changed_since_run"], told["different"]) == (1, 0), told  # the bytes compared, as the app moved them


LEDGER = """
[mapping]
name = "ledger"

[[pattern]]
name = "entry"
key = "l:entry:{entry}"
type = "string"
format = "json"
table = "entries"
columns = { entry = "key.entry", amount = "json.amount", units = "json.units", whole = "value" }

[tables.entries]
key = ["entry"]
columns = { entry = "text", amount = "numeric", units = "bigint", whole = "jsonb" }
"""
# What Python's json.dumps writes of an integer past 64 bits (a uuid's int, a big balance), read
# back whole by the app's json.loads; orjson read it as a double (1.2345678901234568e+28)
HUGE = 12345678901234567890123456781


def test_numbers_past_a_double_are_kept_whole_and_verify_tells_a_rounded_one(settings, r, target, tmp_path):
    path = tmp_path / "ledger.toml"
    path.write_text(LEDGER)
    mapping = load_file(path)
    here = prepared(settings, target, mapping)
    r.set("l:entry:a", json.dumps({"amount": HUGE, "units": 3, "nested": [{"n": -HUGE}]}))
    r.set("l:entry:b", json.dumps({"amount": 1, "units": HUGE}))  # bigint cannot hold it: a dead letter
    deep: object = HUGE
    for _ in range(600):
        deep = [deep]
    r.set("l:entry:c", json.dumps({"amount": 2, "units": 1, "deep": deep}))  # deeper than the writer writes
    # decimals a double cannot hold (another language's writer, a price with many digits): as written
    r.set("l:entry:d", '{"amount": 12345678901234567.89, "units": 4, "rate": 0.1000000000000000055511151231257827,'
                       ' "js": 1.5e-7, "tiny": 1e-400}')
    report = migrate(here, mapping=mapping)
    assert report["status"] == "completed", report
    assert (by_pattern(report)["entry"]["migrated"], by_pattern(report)["entry"]["dead"]) == (2, 2), report
    [(amount, nested, whole)] = rows(here, "SELECT amount::text, whole #>> '{nested,0,n}', whole->>'amount' FROM entries"
                                           " WHERE entry = 'a'")
    assert (amount, nested, whole) == (str(HUGE), str(-HUGE), str(HUGE))
    [(amount, rate, js, tiny)] = rows(here, "SELECT amount::text, whole->>'rate', (whole->>'js')::float8, whole->>'tiny'"
                                            " FROM entries WHERE entry = 'd'")
    assert (amount, rate, js, Decimal(tiny)) == ("12345678901234567.89", "0.1000000000000000055511151231257827", 1.5e-7,
                                                Decimal("1e-400"))
    errors = dict(rows(here, "SELECT key_text, error FROM migration_dead_letters WHERE run_id = %s", report["run_id"]))
    assert "out of range" in errors["l:entry:b"] and "nested deeper than 255 levels" in errors["l:entry:c"], errors
    r.delete("l:entry:b", "l:entry:c")
    assert verify(here, report["run_id"], mapping=mapping)["verdict"] == "clean"
    assert migrate(here, mapping=mapping)["figures"]["rows_written"] == 0  # read the same way again: nothing to write
    conn = here.postgres()
    try:
        with conn, conn.cursor() as cur:  # the same number, another scale: not as written
            cur.execute("UPDATE entries SET amount = amount * 1.0 WHERE entry = 'd'")
        told = verify(here, report["run_id"], mapping=mapping)
        assert (told["verdict"], told["different"]) == ("differences", 1), told
        assert migrate(here, mapping=mapping)["figures"]["rows_written"] == 1  # a re-run writes it as written again
        assert rows(here, "SELECT amount::text FROM entries WHERE entry = 'd'") == [("12345678901234567.89",)]
        with conn, conn.cursor() as cur:  # what reading it as a double made of it
            cur.execute("UPDATE entries SET whole = jsonb_set(whole, '{amount}', to_jsonb(%s::float8)) WHERE entry = 'a'",
                        (float(HUGE),))
            cur.execute("UPDATE entries SET amount = 12345678901234568 WHERE entry = 'd'")  # and a decimal so
    finally:
        conn.close()
    told = verify(here, report["run_id"], mapping=mapping)
    assert (told["verdict"], told["different"]) == ("differences", 2), told
    # --init types such an integer numeric, which holds it, and one within 64 bits bigint
    guess = _guess(r, {"shape": "l:entry:*", "keys": 1, "types": {"string": 1}, "examples": ["l:entry:a"]}, set(), set())
    assert (guess.columns["amount"][1], guess.columns["units"][1]) == ("numeric", "bigint"), guess.columns
    decimals = _guess(r, {"shape": "l:entry:*", "keys": 1, "types": {"string": 1}, "examples": ["l:entry:d"]}, set(), set())
    assert (decimals.columns["amount"][1], decimals.columns["js"][1]) == ("numeric", "double precision"), decimals.columns


QUEUES = """
[mapping]
name = "queues"

[[pattern]]
name = "queue"
key = "hq:queue:{name}"
type = "list"
rows = "member"
table = "hq_queued"
columns = { queue = "key.name", position = "index", body = "value" }

[[pattern]]
name = "schedule"
key = "hq:schedule:{name}"
type = "zset"
rows = "member"
table = "hq_scheduled"
columns = { queue = "key.name", task = "member", at = "score" }

[[pattern]]
name = "tags"
key = "hq:tags:{name}"
type = "set"
rows = "member"
table = "hq_tags"
columns = { queue = "key.name", tag = "member" }

[[pattern]]
name = "events"
key = "hq:events"
type = "stream"
rows = "member"
table = "hq_events"
columns = { entry = "id", kind = "field.type", blob = "field.blob" }

[tables.hq_queued]
key = ["queue", "position"]
columns = { queue = "text", position = "integer", body = "bytea" }

[tables.hq_scheduled]
key = ["queue", "task"]
columns = { queue = "text", task = "bytea", at = "double precision" }

[tables.hq_tags]
key = ["queue", "tag"]
columns = { queue = "text", tag = "bytea" }

[tables.hq_events]
key = ["entry"]
columns = { entry = "text", kind = "text", blob = "bytea" }
"""


@pytest.mark.parametrize("pushes", [1, 99], ids=["pushed-once", "pushed-all-the-while"])
def test_a_large_list_pushed_to_while_it_is_read_in_parts_is_read_again_not_torn(settings, r, target, tmp_path,
                                                                                 monkeypatch, pushes):
    """A queue list read by index while the app pushes to its head: every index shifts, and the parts
    made a list it never was (an element twice, others not at all), which validated. The parts tell
    it (the element that stood next is not the one there now): the key is read again whole; one that
    moves on every read is a dead letter saying so."""
    path = tmp_path / "queues.toml"
    path.write_text(QUEUES)
    mapping = load_file(path)
    here = prepared(settings, target, mapping)
    r.rpush("hq:queue:jobs", *(f"job{i}" for i in range(2 * CHUNK_READ_MEMBERS + 500)))
    real, pushed = migrator.core.batch.read_parts, []

    def pushed_between_parts(client, first):
        for n, part in enumerate(real(client, first), 1):
            yield part
            if n == 1 and len(pushed) < pushes:
                pushed.append(r.lpush("hq:queue:jobs", f"new{len(pushed)}"))

    monkeypatch.setattr(migrator.core.batch, "read_parts", pushed_between_parts)
    report = migrate(here, mapping=mapping)
    found = by_pattern(report)["queue"]
    bodies = [bytes(b) for (b,) in rows(here, "SELECT body FROM hq_queued ORDER BY position")]
    if pushes == 1:
        assert (found["migrated"], found["dead"]) == (1, 0) and report["status"] == "completed", report
        assert bodies == r.lrange("hq:queue:jobs", 0, -1) and len(set(bodies)) == len(bodies)
    else:
        assert (found["migrated"], found["dead"], bodies) == (0, 1, []), report
        [(error,)] = rows(here, "SELECT error FROM migration_dead_letters WHERE run_id = %s", report["run_id"])
        assert "the list changed while it was read in parts" in error and "3 times in a row" in error, error


def test_binary_members_of_lists_sets_zsets_and_streams_go_to_bytea_and_a_pattern_none_of_whose_keys_migrated_is_named(
        settings, r, target, tmp_path):
    """What huey writes: a list of pickled tasks, a sorted set of pickles by when they run. A bytea
    column takes a binary member as it is; a text column given one makes its key a dead letter, and a
    pattern none of whose keys migrated is named where the run's dead letters are."""
    path = tmp_path / "queues.toml"
    path.write_text(QUEUES)
    mapping = load_file(path)
    here = prepared(settings, target, mapping)
    tasks = [pickle.dumps({"task": "add", "args": (i, "ünï")}) for i in range(3)]
    r.rpush("hq:queue:default", *tasks)
    r.zadd("hq:schedule:default", {tasks[0]: 1733500000.5, b"\x80\xff": 2.0})
    r.sadd("hq:tags:default", b"\xfe\xff", "plain")
    r.xadd("hq:events", {"type": "a", "blob": "text"}, id="1-0")
    r.xadd("hq:events", {"type": "b", "blob": b"\x80\x04K\x01."}, id="2-0")
    r.xgroup_create("hq:events", "workers", id="0")  # (its place and pending entries stay Redis's)
    r.xreadgroup("workers", "w1", {"hq:events": ">"}, count=1)
    report = migrate(here, mapping=mapping)
    assert report["status"] == "completed" and sum(p["dead"] for p in report["patterns"]) == 0, report
    assert [bytes(b) for (b,) in rows(here, "SELECT body FROM hq_queued ORDER BY position")] == tasks
    assert sorted((bytes(t), at) for t, at in rows(here, "SELECT task, at FROM hq_scheduled")) == \
        sorted([(tasks[0], 1733500000.5), (b"\x80\xff", 2.0)])
    assert sorted(bytes(t) for (t,) in rows(here, "SELECT tag FROM hq_tags")) == [b"plain", b"\xfe\xff"]
    assert [(e, k, bytes(b)) for e, k, b in rows(here, "SELECT entry, kind, blob FROM hq_events ORDER BY entry")] == \
        [("1-0", "a", b"text"), ("2-0", "b", b"\x80\x04K\x01.")]
    assert verify(here, report["run_id"], mapping=mapping)["verdict"] == "clean"
    assert migrate(here, mapping=mapping)["figures"]["rows_written"] == 0
    # the same keys read into text columns: every key of each pattern a dead letter, within the budget
    # of keys, and said so (a handful of keys is no proof of a mapping that cannot read them)
    path.write_text(QUEUES.replace('body = "bytea"', 'body = "text"').replace('task = "bytea"', 'task = "text"'))
    as_text = load_file(path)
    here = prepared(settings, target, as_text)
    told = migrate(here, mapping=as_text)
    found = by_pattern(told)
    assert (found["queue"]["dead"], found["schedule"]["dead"], found["queue"]["migrated"]) == (1, 1, 0), told
    shown = render(told)
    for name, column in (("queue", "body (value)"), ("schedule", "task (member)")):
        line = next(line for line in shown.splitlines() if line.startswith(f"  {name}: 1 dead"))
        assert f"column {column}: is not valid UTF-8" in line and "no key of it migrated: does its mapping read" in line
    with psycopg2.connect(here.database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT checks FROM migration_validations WHERE run_id = %s AND priority = 'medium'", (told["run_id"],))
        [checks] = cur.fetchone()
    conn.close()
    [dead] = [c for c in checks if c["name"] == "dead_letters"]
    assert dead["data"]["none_migrated"] == ["queue", "schedule"] and "no key of queue, schedule migrated" in dead["detail"]
    # --init sees the binary members, and a stream's binary field, in its examples
    shapes = {"hq:queue:*": "list", "hq:schedule:*": "zset", "hq:tags:*": "set", "hq:events": "stream"}
    guessed = {shape: _guess(r, {"shape": shape, "keys": 1, "types": {kind: 1}, "examples": [shape.replace("*", "default")]},
                             set(), set()).columns for shape, kind in shapes.items()}
    assert [guessed["hq:queue:*"]["value"], guessed["hq:schedule:*"]["member"], guessed["hq:tags:*"]["member"]] == \
        [("value", "bytea"), ("member", "bytea"), ("member", "bytea")]
    assert (guessed["hq:events"]["type"], guessed["hq:events"]["blob"]) == (("field.type", "text"), ("field.blob", "bytea"))
    stream = _guess(r, {"shape": "hq:events", "keys": 1, "types": {"stream": 1}, "examples": ["hq:events"]}, set(), set())
    assert any("consumer group(s) workers and their pending entries are not migrated" in n for n in stream.notes)


@pytest.fixture
def documents(tmp_path):
    path = tmp_path / "documents.toml"
    path.write_text(JSON_FILE)
    return path


def test_redisjson_patterns_are_refused_with_the_fix_when_the_module_is_not_loaded(settings, r, target, documents):
    if REDISJSON_MODULE in loaded_modules(r):
        pytest.skip("this Redis has RedisJSON loaded: the refusal cannot be seen here")
    mapping = load_file(documents)
    here = prepared(settings, target, mapping)
    client, conn = here.redis(), here.postgres()
    try:
        with pytest.raises(ConfigError, match="no RedisJSON module loaded .*; load it"):
            plan_run(client, conn, mapping, RunOptions(), here.redis_url)
    finally:
        client.close()
        conn.close()
    done = cli(here, "run", "--local", "--mapping", str(documents))
    assert done.returncode == 2 and "pattern(s) doc read RedisJSON documents" in done.stderr
    check = cli(here, "check", "--no-workers", "--mapping", str(documents))
    assert "FAIL  redis modules" in check.stdout and "loadmodule" in check.stdout
    assert rows(here, "SELECT count(*) FROM migration_runs") == [(0,)]


def test_redisjson_documents_are_read_into_rows(settings, r, target, documents):
    if REDISJSON_MODULE not in loaded_modules(r):
        pytest.skip(f"this Redis has no RedisJSON module (MODULE LIST names no {REDISJSON_MODULE}): the reader of "
                    f"{REDISJSON} keys cannot run here")
    mapping = load_file(documents)
    here = prepared(settings, target, mapping)
    r.execute_command("JSON.SET", "j:doc:1", "$", json.dumps({"title": "Hello", "n": [1, 2]}))
    r.set("j:doc:2", "a string, not a document")
    report = migrate(here, mapping=mapping)
    assert (by_pattern(report)["doc"]["migrated"], by_pattern(report)["doc"]["dead"]) == (1, 1)
    assert rows(here, "SELECT doc_id, title, whole FROM json_docs") == [("1", "Hello", {"title": "Hello", "n": [1, 2]})]
    assert verify(here, report["run_id"], mapping=mapping)["verdict"] == "clean"


# --- the shop, from the command line ----------------------------------------------------------------------------


def test_the_shop_file_mapping_runs_from_the_command_line_verifies_finds_damage_and_rolls_back(settings, r, target,
                                                                                              tmp_path):
    here = prepared(settings, target, SHOP)
    seeded = cli(here, "seed-demo", "--mapping", str(SHOP_FILE), "--users", "60", "--malformed", "6", "--fresh")
    assert seeded.returncode == 0 and "malformed" in seeded.stdout, seeded.stderr
    assert cli(here, "init-db", "--mapping", str(SHOP_FILE)).returncode == 0
    # a row the app wrote before the run, which the run changes: rollback puts it back as it was
    conn = here.postgres()
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO products (id, sku, name, price_cents) VALUES (%s, 'SKU-00001', 'from the app', 1)",
                    (stable_id("products", "SKU-00001"),))
    before = fingerprint(conn, list(SHOP.table_names()))

    done = cli(here, "run", "--local", "--json", "--mapping", str(SHOP_FILE), "--output-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.split("\n", 1)[1])
    assert report["status"] == "completed" and report["balanced"]
    found = by_pattern(report)
    assert sum(p["dead"] for p in found.values()) == 6  # the malformed keys, each a dead letter
    assert found["events"]["rows"] == 120 and found["bestsellers"]["rows"] == 15
    assert rows(here, "SELECT name FROM products WHERE sku = 'SKU-00001'") == [("T-shirt #1",)]
    [(carts, expiring)] = rows(here, "SELECT count(*), count(expires_at) FROM carts")
    assert carts == found["cart"]["migrated"] and expiring == carts  # each cart's TTL as expires_at

    document = cli(here, "mapping", "--mapping", str(SHOP_FILE), "--output-dir", str(tmp_path))
    assert document.returncode == 0 and "product_views" in document.stdout, document.stderr
    clean = cli(here, "verify", report["run_id"], "--local", "--mapping", str(SHOP_FILE))
    assert clean.returncode == 0 and "CLEAN" in clean.stdout.upper(), clean.stdout + clean.stderr
    with conn, conn.cursor() as cur:
        cur.execute("UPDATE products SET price_cents = price_cents + 1 WHERE sku = 'SKU-00002'")
        cur.execute("DELETE FROM events WHERE entry_id = (SELECT min(entry_id) FROM events)")
    damaged = cli(here, "verify", report["run_id"], "--local", "--json", "--mapping", str(SHOP_FILE))
    result = json.loads(damaged.stdout)
    by_name = {p["pattern"]: p for p in result["patterns"]}
    assert damaged.returncode == 1 and by_name["product"]["different"] == 1 and by_name["events"]["missing"] == 1, \
        [(p["pattern"], p["missing"], p["different"], p["changed"], p["extra"], p["examples"]) for p in result["patterns"]]

    undone = cli(here, "rollback", report["run_id"], "--mapping", str(SHOP_FILE))
    assert undone.returncode == 0, undone.stderr
    assert fingerprint(conn, list(SHOP.table_names())) == before
    conn.close()


def test_workers_load_the_file_mapping_the_run_names_and_migrate_it(settings, r, target, tmp_path):
    """A run on Celery workers: each loads the file by the absolute path the run recorded (the
    command was given a relative one), checked against the run's digest."""
    here = prepared(settings, target, SHOP)
    counts = seed_shop(r, 30)
    pool = Workers(worker_env(here), tmp_path)
    pool.start("files")
    try:
        done = cli(here, "run", "--json", "--mapping", str(SHOP_FILE.relative_to(ROOT)), "--output-dir", str(tmp_path))
    finally:
        pool.stop_all()
        from workers.celery import delete_queues

        delete_queues()
    assert done.returncode == 0, done.stderr + (tmp_path / "files.log").read_text()[-3000:]
    report = json.loads(done.stdout.split("\n", 1)[1])
    assert report["status"] == "completed" and by_pattern(report)["order"]["migrated"] == counts["order"]
    assert rows(here, "SELECT mapping_spec FROM migration_runs") == [(str(SHOP_FILE),)]


def test_the_audit_counts_a_stream_s_entries_as_its_rows(settings, r, target, tmp_path):
    here = prepared(settings, target, SHOP)
    counts = seed_shop(r, 20)
    done = cli(here, "audit", "--json", "--mapping", str(SHOP_FILE), "--output-dir", str(tmp_path))
    audit = json.loads(done.stdout)
    found = {p["pattern"]: p for p in audit["patterns"]}
    assert found["events"]["records"] == r.xlen("shop:events") == 40
    assert found["product"]["records"] == counts["product"]  # a hash read whole: one row per key
    assert audit["unmapped"]["keys"] == 0


# --- mapping --init ------------------------------------------------------------------------------------------


def test_mapping_init_writes_a_file_that_loads_and_migrates_the_shop(settings, r, target, tmp_path):
    seed_shop(r, 40)
    r.set("shop:note:one", "not JSON at all")  # another shape: its own pattern
    path = tmp_path / "start.toml"
    here = Settings(settings.redis_url, target, settings.broker_url)
    done = cli(here, "mapping", "--init", str(path))
    assert done.returncode == 0 and f"wrote {path}" in done.stdout, done.stderr
    text = path.read_text()
    mapping = load_file(path)
    types = {p.glob: (p.redis_type, p.value_format) for p in mapping.patterns}
    assert types == {"shop:product:*": ("hash", "hash_bytes"), "shop:cart:*": ("string", "json"),
                     "shop:order:*": ("string", "json"), "shop:views:*": ("string", "int"),
                     "shop:bestsellers": ("zset", "zset_bytes"), "shop:recent:*": ("list", "list_bytes"),
                     "shop:customer:*:orders": ("set", "set_bytes"), "shop:events": ("stream", "stream_bytes"),
                     "shop:note:one": ("string", "text")}
    assert mapping.name == "shop" and 'customer = "json.customer"' in text and '"id.time"' in text
    assert "# " in text and "key(s) like shop:product:" in text

    # it refuses to overwrite, unless told
    path.write_text("# mine\n")
    again = cli(here, "mapping", "--init", str(path))
    assert again.returncode == 2 and "--force" in again.stderr and path.read_text() == "# mine\n"
    assert cli(here, "mapping", "--init", str(path), "--force").returncode == 0
    assert path.read_text().split("\n", 2)[2] == text.split("\n", 2)[2]  # (but for the time of the audit)

    prepared(settings, target, mapping)
    assert cli(here, "init-db", "--mapping", str(path)).returncode == 0
    run = cli(here, "run", "--local", "--json", "--mapping", str(path), "--output-dir", str(tmp_path))
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.split("\n", 1)[1])
    assert report["status"] == "completed" and sum(p["dead"] for p in report["patterns"]) == 0
    assert verify(here, report["run_id"], mapping=mapping)["verdict"] == "clean"


def test_mapping_init_of_a_hostile_keyspace_writes_a_file_that_loads_and_runs(settings, r, target, tmp_path):
    r.hset("user:alice@example.com:profile", mapping={"name": "Alice", "since": "2024-05-01"})
    r.set("ip:2001:db8::1", 3)  # an IPv6 address: its field spans colons
    r.set("ip:10.0.0.1", 4)
    r.set("odd\nkey:1", "line\nbreak")
    r.set(b"bin:\xff1", "x")  # a key name that is not UTF-8: a dead letter of its pattern
    r.set("tpl:{x}:1", '{"id": 7, "a.b": 1, "order": "o", "": 0}')  # braces; JSON keys no column can be named
    r.hset("wide:1", mapping={f"f{i}": i for i in range(100)})  # many fields: one row per field
    r.set("empty:1", "")
    r.set("2fa:code:1", "x")  # a first segment that starts with a digit: a pattern's name starts with a letter
    r.set("otp:1", "066172")  # codes: a leading zero makes them text, whichever example comes first
    r.set("otp:2", "123456")
    path = tmp_path / "hostile.toml"
    here = Settings(settings.redis_url, target, settings.broker_url)
    done = cli(here, "mapping", "--init", str(path))
    assert done.returncode == 0, done.stderr
    text = path.read_text()
    mapping = load_file(path)
    assert "alice" not in text and "example.com" not in text  # emails are masked in the comments
    assert 'key = "ip:{ip:.+}"' in text and 'key = "tpl:{{x}}:{x:\\\\d+}"' in text and 'rows = "member"' in text
    assert mapping.classify("ip:2001:db8::1")[1] == {"ip": "2001:db8::1"}
    # the audit shows a newline in a key name escaped: the grammar made of it says so, for a person to fix
    assert text.count("could be read back as a string by its name") == 2  # (that key, and the one that is not UTF-8)
    prepared(settings, target, mapping)
    assert cli(here, "init-db", "--mapping", str(path)).returncode == 0
    report = migrate(here, mapping=mapping)
    assert report["balanced"] and report["status"] == "completed", report
    found = by_pattern(report)
    assert sum(p["dead"] for p in found.values()) == 1 and sum(p["migrated"] for p in found.values()) == 9
    assert found["unmapped"]["skipped"] == 1, found  # the key with a newline, until its grammar is fixed
    assert [v for (v,) in rows(here, "SELECT value FROM otp ORDER BY 1")] == ["066172", "123456"]
    assert rows(here, "SELECT value FROM k2fa_code") == [("x",)]


def test_mapping_init_of_what_job_queues_and_caches_write_migrates_it_whole(settings, r, target, tmp_path):
    """Celery's results (an id in the first segment), RQ's jobs (a pickled field), a pickled cache
    entry, kombu's unacked hash (fields named by delivery tags), a hash keyed by emails, one with an
    empty field name: a pattern per shape, binary data in bytea columns, fields named by data as a
    row each (no email in the file), and every key migrated."""
    blob = zlib.compress(pickle.dumps(("job", 1)))
    for n in range(3):
        r.set(f"celery-task-meta-{uuid.uuid4()}", json.dumps({"status": "SUCCESS", "result": n, "task_id": "x"}))
        r.hset(f"rq:job:{uuid.uuid4()}", mapping={"status": "finished", "data": blob, "origin": "default"})
        r.set(f"cache:page{n}", pickle.dumps({"n": n}))
    r.hset("unacked", mapping={str(uuid.uuid4()): json.dumps([{"body": "b"}, "celery", "celery"]) for _ in range(3)})
    r.hset("seen:by", mapping={"alice@example.com": "2024-05-01", "bob@example.com": "2024-05-02"})
    r.hset("acct:1", mapping={"": "blank", "plan": "pro"})
    path = tmp_path / "libraries.toml"
    here = Settings(settings.redis_url, target, settings.broker_url)
    done = cli(here, "mapping", "--init", str(path))
    assert done.returncode == 0, done.stderr
    text = path.read_text()
    mapping = load_file(path)
    assert sorted(p.glob for p in mapping.patterns) == ["acct:*", "cache:*", "celery-task-meta-*", "rq:job:*", "seen:by",
                                                        "unacked"], text
    assert "example.com" not in text and "alice" not in text
    shapes = {p.glob: p for p in mapping.patterns}
    assert shapes["cache:*"].value_format == "bytes" and shapes["unacked"].member_wise and shapes["seen:by"].member_wise
    assert 'data = "field.data"' in text and '"bytea"' in text and "cannot be a field.<name>" in text
    prepared(settings, target, mapping)
    assert cli(here, "init-db", "--mapping", str(path)).returncode == 0
    report = migrate(here, mapping=mapping)
    assert report["status"] == "completed" and report["balanced"], report
    found = by_pattern(report)
    assert sum(p["dead"] for p in found.values()) == 0 and sum(p["migrated"] for p in found.values()) == 12, found
    table = shapes["rq:job:*"].table
    assert {bytes(b) for (b,) in rows(here, f'SELECT data FROM "{table}"')} == {blob}
    conn = here.postgres()
    try:
        said = render({**report, "monitoring": monitoring(conn, mapping)})
    finally:
        conn.close()
    assert "tables (rows counted now): " in said and "figures:" not in said  # (a file declares no figures)
    assert verify(here, report["run_id"], mapping=mapping)["verdict"] == "clean"


def test_mapping_init_keeps_what_its_examples_do_not_show(settings, r, target, tmp_path):
    """Columns are guessed from a few example keys, so every JSON document and small hash also goes
    whole into a jsonb column: a field only other keys hold is not lost. Zip codes keep their zeros,
    numbered jobs' grammar leaves a queue's other keys alone, a shape whose first example changed type
    and an empty key name do not stop --init, and a value a column refuses is logged without its digits."""
    for n in range(10):
        job = {"name": "send", "data": json.dumps({"to": n})}
        if n >= 5:
            job["failedReason"] = "boom"  # only jobs past the examples failed
        r.hset(f"bull:mail:{n + 1}", mapping=job)
        r.set(f"sess:{n}", json.dumps({"cookie": {"maxAge": 60}, **({"returnTo": "/cart"} if n >= 5 else {})}))
        r.set(f"zip:{n}", "00701")
    r.rpush("bull:mail:wait", "1", "2")  # a queue's own key beside its numbered jobs
    r.set("", "the empty key")
    path = tmp_path / "wide.toml"
    here = Settings(settings.redis_url, target, settings.broker_url)
    done = cli(here, "mapping", "--init", str(path))
    assert done.returncode == 0, done.stderr
    text = path.read_text()
    mapping = load_file(path)
    assert mapping.classify("bull:mail:wait")[0].redis_type == "list" and 'key = "bull:mail:{mail:\\\\d+}"' in text
    assert mapping.classify("zip:3")[0].value_format == "text"
    prepared(settings, target, mapping)
    report = migrate(here, mapping=mapping)
    assert report["status"] == "completed" and sum(p["dead"] for p in report["patterns"]) == 0, report
    jobs, sessions = mapping.classify("bull:mail:1")[0].table, mapping.classify("sess:1")[0].table
    assert rows(here, f'SELECT count(*) FROM "{jobs}" WHERE fields ->> \'failedReason\' = \'boom\'') == [(5,)]
    assert rows(here, f'SELECT count(*) FROM "{sessions}" WHERE document ->> \'returnTo\' = \'/cart\'') == [(5,)]
    assert rows(here, f'SELECT DISTINCT value FROM "{mapping.classify("zip:1")[0].table}"') == [("00701",)]
    # a shape whose first example holds another type than most of its keys: guessed from one of theirs
    r.set("mix:1", "a string")
    r.hset("mix:2", mapping={"plan": "pro"})
    guess = _guess(r, {"shape": "mix:*", "keys": 2, "types": {"hash": 1, "string": 1}, "examples": ["mix:1", "mix:2"]},
                   set(), set())
    assert guess.columns["plan"] == ("field.plan", "text") and guess.notes[0].startswith("also 1 string key(s)")
    none_of_it = _guess(r, {"shape": "mix:*", "keys": 6, "types": {"hash": 5, "string": 1}, "examples": ["mix:1"]},
                        set(), set())
    assert "no example could be read back as a hash" in none_of_it.notes[-1] and list(none_of_it.columns) == ["mix"]


@pytest.mark.parametrize("order", [["w:1", "w:2", "w:3"], ["w:3", "w:2", "w:1"]], ids=["wide first", "wide last"])
def test_mapping_init_types_a_column_by_all_its_examples_whichever_comes_first(r, order):
    r.set("w:1", json.dumps({"a": 2**70, "f": 1.5, "s": "x", "mixed": "7", "when": "2024-05-01T10:00:00", "opt": None}))
    r.set("w:2", json.dumps({"a": 1, "f": 2, "s": "y", "mixed": {"n": 7}, "when": "soon", "opt": None}))
    r.set("w:3", json.dumps({"a": 2, "f": 3, "s": "z", "mixed": 7, "when": "2024-05-02T10:00:00", "opt": 1}))
    for k, fields in (("h:1", {"n": "1", "t": "x", "d": "2024-05-01"}), ("h:2", {"n": "1.25", "t": "2", "d": "2024-05-02"})):
        r.hset(k, mapping=fields)
    documents = _guess(r, {"shape": "w:*", "keys": 3, "types": {"string": 3}, "examples": order}, set(), set())
    assert {c: t for c, (_, t) in documents.columns.items()} == {  # (w: the key's field)
        "w": "text", "a": "numeric", "f": "numeric", "s": "text", "mixed": "jsonb", "when": "text", "opt": "bigint", "document": "jsonb"}
    hashes = _guess(r, {"shape": "h:*", "keys": 2, "types": {"hash": 2}, "examples": ["h:2", "h:1"]}, set(), set())
    assert {c: t for c, (_, t) in hashes.columns.items()} == {"h": "text", "n": "numeric", "t": "text", "d": "date",
                                                              "fields": "jsonb"}
    # binary values: no jsonb column keeps the fields the examples did not show, and the draft says so
    r.hset("job:1", mapping={"state": b"\x80\x04done", "retries": b"\x00\x01"})
    binary = _guess(r, {"shape": "job:*", "keys": 1, "types": {"hash": 1}, "examples": ["job:1"]}, set(), set())
    assert "fields" not in binary.columns and any("binary values" in n for n in binary.notes), binary.notes


def test_a_value_a_column_refuses_is_told_without_its_digits(settings, r, target, kinds):
    here = prepared(settings, target, kinds)
    r.set("k:doc:1", '{"title": "T", "price": "078-05-1120"}')
    report = migrate(here, mapping=kinds, priorities=("high",))
    [(error,)] = rows(here, "SELECT error FROM migration_dead_letters WHERE run_id = %s", report["run_id"])
    assert "expected a number, got '###-##-####'" in error and "078" not in error, error


def test_mapping_init_says_when_shapes_past_the_audits_first_100_are_left_out(settings, r, tmp_path):
    for n in range(105):
        r.set(f"app{n}:x", "v")  # (a first segment is a name, not an id: 105 shapes)
    done = cli(settings, "mapping", "--init", str(tmp_path / "m.toml"))
    assert done.returncode == 0 and "100 pattern(s)" in done.stdout, done.stderr
    assert "left out: 5 key(s) of shapes past the first 100" in done.stdout and "`migrator audit` lists them" in done.stdout


def test_mapping_init_of_an_empty_keyspace_says_so(settings, r, tmp_path):
    done = cli(settings, "mapping", "--init", str(tmp_path / "m.toml"))
    assert done.returncode == 2 and "holds no keys to map" in done.stderr and not (tmp_path / "m.toml").exists()
