"""`migrator check`: can a run start from here? One verdict per check, each with its fix.

Every check runs even when another failed (one that needs a failed one says so), and none
raises: a bad URL or a dead service is a fail line. URLs are printed through `redact_url` and
error texts through `config.reason` (passwords and emails masked, the servers' hosts kept), so no
password reaches the output.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping as EnvMapping, Sequence

import psycopg2
import redis

from migrator.execution import executor
from migrator.core import ledger
from migrator.core import notifications
from migrator.core import registry
from migrator.core.config import (DEFAULT_BROKER_URL, DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL, ConfigError, Settings, reason,
                     same_redis_db)
from migrator.core.mapping import REDISJSON, Mapping
from migrator.core.redact import redact_url
from migrator.core.schema import require_schema, schema_versions
from migrator.core.source import cluster_masters, redisjson_refusal

Verdict = Literal["ok", "warn", "fail"]

# UNIQUE NULLS NOT DISTINCT and CREATE OR REPLACE TRIGGER of the schema arrived in PostgreSQL 15.
MIN_POSTGRES = 150000
RUN_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")
READ_ONLY = ("SELECT",)
ENV_DEFAULTS = (("REDIS_URL", "redis_url", DEFAULT_REDIS_URL), ("DATABASE_URL", "database_url", DEFAULT_DATABASE_URL),
                ("CELERY_BROKER_URL", "broker_url", DEFAULT_BROKER_URL))


@dataclass(frozen=True)
class CheckResult:
    name: str
    verdict: Verdict
    detail: str
    fix: str = ""


def run_checks(settings: Settings, *, need_workers: bool = True, timeout: float = 3.0,
               mapping: Mapping | None = None) -> list[CheckResult]:
    """Every check, in the order an operator fixes them. `timeout` bounds the broker, worker and
    result-backend probes; Redis and PostgreSQL use Settings' own connect timeouts, as a run does.
    `mapping`: the one whose tables are checked (default: registry.load's)."""
    mapping = mapping or registry.load()
    workers = executor.load("celery", settings)  # what a run without --local sends its batches to
    results = [_guarded("env", lambda: check_env(settings, os.environ)),
               _guarded("redis", lambda: check_redis(settings))]
    results.append(_guarded("keyspace events", lambda: check_keyspace_events(settings)))
    if any(p.redis_type == REDISJSON for p in mapping.patterns):
        results.append(_guarded("redis modules", lambda: check_modules(settings, mapping)))
    results += _postgres_checks(settings, mapping, [*mapping.table_names(), *ledger.TABLES])
    broker = _guarded("broker", lambda: check_broker(settings, timeout))
    results.append(broker)
    if need_workers:
        results.append(_skipped("workers", broker, "warn") if broker.verdict == "fail"
                       else _guarded("workers", lambda: check_workers(workers, timeout)))
    results.append(_guarded("result backend",
                            lambda: check_result_backend(settings.redis_url, workers.result_backend, timeout)))
    return results


def exit_code(results: Sequence[CheckResult]) -> int:
    return 1 if any(r.verdict == "fail" for r in results) else 0


def render_checks(results: Sequence[CheckResult]) -> str:
    """One line per check: verdict, name, detail, and for warn/fail what to do."""
    width = max((len(r.name) for r in results), default=0)
    return "\n".join(f"{r.verdict.upper():<4}  {r.name:<{width}}  {r.detail}"
                     + (f"  -> fix: {r.fix}" if r.verdict != "ok" and r.fix else "") for r in results)


# ---- running checks without ever raising ----

def _failure(name: str, exc: BaseException) -> CheckResult:
    """A fail line from an exception. ConfigError messages end with their fix after the last '; '."""
    if isinstance(exc, ConfigError):
        detail, _, fix = str(exc).rpartition("; ")
        return CheckResult(name, "fail", detail or fix, fix if detail else "")
    return CheckResult(name, "fail", reason(exc),
                       "unexpected error: check the URL and the service, then run the check again")


def _guarded(name: str, check: Callable[[], CheckResult]) -> CheckResult:
    try:
        return check()
    except Exception as exc:  # any failure is this check's verdict, never the end of the others
        return _failure(name, exc)


def _skipped(name: str, cause: CheckResult, verdict: Verdict) -> CheckResult:
    """A check that needs `cause`: as bad as its own failure would be, since nothing is known."""
    return CheckResult(name, verdict, f"skipped because {cause.name} failed", f"fix {cause.name} first")


# ---- env ----

def check_env(settings: Settings, environ: EnvMapping[str, str]) -> CheckResult:
    """Workers read only the environment, so a URL left to its default is worth a warning."""
    defaulted = [(var, default) for var, attr, default in ENV_DEFAULTS
                 if not environ.get(var) and getattr(settings, attr) == default]
    if defaulted:
        return CheckResult("env", "warn", "; ".join(f"{var} is not set: using the default {redact_url(default)}"
                                                    for var, default in defaulted),
                           f"export {', '.join(var for var, _ in defaulted)} (workers read only the environment; "
                           "the defaults suit one local host)")
    given = [var if environ.get(var) else f"{var} (from a flag)" for var, _, _ in ENV_DEFAULTS]
    return CheckResult("env", "ok", ", ".join(given) + " set")


# ---- redis ----

def check_redis(settings: Settings) -> CheckResult:
    client = settings.redis()  # raises ConfigError with the fix: bad URL, wrong password, unreachable
    try:
        server, replication, memory = (client.info(section) for section in ("server", "replication", "memory"))
        masters = cluster_masters(client)
    finally:
        client.close()
    shape = f"cluster of {len(masters)} masters: {', '.join(masters)}" if masters else "standalone"
    detail = (f"{redact_url(settings.redis_url)}: Redis {server['redis_version']}, {replication['role']}, {shape}, "
              f"{memory['used_memory_human']} used")
    if replication["role"] != "master":
        return CheckResult("redis", "warn", detail,
                           f"scan the master, not a replica: point REDIS_URL at "
                           f"{replication.get('master_host', '?')}:{replication.get('master_port', '?')}")
    return CheckResult("redis", "ok", detail)


def check_keyspace_events(settings: Settings) -> CheckResult:
    """What `migrator follow` needs of each server: keyspace notifications of every class a key can
    change by. A bulk run needs none, so a lack is a warning, with the exact setting to make."""
    client = settings.redis()
    try:
        found = notifications.current_by_master(client)
    finally:
        client.close()
    if None in found.values():  # CONFIG renamed or refused: a managed service
        return CheckResult("keyspace events", "warn", f"cannot read {notifications.SETTING} (CONFIG is refused: "
                           "a managed service?); `migrator follow` needs it to hold "
                           f"{notifications.NEEDED}", notifications.advice(""))
    lacking = {node: value for node, value in found.items() if notifications.missing(value)}
    shown = "; ".join(f"{node + ': ' if node else ''}{value!r}" for node, value in found.items())
    if lacking:
        value = next(iter(lacking.values()))
        return CheckResult("keyspace events", "warn", f"{notifications.SETTING} is {shown}, without "
                           f"{notifications.missing(value)}: `migrator follow` would not see the app's changes "
                           "(a bulk run does not need them)", notifications.advice(value))
    return CheckResult("keyspace events", "ok", f"{notifications.SETTING} is {shown}: `migrator follow` sees every "
                       "change")


def check_modules(settings: Settings, mapping: Mapping) -> CheckResult:
    """The modules the mapping's patterns read with (RedisJSON), loaded on the server."""
    client = settings.redis()
    try:
        refusal = redisjson_refusal(client, mapping.patterns)
    finally:
        client.close()
    if refusal:
        detail, _, fix = refusal.rpartition("; ")
        return CheckResult("redis modules", "fail", detail, fix)
    return CheckResult("redis modules", "ok", "RedisJSON loaded, for the mapping's json patterns")


# ---- postgres, schema, privileges, init-db ----

def _postgres_checks(settings: Settings, mapping: Mapping, tables: list[str]) -> list[CheckResult]:
    """The checks that share one PostgreSQL connection; without it they are skipped."""
    try:
        conn = settings.postgres()
    except Exception as exc:
        failed = _failure("postgres", exc)
        return [failed, _skipped("schema", failed, "fail"), _skipped("privileges", failed, "fail"),
                _skipped("init-db", failed, "warn")]
    conn.autocommit = True  # read-only probes; one that errors must not abort the next one's transaction
    try:
        url = redact_url(settings.database_url)
        return [_guarded("postgres", lambda: check_postgres(conn, url)),
                _guarded("schema", lambda: check_schema(conn, mapping)),
                _guarded("privileges", lambda: check_privileges(conn, tables)),
                _guarded("init-db", lambda: check_init_db(conn, tables))]
    finally:
        conn.close()


def check_postgres(conn: Any, url: str) -> CheckResult:
    with conn.cursor() as cur:
        cur.execute("SELECT current_setting('server_version_num')::int, current_setting('server_version'),"
                    " current_user, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)")
        version_num, version, user, superuser = cur.fetchone()
    return judge_postgres(url, version_num, version.split()[0], user, superuser)


def judge_postgres(url: str, version_num: int, version: str, user: str, superuser: bool) -> CheckResult:
    detail = f"{url}: PostgreSQL {version}, user {user}{' (superuser)' if superuser else ''}"
    if version_num < MIN_POSTGRES:
        return CheckResult("postgres", "fail", detail,
                           "upgrade to PostgreSQL 15 or later: the schema needs UNIQUE NULLS NOT DISTINCT "
                           "and CREATE OR REPLACE TRIGGER")
    if superuser:
        return CheckResult("postgres", "warn", detail,
                           "runs as a superuser: use a role with only the privileges a run needs (see privileges)")
    return CheckResult("postgres", "ok", detail)


def check_schema(conn: Any, mapping: Mapping) -> CheckResult:
    try:
        # ConfigError naming what is missing or stale, or a table without its journal trigger, with
        # `migrator init-db` as the fix
        require_schema(conn, mapping)
    except psycopg2.errors.InsufficientPrivilege:
        return CheckResult("schema", "fail", "this role may not read schema_migrations",
                           "grant it the privileges listed under privileges")
    return CheckResult("schema", "ok", f"current ({', '.join(schema_versions(mapping))}), every table of the "
                       f"{mapping.name} mapping journaled")


def check_privileges(conn: Any, tables: Sequence[str]) -> CheckResult:
    """Each privilege is asked on its own: has_table_privilege with a list is true if *any* is held."""
    wanted = {**{t: RUN_PRIVILEGES for t in tables}, "schema_migrations": READ_ONLY}
    pairs = [(table, privilege) for table, privileges in wanted.items() for privilege in privileges]
    with conn.cursor() as cur:
        cur.execute("SELECT quote_ident(t), p, to_regclass(t) IS NULL, has_table_privilege(to_regclass(t), p)"
                    " FROM unnest(%s::text[], %s::text[]) AS x(t, p)", ([t for t, _ in pairs], [p for _, p in pairs]))
        rows = cur.fetchall()
        # bigserial ids: INSERT into their tables needs USAGE on the sequence too
        # (CASE, not AND: the planner may ask has_sequence_privilege of a table before testing relkind)
        cur.execute("SELECT string_agg(quote_ident(s.relname), ', ' ORDER BY s.relname) FROM pg_class s"
                    " JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.oid"
                    " WHERE d.refobjid = ANY(array(SELECT to_regclass(x)::oid FROM unnest(%s::text[]) x))"
                    " AND CASE WHEN s.relkind = 'S' THEN NOT has_sequence_privilege(s.oid, 'USAGE') ELSE false END",
                    (list(wanted),))
        sequences = cur.fetchone()[0]
        cur.execute("SELECT quote_ident(current_user)")
        role = cur.fetchone()[0]
    absent = sorted({table for table, _, gone, _ in rows if gone})
    lacking: dict[str, list[str]] = {}
    for table, privilege, gone, held in rows:
        if not gone and not held:
            lacking.setdefault(table, []).append(privilege)
    if lacking or sequences:
        missing = _by_privileges(lacking)
        if sequences:
            missing[("USAGE",)] = [f"SEQUENCE {sequences}"]
        grants = " ".join(f"GRANT {', '.join(privileges)} ON {', '.join(names)} TO {role};"
                          for privileges, names in missing.items())
        return CheckResult("privileges", "fail", f"{role} lacks " + "; ".join(
            f"{', '.join(privileges)} on {', '.join(names)}" for privileges, names in missing.items()),
            f"as the tables' owner run: {grants}")
    if absent:
        which = "" if len(absent) == len(wanted) else f": {', '.join(absent)}"
        return CheckResult("privileges", "warn", f"not checked: {len(absent)} of the {len(wanted)} tables a run "
                           f"touches do not exist yet{which}", "run `migrator init-db`, then check again")
    return CheckResult("privileges", "ok", f"{role} may read and write the {len(wanted)} tables a run touches")


def _by_privileges(lacking: dict[str, list[str]]) -> dict[tuple[str, ...], list[str]]:
    """Tables grouped by the privileges they lack, so one GRANT covers each group."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for table, privileges in lacking.items():
        groups.setdefault(tuple(privileges), []).append(table)
    return groups


def check_init_db(conn: Any, tables: Sequence[str]) -> CheckResult:
    """`init-db` creates tables in the current schema and re-creates triggers and functions on
    existing ones, which takes CREATE there and owning what exists; a run needs neither."""
    with conn.cursor() as cur:
        cur.execute("SELECT quote_ident(current_schema()), has_schema_privilege(current_schema(), 'CREATE'),"
                    " array(SELECT quote_ident(c.relname) FROM pg_class c"
                    "       WHERE c.oid = ANY(array(SELECT to_regclass(x)::oid FROM unnest(%s::text[]) x))"
                    "       AND NOT pg_has_role(c.relowner, 'USAGE') ORDER BY c.relname)",
                    ([*tables, "schema_migrations"],))
        schema, can_create, not_owned = cur.fetchone()
    problems = ([] if can_create else [f"no CREATE on schema {schema}"]) + \
               ([f"does not own {', '.join(not_owned)}"] if not_owned else [])
    if problems:
        return CheckResult("init-db", "warn", "this role cannot run `migrator init-db`: " + "; ".join(problems),
                           "run `migrator init-db` as the schema's owner (a run itself needs only the privileges above)")
    return CheckResult("init-db", "ok", f"this role can run `migrator init-db` (CREATE on schema {schema})")


# ---- broker, workers, result backend ----

def check_broker(settings: Settings, timeout: float) -> CheckResult:
    # refused, timed out, wrong credentials, unknown transport: a ConfigError, i.e. a fail line with its fix
    with settings.broker(timeout) as conn:
        server = dict(getattr(conn.connection, "server_properties", {}))
    product = " ".join(str(server[k]) for k in ("product", "version") if k in server)
    return CheckResult("broker", "ok", f"{redact_url(settings.broker_url)}: connected{f' ({product})' if product else ''}")


def check_workers(workers: executor.Executor, timeout: float) -> CheckResult:
    return judge_workers(workers.consumers(timeout), list(workers.queues), timeout, workers.worker_command)


def judge_workers(replies: dict[str, list[str]], queues: list[str], timeout: float,
                  worker_command: Callable[[list[str]], str]) -> CheckResult:
    """`replies`: each worker that answered and the queues it consumes; `worker_command`: how to
    start one for some queues."""
    consumers = {q: sum(q in consumed for consumed in replies.values()) for q in queues}
    idle = [q for q in queues if not consumers[q]]
    detail = ", ".join(f"{q}: {n} worker{'' if n == 1 else 's'}" for q, n in consumers.items())
    if not replies:
        detail = f"no worker answered within {timeout:g} s"
    if idle:
        return CheckResult("workers", "warn", detail,
                           f"batches wait in their queues until a worker consumes them: {worker_command(idle)}")
    return CheckResult("workers", "ok", detail)


def check_result_backend(source_url: str, backend_url: str, timeout: float) -> CheckResult:
    shown = redact_url(backend_url)
    if same_redis_db(backend_url, source_url):
        return CheckResult("result backend", "fail", f"{shown} is the Redis database being migrated: its keys "
                           "would be scanned too", "set CELERY_RESULT_BACKEND to another database, "
                           "e.g. redis://host:6379/14")
    if not backend_url.startswith(("redis://", "rediss://")):
        return CheckResult("result backend", "warn", f"{shown}: not probed (only Redis backends are)",
                           "make sure the workers and this host reach it")
    client = redis.Redis.from_url(backend_url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    except redis.RedisError as exc:
        return CheckResult("result backend", "warn", f"cannot reach {shown} ({type(exc).__name__})",
                           "chords need it: start it, or set CELERY_RESULT_BACKEND to one that is up")
    finally:
        client.close()
    return CheckResult("result backend", "ok", f"{shown}: reachable, apart from the source")
