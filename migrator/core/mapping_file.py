"""A mapping as a file (docs/mapping-file.md): a TOML file declares the patterns and tables, and
`load_file` builds the same `Mapping` a Python mapping declares.

Every mistake in the file is found before anything touches Redis or PostgreSQL and reported as
`FILE:LINE: what is wrong — how to fix it`, all of them at once. The transforms it builds are
closures over frozen declarations (`RowShape`), whose repr is the whole declaration: the mapping's
digest (registry.digest) hashes it, so a changed file is another mapping.
"""
from __future__ import annotations

import difflib
import importlib
import math
import re
import string
import tomllib
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone, tzinfo
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson

from migrator.core import jsoncodec
from migrator.core.hooks import Hooks
from migrator.core.mapping import (REDISJSON, UNMAPPED, BadRecord, KeyTemplate, Mapping, Pattern, Priority, Row, SourceRecord,
                                   Transform)
from migrator.core.merge import ON_DELETE, TableRule
from migrator.core.registry import MappingError
from migrator.core.schema import PROVENANCE, engine_sql
from migrator.core.source import utf8
from migrator.core.values import integral, parse_date, parse_dt, stable_id

# The file's `type` -> what TYPE answers for such a key.
REDIS_TYPES = {"string": "string", "hash": "hash", "list": "list", "set": "set", "zset": "zset", "stream": "stream",
               "json": REDISJSON}
STRING_FORMATS = ("text", "json", "int", "bytes")
COLUMN_TYPES = ("text", "integer", "bigint", "numeric", "double precision", "boolean", "timestamptz", "date", "jsonb",
                "bytea")
ORDERED_TYPES = ("integer", "bigint", "numeric", "double precision", "timestamptz", "date")  # greatest, version

TOP_KEYS = ("mapping", "pattern", "tables")
MAPPING_KEYS = ("name", "demo")
PATTERN_KEYS = ("name", "key", "type", "format", "priority", "description", "table", "skip", "rows", "ttl",
                "max_dead_ratio", "max_dead_keys", "columns")
TABLE_KEYS = ("key", "required", "columns", "merge", "on_delete")
MERGE_KEYS = ("greatest", "coalesce", "version")

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # a PostgreSQL name that needs no quoting, lower case
FIELD = re.compile(r"[A-Za-z_]\w*")
ENGINE_TABLE = re.compile(r"CREATE TABLE IF NOT EXISTS (\w+)")
# The columns a table gets without declaring them: its id and the engine's provenance.
RESERVED_COLUMNS = ("id", *PROVENANCE)

# Where a column's value comes from (its origin) -> how the file spells it; then the origins each type
# has, besides key and key.<field>, with one row per key (PER_KEY) or per member (PER_MEMBER).
SPELLING = {"key": "key", "key_field": "key.<field>", "value": "value", "json": "json.<path>", "field": "field.<name>",
            "field_name": "field", "member": "member", "score": "score", "index": "index", "id": "id",
            "id_time": "id.time"}
PER_KEY = {"string": ("value",), "json": ("value", "json"), "hash": ("field", "value"), "list": ("value",),
           "set": ("value",), "zset": ("value",), "stream": ("value",)}
PER_MEMBER = {"hash": ("field_name", "value", "json"), "list": ("index", "value", "json"), "set": ("member", "json"),
              "zset": ("member", "score", "json"), "stream": ("id", "id_time", "field", "value")}


class MappingFileError(MappingError):
    """The mistakes of a mapping file, one `FILE:LINE: what — fix` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"the mapping file has {len(problems)} mistake(s); nothing was run:\n" + "\n".join(problems))
        self.problems = problems


# --- the declaration a file makes (what transforms close over) -----------------------------------


@dataclass(frozen=True)
class Column:
    name: str
    source: str  # as the file spells it, for reasons
    origin: str  # a key of SPELLING
    path: tuple[str, ...]  # the key field's or hash/stream field's name, or the JSON path
    convert: str  # the key of CONVERTERS: its type (COLUMN_TYPES), or "jsonb text" for text read as JSON text
    required: bool


@dataclass(frozen=True)
class RowShape:
    """The rows one pattern gives: one per key, or one per member of its collection or stream."""

    table: str
    redis_type: str  # the file's spelling
    per_member: bool
    columns: tuple[Column, ...]
    key: tuple[str, ...]  # the table's identity columns, in its order


def rows_transform(shape: RowShape) -> Transform:
    """The transform of a pattern: its record's rows as `shape` says."""
    def rows(rec: SourceRecord) -> list[Row]:
        return [_row(shape, rec, item) for item in _items(shape.redis_type, shape.per_member, rec.value)]
    return rows


def _items(redis_type: str, per_member: bool, value: Any) -> Iterator[dict[str, Any]]:
    """What each row is made from: the value (one row per key), or each member of it."""
    if not per_member:
        # a list read whole is its elements; each decoded with its index, for a list read in parts
        yield {"value": [text for _, text in value] if redis_type == "list" else value}
    elif redis_type == "hash":
        for name, text in value.items():
            yield {"field_name": name, "value": text, "text": text}
    elif redis_type == "list":
        for index, text in value:
            yield {"index": index, "value": text, "text": text}
    elif redis_type == "set":
        for member in value:
            yield {"member": member, "text": member}
    elif redis_type == "zset":
        for member, score in value:
            yield {"member": member, "score": score, "text": member}
    else:  # a stream's entries
        for entry_id, fields in value:
            yield {"id": entry_id, "value": fields, "fields": fields}


def _row(shape: RowShape, rec: SourceRecord, item: dict[str, Any]) -> Row:
    values: dict[str, Any] = {}
    for column in shape.columns:
        try:
            taken = _take(column, rec, item)
            if column.convert != "bytea":  # (a string of format bytes, a hash's values: bytes until a column takes them)
                taken = _decoded(taken)
            found = CONVERTERS[column.convert](taken, rec.source_tz)
        except BadRecord as exc:
            raise BadRecord(f"column {column.name} ({column.source}): {exc}") from None
        if found is None and column.required:
            raise BadRecord(f"column {column.name} ({column.source}): missing, and the table requires it")
        values[column.name] = found
    identity = [_identity_text(values[name]) for name in shape.key]
    return Row(shape.table, {"id": stable_id(shape.table, *identity), **values})


def _take(column: Column, rec: SourceRecord, item: dict[str, Any]) -> Any:
    origin, path = column.origin, column.path
    if origin == "key":
        return rec.key
    if origin == "key_field":
        return rec.fields[path[0]]
    if origin == "json":
        return _walk(_document(item), path)
    if origin == "field":  # a hash read whole, or a stream entry
        return (item["fields"] if "fields" in item else item["value"]).get(path[0])
    if origin == "id_time":  # an entry id is <milliseconds since the epoch>-<sequence>
        return EPOCH + timedelta(milliseconds=int(item["id"].partition("-")[0]))
    return item[origin]


EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _decoded(value: Any) -> Any:
    """Bytes as the text they are (a whole hash or collection as text values); refused when not UTF-8."""
    if isinstance(value, bytes):
        try:
            return utf8(value)
        except BadRecord as exc:
            raise BadRecord(f"{exc}: a bytea column takes it as it is") from None
    if isinstance(value, dict) and any(isinstance(v, bytes) for v in value.values()):
        return {k: _decoded(v) for k, v in value.items()}
    # (a list's elements, a set's members, a zset's (member, score) pairs, a stream's entries)
    if isinstance(value, (list, tuple)) and any(isinstance(v, (bytes, tuple, list, dict)) for v in value):
        return [_decoded(v) for v in value]
    return value


def _document(item: dict[str, Any]) -> Any:
    """The JSON a path is read in: the value itself (a JSON string or document), or a member's text."""
    if "text" not in item:
        return item["value"]
    if "document" not in item:
        try:
            item["document"] = jsoncodec.loads(item["text"])
        except jsoncodec.JSONDecodeError as exc:
            raise BadRecord(f"not JSON ({exc})") from None
    return item["document"]


def _walk(document: Any, path: tuple[str, ...]) -> Any:
    """The value at `path` (None when it is not there): names pick an object's keys, numbers an array's items."""
    for step in path:
        if isinstance(document, dict):
            document = document.get(step)
        elif isinstance(document, list) and step.isdigit() and int(step) < len(document):
            document = document[int(step)]
        else:
            return None
    return document


def _identity_text(value: Any) -> str:
    """A key column's value as the text its row id is made of (the same value, the same text)."""
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, str):
        return value
    return jsoncodec.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


# --- what each column type takes (docs/mapping-file.md, "Types") ---------------------------------
# Empty text is no value (NULL) for every type but text: an app writes "" for a field it has not.

NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")
INT_RANGES = {"integer": 2**31, "bigint": 2**63}
TRUE, FALSE = frozenset({"true", "t", "yes", "1"}), frozenset({"false", "f", "no", "0"})


def _as_text(value: Any, tz: tzinfo) -> str | None:
    if value is None or isinstance(value, str):
        if value is not None and "\x00" in value:
            raise BadRecord("holds a NUL character, which PostgreSQL text cannot")
        return value
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return jsoncodec.dumps(value).decode()


# An integer written as text the one way that reads back the same: ASCII digits, no sign but a minus, no
# leading zero or space.
PLAIN_INTEGER = re.compile(r"0|-?[1-9][0-9]*")


def _as_int(kind: str) -> Callable[[Any, tzinfo], int | None]:
    limit = INT_RANGES[kind]

    def convert(value: Any, tz: tzinfo) -> int | None:
        if value is None or value == "":
            return None
        if isinstance(value, bool):
            raise BadRecord(f"expected an integer, got {value!r}")
        if integral(value):
            value = int(value)
        elif isinstance(value, str) and PLAIN_INTEGER.fullmatch(value):  # ("007", " 4", "+1" would change)
            value = int(value)
        if not isinstance(value, int):
            raise BadRecord(f"expected an integer, got {_shown(value)}")
        if not -limit <= value < limit:
            raise BadRecord(f"{value} is out of range for {kind}")
        return value
    return convert


def _as_numeric(value: Any, tz: tzinfo) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal, str)):
        raise BadRecord(f"expected a number, got {_shown(value)}")
    text = value.strip() if isinstance(value, str) else str(value) if isinstance(value, Decimal) else repr(value)
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise BadRecord(f"expected a number, got {_shown(value)}") from None
    if not number.is_finite():
        raise BadRecord(f"expected a finite number, got {_shown(value)}")
    return text  # as written: numeric keeps its scale ("19.90")


def _as_double(value: Any, tz: tzinfo) -> float | str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal, str)) or (
            isinstance(value, str) and not NUMBER.fullmatch(value)):
        raise BadRecord(f"expected a number, got {_shown(value)}")
    number = float(value)
    if isinstance(value, float) and math.isinf(value):  # a sorted set's -inf and +inf scores, as PostgreSQL
        return "Infinity" if number > 0 else "-Infinity"  # spells them (JSON has no infinity: null)
    if not math.isfinite(number):  # text past a double's range ("1e400")
        raise BadRecord(f"expected a finite number, got {_shown(value)}")
    return number


def _as_bool(value: Any, tz: tzinfo) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE | FALSE:
        return value.strip().lower() in TRUE
    raise BadRecord(f"expected true or false, got {_shown(value)}")


def _as_timestamp(value: Any, tz: tzinfo) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and NUMBER.fullmatch(value) or isinstance(value, Decimal):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRecord(f"expected a time, got {_shown(value)}")
    try:
        return parse_dt(value, tz, field="time")
    except (OverflowError, ValueError, OSError):  # seconds beyond the calendar
        raise BadRecord(f"expected a time, got {_shown(value)}") from None


def _as_date(value: Any, tz: tzinfo) -> date | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRecord(f"expected a YYYY-MM-DD date, got {_shown(value)}")
    return parse_date(value, field="date")


def _as_jsonb(value: Any, tz: tzinfo) -> Any:
    return value


def _jsonb_from_text(value: Any, tz: tzinfo) -> Any:
    if value is None or value == "":
        return None
    try:
        return jsoncodec.loads(value)
    except jsoncodec.JSONDecodeError as exc:
        raise BadRecord(f"text that is not JSON ({exc})") from None


def _as_bytea(value: Any, tz: tzinfo) -> str | None:
    """Bytes as they are, text as its UTF-8 bytes: PostgreSQL's hex input (the row travels as JSON text)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes):
        raise BadRecord(f"expected bytes or text, got {_shown(value)}")
    return "\\x" + value.hex()


def _shown(value: Any) -> str:
    # (digits masked: a value refused is logged and kept in reports; an account or card number is PII)
    return DIGIT.sub("#", repr(value)[:40])


DIGIT = re.compile(r"\d")


CONVERTERS: dict[str, Callable[[Any, tzinfo], Any]] = {
    "text": _as_text, "integer": _as_int("integer"), "bigint": _as_int("bigint"), "numeric": _as_numeric,
    "double precision": _as_double, "boolean": _as_bool, "timestamptz": _as_timestamp, "date": _as_date,
    "jsonb": _as_jsonb, "jsonb text": _jsonb_from_text, "bytea": _as_bytea,
}
# Sources that give text (a key, a field's or member's bytes): what a jsonb column reads as JSON text.
# The others give JSON values already (a path into a document, a document, a whole collection).
TEXTUAL = frozenset({"key", "key_field", "field", "field_name", "member", "id"})


# --- the key grammar -------------------------------------------------------------------------------


def parse_key(text: str) -> tuple[str, str, tuple[str, ...]]:
    """(regular expression, glob, field names) of a key grammar (`shop:product:{sku}`); ValueError
    saying what is wrong and how to fix it."""
    return _parsed_key(text)[:3]


def _parsed_key(text: str) -> tuple[str, str, tuple[str, ...], str]:
    """parse_key's, and the key as a template of its fields (`{name:REGEX}` written `{name}`)."""
    grammar, glob, names, template = [], [], [], []
    i = 0
    while i < len(text):
        ch = text[i]
        if text.startswith(("{{", "}}"), i):
            grammar.append(re.escape(ch))
            glob.append(ch)
            template.append(ch * 2)
            i += 2
        elif ch == "}":
            raise ValueError(f"a '}}' at character {i + 1} closes nothing — write '}}}}' for a literal brace")
        elif ch == "*":
            raise ValueError("'*' is no wildcard in a key grammar — name the part that varies: {name}, or "
                             "{name:REGEX}")
        elif ch == "{":
            end = _closing(text, i)
            name, colon, regex = text[i + 1:end].partition(":")
            grammar.append(f"(?P<{_field_name(name, names)}>{_field_regex(name, regex) if colon else '[^:]+'})")
            glob.append("*")
            names.append(name)
            template.append(f"{{{name}}}")
            i = end + 1
        else:
            grammar.append(re.escape(ch))
            glob.append(f"[{ch}]" if ch in "?[" else ch)
            template.append(ch)
            i += 1
    if not text:
        raise ValueError("the key grammar is empty — write the keys' text, e.g. \"app:item:{id}\"")
    return "".join(grammar), "".join(glob), tuple(names), "".join(template)


def _closing(text: str, start: int) -> int:
    """Where the `{` at `start` closes, braces of a regex (`\\d{4}`) counted, escaped ones not."""
    depth, i = 0, start
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
        i += 1
    raise ValueError(f"the '{{' at character {start + 1} is never closed — close it with '}}', or write '{{{{' for "
                     "a literal brace")


def _field_name(name: str, seen: list[str]) -> str:
    if not FIELD.fullmatch(name):
        raise ValueError(f"{{{name}}}: a field's name is an identifier (letters, digits, _) — e.g. {{id}} or "
                         "{id:REGEX}")
    if name in seen:
        raise ValueError(f"field {name} is named twice — give each part its own name")
    return name


def _field_regex(name: str, regex: str) -> str:
    try:
        compiled = re.compile(regex)
    except re.error as exc:
        raise ValueError(f"field {name}: {regex!r} is no regular expression ({exc}) — fix it (Python syntax)") from None
    if compiled.groupindex:
        raise ValueError(f"field {name}: {regex!r} names groups of its own — use (?:...) inside a field")
    return regex


# --- where a mistake is in the file ------------------------------------------------------------------

HEADER = re.compile(r"\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
ASSIGNMENT = re.compile(r"\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*=")
KEY_PART = re.compile(r"\"([^\"]*)\"|'([^']*)'|([A-Za-z0-9_-]+)")


def _key_parts(text: str) -> tuple[str, ...]:
    return tuple(m[1] if m[1] is not None else m[2] if m[2] is not None else m[3] for m in KEY_PART.finditer(text))


class Lines:
    """The line of each table header and key assignment of a TOML text, by path: ("pattern", 2,
    "columns", "sku") is the third [[pattern]]'s columns' sku. A key written inside an inline table
    is found at the line of the key that holds the table."""

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple, int] = {}
        section: tuple = ()
        counts: dict[tuple, int] = {}
        for number, line in enumerate(text.split("\n"), 1):  # (as TOML counts lines: by \\n alone)
            header = HEADER.match(line)
            if header:
                parts = _key_parts(header[2])
                if header[1] == "[[":
                    counts[parts] = counts.get(parts, -1) + 1
                    section = (*parts, counts[parts])
                    self.lines.setdefault(parts, number)  # the array itself: at its first element
                else:  # a sub-table of the latest element of an array of tables ([pattern.columns])
                    head = next((n for n in range(len(parts), 0, -1) if parts[:n] in counts), 0)
                    section = (*parts[:head], counts[parts[:head]], *parts[head:]) if head else parts
                self.lines.setdefault(section, number)
                continue
            assignment = ASSIGNMENT.match(line)
            if assignment:
                self.lines.setdefault((*section, *_key_parts(assignment[1])), number)

    def of(self, *path: Any) -> int:
        """The line of `path`, else of the nearest enclosing one found, else 1."""
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return 1


# --- reading and checking a file ---------------------------------------------------------------------


class _Problems:
    def __init__(self, path: Path, lines: Lines) -> None:
        self.path, self.lines = path, lines
        self.found: list[tuple[int, str]] = []

    def add(self, where: tuple, what: str, fix: str) -> None:
        self.found.append((self.lines.of(*where), f"{what} — {fix}"))

    def lines_said(self) -> list[str]:
        """Every problem as `FILE:LINE: what — fix`, in the file's order."""
        return [f"{self.path}:{line}: {said}" for line, said in sorted(self.found, key=lambda found: found[0])]

    def unknown_keys(self, where: tuple, given: dict[str, Any], known: tuple[str, ...], what: str) -> None:
        for key in given:
            if key not in known:
                near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                self.add((*where, key), f"{what}: unknown key {key!r}",
                         f"did you mean {near[0]!r}?" if near else f"the keys are: {', '.join(known)}")

    def typed(self, where: tuple, given: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str,
              example: str) -> Any:
        """given[key] if it is of `kind` (None when absent); a problem, and None, otherwise."""
        value = given.get(key)
        if value is None:
            return None
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            self.add((*where, key), f"{what}: {key} is {_toml_kind(value)}", f"write e.g. {key} = {example}")
            return None
        return value

    def names(self, where: tuple, given: dict[str, Any], key: str, what: str) -> tuple[str, ...]:
        """given[key] as a list of strings (() when absent)."""
        value = given.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.add((*where, key), f"{what}: {key} is {_toml_kind(value)}", f'write e.g. {key} = ["a", "b"]')
            return ()
        return tuple(value)


def _toml_kind(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", Decimal: "a number", str: "a string", list: "an array",
             dict: "a table"}
    return next((name for kind, name in kinds.items() if isinstance(value, kind)), type(value).__name__)


@dataclass
class _Table:
    name: str
    key: tuple[str, ...]
    required: tuple[str, ...]
    columns: dict[str, str]
    rule: TableRule


@dataclass
class _Pattern:
    index: int
    name: str
    grammar: str
    glob: str
    template: str  # the key with its fields in braces (KeyTemplate's spelling)
    fields: tuple[str, ...]
    redis_type: str  # the file's spelling
    value_format: str
    priority: Priority
    description: str
    table: str | None
    skip: str | None
    per_member: bool
    ttl: str
    max_dead_ratio: float | None
    max_dead_keys: int | None
    columns: dict[str, tuple[str, str, tuple[str, ...]]]  # column -> (source, origin, path)
    named: tuple[str, ...]  # every column it names, its source a mistake or not


def load_file(path: str | Path) -> Mapping:
    """The mapping a TOML file declares; MappingFileError listing every mistake, with its line and fix."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise MappingError(f"{path}: cannot read the mapping file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise MappingFileError([f"{path}:{line}: the file is not UTF-8 (byte 0x{exc.object[exc.start]:02x}) — save it "
                                "as UTF-8"]) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        where = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        what = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", str(exc))
        line = where[1] if where else text.count("\n") + 1
        column = f" column {where[2]}" if where else " the end"
        raise MappingFileError([f"{path}:{line}: not valid TOML: {what} — fix the syntax at{column}"]) from None
    problems = _Problems(path, Lines(text))
    mapping = _declared(doc, problems)
    if mapping is None:
        raise MappingFileError(problems.lines_said())
    return mapping


def _declared(doc: dict[str, Any], problems: _Problems) -> Mapping | None:
    problems.unknown_keys((), doc, TOP_KEYS, "the file")
    head = doc.get("mapping")
    if not isinstance(head, dict):
        problems.add(("mapping",), "the file has no [mapping] table", 'add [mapping] with name = "your_app"')
        head = {}
    problems.unknown_keys(("mapping",), head, MAPPING_KEYS, "[mapping]")
    name = problems.typed(("mapping",), head, "name", str, "[mapping]", '"shop"')
    if name is not None and not NAME.fullmatch(name):
        problems.add(("mapping", "name"), f"[mapping]: name {name!r} is not a plain name",
                     "use letters, digits, _ and -")
    if "mapping" in doc and head.get("name") is None:
        problems.add(("mapping",), "[mapping] has no name", 'add name = "your_app" (runs and backups carry it)')
    seeder = _seeder(problems, problems.typed(("mapping",), head, "demo", str, "[mapping]",
                                               '"package.module:function"'))
    tables = _tables(doc.get("tables", {}), problems)
    patterns = _patterns(doc.get("pattern", []), tables, problems)
    _cross_check(patterns, tables, problems)
    if problems.found:
        return None
    built = tuple(_pattern(p, tables) for p in patterns)
    return Mapping(name, built, rules=tuple(t.rule for t in tables.values()), schema=(table_ddl(tables.values()),),
                   hooks=Hooks(seed_demo=seeder))


def _seeder(problems: _Problems, spec: str | None) -> Callable[..., dict[str, int]] | None:
    if spec is None:
        return None
    module, colon, attribute = spec.partition(":")
    try:
        seeder = getattr(importlib.import_module(module), attribute) if colon else None
    except ImportError as exc:
        problems.add(("mapping", "demo"), f"[mapping]: demo {spec!r} cannot be imported ({exc})",
                     "name an installed module's function as package.module:function")
        return None
    except AttributeError:
        seeder = None
    if not callable(seeder):
        problems.add(("mapping", "demo"), f"[mapping]: demo {spec!r} names no function",
                     "name it as package.module:function")
        return None
    return seeder


def _tables(given: Any, problems: _Problems) -> dict[str, _Table]:
    if not isinstance(given, dict):
        problems.add(("tables",), f"tables is {_toml_kind(given)}", "declare each as [tables.NAME]")
        return {}
    engine = {m[1] for _, text in engine_sql() for m in ENGINE_TABLE.finditer(text)}
    tables = {}
    for name, body in given.items():
        where, what = ("tables", name), f"table {name!r}"
        if not isinstance(body, dict):
            problems.add(where, f"{what} is {_toml_kind(body)}", f"declare it as [tables.{name}] with key and columns")
            continue
        if not IDENTIFIER.fullmatch(name) or name in engine:
            problems.add(where, f"{what}: not a name a table of yours can have" + (" (the engine's own)" if name in engine
                                                                                  else ""),
                         "use lower-case letters, digits and _ (up to 63), not a migrator table's name")
        problems.unknown_keys(where, body, TABLE_KEYS, what)
        columns = _table_columns(where, what, body.get("columns"), problems)
        key = problems.names(where, body, "key", what)
        required = problems.names(where, body, "required", what)
        if not key:
            problems.add(where, f"{what} names no key columns",
                         'add key = ["..."]: the columns that identify a row (its id is made from them)')
        for column in dict.fromkeys([*key, *required]):
            if columns and column not in columns:
                problems.add((*where, "key" if column in key else "required"), f"{what}: {column!r} is not one of its "
                             "columns", f"declare it under [tables.{name}.columns], or name one of "
                             f"{', '.join(columns)}")
        rule = _merge(where, what, body.get("merge", {}), columns, key, problems)
        on_delete = problems.typed(where, body, "on_delete", str, what, '"delete"') or "delete"
        if on_delete not in ON_DELETE:
            problems.add((*where, "on_delete"), f"{what}: on_delete is {on_delete!r}",
                         'write on_delete = "delete" (follow deletes its rows when their key goes) or "mark" (keeps '
                         'them, deleted_at set)')
        elif on_delete == "mark" and rule.deleted_at in columns:
            problems.add((*where, "columns", rule.deleted_at), f"{what}: column {rule.deleted_at!r} is the engine's own",
                         "drop it: a table with on_delete = \"mark\" gets it, set when follow marks a row")
        else:
            rule = replace(rule, on_delete=on_delete)
        tables[name] = _Table(name, key, tuple(dict.fromkeys([*key, *required])), columns, rule)
    return tables


def _table_columns(where: tuple, what: str, given: Any, problems: _Problems) -> dict[str, str]:
    if not isinstance(given, dict) or not given:
        problems.add((*where, "columns"), f"{what} declares no columns",
                     f'add [{".".join(map(str, where))}.columns] with each column\'s type, e.g. name = "text"')
        return {}
    columns = {}
    for column, kind in given.items():
        place = (*where, "columns", column)
        if not IDENTIFIER.fullmatch(column) or column in RESERVED_COLUMNS:
            problems.add(place, f"{what}: column name {column!r} cannot be used",
                         "use lower-case letters, digits and _ (up to 63); "
                         f"{', '.join(RESERVED_COLUMNS)} are the engine's own")
        elif kind not in COLUMN_TYPES:
            near = difflib.get_close_matches(str(kind), COLUMN_TYPES, n=1, cutoff=0.5)
            problems.add(place, f"{what}: column {column} has type {kind!r}, which a mapping file does not know",
                         f"did you mean {near[0]!r}?" if near else f"use one of: {', '.join(COLUMN_TYPES)}")
        else:
            columns[column] = kind
    return columns


def _merge(where: tuple, what: str, given: Any, columns: dict[str, str], key: tuple[str, ...],
           problems: _Problems) -> TableRule:
    name = where[-1]
    place = (*where, "merge")
    if not isinstance(given, dict):
        problems.add(place, f"{what}: merge is {_toml_kind(given)}", 'write merge = { greatest = ["count"] }')
        return TableRule(name)
    problems.unknown_keys(place, given, MERGE_KEYS, f"{what} merge")
    greatest = problems.names(place, given, "greatest", f"{what} merge")
    coalesce = problems.names(place, given, "coalesce", f"{what} merge")
    version = problems.typed(place, given, "version", str, f"{what} merge", '"updated_at"')
    for column in (*greatest, *coalesce, *([version] if version else [])):
        if columns and column not in columns:
            problems.add(place, f"{what}: merge names {column!r}, which is not one of its columns",
                         f"name one of {', '.join(columns)}")
        elif column in key:
            problems.add(place, f"{what}: merge names its key column {column!r}", "a key column never changes; drop it")
    for column in (*greatest, *([version] if version else [])):
        if columns.get(column, "bigint") not in ORDERED_TYPES:
            problems.add(place, f"{what}: merge orders by {column!r}, a {columns[column]} column",
                         f"greatest and version take a column of type {', '.join(ORDERED_TYPES)}")
    for column in set(greatest) & set(coalesce):
        problems.add(place, f"{what}: {column!r} is both greatest and coalesce", "keep it in one of them")
    return TableRule(name, greatest=greatest, coalesce=coalesce, version=version)


def _patterns(given: Any, tables: dict[str, _Table], problems: _Problems) -> list[_Pattern]:
    if not isinstance(given, list) or not given:
        problems.add(("pattern",), "the file declares no pattern",
                     'add a [[pattern]] with name, key and type for each shape of key (`migrator mapping --init` '
                     'writes a start)')
        return []
    found: list[_Pattern] = []
    seen: dict[str, int] = {}
    grammars: dict[str, str] = {}
    for index, body in enumerate(given):
        where = ("pattern", index)
        if not isinstance(body, dict):
            problems.add(where, f"pattern {index + 1} is {_toml_kind(body)}", "declare each as [[pattern]]")
            continue
        name = body.get("name") if isinstance(body.get("name"), str) else f"#{index + 1}"
        what = f"pattern {name!r}"
        problems.unknown_keys(where, body, PATTERN_KEYS, what)
        for key in ("name", "key", "type"):
            if key not in body:
                problems.add(where, f"{what} has no {key}", {"name": 'add name = "product"',
                                                               "key": 'add key = "app:product:{id}"',
                                                               "type": f"add type = one of {', '.join(REDIS_TYPES)}"}[key])
        if name in seen:
            problems.add((*where, "name"), f"{what} is declared twice (also pattern {seen[name] + 1})",
                         "give each pattern its own name")
        elif "name" in body and (name == UNMAPPED or not NAME.fullmatch(name)):
            problems.add((*where, "name"), f"{what}: not a name a pattern can have",
                         f"use letters, digits, _ and - (not {UNMAPPED!r})")
        seen.setdefault(name, index)
        pattern = _pattern_declared(index, name, what, body, tables, problems)
        if pattern is None:
            continue
        # (the fields' names do not matter: two grammars that differ only in those match the same keys)
        shape = re.sub(r"\(\?P<\w+>", "(", pattern.grammar)
        if shape in grammars:
            problems.add((*where, "key"), f"{what} has the same key as pattern {grammars[shape]!r}: it "
                         "would never own a key", "change its key, or remove one of the two")
        grammars.setdefault(shape, name)
        found.append(pattern)
    return found


def _pattern_declared(index: int, name: str, what: str, body: dict[str, Any], tables: dict[str, _Table],
                      problems: _Problems) -> _Pattern | None:
    where = ("pattern", index)
    t = lambda key, kind, example: problems.typed(where, body, key, kind, what, example)  # noqa: E731
    key, redis_type, fmt = t("key", str, '"app:product:{id}"'), t("type", str, '"hash"'), t("format", str, '"json"')
    priority, rows = t("priority", str, '"high"'), t("rows", str, '"member"')
    table, skip = t("table", str, '"products"'), t("skip", str, '"ephemeral: rebuilt by the app"')
    description, ttl = t("description", str, '"..."'), t("ttl", str, '"2 days"')
    ratio, keys = t("max_dead_ratio", (int, float), "0.001"), t("max_dead_keys", int, "10")
    columns = t("columns", dict, '{ sku = "key.sku" }')
    grammar = glob = template = None
    fields: tuple[str, ...] = ()
    if key is not None:
        try:
            grammar, glob, fields, template = _parsed_key(key)
        except ValueError as exc:
            what_, _, fix = str(exc).partition(" — ")
            problems.add((*where, "key"), f"{what}: key {key!r}: {what_}", fix or "fix the key grammar")
    if redis_type is not None and redis_type not in REDIS_TYPES:
        near = difflib.get_close_matches(redis_type, REDIS_TYPES, n=1, cutoff=0.5)
        problems.add((*where, "type"), f"{what}: type {redis_type!r} is no Redis type a mapping file reads",
                     f"did you mean {near[0]!r}?" if near else f"use one of: {', '.join(REDIS_TYPES)}")
        redis_type = None
    if fmt is not None and redis_type not in (None, "string"):
        problems.add((*where, "format"), f"{what}: format applies to strings, and this is a {redis_type}",
                     "remove format")
    elif fmt is not None and fmt not in STRING_FORMATS:
        problems.add((*where, "format"), f"{what}: format {fmt!r} is unknown", f"use one of: {', '.join(STRING_FORMATS)}")
        fmt = None
    level = Priority.MEDIUM
    if priority is not None:
        try:
            level = Priority.parse(priority)
        except ValueError as exc:
            problems.add((*where, "priority"), f"{what}: {exc}".split("; ")[0], str(exc).split("; ")[1])
    if "table" not in body and "skip" not in body:
        problems.add(where, f"{what} has neither table nor skip",
                     'add table = "..." (where its rows go) or skip = "why its keys stay in Redis"')
    elif "table" in body and "skip" in body:
        problems.add((*where, "skip"), f"{what} has both table and skip", "keep one: a pattern is migrated or skipped")
    if table is not None and table not in tables:
        near = difflib.get_close_matches(table, list(tables), n=1, cutoff=0.6)
        problems.add((*where, "table"), f"{what}: table {table!r} is not declared",
                     f"did you mean {near[0]!r}?" if near else f"add [tables.{table}] with its key and columns")
    if skip is not None and columns:
        problems.add((*where, "columns"), f"{what} is skipped and has columns", "remove its columns, or skip")
    if ratio is not None and not 0 <= ratio <= 1:
        problems.add((*where, "max_dead_ratio"), f"{what}: max_dead_ratio {ratio} is no share of its keys",
                     "give a number from 0 to 1, e.g. 0.001")
    if keys is not None and keys < 0:
        problems.add((*where, "max_dead_keys"), f"{what}: max_dead_keys is negative", "give 0 or more")
    if redis_type is None or grammar is None:
        return None
    per_member = _per_member(where, what, redis_type, rows, problems)
    # (a collection's members, a hash's or a stream's values, decoded by the columns that take them: a
    # bytea column takes binary ones as they are, and a binary one no column takes fails nothing)
    value_format = (fmt or "text" if redis_type == "string" else "json" if redis_type == "json"
                    else f"{redis_type}_bytes")
    sources = {}
    if table is not None:
        if not columns:
            problems.add(where, f"{what} writes table {table!r} but gives no columns",
                         f"add [pattern.columns] below its [[pattern]]: column = \"source\", e.g. "
                         f"{next(iter(tables[table].columns), 'name') if table in tables else 'name'} = \"value\"")
        sources = _sources(where, what, columns or {}, redis_type, value_format, per_member, fields, problems)
    return _Pattern(index, name, grammar, glob, template, fields, redis_type, value_format, level,
                    description or f"{redis_type} {key}", table, skip, per_member, ttl or "", ratio, keys, sources,
                    tuple(columns or ()))


def _per_member(where: tuple, what: str, redis_type: str, rows: str | None, problems: _Problems) -> bool:
    collection = redis_type in PER_MEMBER
    if rows is None:
        return collection and redis_type != "hash"
    if rows not in ("key", "member"):
        problems.add((*where, "rows"), f"{what}: rows {rows!r} is unknown",
                     'use "key" (one row per key) or "member" (one per member)')
    elif rows == "member" and not collection:
        problems.add((*where, "rows"), f"{what}: a {redis_type} has no members", 'remove rows, or write rows = "key"')
    return rows == "member" and collection


def _sources(where: tuple, what: str, columns: dict[str, Any], redis_type: str, value_format: str, per_member: bool,
             fields: tuple[str, ...], problems: _Problems) -> dict[str, tuple[str, str, tuple[str, ...]]]:
    allowed = ["key", "key_field", *(PER_MEMBER[redis_type] if per_member else PER_KEY[redis_type])]
    if redis_type == "string" and value_format == "json":
        allowed.append("json")
    has = f"a {redis_type}" + (" member" if per_member else "") + (f" of format {value_format}"
                                                                   if redis_type == "string" else "")
    sources = {}
    for column, source in columns.items():
        place = (*where, "columns", column)
        if not isinstance(source, str):
            problems.add(place, f"{what}: column {column}'s source is {_toml_kind(source)}",
                         f'write {column} = "value" (or key.<field>, json.<path>, ...)')
            continue
        origin, path = parse_source(source)
        if origin is None:
            near = difflib.get_close_matches(source, [SPELLING[o] for o in allowed], n=1, cutoff=0.5)
            problems.add(place, f"{what}: column {column} takes {source!r}, which is no source",
                         f"did you mean {near[0]!r}?" if near else
                         f"use one of: {', '.join(SPELLING[o] for o in allowed)}")
        elif origin not in allowed:
            problems.add(place, f"{what}: column {column} takes {source!r}, which {has} has not (it has "
                         f"{', '.join(SPELLING[o] for o in allowed)})", "use one of those" + (
                             ', or rows = "member" for one row per member' if redis_type in PER_MEMBER and
                             not per_member else ""))
        elif origin == "key_field" and path[0] not in fields:
            problems.add(place, f"{what}: column {column} takes key.{path[0]}, but the key has no field {path[0]!r}"
                         + (f" (its fields: {', '.join(fields)})" if fields else ""),
                         f"name one of its fields, or add {{{path[0]}}} to the key")
        else:
            sources[column] = (source, origin, path)
    return sources


def parse_source(text: str) -> tuple[str | None, tuple[str, ...]]:
    """(origin, path) of a column source as a file spells it (`key.sku`, `json.a.b`); (None, ()) when
    it is none."""
    head, dot, rest = text.strip().partition(".")
    if not dot:
        plain = {"key": "key", "value": "value", "field": "field_name", "member": "member", "score": "score",
                 "index": "index", "id": "id"}
        return plain.get(head), ()
    if not rest:
        return None, ()
    if head == "key" and FIELD.fullmatch(rest):
        return "key_field", (rest,)
    if head == "field":
        return "field", (rest,)
    if head == "json" and all(rest.split(".")):
        return "json", tuple(rest.split("."))
    if head == "id" and rest == "time":
        return "id_time", ()
    return None, ()


def _cross_check(patterns: list[_Pattern], tables: dict[str, _Table], problems: _Problems) -> None:
    """What patterns and tables must agree on: the columns a pattern gives are the table's, every
    pattern writing a table gives all of them, and every table is written.

    (A row is one key's: were two patterns to fill the columns of one row each, the row would keep
    the digest of whichever key wrote it last, and verify would take the other key's rows changed
    in PostgreSQL for the app's own writes.)"""
    for p in patterns:
        table = tables.get(p.table) if p.table else None
        if table is None:
            continue
        where, what = ("pattern", p.index), f"pattern {p.name!r}"
        for column in p.named:
            if table.columns and column not in table.columns:
                problems.add((*where, "columns", column), f"{what}: column {column!r} is not a column of table "
                             f"{table.name!r}", f"declare it under [tables.{table.name}.columns], or fix its name")
        absent = [c for c in table.columns if c not in p.named]
        if p.named and absent:
            problems.add((*where, "columns"), f"{what} writes table {table.name!r} without its column(s) "
                         f"{', '.join(absent)}", "give each a source in the pattern's columns (every pattern writing "
                         "a table gives all of its columns), or drop them from the table")
    written = {p.table for p in patterns}
    for name in tables:
        if name not in written:
            problems.add(("tables", name), f"table {name!r} is written by no pattern",
                         f'name it in a pattern (table = "{name}"), or remove it')


def _pattern(p: _Pattern, tables: dict[str, _Table]) -> Pattern:
    transform = None
    if p.table is not None:
        table = tables[p.table]
        shape = RowShape(
            table=table.name,
            redis_type=p.redis_type,
            per_member=p.per_member,
            columns=tuple(Column(c, source, origin, path, _converter(table.columns[c], origin, p), c in table.required)
                          for c, (source, origin, path) in p.columns.items()),
            key=table.key,
        )
        transform = rows_transform(shape)
    collection = p.redis_type in PER_MEMBER
    return Pattern(p.name, p.glob, p.grammar, REDIS_TYPES[p.redis_type], p.priority, p.description,
                   value_format=p.value_format, table=p.table, transform=transform, skip=p.skip, ttl=p.ttl,
                   max_dead_ratio=p.max_dead_ratio, max_dead_keys=p.max_dead_keys,
                   member_wise=p.per_member if collection and transform is not None else None,
                   row_key=_row_key(p, tables[p.table]) if p.table is not None else None)


def _row_key(p: _Pattern, table: _Table) -> KeyTemplate | None:
    """The key a row of `p` comes from, spelled from the row's columns: when each field of the key is
    a text column taking it as it is (`sku = "key.sku"`); else None."""
    column_of = {path[0]: column for column, (_, origin, path) in p.columns.items()
                 if origin == "key_field" and table.columns.get(column) == "text"}
    if not p.fields or any(f not in column_of for f in p.fields):
        return None
    braces = str.maketrans({"{": "{{", "}": "}}"})
    return KeyTemplate("".join(literal.translate(braces) + (f"{{{column_of[f]}}}" if f else "")
                               for literal, f, _, _ in string.Formatter().parse(p.template)))


def _converter(kind: str, origin: str, p: _Pattern) -> str:
    """The CONVERTERS key of a column: a jsonb column reads text as JSON text, and JSON values as they are."""
    textual = origin in TEXTUAL or origin == "value" and (
        p.value_format in ("text", "bytes") or p.per_member and p.redis_type in ("hash", "list"))
    return "jsonb text" if kind == "jsonb" and textual else kind


def table_ddl(tables: Any) -> str:
    """The tables' DDL: each created with its id and declared columns (the key and required ones NOT
    NULL), and each column added if an earlier version of the file lacked it. Names are checked
    identifiers and types one of COLUMN_TYPES: nothing from a key's contents reaches this text."""
    statements = []
    for table in tables:
        columns = [f'    "{c}" {kind}{" NOT NULL" if c in table.required else ""}' for c, kind in table.columns.items()]
        statements.append(f'CREATE TABLE IF NOT EXISTS "{table.name}" (\n    id uuid PRIMARY KEY,\n'
                          + ",\n".join(columns) + "\n);")
        statements += [f'ALTER TABLE "{table.name}" ADD COLUMN IF NOT EXISTS "{c}" {kind};'
                       for c, kind in table.columns.items()]
    return "\n".join(statements) + "\n"
