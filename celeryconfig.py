"""The one place for Celery settings. Workers need only CELERY_BROKER_URL, REDIS_URL and DATABASE_URL
(and CELERY_RESULT_BACKEND when the default below does not fit)."""
import os
from urllib.parse import urlsplit, urlunsplit

from kombu import Queue

from migrator.core.config import state_db


def _beside_source(source: str) -> str:
    """Another database of the source's Redis server: see migrator.core.config.state_db."""
    parts = urlsplit(source)
    return urlunsplit(parts._replace(path=f"/{state_db(int(parts.path.strip('/') or 0))}"))


broker_url = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
# Chords need a result backend. It must not be the Redis database being migrated (its keys
# would show up in the scan), so by default it is another database of the same server: a
# worker on another host then needs only the broker, Redis and PostgreSQL URLs.
result_backend = os.environ.get("CELERY_RESULT_BACKEND") or _beside_source(
    os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
result_expires = 7 * 24 * 3600  # above the longest run: chord counters live this long
result_extended = True

# One queue per priority, so operators can dedicate workers: celery -A workers worker -Q critical,high
# MIGRATOR_QUEUE_PREFIX keeps several installations (or test sessions) on one broker apart.
QUEUE_PREFIX = os.environ.get("MIGRATOR_QUEUE_PREFIX", "")
PRIORITY_QUEUES = {p: f"{QUEUE_PREFIX}{p}" for p in ("critical", "high", "medium", "low")}
task_queues = [Queue(q) for q in PRIORITY_QUEUES.values()]
task_default_queue = PRIORITY_QUEUES["low"]

# A batch is acknowledged only once it has committed; a worker lost mid-batch puts it back.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# For brokers with a visibility timeout (Redis, SQS): above the longest batch, so a slow batch
# is not delivered again while it runs (a per-batch advisory lock guards it anyway).
broker_transport_options = {"visibility_timeout": int(os.environ.get("MIGRATOR_VISIBILITY_TIMEOUT", 4 * 3600))}
broker_connection_retry_on_startup = True

task_serializer = "json"
accept_content = ["json"]
result_serializer = "json"
task_track_started = True
worker_send_task_events = True
task_send_sent_event = True
worker_hijack_root_logger = False
# Our logs are already JSON lines on stderr; Celery must not wrap them as WARNING records.
worker_redirect_stdouts = False
