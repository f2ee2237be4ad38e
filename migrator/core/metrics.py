"""Prometheus metrics: what this process did (workers, `run --local`, `follow`), and, for a process that
coordinates a run, that run's balance as the ledger holds it.

Process metrics count work as it ends in this process: a Celery worker process, a `run --local` (its
lanes are forked processes: their counts reach the endpoint through prometheus_client's multiprocess
mode, when PROMETHEUS_MULTIPROC_DIR is set before the command starts), or `follow`. The run's metrics
(`migrator_run_*`) are read from the ledger at each scrape, so they equal `migrator report` whichever
processes ran the batches; the coordinator of a run on Celery workers has no other view of them.
Labels are pattern and priority names, outcomes and stages: never a key, so never PII.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import structlog
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from migrator.core import ledger
from migrator.core.config import ConfigError
from migrator.core.ledger import COUNT_FIELDS
from migrator.core.runstate import Fenced

log = structlog.get_logger("migrator.core.metrics")

KEYS = Counter("migrator_keys", "Keys a batch of this process ended with, per pattern and outcome "
               "(scanned = migrated + skipped + dead + expired)", ["pattern", "outcome"])
ROWS = Counter("migrator_rows_written", "Rows inserted or changed by the batches of this process", ["priority"])
BATCHES = Counter("migrator_batches", "Batches this process ended, per priority and outcome (done, already_done: "
                  "another delivery had done it, fenced: its run stopped, failed)", ["priority", "outcome"])
BATCH_SECONDS = Histogram("migrator_batch_seconds", "Duration of a batch, claim to commit", ["priority"],
                          buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
RETRIES = Counter("migrator_retries", "Units of work run again after a transient failure (a lost connection)", ["kind"])
THROTTLE_WAIT = Counter("migrator_throttle_wait_seconds", "Seconds slept under --max-keys-per-sec")
POSTGRES_WRITE = Histogram("migrator_postgres_write_seconds", "Duration of one sub-batch's upsert in PostgreSQL "
                           "(a run's, follow's or the dual-write service's)",
                           buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
# `migrator follow`: one session at a time, so one process; "max" keeps its figures in multiprocess mode too
# (the largest lag is the one cutover waits for)
FOLLOW_LAG = Gauge("migrator_follow_lag_seconds", "Age of the oldest change follow has not applied yet",
                   multiprocess_mode="max")
FOLLOW_PENDING = Gauge("migrator_follow_pending_keys", "Keys changed that follow has not applied yet",
                       multiprocess_mode="max")
FOLLOW_EVENTS = Counter("migrator_follow_events", "Keyspace notifications follow received for keys of the mapping")
FOLLOW_APPLIED = Counter("migrator_follow_keys_applied", "Keys follow applied (read, transformed, upserted or retired)")
FOLLOW_RECONNECTS = Counter("migrator_follow_reconnects", "Times follow's subscription connected again after a cut "
                            "(what was published meanwhile is lost: each one is followed by a reconciliation)")
FOLLOW_RECONCILIATIONS = Counter("migrator_follow_reconciliations", "Reconciliations of follow ended, per outcome "
                                 "(clean, repaired: it applied again what the events missed, failed)", ["outcome"])

# The ledger's view of a coordinated run (RunCollector), by name and labels: the dashboard's panels use them.
RUN_KEYS = ("migrator_run_keys", "Keys of the run's batches done so far, per pattern and outcome, from the ledger",
            ["run", "pattern", "outcome"])
RUN_BATCHES = ("migrator_run_batches", "The run's batches per priority and status, from the ledger",
               ["run", "priority", "status"])


@contextmanager
def batch_outcome(priority: str) -> Iterator[Callable[[Any], Any]]:
    """Around one batch: its duration and outcome; the batch's result goes through the function
    given (a BatchResult, or None when another delivery had done it), which counts its keys."""
    started, outcome = time.perf_counter(), "failed"

    def ended(result: Any) -> Any:
        nonlocal outcome
        outcome = "already_done" if result is None else "done"
        if result is not None:
            for pattern, counts in result.counts.by_pattern.items():
                for f in COUNT_FIELDS:
                    if counts[f]:
                        KEYS.labels(pattern, f).inc(counts[f])
            ROWS.labels(priority).inc(result.rows_written)
        return result

    try:
        yield ended
    except Fenced:
        outcome = "fenced"
        raise
    finally:
        BATCHES.labels(priority, outcome).inc()
        BATCH_SECONDS.labels(priority).observe(time.perf_counter() - started)


class RunCollector:
    """The balance of the runs this process coordinates, read from the ledger at each scrape."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        self.connect = connect
        self.runs: list[str] = []

    def watch(self, run_id: str) -> None:
        self.runs.append(run_id)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        keys, batches = GaugeMetricFamily(*RUN_KEYS[:2], labels=RUN_KEYS[2]), \
            GaugeMetricFamily(*RUN_BATCHES[:2], labels=RUN_BATCHES[2])
        if self.runs:
            conn = self.connect()
            try:
                for run_id in self.runs:
                    with conn, conn.cursor() as cur:
                        rows = ledger.batches(cur, run_id)
                    for pattern, counts in ledger.pattern_totals(rows).items():
                        for f in COUNT_FIELDS:
                            keys.add_metric([run_id, pattern, f], counts[f])
                    tally: dict[tuple[str, str], int] = {}
                    for b in rows:
                        tally[b["priority"], b["status"]] = tally.get((b["priority"], b["status"]), 0) + 1
                    for (priority, status), n in tally.items():
                        batches.add_metric([run_id, priority, status], n)
            finally:
                conn.close()
        yield keys
        yield batches


class Exposed:
    """This process's metrics endpoint (serve)."""

    def __init__(self, server: Any, registry: CollectorRegistry, runs: RunCollector | None) -> None:
        self.server, self.registry, self.runs = server, registry, runs
        self.port = server.server_port

    def watch(self, run_id: str) -> None:
        """Expose this run's balance too (a process serving with `connect`)."""
        if self.runs is not None:
            self.runs.watch(run_id)

    def close(self) -> None:
        global _exposed
        self.server.shutdown()
        self.server.server_close()
        if self.runs is not None:
            self.registry.unregister(self.runs)
        if _exposed is self:
            _exposed = None


_exposed: Exposed | None = None


def serve(port: int, connect: Callable[[], Any] | None = None, addr: str = "0.0.0.0") -> Exposed:
    """Start this process's endpoint on `port` (0: a free one, logged); with `connect`, it also
    exposes the runs the process coordinates (see coordinating)."""
    global _exposed
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # this process and those it forks, summed
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    runs = RunCollector(connect) if connect is not None else None
    try:
        server, _ = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on port {port}: {exc.strerror}; pick another --metrics-port") from None
    if runs is not None:
        registry.register(runs)
    _exposed = Exposed(server, registry, runs)
    log.info("metrics_serving", port=_exposed.port, pid=os.getpid())
    return _exposed


def serving() -> Exposed | None:
    """This process's endpoint, if it serves one."""
    return _exposed


def coordinating(run_id: str) -> None:
    """This process coordinates `run_id`: its endpoint, if it serves one, exposes the run's balance."""
    if _exposed is not None:
        _exposed.watch(run_id)
