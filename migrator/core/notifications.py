"""Keyspace notifications, the source of `migrator follow`: whether the server publishes the ones it
needs, how to make it, and a subscriber per server (per master of a cluster, where they are
node-local) that turns them into changed keys.

Pub/sub delivers at most once: a notification published while the subscriber is disconnected is
gone. So every (re)connection is reported to the caller, which reconciles the keyspace (the events
say which keys changed; only a reconciliation says what was missed meanwhile).
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Protocol

import redis
import redis.client
import structlog

from migrator.core.redact import redact_text
from migrator.core.source import cluster_masters, node_client

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


def current_by_master(client: redis.Redis) -> dict[str, str | None]:
    """Each master's notify-keyspace-events ("" names a standalone server), None where CONFIG is
    refused (a managed service renames or forbids it)."""
    found: dict[str, str | None] = {}
    for node in cluster_masters(client) or [""]:
        server = node_client(client, node) if node else client
        try:
            found[node] = current(server)
        except redis.ResponseError:
            found[node] = None
        finally:
            if server is not client:
                server.close()
    return found


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


class Sink(Protocol):
    """Where a subscriber's news goes (migrator/execution/follow.py's Follower)."""

    def changed(self, key: bytes, event: bytes) -> None:
        """A key of the mapping changed (event: b"set", b"del", b"expired", ...)."""

    def connected(self, node: str, first: bool) -> None:
        """Subscribed to `node`: its first subscription, or again after a loss (events were missed)."""

    def lost(self, node: str, why: str) -> None:
        """`node`'s subscription is down, and trying again (nothing is received from it meanwhile)."""

    def left(self, node: str) -> None:
        """`node` is no master of the cluster any more: no longer subscribed to."""


# Seconds between attempts to reach a server that went away (doubling, up to this much).
MAX_BACKOFF_S = 5.0
# Seconds between two looks at a cluster's masters (a failover, a master added or gone).
TOPOLOGY_EVERY_S = 5.0


class Subscriber(threading.Thread):
    """Subscribes to one server's keyspace notifications of database `db` and hands each changed key
    that starts with one of `prefixes` to the sink; tells it once per connection: the first, and one
    per loss after it (when events may have been missed), once subscribed again."""

    def __init__(self, client: redis.Redis, node: str, db: int, prefixes: tuple[bytes, ...], sink: Sink,
                 stop: threading.Event) -> None:
        super().__init__(name=f"subscriber-{node or 'redis'}", daemon=True)
        self.client = node_client(client, node) if node else client
        self.node, self.prefix, self.prefixes = node, f"__keyspace@{db}__:".encode(), prefixes
        self.sink, self.stop = sink, stop
        self.retired = threading.Event()  # this node alone is no longer followed
        self.ready = threading.Event()  # subscribed at least once
        # redis-py connected the subscription again on its own, not yet told. One cut can reach
        # both ways back: redis-py reconnects while handling the failed read, then gives the error
        # up to run() all the same (its retries spent), which subscribes once more. So the loss is
        # told once, when the subscription is known to stand: at the next read that does not fail,
        # or at run()'s own subscription, whichever comes first.
        self.back = False

    def ending(self) -> bool:
        return self.stop.is_set() or self.retired.is_set()

    def run(self) -> None:
        first, backoff = True, 0.1
        try:
            while not self.ending():
                pubsub = _Watched(self.client, self._reconnected)
                try:
                    pubsub.psubscribe(self.prefix + b"*")
                    self._subscribed(first)
                    first, backoff = False, 0.1
                    self._listen(pubsub)
                except redis.RedisError as exc:
                    if self.ending():
                        break
                    why = redact_text(str(exc))
                    log.warning("subscriber_lost", node=self.node, error=why, retry_in_s=backoff)
                    self.sink.lost(self.node, why)
                    self.stop.wait(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                finally:
                    pubsub.close()
        finally:
            if self.node:  # (its own client: node_client)
                self.client.close()

    def _listen(self, pubsub: redis.client.PubSub) -> None:
        cut = len(self.prefix)
        while not self.ending():
            message = pubsub.get_message(timeout=0.2)
            if self.back:  # the read after redis-py's reconnection did not fail: it stands
                self._subscribed(False)
            if message is None or message["type"] != "pmessage":
                continue
            key = message["channel"][cut:]
            if key.startswith(self.prefixes):
                self.sink.changed(key, message["data"])

    def _subscribed(self, first: bool) -> None:
        self.back = False
        self.ready.set()
        log.info("subscribed", node=self.node, reconnect=not first)
        self.sink.connected(self.node, first)

    def _reconnected(self) -> None:
        log.warning("subscriber_reconnected", node=self.node)
        self.back = True


class Subscriptions:
    """A Subscriber per server ([""]: the one standalone server; a cluster's masters), kept to a
    cluster's masters while it runs: a master that appears (a replica promoted by a failover, a
    node added) is subscribed to, its first connection reconciled like any; one that is no master
    any more is left, said in the log and to the sink."""

    def __init__(self, client: redis.Redis, db: int, prefixes: tuple[bytes, ...], sink: Sink,
                 stop: threading.Event, configure: bool = False) -> None:
        self.client, self.db, self.prefixes, self.sink, self.stop = client, db, prefixes, sink, stop
        self.configure = configure  # a new master's setting may be made here (`follow --configure`)
        self.subscribers: dict[str, Subscriber] = {}

    def start(self, nodes: list[str], timeout: float = 10.0) -> None:
        """Subscribed to each of `nodes`, or a redis.ConnectionError (the session stopped)."""
        started = [self._subscribe(node) for node in nodes]
        deadline = time.monotonic() + timeout
        for s in started:
            if not s.ready.wait(max(deadline - time.monotonic(), 0)):
                self.stop.set()
                raise redis.ConnectionError(f"could not subscribe to the keyspace notifications of "
                                            f"{s.node or 'the source'}")
        if nodes != [""]:
            threading.Thread(target=self._watch, name="topology", daemon=True).start()

    def _subscribe(self, node: str) -> Subscriber:
        s = self.subscribers[node] = Subscriber(self.client, node, self.db, self.prefixes, self.sink, self.stop)
        s.start()
        return s

    def _watch(self) -> None:
        while not self.stop.wait(TOPOLOGY_EVERY_S):
            masters = self._masters()
            if masters is not None:
                self.follow(masters)

    def _masters(self) -> list[str] | None:
        """The cluster's masters as any node that answers sees them (the one in the URL may be the one
        that failed); None when none answers."""
        for node in ["", *self.subscribers]:
            try:
                if not node:
                    return cluster_masters(self.client)
                with node_client(self.client, node) as server:
                    return cluster_masters(server)
            except redis.RedisError:
                continue
        log.warning("cluster_topology_unknown", nodes=list(self.subscribers))
        return None

    def follow(self, masters: list[str]) -> None:
        """Subscribed to `masters`, and to them alone."""
        added = [node for node in masters if node not in self.subscribers]
        gone = [node for node in self.subscribers if node not in masters]
        if not added and not gone:
            return
        log.warning("cluster_topology_changed", added=added, gone=gone, masters=masters)
        for node in gone:
            self.subscribers.pop(node).retired.set()
            self.sink.left(node)
        for node in added:
            if self._publishes(node):
                self._subscribe(node)

    def _publishes(self, node: str) -> bool:
        """Whether a new master publishes the notifications follow needs (set here with `configure`);
        if not, the sink is told why, and the next look tries again (a replica promoted by a
        failover has the setting of its own config file, not its old master's)."""
        server = node_client(self.client, node)
        try:
            value = current(server)
            if not missing(value):
                return True
            if self.configure:
                log.warning("notifications_configured", node=node, was=value, now=configure(server))
                return True
            why = f"{SETTING} is {value!r}, without {missing(value)}; {advice(value)}"
        except redis.RedisError as exc:
            why = f"cannot read {SETTING}: {redact_text(str(exc))}"
        finally:
            server.close()
        log.warning("subscriber_not_started", node=node, why=why)
        self.sink.lost(node, why)
        return False
