"""Which failures are worth another try after a pause (the rest are recorded and reported)."""
from __future__ import annotations

import psycopg2
import redis

from .config import ConfigError

# Connections refused, dropped or timing out: the same work may well succeed in a moment.
TRANSIENT = (ConfigError, redis.ConnectionError, redis.TimeoutError, psycopg2.OperationalError, psycopg2.InterfaceError)
