"""Applying `sql/` to the target database: ordered, versioned, idempotent, in one transaction."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from psycopg2 import sql

from .config import ConfigError

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
# Any constant works; it keeps two `init-db` runs from interleaving.
INIT_LOCK = 0x6D696772


def sql_files() -> list[Path]:
    files = sorted(SQL_DIR.glob("[0-9][0-9][0-9]_*.sql"))
    if not files:
        raise ConfigError(f"no schema files in {SQL_DIR}; is this a complete checkout?")
    return files


def _checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def init_db(conn: Any) -> list[tuple[str, str]]:
    """Apply every file (each is idempotent) and record its version; returns (version, action)."""
    actions = []
    with conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (INIT_LOCK,))
        applied = dict(_applied(cur))
        for path in sql_files():
            version, checksum = path.stem, _checksum(path)
            cur.execute(path.read_text())
            cur.execute(
                "INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)"
                " ON CONFLICT (version) DO UPDATE SET checksum = EXCLUDED.checksum, applied_at = now()",
                (version, checksum),
            )
            state = applied.get(version)
            actions.append((version, "applied" if state is None else "current" if state == checksum else "updated"))
    return actions


def _applied(cur: Any) -> list[tuple[str, str]]:
    cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not cur.fetchone()[0]:
        return []
    cur.execute("SELECT version, checksum FROM schema_migrations")
    return cur.fetchall()


def require_schema(conn: Any) -> None:
    """Refuse to run against a database whose schema is missing or older than this checkout."""
    with conn.cursor() as cur:
        applied = dict(_applied(cur))
    conn.rollback()
    stale = [p.stem for p in sql_files() if applied.get(p.stem) != _checksum(p)]
    if stale:
        raise ConfigError(
            f"the target database lacks the current schema ({', '.join(stale)} not applied); run `migrator init-db` first"
        )


def database_url_for(url: str, dbname: str) -> str:
    """The same server and credentials, another database."""
    return urlunsplit(urlsplit(url)._replace(path="/" + dbname))


def ensure_database(admin_conn: Any, dbname: str) -> bool:
    """Create `dbname` if it does not exist; True when created. `admin_conn` is any other database."""
    admin_conn.autocommit = True
    with admin_conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
        if cur.fetchone():
            return False
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    return True


def empty_tables(conn: Any, tables: list[str]) -> None:
    """Empty these tables (a demo's or a test's own database), whatever refers to them."""
    with conn, conn.cursor() as cur:
        cur.execute(sql.SQL("TRUNCATE {} CASCADE").format(sql.SQL(", ").join(map(sql.Identifier, tables))))
