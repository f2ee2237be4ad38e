"""The Celery application; every setting lives in celeryconfig.py."""
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_init

from celeryconfig import PRIORITY_QUEUES
from migrator.core.batch import collect_less
from migrator.core.log import configure, route_stdlib_logging

app = Celery("migrator", include=["workers.tasks", "workers.metrics"])
app.config_from_object("celeryconfig")


def delete_queues() -> None:
    """Remove the priority queues of this MIGRATOR_QUEUE_PREFIX from the broker: for the test
    sessions and bench runs that each use queues of their own on a shared broker."""
    with app.connection_for_write() as conn:
        for name in PRIORITY_QUEUES.values():
            conn.default_channel.queue_delete(name)


@setup_logging.connect
def _json_logs(loglevel: Any = None, **_: Any) -> None:
    """One JSON object per line for ours and Celery's own logs (Celery then leaves logging alone)."""
    level = loglevel if isinstance(loglevel, str) else None
    configure(json=True, level=level)
    route_stdlib_logging(level)


@worker_init.connect
def _batch_process(**_: Any) -> None:
    collect_less()  # before a prefork pool forks its children: they inherit it
