"""JSON as the app wrote it: every number read and written exactly.

orjson reads an integer beyond 64 bits as a double: `12345678901234567890123456781` became
`1.2345678901234568e+28`, was written so, and validated, both sides rounded alike (Python's own
json, which an app's `json.dumps` of such an integer is read back by, keeps it whole). msgspec's
decoder refuses what orjson refuses (the cases of tests/test_jsoncodec.py) at orjson's speed, and
keeps such an integer a Python int; orjson, the writer's encoder, refuses one, so `dumps` then
writes it as its digits, which PostgreSQL's jsonb and numeric keep whole.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import msgspec
import orjson

_decode = msgspec.json.Decoder().decode
# orjson's own integer range: a row holding an int past it takes dumps' slow way
_INT_MIN, _INT_END = -(2**63), 2**64


class JSONDecodeError(ValueError):
    """The bytes are not one JSON document."""


def loads(raw: bytes | str) -> Any:
    """The JSON document `raw` holds; JSONDecodeError saying where it is not JSON."""
    try:
        return _decode(raw)
    except msgspec.DecodeError as exc:
        constant = _constant(raw)
        raise JSONDecodeError(f"{exc}" + (f" (it holds {constant}: Python's json.dumps writes NaN and the infinities,"
                                         " which JSON and PostgreSQL's jsonb have no number for)" if constant else "")) from None
    except RecursionError:  # (orjson stops at a depth of 1,024 with an error of its own)
        raise JSONDecodeError("nested deeper than Python's recursion limit") from None


def _constant(raw: bytes | str) -> str | None:
    """The first NaN, Infinity or -Infinity of a document that Python's json reads only for them."""
    found: list[str] = []
    try:
        json.loads(raw, parse_constant=lambda name: found.append(name))
    except (ValueError, RecursionError):
        return None
    return found[0] if found else None


def dumps(value: Any, option: int | None = None, default: Callable[[Any], Any] | None = None) -> bytes:
    """orjson.dumps of `value`, integers beyond 64 bits included (as their digits)."""
    try:
        return orjson.dumps(value, default, option)
    except orjson.JSONEncodeError:  # (anything else it refuses, it refuses again)
        return orjson.dumps(_exact(value), default, option)


def _exact(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and not _INT_MIN <= value < _INT_END:
        return orjson.Fragment(int.__repr__(value).encode())
    if isinstance(value, dict):
        return {k: _exact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_exact(v) for v in value]
    return value
