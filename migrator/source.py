"""Reading keys from Redis: TYPE, PTTL and the value in one pipeline, decoded per pattern."""
from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import hiredis
import orjson
import redis

from .mapping import BadRecord

# The read command for each Redis type.
READ_COMMANDS = {
    "string": ("GET",),
    "hash": ("HGETALL",),
    "set": ("SMEMBERS",),
    "zset": ("ZRANGE", "0", "-1", "WITHSCORES"),
    "list": ("LRANGE", "0", "-1"),
}


@dataclass(slots=True)
class KeyRead:
    key: bytes
    redis_type: str  # the type the key holds; "none" once it has expired
    pttl: int  # milliseconds; -1 without TTL, -2 gone
    raw: Any  # reply of the read command for the type the pattern expects
    size: int  # bytes of payload, for the value size limit
    truncated: bool = False  # a string over the limit: `raw` holds only its first bytes


# Strings of a read chunk are read up to this many bytes: one that is longer is read whole on its
# own afterwards, so a chunk of many keys never holds more than a few large values at once.
CHUNK_READ_BYTES = 64 * 1024


def _read_command(key: bytes, redis_type: str, max_bytes: int | None = None) -> tuple:
    # A string is read only up to one byte past the limit: a huge value costs no more memory
    # than the limit. A stream or module type has no reader here: the TYPE reply alone says
    # what was there.
    if redis_type == "string" and max_bytes is not None:
        return ("GETRANGE", key, "0", str(max_bytes))
    name, *args = READ_COMMANDS.get(redis_type, ("EXISTS",))
    return (name, key, *args)


def _shape(redis_type: str, raw: Any) -> Any:
    """A read reply as the decoders take it: a hash as a dict, a zset as (member, score) pairs."""
    if isinstance(raw, set):
        return list(raw)
    if not isinstance(raw, list):
        return raw
    if redis_type == "hash":
        return dict(zip(raw[::2], raw[1::2]))
    if redis_type == "zset":
        pairs = raw if raw and isinstance(raw[0], (tuple, list)) else zip(raw[::2], raw[1::2])
        return [(m, float(s)) for m, s in pairs]
    return raw


try:  # what redis-py's hiredis reader answers when it needs more bytes (redis 5 to 8)
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _MORE
except ImportError:  # another layout: every reply through read_response
    _MORE = None


@contextmanager
def pooled(client: redis.Redis) -> Iterator[redis.connection.AbstractConnection]:
    """One of the client's pooled connections, to send and read on directly. Disconnected if the
    block ends early (an error, or a generator closed mid-way): replies may be left unread on it."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        yield conn
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


def roundtrip(client: redis.Redis, commands: Sequence[tuple], *, large: bool = False) -> list[Any]:
    """Send `commands` in one round trip; their raw replies in order, a refused one as its error.

    On a plain client this talks to one pooled connection directly: redis-py's pipeline spends
    more per command on bookkeeping than the read costs the server. `large`: the replies may be
    large values, and the connection is closed after them, so its reader's buffer (which grows to
    the largest reply and stays) goes too.
    """
    if isinstance(client, redis.RedisCluster):  # routed by slot; same replies, shaped by _shape
        pipe = client.pipeline()
        for command in commands:
            pipe.execute_command(*command)
        return pipe.execute(raise_on_error=False)
    with pooled(client) as conn:
        conn.send_packed_command([b"".join(map(hiredis.pack_command, commands))])
        # Replies already received are taken from redis-py's hiredis reader as they are
        # (an error reply as its exception object): read_response costs microseconds per reply.
        buffered = getattr(getattr(conn, "_parser", None), "_reader", None) if _MORE is not None else None
        replies: list[Any] = []
        while len(replies) < len(commands):
            reply = buffered.gets() if buffered is not None else _MORE
            if reply is _MORE:
                try:
                    reply = conn.read_response()  # waits for more from the socket
                except redis.ResponseError as exc:
                    reply = exc
            replies.append(reply)
        if large:
            conn.disconnect()
        return replies


def payload_size(raw: Any) -> int:
    if raw is None or isinstance(raw, Exception):
        return 0
    if isinstance(raw, bytes):
        return len(raw)
    if isinstance(raw, dict):
        return sum(len(k) + len(v) for k, v in raw.items())
    return sum(len(m[0]) + 8 if isinstance(m, tuple) else len(m) for m in raw)


def read_keys(client: redis.Redis, wanted: Sequence[tuple[bytes, str]],
              max_bytes: int | None = CHUNK_READ_BYTES) -> list[KeyRead]:
    """Read (key, expected type) pairs: the value and its PTTL in one round trip.

    PTTL comes after the value, so a key that vanishes in between is counted gone whichever
    came first (GETRANGE answers "" for a missing key). Strings are read up to `max_bytes` + 1
    (None: whole); a longer one is marked truncated, with its real length asked for, for the
    caller to read whole or refuse. TYPE is only asked when the read command was refused
    (WRONGTYPE), and such a key is read again by its real type, so its dead letter keeps what
    was really there.
    """
    commands = []
    for key, expected in wanted:
        commands.append(_read_command(key, expected, max_bytes))
        commands.append(("PTTL", key))
    replies = roundtrip(client, commands, large=max_bytes is None)
    reads = []
    for i, (key, expected) in enumerate(wanted):
        raw, pttl = _shape(expected, replies[2 * i]), replies[2 * i + 1]
        # An empty reply is a missing key: Redis deletes emptied collections.
        gone = raw is None or pttl == -2 or (isinstance(raw, (dict, list)) and not raw)
        rtype = "none" if gone else expected
        reads.append(KeyRead(key, rtype, pttl if isinstance(pttl, int) else -1, raw, payload_size(raw)))
    wrong = [r for r in reads if isinstance(r.raw, redis.ResponseError) and "WRONGTYPE" in str(r.raw)]
    if wrong:
        for r, rtype in zip(wrong, roundtrip(client, [("TYPE", r.key) for r in wrong])):
            r.redis_type = rtype.decode() if isinstance(rtype, bytes) else str(rtype)
        for r, raw in zip(wrong, roundtrip(client, [_read_command(r.key, r.redis_type, max_bytes) for r in wrong])):
            r.raw = _shape(r.redis_type, raw)
            r.size = payload_size(r.raw)
    huge = [r for r in reads if max_bytes is not None and isinstance(r.raw, bytes) and len(r.raw) > max_bytes]
    if huge:
        for r, length in zip(huge, roundtrip(client, [("STRLEN", r.key) for r in huge])):
            r.truncated, r.size = True, length if isinstance(length, int) else r.size
    return reads


def value_digest(raw: Any) -> int:
    """CRC-32 of a value as read, whatever its type: the same for the same content whatever order
    Redis answered a hash or a set in (that order may change with the server process)."""
    if isinstance(raw, bytes):
        return zlib.crc32(raw)
    if raw is None or isinstance(raw, Exception):
        return 0
    if isinstance(raw, dict):
        parts = sorted(k + b"\x00" + v for k, v in raw.items())
    elif raw and isinstance(raw[0], tuple):  # a zset, in Redis's own (score, member) order
        parts = [m + b"\x00" + repr(score).encode() for m, score in raw]
    else:
        parts = sorted(raw)
    return zlib.crc32(b"\x01".join(parts))


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord(f"{what} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None


def decode(raw: Any, value_format: str) -> Any:
    """Turn a read reply into what the pattern's transform expects, or raise BadRecord."""
    if value_format == "json":
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            _utf8(raw, "value")  # a clearer reason when the bytes are not text at all
            raise BadRecord(f"value is not valid JSON: {exc}") from None
    if value_format == "int":
        text = _utf8(raw, "value")
        try:
            return int(text)
        except ValueError:
            raise BadRecord(f"value {text[:40]!r} is not an integer") from None
    if value_format == "text":
        return _utf8(raw, "value")
    if value_format == "hash":
        return {_utf8(k, "hash field"): _utf8(v, "hash value") for k, v in raw.items()}
    if value_format == "set":
        return sorted(_utf8(m, "set member") for m in raw)
    if value_format == "zset":
        return [(_utf8(m, "zset member"), score) for m, score in raw]
    raise ValueError(f"unknown value format {value_format!r}")


def dead_letter_bytes(raw: Any) -> bytes | None:
    """A byte form of any reply, exact for strings, for the dead-letter table."""
    if raw is None or isinstance(raw, bytes):
        return raw
    if isinstance(raw, Exception):
        return None
    if isinstance(raw, dict):
        raw = {k.decode("utf-8", "backslashreplace"): v.decode("utf-8", "backslashreplace") for k, v in raw.items()}
    elif isinstance(raw, (list, set)):
        raw = [
            [m[0].decode("utf-8", "backslashreplace"), m[1]] if isinstance(m, tuple) else m.decode("utf-8", "backslashreplace")
            for m in raw
        ]
    return orjson.dumps(raw)


def cluster_masters(client: redis.Redis) -> list[str]:
    """"host:port" of every master holding slots in a Redis Cluster; [] for a standalone server."""
    if not client.info("cluster").get("cluster_enabled"):
        return []
    nodes = client.execute_command("CLUSTER NODES")  # redis-py parses it: {"host:port": {flags, slots, ...}}
    own_host = client.connection_pool.connection_kwargs.get("host", "127.0.0.1")
    masters = []
    for address, node in nodes.items():
        flags = str(node.get("flags", "")).split(",")
        if "master" in flags and "fail" not in flags and node.get("slots"):
            host, _, port = address.split("@", 1)[0].rpartition(":")
            masters.append(f"{host or own_host}:{port}")
    return sorted(masters)


def client_like(client: redis.Redis, **changes: Any) -> redis.Redis:
    """A new client with the credentials and options of `client`, but for `changes` (host, port, db)."""
    pool = client.connection_pool
    return redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=pool.connection_class, **{**pool.connection_kwargs, **changes}))


def node_client(client: redis.Redis, node: str) -> redis.Redis:
    """A client for one cluster node, with the same credentials and options as `client`."""
    host, _, port = node.rpartition(":")
    return client_like(client, host=host, port=int(port))


def key_client(client: redis.Redis) -> redis.Redis:
    """A client that reaches any key: `client` itself, or a cluster client routing by slot."""
    if not cluster_masters(client):
        return client
    kw = client.connection_pool.connection_kwargs
    return redis.RedisCluster(host=kw.get("host"), port=kw.get("port"), username=kw.get("username"),
                              password=kw.get("password"), decode_responses=False)
