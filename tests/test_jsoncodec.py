"""migrator/core/jsoncodec.py: JSON read and written with every integer whole, refusing what orjson refuses."""
from __future__ import annotations

import json
from decimal import Decimal

import orjson
import pytest

from migrator.core import jsoncodec
from migrator.core.mapping import BadRecord
from migrator.core.source import decode

# What an app's bytes may hold that is not JSON: each refused by orjson, which the engine read with
# before, and so by jsoncodec (a value that was a dead letter stays one)
NOT_JSON = [b'"\xff"', b'\xef\xbb\xbf{"a":1}', b'{"a":1} x', b'"\xed\xa0\x80"', b"0123", b"1.", b".5", b'"\x01"',
            b'{"a":1,}', b"[1,]", b"NaN", b"Infinity", b"", b"  ", b'"\\x41"', b"[1e400]", b"{'a': 1}", b'{"a"}',
            b"[" * 5000 + b"]" * 5000]
# ... and what it may hold that is: read alike by both, but for integers past 64 bits
JSON = [b'"\\u0000"', b"1e308", b"-0", b"-0.0", b"1E+2", b'"\\ud83d\\ude00"', b' \t\n{"a" : [ ] }\r\n', b"5e-324",
        b"1.5e-7", b"0.1", b'{"a":1,"a":2}', b"18446744073709551615", b"-9223372036854775808", b'"a\\/b"', b"100000000000000000000.0"]


@pytest.mark.parametrize("raw", NOT_JSON, ids=lambda raw: repr(raw[:20]))
def test_what_orjson_refuses_is_refused_with_a_reason(raw):
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)
    with pytest.raises(jsoncodec.JSONDecodeError):
        jsoncodec.loads(raw)
    with pytest.raises(BadRecord, match="value is not valid JSON|not valid UTF-8"):
        decode(raw, "json")


@pytest.mark.parametrize("raw", JSON, ids=repr)
def test_what_orjson_reads_is_read_the_same(raw):
    got = jsoncodec.loads(raw)
    assert repr(got) == repr(orjson.loads(raw)) and jsoncodec.dumps(got) == orjson.dumps(orjson.loads(raw))


@pytest.mark.parametrize("text", [b"12345678901234567.89", b"0.1000000000000000055511151231257827", b"1e-400",
                                  b"-9007199254740993.0"])
def test_a_number_a_double_cannot_hold_is_read_as_its_digits_and_written_so(text):
    """orjson (and a float) rounds them: 12345678901234568, 0.1, 0.0. A number a double does hold is a float."""
    value = jsoncodec.loads(b'{"n": %s, "list": [%s, 1.5, 0.1, 2.50]}' % (text, text))
    assert value["n"] == Decimal(text.decode()) != orjson.loads(text) and value["list"][1:] == [1.5, 0.1, 2.5]
    assert jsoncodec.dumps(value) == b'{"n":%s,"list":[%s,1.5,0.1,2.5]}' % ((str(Decimal(text.decode())).encode(),) * 2)
    assert decode(text, "json") == Decimal(text.decode())


@pytest.mark.parametrize("number", [2**64, -(2**63) - 1, 12345678901234567890123456781, -(10**40)])
def test_an_integer_past_64_bits_is_read_and_written_as_the_app_wrote_it(number):
    raw = json.dumps({"n": number, "list": [number, 1.5, True, None]}).encode()
    assert isinstance(orjson.loads(raw)["n"], float)  # the rounding this module exists for
    value = jsoncodec.loads(raw)
    assert value == json.loads(raw) and value["n"] == number
    assert jsoncodec.dumps(value) == raw.replace(b" ", b"")
    assert jsoncodec.dumps(value, option=orjson.OPT_SORT_KEYS) == b'{"list":[%d,1.5,true,null],"n":%d}' % (number, number)
    assert jsoncodec.dumps((number, {1}), default=sorted) == b"[%d,[1]]" % number
    with pytest.raises(orjson.JSONEncodeError):  # what it cannot write either way, it still refuses
        jsoncodec.dumps([number, object()])


@pytest.mark.parametrize("raw, words", [(b'{"score": NaN}', "it holds NaN: json.dumps in Python writes"),
                                        (b'{"score": 1e400}', "it holds 1e400, past the range of a double"),
                                        (b"[1, -Infinity, Infinity]", "it holds -Infinity: json.dumps in Python writes"),
                                        (json.dumps({"name": "\ud800"}).encode(), "it holds a lone UTF-16 surrogate")])
def test_what_python_s_json_writes_and_json_refuses_is_named_in_the_reason(raw, words):
    with pytest.raises(BadRecord, match=f"value is not valid JSON: .*{words}") as refused:
        decode(raw, "json")
    assert "'" not in str(refused.value)  # (a reason's quoted parts are masked where it is shown)
    with pytest.raises(BadRecord) as plain:  # (not JSON at all: no such words)
        decode(b'{"score": Nan}', "json")
    assert "it holds" not in str(plain.value)


def test_a_document_nested_deeper_than_the_writer_writes_is_refused_saying_so():
    deep: object = 1
    for _ in range(600):
        deep = [deep]
    value = jsoncodec.loads(json.dumps({"n": 2**70, "deep": deep}))  # read: PostgreSQL's jsonb would hold it
    for each in (value, {"deep": deep}):
        with pytest.raises(orjson.JSONEncodeError, match="nested deeper than 255 levels"):
            jsoncodec.dumps(each)
