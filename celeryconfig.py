"""The one place for Celery settings. Workers need only CELERY_BROKER_URL, REDIS_URL and DATABASE_URL."""
import os

from kombu import Queue

broker_url = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
# The ledger in PostgreSQL is the record of every run; results are only a convenience.
result_backend = os.environ.get("CELERY_RESULT_BACKEND", "rpc://")

# One queue per priority, so operators can dedicate workers: celery -A workers worker -Q critical,high
task_queues = [Queue(name) for name in ("critical", "high", "medium", "low")]
task_default_queue = "low"

# A batch is acknowledged only once it has committed; a worker lost mid-batch puts it back.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# Above the longest batch, so a slow batch is not delivered a second time while it runs.
broker_transport_options = {"visibility_timeout": int(os.environ.get("MIGRATOR_VISIBILITY_TIMEOUT", 4 * 3600))}

task_serializer = "json"
accept_content = ["json"]
result_serializer = "json"
task_track_started = True
worker_send_task_events = True
task_send_sent_event = True
