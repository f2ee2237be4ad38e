"""Connection settings from REDIS_URL, DATABASE_URL and CELERY_BROKER_URL (flags override them)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import amqp
import kombu
import kombu.exceptions
import psycopg2
import psycopg2.extensions
import redis

from migrator.core.redact import redact_secrets, redact_url

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"


def state_db(source_db: int) -> int:
    """The database beside the source's for the run's own state (Celery results, the read throttle).

    14, or 15 when the source is 14: never the database being migrated, whose scan would see it.
    """
    return 15 if source_db == 14 else 14


class ConfigError(RuntimeError):
    """A setting or connection problem, worded with its fix; the CLI prints it without a traceback."""


# What the broker's client raises when the broker cannot be reached, refuses the login or drops
# the connection (kombu wraps socket errors; py-amqp raises its own for a refused login or vhost).
BROKER_ERRORS = (kombu.exceptions.KombuError, amqp.exceptions.AMQPError)
# libpq's own "connection to server at "10.0.0.5", port 5432 failed: " before its reason
LIBPQ_WHERE = re.compile(r'(?<=: )connection to server (at|on) .*? failed: ')
DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "amqp": 5672, "pyamqp": 5672, "amqps": 5671}


def endpoint(url: str) -> str:
    """host:port of a Redis or broker URL, or of a PostgreSQL URL or DSN: which server a message is
    about. Never masked (a server's address is not personal data, and says which one failed)."""
    try:
        if url.startswith(("postgres://", "postgresql://")) or "://" not in url:
            params = psycopg2.extensions.parse_dsn(url)
            host, port = params.get("host") or "local socket", params.get("port") or 5432
        else:
            parts = urlsplit(url)
            host, port = parts.hostname or "localhost", parts.port or DEFAULT_PORTS.get(parts.scheme)
    except (ValueError, psycopg2.Error):  # not a URL at all: say so rather than guess
        return redact_url(url)
    return f"{host}:{port}" if port else host


def same_redis_db(a: str, b: str) -> bool:
    """Whether two URLs name the same database of the same Redis server."""
    pa, pb = urlsplit(a), urlsplit(b)
    db = lambda p: (p.path or "/0").strip("/") or "0"  # noqa: E731
    return pa.scheme.startswith("redis") and pb.scheme.startswith("redis") and \
        (pa.hostname, pa.port or 6379, db(pa)) == (pb.hostname, pb.port or 6379, db(pb))


def reason(exc: BaseException) -> str:
    """The first line of an error, passwords and emails masked (hosts left readable)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {redact_secrets(first)}" if first else type(exc).__name__


def service_failure(settings: "Settings", exc: BaseException) -> str:
    """One line for a service that failed in the middle of a command: which one (host and
    port), why, and what to do."""
    if isinstance(exc, psycopg2.Error):
        service, url, lost = "PostgreSQL", settings.database_url, (psycopg2.OperationalError, psycopg2.InterfaceError)
    elif isinstance(exc, redis.RedisError):
        service, url, lost = "Redis", settings.redis_url, (redis.ConnectionError, redis.TimeoutError)
    else:
        service, url, lost = "the Celery broker", settings.broker_url, BROKER_ERRORS
    if isinstance(exc, lost):
        return f"lost {service} at {endpoint(url)} ({reason(exc)}); run the command again once it is back"
    if isinstance(exc, psycopg2.errors.InsufficientPrivilege):
        return (f"{service} at {endpoint(url)} refused ({reason(exc)}); grant the role what `migrator check` "
                "lists under privileges")
    return f"{service} at {endpoint(url)} failed ({reason(exc)}); `migrator check` says what is wrong"


@dataclass(frozen=True)
class Settings:
    redis_url: str
    database_url: str
    broker_url: str

    @classmethod
    def from_env(cls, redis_url: str | None = None, database_url: str | None = None,
                 broker_url: str | None = None) -> "Settings":
        return cls(
            redis_url or os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL,
            database_url or os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL,
            broker_url or os.environ.get("CELERY_BROKER_URL") or DEFAULT_BROKER_URL,
        )

    def redis(self) -> redis.Redis:
        """A bytes client (values may not be UTF-8); fails early with the fix when unreachable."""
        try:
            client = redis.Redis.from_url(self.redis_url, decode_responses=False, socket_timeout=60,
                                          socket_connect_timeout=5, health_check_interval=30)
            client.ping()
        except ValueError as exc:
            raise ConfigError(f"REDIS_URL {redact_url(self.redis_url)!r} is not a Redis URL ({exc}); "
                              "expected redis://[:password@]host:port/db") from None
        except redis.AuthenticationError as exc:
            raise ConfigError(f"Redis at {endpoint(self.redis_url)} refused the credentials ({reason(exc)}); "
                              "check the password in REDIS_URL") from None
        except redis.RedisError as exc:
            raise ConfigError(f"cannot reach Redis at {endpoint(self.redis_url)} ({reason(exc)}); "
                              "is it running, and is REDIS_URL right?") from None
        return client

    def postgres(self) -> Any:
        try:
            # keepalives: a session whose server (or network) went away silently is noticed within
            # about a minute, instead of the system's two hours
            return psycopg2.connect(self.database_url, connect_timeout=5, application_name="migrator", keepalives=1,
                                    keepalives_idle=30, keepalives_interval=10, keepalives_count=3)
        except psycopg2.OperationalError as exc:
            why = LIBPQ_WHERE.sub("", reason(exc))  # the message names the server itself
            fix = ("check the user and password in DATABASE_URL" if "authentication failed" in why
                   else "check DATABASE_URL and that the server is up")
            raise ConfigError(f"cannot connect to PostgreSQL at {endpoint(self.database_url)} with "
                              f"{redact_url(self.database_url)} ({why}); {fix}") from None
        except psycopg2.ProgrammingError as exc:
            raise ConfigError(f"DATABASE_URL {redact_url(self.database_url)!r} is not a PostgreSQL URL ({exc})") from None

    def broker(self, timeout: float = 5.0) -> kombu.Connection:
        """A connection to the Celery broker, made now (release it): fails early with the fix when
        the broker is unreachable or refuses the login."""
        where = endpoint(self.broker_url)
        try:
            conn = kombu.Connection(self.broker_url, connect_timeout=timeout)
        except Exception as exc:  # an unknown transport, a malformed URL
            raise ConfigError(f"CELERY_BROKER_URL {redact_url(self.broker_url)!r} is not a broker URL "
                              f"({reason(exc)}); expected amqp://user:password@host:5672/vhost") from None
        try:
            conn.ensure_connection(max_retries=1, timeout=timeout, interval_start=0)
        except (amqp.exceptions.AccessRefused, amqp.exceptions.NotAllowed) as exc:
            conn.release()
            raise ConfigError(f"the Celery broker at {where} refused the login ({reason(exc)}); check the user, "
                              "password and vhost in CELERY_BROKER_URL") from None
        except Exception as exc:  # refused, timed out, unknown host
            conn.release()
            raise ConfigError(f"cannot reach the Celery broker at {where} ({reason(exc)}); is the broker running, "
                              "and is CELERY_BROKER_URL right (scheme, host, port)?") from None
        return conn
