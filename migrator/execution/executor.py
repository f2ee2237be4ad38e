"""Where a run's batches and a verification's ranges are executed: one small interface, two executors.

- `LocalExecutor` (here): this process, and `jobs` lane processes forked from it (migrator/execution/runner.py);
  `run --local`, `resume --local`, `verify --local`. The work is done when a call returns.
- `CeleryExecutor` (workers/executor.py): Celery workers, any number, on any host. A call sends
  the work to the broker and returns; the workers carry the run on through their chord callbacks.

Both execute the same engine (`migrate_batch`, `verify_range`, `judge_priority`) against the same
ledger, so a run may be carried on by either. Commands choose one once and go through it; the
engine never imports the Celery layer: executors are found by name in the entry-point group
`migrator.executors` (pyproject.toml), as mappings are.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from typing import Any, ClassVar, Iterable

from migrator.core.config import ConfigError, Settings
from migrator.core.mapping import Mapping, Priority
from migrator.core.options import RunOptions
from migrator.execution.follow import Apply, local_apply
from migrator.core.source import key_client
from migrator.execution.runner import execute_local, verify_local

GROUP = "migrator.executors"


class Executor(ABC):
    """What commands (migrator/cli/commands.py) and `migrator check` (migrator/views/preflight.py) ask of an executor."""

    # True when work goes on after a call hands it over (the command follows it in the ledger);
    # False when a call returns once the work is done.
    background: ClassVar[bool]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    # --- reaching it ---

    @abstractmethod
    def connect(self) -> None:
        """Make sure work can be handed over now: a ConfigError with the fix when it cannot."""

    @abstractmethod
    def answering(self, timeout: float = 2.0) -> bool:
        """Whether something takes the work now (else it waits: see `worker_command`)."""

    @abstractmethod
    def worker_command(self, queues: Iterable[str] | None = None) -> str:
        """How to start what takes the work (of these queues; default all), for messages."""

    # --- what `migrator check` probes ---

    queues: tuple[str, ...]  # the queues its work waits in (none: it never waits)
    result_backend: str | None  # where it keeps its work's results (None: nowhere); never the source

    @abstractmethod
    def consumers(self, timeout: float) -> dict[str, list[str]]:
        """Each worker that answers within `timeout`, and the queues it consumes."""

    # --- the work ---

    @abstractmethod
    def carry_on(self, mapping: Mapping, run_id: str, opts: RunOptions, priority: Priority) -> None:
        """Have a planned run's batches not done yet executed from `priority` on, each priority then
        verified and judged (migrator/execution/finalize.py), until the run ends: before this returns, or after
        (`background`)."""

    @abstractmethod
    def verify(self, mapping: Mapping, run_id: str, priorities: list[Priority],
               max_keys_per_sec: int | None = None) -> dict[str, Any]:
        """Verify a run's `priorities` (migrator/core/verify.py); the verification's result.
        `max_keys_per_sec`: its own cap on Redis (0: none) in place of the run's."""

    @abstractmethod
    def revoke(self, task_ids: list[str]) -> int:
        """Take back queued work (`migrator cancel`), so that it never starts; how much was."""

    @abstractmethod
    def applier(self, mapping: Mapping, run_id: str) -> Apply:
        """How `migrator follow` applies a batch of changed keys of its session `run_id`
        (migrator/execution/follow.py `apply_keys`), the call returning once they are applied."""


class LocalExecutor(Executor):
    """Here: this process, and `jobs` lanes forked from it (see migrator/execution/runner.py)."""

    background = False
    queues = ()
    result_backend = None

    def __init__(self, settings: Settings, jobs: int = 1) -> None:
        super().__init__(settings)
        self.jobs = jobs

    def connect(self) -> None:
        self.settings.redis().close()  # the source answers (the work runs here, and reads it)

    def answering(self, timeout: float = 2.0) -> bool:
        return True  # this process takes the work

    def worker_command(self, queues: Iterable[str] | None = None) -> str:
        return "migrator resume RUN_ID --local"  # (work left by a process that died is carried on this way)

    def consumers(self, timeout: float) -> dict[str, list[str]]:
        return {}

    def carry_on(self, mapping: Mapping, run_id: str, opts: RunOptions, priority: Priority) -> None:
        client = self.settings.redis()
        try:
            execute_local(client, self.settings.postgres, mapping, run_id, opts, start=priority, jobs=self.jobs)
        finally:
            client.close()

    def verify(self, mapping: Mapping, run_id: str, priorities: list[Priority],
               max_keys_per_sec: int | None = None) -> dict[str, Any]:
        client = self.settings.redis()
        try:
            return verify_local(client, self.settings.postgres, mapping, run_id, priorities, jobs=self.jobs,
                                max_keys_per_sec=max_keys_per_sec)
        finally:
            client.close()

    def revoke(self, task_ids: list[str]) -> int:
        return 0  # nothing of it is queued: its lanes stop at their next sub-batch, fenced

    def applier(self, mapping: Mapping, run_id: str) -> Apply:
        # (the client lives as long as the process: follow applies until it is stopped; on a
        # cluster, one that routes each changed key to its master)
        return local_apply(key_client(self.settings.redis()), self.settings.postgres, mapping, run_id)


def load(name: str, settings: Settings, **options: Any) -> Executor:
    """The executor registered under `name` (entry-point group `migrator.executors`), made for
    `settings` (and its own `options`, e.g. a local one's jobs)."""
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    if name not in found:
        raise ConfigError(f"no executor named {name!r} is installed (entry points {GROUP}: "
                          f"{', '.join(sorted(found)) or 'none'}); reinstall the migrator (pip install .)")
    return found[name].load()(settings, **options)
