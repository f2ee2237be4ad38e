"""The per-key fast paths against the plain way each replaced, over hostile inputs (pure: no services).

Each rewrite for speed keeps its former spelling here as the oracle: the two must agree on every
input below, so a fast path can never change what a run writes or a verification decides.
"""
from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

import pytest

from migrator.apps.threadr.mapping import THREADR
from migrator.core.ledger import TALLY_FIELDS, PatternCounts
from migrator.core.mapping import BadRecord, Mapping, Pattern, Priority
from migrator.core.mapping_file import load_file
from migrator.core.source import decode
from migrator.core.values import ID_NAMESPACE, stable_id
from migrator.core.verify import FIELDS, Tally

from example_mappings import PREMIUM_ONLY

SHOP = load_file(Path(__file__).parent.parent / "migrator" / "apps" / "shop" / "mapping.toml")


def combined_owner(mapping: Mapping, key: str) -> tuple[Pattern | None, dict[str, str]]:
    """Mapping.pattern_of and fields_of as they were: one alternation of every grammar, in
    declaration order, its branch told by the match's lastindex."""
    branches = [f"(?P<p{i}>" + re.sub(r"\(\?P<(\w+)>", rf"(?P<p{i}_\1>", p.grammar) + ")"
                for i, p in enumerate(mapping.patterns)]
    combined = re.compile("|".join(branches) or "(?!)", re.DOTALL)
    m = combined.fullmatch(key)
    if m is None:
        return None, {}
    i = next(i for i in range(len(mapping.patterns)) if combined.groupindex[f"p{i}"] == m.lastindex)
    names = tuple(re.compile(mapping.patterns[i].grammar).groupindex)
    return mapping.patterns[i], {n: m.group(f"p{i}_{n}") for n in names}


def pattern(name: str, grammar: str) -> Pattern:
    return Pattern(name, name, grammar, "string", Priority.LOW, name, skip="test")


# Grammars whose literal prefixes are prefixes of each other, equal, empty, or hold a newline,
# declared so that a shorter prefix comes before a longer one and the other way round.
NESTED = Mapping("nested", (
    pattern("short_first", r"a:(?P<x>[^:]+)"),
    pattern("longer", r"a:b:(?P<y>.*)"),
    pattern("same_prefix", r"a:b:(?P<z>\d+)"),  # never owns a key: `longer` comes first
    pattern("longest_first", r"c:d:e:(?P<w>.+)"),
    pattern("then_shorter", r"c:(?P<v>.+)"),
    pattern("exact", r"c:d"),
    pattern("newline", "n\n(?P<n>.?)"),
    pattern("optional", r"o?(?P<o>x)"),  # its prefix is '': a candidate for every key
    pattern("alternation", r"p:(?P<p>1)|q:(?P<q>2)"),
    pattern("anything", r"(?P<rest>z.*)"),
))


def keys_for(mapping: Mapping) -> list[str]:
    """Hostile keys: each grammar's literal text, its prefixes and extensions of it, empty and odd ones."""
    found = ["", ":", "\n", "\x00", "a", "a:", "a:b", "a:b:", "a:b:1", "a:b:x", "a:b:1:2", "c:", "c:d", "c:d:",
             "c:d:e:", "c:d:e:f", "c:dd", "n\n", "n\nx", "n\nxy", "x", "ox", "oox", "p:1", "q:2", "p:2", "z", "zz\n",
             "threadr:", "threadr:user:", "threadr:user:email:", "threadr:user:a:b", "analytics:", "analytics:u:thread:",
             "\udcff", "threadr:user:\udcff\udcfe", "threadr:usage:ip:1:2::daily:2026-01-01", "é:ü", "\u2028"]
    for p in mapping.patterns:
        text = re.sub(r"\\(.)", r"\1", re.sub(r"\(\?P<\w+>|[()?*+^$|\[\]]", "", p.grammar))
        for n in range(len(text) + 1):
            found += [text[:n], text[:n] + "x", text[:n] + ":", text[:n] + "\n"]
        found += [p.glob.replace("*", "x"), p.glob.replace("*", "a:b:c"), p.glob.replace("*", "")]
    return found


@pytest.mark.parametrize("mapping", [THREADR, SHOP, PREMIUM_ONLY, NESTED, Mapping("empty", ())],
                         ids=lambda m: m.name)
def test_the_prefix_dispatch_owns_each_key_as_the_combined_alternation_did(mapping):
    keys = keys_for(mapping)
    # and non-UTF-8 key names as the batch decodes them
    keys += [raw.decode("utf-8", "backslashreplace") for raw in (b"threadr:user:\xff", b"\xc3(", b"a:\x80:b")]
    for key in keys:
        owner, fields = mapping.classify(key)
        assert (owner, fields) == combined_owner(mapping, key), key
        m = mapping.pattern_of(key)[1]
        assert (m is None) == (owner is None)


def test_nested_prefixes_keep_declaration_order():
    assert NESTED.classify("a:b:1")[0].name == "longer"  # (also `a:(?P<x>[^:]+)`'s prefix, which does not match)
    assert NESTED.classify("a:b") == (NESTED.patterns[0], {"x": "b"})
    assert NESTED.classify("c:d:e:f")[0].name == "longest_first"
    assert NESTED.classify("c:d")[0].name == "then_shorter"  # before `exact`
    assert NESTED.classify("x")[0].name == "optional" and NESTED.classify("zx")[0].name == "anything"
    assert NESTED.classify("q:2") == (NESTED.patterns[8], {"p": None, "q": "2"})
    assert NESTED.classify("n\n") == (NESTED.patterns[6], {"n": ""})


@pytest.mark.parametrize("parts", [(), ("",), ("user", "user_1"), ("a", "b"), ("é", "ü", "\x00"), ("🧵" * 40,),
                                   ("usage", "ip", "2001:db8::1", "daily", "2026-11-27"), tuple(str(i) for i in range(300))])
def test_a_stable_id_is_the_uuid5_of_its_parts(parts):
    assert stable_id(*parts) == str(uuid.uuid5(ID_NAMESPACE, "\x1f".join(parts)))


def test_a_part_that_holds_the_separator_gives_an_id_of_its_own():
    """("a\x1fb",) joined as ("a", "b") does: its id is of its parts as a JSON array instead."""
    assert stable_id("a\x1fb") == str(uuid.uuid5(ID_NAMESPACE, '["a\\u001fb"]')) != stable_id("a", "b")


def test_every_variant_digit_is_set_as_uuid5_sets_it():
    seen = set()
    for n in range(400):  # (each of the 16 digits the hash may give there, many times over)
        name = f"n{n}"
        h = hashlib.sha1(ID_NAMESPACE.bytes + name.encode()).hexdigest()
        seen.add(h[16])
        assert stable_id(name) == str(uuid.uuid5(ID_NAMESPACE, name))
    assert len(seen) == 16


@pytest.mark.parametrize("raw", [b"0", b"42", b"-7", b"+5", b" 12 ", b"\t3\n", b"1_000", b"007", b"-0", b"", b" ", b"1e3",
                                 b"0x10", b"1.0", b"1\x00", b"\xff", b"\xc3(", "١٢".encode(), "\uff11".encode(), b"\x1c1",
                                 "\u20031".encode(), b"-" + b"9" * 30])
def test_an_int_value_is_one_only_as_incr_writes_it(raw):
    """int() takes "+5", " 12 ", "1_000", "007" and other scripts' digits: each would arrive as a number
    whose text is not the value's. Only ASCII digits after a minus at most, no leading zero, decode."""
    if re.fullmatch(rb"0|-?[1-9][0-9]*", raw):
        assert decode(raw, "int") == int(raw) and type(decode(raw, "int")) is int
    else:
        with pytest.raises(BadRecord, match="is not an integer as INCR writes one|not valid UTF-8"):
            decode(raw, "int")


def test_the_tallies_count_as_setdefault_did():
    steps = [("a", "keys", 1), ("b", "skipped", 2), ("a", "keys", 3), ("a", "dead", 1), ("c", "keys", 0)]
    tally, counts, oracle, pattern_oracle = Tally(), PatternCounts(), {}, {}
    for name, what, n in steps:
        tally.add(name, what, n)
        oracle.setdefault(name, dict.fromkeys(FIELDS, 0))[what] += n
        outcome = "dead" if what == "dead" else "skipped"
        counts.add(name, outcome, n, rows=n)
        counts.note(name, "references", n)
        c = pattern_oracle.setdefault(name, dict.fromkeys(TALLY_FIELDS, 0))
        c["scanned"] += n
        c[outcome] += n
        c["rows"] += n
        c["references"] += n
    assert tally.patterns == oracle and list(tally.patterns) == ["a", "b", "c"]
    assert counts.by_pattern == pattern_oracle
