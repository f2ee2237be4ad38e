"""Connection settings from REDIS_URL, DATABASE_URL and CELERY_BROKER_URL (flags override them)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import psycopg2
import redis

from .redact import redact_text, redact_url

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
        except redis.AuthenticationError:
            raise ConfigError(f"Redis at {redact_url(self.redis_url)} refused the credentials; "
                              "check the password in REDIS_URL") from None
        except redis.RedisError as exc:
            raise ConfigError(f"cannot reach Redis at {redact_url(self.redis_url)} ({type(exc).__name__}); "
                              "is it running, and is REDIS_URL right?") from None
        return client

    def postgres(self) -> Any:
        try:
            return psycopg2.connect(self.database_url, connect_timeout=5, application_name="migrator")
        except psycopg2.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "connection failed"
            raise ConfigError(f"cannot connect to PostgreSQL at {redact_url(self.database_url)}: "
                              f"{redact_text(first)}; check DATABASE_URL and that the server is up") from None
        except psycopg2.ProgrammingError as exc:
            raise ConfigError(f"DATABASE_URL {redact_url(self.database_url)!r} is not a PostgreSQL URL ({exc})") from None
