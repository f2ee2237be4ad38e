"""`migrator verify` and the verdicts built on it: every kind of damage is named, by pattern and
column; what the app changed since is said as such; a systematic fault fails its priority."""
from __future__ import annotations

import json
import re
import time

import psycopg2
import pytest
import redis
from psycopg2 import sql

from migrator.apps.threadr.demo import LARGE_THREAD_CHARS, seed_demo
from migrator.apps.threadr import THREADR
from migrator.core import verify as verify_module
from migrator.core.config import Settings
from migrator.core.mapping import Mapping, Pattern, Priority, Row, SourceRecord
from migrator.core.merge import TableRule
from migrator.core.schema import PROVENANCE, init_db
from migrator.core.values import stable_id
from migrator.core.options import RunOptions
from migrator.core.verify import explain, verify_in_memory

from helpers import by_pattern, cli, migrate, throwaway_database, verify
from servers import Forwarder, redis_server

PRIORITIES = [Priority.parse(p) for p in ("critical", "high", "medium", "low")]
KEYS = {"run_id", "verdict", "missing", "different", "extra", "patterns"}


def columns_of(cur, table: str) -> list[tuple[str, str]]:
    """(column, type) of the content columns of a table: what a row says, not where it came from."""
    cur.execute("SELECT attname, format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = %s::regclass"
                " AND attnum > 0 AND NOT attisdropped ORDER BY attnum", (table,))
    return [(c, t) for c, t in cur.fetchall() if c not in ("id", *PROVENANCE)]


# Ways to change a value of each type, tried in order until one is accepted by the table's constraints.
CHANGES = {
    "text": ["{c} || 'x'", "'x'"],
    "boolean": ["NOT {c}", "true"],
    "integer": ["{c} + 1", "1"], "bigint": ["{c} + 1", "1"], "smallint": ["CASE WHEN {c} > 0 THEN {c} - 1 ELSE 1 END", "1"],
    "double precision": ["{c} + 1", "1"],
    "timestamp with time zone": ["{c} + interval '1 hour'", "now()"],
    "date": ["{c} + 1", "current_date"],
    "jsonb": ["{c} || '{{\"tampered\": 1}}'::jsonb", "jsonb_build_array({c}, 1)", "'[1]'::jsonb"],
    "uuid": ["gen_random_uuid()"],
}


def tamper(cur, table: str, column: str, type_name: str, row_id: str) -> bool:
    """Change one column of one row to another value the table accepts; whether it could."""
    for change in [f"(SELECT {{c}} FROM {table} WHERE {{c}} IS DISTINCT FROM t.{{c}} AND {{c}} IS NOT NULL LIMIT 1)",
                   *CHANGES[type_name]]:
        cur.execute("SAVEPOINT tamper")
        try:
            cur.execute(sql.SQL("UPDATE {t} AS t SET {c} = " + change.format(c="{c}") + " WHERE t.id = %s"
                                " AND t.{c} IS DISTINCT FROM " + change.format(c="{c}")).format(
                t=sql.Identifier(table), c=sql.Identifier(column)), (row_id,))
            if cur.rowcount == 1:
                cur.execute("RELEASE SAVEPOINT tamper")
                return True
        except Exception:  # a constraint of the table (unique, check): try the next change
            pass
        cur.execute("ROLLBACK TO SAVEPOINT tamper")
    return False


def test_verify_names_every_tampered_column_every_deleted_row_and_every_planted_row(settings, r, pg):
    seed_demo(r, 120)
    report = migrate(settings)
    assert report["status"] == "completed"
    clean = cli(settings, "verify", "--local", "--json")
    assert clean.returncode == 0, clean.stderr
    result = json.loads(clean.stdout)
    assert KEYS <= set(result) and result["run_id"] == report["run_id"]
    assert (result["verdict"], result["missing"], result["different"], result["extra"]) == ("clean", 0, 0, 0)
    # the demo's dead letter (a thread Threadr's model refuses) has no rows: the verdict says so
    said = cli(settings, "verify", "--local").stdout.splitlines()[0]
    assert result["totals"]["dead"] == 1 and said.endswith(
        f"CLEAN of the keys that have rows: 1 key(s) are the run's dead letters and 0 cannot be migrated now, with no "
        f"rows (`migrator report {report['run_id']}` says why)"), said
    compared = {p["pattern"]: p for p in result["patterns"]}
    assert all(compared[p["pattern"]]["compared"] == p["migrated"] for p in report["patterns"] if p["table"])

    tampered: list[tuple[str, str]] = []
    with pg.cursor() as cur:
        for table in THREADR.table_names():
            cur.execute(sql.SQL("SELECT id FROM {} WHERE source_key IS NOT NULL ORDER BY id").format(sql.Identifier(table)))
            ids = [row[0] for row in cur.fetchall()]
            for n, (column, type_name) in enumerate(columns_of(cur, table)):
                if tamper(cur, table, column, type_name, ids[n % len(ids)]):
                    tampered.append((table, column))
        untouched = lambda t: sql.SQL("(SELECT id FROM {} ORDER BY id DESC LIMIT 1)").format(sql.Identifier(t))  # noqa: E731
        cur.execute(sql.SQL("DELETE FROM usage_counters WHERE id = {}").format(untouched("usage_counters")))
        cur.execute(sql.SQL("DELETE FROM threads WHERE id = {}").format(untouched("threads")))
        # a row that carries the run's mark but no key of the keyspace ever gave it
        cur.execute("INSERT INTO usage_stats (id, stat_name, value, migration_run, source_key, metadata)"
                    " SELECT gen_random_uuid(), 'planted', 1, migration_run, source_key, metadata FROM usage_stats LIMIT 1")
    pg.commit()
    assert len(tampered) >= 90  # every content column of every table (a few a constraint keeps equal)

    damaged = cli(settings, "verify", "--local", "--json")
    assert damaged.returncode == 1, damaged.stderr
    result = json.loads(damaged.stdout)
    assert result["verdict"] == "differences" and result["missing"] >= 2 and result["extra"] == 1
    patterns = {p["pattern"]: p for p in result["patterns"]}
    # columns of another table than the pattern's own (legacy_id_map's, from the user pattern) carry its name
    named = {tuple(c.split(".")) if "." in c else (p["table"], c) for p in result["patterns"] for c in p["columns"]}
    assert set(tampered) <= named, set(tampered) - named
    assert patterns["usage_counter"]["missing"] == 1 and patterns["thread"]["missing"] == 1
    assert patterns["usage_stats"]["extra"] == 1
    assert result["different"] >= len(tampered)

    shown = cli(settings, "verify", "--local", "--show-diffs", "2")
    assert shown.returncode == 1
    assert "DIFFERENCES" in shown.stdout and "differing columns" in shown.stdout and "postgres " in shown.stdout
    assert "extra" in shown.stdout and "its key no longer gives this row" in shown.stdout
    # values are masked: no password hash, email or IP address in full
    assert not re.search(r"\$2b\$12\$[./A-Za-z0-9]{53}", shown.stdout)
    assert not re.search(r"[\w.+-]+@[\w-]+\.[\w.]+", shown.stdout)
    assert not re.search(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b", shown.stdout)


def test_what_the_app_changed_since_the_run_is_reported_as_such_and_is_no_difference(settings, r, pg):
    seed_demo(r, 40)
    report = migrate(settings)
    assert report["status"] == "completed"
    assert cli(settings, "verify", report["run_id"], "--local", "--strict").returncode == 0  # nothing behind yet
    user_key = sorted(r.scan_iter("threadr:user:user_*", count=1000))[0]
    user = json.loads(r.get(user_key))
    r.set(user_key, json.dumps({**user, "password_hash": "$2b$12$" + "n" * 53, "updated_at": "2031-01-01T00:00:00"}),
          keepttl=True)
    counter = sorted(r.scan_iter("threadr:usage:ip:*", count=1000))[0]
    r.incr(counter)  # the app counted one more generation since
    result = verify(settings, report["run_id"])
    patterns = {p["pattern"]: p for p in result["patterns"]}
    assert patterns["user"]["changed"] == 1 and patterns["usage_counter"]["changed"] == 1
    assert result["changed_since_run"] == 2 and result["different"] == 0
    assert result["verdict"] == "clean"
    # before a cutover, rows behind their key are not clean: --strict says STALE, exit 1
    strict = cli(settings, "verify", report["run_id"], "--local", "--strict")
    assert strict.returncode == 1 and "STALE: 2 row(s) behind what their key holds now" in strict.stdout, strict.stdout
    # the same rows changed in PostgreSQL instead, with Redis as it was: differences
    r.set(user_key, json.dumps(user), keepttl=True)
    r.decr(counter)
    with pg.cursor() as cur:
        cur.execute("UPDATE usage_counters SET count = count + 1 WHERE source_key = %s", (counter.decode(),))
    pg.commit()
    result = verify(settings, report["run_id"])
    assert result["verdict"] == "differences"
    assert {p["pattern"]: p["different"] for p in result["patterns"] if p["different"]} == {"usage_counter": 1}


def test_keys_the_app_deleted_or_let_expire_since_the_run(settings, r, pg):
    seed_demo(r, 40)
    report = migrate(settings)
    with pg.cursor() as cur:
        cur.execute("SELECT source_key FROM threads ORDER BY id LIMIT 1")
        deleted = cur.fetchone()[0]
    r.delete(deleted)  # deleted by the app: its row has no key now
    with pg.cursor() as cur:  # a session whose key expired: its row outlived its TTL
        cur.execute("UPDATE sessions SET expires_at = now() - interval '1 minute' WHERE id = (SELECT id FROM sessions ORDER BY id LIMIT 1)"
                    " RETURNING source_key")
        expired_key = cur.fetchone()[0]
    pg.commit()
    r.delete(expired_key)
    with pg.cursor() as cur:  # a row under the demo's large thread (read whole) that its value does not give
        cur.execute("INSERT INTO threads SELECT (jsonb_populate_record(t, jsonb_build_object('id', gen_random_uuid()))).*"
                    " FROM threads t WHERE length(original_content) > %s RETURNING source_key", (LARGE_THREAD_CHARS - 1,))
        large = cur.fetchone()[0]
    pg.commit()
    result = verify(settings, report["run_id"])
    patterns = {p["pattern"]: p for p in result["patterns"]}
    assert patterns["thread"]["extra"] == 2 and patterns["session"]["expired_rows"] == 1
    assert patterns["session"]["extra"] == 0 and result["extra"] == 2 and result["different"] == 0
    whys = {e["key"]: e["why"] for e in patterns["thread"]["examples"] if e["kind"] == "extra"}
    assert whys == {deleted: "its key is not in Redis", large: "its key no longer gives this row"}


def test_a_row_never_says_its_key_expires_later_than_redis_expires_it(settings, r, pg):
    """A row's expires_at is the key's PTTL from a moment before the read was sent: never past Redis's
    own expiry, however long the reply took (here a link that holds each reply 0.3 s). Counted from
    when the reply came, it ran late by the round trip, and a verification just after the key expired
    found its row not yet due: "extra", a difference (the bench's 1M-key verify, at the demo's
    shortest TTLs)."""
    from urllib.parse import urlsplit, urlunsplit

    key = "threadr:usage:ip:198.51.100.7:daily:2026-11-02"
    r.set(key, 3, px=600_000)
    expires = r.pexpiretime(key)  # Redis's own, in Unix ms
    url = urlsplit(settings.redis_url)
    slow = Forwarder("127.0.0.1", url.port, reply_delay=0.3)
    try:
        report = migrate(Settings(urlunsplit(url._replace(netloc=f"127.0.0.1:{slow.port}")), settings.database_url,
                                  settings.broker_url))
    finally:
        slow.close()
    assert report["status"] == "completed"
    with pg.cursor() as cur:
        cur.execute("SELECT (extract(epoch FROM expires_at) * 1000)::bigint FROM usage_counters WHERE source_key = %s", (key,))
        (said,) = cur.fetchone()
    pg.rollback()
    assert expires - 60_000 < said <= expires + 1, (said, expires)  # (+1: PTTL counts whole milliseconds)


def test_a_session_that_compared_before_sees_a_row_damaged_since(settings, r, pg):
    """The comparison statements are planned once per session (functions of its own, 016): a session
    that found the run clean finds a column changed since, as a new one would; a function made in a
    transaction that rolled back is made again."""
    seed_demo(r, 40)
    report = migrate(settings)
    assert report["status"] == "completed"
    client, conn = settings.redis(), settings.postgres()

    def made() -> int:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_proc WHERE pronamespace = pg_my_temp_schema()"
                        " AND proname LIKE 'migrator_compare_%'")
            return cur.fetchone()[0]

    try:
        counted = "SELECT count(*), '[]'::jsonb FROM jsonb_array_elements($1::jsonb)"
        for _ in range(2):  # a function made in a transaction that rolls back goes with it, and is made again
            with conn.cursor() as cur:
                cur.execute("SELECT attributed FROM migrator_compare(%s, %s)", ([counted], ["[1, 2]"]))
                assert cur.fetchone()[0] == [2] and made() == 1
            conn.rollback()
            assert made() == 0
        first = verify_in_memory(client, conn, THREADR, report["run_id"], PRIORITIES)
        assert first["verdict"] == "clean", first["error"]
        kept = made()
        assert kept > 0
        with pg.cursor() as cur:
            cur.execute("UPDATE usage_counters SET count = count + 1 WHERE id = (SELECT id FROM usage_counters ORDER BY id LIMIT 1)")
        pg.commit()
        damaged = verify_in_memory(client, conn, THREADR, report["run_id"], PRIORITIES)
        assert damaged["verdict"] == "differences" and damaged["different"] == 1
        assert by_pattern(damaged)["usage_counter"]["columns"] == {"count": 1}
        assert made() == kept  # the same statements, planned before
    finally:
        conn.close()
        client.close()


@pytest.mark.parametrize("held", [verify_module.DEAD_KEYS_HELD, 0])
def test_the_runs_dead_letters_are_counted_as_dead_whether_held_or_looked_up(settings, r, pg, monkeypatch, held):
    """A key the run made a dead letter has no rows to compare: counted dead, never missing, whether
    a range holds the run's dead letters or (more than it holds) looks them up chunk by chunk."""
    seed_demo(r, 40)
    broken = sorted(r.scan_iter("threadr:usage:ip:*:daily:*", count=1000))[:7]
    for key in broken:
        r.set(key, f"{int(r.get(key))} generations", keepttl=True)
    report = migrate(settings, max_dead_ratio=1)
    assert report["status"] == "completed"
    monkeypatch.setattr(verify_module, "DEAD_KEYS_HELD", held)
    result = verify(settings, report["run_id"])
    counters = by_pattern(result)["usage_counter"]
    assert counters["dead"] == len(broken) and counters["missing"] == 0 and result["verdict"] == "clean"


@pytest.mark.parametrize("broken, budget, completes", [(30, None, False), (8, None, True), (30, "0.5", True)])
def test_a_pattern_whose_values_are_broken_beyond_its_budget_fails_its_priority(settings, r, pg, tmp_path,
                                                                               broken, budget, completes):
    """30 % of one pattern's values broken the same way is a systematic fault: its priority fails
    and the run is rolled back, the reason read as one line with its count."""
    seed_demo(r, 40)
    counters = sorted(r.scan_iter("threadr:usage:ip:*:daily:*", count=1000))
    share = int(len(counters) * broken / 100)
    for key in counters[:share]:
        r.set(key, f"{int(r.get(key))} generations", keepttl=True)
    done = cli(settings, "run", "--local", "--json", "--output-dir", str(tmp_path),
               *(["--max-dead-ratio", budget] if budget else []))
    final = json.loads(done.stdout.split("\n", 1)[1])  # after the line naming the run
    dead = by_pattern(final)["usage_counter"]["dead"]
    assert dead == share > 10 or broken < 30
    if completes:
        assert done.returncode == 0 and final["status"] == "completed", final["error"]
        return
    assert done.returncode == 1 and final["status"] == "rolled_back"
    assert final["error"].startswith("priority high did not validate: dead letters over budget: usage_counter "
                                     f"{share:,} of ")
    assert f"{share:,} x \"value '…' is not an integer as INCR writes one\"" in final["error"]  # one line, however many keys
    status = cli(settings, "status", final["run_id"])
    assert f"usage_counter: {share:,} dead" in status.stdout and "is not an integer" in status.stdout


# --- what a validation asks Redis: a key's TTL only for a pattern whose rows are made from it ----

GIZMOS_DDL = "CREATE TABLE IF NOT EXISTS gizmos (id uuid PRIMARY KEY, name text NOT NULL, lasting boolean)"


def _lasting(rec: SourceRecord) -> list[Row]:
    """A row with a column made from the key's TTL (a Python transform may read it)."""
    return [Row("gizmos", {"id": stable_id("gizmo", rec.key), "name": rec.value, "lasting": rec.expires_at is None})]


def _plain(rec: SourceRecord) -> list[Row]:
    return [Row("gizmos", {"id": stable_id("gizmo", rec.key), "name": rec.value})]


GIZMOS = Mapping("gizmos", (
    Pattern("lasting", "gizmo:ttl:*", r"gizmo:ttl:(?P<id>\w+)", "string", Priority.HIGH, "a gizmo and whether it lasts",
            value_format="text", table="gizmos", transform=_lasting),
    Pattern("plain", "gizmo:plain:*", r"gizmo:plain:(?P<id>\w+)", "string", Priority.HIGH, "a gizmo",
            value_format="text", table="gizmos", transform=_plain),
), rules=(TableRule("gizmos"),), schema=(GIZMOS_DDL,))


@pytest.fixture
def gizmos(settings, tmp_path):
    """Settings on a redis-server and a database of the test's own (the GIZMOS schema), a client of
    that server, and a function counting its calls of one command so far."""
    with redis_server(tmp_path) as port, redis.Redis(port=port) as client, \
            throwaway_database(settings.database_url) as url:
        conn = psycopg2.connect(url)
        init_db(conn, GIZMOS)
        conn.close()
        calls = lambda name: client.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0)  # noqa: E731
        yield Settings(f"redis://127.0.0.1:{port}/0", url, settings.broker_url), client, calls


def _in_run_validation(settings: Settings, run_id: str) -> dict:
    """Per pattern, what the run's validation of GIZMOS's one priority found."""
    conn = psycopg2.connect(settings.database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT result FROM migration_verifications WHERE run_id = %s AND from_spool"
                        " AND priorities = '{high}'", (run_id,))
            return {p["pattern"]: p for p in cur.fetchone()[0]["patterns"]}
    finally:
        conn.close()


def test_a_validation_asks_every_key_s_ttl_checks_a_column_made_from_it_and_tells_a_moved_expiry(gizmos):
    settings, client, calls = gizmos
    client.set("gizmo:ttl:a", "A", ex=3600)
    client.set("gizmo:ttl:b", "B")
    client.set("gizmo:plain:c", "")  # an empty value: there, though GETRANGE answers a missing key the same
    client.set("gizmo:plain:d", "D", ex=3600)
    client.config_resetstat()
    report = migrate(settings, mapping=GIZMOS, validation="reread")  # (a sealed one reads no value)
    assert report["status"] == "completed", report["error"]
    # the batch and the validation ask every key's PTTL, which also tells the empty string is there
    assert (calls("pttl"), calls("exists")) == (4 + 4, 0)
    found = _in_run_validation(settings, report["run_id"])
    assert found["lasting"]["compared"] == 2 and found["plain"]["compared"] == 2
    assert all(p["different"] == p["missing"] == p["expired"] == p["changed"] == 0 for p in found.values())

    conn = psycopg2.connect(settings.database_url)
    with conn, conn.cursor() as cur:  # the column made from the TTL, damaged: verify names it
        cur.execute("UPDATE gizmos SET lasting = NOT lasting WHERE source_key = 'gizmo:ttl:a'")
    damaged = verify(settings, report["run_id"], mapping=GIZMOS)
    assert damaged["verdict"] == "differences" and damaged["different"] == 1
    assert {p["pattern"]: p["columns"] for p in damaged["patterns"] if p["different"]} == {"lasting": {"lasting": 1}}
    with conn, conn.cursor() as cur:
        cur.execute("UPDATE gizmos SET lasting = NOT lasting WHERE source_key = 'gizmo:ttl:a'")

    # the app made a key lasting and gave another a TTL (a session touched, a cache entry kept): their
    # rows' expiry is no longer the keys', which verify tells as changed since the run, naming it
    client.persist("gizmo:plain:d")
    client.expire("gizmo:plain:c", 600)
    moved = verify(settings, report["run_id"], mapping=GIZMOS)
    plain = next(p for p in moved["patterns"] if p["pattern"] == "plain")
    assert (moved["verdict"], moved["changed_since_run"], plain["changed"], plain["different"]) == ("clean", 2, 2, 0), moved
    assert sorted((e["key"], e["columns"]) for e in plain["examples"]) == \
        [("gizmo:plain:c", ["expires_at"]), ("gizmo:plain:d", ["expires_at"])]
    [example] = [e for e in plain["examples"] if e["key"] == "gizmo:plain:d"]
    [diff] = explain(client, conn, GIZMOS, example, RunOptions())  # (--show-diffs: the expiry shown whole)
    assert diff["column"] == "expires_at" and diff["postgres"] > "2026" and diff["redis"] is None, diff
    assert migrate(settings, mapping=GIZMOS)["figures"]["rows_written"] == 2  # a re-run gives them the keys' expiry
    assert verify(settings, report["run_id"], mapping=GIZMOS)["changed_since_run"] == 0
    with conn, conn.cursor() as cur:  # a row's expiry moved in PostgreSQL (its key's as it was): told too
        cur.execute("UPDATE gizmos SET expires_at = now() + interval '1 day' WHERE source_key = 'gizmo:ttl:b'")
    conn.close()
    assert verify(settings, report["run_id"], mapping=GIZMOS)["changed_since_run"] == 1


def test_a_string_that_expires_between_its_batch_and_its_validation_counts_expired_not_different(gizmos, monkeypatch):
    """Read without its PTTL, a string gone since its batch answers "" as an empty value would: it is
    told apart (EXISTS) and counted expired, not a row that differs."""
    import migrator.execution.finalize

    settings, client, _ = gizmos
    client.set("gizmo:plain:short", "S", px=1500)
    client.set("gizmo:plain:long", "L")
    real_link = migrator.execution.finalize.link_rows

    def link_then_wait(conn, mapping, run_id):  # after the priority's batches, before its validation
        time.sleep(1.6)
        return real_link(conn, mapping, run_id)

    monkeypatch.setattr(migrator.execution.finalize, "link_rows", link_then_wait)
    report = migrate(settings, mapping=GIZMOS, validation="reread")  # (a sealed one reads no value)
    assert report["status"] == "completed", report["error"]
    plain = _in_run_validation(settings, report["run_id"])["plain"]
    assert (plain["compared"], plain["expired"], plain["different"]) == (1, 1, 0)
