"""Value conversion shared by the backends and the migrator (no store needed)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pytest

from govdb.convert import (
    EPOCH, dump_json, format_timestamp, legacy_uuid, normalise_timestamp, parse_timestamp,
    read_bool, read_float, read_int, read_json, read_json_list, read_json_object,
    read_opt_timestamp, read_str_list, read_timestamp,
)

UTC = timezone.utc
T = datetime(2025, 11, 26, 1, 15, 29, 222120, tzinfo=UTC)


@pytest.mark.parametrize("dt,text", [
    (T, "2025-11-26T01:15:29.222120+00:00"),
    (T.replace(microsecond=0), "2025-11-26T01:15:29.000000+00:00"),
    (datetime(2025, 11, 25, 18, 15, 29, tzinfo=timezone(timedelta(hours=-7))), "2025-11-26T01:15:29.000000+00:00"),
    (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00.000000+00:00"),
])
def test_format_timestamp(dt, text):
    assert format_timestamp(dt) == text
    assert parse_timestamp(text) == dt


def test_format_timestamp_refuses_naive():
    with pytest.raises(ValueError, match="naive"):
        format_timestamp(datetime(2025, 1, 1))


def test_formatted_text_sorts_in_time_order():
    times = [T - timedelta(days=400), T - timedelta(microseconds=1), T, T + timedelta(hours=30)]
    assert sorted(format_timestamp(t) for t in reversed(times)) == [format_timestamp(t) for t in times]


@pytest.mark.parametrize("text,expected", [
    ("2025-11-26T01:15:29.222120", T),
    ("2025-11-26T01:15:29.222120+00:00", T),
    ("2025-11-26T01:15:29.222120Z", T),
    ("  2025-11-26T01:15:29.222120Z\n", T),
    ("2025-11-26 01:15:29", T.replace(microsecond=0)),
    ("2025-11-26T01:15:29Z", T.replace(microsecond=0)),
    ("2025-11-26 01:15:29 UTC", T.replace(microsecond=0)),
    ("2025-11-25T18:15:29-07:00", T.replace(microsecond=0)),
    ("2025-11-26T03:15:29.222120+02:00", T),
    ("2025-11-26", datetime(2025, 11, 26, tzinfo=UTC)),
    ("1764119729", T.replace(microsecond=0)),
    ("1764119729.22212", T),
    (1764119729, T.replace(microsecond=0)),
    (1764119729.5, T.replace(microsecond=500000)),
    ("0", EPOCH),
    ("-86400", EPOCH - timedelta(days=1)),
    (b"2025-11-26T01:15:29.222120", T),
])
def test_parse_timestamp_reads_legacy_forms(text, expected):
    got = parse_timestamp(text)
    assert got == expected
    assert got.utcoffset() == timedelta(0)


def test_parse_timestamp_naive_zone_is_configurable():
    got = parse_timestamp("2025-11-25T18:15:29", naive_tz=timezone(timedelta(hours=-7)))
    assert got == T.replace(microsecond=0) and got.tzinfo == UTC


def test_parse_timestamp_none_is_none():
    assert parse_timestamp(None) is None


@pytest.mark.parametrize("bad", ["", "   ", "yesterday", "2025-13-01T00:00:00", "2025-11-26T25:00:00",
                                 "nan", "1e400", float("nan"), float("inf"), 10**20, True, [2025]])
def test_parse_timestamp_refuses_garbage(bad):
    with pytest.raises(ValueError, match="timestamp|epoch"):
        parse_timestamp(bad)


def test_read_timestamp_never_raises():
    assert read_timestamp("garbage") == EPOCH
    assert read_timestamp(None) == EPOCH
    assert read_timestamp("", default=T) == T
    assert read_timestamp("2025-11-26T01:15:29.222120") == T


def test_read_opt_timestamp():
    assert read_opt_timestamp(None) is None
    assert read_opt_timestamp("  ") is None
    assert read_opt_timestamp("garbage") == EPOCH
    assert read_opt_timestamp("2025-11-26T01:15:29.222120Z") == T


def test_normalise_timestamp_orders_mixed_forms():
    mixed = ["2025-11-26 01:15:30", "2025-11-26T01:15:29.222120", "1764119728", "2025-11-25T18:15:31-07:00"]
    assert sorted(mixed, key=normalise_timestamp) == [
        "1764119728", "2025-11-26T01:15:29.222120", "2025-11-26 01:15:30", "2025-11-25T18:15:31-07:00"]
    assert normalise_timestamp("junk") == "1970-01-01T00:00:00.000000+00:00"


def test_dump_json_keeps_utf8_and_refuses_nan():
    assert dump_json({"k": "энтропия"}) == '{"k": "энтропия"}'
    with pytest.raises(ValueError):
        dump_json({"x": math.nan})


@pytest.mark.parametrize("text,default,expected", [
    ('{"a": 1}', {}, {"a": 1}),
    ("[1, 2]", [], [1, 2]),
    (None, {}, {}),
    ("null", {}, {}),
    ("{broken", {}, {}),
    ("", [], []),
    (b'{"a": "\\u00e9"}', {}, {"a": "é"}),
    ('{"a": NaN, "b": [Infinity]}', {}, {"a": None, "b": [None]}),
    ("[" * 100_000 + "]" * 100_000, [], []),
    (42, {}, {}),
])
def test_read_json_is_tolerant(text, default, expected):
    assert read_json(text, default) == expected


def test_read_json_kinds():
    assert read_json_object("[1]") == {} and read_json_object('{"x": null}') == {"x": None}
    assert read_json_list('{"a": 1}') == [] and read_json_list('["a", 1]') == ["a", 1]
    assert read_str_list('["a", 1, null, "b"]') == ["a", "b"]
    assert read_json_object('{"nul": "a\\u0000b"}') == {"nul": "a\x00b"}


@pytest.mark.parametrize("value,expected", [
    (1.5, 1.5), (2, 2.0), ("0.25", 0.25), (None, None), ("x", None), (math.nan, None),
    (math.inf, None), (True, None), (b"3", 3.0),
])
def test_read_float(value, expected):
    assert read_float(value) == expected


def test_read_int():
    assert (read_int(7), read_int(7.9), read_int("12"), read_int(None), read_int("x")) == (7, 7, 12, None, None)


@pytest.mark.parametrize("value,expected", [
    (1, True), (0, False), (2, True), (0.0, False), ("1", True), ("0", False), ("true", True),
    ("FALSE", False), (" yes ", True), ("off", False), (b"1", True), ("2", True), ("0.0", False),
    (None, None), ("maybe", None), (math.nan, None),
])
def test_read_bool(value, expected):
    assert read_bool(value) is expected


def test_read_bool_default():
    assert read_bool(None, True) is True and read_bool("maybe", False) is False


def test_legacy_uuid_is_stable_and_distinct():
    a = legacy_uuid("audit_events", 7)
    assert a == legacy_uuid("audit_events", 7)
    assert a != legacy_uuid("tool_usage", 7) and a != legacy_uuid("audit_events", 8)
    assert len(a) == 36
