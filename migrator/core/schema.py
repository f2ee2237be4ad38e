"""The target database's schema, applied by `migrator init-db` in one transaction: ordered,
versioned in schema_migrations, idempotent.

First the engine's own SQL (migrator/core/sql/, package data), then the chosen mapping's DDL
(`Mapping.schema`), then what the engine derives for every table the mapping writes: the provenance
columns it fills, the journal trigger exact rollback depends on and the seal trigger; last, the grants of the roles
of sql/roles/least_privilege.sql, to those that exist.
"""
from __future__ import annotations

import hashlib
import re
from importlib.resources import files
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from psycopg2 import sql

from migrator.core.config import ConfigError
from migrator.core.mapping import Mapping
from migrator.core.merge import SYNCED_AT

# Any constant works; it keeps two `init-db` runs from interleaving.
INIT_LOCK = 0x6D696772
ENGINE_FILE = re.compile(r"(\d{3}_\w+)\.sql")
# The columns the engine fills on every row besides the mapping's own, with their types: the run, the
# key, the pattern's source, the key's TTL, and a digest of the key's value (writer.PROVENANCE: every
# write fills them), by which a verification tells a row whose key the app wrote again ("changed since
# the run") from a row that itself changed ("different"); and when a `migrator follow` session last
# read the row's key (merge.SYNCED_AT, the fence); and the row's seal, a digest of what the bulk batch that
# wrote it sent (migrator/core/seal.py), gone once anything else changes the row. A mapping's DDL need not
# declare them.
PROVENANCE = {"migration_run": "uuid", "source_key": "text", "metadata": "jsonb NOT NULL DEFAULT '{}'",
              "expires_at": "timestamptz", "source_digest": "bigint", SYNCED_AT: "timestamptz", "row_seal": "bigint"}
# The ledger's table through which every run links users (migrator/core/sql/001_ledger.sql): a run writes
# it as it writes its mapping's tables.
LEGACY_ID_MAP = "legacy_id_map"
# A journal trigger as journal_sql makes it: statement-level (type bit 1 clear), AFTER (bits 2 and 64
# clear), on UPDATE (bit 16), enabled, with the transition table migrator_journal() reads; and its seal
# trigger: row-level (bit 1), BEFORE (bit 2), on INSERT (bit 4) and UPDATE, not INSTEAD OF (bit 64), enabled.
JOURNALED = """
SELECT t, to_regclass(quote_ident(t)) IS NOT NULL FROM unnest(%s::text[]) WITH ORDINALITY AS x(t, n)
WHERE NOT EXISTS (SELECT FROM pg_trigger g WHERE g.tgrelid = to_regclass(quote_ident(t))
                  AND g.tgfoid = to_regprocedure('migrator_journal()') AND g.tgenabled IN ('O', 'A')
                  AND g.tgtype::int & 83 = 16 AND g.tgoldtable = 'old_rows')
   OR NOT EXISTS (SELECT FROM pg_trigger g WHERE g.tgrelid = to_regclass(quote_ident(t))
                  AND g.tgfoid = to_regprocedure('migrator_unseal()') AND g.tgenabled IN ('O', 'A')
                  AND g.tgtype::int & 87 = 23)
ORDER BY n
"""


def engine_sql() -> list[tuple[str, str]]:
    """The engine's own SQL files, in order, as (version, text)."""
    found = sorted((m[1], f.read_text()) for f in files("migrator.core.sql").iterdir() if (m := ENGINE_FILE.fullmatch(f.name)))
    if not found:
        raise ConfigError("no schema files in the installed migrator package; reinstall it")
    return found


def written_tables(mapping: Mapping) -> list[str]:
    """Every table a run of `mapping` writes: its own and the legacy id map."""
    return list(dict.fromkeys([LEGACY_ID_MAP, *mapping.table_names()]))


def _ident(name: str) -> str:
    # quoted as quote_ident would, by hand: journal_sql's text is checksummed with no connection at hand
    return '"' + name.replace('"', '""') + '"'


def journal_sql(mapping: Mapping) -> str:
    """What the engine adds to every table `mapping` writes, after the mapping's DDL: the provenance
    columns it fills (source_key indexed; `deleted_at` where follow marks rows), the journal trigger that keeps the prior image of each row a run changes
    (without it a rollback would delete the rows that existed before the run), and the seal trigger
    that takes a row's seal away when a write that does not vouch for it changes the row."""
    columns = ", ".join(f"ADD COLUMN IF NOT EXISTS {column} {kind}" for column, kind in PROVENANCE.items())
    rules = {rule.name: rule for rule in mapping.rules}
    # a table whose rows `migrator follow` marks when their key goes (TableRule.on_delete) gets the mark's column
    marked = {table: f", ADD COLUMN IF NOT EXISTS {_ident(rules[table].deleted_at)} timestamptz"
              for table in rules if rules[table].on_delete == "mark"}
    # (the index: `migrator follow` finds the rows of a key that changed or went by its source_key)
    return "".join(f"ALTER TABLE {_ident(table)} {columns}{marked.get(table, '')};\n"
                   f"CREATE INDEX IF NOT EXISTS {_ident(table + '_source_key_idx')} ON {_ident(table)} (source_key);\n"
                   f"CREATE OR REPLACE TRIGGER {_ident(table + '_journal')} AFTER UPDATE ON {_ident(table)}\n"
                   "    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION migrator_journal();\n"
                   f"CREATE OR REPLACE TRIGGER {_ident(table + '_unseal')} BEFORE INSERT OR UPDATE ON {_ident(table)}\n"
                   "    FOR EACH ROW WHEN (NEW.row_seal IS NOT NULL AND (current_setting('migrator.sealing', true)"
                   " IS DISTINCT FROM 'on' OR pg_trigger_depth() > 0)) EXECUTE FUNCTION migrator_unseal();\n"
                   for table in written_tables(mapping))


def _checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _expected(mapping: Mapping | None) -> list[tuple[str, str]]:
    """(version, checksum) of the engine's SQL and, given one, of a mapping's part: its DDL and what the
    engine derives from its tables (a table it starts writing makes a database stale)."""
    expected = [(version, _checksum(text)) for version, text in engine_sql()]
    if mapping is not None:
        expected.append((f"mapping:{mapping.name}", _checksum("\0".join([*mapping.schema, journal_sql(mapping)]))))
    return expected


def schema_versions(mapping: Mapping) -> list[str]:
    return [version for version, _ in _expected(mapping)]


def init_db(conn: Any, mapping: Mapping) -> list[tuple[str, str]]:
    """Apply the engine's SQL, then `mapping`'s DDL and what the engine derives for its tables, then
    the roles' grants, recording each version; returns (version, action). Refused, nothing applied,
    when the mapping writes a table its DDL does not create."""
    actions = []
    with conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (INIT_LOCK,))
        applied = dict(_applied(cur))
        engine = engine_sql()
        for version, text in engine:
            cur.execute(text)
        for text in mapping.schema:
            cur.execute(text)
        absent = [table for table, exists in missing_journals(cur, written_tables(mapping)).items() if not exists]
        if absent:
            raise ConfigError(f"the {mapping.name} mapping writes {', '.join(absent)}, which its schema does not "
                              "create; add a CREATE TABLE for each to the mapping's schema")
        cur.execute(journal_sql(mapping))
        cur.execute("SELECT migrator_grant_roles()")
        for version, checksum in _expected(mapping):
            cur.execute(
                "INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)"
                " ON CONFLICT (version) DO UPDATE SET checksum = EXCLUDED.checksum, applied_at = now()",
                (version, checksum),
            )
            state = applied.get(version)
            actions.append((version, "applied" if state is None else "current" if state == checksum else "updated"))
        # files that are no longer the engine's (an application's schema that once was, now its mapping's)
        cur.execute("DELETE FROM schema_migrations WHERE version ~ '^[0-9]{3}_' AND version <> ALL(%s)"
                    " RETURNING version", ([version for version, _ in engine],))
        actions += [(version, "retired") for (version,) in cur.fetchall()]
    return actions


def _applied(cur: Any) -> list[tuple[str, str]]:
    cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not cur.fetchone()[0]:
        return []
    cur.execute("SELECT version, checksum FROM schema_migrations")
    return cur.fetchall()


def missing_journals(cur: Any, tables: list[str]) -> dict[str, bool]:
    """The tables among `tables` without their journal or seal trigger, each with whether it exists at all."""
    cur.execute(JOURNALED, (tables,))
    return dict(cur.fetchall())


def journal_refusal(mapping: Mapping, missing: dict[str, bool]) -> str:
    """Why nothing may write (or roll back) these tables until init-db has run, and that fix."""
    bare = [table for table, exists in missing.items() if exists]
    absent = [table for table, exists in missing.items() if not exists]
    what = ([f"{', '.join(bare)} without a journal or seal trigger: rows a run changes there are not journaled, so a "
             "rollback would delete the ones that existed before the run instead of restoring them, or a row "
             "changed there keeps a seal that no longer vouches for it"] if bare else []) \
        + ([f"{', '.join(absent)}, which the database does not have"] if absent else [])
    return f"the {mapping.name} mapping writes {', and '.join(what)}; run `migrator init-db` (it creates them)"


def require_schema(conn: Any, mapping: Mapping | None = None) -> None:
    """Refuse a database whose schema is missing or older than this migrator's: the engine's and,
    given `mapping`, the mapping's, every table of which must carry its journal and seal triggers."""
    expected = _expected(mapping)
    with conn.cursor() as cur:
        applied = dict(_applied(cur))
        stale = [version for version, checksum in expected if applied.get(version) != checksum]
        missing = missing_journals(cur, written_tables(mapping)) if mapping is not None and not stale else {}
    conn.rollback()
    if stale:
        where = f"{conn.info.dbname!r} on {conn.info.host}:{conn.info.port}"
        raise ConfigError(
            f"the target database {where} lacks the current schema ({', '.join(stale)} not applied); run `migrator "
            "init-db` first, or point --database-url (DATABASE_URL) at the database the migration writes"
        )
    if missing:
        raise ConfigError(journal_refusal(mapping, missing))


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
