"""Keyspace notifications, the source of `migrator follow`: whether the server publishes the ones it
needs, how to make it, and a subscriber per server that turns them into changed keys.

Pub/sub delivers at most once: a notification published while the subscriber is disconnected is
gone. So every (re)connection is reported to the caller, which reconciles the keyspace (the events
say which keys changed; only a reconciliation says what was missed meanwhile).
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import redis
import redis.client
import structlog

from migrator.core.redact import redact_text
from migrator.core.source import node_client

log = structlog.get_logger("migrator.core.notifications")

SETTING = "notify-keyspace-events"
# Keyspace events (K: the key in the channel) of every class a key can change by: generic (del,
# rename, expire...), string, list, set, hash, sorted set, expired, evicted, stream.
CLASSES = "g$lshzxet"
NEEDED = "K" + CLASSES
# What 'A' stands for in the setting (Redis 7 adds 'd', module key types, and 'n', new keys, is apart).
ALL = "g$lshzxetd"


def flags(value: str) -> set[str]:
    """The classes a notify-keyspace-events value holds, 'A' expanded."""
    found = set(value)
    if "A" in found:
        found |= set(ALL)
        found.discard("A")
    return found


def missing(value: str) -> str:
    """The classes follow needs that `value` lacks, in NEEDED's order ('' when none)."""
    held = flags(value)
    return "".join(c for c in NEEDED if c not in held)


def wanted(value: str) -> str:
    """`value` with the classes follow needs added (as 'A': module key types too, which cost nothing
    when no module writes), the others it holds kept (E, n, m)."""
    held = flags(value) | set("K" + ALL)
    return "".join(c for c in "KE" if c in held) + "A" + "".join(sorted(held - set("KE" + ALL)))


def advice(value: str) -> str:
    """How to turn the missing classes on: the command, and each managed service's parameter."""
    new = wanted(value)
    return (f"redis-cli CONFIG SET {SETTING} '{new}' (or `migrator follow --configure`); on a managed service set "
            f"the parameter instead: AWS ElastiCache/MemoryDB parameter group `{SETTING}` = {new}; GCP Memorystore "
            f"`--update-redis-config {SETTING}={new}`; Azure Cache for Redis: Advanced settings > Keyspace "
            f"notifications = {new}")


def current(client: redis.Redis) -> str:
    """The server's notify-keyspace-events; raises redis.ResponseError where CONFIG is refused (a
    managed service renames or forbids it)."""
    found = {(k.decode() if isinstance(k, bytes) else k): v for k, v in client.config_get(SETTING).items()}
    value = found.get(SETTING, b"")
    return value.decode() if isinstance(value, bytes) else str(value)


def configure(client: redis.Redis) -> str:
    """Add the classes follow needs to the server's setting (keeping the others); the new value."""
    new = wanted(current(client))
    client.config_set(SETTING, new)
    return new


class _Watched(redis.client.PubSub):
    """A pub/sub connection that says whenever redis-py connects it again (it does so on its own,
    silently, and resubscribes: the notifications published in between are lost)."""

    def __init__(self, client: redis.Redis, on_reconnect: Callable[[], None]) -> None:
        super().__init__(client.connection_pool, ignore_subscribe_messages=True)
        self.on_reconnect = on_reconnect

    def on_connect(self, connection: redis.connection.AbstractConnection) -> None:
        super().on_connect(connection)  # subscribed again first: nothing after this is missed
        self.on_reconnect()


# Seconds between attempts to reach a server that went away (doubling, up to this much).
MAX_BACKOFF_S = 5.0


class Subscriber(threading.Thread):
    """Subscribes to one server's keyspace notifications of database `db` and hands each changed
    key, with its event (b"set", b"del", b"expired", ...), to `changed`; `connected(node, first)` is called once subscribed, on the first connection
    and on every one after a loss (when events may have been missed)."""

    def __init__(self, client: redis.Redis, node: str, db: int, changed: Callable[[bytes, bytes], None],
                 connected: Callable[[str, bool], None], stop: threading.Event) -> None:
        super().__init__(name=f"subscriber-{node or 'redis'}", daemon=True)
        self.client = node_client(client, node) if node else client
        self.node, self.prefix = node, f"__keyspace@{db}__:".encode()
        self.changed, self.connected, self.stop = changed, connected, stop
        self.reconnects = 0
        self.ready = threading.Event()  # subscribed at least once

    def run(self) -> None:
        first, backoff = True, 0.1
        while not self.stop.is_set():
            pubsub = _Watched(self.client, lambda: self._lost_and_back())
            try:
                pubsub.psubscribe(self.prefix + b"*")
                self._subscribed(first)
                first, backoff = False, 0.1
                self._listen(pubsub)
            except redis.RedisError as exc:
                if self.stop.is_set():
                    break
                log.warning("subscriber_lost", node=self.node, error=redact_text(str(exc)), retry_in_s=backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            finally:
                pubsub.close()

    def _listen(self, pubsub: redis.client.PubSub) -> None:
        cut = len(self.prefix)
        while not self.stop.is_set():
            message = pubsub.get_message(timeout=0.2)
            if message is None or message["type"] != "pmessage":
                continue
            self.changed(message["channel"][cut:], message["data"])

    def _subscribed(self, first: bool) -> None:
        if not first:
            self.reconnects += 1
        self.ready.set()
        log.info("subscribed", node=self.node, reconnect=not first)
        self.connected(self.node, first)

    def _lost_and_back(self) -> None:
        # redis-py connected the subscription again on its own
        self.reconnects += 1
        log.warning("subscriber_reconnected", node=self.node)
        self.connected(self.node, False)


def subscribe_all(client: redis.Redis, nodes: list[str], db: int, changed: Callable[[bytes, bytes], None],
                  connected: Callable[[str, bool], None], stop: threading.Event,
                  timeout: float = 10.0) -> list[Subscriber]:
    """A started Subscriber per node ([""]: the one standalone server), once each has subscribed."""
    subscribers = [Subscriber(client, node, db, changed, connected, stop) for node in nodes]
    for s in subscribers:
        s.start()
    deadline = time.monotonic() + timeout
    for s in subscribers:
        if not s.ready.wait(max(deadline - time.monotonic(), 0)):
            stop.set()
            raise redis.ConnectionError(f"could not subscribe to the keyspace notifications of {s.node or 'the source'}")
    return subscribers
