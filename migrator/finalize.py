"""What happens after a priority's batches: link legacy user ids, then judge the priority."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg2 import sql

from .mapping import Mapping

LINK = sql.SQL(
    "UPDATE {t} SET user_id = m.entity_id FROM legacy_id_map m"
    " WHERE {t}.user_id IS NULL AND {t}.{c} IS NOT NULL"
    " AND m.legacy_id = CASE WHEN position('@' IN {t}.{c}) > 0 THEN lower({t}.{c}) ELSE {t}.{c} END"
)


def link_users(conn: Any, mapping: Mapping, run_id: str) -> int:
    """Fill user_id on rows that name their user by email, now that the users are in."""
    linked = 0
    with conn, conn.cursor() as cur:
        cur.execute("SELECT set_config('migrator.run_id', %s, true)", (run_id,))
        for table, column in mapping.user_links:
            cur.execute(LINK.format(t=sql.Identifier(table), c=sql.Identifier(column)))
            linked += cur.rowcount
    return linked


@dataclass(frozen=True)
class PriorityVerdict:
    priority: str
    batches: int
    failed: int
    dead: int
    linked: int

    @property
    def ok(self) -> bool:
        return self.failed == 0


def finalize_priority(conn: Any, mapping: Mapping, run_id: str, priority: str, dry_run: bool) -> PriorityVerdict:
    linked = 0 if dry_run else link_users(conn, mapping, run_id)
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*), count(*) FILTER (WHERE status <> 'done'), COALESCE(sum(keys_dead), 0)"
            " FROM migration_batches WHERE run_id = %s AND priority = %s",
            (run_id, priority),
        )
        batches, failed, dead = cur.fetchone()
    return PriorityVerdict(priority, batches, failed, int(dead), linked)
