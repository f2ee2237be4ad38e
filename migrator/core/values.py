"""Small pure parsers shared by transforms: datetimes, numbers, required fields, ids."""
from __future__ import annotations

import hashlib
import json
import uuid
from datetime import date, datetime, timezone, tzinfo
from decimal import Decimal
from typing import Any

from migrator.core.mapping import BadRecord

# Every deterministic id of the migrator lives under this namespace, so reruns reproduce ids.
ID_NAMESPACE = uuid.UUID("5d0c6f6e-2a53-5b1e-9a3c-6d2f7a1c0b11")
_NAMESPACE_SHA1 = hashlib.sha1(ID_NAMESPACE.bytes)  # copied per id: the namespace is hashed once
# The variant's hex digit for each digit the hash gave there (its two high bits set to 10).
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


# A UUID as text, any case (a key's id, a run's id).
UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"


def stable_id(*parts: str) -> str:
    """uuid5 of a natural key: the same source always gets the same row id.

    Computed as uuid.uuid5 does (RFC 4122 name-based, SHA-1), without building UUID objects:
    this runs once per row on the hot path. The version nibble becomes 5 and the variant's
    two high bits 10, set on the hex digits (the variant's by a table: parsing the digit cost more).
    """
    digest = _NAMESPACE_SHA1.copy()
    joined = "\x1f".join(parts)
    if joined.count("\x1f") > max(len(parts) - 1, 0):
        # a part holds the separator ("a\x1fb", "c" and "a", "b\x1fc" would join alike): spelt as a JSON
        # array instead, which holds no raw \x1f, so no id of a joined name's is made again
        joined = json.dumps(parts)
    digest.update(joined.encode())
    h = digest.hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


def parse_dt(value: Any, tz: tzinfo, *, field: str = "datetime") -> datetime | None:
    """Both spellings the app wrote (ISO with T, str(datetime) with a space) and epoch numbers.

    Naive values are taken to be in the source time zone; the result is always aware.
    """
    if isinstance(value, str):  # first: nearly every call
        if not value:
            return None
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise BadRecord(f"{field}: {value[:40]!r} is not an ISO or str(datetime) timestamp") from None
        # combine() is replace(tzinfo=tz) at half the cost: replace parses keywords
        return parsed if parsed.tzinfo else datetime.combine(parsed, parsed.time(), tz)
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRecord(f"{field}: expected a datetime, got a boolean")
    if isinstance(value, (int, float, Decimal)):
        return datetime.fromtimestamp(float(value), tz=timezone.utc)
    raise BadRecord(f"{field}: expected a datetime string, got {type(value).__name__}")


def parse_date(value: str, *, field: str = "date") -> date:
    try:
        return date.fromisoformat(value)
    except (TypeError, ValueError):
        raise BadRecord(f"{field}: {str(value)[:40]!r} is not a YYYY-MM-DD date") from None


def parse_int(value: Any, *, field: str = "value", default: int | None = None) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool):
        raise BadRecord(f"{field}: expected an integer, got a boolean")
    if isinstance(value, int):
        return value
    if integral(value):
        return int(value)
    if isinstance(value, (str, bytes)):
        try:
            return int(value)
        except ValueError:
            pass
    raise BadRecord(f"{field}: expected an integer, got {str(value)[:40]!r}")


def integral(value: Any) -> bool:
    """Whether a JSON number with a fraction or an exponent (a float, or a Decimal past a double: see
    jsoncodec) is a whole one; an infinity is not."""
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, Decimal) and value == value.to_integral_value()


def parse_number(value: Any, *, field: str = "value") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal, str)):
        raise BadRecord(f"{field}: expected a number, got {type(value).__name__}")
    try:
        return float(value)
    except ValueError:
        raise BadRecord(f"{field}: expected a number, got {str(value)[:40]!r}") from None


def parse_bool(value: Any, *, field: str = "flag", default: bool = False) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    raise BadRecord(f"{field}: expected true or false, got {str(value)[:40]!r}")


def require_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRecord(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def require(obj: dict[str, Any], name: str) -> Any:
    if obj.get(name) is None:
        raise BadRecord(f"required field {name!r} is missing or null")
    return obj[name]


def text_or_none(value: Any, *, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRecord(f"{field}: expected a string, got {type(value).__name__}")
    return value

