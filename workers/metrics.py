"""Each worker process that runs tasks serves its Prometheus metrics (migrator/core/metrics.py) when
MIGRATOR_METRICS_PORT is set: a threads, gevent or solo pool's worker on that port; a prefork pool's
children on the port plus their index (0, 1, ...), since their counts are their own. With
PROMETHEUS_MULTIPROC_DIR set (prometheus_client's multiprocess mode), the children's counts are
summed instead, and the main process alone serves them on the port. 0: each picks a free port, logged.
"""
from __future__ import annotations

import os
from typing import Any

from billiard.process import current_process
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.signals import worker_process_init, worker_ready

from migrator.core import metrics
def _port() -> int | None:
    port = os.environ.get("MIGRATOR_METRICS_PORT")
    return int(port) if port else None


def _summed() -> bool:
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ


@worker_process_init.connect
def _serve_pool_process(**_: Any) -> None:
    """A prefork child (or the solo pool's one process): where tasks run."""
    base = _port()
    if base is not None and not _summed():
        # (the solo pool's process is the main one: no index)
        metrics.serve(base + getattr(current_process(), "index", 0) if base else 0)


@worker_ready.connect
def _serve_worker(sender: Any = None, **_: Any) -> None:
    """The main process: where a threads or gevent pool runs tasks, or, summed, every child's counts."""
    base = _port()
    if base is not None and metrics.serving() is None and (_summed() or not isinstance(sender.pool, PreforkPool)):
        metrics.serve(base)
