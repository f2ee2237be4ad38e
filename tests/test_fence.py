"""The fence between a bulk run and a live `migrator follow` session (issue 18 item 3): a bulk batch
does not replace a row that follow wrote from a read of its key later than the batch began, so a run
started while follow is live needs no second pass. The interleaving is made exact: while the run's
batch holds its read of a key, the app writes the key and follow applies it (its own code path,
committed), and only then does the batch write what it read. Real Redis and PostgreSQL; the run is a
whole local run, verified and rolled back as an operator would."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import orjson
import pytest
import redis
from psycopg2 import sql

import migrator.core.batch
from migrator.apps.threadr import THREADR
from migrator.apps.threadr.demo import seed_demo
from migrator.core import ledger
from migrator.execution.follow import apply_keys, end_session, record_figures, start_session
from helpers import cli, fingerprint, migrate, verify


def session_doc(user: bytes, role: str) -> bytes:
    """A login session of `user` (a table with neither a version nor a counter: the last write wins)."""
    return orjson.dumps({"user_id": user.split(b":")[-1].decode(), "email": "a@example.org", "role": role,
                         "status": "active", "login_timestamp": "2026-12-06T09:00:00", "client_ip": "203.0.113.5",
                         "last_activity": "2026-12-06T09:00:00", "access_token_hash": 1})


class Session:
    """A live follow session whose changed keys the test applies itself, one at a time, as its
    appliers would (here or in the Celery task: both call apply_keys)."""

    def __init__(self, r: redis.Redis, conn: Any, run_id: str) -> None:
        self.r, self.conn, self.run_id = r, conn, run_id

    def __call__(self, key: bytes) -> dict[str, int]:
        return apply_keys(self.r, self.conn, THREADR, self.run_id, [key])


@contextmanager
def following(settings, r: redis.Redis) -> Iterator[Session]:
    conn = settings.postgres()
    try:
        session = Session(r, conn, start_session(r, conn, THREADR, settings.redis_url, None, "local", []))
        yield session
        end_session(conn, session.run_id)
    finally:
        conn.close()


def between_read_and_write(monkeypatch, key: bytes, then: Callable[[], Any]) -> None:
    """`then` runs once, as soon as a bulk batch has read `key` (its rows are written after)."""
    real = migrator.core.batch.read_keys
    done: list[bool] = []

    def read_keys(client, wanted, *args):
        reads = real(client, wanted, *args)
        if not done and any(k == key for k, _ in wanted):
            done.append(True)  # (before `then`: follow's own batch reads the key too)
            then()
        return reads

    monkeypatch.setattr(migrator.core.batch, "read_keys", read_keys)


def rows_of(pg, table: str, key: bytes) -> Callable[[], int]:
    """How many rows of `table` name `key` as their source, when called."""
    def count() -> int:
        with pg, pg.cursor() as cur:
            cur.execute(sql.SQL("SELECT count(*) FROM {} WHERE source_key = %s").format(sql.Identifier(table)),
                        (key.decode(),))
            return cur.fetchone()[0]
    return count


def role(pg, key: bytes) -> list[tuple]:
    with pg, pg.cursor() as cur:
        cur.execute("SELECT role, deleted_at IS NOT NULL FROM sessions WHERE source_key = %s", (key.decode(),))
        return cur.fetchall()


def undo(settings, run_id: str) -> None:
    done = cli(settings, "rollback", run_id)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def session_key(r: redis.Redis) -> bytes:
    seed_demo(r, 3)
    user = next(r.scan_iter(b"threadr:user:user_*"))
    key = b"threadr:session:" + user.split(b":")[-1]
    r.set(key, session_doc(user, "user"))
    return key


@pytest.mark.parametrize("loaded", [True, False], ids=["row-loaded-before", "row-new"])
def test_a_bulk_write_leaves_a_row_follow_read_after_the_batch_began(settings, r, pg, monkeypatch, session_key,
                                                                      loaded):
    empty = fingerprint(pg)
    first = migrate(settings)["run_id"] if loaded else None  # the row exists: follow updates it
    before = fingerprint(pg)
    with following(settings, r) as apply:
        def app_then_follow() -> None:
            r.set(session_key, session_doc(session_key, "premium"))
            apply(session_key)

        between_read_and_write(monkeypatch, session_key, app_then_follow)
        run = migrate(settings)
        assert run["status"] == "completed", run
        # the batch read "user" before the app wrote "premium": follow's later read stands
        assert role(pg, session_key) == [("premium", False)]
        checked = verify(settings, run["run_id"])
        assert checked["verdict"] == "clean" and checked["changed_since_run"] == 0, checked
        undo(settings, run["run_id"])  # the run changed nothing of that row: its rollback leaves it
        assert role(pg, session_key) == [("premium", False)]
    undo(settings, apply.run_id)  # follow's change undone exactly: back to the first run's row, or none
    assert fingerprint(pg) == before
    if first:
        undo(settings, first)
    assert fingerprint(pg) == empty


def test_a_bulk_write_applies_over_a_row_follow_read_before_the_batch_began(settings, r, pg, session_key):
    with following(settings, r) as apply:
        apply(session_key)
        # a change follow has not applied yet (its event still queued): the run reads it
        r.set(session_key, session_doc(session_key, "premium"))
        assert migrate(settings)["status"] == "completed"
        assert role(pg, session_key) == [("premium", False)]


def test_a_row_follow_found_current_is_fenced_too(settings, r, pg, monkeypatch, session_key):
    """Follow's read matches the row (the app wrote the key back): its upsert leaves the row as it is,
    and the row is still marked read, or the batch's older value would stand."""
    with following(settings, r) as apply:
        apply(session_key)
        r.set(session_key, session_doc(session_key, "premium"))  # the batch reads this

        def back_then_follow() -> None:
            r.set(session_key, session_doc(session_key, "user"))
            apply(session_key)

        between_read_and_write(monkeypatch, session_key, back_then_follow)
        assert migrate(settings)["status"] == "completed"
        assert role(pg, session_key) == [("user", False)]


def test_a_row_follow_marked_stays_marked(settings, r, pg, monkeypatch, session_key):
    """The key went after the batch read it: follow marks its row (on_delete "mark"), and the batch's
    write of the value it read does not bring it back."""
    migrate(settings)
    with following(settings, r) as apply:
        def gone_then_follow() -> None:
            r.delete(session_key)
            apply(session_key)

        between_read_and_write(monkeypatch, session_key, gone_then_follow)
        assert migrate(settings)["status"] == "completed"
        assert role(pg, session_key) == [("user", True)]


def test_a_row_follow_deleted_is_not_made_again(settings, r, pg, monkeypatch):
    """The key went after the batch read it: follow deletes its rows (on_delete "delete"), and the
    batch's write of the value it read does not insert them again; rolling follow back restores them."""
    seed_demo(r, 3)
    thread = next(r.scan_iter(b"threadr:thread:*"))
    first = migrate(settings)["run_id"]
    loaded = fingerprint(pg)
    threads = rows_of(pg, "threads", thread)

    with following(settings, r) as apply:
        def gone_then_follow() -> None:
            r.delete(thread)
            assert apply(thread)["retired"] >= 1

        between_read_and_write(monkeypatch, thread, gone_then_follow)
        run = migrate(settings)
        assert run["status"] == "completed", run
        assert threads() == 0
        assert verify(settings, run["run_id"])["verdict"] == "clean"
    undo(settings, apply.run_id)
    assert threads() == 1 and fingerprint(pg) == loaded
    with pg, pg.cursor() as cur:  # (its deletions are forgotten with it: the rows are back)
        cur.execute("SELECT count(*) FROM migration_retired")
        assert cur.fetchone() == (0,)
    undo(settings, first)


def test_a_row_two_keys_fill_takes_the_other_key_s_write(settings, r, pg, monkeypatch):
    """A premium grant is one row filled by two keys (its ip's, its email's): follow applying one of
    them fences that key's writes only, and the batch still fills the lookup the other key gives."""
    grant = orjson.dumps({"granted_at": "2026-12-01T10:00:00", "expires_at": "2027-01-01T10:00:00", "plan": "premium",
                          "duration_days": 31, "client_ip": "203.0.113.8", "email": "p@example.org",
                          "payment_info": {"payment_reference": "ref-1", "granted_by": "stripe_webhook"}})
    by_ip, by_email = b"threadr:premium:ip:203.0.113.8", b"threadr:premium:email:p@example.org"
    r.set(by_ip, grant)
    r.set(by_email, grant)
    with following(settings, r) as apply:
        between_read_and_write(monkeypatch, by_email, lambda: apply(by_ip))
        assert migrate(settings)["status"] == "completed"
    with pg, pg.cursor() as cur:
        cur.execute("SELECT ip, email FROM subscriptions WHERE kind = 'premium_grant'")
        assert cur.fetchall() == [("203.0.113.8", "p@example.org")]


def test_a_key_made_and_deleted_between_the_read_and_the_write_leaves_no_row(settings, r, pg, monkeypatch):
    """A key the batch read, deleted before it wrote, and applied by follow meanwhile: follow had no
    row of it to delete, so it keeps the key itself as gone, and the batch inserts nothing for it."""
    seed_demo(r, 3)
    thread = next(r.scan_iter(b"threadr:thread:*"))
    threads = rows_of(pg, "threads", thread)

    with following(settings, r) as apply:
        def gone_then_follow() -> None:
            r.delete(thread)
            assert apply(thread)["retired"] == 0  # (nothing of it in PostgreSQL yet)

        between_read_and_write(monkeypatch, thread, gone_then_follow)
        run = migrate(settings)
        assert run["status"] == "completed", run
        assert threads() == 0
        assert verify(settings, run["run_id"])["verdict"] == "clean"
        # no batch runs now: the session's next figures forget what it kept for the fence
        assert retired(pg) == 1
        record_figures(apply.conn, apply.run_id, {f: [] if f == "nodes" else None if f == "unsubscribed" else 0
                                                  for f in ledger.FOLLOW_FIGURES})
        assert retired(pg) == 0
    undo(settings, apply.run_id)
    undo(settings, run["run_id"])


def retired(pg) -> int:
    with pg, pg.cursor() as cur:
        cur.execute("SELECT count(*) FROM migration_retired")
        return cur.fetchone()[0]
