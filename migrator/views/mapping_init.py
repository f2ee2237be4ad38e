"""`migrator mapping --init`: a starting mapping file from the live keyspace.

One audit pass (audit.audit_keyspace, against a mapping of no patterns) gives the key shapes and
the Redis types their keys hold; one example key of each shape is read to guess the string format
and the columns. The text written is checked by loading it (mapping_file.load_file) before it
replaces anything: the file loads as it is, to be edited by a person.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import redis

from migrator.views.audit import UUID, audit_keyspace
from migrator.core import jsoncodec
from migrator.core.mapping import REDISJSON, Mapping
from migrator.core.mapping_file import ENGINE_TABLE, RESERVED_COLUMNS, load_file, parse_key
from migrator.core.redact import EMAIL, IPV4, IPV6, redact_text
from migrator.core.source import reply_text
from migrator.core.schema import engine_sql

# The file's `type` for what TYPE answers.
FILE_TYPES = {"string": "string", "hash": "hash", "list": "list", "set": "set", "zset": "zset", "stream": "stream",
              REDISJSON: "json"}
# A hash of more fields than this is taken for a collection (counters, an index): one row per field.
WIDE_HASH = 64
MAX_COLUMNS = 50  # of one JSON document or hash read whole
SAMPLE_BYTES = 64 * 1024  # of a string example
SAMPLE_MEMBERS = 100  # of a collection example: its first (a set's random) members, a stream's first entries
INTEGER = re.compile(r"0|-?[1-9][0-9]{0,17}")  # (a leading zero is text: a zip code, "007"; ASCII digits only)
DECIMAL = re.compile(r"-?[0-9]+\.[0-9]+")
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}.*")
DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass
class Guess:
    """What one key shape becomes: a pattern and its table."""

    name: str
    key: str  # the key grammar
    file_type: str
    keys: int
    example: str
    value_format: str = ""
    rows: str = ""
    columns: dict[str, tuple[str, str]] = field(default_factory=dict)  # column -> (source, type)
    key_columns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skip: str = ""  # why it is not migrated


def starting_file(client: redis.Redis, *, scan_count: int = 1000,
                  now: datetime | None = None) -> tuple[str, int, int]:
    """The text of a starting mapping file for the keyspace behind `client`, how many patterns it
    declares, and how many keys it leaves out (of shapes past the audit's first 100); ValueError for
    an empty keyspace."""
    report = audit_keyspace(client, Mapping("init", ()), show_pii=True, scan_count=scan_count, now=now)
    unmapped = report["unmapped"]
    shapes = sorted((s for s in unmapped["shapes"] if s["types"] and s["shape"]),  # (no grammar names the empty key)
                    key=lambda s: (s["shape"].count("*"), s["shape"]))
    if not shapes:
        raise ValueError(f"the keyspace at {redact_text(report['source'])} holds no keys to map; point --redis-url "
                         "at the application's database")
    names: set[str] = set()
    engine = {m[1] for _, text in engine_sql() for m in ENGINE_TABLE.finditer(text)}
    guesses = [_guess(client, shape, names, engine) for shape in shapes]
    head = [
        f"# A starting mapping written by `migrator mapping --init` from an audit of {redact_text(report['source'])}",
        f"# at {report['generated_at']}: {report['total_keys']:,} keys in {len(shapes)} shapes"
        + (f" (and {unmapped['other_shapes_keys']:,} keys of shapes past the first 100, left out)"
           if unmapped["other_shapes_keys"] else "") + ".",
        "# Each [[pattern]] is one shape of key with the Redis type its keys hold; its columns and their types are",
        "# guessed from one example key. Edit names, priorities, tables, types, `required` and `merge`",
        "# (docs/mapping-file.md), then: migrator init-db --mapping FILE; migrator run --local --mapping FILE",
        "",
        "[mapping]",
        f"name = {toml_string(_mapping_name(shapes))}",
        "",
    ]
    body = [line for g in guesses for line in _pattern_text(g)] + [line for g in guesses for line in _table_text(g)]
    return "\n".join(head + body) + "\n", len(guesses), unmapped["other_shapes_keys"]


def write_starting_file(client: redis.Redis, path: Path, *, force: bool) -> tuple[int, int]:
    """Write the starting file at `path` (refused when it exists, unless `force`); its patterns, and
    the keys left out (starting_file). Written beside it first and loaded from there: a file that
    would not load replaces nothing."""
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it, or name another file")
    text, patterns, left_out = starting_file(client)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.toml")
    tmp.write_text(text)
    try:
        load_file(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return patterns, left_out


def _guess(client: redis.Redis, shape: dict[str, Any], names: set[str], engine: set[str]) -> Guess:
    redis_type, keys = next(iter(shape["types"].items()))
    file_type = FILE_TYPES.get(redis_type)
    grammar, fields = _grammar(shape["shape"], shape["examples"])
    name = _unique(_identifier("_".join(s for s in shape["shape"].split(":") if s != "*") or "keys"), names, engine)
    g = Guess(name, grammar, file_type or "string", shape["keys"], redact_text(shape["examples"][0]))
    for kind, n in list(shape["types"].items())[1:]:
        g.notes.append(f"also {n:,} {kind} key(s) of this shape: dead letters (wrong type) unless a pattern of "
                       "their own comes first")
    for f in fields:
        g.columns[f] = (f"key.{f}", "text")
        g.key_columns.append(f)
    if file_type is None:
        g.skip = f"its keys hold {redis_type}, which no mapping file reads"
        return g
    # (the audit shows control characters and bytes that are not UTF-8 escaped: such a name reads nothing back)
    keys = [k for k in (e.encode() for e in shape["examples"]) if reply_text(client.type(k)) == redis_type]
    if keys:
        _columns_of(client, g, redis_type, keys)
    else:
        g.notes.append(f"no example could be read back as a {redis_type} by its name as shown (escaped characters, or "
                       "gone or changed since): check that the key grammar matches these keys, and add their columns")
    if not g.key_columns:  # a single key read whole: its name is its identity
        g.columns = {"redis_key": ("key", "text"), **g.columns}
        g.key_columns.append("redis_key")
    return g


def _grammar(shape: str, examples: list[str]) -> tuple[str, list[str]]:
    """A key grammar for a shape: each `*` a field named after the text before it, one segment
    each, or any text when an example holds a colon there (an IPv6 address, say)."""
    literals = shape.split("*")
    fields: list[str] = []
    for before in literals[:-1]:
        fields.append(_unique(_identifier(before.rstrip(":-_").rsplit(":", 1)[-1] or "part"), set(fields), set()))
    escaped = [text.replace("{", "{{").replace("}", "}}") for text in literals]

    def spelled(regexes: list[str]) -> str:
        return escaped[0] + "".join(f"{{{f}{r}}}{text}" for f, r, text in zip(fields, regexes, escaped[1:]))

    for wide in (False, True):
        grammar = spelled([":.+" if wide else ""] * len(fields))
        regex = re.compile(parse_key(grammar)[0], re.DOTALL)
        matches = [regex.fullmatch(example) for example in examples]
        if all(matches):
            break
    else:
        return grammar, fields
    # a field every example spells in digits takes digits only: a job queue's other keys beside its
    # numbered jobs (`bull:q:active` beside `bull:q:17`) are no job's
    digits = [all(m.group(i + 1).isdigit() for m in matches) and not wide for i in range(len(fields))]
    if any(digits):
        grammar = spelled([":\\d+" if d else (":.+" if wide else "") for d in digits])
    return grammar, fields


def _columns_of(client: redis.Redis, g: Guess, redis_type: str, keys: list[bytes]) -> None:
    """The columns the example keys suggest, typed by what they all hold (a hash's fields, a document's
    keys, a collection's first members, a stream's first entries; a RedisJSON document's from the
    first), and their rows (one per key, or per member)."""
    key = keys[0]
    if redis_type == "string":
        _string_columns(g, [client.getrange(k, 0, SAMPLE_BYTES - 1) for k in keys])
    elif redis_type == REDISJSON:
        _document_columns(g, [_loads(client.execute_command("JSON.GET", key))])
    elif redis_type == "hash":
        fields: dict[bytes, list[bytes]] = {}  # each field's values, in the examples that hold it
        if all(client.hlen(k) <= WIDE_HASH for k in keys):
            for k in keys:
                for name, value in client.hgetall(k).items():
                    fields.setdefault(name, []).append(value)
        fields = fields if len(fields) <= WIDE_HASH else {}
        names = [name.decode("utf-8", "replace") for name in fields]
        every = [value for values in fields.values() for value in values]
        if not fields or any(_data_like(name) for name in names):
            # (many fields, or fields named by data, such as ids or emails: a collection, a row per field)
            g.rows = "member"
            _member_columns(g, {"field": ("field", "text"), "value": ("value", _type_of_raw(every))},
                            "field")
            return
        g.rows = "key"
        for name, values in zip(names, fields.values()):
            if not name or "\ufffd" in name:
                g.notes.append(f"a field named {name!r} cannot be a field.<name>: left in no column")
                continue
            g.columns[_unique(_identifier(name), set(g.columns), set())] = (f"field.{name}", _type_of_raw(values))
        if _type_of_raw(every) != "bytea":  # every field, whole: what the columns above miss is kept
            g.columns[_unique("fields", set(g.columns), set())] = ("value", "jsonb")
        else:  # (jsonb holds no bytes: nothing keeps a field the examples did not show)
            g.notes.append("binary values: no whole-hash column keeps the fields the examples do not show; a field"
                           " of other keys not named above is not migrated (name every field, or map the hash a row"
                           " per field: rows = \"member\")")
    elif redis_type == "list":
        members = [m for k in keys for m in client.lrange(k, 0, SAMPLE_MEMBERS - 1)]
        _member_columns(g, {"position": ("index", "integer"), "value": ("value", _text_or_bytes(members))}, "position")
    elif redis_type == "set":
        members = [m for k in keys for m in client.srandmember(k, SAMPLE_MEMBERS)]
        _member_columns(g, {"member": ("member", _text_or_bytes(members))}, "member")
    elif redis_type == "zset":
        members = [m for k in keys for m in client.zrange(k, 0, SAMPLE_MEMBERS - 1)]
        _member_columns(g, {"member": ("member", _text_or_bytes(members)), "score": ("score", "double precision")},
                        "member")
    elif redis_type == "stream":
        _member_columns(g, {"entry_id": ("id", "text"), "occurred_at": ("id.time", "timestamptz")}, "entry_id")
        values: dict[bytes, list[bytes]] = {}  # each field's values, in the first entries of the examples
        for k in keys:
            for _, entry in client.xrange(k, count=SAMPLE_MEMBERS):
                for name, value in entry.items():
                    values.setdefault(name, []).append(value)
        for name, seen in list(values.items())[:MAX_COLUMNS]:
            text = name.decode("utf-8", "replace")
            g.columns[_unique(_identifier(text), set(g.columns), set())] = (f"field.{text}", _text_or_bytes(seen))
        groups = {group["name"].decode("utf-8", "replace") for k in keys for group in client.xinfo_groups(k)}
        if groups:
            g.notes.append(f"its consumer group(s) {', '.join(sorted(groups)[:5])} and their pending entries are not"
                           " migrated, only the entries: a consumer moved to PostgreSQL keeps its own place")


def _data_like(name: str) -> bool:
    """A hash field named by data rather than by a name: one that starts with a digit (a number, a
    date), an id (a uuid, a long token with a digit), an email, an address."""
    return bool(DIGIT_FIRST.match(name) or TOKEN.fullmatch(name) or UUID.search(name) or EMAIL.search(name)
                or IPV4.search(name) or IPV6.search(name))


DIGIT_FIRST = re.compile(r"[-+]?\d")
TOKEN = re.compile(r"(?=.*\d)[\w.-]{16,}")


def _text_or_bytes(members: list[bytes]) -> str:
    """A member's column: bytea when an example is not UTF-8 (a pickle, as job queues keep), else text."""
    return "bytea" if _type_of_raw(members) == "bytea" else "text"


def _type_of_raw(values: Any) -> str:
    """The column type of some example values: bytea when one is not UTF-8, else as their text says."""
    try:
        texts = [v.decode("utf-8") for v in values]
    except UnicodeDecodeError:
        return "bytea"
    return _widest({_type_of_text(t) for t in texts})


def _widest(kinds: set[str], mixed: str = "text") -> str:
    """One column type for example values of these types, whichever example a SCAN shows first: the
    one type, numeric for numbers of more than one (it holds each exactly), else `mixed`."""
    if len(kinds) <= 1:
        return next(iter(kinds), "text")
    return "numeric" if kinds <= NUMBERS else mixed


NUMBERS = frozenset({"bigint", "numeric", "double precision"})


def _member_columns(g: Guess, columns: dict[str, tuple[str, str]], identity: str) -> None:
    for column, source in columns.items():
        name = _unique(column, set(g.columns), set())
        g.columns[name] = source
        if column == identity:
            g.key_columns.append(name)


def _string_columns(g: Guess, raws: list[bytes]) -> None:
    if _type_of_raw(raws) == "bytea":  # binary data (a pickle, a compressed blob): kept as it is
        g.value_format = "bytes"
        g.columns[_unique("value", set(g.columns), set())] = ("value", "bytea")
        return
    documents = [_loads(raw) for raw in raws]
    if all(isinstance(d, dict) for d in documents):
        g.value_format = "json"
        _document_columns(g, documents)
        g.columns[_unique("document", set(g.columns), set())] = ("value", "jsonb")  # whole: what the columns miss is kept
    elif isinstance(documents[0], (dict, list)):
        g.value_format = "json"
        _document_columns(g, documents[:1])
    elif all(INTEGER.fullmatch(raw.decode("utf-8", "replace")) for raw in raws):  # (every example: "066172" is a code)
        g.value_format = "int"
        g.columns[_unique("value", set(g.columns), set())] = ("value", "bigint")
    else:
        g.value_format = "text"
        kinds = {_type_of_text(raw.decode("utf-8", "replace")) for raw in raws}
        g.columns[_unique("value", set(g.columns), set())] = ("value", _widest(kinds))


def _document_columns(g: Guess, documents: list[Any]) -> None:
    """The top-level keys of JSON objects as columns (json.<key>), each typed by all of its examples'
    values; anything else as one jsonb column."""
    if not all(isinstance(d, dict) for d in documents):
        g.columns[_unique("value", set(g.columns), set())] = ("value", "jsonb")
        return
    values: dict[str, list[Any]] = {}  # each key's values, in the examples that hold it
    for document in documents:
        for name, value in document.items():
            values.setdefault(name, []).append(value)
    for name, seen in list(values.items())[:MAX_COLUMNS]:
        if "." in name or not name:
            g.notes.append(f"key {name!r} of its documents cannot be a json.<path>: left in no column")
            continue
        # (a JSON null says nothing of the type; text takes any string, jsonb any JSON value)
        known = [v for v in seen if v is not None]
        kind = _widest({_type_of(v) for v in known}, mixed="text" if all(isinstance(v, str) for v in known) else "jsonb")
        g.columns[_unique(_identifier(name), set(g.columns), set())] = (f"json.{name}", kind)
    if len(values) > MAX_COLUMNS:
        g.notes.append(f"its examples have {len(values)} keys: the first {MAX_COLUMNS} are columns")


def _loads(raw: Any) -> Any:
    try:
        return jsoncodec.loads(raw) if raw is not None else None
    except jsoncodec.JSONDecodeError:
        return None


def _type_of(value: Any) -> str:
    """The column type for a JSON value."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):  # (an integer past bigint's range, read whole: numeric keeps it)
        return "bigint" if -2**63 <= value < 2**63 else "numeric"
    if isinstance(value, float):
        return "double precision"
    if isinstance(value, Decimal):  # (more digits than a double holds, read whole: numeric keeps them)
        return "numeric"
    if isinstance(value, (dict, list)):
        return "jsonb"
    return _type_of_text(value) if isinstance(value, str) else "text"


def _type_of_text(text: str) -> str:
    if INTEGER.fullmatch(text):
        return "bigint"
    if DECIMAL.fullmatch(text):
        return "numeric"
    if TIMESTAMP.fullmatch(text):
        return "timestamptz"
    return "date" if DAY.fullmatch(text) else "text"


def _identifier(text: str) -> str:
    """A column or table name from any text: lower case, letters, digits and _ (RESERVED ones suffixed)."""
    name = re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")[:60] or "part"
    name = f"k{name}" if name[0].isdigit() else name  # (a pattern's name starts with a letter or digit, SQL's with a letter)
    return f"{name}_" if name in RESERVED_COLUMNS else name


def _unique(name: str, taken: set[str], engine: set[str]) -> str:
    """`name`, or `name_2`, `name_3`, ... : none of `taken` nor of the engine's tables (added to `taken`)."""
    candidate, n = name, 1
    while candidate in taken or candidate in engine:
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate)
    return candidate


def _mapping_name(shapes: list[dict[str, Any]]) -> str:
    heads: Counter[str] = Counter()
    for s in shapes:
        heads[s["shape"].split(":", 1)[0]] += s["keys"]
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", heads.most_common(1)[0][0]).strip("_-")
    return name if name[:1].isalnum() else "keyspace"


def toml_string(text: str) -> str:
    """`text` as a TOML basic string: JSON's escapes are TOML's, but for DEL, which TOML escapes too."""
    return orjson.dumps(text).decode().replace("\x7f", "\\u007F")


def _pattern_text(g: Guess) -> list[str]:
    lines = [f"# {g.keys:,} key(s) like {toml_comment(g.example)}", *(f"# NOTE: {toml_comment(n)}" for n in g.notes),
             "[[pattern]]", f"name = {toml_string(g.name)}", f"key = {toml_string(g.key)}",
             f"type = {toml_string(g.file_type)}"]
    if g.value_format:
        lines.append(f"format = {toml_string(g.value_format)}")
    lines.append('priority = "medium"')
    if g.skip:
        return [*lines, f"skip = {toml_string(g.skip)}", ""]
    lines.append(f"table = {toml_string(g.name)}")
    if g.rows:
        lines.append(f"rows = {toml_string(g.rows)}")
    lines += ["", "[pattern.columns]"]
    lines += [f"{column} = {toml_string(source)}" for column, (source, _) in g.columns.items()]
    return [*lines, ""]


def _table_text(g: Guess) -> list[str]:
    if g.skip:
        return []
    lines = [f"[tables.{g.name}]", f"key = [{', '.join(map(toml_string, g.key_columns))}]", "",
             f"[tables.{g.name}.columns]"]
    lines += [f"{column} = {toml_string(kind)}" for column, (_, kind) in g.columns.items()]
    return [*lines, ""]


def toml_comment(text: str) -> str:
    """Text fit for a comment line: no line break (printable() escaped them), no other control character."""
    return re.sub(r"[\x00-\x1f\x7f]", "?", text)
