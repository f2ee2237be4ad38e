"""Which failures are worth another try after a pause (the rest are recorded and reported)."""
from __future__ import annotations

import time
from typing import Any, Callable

import psycopg2
import redis

from migrator.core.config import ConfigError

# Connections refused, dropped or timing out: the same work may well succeed in a moment.
TRANSIENT = (ConfigError, redis.ConnectionError, redis.TimeoutError, psycopg2.OperationalError, psycopg2.InterfaceError)
# Of the server's errors psycopg2 calls operational, those a moment may cure (SQLSTATE classes):
# connection (08), a transaction rolled back by a deadlock or a conflict (40), resources (53),
# shutdown or restart (57), system (58). Not 54 (a value past a limit, an index row too large):
# the same work fails the same way again.
RETRY_CLASSES = ("08", "40", "53", "57", "58")


def transient(exc: BaseException) -> bool:
    """Whether `exc` is worth another try after a pause."""
    code = getattr(exc, "pgcode", None)
    if isinstance(exc, psycopg2.OperationalError) and code:
        return code[:2] in RETRY_CLASSES
    return isinstance(exc, TRANSIENT)


def backoff(attempt: int, *, base: float = 0.5, cap: float = 30.0) -> float:
    """Seconds to wait before try `attempt + 1`: doubling from `base`, never above `cap`."""
    return min(cap, base * 2 ** attempt)


def reconnect(connect: Callable[[], Any], retries: int) -> Any:
    """A new connection, waiting with backoff for a server that may be restarting: `retries`
    more tries after the first (3: about 3.5 s of waiting; 7: about a minute)."""
    for attempt in range(retries + 1):
        try:
            return connect()
        except Exception as exc:
            if not transient(exc) or attempt == retries:
                raise
            time.sleep(backoff(attempt))
    raise AssertionError("unreachable")
