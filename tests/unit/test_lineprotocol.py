"""Line protocol encoding: property-tested by parsing the output back with a reference parser."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portpulse.sinks.lineprotocol import (
    LINE_ENCODER,
    Categorical,
    EncodedLines,
    PointColumns,
    Precision,
    _encode,
    one_field_per_line,
)

# Both encoders: the compiled one (one C pass) and the numpy one (byte matrices).
ENCODERS = ["compiled", "numpy"]


def encode_with(encoder: str, points: PointColumns, precision: Precision = "ns") -> EncodedLines:
    return _encode(points, precision, compiled=encoder == "compiled")


def test_the_compiled_encoder_is_built() -> None:
    assert LINE_ENCODER == "compiled", "sinks/_lineformat.c is not compiled (setup.py)"


def _split_unescaped(text: str, sep: str, quotes: bool = False) -> list[str]:
    """Split on ``sep`` not escaped by a backslash (the InfluxDB scanner's rule) and, with
    ``quotes``, not inside a double-quoted string field value."""
    parts, cur, i, quoted = [], [], 0, False
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i : i + 2])
            i += 2
            continue
        if quotes and c == '"':
            quoted = not quoted
        if c == sep and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _unescape(text: str, specials: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in specials:
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_line(line: str) -> tuple[str, dict[str, str], dict[str, float | str], int]:
    """Reference parser for the subset we emit (float and string fields)."""
    # The key ends at the first unescaped space (quotes mean nothing there); the timestamp is
    # the last space-separated token; the fields are in between.
    i = 0
    while line[i] != " ":
        i += 2 if line[i] == "\\" else 1
    key, rest = line[:i], line[i + 1 :]
    fields_text, _, ts = rest.rpartition(" ")
    key_parts = _split_unescaped(key, ",")
    measurement = _unescape(key_parts[0], ", ")
    tags = {}
    for part in key_parts[1:]:
        k, v = _split_unescaped(part, "=")
        tags[_unescape(k, ",= ")] = _unescape(v, ",= ")
    fields: dict[str, float | str] = {}
    for part in _split_unescaped(fields_text, ",", quotes=True):
        k, _, v = part.partition("=")
        name = _unescape(k, ",= ")
        fields[name] = _unescape(v[1:-1], '"\\') if v.startswith('"') else float(v)
    return measurement, tags, fields, int(ts)


# Hostile but representable text: commas, spaces, equals, quotes, backslashes (not trailing), unicode.
_hostile = st.text(alphabet=st.sampled_from(list('ab ,="\\=é€🚢xyz0')), min_size=1, max_size=12).filter(
    lambda s: not re.search(r"\\(?=[\\ ,=\"]|$)", s)
)
_floats = st.floats(allow_nan=False, allow_infinity=False, width=64)


def _obj(values: list[str | None]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            _hostile, _hostile, _hostile, _floats, st.one_of(_floats, st.just(math.nan)), st.integers(-(2**62), 2**62)
        ),
        min_size=1,
        max_size=40,
    ),
    strings=st.lists(st.one_of(st.none(), st.text(max_size=8).filter(lambda s: "\n" not in s and "\r" not in s))),
)
@pytest.mark.parametrize("with_strings", [True, False])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoded_lines_parse_back_to_the_input(
    rows: list[tuple[str, str, str, float, float, int]], strings: list[str | None], with_strings: bool, encoder: str
) -> None:
    n = len(rows)
    string_col = np.empty(n, dtype=object)
    string_col[:] = [strings[i] if i < len(strings) and with_strings else None for i in range(n)]
    floats = {"v,al": np.array([r[3] for r in rows]), "opt": np.array([r[4] for r in rows])}
    points = PointColumns(
        measurement=_obj([r[0] for r in rows]),
        tags={"sensor id": _obj([r[1] for r in rows]), "si=te": _obj([r[2] for r in rows])},
        fields=floats | {"note": string_col} if with_strings else floats,
        ts_ns=np.array([r[5] for r in rows], dtype=np.int64),
    )
    encoded = encode_with(encoder, points)
    assert encoded.rejected == {}
    lines = encoded.body.decode().split("\n")
    assert lines[-1] == ""
    assert len(lines) - 1 == n == len(encoded.rows)
    for i, line in enumerate(lines[:-1]):
        m, tags, fields, ts = parse_line(line)
        assert m == rows[i][0]
        assert tags == {"sensor id": rows[i][1], "si=te": rows[i][2]}
        expected: dict[str, float | str] = {"v,al": rows[i][3]}
        if not math.isnan(rows[i][4]):
            expected["opt"] = rows[i][4]
        if string_col[i] is not None:
            expected["note"] = string_col[i]
        assert fields == expected  # floats compare exactly: the text round-trips bit for bit
        assert ts == rows[i][5]
        assert encoded.line_slice(i, i + 1).decode() == line + "\n"
        # The writer's narrowing of a refused point: each field alone, same key and time.
        singles = [parse_line(one.decode().rstrip("\n")) for one in one_field_per_line((line + "\n").encode())]
        assert [(sm, st_, sts) for sm, st_, _, sts in singles] == [(m, tags, ts)] * len(expected)
        assert all(len(sf) == 1 for _, _, sf, _ in singles)
        assert {k: v for _, _, sf, _ in singles for k, v in sf.items()} == expected


# Sensor readings: a few decimals each (one common count writes them all), or any float.
readings = st.builds(round, st.floats(-1e6, 1e6), st.integers(0, 7))
any_float = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.lists(any_float, min_size=1, max_size=300), st.lists(readings, min_size=1, max_size=300),
                 st.lists(st.one_of(readings, any_float), min_size=1, max_size=300)))  # fmt: skip
def test_float_text_round_trips_exactly(values: list[float]) -> None:
    points = PointColumns("m", {}, {"v": np.array(values)}, np.arange(len(values), dtype=np.int64))
    for encoder in ENCODERS:
        lines = encode_with(encoder, points).body.decode().splitlines()
        texts = [line.split(" ")[1].removeprefix("v=") for line in lines]
        assert [float(t) for t in texts] == values, encoder
        assert all(math.copysign(1, float(t)) == math.copysign(1, v) for t, v in zip(texts, values, strict=True))


# Means, deviations, percentiles: full-precision values where the 17-digit path writes them.
aggregate_like = st.builds(lambda i, sign: sign * i / 997.0, st.integers(1, 10**15), st.sampled_from([1, -1])) | (
    # just below a power of ten, where log10 rounds up to it and 17 digits are one place further
    st.tuples(st.integers(-2, 15), st.integers(1, 40)).map(lambda pj: 10.0 ** pj[0] - pj[1] * math.ulp(10.0 ** pj[0]))
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(readings, any_float, aggregate_like), min_size=1, max_size=50))
def test_the_compiled_encoder_writes_the_fewest_decimals_or_17_digits_or_repr(values: list[float]) -> None:
    """Each value alone: with the fewest decimals (0-6) that give it back; else, from 1e-3 to 2^52,
    rounded correctly to 17 (at most 18) significant digits, trailing zeros dropped, which reads
    back as the value; else as repr writes it."""
    points = PointColumns("m", {}, {"v": np.array(values)}, np.arange(len(values), dtype=np.int64))
    texts = [
        line.split(" ")[1].removeprefix("v=") for line in encode_with("compiled", points).body.decode().splitlines()
    ]
    sign = {True: "-", False: ""}
    for text, v in zip(texts, values, strict=True):
        decimals = next((k for k in range(7) if abs(v) < 2**53 / 1e6 and round(v * 10**k) / 10**k == v), None)
        if decimals is not None:
            assert text == sign[math.copysign(1, v) < 0] + f"{abs(v):.{decimals}f}"
        elif 1e-3 <= abs(v) < 2**52:
            # v rounded correctly at the places written (no trailing zero), at most 18 digits
            places = len(text.partition(".")[2])
            assert text == sign[v < 0] + f"{abs(v):.{places}f}" and not (places and text.endswith("0")), (text, v)
            assert len(text.lstrip("-").replace(".", "").lstrip("0")) <= 18 and float(text) == v
        else:
            assert text == repr(v)


@pytest.mark.parametrize(
    ("sensor", "reason"),
    [
        ("evil\nair,sensor_id=x v=1 1", "newline"),
        ("carriage\rreturn", "newline"),
        ("ends-with\\", "backslash"),
        ("esc\\,aped", "backslash"),
    ],
)
@pytest.mark.parametrize("encoder", ENCODERS)
def test_unrepresentable_tag_values_are_rejected_not_injected(sensor: str, reason: str, encoder: str) -> None:
    points = PointColumns(
        "air",
        {"sensor_id": _obj(["ok-1", sensor, "ok-2"])},
        {"no2": np.array([1.0, 2.0, 3.0])},
        np.array([10, 20, 30], dtype=np.int64),
    )
    encoded = encode_with(encoder, points)
    assert list(encoded.rejected) == [1] and reason in encoded.rejected[1]
    assert encoded.body == b"air,sensor_id=ok-1 no2=1 10\nair,sensor_id=ok-2 no2=3 30\n"
    assert encoded.rows.tolist() == [0, 2]


@pytest.mark.parametrize("encoder", ENCODERS)
def test_rows_without_any_finite_field_are_rejected_and_empty_tags_omitted(encoder: str) -> None:
    """A row keeps its string field when its floats are absent; one with no field at all is rejected."""
    points = PointColumns(
        "air",
        {"site": _obj(["", "quai", "bassin"])},
        {
            "no2": np.array([np.nan, 5.5, np.nan]),
            "no2_reason": _obj([None, None, 'spike "x"']),
            "pm25": np.array([np.inf, np.nan, np.nan]),
        },
        np.array([1, 2, 3], dtype=np.int64),
    )
    encoded = encode_with(encoder, points)
    assert encoded.rejected == {0: "no finite field value"}
    assert encoded.body == b'air,site=quai no2=5.5 2\nair,site=bassin no2_reason="spike \\"x\\"" 3\n'
    assert encoded.rows.tolist() == [1, 2] and encoded.line_ends.tolist() == [24, len(encoded.body)]


@pytest.mark.parametrize("encoder", ENCODERS)
def test_shared_times_and_long_field_names_are_written_whole(encoder: str) -> None:
    """Times repeated, changed and repeated again (the compiled encoder reuses the last time's
    text), and field names on either side of its 16-byte short-name copy."""
    ts = np.array([0, 0, 1_764_000_000_000_000_000, 1_764_000_000_000_000_000, -7, 5], dtype=np.int64)
    names = ["a" * 15, "b" * 16, "c" * 17, "a_field_name_well_beyond_sixteen_bytes"]
    fields = {name: np.arange(len(ts), dtype=np.float64) + k / 4 for k, name in enumerate(names)}
    points = PointColumns("m", {"sensor_id": _obj(["s"] * len(ts))}, fields, ts)
    lines = encode_with(encoder, points).body.decode().splitlines()
    parsed = [parse_line(line) for line in lines]
    assert [p[3] for p in parsed] == ts.tolist()
    assert [p[2] for p in parsed] == [{name: i + k / 4 for k, name in enumerate(names)} for i in range(len(ts))]


@pytest.mark.parametrize(
    ("encoder", "body"),
    [
        ("numpy", b"air,sensor_id=s-b v=00.1 1\nair,sensor_id=s-a v=-2.0 2\nair,sensor_id=s-b v=3e-07 -1\n"),
        ("compiled", b"air,sensor_id=s-b v=0.1 1\nair,sensor_id=s-a v=-2 2\nair,sensor_id=s-b v=3e-07 -1\n"),
    ],
)
def test_categorical_tags_encode_like_plain_columns_and_precision_floors(encoder: str, body: bytes) -> None:
    names = _obj(["s-a", "s-b"])
    codes = np.array([1, 0, 1], dtype=np.int64)
    ts = np.array([1_500_000_001, 2_999_999_999, -1], dtype=np.int64)
    plain = PointColumns("air", {"sensor_id": names[codes]}, {"v": np.array([0.1, -2.0, 3e-7])}, ts)
    cat = PointColumns("air", {"sensor_id": Categorical(codes, names)}, plain.fields, ts)
    assert encode_with(encoder, plain, "s").body == encode_with(encoder, cat, "s").body == body


def test_floats_of_a_chunk_share_one_zero_padded_width_that_parses_back_exactly() -> None:
    values = np.array([5.5, 123.25, -0.5, 0.0, -0.0, 1e9])
    points = PointColumns("m", {}, {"v": values}, np.arange(len(values), dtype=np.int64))
    lines = encode_with("numpy", points).body.decode().splitlines()
    texts = [line.split(" ")[1].removeprefix("v=") for line in lines]
    assert texts == ["00000000005.50", "00000000123.25", "-0000000000.50", "00000000000.00", "-0000000000.00",
                     "01000000000.00"]  # fmt: skip
    parsed = np.array([float(t) for t in texts])
    assert parsed.tolist() == values.tolist()
    assert np.signbit(parsed).tolist() == np.signbit(values).tolist()


@pytest.mark.parametrize("encoder", ENCODERS)
def test_many_rows_cross_chunk_boundaries(encoder: str) -> None:
    n = 40_000
    rng = np.random.default_rng(7)
    values = rng.normal(40, 5, n).round(1)
    ts = 1_700_000_000_000_000_000 + np.arange(n, dtype=np.int64) * 1_000_000
    sensors = _obj([f"no2-{i % 97}" for i in range(n)])
    encoded = encode_with(encoder, PointColumns("air", {"sensor_id": sensors}, {"no2": values}, ts))
    lines = encoded.body.decode().splitlines()
    assert len(lines) == n
    for i in (0, 16_383, 16_384, 32_768, n - 1):
        text = lines[i].split("=")[2].split(" ")[0]
        assert lines[i] == f"air,sensor_id=no2-{i % 97} no2={text} {ts[i]}"
        assert float(text) == values[i]
    assert encoded.line_slice(5, 7) == ("\n".join(lines[5:7]) + "\n").encode()
