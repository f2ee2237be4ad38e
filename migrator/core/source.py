"""Reading keys from Redis: TYPE, PTTL and the value in one pipeline, decoded per pattern."""
from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import islice
from typing import Any, Iterator, Sequence

import hiredis
import orjson
import redis

from migrator.core import jsoncodec
from migrator.core.mapping import COLLECTION_TYPES, REDISJSON, BadRecord, Pattern

# The command reading a whole value, for each Redis type (its arguments after the key).
READ_COMMANDS = {
    "string": ("GET",),
    "hash": ("HGETALL",),
    "set": ("SMEMBERS",),
    "zset": ("ZRANGE", "0", "-1", "WITHSCORES"),
    "list": ("LRANGE", "0", "-1"),
    "stream": ("XRANGE", "-", "+"),
    REDISJSON: ("JSON.GET", "$"),  # the module's command; `$` answers the document inside an array
}


class Elements(list):
    """A list's elements as read, with the index of the first: a list is read a part at a time, and
    where an element stands is part of what the list holds. `after`: the element that stood next
    when this part was read (the next part's first, unless the list moved meanwhile), or None."""

    __slots__ = ("start", "after")

    def __init__(self, items: Any = (), start: int = 0, after: bytes | None = None) -> None:
        super().__init__(items)
        self.start = start
        self.after = after


class Moved(Exception):
    """A list read by index changed between two of its parts (an element pushed or popped at its head
    shifts every index): the parts read would make a list it never was."""

    def __str__(self) -> str:
        return "the list changed while it was read in parts (an element pushed or popped before the part read)"


@dataclass(slots=True)
class KeyRead:
    key: bytes
    redis_type: str  # the type the key holds; "none" once it has expired
    pttl: int  # milliseconds; -1 without TTL, -2 gone, NOT_ASKED when read without it
    raw: Any  # reply of the read command for the type the pattern expects
    size: int  # bytes of payload, for the value size limit (of what `raw` holds, for a collection read in part)
    # a string over the limit (`raw` holds only its first bytes), or a collection read in part
    truncated: bool = False
    resume: Any = None  # a collection read in part: where its next part starts (see read_parts)


NOT_ASKED = -3  # KeyRead.pttl of a key read without its PTTL (read_keys' `ttl`)


def expiry(now: datetime, pttl: int) -> datetime | None:
    """The absolute expiry a PTTL says (None: no TTL, or none asked), `now` taken before the read was sent:
    never later than Redis's own, so a key found gone is always past its rows' expires_at (counted from
    the reply, it would run late by the round trip, and a verification just after the key expired would
    find its rows not yet due: a difference)."""
    return now + MILLISECOND * pttl if pttl > 0 else None


# timedelta(milliseconds=n) parses keywords on every call; a product does not
MILLISECOND = timedelta(milliseconds=1)

# Strings of a read chunk are read up to this many bytes: one that is longer is read whole on its
# own afterwards, so a chunk of many keys never holds more than a few large values at once.
CHUNK_READ_BYTES = 64 * 1024
# Collections are read this many members at a time: a small one whole, in its chunk's round trip;
# a larger one is left for its caller to read on a part at a time (read_parts), or whole.
CHUNK_READ_MEMBERS = 1000


def _read_command(key: bytes, redis_type: str, max_bytes: int | None = None) -> tuple:
    # A string is read only up to one byte past the limit: a huge value costs no more memory
    # than the limit; a collection or stream only its first part. A RedisJSON document is read
    # whole. Another module's type has no reader here: the TYPE reply alone says what was there.
    if max_bytes is not None:
        if redis_type == "string":
            return ("GETRANGE", key, "0", str(max_bytes))
        if redis_type in COLLECTION_TYPES:
            return _part_command(key, redis_type, None)
    name, *args = READ_COMMANDS.get(redis_type, ("EXISTS",))
    return (name, key, *args)


def _part_command(key: bytes, redis_type: str, at: Any) -> tuple:
    """Read the part of a collection that starts `at` (None: its start). Hashes and sets by their
    SCAN cursor, which returns every member present throughout at least once whatever is written
    meanwhile; a sorted set by (score, how many of that score were read), so that members added or
    removed before it shift nothing, in Redis's order; a stream by the id of the part's first entry
    (ids only grow, so entries added meanwhile come last); a list by index (nothing better exists).
    Ranges ask for one member more than a part holds, to tell whether more follow."""
    n = CHUNK_READ_MEMBERS
    if redis_type in ("hash", "set"):
        return ("HSCAN" if redis_type == "hash" else "SSCAN", key, at or 0, "COUNT", n)
    if redis_type == "zset":
        if at is None:
            return ("ZRANGE", key, "0", str(n), "WITHSCORES")
        return ("ZRANGEBYSCORE", key, repr(at[0]), "+inf", "WITHSCORES", "LIMIT", str(at[1]), str(n + 1))
    if redis_type == "stream":
        return ("XRANGE", key, at or "-", "+", "COUNT", str(n + 1))
    return ("LRANGE", key, str(at or 0), str((at or 0) + n))


def _part(redis_type: str, reply: Any, at: Any) -> tuple[Any, Any]:
    """A part's reply as the decoders take it, and where the next part starts (None: this was the last)."""
    if isinstance(reply, Exception):
        return reply, None
    n = CHUNK_READ_MEMBERS
    if redis_type in ("hash", "set"):
        cursor, items = reply  # (a cluster client parses it: an int cursor, a hash as a dict)
        return _shape(redis_type, items), None if int(cursor) == 0 else cursor
    raw = _shape(redis_type, reply)
    if redis_type == "list":
        start = at or 0
        return Elements(raw[:n], start, raw[n] if len(raw) > n else None), start + n if len(raw) > n else None
    if len(raw) <= n:
        return raw, None
    if redis_type == "stream":  # the next part starts at the entry this one asked for beyond its own
        return raw[:n], raw[n][0]
    raw = raw[:n]
    last = raw[-1][1]
    same = next((i for i, (_, score) in enumerate(reversed(raw)) if score != last), n)
    return raw, (last, same + (at[1] if at is not None and at[0] == last else 0))


def _shape(redis_type: str, raw: Any) -> Any:
    """A read reply as the decoders take it: a hash as a dict, a zset as (member, score) pairs, a
    stream as (id, {field: value}) entries, a list as Elements, a RedisJSON document as its JSON."""
    if isinstance(raw, set):
        return list(raw)
    if redis_type == REDISJSON and isinstance(raw, bytes):
        return raw[1:-1]  # JSON.GET ... $ answers [document]
    if not isinstance(raw, list):
        return raw
    if redis_type == "hash":
        return dict(zip(raw[::2], raw[1::2]))
    if redis_type == "zset":
        pairs = raw if raw and isinstance(raw[0], (tuple, list)) else zip(raw[::2], raw[1::2])
        return [(m, float(s)) for m, s in pairs]
    if redis_type == "stream":  # (a cluster client parses an entry's fields into a dict itself)
        return [(entry_id, fields if isinstance(fields, dict) else dict(zip(fields[::2], fields[1::2])))
                for entry_id, fields in raw]
    if redis_type == "list":
        return Elements(raw)
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
            if buffered is not None:
                replies += iter(buffered.gets, _MORE)  # (every reply received so far, in one call)
                if len(replies) == len(commands):
                    break
            try:
                replies.append(conn.read_response())  # waits for more from the socket
            except redis.ResponseError as exc:
                replies.append(exc)
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
    return sum(_member_size(m) for m in raw)


def _member_size(member: Any) -> int:
    if not isinstance(member, tuple):
        return len(member)
    if isinstance(member[1], dict):  # a stream entry: its id and fields
        return len(member[0]) + sum(len(k) + len(v) for k, v in member[1].items())
    return len(member[0]) + 8  # a sorted set's member and its score


def _reply(redis_type: str, reply: Any, max_bytes: int | None) -> tuple[Any, Any]:
    """A read_keys reply as the decoders take it, and where a collection read in part goes on."""
    if max_bytes is not None and redis_type in COLLECTION_TYPES:
        return _part(redis_type, reply, None)
    return _shape(redis_type, reply), None


def read_keys(client: redis.Redis, wanted: Sequence[tuple[bytes, str]],
              max_bytes: int | None = CHUNK_READ_BYTES, ttl: Sequence[bool] | None = None) -> list[KeyRead]:
    """Read (key, expected type) pairs: the value and its PTTL in one round trip.

    PTTL comes after the value, so a key that vanishes in between is counted gone whichever
    came first (GETRANGE answers "" for a missing key). `ttl` (one flag per key; None: all) says
    whose PTTL to ask: a key read without it has pttl NOT_ASKED, and is found gone by its value
    alone (a missing key answers nil or an empty collection; a string answering "" is asked EXISTS,
    since an empty value answers the same). Strings are read up to `max_bytes` + 1,
    collections up to CHUNK_READ_MEMBERS members (`max_bytes` None: every value whole); a longer
    string is marked truncated, with its real length asked for, for the caller to read whole or
    refuse, and a larger collection is marked truncated with where its next part starts, for the
    caller to read on (read_parts) or read whole. TYPE is only asked when the read command was
    refused (WRONGTYPE), and such a key is read again by its real type, so its dead letter keeps
    what was really there.
    """
    asked = [True] * len(wanted) if ttl is None else list(ttl)
    commands = []
    up_to = None if max_bytes is None else str(max_bytes)  # (spelled once, not per string)
    for (key, expected), with_ttl in zip(wanted, asked):
        if expected == "string" and up_to is not None:  # _read_command's, made here: most keys are strings
            commands.append(("GETRANGE", key, "0", up_to))
        else:
            commands.append(_read_command(key, expected, max_bytes))
        if with_ttl:
            commands.append(("PTTL", key))
    replies = iter(roundtrip(client, commands, large=max_bytes is None))
    reads: list[KeyRead] = []
    # Told apart as they are read, not by a pass over all of them after: strings that answered ""
    # without their PTTL asked, strings longer than max_bytes, and values of another type.
    unsure: list[KeyRead] = []
    huge: list[KeyRead] = []
    wrong: list[KeyRead] = []
    for (key, expected), with_ttl in zip(wanted, asked):
        reply = next(replies)
        pttl = next(replies) if with_ttl else NOT_ASKED
        if isinstance(reply, bytes) and expected == "string":  # nearly every key: taken as it came
            read = KeyRead(key, "none" if pttl == -2 else expected, pttl if isinstance(pttl, int) else -1, reply,
                           len(reply))
            reads.append(read)
            if not reply and not with_ttl:
                unsure.append(read)
            elif max_bytes is not None and len(reply) > max_bytes and pttl != -2:
                huge.append(read)
            continue
        raw, resume = _reply(expected, reply, max_bytes)
        # An empty reply is a missing key: Redis deletes emptied collections (a SCAN call may find
        # no member in its part of a sparse table, and says where to go on).
        gone = raw is None or pttl == -2 or (isinstance(raw, (dict, list)) and not raw and resume is None)
        rtype = "none" if gone else expected
        reads.append(KeyRead(key, rtype, pttl if isinstance(pttl, int) else -1, raw, payload_size(raw),
                             resume is not None, resume))
        if isinstance(raw, redis.ResponseError) and "WRONGTYPE" in str(raw):
            wrong.append(reads[-1])
    if unsure:
        for r, exists in zip(unsure, roundtrip(client, [("EXISTS", r.key) for r in unsure])):
            if exists == 0:
                r.redis_type = "none"
    if wrong:
        for r, rtype in zip(wrong, roundtrip(client, [("TYPE", r.key) for r in wrong])):
            r.redis_type = reply_text(rtype)
        for r, raw in zip(wrong, roundtrip(client, [_read_command(r.key, r.redis_type, max_bytes) for r in wrong])):
            r.raw, r.resume = _reply(r.redis_type, raw, max_bytes)
            r.size, r.truncated = payload_size(r.raw), r.resume is not None
        huge += [r for r in wrong if max_bytes is not None and r.redis_type == "string" and isinstance(r.raw, bytes)
                 and len(r.raw) > max_bytes]
    if huge:
        for r, length in zip(huge, roundtrip(client, [("STRLEN", r.key) for r in huge])):
            r.truncated, r.size = True, length if isinstance(length, int) else r.size
    return reads


def read_parts(client: redis.Redis, first: KeyRead) -> Iterator[KeyRead]:
    """`first` (a read of read_keys), then, for a collection it read in part, the other parts, in
    order, each read with the key's PTTL in one round trip: a key gone mid-way ends them with a part
    of type "none". Only one part is in hand at a time. While the app writes the collection, a hash
    or a set may give a member twice (the SCAN guarantee: never none that stayed); a list that moved
    between two parts ends them with a part whose raw is Moved."""
    yield first
    part = first
    while part.resume is not None and not isinstance(part.raw, Exception):
        reply, pttl = roundtrip(client, [_part_command(first.key, first.redis_type, part.resume), ("PTTL", first.key)])
        raw, resume = _part(first.redis_type, reply, part.resume)
        if isinstance(raw, Elements) and isinstance(part.raw, Elements) and (raw[:1] or [None])[0] != part.raw.after:
            raw, resume = Moved(), None  # (the element that stood next is not the one standing there now)
        gone = pttl == -2
        part = KeyRead(first.key, "none" if gone else first.redis_type, pttl if isinstance(pttl, int) else -1, raw,
                       payload_size(raw), resume is not None and not gone, None if gone else resume)
        yield part


def value_digest(raw: Any) -> int:
    """CRC-32 of a value as read, whatever its type: the same for the same content whatever order
    Redis answered a hash or a set in (that order may change with the server process)."""
    if isinstance(raw, bytes):
        return zlib.crc32(raw)
    if raw is None or isinstance(raw, Exception):
        return 0
    if isinstance(raw, dict):
        parts = sorted(k + b"\x00" + v for k, v in raw.items())
    elif isinstance(raw, Elements):  # a list: where each element stands counts
        parts = [str(raw.start).encode(), *raw]
    elif raw and isinstance(raw[0], tuple) and isinstance(raw[0][1], dict):  # a stream, in id order
        parts = [i + b"\x00" + b"\x00".join(k + b"\x02" + v for k, v in fields.items()) for i, fields in raw]
    elif raw and isinstance(raw[0], tuple):  # a zset, in Redis's own (score, member) order
        parts = [m + b"\x00" + repr(score).encode() for m, score in raw]
    else:
        parts = sorted(raw)
    return zlib.crc32(b"\x01".join(parts))


def utf8(raw: bytes, what: str = "") -> str:
    """`raw` as text; BadRecord naming `what` and the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord(f"{what} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})".lstrip()) from None


def reply_text(reply: Any) -> str:
    """A reply Redis answers as a status or bulk string (TYPE, a module's name) as text."""
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def decode(raw: Any, value_format: str) -> Any:
    """Turn a read reply into what the pattern's transform expects, or raise BadRecord."""
    if value_format == "json":
        try:
            return jsoncodec.loads(raw)
        except jsoncodec.JSONDecodeError as exc:
            utf8(raw, "value")  # a clearer reason when the bytes are not text at all
            raise BadRecord(f"value is not valid JSON: {exc}") from None
    if value_format == "int":
        # Only an integer as INCR writes one: int() also takes " 42", "+1", "1_000", "007" and other
        # scripts' digits, each a different text that would arrive as the same number, silently.
        if isinstance(raw, bytes):
            try:
                n = int(raw)
            except ValueError:
                n = None
            if n is not None and b"%d" % n == raw:
                return n
        text = utf8(raw, "value")
        raise BadRecord(f"value {text[:40]!r} is not an integer as INCR writes one")
    if value_format == "text":
        return utf8(raw, "value")
    if value_format == "bytes":  # taken as it is: binary data (a pickle, a compressed blob)
        return raw
    if value_format == "hash":
        return {utf8(k, "hash field"): utf8(v, "hash value") for k, v in raw.items()}
    if value_format == "hash_bytes":  # each value decoded by whoever takes it: a binary field only fails its taker
        return {utf8(k, "hash field"): v for k, v in raw.items()}
    if value_format == "set":
        return sorted(utf8(m, "set member") for m in raw)
    if value_format == "zset":
        return [(utf8(m, "zset member"), score) for m, score in raw]
    if value_format == "list":  # (index, element), the index counted from the list's head
        return [(i, utf8(m, "list element")) for i, m in enumerate(raw, raw.start)]
    if value_format == "stream":
        return [(utf8(i, "stream entry id"), {utf8(k, "stream field"): utf8(v, "stream value") for k, v in fields.items()})
                for i, fields in raw]
    # a collection's members (a stream's values) as bytes, each decoded by whoever takes it (as hash_bytes)
    if value_format == "set_bytes":
        return sorted(raw)
    if value_format == "zset_bytes":
        return list(raw)
    if value_format == "list_bytes":
        return list(enumerate(raw, raw.start))
    if value_format == "stream_bytes":
        return [(utf8(i, "stream entry id"), {utf8(k, "stream field"): v for k, v in fields.items()}) for i, fields in raw]
    raise ValueError(f"unknown value format {value_format!r}")


def dead_letter_value(client: redis.Redis, read: KeyRead, limit: int) -> tuple[bytes | None, str | None]:
    """What the dead-letter table keeps of a value: at most its first `limit` bytes (a string's own,
    a collection's as JSON) and, when that is not all of it, what the value was. A collection read
    in part is read on to its end for its true size, a part at a time: neither a huge value nor its
    JSON is ever held whole."""
    raw = read.raw
    if raw is None or isinstance(raw, Exception):
        return None, None
    if isinstance(raw, bytes):
        kept = raw[:limit]
        return kept, f"the value is {read.size:,} bytes; its first {len(kept):,} are kept here" if len(kept) < read.size else None
    pieces, length, size, members = [], 0, 0, 0
    for part in read_parts(client, read):
        if isinstance(part.raw, Exception):
            break
        size, members = size + part.size, members + len(part.raw)
        for piece in _json_members(part.raw):
            if length <= limit:
                pieces.append(piece)
                length += len(piece) + 1
    brackets = b"{}" if isinstance(raw, dict) else b"[]"
    whole = brackets[:1] + b",".join(pieces) + brackets[1:]
    if len(whole) <= limit:
        return whole, None
    return whole[:limit], (f"the value is {size:,} bytes in {members:,} members; the first {limit:,} bytes of its JSON"
                           " are kept here")


def _json_members(raw: Any) -> Iterator[bytes]:
    """A collection's members as JSON (a hash as an object, the others as an array; [member, score]
    for a sorted set, [id, {fields}] for a stream), CHUNK_READ_MEMBERS at a time, each piece without
    its brackets."""
    members = iter(raw.items() if isinstance(raw, dict) else raw)
    text = lambda b: b.decode("utf-8", "backslashreplace")  # noqa: E731
    while chunk := list(islice(members, CHUNK_READ_MEMBERS)):
        if isinstance(raw, dict):
            doc: Any = {text(k): text(v) for k, v in chunk}
        else:
            doc = [[text(m[0]), {text(k): text(v) for k, v in m[1].items()} if isinstance(m[1], dict) else m[1]]
                   if isinstance(m, tuple) else text(m) for m in chunk]
        yield orjson.dumps(doc)[1:-1]


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


def keyspace_size(client: redis.Redis) -> int:
    """DBSIZE of the source: of every master, on a Redis Cluster (the estimate progress walks,
    migrator/views/progress.py)."""
    masters = cluster_masters(client)
    if not masters:
        return client.dbsize()
    total = 0
    for node in masters:
        with node_client(client, node) as server:
            total += server.dbsize()
    return total


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
    if isinstance(client, redis.RedisCluster) or not cluster_masters(client):
        return client
    kw = client.connection_pool.connection_kwargs
    return redis.RedisCluster(host=kw.get("host"), port=kw.get("port"), username=kw.get("username"),
                              password=kw.get("password"), decode_responses=False)


REDISJSON_MODULE = "ReJSON"  # the RedisJSON module's name in MODULE LIST


def loaded_modules(client: redis.Redis) -> set[str]:
    """The names of the modules the server has loaded."""
    names = set()
    for module in client.module_list():
        name = module.get(b"name", module.get("name", b""))
        names.add(reply_text(name))
    return names


def redisjson_refusal(client: redis.Redis, patterns: Sequence[Pattern]) -> str | None:
    """Why these patterns cannot be read from this server (some read RedisJSON documents, and its
    module is not loaded: every read would fail), ending with the fix; None when they can."""
    wanted = [p.name for p in patterns if p.redis_type == REDISJSON and p.read]
    if not wanted or REDISJSON_MODULE in loaded_modules(client):
        return None
    return (f"pattern(s) {', '.join(wanted)} read RedisJSON documents, but this Redis server has no RedisJSON module "
            "loaded (MODULE LIST names none); load it (redis-server --loadmodule /path/to/librejson.so, or run Redis "
            "Stack) or remove those patterns from the mapping")
