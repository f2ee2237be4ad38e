"""The Celery executor (the interface is migrator/execution/executor.py's): a run's batches and a
verification's ranges sent as chords to Celery workers through the coordinator
(workers/coordinator.py). A call returns once the work is sent; the workers carry the run on,
and report to the ledger, never to the process that sent it."""
from __future__ import annotations

import time
from typing import Any, Iterable

from migrator.core import ledger
from migrator.execution.executor import Executor
from migrator.execution.follow import Apply
from migrator.core.mapping import Mapping, Priority
from migrator.core.options import RunOptions
from migrator.core.verify import kept_result, plan_verification

from celeryconfig import PRIORITY_QUEUES

from . import coordinator
from .celery import app
from .tasks import dispatch_priority


# The shares of `answering`'s timeout it asks the workers in, one after the other.
ASKS = (1 / 8, 2 / 8, 5 / 8)


class CeleryExecutor(Executor):
    """On Celery workers: any number, on any host, each consuming some of the priority queues."""

    background = True
    queues = tuple(PRIORITY_QUEUES.values())

    @property
    def result_backend(self) -> str:
        return str(app.conf.result_backend)

    def connect(self) -> None:
        coordinator.use_broker(self.settings)

    def consumers(self, timeout: float) -> dict[str, list[str]]:
        return coordinator.consumers(self.settings.broker_url, timeout)

    def answering(self, timeout: float = 2.0) -> bool:
        # a worker of another MIGRATOR_QUEUE_PREFIX would never take our batches; asked in ever longer
        # waits (a broadcast waits out its whole timeout), so that a command goes on once one of ours answers
        ours = set(self.queues)
        return any(ours.intersection(consumed) for share in ASKS for consumed in self.consumers(timeout * share).values())

    def worker_command(self, queues: Iterable[str] | None = None) -> str:
        return coordinator.worker_command(self.queues if queues is None else queues)

    def carry_on(self, mapping: Mapping, run_id: str, opts: RunOptions, priority: Priority) -> None:
        # (the workers load the run's mapping and options from the ledger)
        conn = self.settings.postgres()
        try:
            dispatch_priority(conn, run_id, priority)
        finally:
            conn.close()

    def verify(self, mapping: Mapping, run_id: str, priorities: list[Priority],
               max_keys_per_sec: int | None = None) -> dict[str, Any]:
        client, conn = self.settings.redis(), self.settings.postgres()
        try:
            verification = plan_verification(client, conn, run_id, priorities, max_keys_per_sec=max_keys_per_sec)
            coordinator.verify_on_workers(conn, verification, run_id, priorities[0].label)
            while True:  # the workers report to the ledger, never to this process
                with conn, conn.cursor() as cur:
                    found = ledger.get_verification(cur, verification)
                if found["status"] != "running":
                    return kept_result(found)
                time.sleep(0.5)
        finally:
            conn.close()
            client.close()

    def revoke(self, task_ids: list[str]) -> int:
        return coordinator.revoke(task_ids)

    def applier(self, mapping: Mapping, run_id: str) -> Apply:
        return coordinator.apply_on_workers(run_id)  # (the workers load the session's mapping from the ledger)
