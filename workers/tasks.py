"""Celery tasks: thin wrappers that hand ids to the engine in `migrator/` (never data)."""
from __future__ import annotations

from celery.utils.log import get_task_logger

from migrator.batch import migrate_batch
from migrator.config import Settings
from migrator.threadr import THREADR

from .app import app

logger = get_task_logger(__name__)


@app.task(name="migrator.migrate_batch")
def migrate_batch_task(batch_id: int) -> dict:
    """Migrate one planned batch (a priority over a cursor range) recorded in the ledger."""
    settings = Settings.from_env()
    client, conn = settings.redis(), settings.postgres()
    try:
        result = migrate_batch(client, conn, THREADR, batch_id)
    finally:
        conn.close()
        client.close()
    return {"batch_id": result.batch_id, "rows_written": result.rows_written, "checksum": result.checksum}
