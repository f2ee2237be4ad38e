"""`migrator backup`: a pg_dump of the target database and an RDB snapshot of the source, before a run.

Passwords go to pg_dump and redis-cli through their environment (PGPASSWORD, REDISCLI_AUTH),
never on a command line, where any user of the host could read them in the process list.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import redis
from psycopg2.extensions import make_dsn, parse_dsn

from migrator.core.config import ConfigError, Settings
from migrator.core.redact import redact_text
from migrator.core.source import cluster_masters

PG_MARK = b"PostgreSQL database dump"
PG_COMPLETE = b"PostgreSQL database dump complete"  # pg_dump's last comment: the dump was not cut short
RDB_MAGIC = b"REDIS"
TOOL_HINTS = {
    "pg_dump": "install the PostgreSQL client, at least the server's major version (apt-get install postgresql-client)",
    "redis-cli": "install the Redis command-line tools (apt-get install redis-tools)",
}


@dataclass(frozen=True)
class Dump:
    path: Path
    size: int
    connection: tuple[str, ...]  # the tool's connection options, free of secrets; restore reuses them
    command: tuple[str, ...]  # argv as run
    secret_env: str | None  # the variable that carried the password, if the URL had one

    @property
    def command_line(self) -> str:
        return (f"{self.secret_env}=*** " if self.secret_env else "") + shlex.join(self.command)


@dataclass(frozen=True)
class BackupResult:
    sql: Dump
    rdb: tuple[Dump, ...]  # one per master for a Redis Cluster source

    @property
    def commands(self) -> tuple[str, ...]:
        return (self.sql.command_line, *(d.command_line for d in self.rdb))


@dataclass(frozen=True)
class _Target:
    """One dump to take: where, how to connect, and the password to hand over in the environment."""
    path: Path
    connection: tuple[str, ...]
    secret_env: str
    secret: str | None


def backup(settings: Settings, directory: Path, *, name: str, now: datetime | None = None) -> BackupResult:
    """Dump DATABASE_URL with pg_dump (`<name>_pre_migration_<ts>.sql`, name: the mapping's) and
    REDIS_URL's server(s) with `redis-cli --rdb` into `directory`.

    Everything is checked before the first file is written; on any failure the files of this
    backup are removed, so a directory never holds a half backup that looks whole.
    """
    stamp = (now or datetime.now()).strftime("%Y%m%d_%H%M%S")
    pg_dump, redis_cli = _tool("pg_dump"), _tool("redis-cli")
    directory = _writable(directory)
    settings.postgres().close()  # the usual error with its fix (unreachable, refused, bad URL) before any file
    sql = _pg_target(settings.database_url, directory / f"{_file_safe(name)}_pre_migration_{stamp}.sql")
    rdbs = _redis_targets(settings, directory, stamp)
    taken = [t.path for t in (sql, *rdbs) if t.path.exists()]
    if taken:
        raise ConfigError(f"{', '.join(map(str, taken))} exists already; wait a second or choose another directory")
    try:
        pg = _dump(sql, (pg_dump, "--no-password", "--clean", "--if-exists", "--file", str(sql.path), *sql.connection),
                   _check_pg_dump)
        # masters at once: each snapshot waits for its server's fork (and diskless-sync delay), not for the others
        with ThreadPoolExecutor() as pool:
            snapshots = tuple(pool.map(lambda t: _dump(t, (redis_cli, *t.connection, "--rdb", str(t.path)), _check_rdb),
                                       rdbs))
        return BackupResult(pg, snapshots)
    except BaseException:  # the pool has waited for every dump: nothing writes to what is removed
        for target in (sql, *rdbs):
            target.path.unlink(missing_ok=True)
        raise


def restore_instructions(result: BackupResult) -> str:
    """Shell commands that put PostgreSQL and Redis back as they were when `result` was taken:
    one paragraph per server, each runnable as it stands."""
    return "\n\n".join([_pg_restore(result.sql), *map(_redis_restore, result.rdb)]) + "\n"


def _pg_restore(dump: Dump) -> str:
    return "\n".join([
        "# PostgreSQL: drops and re-creates every object the dump holds, in one transaction"
        + (f" ({dump.secret_env} set to the password in DATABASE_URL)" if dump.secret_env else ""),
        shlex.join(["psql", "--no-password", "--set", "ON_ERROR_STOP=1", "--single-transaction", *dump.connection,
                    "--file", str(dump.path)]),
    ])


def _redis_restore(dump: Dump) -> str:
    """Stop the server, put the snapshot in place of its RDB file, start it with AOF off (an AOF
    would be loaded instead of the RDB), then turn AOF back on if it was: that rewrites the AOF
    from the restored data."""
    cli = shlex.join(["redis-cli", *dump.connection])
    return "\n".join([
        f"# Redis {shlex.join(dump.connection)}, on its own host: replace its data with the snapshot"
        + (f" ({dump.secret_env} set to the password in REDIS_URL)" if dump.secret_env else ""),
        "# (under systemd: systemctl stop/start in place of SHUTDOWN/redis-server, appendonly no for that start)",
        f"dir=$({cli} --raw CONFIG GET dir | tail -n 1)",
        f"file=$({cli} --raw CONFIG GET dbfilename | tail -n 1)",
        f"aof=$({cli} --raw CONFIG GET appendonly | tail -n 1)",
        f"conf=$({cli} --raw INFO server | sed -n 's/^config_file://p' | tr -d '\\r')",
        f"{cli} SHUTDOWN NOSAVE",
        f'cp {shlex.quote(str(dump.path))} "$dir/$file"',
        'redis-server ${conf:+"$conf"} --appendonly no --daemonize yes',
        f"for _ in $(seq 60); do {cli} PING 2>/dev/null | grep -q PONG && break; sleep 1; done",
        f'if [ "$aof" = yes ]; then {cli} CONFIG SET appendonly yes; fi',
    ])


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ConfigError(f"{name} is not on PATH; {TOOL_HINTS[name]}")
    return path


def _writable(directory: Path) -> Path:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()  # the one test that holds for root and read-only mounts
    except OSError as exc:
        raise ConfigError(f"cannot write backups to {directory} ({exc.strerror or exc}); "
                          "choose another directory or fix its permissions") from None
    return directory.resolve()


def _pg_target(url: str, path: Path) -> _Target:
    """libpq's own parser, so a key=value DSN or URL query options work as they do for psql."""
    params = parse_dsn(url)
    password = params.pop("password", None)
    return _Target(path, ("--dbname", make_dsn(**params)), "PGPASSWORD", password)


def _redis_targets(settings: Settings, directory: Path, stamp: str) -> list[_Target]:
    client = settings.redis()
    try:
        masters = cluster_masters(client)
        pool = client.connection_pool
    finally:
        client.close()
    kw = pool.connection_kwargs
    options = (("--user", kw["username"]) if kw.get("username") else ()) + \
        (("--tls",) if issubclass(pool.connection_class, redis.SSLConnection) else ())
    if not masters:
        where = ("-s", kw["path"]) if "path" in kw else ("-h", kw.get("host", "localhost"), "-p", str(kw.get("port", 6379)))
        return [_Target(directory / f"redis_backup_{stamp}.rdb", (*where, *options), "REDISCLI_AUTH", kw.get("password"))]
    # --rdb snapshots one server: a cluster needs every master's own snapshot
    return [_Target(directory / f"redis_backup_{stamp}_{_file_safe(host)}_{port}.rdb",
                    ("-h", host, "-p", port, *options), "REDISCLI_AUTH", kw.get("password"))
            for host, _, port in (m.rpartition(":") for m in masters)]


def _file_safe(host: str) -> str:
    return re.sub(r"[^\w.-]", "_", host)  # an IPv6 address's colons


def _environment(target: _Target) -> dict[str, str]:
    """This process's environment plus the password. Without one REDISCLI_AUTH is dropped (redis-py,
    which checked the connection, ignores it) while PGPASSWORD stays (libpq, in both, reads it)."""
    env = dict(os.environ)
    if target.secret is not None:
        env[target.secret_env] = target.secret
    elif target.secret_env == "REDISCLI_AUTH":
        env.pop("REDISCLI_AUTH", None)
    return env


def _dump(target: _Target, argv: tuple[str, ...], verify: Callable[[Path], str | None]) -> Dump:
    done = subprocess.run(argv, env=_environment(target), capture_output=True)
    tool = Path(argv[0]).name
    if done.returncode != 0:
        said = (done.stderr or done.stdout).decode("utf-8", "replace").strip().splitlines()[-3:]
        raise ConfigError(f"{tool} failed (exit {done.returncode}): {redact_text(' / '.join(said))}; "
                          "fix the cause and run the backup again")
    problem = verify(target.path) if target.path.exists() else "was not written"
    if problem:
        raise ConfigError(f"{tool} exited 0 but {target.path} {problem}; run the backup again")
    return Dump(target.path, target.path.stat().st_size, target.connection, argv,
                target.secret_env if target.secret is not None else None)


def _check_pg_dump(path: Path) -> str | None:
    with path.open("rb") as f:
        head = f.read(4096)
        f.seek(max(0, path.stat().st_size - 4096))
        tail = f.read()
    if PG_MARK not in head:
        return "is not a pg_dump file"
    return None if PG_COMPLETE in tail else "ends before pg_dump's closing comment"


def _check_rdb(path: Path) -> str | None:
    with path.open("rb") as f:
        return None if f.read(len(RDB_MAGIC)) == RDB_MAGIC else "does not start like an RDB file"
