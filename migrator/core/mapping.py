"""Declarative mapping of a Redis keyspace: one `Pattern` per key shape, gathered in a `Mapping`.

The engine, the audit, the mapping document and the report all read these entries; the
engine knows nothing of any particular application beyond what a `Mapping` declares.
"""
from __future__ import annotations

import enum
import re
import string
from dataclasses import dataclass, field
from functools import cached_property
from datetime import datetime, timezone, tzinfo
from fnmatch import fnmatchcase
from typing import Any, Callable, Iterable, Sequence

import orjson

from migrator.core.hooks import Hooks
from migrator.core.merge import TableRule


class Priority(enum.IntEnum):
    """Migration order: every priority is migrated and validated before the next one starts."""

    CRITICAL = 0
    HIGH = 1
    MEDIUM = 2
    LOW = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> "Priority":
        try:
            return cls[text.strip().upper()]
        except KeyError:
            choices = ", ".join(p.label for p in cls)
            raise ValueError(f"unknown priority {text!r}; choose one of: {choices}") from None


class BadRecord(ValueError):
    """A source value that cannot be migrated as it is; it becomes a dead letter with this reason."""


# What a malformed value makes a transform raise; anything else is a bug and fails the batch.
SHAPE_ERRORS = (BadRecord, ValueError, TypeError, KeyError, AttributeError, OverflowError)


# Row and SourceRecord are made once per key on the hot path: not frozen, since a frozen
# dataclass's __init__ costs four times as much.
@dataclass(slots=True)
class Row:
    """One row for a target table; `values` maps column names to Python values.

    A column of the table that is not in `values` holds its default (NULL, most often): the
    verification checks that it does. One the record cannot know (another key of the same row
    fills it) is named in `unknown`: neither written nor checked for this record.
    """

    table: str
    values: dict[str, Any]
    unknown: tuple[str, ...] = ()


@dataclass(slots=True)
class SourceRecord:
    """What a transform sees: the key, the fields its grammar captured, the decoded value."""

    key: str
    fields: dict[str, str]
    value: Any
    expires_at: datetime | None  # absolute expiry from the PTTL read with the value
    now: datetime  # when the value was read (aware)
    source_tz: tzinfo


Transform = Callable[[SourceRecord], list[Row]]


@dataclass(frozen=True, slots=True)
class Reference:
    """A key a record says exists, and with `member`, holds `member` (in a set or sorted set, in a
    JSON array, or as its whole text): an index entry's record, or the index a record belongs in."""

    key: str
    member: str | None = None


References = Callable[[SourceRecord], list[Reference]]

# How a value read from Redis is decoded before the transform sees it (source.decode): "bytes" a string
# as it is, "hash_bytes" a hash with its values as they are (each decoded by whatever takes it).
VALUE_FORMATS = ("json", "int", "text", "bytes", "hash", "hash_bytes", "set", "zset", "list", "stream",
                 "set_bytes", "zset_bytes", "list_bytes", "stream_bytes")
# Types read a part at a time (source.read_parts) when their pattern is member-wise.
COLLECTION_TYPES = ("hash", "set", "zset", "list", "stream")
# What TYPE answers for a RedisJSON document (the module's own name for its type).
REDISJSON = "ReJSON-RL"


COLUMN_NAME = re.compile(r"[A-Za-z_]\w*")


@dataclass(frozen=True)
class KeyTemplate:
    """The key of a pattern that gives a row, spelled from the row's columns: `text` names them in
    braces (`app:grant:email:{email}`; `{{` and `}}` are literal braces). For a row several keys
    give (one grant under its ip key and its email key): when the key that wrote it last goes,
    `migrator follow` looks for the others before it retires the row. A NULL column is spelled
    `null` (a key the app names after a None), or, when `null` is None, spells no key."""

    text: str
    null: str | None = None

    def __post_init__(self) -> None:
        try:
            bad = [name for _, name, spec, conversion in string.Formatter().parse(self.text)
                   if name is not None and (not COLUMN_NAME.fullmatch(name) or spec or conversion)]
        except ValueError:  # a lone brace
            bad = [self.text]
        if bad or not self.columns:
            raise ValueError(f"key template {self.text!r}: name each column in braces, as {{email}}, and only that")

    @cached_property  # (render asks it per row)
    def columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(self.text) if name))

    def render(self, values: dict[str, Any]) -> str | None:
        """The key a row with these column values comes from; None when a column it needs is NULL
        (and no `null` spelling) or missing."""
        found = {}
        for column in self.columns:
            value = values.get(column)
            if value is None:
                if self.null is None:
                    return None
                value = self.null
            found[column] = value
        return self.text.format_map(found)


def literal_prefix(grammar: str) -> str:
    """Text every key matching `grammar` starts with; '' when that cannot be told simply."""
    depth, escaped, in_class = 0, False, False
    for ch in grammar:  # an alternation outside any group may start with anything
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch in "()":
            depth += 1 if ch == "(" else -1
        elif ch == "|" and depth == 0:
            return ""
    for i, ch in enumerate(grammar):
        if ch in "\\.^$*+?{}[]()|":
            # a quantifier may make the character before it optional
            return grammar[: max(i - 1, 0)] if ch in "*+?{" else grammar[:i]
    return grammar


def _trie(prefixes: set[str]) -> re.Pattern[str]:
    """A regular expression whose match of a key is the longest of `prefixes` the key starts with
    (none when it starts with none): a trie of them, each node trying its longer branches first."""
    root: dict[str, dict] = {}
    for prefix in sorted(prefixes):  # (the same expression in every process)
        node = root
        for ch in prefix:
            node = node.setdefault(ch, {})
        node[""] = {}  # a prefix ends here

    def spell(node: dict[str, dict]) -> str:
        branches = [re.escape(ch) + spell(child) for ch, child in node.items() if ch]
        if not branches:
            return ""
        either = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
        return f"(?:{either})?" if "" in node else either

    return re.compile(spell(root) if prefixes else "(?!)", re.DOTALL)


@dataclass(frozen=True)
class Pattern:
    """One shape of key: how to recognise it, what Redis type it holds and where it goes.

    A pattern either has a `transform` and a `table`, or a `skip` reason (ephemeral data,
    an index kept only for cross-checks, ...): skipped keys are counted, and read only to check
    their `references`. A record's references (the records an index names, the index a record
    belongs in) are checked in Redis as the keys are read: one that is not there is counted as
    dangling, within the pattern's budget (`max_dangling_ratio`, else the run's dead-letter ratio).
    """

    name: str
    glob: str  # SCAN MATCH style, for people and for the audit
    grammar: str  # anchored regular expression with named groups
    redis_type: str  # as TYPE answers: string, hash, set, zset, list, stream, ReJSON-RL (REDISJSON)
    priority: Priority
    description: str
    value_format: str = "json"
    table: str | None = None
    transform: Transform | None = None
    skip: str | None = None
    source: str = ""  # metadata->>'source' on every row this pattern writes
    ttl: str = ""
    validation: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
    # Its dead-letter budget, when not the run's (--max-dead-ratio, --max-dead-keys): more dead
    # letters than both fail its priority.
    max_dead_ratio: float | None = None
    max_dead_keys: int | None = None
    references: References | None = None
    max_dangling_ratio: float | None = None
    # Its naive datetimes are UTC (the app wrote datetime.utcnow()), whatever --source-timezone
    # (the zone of the app host's local time) says.
    utc_naive: bool = False
    # A collection pattern that is read says whether its transform and references are member-wise:
    # a record whose value is some of the collection's members gives the rows and references of
    # those members, and nothing else. Then a large collection is read, transformed and written a
    # part at a time, in bounded memory (one member its model refuses still refuses the whole key);
    # otherwise it is read whole, however large, as a large string is.
    member_wise: bool | None = None
    # Tables besides `table` its transform's rows may go to (a user's row in the legacy id map): where
    # `migrator follow` looks for the rows a changed key no longer gives. Decides nothing a run writes.
    also_writes: tuple[str, ...] = field(default=(), metadata={"digest": False})
    # The key of this pattern that gives a row of `table`, from the row's columns, where one row is
    # given by keys of several patterns (see KeyTemplate). Decides nothing a run writes.
    row_key: KeyTemplate | None = field(default=None, metadata={"digest": False})
    provenance: str = field(init=False, repr=False, compare=False)  # the rows' metadata JSON

    def __post_init__(self) -> None:
        if (self.transform is None) == (self.skip is None):
            raise ValueError(f"pattern {self.name}: declare exactly one of transform or skip")
        if self.transform is not None and not self.table:
            raise ValueError(f"pattern {self.name}: a migrated pattern names its target table")
        if self.value_format not in VALUE_FORMATS:
            raise ValueError(f"pattern {self.name}: value_format must be one of {VALUE_FORMATS}")
        if self.redis_type in COLLECTION_TYPES and self.read and self.member_wise is None:
            raise ValueError(f"pattern {self.name}: a {self.redis_type} pattern that is read declares member_wise: "
                             "True when some of its members give the rows and references of those members alone "
                             "(a large one is then read a part at a time), False to have it read whole")
        re.compile(self.grammar)  # a broken grammar fails here, naming no key
        object.__setattr__(self, "provenance", orjson.dumps({"source": self.source or f"redis_{self.name}"}).decode())

    @property
    def migrated(self) -> bool:
        return self.transform is not None

    @property
    def tables(self) -> tuple[str, ...]:
        """Every table its rows may go to."""
        return (self.table, *self.also_writes) if self.table else ()

    def zone(self, source_tz: tzinfo) -> tzinfo:
        """The zone its naive datetimes are read in."""
        return timezone.utc if self.utc_naive else source_tz

    @property
    def read(self) -> bool:
        """Whether a run reads this pattern's values: to migrate them, or to check their references."""
        return self.transform is not None or self.references is not None



@dataclass(frozen=True)
class Figure:
    """A monitoring figure over the target tables (the guide's validation and monitoring queries).

    `sql` is a static query (no parameters) returning one number, or rows when `rows` is set.
    A figure counting dangling references among the rows of table `dangling_in` (orphans: rows
    naming a user that is not there) is a check: within the dead-letter budget of that table's
    rows it passes (the app itself left them dangling), beyond it it fails.
    """

    name: str
    sql: str
    dangling_in: str | None = None
    rows: bool = False


@dataclass(frozen=True)
class Link:
    """Rows of `table` that name an entity by a legacy id (an app's own id, an email) in `column`:
    once the run has brought the entities in (legacy_id_map), their new id is filled into `into`."""

    table: str
    column: str
    into: str


UNMAPPED = "unmapped"
UNMAPPED_REASON = "unmapped: no pattern of the mapping matches; left in Redis untouched"


@dataclass(frozen=True)
class Mapping:
    """An ordered set of patterns: the first whose grammar matches a key owns it."""

    name: str
    patterns: tuple[Pattern, ...]
    rules: tuple[TableRule, ...] = ()
    links: tuple[Link, ...] = ()
    linked_patterns: tuple[str, ...] = ()  # the patterns that bring the linked entities in; linked rows depend on them
    figures: tuple[Figure, ...] = ()
    unmapped_priority: Priority = Priority.LOW
    # Its target tables' DDL: SQL texts `init-db` applies after the engine's, each idempotent (it
    # runs again on top of itself) and creating every table of `rules`; the engine adds to each the
    # provenance columns it fills and the journal trigger rollback depends on (migrator/core/schema.py).
    schema: tuple[str, ...] = ()
    # What the application adds beside its patterns (demo keyspace, audit tallies, parity reads):
    # it decides nothing a run writes, so it is no part of the digest.
    hooks: Hooks = field(default=Hooks(), compare=False, metadata={"digest": False})

    def __post_init__(self) -> None:
        names = [p.name for p in self.patterns]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes or UNMAPPED in names:
            raise ValueError(f"mapping {self.name}: pattern names must be unique, got {sorted(dupes)}")
        # A key is tried only against the grammars that can match it: those whose literal prefix it
        # starts with (each grammar alone, in declaration order: the first that matches owns it).
        # Those are the patterns of the longest such prefix, found by one match of a trie of them.
        prefixes = [literal_prefix(p.grammar) for p in self.patterns]
        # (re.DOTALL: a key name may hold a newline)
        grammars = [re.compile(p.grammar, re.DOTALL).fullmatch for p in self.patterns]
        object.__setattr__(self, "_longest_prefix", _trie(set(prefixes)).match)
        object.__setattr__(self, "_candidates", {
            prefix: tuple((p, g) for p, g, its in zip(self.patterns, grammars, prefixes) if prefix.startswith(its))
            for prefix in set(prefixes)})
        ruled = {r.name for r in self.rules}
        missing = {t for p in self.patterns for t in p.tables} - ruled
        if missing:
            raise ValueError(f"mapping {self.name}: tables without a merge rule: {sorted(missing)}")
        # Per table that keys of more than one migrated pattern write: the patterns that spell the key
        # of a row from its columns (the keys that may give one row together).
        writers: dict[str, list[Pattern]] = {}
        for p in self.patterns:
            if p.migrated:
                writers.setdefault(p.table, []).append(p)
        object.__setattr__(self, "_sharing", {t: tuple(p for p in ps if p.row_key) for t, ps in writers.items()
                                              if len(ps) > 1 and any(p.row_key for p in ps)})

    def pattern_of(self, key: str) -> tuple[Pattern | None, re.Match[str] | None]:
        """The pattern owning `key` (None: unmapped), and the match to take its fields from."""
        found = self._longest_prefix(key)
        if found is not None:
            for pattern, grammar in self._candidates[found.group()]:
                m = grammar(key)
                if m is not None:
                    return pattern, m
        return None, None

    @staticmethod
    def fields_of(m: re.Match[str]) -> dict[str, str]:
        """The named fields of a key, from its match by pattern_of: asked only for keys that
        will be read (the hot path)."""
        return m.groupdict()

    @staticmethod
    def prefixes(patterns: Iterable[Pattern]) -> tuple[bytes, ...]:
        """For `key.startswith(...)`: a key starting with none of these is owned by none of `patterns`.

        A pass over one priority drops most keys with this test alone, before any decoding or
        regular expression (the owning pattern is still decided by the full grammar).
        """
        return tuple({literal_prefix(p.grammar).encode() for p in patterns})

    def classify(self, key: str) -> tuple[Pattern | None, dict[str, str]]:
        pattern, m = self.pattern_of(key)
        return (pattern, self.fields_of(m)) if pattern else (None, {})

    def rule(self, table: str) -> TableRule:
        for rule in self.rules:
            if rule.name == table:
                return rule
        raise KeyError(f"no merge rule for table {table!r}")

    def sharing(self, table: str) -> tuple[Pattern, ...]:
        """The patterns whose keys may give one row of `table` together (each spells its key from the
        row: Pattern.row_key); none for a table one pattern writes."""
        return self._sharing.get(table, ())

    def row_key_columns(self, table: str) -> tuple[str, ...]:
        """The columns of `table` that spell the keys keys_giving names."""
        return tuple(dict.fromkeys(c for p in self.sharing(table) for c in p.row_key.columns))

    def keys_giving(self, table: str, values: dict[str, Any]) -> dict[str, Pattern]:
        """The keys that may give a row of `table` with these column values, spelled from them by each
        sharing pattern's Pattern.row_key, with their pattern (those the pattern owns)."""
        found: dict[str, Pattern] = {}
        for pattern in self.sharing(table):
            key = pattern.row_key.render(values)
            if key is not None and self.pattern_of(key)[0] is pattern:
                found[key] = pattern
        return found

    def table_names(self) -> list[str]:
        """Every table a run of this mapping writes, the legacy id map included."""
        return [r.name for r in self.rules]

    def linked_columns(self) -> dict[str, dict[str, list[str]]]:
        """Per table, each column the link step fills (Link.into) and the columns naming its entity."""
        linked: dict[str, dict[str, list[str]]] = {}
        for link in self.links:
            linked.setdefault(link.table, {}).setdefault(link.into, []).append(link.column)
        return linked

    def select(
        self,
        priorities: Iterable[Priority] | None = None,
        tables: Sequence[str] | None = None,
        globs: Sequence[str] | None = None,
    ) -> list[Pattern]:
        """Patterns in scope of a run: by priority, by target table, by glob or name."""
        chosen = list(self.patterns)
        if priorities is not None:
            wanted = set(priorities)
            chosen = [p for p in chosen if p.priority in wanted]
        if tables:
            known = sorted({p.table for p in self.patterns if p.table})
            unknown = set(tables) - set(known)
            if unknown:
                raise ValueError(f"--table {', '.join(map(repr, sorted(unknown)))} is no table of the {self.name} "
                                 f"mapping; its tables: {', '.join(known)}")
            chosen = [p for p in chosen if p.table in tables]
        if globs:
            named = {glob: self.named(glob) for glob in globs}
            unknown = [glob for glob, found in named.items() if not found]
            if unknown:
                raise ValueError(
                    f"--pattern {', '.join(map(repr, unknown))} names no pattern of the {self.name} mapping; its "
                    f"patterns: {', '.join(p.name for p in self.patterns)} (`migrator mapping` shows their key globs)"
                )
            chosen = [p for p in chosen if any(p in found for found in named.values())]
        return chosen

    def named(self, wanted: str) -> list[Pattern]:
        """The patterns `wanted` names: the one whose name or key glob it is, else every one whose
        name or key glob it matches as a shell-style glob ('premium_*', 'app:premium:*')."""
        exact = [p for p in self.patterns if wanted in (p.name, p.glob)]
        return exact or [p for p in self.patterns if fnmatchcase(p.name, wanted) or fnmatchcase(p.glob, wanted)]
