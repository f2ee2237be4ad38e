"""`migrator follow`: PostgreSQL kept current from the source's keyspace notifications, after (or
during) the bulk load, until cutover, with no change to the application.

Each notification marks its key dirty; an applier takes dirty keys in batches and gives each the
same read -> transform -> merge-rule upsert as a run (migrator/core/batch.py), reading the key's value
*now*, so a burst of writes to one key is one read and one upsert, and the order of events does not
matter. Rows a key no longer gives (the key deleted, expired, evicted, or its value shrank) get their
table's `on_delete`: deleted, or kept with `deleted_at` set. A follow session is a run of its own
kind in the ledger: its rows carry its id, the journal keeps what it changed, and `migrator rollback`
undoes it exactly. Events are lost while the subscription is down, so every (re)connection and every
`reconcile_every` seconds a reconciliation (migrator/execution/reconcile.py) compares the keyspace with its rows
and applies again the ranges that differ.
"""
from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

import psycopg2
import redis
import structlog

from migrator.core import ledger
from migrator.core import metrics
from migrator.core import registry
from migrator.core import runstate
from migrator.core.batch import _Batch
from migrator.core.errors import transient
from migrator.execution.finalize import link
from migrator.core.mapping import Mapping, Pattern
from migrator.core.options import RunOptions
from migrator.core.partition import KeyRange
from migrator.core.redact import redact_text, redact_url
from migrator.core.source import key_client, roundtrip
from migrator.core.verify import server_process
from migrator.core.writer import Prepared, Writer, describe

log = structlog.get_logger("migrator.execution.follow")

# A follow session's process rewrites its figures this often (silent for ledger.FOLLOW_STALE_S, it is gone).
FIGURES_EVERY_S = 1.0
# Every key a follow batch takes is read as a run reads it, with a run's default settings.
OPTIONS = RunOptions()
WHOLE = KeyRange.split(1)[0]


# --- the session in the ledger ------------------------------------------------------------

def start_session(client: redis.Redis, conn: Any, mapping: Mapping, redis_url: str, spec: str | None, mode: str,
                  nodes: list[str]) -> str:
    """A new follow session, running; refused while another one's process is alive (one session at a
    time: two would apply the same keys). One whose process stopped heartbeating is failed first."""
    run_id = str(uuid.uuid4())
    with conn, conn.cursor() as cur:
        for other, alive in ledger.running_follow_sessions(cur, ledger.FOLLOW_STALE_S):
            if alive:
                raise runstate.NotNow(f"follow session {other} is running (its process heartbeats): one session at a "
                                      "time; stop it first (Ctrl-C, or SIGTERM to its process)")
            runstate.transition(cur, other, "failed", f"its process stopped heartbeating for over {ledger.FOLLOW_STALE_S:g} s")
        ledger.create_run(cur, run_id, mapping.name, OPTIONS, redact_url(redis_url), server_process(client),
                          spec or mapping.name, registry.digest(mapping))
        ledger.mark_follow_session(cur, run_id, mode, nodes)
    log.info("follow_started", run=run_id, mode=mode, nodes=nodes)
    return run_id


def end_session(conn: Any, run_id: str, error: str | None = None) -> None:
    """The session stopped: completed (it may be rolled back like any run), or failed with why."""
    with conn, conn.cursor() as cur:
        runstate.transition(cur, run_id, "failed" if error else "completed", error)
        ledger.end_follow_session(cur, run_id, error)
    log.info("follow_stopped", run=run_id, error=error)


def record_figures(conn: Any, run_id: str, figures: dict[str, Any]) -> None:
    """The session's figures now (its heartbeat too)."""
    with conn, conn.cursor() as cur:
        ledger.record_follow_figures(cur, run_id, figures)


def render(run_id: str, status: str, p: dict[str, Any]) -> str:
    """`migrator status` of a follow session."""
    last = p["last_reconciliation"]
    verdict = ("none yet" if last is None else
               f"{'clean' if last['clean'] else 'REPAIRED'} ({last['reason']}, {last['finished_at']:%Y-%m-%d %H:%M:%S}: "
               f"{last['ranges_repaired']}/{last['ranges']} ranges applied again, {last['keys_reapplied']:,} keys, "
               f"{last['keys_gone']:,} gone)" + (f" error: {last['error']}" if last["error"] else ""))
    alive = "" if status != "running" or p["silent_s"] < ledger.FOLLOW_STALE_S else f"  NO HEARTBEAT for {p['silent_s']:.0f} s"
    return "\n".join([
        f"follow session {run_id}  {status} ({p['mode']}, {', '.join(p['nodes']) or 'standalone'}){alive}"
        + (f"  error: {p['error']}" if p["error"] else ""),
        f"  lag {p['lag_s']:.3f} s (oldest change not yet applied), {p['pending']:,} keys pending",
        f"  {p['events_per_s']:,.1f} events/s, {p['applied_per_s']:,.1f} keys applied/s; in all {p['events']:,} events, "
        f"{p['keys_applied']:,} keys applied, {p['rows_written']:,} rows written, {p['rows_retired']:,} rows retired, "
        f"{p['dead']:,} dead letters, {p['failures']:,} failed applications (retried)",
        f"  reconnects {p['reconnects']:,}; reconciliations {p['reconciliations']:,} "
        f"({p['reconciliations_repaired']:,} repaired something); last: {verdict}",
        *([f"  NOT RECEIVING the events of {p['unsubscribed']}"] if p["unsubscribed"] else []),
    ])


# --- applying changed keys ------------------------------------------------------------------

class _Recording(Writer):
    """A run's writer that also notes, per key, the ids of the rows it wrote for it, and the
    provenance it gave them."""

    def __init__(self, cursor: Any, mapping: Mapping, run_id: str) -> None:
        # (each key read now, by one applier at a time: its value is the key's latest, a counter the
        # app lowered included)
        super().__init__(cursor, mapping, run_id, latest=True)
        self.given: dict[str, dict[str, set[str]]] = {}  # key text -> table -> row ids
        self.provenance: dict[str, tuple[str, datetime | None, int]] = {}  # key text -> metadata, expires_at, digest

    def write(self, records: list[Prepared]) -> tuple[int, list[tuple[Prepared, BaseException]]]:
        written, bad = super().write(records)
        failed = {id(rec) for rec, _ in bad}
        for rec in records:
            if id(rec) not in failed:
                mine = self.given.setdefault(rec.key_text, {})
                for row in rec.rows:
                    mine.setdefault(row.table, set()).add(str(row.values["id"]))
                self.provenance[rec.key_text] = (rec.pattern.provenance, rec.expires_at, rec.digest)
        return written, bad


def apply_keys(client: redis.Redis, conn: Any, mapping: Mapping, run_id: str, keys: list[bytes],
               resets: list[bytes] = ()) -> dict[str, int]:
    """Bring these keys' rows to what each key holds now, in one transaction that commits only while
    the session runs: each key of a migrated pattern read, transformed and upserted as a run does
    (a value that cannot be migrated is a dead letter of the session, its rows left as they were);
    then the rows no key of them gives any more get their table's on_delete (looked for in the
    tables their patterns write), unless another live key gives them too (_share). Returns the keys
    applied, rows written, rows retired and dead letters. Keys of no migrated pattern are ignored.

    `resets`: keys whose value was replaced whole since their rows were written (deleted or expired
    and made again, renamed onto, or found different by a reconciliation): their rows in tables that
    delete are deleted first, so a merge rule (a counter's GREATEST) does not keep the old value."""
    owners: dict[bytes, Pattern] = {}
    for key in dict.fromkeys(keys):
        pattern, _ = mapping.pattern_of(key.decode("utf-8", "backslashreplace"))
        if pattern is not None and pattern.migrated:
            owners[key] = pattern
    outcome = {"keys": len(owners), "rows": 0, "retired": 0, "dead": 0}
    if not owners:
        return outcome
    try:
        with conn.cursor() as cur:
            # Every statement below finds a batch's rows by an index (id, source_key); without
            # statistics (tables just loaded and not analyzed yet, or analyzed while still empty) the
            # planner takes `source_key = ANY(500 keys)` for most of a table and scans it all, per batch.
            cur.execute("SELECT set_config('migrator.run_id', %s, true), set_config('enable_seqscan', 'off', true)",
                        (run_id,))
            step = _Step(client, cur, mapping, run_id, {k.decode("utf-8", "backslashreplace") for k in owners})
            fresh = _by_table([k for k in dict.fromkeys(resets) if k in owners], owners)
            if fresh:
                step.retire(fresh, {}, marking=False)
            outcome["rows"], failed = step.apply(owners)
            # (looked up only when there are some: a session may hold many)
            dead = ledger.dead_letters_now(cur, run_id) if failed else set()
            applied = [k for k in owners if k not in dead]
            written = _by_table(applied, owners)
            given = {table: [(i, text) for text in texts for i in step.writer.given.get(text, {}).get(table, ())]
                     for table, texts in written.items()}
            for table, rows in given.items():  # (after every read: the fence of a bulk batch running now)
                if rows:
                    ledger.stamp_synced(cur, table, rows)
                none = [text for text in written[table] if text not in step.writer.given or
                        table not in step.writer.given[text]]
                if none:
                    ledger.retire_keys(cur, run_id, table, none)
            keep = {table: [i for i, _ in rows] for table, rows in given.items()}
            outcome["retired"] = step.retire(written, keep)
            if dead or ledger.has_dead_letters(cur, run_id):
                # a key that failed before and applies now is no dead letter any more
                ledger.forget_dead_letters(cur, run_id, applied)
            outcome["dead"] = len(dead) + step.dead
            if mapping.links:
                link(cur, mapping, written)
            runstate.hold(cur, run_id)  # (commits only while the session runs: a rollback of it waits, or wins)
        conn.commit()
    except BaseException:
        if not conn.closed:
            conn.rollback()
        raise
    return outcome


def _by_table(keys: list[bytes], owners: dict[bytes, Pattern]) -> dict[str, list[str]]:
    """Per table, the keys (as text) whose pattern writes it: where their rows can be. A key that is
    no UTF-8 is left out (a dead letter: no row names it)."""
    found: dict[str, list[str]] = {}
    for key in keys:
        try:
            text = key.decode("utf-8")
        except UnicodeDecodeError:
            continue
        for table in owners[key].tables:
            found.setdefault(table, []).append(text)
    return found


class _Step:
    """One application of changed keys (`touched`), in the transaction of `cur`."""

    def __init__(self, client: redis.Redis, cur: Any, mapping: Mapping, run_id: str, touched: set[str]) -> None:
        self.client, self.cur, self.mapping, self.run_id, self.touched = client, cur, mapping, run_id, touched
        self.writer = _Recording(cur, mapping, run_id)
        self.dead = 0  # dead letters of keys applied for a row they share (_share)

    def apply(self, owners: dict[bytes, Pattern]) -> tuple[int, int]:
        """Each key read, transformed and upserted as a run does: the rows written, and how many
        keys are dead letters now."""
        by_priority: dict[Any, list[bytes]] = {}
        for key, pattern in owners.items():
            by_priority.setdefault(pattern.priority, []).append(key)
        rows = dead = 0
        for priority in sorted(by_priority):  # (a batch's scope is one priority's patterns)
            batch = _Batch(self.client, self.cur, self.mapping, ledger.BatchSpec(None, self.run_id, priority.label, WHOLE,
                                                                            OPTIONS, self.mapping.name), writer=self.writer)
            batch.run([by_priority[priority]])
            batch.spill_dead()
            rows += batch.rows_written
            dead += batch.counts.total("dead")
        return rows, dead

    def retire(self, by_table: dict[str, list[str]], keep: dict[str, list[str]], marking: bool = True) -> int:
        """The rows of these keys (per table) not among `keep` (ids) get their table's on_delete, but
        those another key gives too (_share); how many."""
        retired = 0
        for table, texts in by_table.items():
            rule = self.mapping.rule(table)
            if rule.on_delete == "mark" and not marking:
                continue
            mark = rule.deleted_at if rule.on_delete == "mark" else None
            if self.mapping.sharing(table):
                self._share(table, texts, keep.get(table, []), mark)
            retired += ledger.retire_rows(self.cur, self.run_id, table, texts, keep.get(table, []), mark)
        return retired

    def _share(self, table: str, texts: list[str], keep: list[str], mark: str | None) -> None:
        """Rows of `table` about to be retired that a key not applied here gives too (one grant under
        two keys, the row written by the one that went): the other key, spelled from the row
        (Pattern.row_key), applied now if it is in Redis, and each row it gives pointed at it, so
        that it stays; the rest are left to retire."""
        sharing = self.mapping.sharing(table)
        mine = [t for t in texts if self.mapping.pattern_of(t)[0] in sharing]
        rows = ledger.rows_retiring(self.cur, table, mine, keep, self.mapping.row_key_columns(table), mark) if mine else []
        others: dict[str, list[str]] = {}  # another key that may give them -> row ids
        for row_id, values in rows:
            for other in self.mapping.keys_giving(table, values):
                if other not in self.touched:
                    others.setdefault(other, []).append(row_id)
        if not others:
            return
        reader = key_client(self.client)
        try:
            live = [k for k, n in zip(others, roundtrip(reader, [("EXISTS", k) for k in others])) if n == 1]
        finally:
            if reader is not self.client:
                reader.close()
        self.touched.update(live)
        self.dead += self.apply({k.encode(): self.mapping.pattern_of(k)[0] for k in live})[1]
        given = self.writer.given
        moved = [(row_id, key, *self.writer.provenance[key]) for key in live
                 for row_id in others[key] if row_id in given.get(key, {}).get(table, ())]
        if moved:
            ledger.repoint_rows(self.cur, self.run_id, table, moved)


# --- the keys waiting --------------------------------------------------------------------------

# Dirty.last_event keeps each key's latest event this long once it holds more than so many keys: longer
# than a reconciliation waits for a range's changes to be applied (reconcile.SETTLE_S)
LAST_EVENT_S = 120.0
LAST_EVENTS_KEPT = 100_000


class Dirty:
    """Keys changed and not yet applied, each with when it was first seen changed; a key being
    applied is not taken again until that ends (two batches of one key could commit out of order)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting: dict[bytes, float] = {}
        self.busy: dict[bytes, float] = {}
        self.resets: set[bytes] = set()  # waiting keys whose value was replaced whole (see apply_keys)
        self.events = 0  # notifications received
        self.ready = threading.Event()
        # when each key's latest event came, for the last minute or so (changed_since)
        self.last_event: dict[bytes, float] = {}
        self.last_event_limit = LAST_EVENTS_KEPT

    def add(self, key: bytes, event: bool = True, reset: bool = False) -> None:
        with self.lock:
            now = time.monotonic()
            self.events += event
            self.waiting.setdefault(key, now)
            if reset:
                self.resets.add(key)
            if event:
                self.last_event[key] = now
                if len(self.last_event) > self.last_event_limit:  # (older events than a reconciliation asks of)
                    self.last_event = {k: t for k, t in self.last_event.items() if t > now - LAST_EVENT_S}
                    self.last_event_limit = max(LAST_EVENTS_KEPT, 2 * len(self.last_event))
        self.ready.set()

    def changed_since(self, key: bytes, moment: float) -> bool:
        """Whether an event of `key` came after `moment` (time.monotonic): a row that differs from it
        then is being brought up to date, not missed."""
        with self.lock:
            return self.last_event.get(key, float("-inf")) > moment

    def take(self, n: int) -> tuple[list[bytes], list[bytes]]:
        """Up to `n` waiting keys, oldest first, and those of them to reset."""
        with self.lock:
            taken = []
            for key in self.waiting:
                if key not in self.busy:
                    taken.append(key)
                    if len(taken) == n:
                        break
            for key in taken:
                self.busy[key] = self.waiting.pop(key)
            resets = [key for key in taken if key in self.resets]
            self.resets.difference_update(resets)
            if not self.waiting:
                self.ready.clear()
            return taken, resets

    def done(self, keys: list[bytes], resets: list[bytes], applied: bool) -> None:
        """These keys' batch ended; not applied: they wait again, as old as they were."""
        with self.lock:
            for key in keys:
                seen = self.busy.pop(key)
                if not applied:
                    self.waiting[key] = min(seen, self.waiting.get(key, seen))
            if not applied:
                self.resets.update(resets)
            if self.waiting:
                self.ready.set()

    def oldest(self) -> float | None:
        with self.lock:
            return min([*self.waiting.values(), *self.busy.values()], default=None)

    def pending(self) -> int:
        with self.lock:
            return len(self.waiting) + len(self.busy)

    def applied_through(self, moment: float) -> bool:
        """Whether every change seen before `moment` (time.monotonic) has been applied."""
        oldest = self.oldest()
        return oldest is None or oldest > moment


# --- the follower ------------------------------------------------------------------------------

Apply = Callable[[list[bytes], list[bytes]], dict[str, int]]
# Events after which a key's value is not the one its rows came from, changed: a new one altogether.
REPLACED = frozenset({b"del", b"expired", b"evicted", b"rename_from", b"rename_to", b"restore", b"move_to", b"copy_to"})


class Follower:
    """Applies the dirty keys with `jobs` appliers (each calling `apply`: here, or on a worker),
    reconciles on every connection and every `reconcile_every` seconds, and keeps the session's
    figures in the ledger, until `stop` is set; then drains what is pending and ends the session."""

    def __init__(self, connect: Callable[[], Any], run_id: str, apply: Apply, reconcile: Callable[[str], Any], *,
                 jobs: int = 1, batch_keys: int = 500, window_s: float = 0.02, reconcile_every: float = 600.0,
                 drain_s: float = 60.0) -> None:
        self.connect, self.run_id, self.apply, self.reconcile = connect, run_id, apply, reconcile
        self.jobs, self.batch_keys, self.window_s = jobs, batch_keys, window_s
        self.reconcile_every, self.drain_s = reconcile_every, drain_s
        self.dirty = Dirty()
        self.stop = threading.Event()  # set by the caller: stop taking events, drain, end
        self.halt = threading.Event()  # set here once drained: the appliers end
        self.totals = dict.fromkeys(("keys", "rows", "retired", "dead", "failures"), 0)
        self.totals_lock = threading.Lock()
        # the subscriptions (notifications.Subscriptions tells): one reconnect per cut, and the nodes
        # whose events are not being received now, which status shows and cutover refuses
        self.reconnects = 0
        self.nodes: list[str] = []  # the servers subscribed to (a cluster's masters; [] standalone)
        self.down: dict[str, str] = {}  # node ("" standalone) -> why its subscription is down
        self.nodes_lock = threading.Lock()
        self.wanted: list[str] = []  # reconciliations asked for (their reasons), run one at a time
        self.wanted_lock = threading.Condition()

    # called by the subscribers
    def changed(self, key: bytes, event: bytes) -> None:
        self.dirty.add(key, reset=event in REPLACED)
        metrics.FOLLOW_EVENTS.inc()

    def connected(self, node: str, first: bool) -> None:
        with self.nodes_lock:
            self.down.pop(node, None)
            if node and node not in self.nodes:
                self.nodes = sorted([*self.nodes, node])
            if not first:
                self.reconnects += 1
        if not first:
            metrics.FOLLOW_RECONNECTS.inc()
        self.ask("connect" if first else "reconnect")

    def lost(self, node: str, why: str) -> None:
        with self.nodes_lock:
            self.down[node] = why

    def left(self, node: str) -> None:
        with self.nodes_lock:
            self.down.pop(node, None)
            self.nodes = [n for n in self.nodes if n != node]

    def unsubscribed(self) -> str | None:
        """The servers whose events are not being received now, and why (None: every one is)."""
        with self.nodes_lock:
            return "; ".join(f"{node or 'the source'}: {why}" for node, why in sorted(self.down.items())) or None

    def ask(self, reason: str) -> None:
        with self.wanted_lock:
            if reason not in self.wanted:
                self.wanted.append(reason)
            self.wanted_lock.notify()

    def run(self) -> str | None:
        """Until stopped; the error that ended the session, or None."""
        appliers = [threading.Thread(target=self._applier, name=f"applier-{n}", daemon=True) for n in range(self.jobs)]
        reconciler = threading.Thread(target=self._reconciler, name="reconciler", daemon=True)
        for t in (*appliers, reconciler):
            t.start()
        conn = self.connect()
        error = None
        try:
            self._figures_until_stopped(conn)
            deadline = time.monotonic() + self.drain_s
            while self.dirty.pending() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.dirty.pending():
                error = f"stopped with {self.dirty.pending():,} changed keys not applied (the next session's first " \
                        "reconciliation applies them)"
        finally:
            self.halt.set()
            with self.wanted_lock:
                self.wanted_lock.notify()
            for t in appliers:
                t.join(30)
            reconciler.join(30)
            try:
                conn = _alive(conn, self.connect)
                record_figures(conn, self.run_id, self._exposed(self.figures(0.0, 0.0)))
            finally:
                conn.close()
        return error

    def _figures_until_stopped(self, conn: Any) -> None:
        last_t, last_events, last_keys = time.monotonic(), 0, 0
        next_reconcile = time.monotonic() + self.reconcile_every
        while not self.stop.wait(FIGURES_EVERY_S):
            now = time.monotonic()
            if now >= next_reconcile:
                self.ask("interval")
                next_reconcile = now + self.reconcile_every
            span = now - last_t
            events, keys = self.dirty.events, self.totals["keys"]
            figures = self._exposed(self.figures((events - last_events) / span, (keys - last_keys) / span))
            last_t, last_events, last_keys = now, events, keys
            try:
                conn = _alive(conn, self.connect)
                record_figures(conn, self.run_id, figures)
            except psycopg2.Error as exc:  # the ledger is down a while: the figures wait for it
                log.warning("follow_figures_not_recorded", error=redact_text(describe(exc)))

    def figures(self, events_per_s: float, applied_per_s: float) -> dict[str, Any]:
        oldest = self.dirty.oldest()
        return {"events": self.dirty.events, "keys_applied": self.totals["keys"], "rows_written": self.totals["rows"],
                "rows_retired": self.totals["retired"], "dead": self.totals["dead"],
                "failures": self.totals["failures"], "pending": self.dirty.pending(),
                "lag_s": 0.0 if oldest is None else round(time.monotonic() - oldest, 3),
                "events_per_s": round(events_per_s, 1), "applied_per_s": round(applied_per_s, 1),
                "reconnects": self.reconnects, "nodes": list(self.nodes), "unsubscribed": self.unsubscribed()}

    @staticmethod
    def _exposed(figures: dict[str, Any]) -> dict[str, Any]:
        """The gauges of the metrics endpoint set to these figures (the counters move as things happen)."""
        metrics.FOLLOW_LAG.set(figures["lag_s"])
        metrics.FOLLOW_PENDING.set(figures["pending"])
        return figures

    def _applier(self) -> None:
        backoff = 0.1
        while not self.halt.is_set():
            if not self.dirty.ready.wait(0.1):
                continue
            self.halt.wait(self.window_s)  # a burst on a key coalesces into one read
            keys, resets = self.dirty.take(self.batch_keys)
            if not keys:
                continue
            try:
                outcome = self.apply(keys, resets)
            except Exception as exc:  # retried: the keys wait again, their lag grows and shows
                self.dirty.done(keys, resets, False)
                with self.totals_lock:
                    self.totals["failures"] += 1
                log.warning("follow_apply_failed", keys=len(keys), error=redact_text(describe(exc)), retry_in_s=backoff)
                if isinstance(exc, runstate.Fenced):
                    self.stop.set()  # the session was stopped from outside (cancel, rollback)
                self.halt.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            self.dirty.done(keys, resets, True)
            metrics.FOLLOW_APPLIED.inc(outcome["keys"])
            with self.totals_lock:
                for name in ("keys", "rows", "retired", "dead"):
                    self.totals[name] += outcome[name]

    def _reconciler(self) -> None:
        while True:
            with self.wanted_lock:
                while not self.wanted and not self.halt.is_set():
                    self.wanted_lock.wait(1.0)
                if self.halt.is_set() or self.stop.is_set():
                    return
                reason = self.wanted.pop(0)
            try:
                self.reconcile(reason)
            except Exception as exc:  # recorded by the reconciliation itself; the next one tries again
                log.warning("reconciliation_failed", reason=reason, error=redact_text(describe(exc)))


def _alive(conn: Any, connect: Callable[[], Any]) -> Any:
    """`conn`, or a new connection when it was lost (the ledger restarted)."""
    if conn.closed:
        return connect()
    return conn


def local_apply(client: redis.Redis, connect: Callable[[], Any], mapping: Mapping, run_id: str) -> Apply:
    """`apply_keys` here, each applier thread on a PostgreSQL connection of its own (made again when
    lost)."""
    held = threading.local()

    def apply(keys: list[bytes], resets: list[bytes]) -> dict[str, int]:
        conn = getattr(held, "conn", None)
        if conn is None or conn.closed:
            held.conn = conn = connect()
        try:
            return apply_keys(client, conn, mapping, run_id, keys, resets)
        except Exception as exc:
            if transient(exc):
                conn.close()
            raise

    return apply


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()
