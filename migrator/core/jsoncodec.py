"""JSON as the app wrote it: every number read and written exactly.

orjson reads an integer beyond 64 bits as a double: `12345678901234567890123456781` became
`1.2345678901234568e+28`, was written so, and validated, both sides rounded alike (Python's own
json, which an app's `json.dumps` of such an integer is read back by, keeps it whole). msgspec's
decoder refuses what orjson refuses (the cases of tests/test_jsoncodec.py) at orjson's speed, and
keeps such an integer a Python int; orjson, the writer's encoder, refuses one, so `dumps` then
writes it as its digits, which PostgreSQL's jsonb and numeric keep whole. So with a number with a
fraction or an exponent that a double cannot hold (`12345678901234567.89`, a price or a rate written
with more digits than a double has): it is read as a Decimal, written as its digits.
"""
from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any, Callable

import msgspec
import orjson


def _number(text: str) -> float | Decimal:
    """A JSON number with a fraction or an exponent: a float when the float says the same number
    (what Python's and JavaScript's JSON write always does), else a Decimal of its digits."""
    number = float(text)
    if repr(number) == text:  # (the common case, at the cost of a comparison)
        return number
    if math.isinf(number):  # past a double's range: refused, as orjson refuses it
        raise ValueError("Number out of range")
    return number if Decimal(repr(number)) == Decimal(text) else Decimal(text)


_decode = msgspec.json.Decoder(float_hook=_number).decode
# orjson's own integer range: a row holding an int past it takes dumps' slow way
_INT_MIN, _INT_END = -(2**63), 2**64


class JSONDecodeError(ValueError):
    """The bytes are not one JSON document."""


def loads(raw: bytes | str) -> Any:
    """The JSON document `raw` holds; JSONDecodeError saying where it is not JSON."""
    try:
        return _decode(raw)
    except (msgspec.DecodeError, ValueError) as exc:  # (ValueError: _number's)
        raise JSONDecodeError(f"{exc}{_lenient(raw)}") from None
    except RecursionError:  # (orjson stops at a depth of 1,024 with an error of its own)
        raise JSONDecodeError("nested deeper than the recursion limit of Python") from None


def _lenient(raw: bytes | str) -> str:
    """Why a document JSON refuses is one Python's json module reads (and an app may have written
    with it), if it is: its NaN or infinity, or a lone UTF-16 surrogate. (No apostrophes: a
    reason's quoted parts are masked where it is shown.)"""
    found: list[str] = []
    huge: list[str] = []  # numbers past a double's range (1e400), which json.loads reads as infinity
    try:
        json.loads(raw, parse_constant=found.append, parse_float=lambda text: math.isinf(float(text)) and huge.append(text))
    except (ValueError, RecursionError):
        return ""
    if huge:
        return (f" (it holds {huge[0]}, past the range of a double: json.loads in Python reads it as infinity,"
                " for which JSON and jsonb in PostgreSQL have no number)")
    if found:
        return (f" (it holds {found[0]}: json.dumps in Python writes NaN and the infinities, for which JSON"
                " and jsonb in PostgreSQL have no number)")
    return (" (json.loads in Python reads it: it holds a lone UTF-16 surrogate, half of a pair, which no"
            " UTF-8 text and no jsonb in PostgreSQL can hold)")


def dumps(value: Any, option: int | None = None, default: Callable[[Any], Any] | None = None) -> bytes:
    """orjson.dumps of `value`, integers beyond 64 bits and Decimals included (as their digits); TypeError
    (orjson.JSONEncodeError) saying why for what it cannot write."""
    try:
        return orjson.dumps(value, default, option)
    except orjson.JSONEncodeError as exc:
        if "Recursion limit" in str(exc):
            raise orjson.JSONEncodeError(DEEP) from None
        if "64-bit" not in str(exc) and "Decimal" not in str(exc):
            raise
    try:
        exact = _exact(value)
    except RecursionError:  # (deeper than orjson writes anyway)
        raise orjson.JSONEncodeError(DEEP) from None
    return orjson.dumps(exact, default, option)


# orjson writes no document nested deeper (PostgreSQL's jsonb would hold one): such a key is a dead letter saying so
DEEP = "nested deeper than 255 levels, which orjson, the JSON encoder of the writer, does not write"


def _exact(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and not _INT_MIN <= value < _INT_END:
        return orjson.Fragment(int.__repr__(value).encode())
    if isinstance(value, Decimal):  # (only ever a finite one: _number's)
        return orjson.Fragment(str(value).encode())
    if isinstance(value, dict):
        return {k: _exact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_exact(v) for v in value]
    return value
