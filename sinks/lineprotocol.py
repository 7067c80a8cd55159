"""InfluxDB line protocol from columns. Pure: no I/O, no clocks.

Series keys are escaped once per distinct series (and cached across calls). Lines are written by
a C extension in one pass (``_lineformat.c``): each float with the fewest decimals, up to 6, whose
integer arithmetic gives it back exactly, else with 17 correctly rounded significant digits (from
1e-3 to 2^52) or as ``repr`` writes it; string fields dictionary-encoded, each distinct string
escaped once. Without a compiler at install time each line is assembled from fixed-width byte
matrices (one per piece: series key, each field, timestamp) plus a keep-mask; ``matrix[mask]`` then
yields the concatenated lines in one numpy operation; floats with few decimals are formatted with
integer arithmetic, zero-padded to one width per chunk, and only the remaining floats go through
``repr``. Either way every value parses back to the same float64.

Escaping follows the InfluxDB line protocol reference: measurement ``,`` and space; tag keys,
tag values and field keys ``,`` ``=`` and space; string field values ``"`` and ``\\``. Line
protocol cannot carry a newline in a key or tag value, nor a backslash before a special character
or at the end (a trailing one escapes the separator, and InfluxDB 1.x and 2.x disagree on
``\\\\``), so such rows are *rejected* with a reason instead of being mangled: nothing a
sensor id contains can inject a point or a tag.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, cast

import numpy as np
import numpy.typing as npt

from portpulse.arrays import factorise, factorise_column
from portpulse.contract.points import Categorical, PointColumns

__all__ = [
    "LINE_ENCODER",
    "PRECISION_NS",
    "Categorical",
    "EncodedLines",
    "PointColumns",
    "encode_lines",
    "escape_key",
    "escape_measurement",
    "escape_string_field",
    "one_field_per_line",
]

Precision = Literal["ns", "us", "ms", "s"]
PRECISION_NS: Mapping[str, int] = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}

_MAX_EXACT = float(2**53)
_MAX_DECIMALS = 6
_POW10 = 10 ** np.arange(19, dtype=np.int64)[::-1]  # 10^18 .. 10^0
_POW10_ASC = _POW10[::-1].copy()
# Item i: the four ASCII digits of i, zero-padded ("0042"), as one native uint32.
_DIGITS_4_U32 = np.frombuffer(b"".join(f"{i:04d}".encode() for i in range(10_000)), dtype=np.uint32)
_AMBIGUOUS_BACKSLASH = re.compile(r"\\(?=[\\ ,=\"]|$)")


@dataclass(frozen=True, slots=True)
class EncodedLines:
    """Encoded points: ``body`` holds one line per accepted row, each ending in ``\\n``.

    ``rows`` (int64, shape ``(k,)``) maps line j to its input row; ``line_ends`` (int64, ``(k,)``)
    is the offset just past line j's newline, so lines i..j are ``body[start_i:line_ends[j]]``.
    ``rejected`` maps an input row to the reason it could not be encoded.
    """

    body: bytes
    rows: npt.NDArray[np.int64]
    line_ends: npt.NDArray[np.int64]
    rejected: Mapping[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def line_slice(self, start: int, stop: int) -> bytes:
        """Bytes of lines ``start`` .. ``stop - 1``."""
        begin = 0 if start == 0 else int(self.line_ends[start - 1])
        return self.body[begin : int(self.line_ends[stop - 1])] if stop > start else b""


# ---------------------------------------------------------------- escaping (scalar, used on distinct values)


def escape_measurement(name: str) -> str:
    return name.replace(",", "\\,").replace(" ", "\\ ")


def escape_key(name: str) -> str:
    """Tag key, tag value or field key."""
    return name.replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def escape_string_field(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _bad_key(text: str) -> str | None:
    if "\n" in text or "\r" in text:  # two substring tests: no generator per key of a cold fleet
        return "newline in measurement, tag or field key/value"
    if "\\" in text and _AMBIGUOUS_BACKSLASH.search(text):
        # InfluxDB 1.x and 2.x read "\\," and "\\\\" differently; a trailing one would escape the separator.
        return "backslash before a special character or at the end of a measurement, tag or field key/value"
    return None


# ---------------------------------------------------------------- byte matrices


def _fixed_bytes(strings: list[bytes]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Left-aligned (n, w) uint8 matrix of ``strings`` and their lengths."""
    n = len(strings)
    width = max((len(s) for s in strings), default=0) or 1
    mat = np.frombuffer(np.array(strings, dtype=f"S{width}").tobytes(), dtype=np.uint8).reshape(n, width)
    lengths = np.fromiter(map(len, strings), dtype=np.int64, count=n)
    return mat, lengths


def _left_mask(lengths: npt.NDArray[np.int64], width: int) -> npt.NDArray[np.bool_]:
    return np.arange(width)[None, :] < lengths[:, None]


def _digits(magnitude: npt.NDArray[np.int64], width: int = 19) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Right-aligned, zero-padded decimal digits of non-negative int64 values.

    Returns the (n, width) ASCII matrix and each value's digit count (at least 1).
    """
    n = len(magnitude)
    mat = np.empty((n, width), dtype=np.uint8)
    top = int(magnitude.max()) if n else 0
    needed = min(len(str(top)), width)
    mat[:, : width - needed] = 48
    rest = magnitude
    # Four digits per division, looked up as one uint32 of text: a quarter of the (scalar,
    # libdivide) divisions and byte stores; the leading 1-3 digits one by one.
    col = width
    while col - 4 >= width - needed:
        rest, low = np.divmod(rest, 10_000)
        mat[:, col - 4 : col].view(np.uint32)[:, 0] = _DIGITS_4_U32[low]
        col -= 4
    while col > width - needed:
        rest, digit = np.divmod(rest, 10)
        mat[:, col - 1] = digit.astype(np.uint8) + 48
        col -= 1
    count = np.searchsorted(_POW10_ASC, magnitude, side="right").astype(np.int64)
    return mat, np.maximum(count, 1)


def _format_ints(values: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_] | None]:
    """Signed decimal of int64 values (above int64 min) as a right-aligned matrix and keep-mask
    (None: every byte kept)."""
    n = len(values)
    lo, hi = (int(values.min()), int(values.max())) if n else (0, 0)
    if lo >= 0 and len(str(hi)) == len(str(lo)):
        # Timestamps of one batch share their leading digits: format those once and only the
        # varying tail per row (about half the divisions for ns timestamps a few seconds apart).
        text_hi, text_lo = str(hi), str(lo)
        shared = next((i for i, (a, b) in enumerate(zip(text_hi, text_lo, strict=True)) if a != b), len(text_hi))
        tail = len(text_hi) - shared
        base = int(text_lo[:shared] + "0" * tail) if shared else 0
        out = np.empty((n, len(text_hi)), dtype=np.uint8)
        out[:, :shared] = np.frombuffer(text_lo[:shared].encode(), dtype=np.uint8)
        if tail:
            out[:, shared:] = _digits(values - base, tail)[0]
        return out, None
    neg = values < 0
    mat, count = _digits(np.abs(values))
    width = mat.shape[1] + 1
    out = np.empty((n, width), dtype=np.uint8)
    out[:, 1:] = mat
    out[:, 0] = ord("-")
    keep = np.arange(width)[None, :] >= (width - count)[:, None]
    keep[:, 0] = neg  # sign in column 0, then the right-aligned digits: mask order stays sign, digits
    return out, keep


def _common_decimals(values: npt.NDArray[np.float64]) -> int | None:
    """The fewest decimals (at most ``_MAX_DECIMALS``) that write every one of ``values`` exactly,
    or None."""
    for k in range(_MAX_DECIMALS + 1):
        scale = 10.0**k
        if np.array_equal(np.rint(values * scale) / scale, values):
            return k
    return None


def _most_decimals(values: npt.NDArray[np.float64], small: npt.NDArray[np.bool_]) -> tuple[int, npt.NDArray[np.bool_]]:
    """For ``values`` that need different numbers of decimals: the most that any ``small`` value
    written exactly needs, and which values some number up to ``_MAX_DECIMALS`` writes exactly."""
    n = len(values)
    scaled_ok = np.zeros(n, dtype=bool)
    k_needed = np.full(n, -1, dtype=np.int64)
    for k in range(_MAX_DECIMALS + 1):
        todo = small & ~scaled_ok
        if not todo.any():
            break
        m = np.rint(values[todo] * 10.0**k)
        exact = m / 10.0**k == values[todo]
        idx = np.flatnonzero(todo)[exact]
        scaled_ok[idx] = True
        k_needed[idx] = k
    return (int(k_needed[scaled_ok].max()) if scaled_ok.any() else 0), scaled_ok


def _format_floats(values: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_] | None]:
    """Finite float64 values as decimal text that parses back to exactly the same float64.

    Returns an (n, w) byte matrix and its keep-mask, None when every byte is kept.

    Values with at most ``_MAX_DECIMALS`` decimals (the usual sensor reading) take an integer
    path with one common number of decimals ``k`` for the batch; the rest use ``repr``.
    """
    n = len(values)
    small = np.abs(values) < _MAX_EXACT / 10**_MAX_DECIMALS
    common = _common_decimals(values if small.all() else values[small])
    if common is not None:  # the usual batch: one number of decimals writes every small value
        k, scaled_ok = common, small
    else:
        k, scaled_ok = _most_decimals(values, small)
    m_all = np.rint(np.where(scaled_ok, values, 0.0) * 10.0**k)
    fast = scaled_ok & (m_all / 10.0**k == values)
    m = m_all.astype(np.int64)
    neg = fast & ((m < 0) | ((m == 0) & np.signbit(values)))
    magnitude = np.abs(m)
    # Fixed width: zero-padded to the widest value, a sign column only when some value is
    # negative ("-012.50" / "0045.00"). InfluxDB's parser (and strconv.ParseFloat) read leading
    # zeros, and one width per chunk lets the lines be assembled without a per-byte keep-mask.
    total_digits = max(len(str(int(magnitude.max()))) if n else 1, k + 1)
    digits, _ = _digits(magnitude, total_digits)
    int_width = total_digits - k
    sign = 1 if neg.any() else 0
    width = sign + int_width + (1 + k if k else 0)
    out = np.empty((n, width), dtype=np.uint8)
    if sign:
        out[:, 0] = np.where(neg, ord("-"), ord("0"))
    out[:, sign : sign + int_width] = digits[:, :int_width]
    if k:
        out[:, sign + int_width] = ord(".")
        out[:, sign + int_width + 1 :] = digits[:, int_width:]
    slow = np.flatnonzero(~fast)
    if len(slow) == 0:
        return out, None
    text, lengths = _fixed_bytes([repr(v).encode() for v in values[slow].tolist()])
    full_mat = np.zeros((n, width + text.shape[1]), dtype=np.uint8)
    full_keep = np.zeros((n, width + text.shape[1]), dtype=bool)
    full_mat[:, :width] = out
    full_keep[:, :width] = fast[:, None]
    full_mat[slow, width:] = text
    full_keep[slow, width:] = _left_mask(lengths, text.shape[1])
    return full_mat, full_keep


# A piece of every line: a (m, w) byte matrix or one constant for all rows, with its keep-mask
# ((m, w), (m, 1) broadcast over the piece, or None: every byte kept).
_Piece = tuple[npt.NDArray[np.uint8] | bytes, npt.NDArray[np.bool_] | None]


def _assemble(pieces: list[_Piece], m: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_] | None]:
    """The pieces side by side: one (m, W) byte matrix and keep-mask (None when every byte is
    kept, the usual case: then the lines are the matrix itself), written in place (no hstack)."""
    widths = [len(data) if isinstance(data, bytes) else data.shape[1] for data, _ in pieces]
    line = np.empty((m, sum(widths)), dtype=np.uint8)
    masked = any(mask is not None for _, mask in pieces)
    keep = np.empty((m, sum(widths)), dtype=bool) if masked else None
    col = 0
    for (data, mask), w in zip(pieces, widths, strict=True):
        line[:, col : col + w] = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
        if keep is not None:
            keep[:, col : col + w] = True if mask is None else mask
        col += w
    return line, keep


# ---------------------------------------------------------------- series keys


def _factorise(column: npt.NDArray[np.object_] | Categorical, n: int) -> tuple[npt.NDArray[np.int64], list[object]]:
    if isinstance(column, Categorical):
        categories = column.categories.tolist()
        distinct = {value: i for i, value in enumerate(dict.fromkeys(categories))}
        if len(distinct) == len(categories):
            return column.codes.astype(np.int64, copy=False), categories
        # Repeated categories (e.g. a site per sensor): merge them so the series fold stays small.
        remap = np.fromiter(map(distinct.__getitem__, categories), dtype=np.int64, count=len(categories))
        return remap[column.codes], list(distinct)
    return factorise(column.tolist())


def _series_keys(points: PointColumns, n: int, rejected: dict[int, str]) -> tuple[list[bytes], npt.NDArray[np.int64]]:
    """Escaped ``measurement[,tag=value...]`` once per distinct series.

    Returns the distinct keys ``(k,)`` and each row's series index ``(n,)``; rows of
    unrepresentable series go to ``rejected``.
    """
    tag_names = sorted(points.tags)  # InfluxDB prefers tags sorted by key
    for name in tag_names:
        if reason := _bad_key(name):
            raise ValueError(f"tag key {name!r}: {reason}")
    measurement = points.measurement
    columns: list[npt.NDArray[np.object_] | Categorical] = []
    if isinstance(measurement, str):
        const_measurement: str | None = measurement
    else:
        const_measurement = None
        columns.append(measurement)
    columns.extend(points.tags[name] for name in tag_names)
    shared = _shared_codes(columns)
    if shared is not None:
        # Every column is a categorical over the same codes (the processors' sensor_id + site):
        # the codes already are the series, one key per category row.
        series = shared.astype(np.int64, copy=False)
        categories = [column.categories.tolist() for column in columns if isinstance(column, Categorical)]
        category_keys: list[tuple[object, ...]] = list(zip(*categories, strict=True))
        return _key_texts(category_keys, const_measurement, tag_names, series, rejected)
    # Factorise each column (dict hashing beats sorting strings; categoricals come factorised),
    # then fold the codes column by column, compressing after each so they never overflow.
    series = np.zeros(n, dtype=np.int64)
    keys: list[tuple[object, ...]] = [()]
    for column in columns:
        codes_col, values = _factorise(column, n)
        width = max(len(values), 1)
        folded = series * width + codes_col
        if len(keys) == 1:
            distinct, series = np.arange(width, dtype=np.int64), codes_col
        elif len(keys) * width <= 8 * n:  # dense table: O(n), no sort
            seen = np.zeros(len(keys) * width, dtype=bool)
            seen[folded] = True
            distinct = np.flatnonzero(seen)
            remap = np.cumsum(seen) - 1
            series = remap[folded]
        else:
            distinct, inverse = np.unique(folded, return_inverse=True)
            series = inverse.astype(np.int64, copy=False).reshape(n)
        keys = [(*keys[d // width], values[d % width]) for d in distinct.tolist()]
    return _key_texts(keys, const_measurement, tag_names, series, rejected)


def _shared_codes(columns: list[npt.NDArray[np.object_] | Categorical]) -> npt.NDArray[np.int64] | None:
    """The codes array when every column is a categorical over that same array, else None."""
    if not columns or not all(isinstance(c, Categorical) for c in columns):
        return None
    first = columns[0]
    assert isinstance(first, Categorical)
    if all(isinstance(c, Categorical) and c.codes is first.codes for c in columns):
        return first.codes
    return None


# Escaped series keys per (escaped tag names, measurement or None when it is a column), by the
# series' values ((*tag values) or (measurement, *tag values)); unusable ones apart, with the
# reason. A processor writes the same sensors batch after batch, and escaping + checking each key
# costs microseconds in Python; keying by the values alone hashes one short tuple per series.
_KEY_CACHE: dict[
    tuple[tuple[str, ...], str | None], tuple[dict[tuple[object, ...], bytes], dict[tuple[object, ...], str]]
] = {}
_KEY_CACHE_MAX = 500_000


def _key_text(full: tuple[object, ...], escaped_tag_names: tuple[str, ...]) -> tuple[bytes, str | None]:
    """``measurement,tag=value...`` for ``full`` = (measurement, *tag values), and why it is unusable (or None)."""
    m, values = full[0], full[1:]
    parts: list[str] = []
    reason = None
    if not isinstance(m, str) or not m:
        reason = "measurement must be a non-empty string"
    else:
        reason = _bad_key(m)
        parts.append(escape_measurement(m))
    for tag, value in zip(escaped_tag_names, values, strict=True):
        if value is None or value == "":
            continue  # InfluxDB has no empty tag values: the tag is absent on this row
        if not isinstance(value, str):
            reason = reason or f"tag {tag} is not a string"
            continue
        reason = reason or _bad_key(value)
        parts.append(f"{tag}={escape_key(value)}")
    return ",".join(parts).encode(), reason


def _key_texts(
    keys: list[tuple[object, ...]],
    const_measurement: str | None,
    tag_names: list[str],
    series: npt.NDArray[np.int64],
    rejected: dict[int, str],
) -> tuple[list[bytes], npt.NDArray[np.int64]]:
    """Escaped key text per distinct series ``keys[i]`` (measurement first unless constant), and
    ``series``."""
    escaped_tag_names = tuple(escape_key(t) for t in tag_names)
    if sum(len(good) + len(bad) for good, bad in _KEY_CACHE.values()) > _KEY_CACHE_MAX:
        _KEY_CACHE.clear()
    good, bad = _KEY_CACHE.setdefault((escaped_tag_names, const_measurement), ({}, {}))
    # Known keys are looked up in C (map); only new ones are built.
    found = list(map(good.get, keys))
    bad_series: dict[int, str] = {}
    if None in found:
        for i in [i for i, text in enumerate(found) if text is None]:
            reason = bad.get(keys[i])
            if reason is None:
                full = keys[i] if const_measurement is None else (const_measurement, *keys[i])
                text, reason = _key_text(full, escaped_tag_names)
                if reason is None:
                    found[i] = good[keys[i]] = text
                    continue
                bad[keys[i]] = reason
            bad_series[i] = reason
            found[i] = b""
    texts = cast(list[bytes], found)
    if bad_series:
        bad_codes = np.fromiter(bad_series, dtype=np.int64)
        for row in np.flatnonzero(np.isin(series, bad_codes)).tolist():
            rejected[row] = bad_series[int(series[row])]
    return texts, series


# ---------------------------------------------------------------- public


def _compiled_encode() -> Callable[..., tuple[bytes, bytearray]] | None:
    try:
        from portpulse.sinks._lineformat import encode
    except ImportError:  # installed where no C compiler was at hand: numpy writes every line
        return None
    return encode


_COMPILED_ENCODE = _compiled_encode()
#: the line-protocol encoder this install runs: "compiled" or "numpy" (logged at start-up)
LINE_ENCODER = "numpy" if _COMPILED_ENCODE is None else "compiled"

#: Rows per assembly chunk: keeps the byte matrices in cache and their memory reused.
CHUNK_ROWS = 32_768


def encode_lines(points: PointColumns, precision: Precision = "ns") -> EncodedLines:
    """Encode ``points`` as line protocol with timestamps in ``precision`` (floored).

    Rows that cannot be represented (bad keys, no field left) are listed in ``rejected`` with
    a reason; all other rows become exactly one line each, in input order. Written by the
    compiled encoder when it is built, else by numpy (both write every value exactly; their texts
    differ: numpy pads a chunk's values to one width)."""
    return _encode(points, precision, compiled=_COMPILED_ENCODE is not None)


def _encode(points: PointColumns, precision: Precision, compiled: bool) -> EncodedLines:
    """:func:`encode_lines`, through the compiled encoder when ``compiled``."""
    n = len(points)
    if n == 0:
        return EncodedLines(b"", np.empty(0, np.int64), np.empty(0, np.int64))
    if not points.fields:
        raise ValueError("a point needs at least one field")
    field_names = sorted(points.fields)
    for name in field_names:
        if reason := _bad_key(name):
            raise ValueError(f"field key {name!r}: {reason}")
    rejected: dict[int, str] = {}
    key_texts, series = _series_keys(points, n, rejected)
    divisor = PRECISION_NS[precision]
    ts_all = points.ts_ns.astype(np.int64, copy=False)
    if divisor != 1:
        ts_all = np.floor_divide(ts_all, divisor)
    accepted = np.ones(n, dtype=bool)
    if rejected:
        accepted[np.fromiter(rejected, dtype=np.int64)] = False
    lines = _Lines(points, field_names, key_texts, series, ts_all, accepted, rejected)
    if compiled:
        return _encode_compiled(lines)
    return _encode_numpy(lines)


class _Lines(NamedTuple):
    """What both encoders start from: the points, their sorted field names, each distinct
    series' key text ``(k,)`` and each row's series ``(n,)``, timestamps in the precision
    ``(n,)``, the rows still accepted ``(n,)`` and the reasons of those that are not (filled in)."""

    points: PointColumns
    field_names: list[str]
    key_texts: list[bytes]
    series: npt.NDArray[np.int64]
    ts: npt.NDArray[np.int64]
    accepted: npt.NDArray[np.bool_]
    rejected: dict[int, str]


def _encode_compiled(lines: _Lines) -> EncodedLines:
    """:func:`encode_lines` in one C pass (``_lineformat.c``): float columns as they are, string
    columns dictionary-encoded (each distinct string escaped once)."""
    assert _COMPILED_ENCODE is not None
    points, field_names, key_texts, series, ts, accepted, rejected = lines
    any_field = np.zeros(len(points), dtype=bool)
    columns: list[npt.NDArray[np.float64] | tuple[npt.NDArray[np.int64], tuple[bytes, ...]]] = []
    for name in field_names:
        column = points.fields[name]
        if column.dtype == np.object_:
            codes, texts = _string_codes(cast(npt.NDArray[np.object_], column))
            any_field |= codes >= 0
            columns.append((codes, texts))
        else:
            floats = np.ascontiguousarray(column, dtype=np.float64)
            any_field |= np.isfinite(floats)
            columns.append(floats)
    for row in np.flatnonzero(~any_field).tolist():
        rejected.setdefault(row, "no finite field value")
    accepted &= any_field
    key_ends = np.cumsum(np.fromiter(map(len, key_texts), dtype=np.int64, count=len(key_texts)))
    body, line_ends = _COMPILED_ENCODE(
        b"".join(key_texts),
        key_ends,
        np.ascontiguousarray(series, dtype=np.int64),
        np.ascontiguousarray(ts, dtype=np.int64),
        accepted.view(np.uint8),
        tuple(escape_key(name).encode() + b"=" for name in field_names),
        tuple(columns),
    )
    return EncodedLines(
        body=body,
        rows=np.flatnonzero(accepted).astype(np.int64),
        line_ends=np.frombuffer(line_ends, dtype=np.int64),
        rejected=dict(sorted(rejected.items())),
    )


def _string_codes(column: npt.NDArray[np.object_]) -> tuple[npt.NDArray[np.int64], tuple[bytes, ...]]:
    """A string field column ``(n,)`` as codes ``(n,)`` (-1 where None: no field) into the
    distinct strings' escaped texts."""
    codes, distinct = factorise_column(column)
    texts = tuple(b"" if value is None else escape_string_field(value).encode() for value in distinct)
    if None in distinct:
        codes = np.where(codes == distinct.index(None), -1, codes)
    return np.ascontiguousarray(codes, dtype=np.int64), texts


def _encode_numpy(lines: _Lines) -> EncodedLines:
    """:func:`encode_lines` by byte matrices, a chunk of rows at a time (any field type)."""
    points, field_names, key_texts, series, ts_all, accepted, rejected = lines
    n = len(points)
    key_mat, key_len = _fixed_bytes(key_texts)
    bodies: list[npt.NDArray[np.uint8]] = []
    line_lengths: list[npt.NDArray[np.int64]] = []
    has_strings = any(points.fields[name].dtype == np.object_ for name in field_names)
    for begin in range(0, n, CHUNK_ROWS):
        end = min(begin + CHUNK_ROWS, n)
        rows = slice(begin, end)
        m = end - begin
        codes = series[rows]
        chunk_key_len = key_len[codes]
        same_length = bool(chunk_key_len.min() == key_mat.shape[1])
        pieces: list[_Piece] = [(key_mat[codes], None if same_length else _left_mask(chunk_key_len, key_mat.shape[1]))]
        any_field = np.zeros(m, dtype=bool)
        for name in field_names:
            column = points.fields[name][rows]
            val_keep: npt.NDArray[np.bool_] | None
            if column.dtype == np.object_:
                items = column.tolist()
                present = np.fromiter((v is not None for v in items), dtype=bool, count=m)
                val_mat, lengths = _fixed_bytes(
                    [escape_string_field(v).encode() if v is not None else b"" for v in items]
                )
                val_keep = _left_mask(lengths, val_mat.shape[1])
            else:
                values = np.asarray(column, dtype=np.float64)
                present = np.isfinite(values)
                val_mat, val_keep = _format_floats(np.where(present, values, 0.0))
            all_present = bool(present.all())
            if not all_present:
                val_keep = present[:, None] if val_keep is None else val_keep & present[:, None]
            present_col = None if all_present else present[:, None]
            # Before the first field of a line a space, before the others a comma.
            if not any_field.any():
                first_char: npt.NDArray[np.uint8] | bytes = b" "
            elif any_field.all():
                first_char = b","
            else:
                first_char = np.where(any_field, ord(","), ord(" ")).astype(np.uint8)[:, None]
            any_field |= present
            pieces += [(first_char, present_col), (escape_key(name).encode() + b"=", present_col), (val_mat, val_keep)]
        ts_mat, ts_keep = _format_ints(ts_all[rows])
        pieces += [(b" ", None), (ts_mat, ts_keep), (b"\n", None)]
        for row in np.flatnonzero(~any_field).tolist():
            rejected.setdefault(begin + row, "no finite field value")
            accepted[begin + row] = False
        line, keep = _assemble(pieces, m)
        chunk_accepted = accepted[rows]
        if keep is None and chunk_accepted.all():
            bodies.append(line.reshape(-1))  # every line is one full row
            line_lengths.append(np.full(m, line.shape[1], dtype=np.int64))
            continue
        if keep is None:
            keep = np.ones(line.shape, dtype=bool)
        if not chunk_accepted.all():
            keep &= chunk_accepted[:, None]
        body = line[keep]
        bodies.append(body)
        if has_strings:  # a string field may hold a newline: count the kept bytes per row
            line_lengths.append(np.count_nonzero(keep, axis=1)[chunk_accepted].astype(np.int64))
        else:  # every line ends at its (only) newline
            ends = np.flatnonzero(body == ord("\n")) + 1
            line_lengths.append(np.diff(ends, prepend=0))
    kept = np.flatnonzero(accepted).astype(np.int64)
    return EncodedLines(
        body=b"".join(b.data for b in bodies),  # the buffers, joined without an intermediate copy
        rows=kept,
        line_ends=np.cumsum(np.concatenate(line_lengths)).astype(np.int64),
        rejected=dict(sorted(rejected.items())),
    )


def one_field_per_line(line: bytes) -> list[bytes]:
    """One line of line protocol (ending in ``\\n``) as one line per field, same key and time.

    How a point InfluxDB refused is narrowed to the field it refused (a type conflict is per
    field). Reads lines :func:`encode_lines` wrote: a backslash escapes the next byte, and a
    string field value is quoted."""
    body = line.rstrip(b"\n")
    pieces: list[bytes] = []  # series key, then each field; the timestamp follows the last space
    begin, i, quoted, after_key = 0, 0, False, False
    while i < len(body):
        c = body[i]
        if c == 0x5C:  # backslash
            i += 2
            continue
        if c == 0x22 and after_key:  # '"'
            quoted = not quoted
        elif not quoted and c == 0x20:  # ' ' ends the key, then the field set
            pieces.append(body[begin:i])
            begin = i + 1
            if after_key:
                break
            after_key = True
        elif not quoted and c == 0x2C and after_key:  # ',' between fields
            pieces.append(body[begin:i])
            begin = i + 1
        i += 1
    timestamp = body[begin:] if after_key and i < len(body) else b""
    if not after_key or i >= len(body):  # no timestamp: the rest is the last field
        pieces.append(body[begin:])
    key, fields = pieces[0], pieces[1:]
    tail = b" " + timestamp + b"\n" if timestamp else b"\n"
    return [key + b" " + f + tail for f in fields]
