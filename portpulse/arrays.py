"""Sorting primitives shared by the kernels: pure numpy (and one compiled half, ``_arrays.c``), no I/O."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from itertools import pairwise
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = [
    "FACTORISER",
    "KeyIndex",
    "code_groups",
    "distinct_codes",
    "factorise",
    "factorise_column",
    "group_starts",
    "pair_lines",
    "stable_order",
    "stable_sort",
]

H = TypeVar("H", bound=Hashable)


def _compiled() -> tuple[
    Callable[[list[Any]], tuple[bytearray, list[Any]]] | None,
    Callable[[Any], tuple[bytearray, bytearray]] | None,
    Callable[[Any, Any], tuple[bytearray, bytearray] | None] | None,
    tuple[Callable[[Any, Any, Any, int], None], Callable[[Any, Any, Any], bytearray]] | None,
]:
    try:
        from portpulse._arrays import distinct_codes, factorise, key_slots_find, key_slots_put, pair_lines
    except ImportError:  # installed where no C compiler was at hand: dicts, maps and sorts do it
        return None, None, None, None
    return factorise, distinct_codes, pair_lines, (key_slots_put, key_slots_find)


_COMPILED_FACTORISE, _COMPILED_DISTINCT_CODES, _COMPILED_PAIR_LINES, _COMPILED_KEY_SLOTS = _compiled()
#: what factorises names: "compiled" or "python" (logged at start-up)
FACTORISER = "python" if _COMPILED_FACTORISE is None else "compiled"


class KeyIndex:
    """Distinct int64 keys, each with its row: the order it was added in (``keys[row]``). Compiled
    (``_arrays.c``), an open-addressing hash table at most a quarter full after it grows, so a
    lookup is about one probe; otherwise a binary search over a sorted copy. A processor resolves
    every reading's series key through one, each step."""

    def __init__(self) -> None:
        self.keys = np.empty(0, dtype=np.int64)
        # compiled: the table's keys and rows (row -1: an empty slot); numpy: the sorted keys and rows
        self._slot_key = self._slot_row = np.empty(0, dtype=np.int64)
        self._sorted: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, key: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The row of each of ``key`` ``(n,)``, -1 where it is not held; int64 ``(n,)``."""
        if not len(self.keys):
            return np.full(len(key), -1, dtype=np.int64)
        if _COMPILED_KEY_SLOTS is not None:
            rows = _COMPILED_KEY_SLOTS[1](self._slot_key, self._slot_row, np.ascontiguousarray(key, dtype=np.int64))
            return np.frombuffer(rows, dtype=np.int64)
        if self._sorted is None:
            order = np.argsort(self.keys, kind="stable")
            self._sorted = self.keys[order], order
        ordered, row = self._sorted
        at = np.minimum(np.searchsorted(ordered, key), len(ordered) - 1)
        return np.where(ordered[at] == key, row[at], -1)

    def add(self, key: npt.NDArray[np.int64]) -> None:
        """Hold ``key`` ``(m,)`` too: distinct keys not held yet, rows ``len(self)`` onwards."""
        start = len(self.keys)
        self.keys = np.concatenate([self.keys, np.asarray(key, dtype=np.int64)])
        self._place(start)

    def keep(self, rows: npt.NDArray[np.bool_]) -> None:
        """Hold only the keys where ``rows`` (bool ``(len(self),)``) is true, renumbered in order."""
        self.keys = self.keys[rows]
        self._slot_key = self._slot_row = np.empty(0, dtype=np.int64)
        self._place(0)

    def _place(self, start: int) -> None:
        """The keys from row ``start`` into the lookup structure."""
        self._sorted = None
        if _COMPILED_KEY_SLOTS is None:
            return
        n = len(self.keys)
        if not len(self._slot_key) or 2 * n > len(self._slot_key):  # grown fourfold, re-filled: O(1) a key
            size = 1 << max(4, (4 * n - 1).bit_length())
            self._slot_key = np.zeros(size, dtype=np.int64)
            self._slot_row = np.full(size, -1, dtype=np.int64)
            start = 0
        _COMPILED_KEY_SLOTS[0](self._slot_key, self._slot_row, self.keys[start:], start)


def factorise(items: Sequence[H]) -> tuple[npt.NDArray[np.int64], list[H]]:
    """Codes ``(n,)`` of hashable items (strings: sensor ids, sites, metrics) and the distinct items
    they index, in first-seen order. Hashing beats sorting strings. Compiled (``_arrays.c``): one
    pass that finds most items by identity (a batch repeats the same name objects). Otherwise the
    loops run in C through a dict and map; one distinct item, the usual case for a batch's domain
    or site, needs no dict at all."""
    if _COMPILED_FACTORISE is not None:
        codes, distinct = _COMPILED_FACTORISE(items if isinstance(items, list) else list(items))
        return np.frombuffer(codes, dtype=np.int64), distinct
    if items and items.count(items[0]) == len(items):  # one object or equal ones (identity first: fast)
        return np.zeros(len(items), dtype=np.int64), [items[0]]
    table = {item: code for code, item in enumerate(dict.fromkeys(items))}
    return np.fromiter(map(table.__getitem__, items), dtype=np.int64, count=len(items)), list(table)


def factorise_column(column: npt.NDArray[np.object_]) -> tuple[npt.NDArray[np.int64], list[Any]]:
    """:func:`factorise` of an object array ``(n,)``. Where equal items come in runs (a report's
    metrics share its sensor, site and domain) each run is hashed once: comparing neighbours (an
    identity check for the decoder's shared name objects) costs less than hashing every item.
    The compiled factoriser finds such items by identity itself: it takes the whole column."""
    n = len(column)
    if n < 4 or _COMPILED_FACTORISE is not None:  # the compiled pass finds a run's items by identity
        return factorise(column.tolist())
    starts = np.flatnonzero(column[1:] != column[:-1]) + 1
    if len(starts) * 2 > n:  # mostly runs of one: hash every item
        return factorise(column.tolist())
    starts = np.concatenate(([0], starts))
    codes, distinct = factorise(column[starts].tolist())
    return np.repeat(codes, np.diff(np.append(starts, n))), distinct


def stable_order(key: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The stable ascending order of ``key`` (int64 ``(n,)``): ties keep their input order.

    When ``(key - min)`` and the row index fit in 63 bits together, they are packed into one
    int64 and sorted by value: numpy's SIMD sort of int64 is about 5x faster than a stable
    argsort, and the index in the low bits makes it stable. Otherwise ``argsort(kind="stable")``.
    """
    return stable_sort(key)[0]


def stable_sort(key: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """:func:`stable_order` of ``key`` and ``key`` in that order (read off the packed values when
    packed, which saves a random gather)."""
    n = len(key)
    if n == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    lo = int(key.min())
    span = int(key.max()) - lo
    index_bits = max(n - 1, 1).bit_length()
    if span.bit_length() + index_bits > 63:
        order = np.argsort(key, kind="stable").astype(np.int64, copy=False)
        return order, key[order]
    packed = (key - lo) << index_bits
    packed |= np.arange(n, dtype=np.int64)
    packed.sort()
    ordered_key = packed >> index_bits
    ordered_key += lo
    packed &= (1 << index_bits) - 1
    return packed, ordered_key


#: Distinct codes at most for :func:`code_groups` to take one comparison pass per code.
_FEW_CODES = 16


def code_groups(code: npt.NDArray[np.int64]) -> list[tuple[int, npt.NDArray[np.int64]]]:
    """The rows of each distinct value of ``code`` (int64 ``(n,)``, values >= 0): ``(value, rows)``
    by ascending value, rows ascending (what a stable sort by ``code`` then cutting at the group
    starts gives). A few distinct values (a step's domains, a domain's metrics) take one
    comparison pass each instead of the sort."""
    if not len(code):
        return []
    top = int(code.max()) + 1
    if top <= 4 * _FEW_CODES or top <= len(code):
        present = np.flatnonzero(np.bincount(code, minlength=top))
        if len(present) <= _FEW_CODES:
            return [(value, np.flatnonzero(code == value)) for value in present.tolist()]
    order, ordered = stable_sort(code)
    starts = group_starts(ordered)
    bounds = np.append(starts, len(order)).tolist()
    return [(int(ordered[a]), order[a:b]) for a, b in pairwise(bounds)]


def group_starts(sorted_key: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Index of the first row of each run of equal values in ``sorted_key`` (``(g,)``, ascending)."""
    if len(sorted_key) == 0:
        return np.empty(0, dtype=np.int64)
    change = np.empty(len(sorted_key), dtype=bool)
    change[0] = True
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=change[1:])
    return np.flatnonzero(change)


def distinct_codes(key: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The distinct values of ``key`` (int64 ``(n,)``) in order of first appearance: the row of
    each one's first occurrence ``(g,)`` and every row's code ``(n,)`` (index into those rows).
    ``np.unique(..., return_index=True, return_inverse=True)`` in a third of the time; without a
    sort when the values span at most a few times ``n`` (codes combined from factorised columns).
    In C (``_arrays.c``: one pass through a table or a hash table) where it is built."""
    n = len(key)
    if n == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    if _COMPILED_DISTINCT_CODES is not None:
        found = _COMPILED_DISTINCT_CODES(np.ascontiguousarray(key, dtype=np.int64))
        return np.frombuffer(found[0], dtype=np.int64), np.frombuffer(found[1], dtype=np.int64)
    lo = int(key.min())
    span = int(key.max()) - lo + 1
    if span <= 4 * n + 1024:
        # A table over the value range holding each value's first row (n where absent).
        shifted = key - lo if lo else key
        first_row = np.full(span, n, dtype=np.int64)
        np.minimum.at(first_row, shifted, np.arange(n, dtype=np.int64))
        present = np.flatnonzero(first_row < n)
        by_first = np.argsort(first_row[present], kind="stable")
        rank = np.empty(span, dtype=np.int64)
        rank[present[by_first]] = np.arange(len(present), dtype=np.int64)
        return first_row[present[by_first]], rank[shifted]
    order, ordered = stable_sort(key)
    starts = group_starts(ordered)
    group = np.zeros(n, dtype=np.int64)
    group[starts[1:]] = 1
    np.cumsum(group, out=group)
    first = order[starts]  # stable: each group's first row is its first occurrence
    by_first = np.argsort(first)
    rank = np.empty(len(first), dtype=np.int64)
    rank[by_first] = np.arange(len(first))
    codes = np.empty(n, dtype=np.int64)
    codes[order] = rank[group]
    return first[by_first], codes


def pair_lines(
    point: npt.NDArray[np.int64], ts: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Rows sharing a ``(point, ts)`` pair (int64 ``(n,)`` each) as one line: each row's line
    ``(n,)`` and the first row of every line ``(k,)``, lines in ``(point, ts)`` order.

    This is how values of one sensor and instant (several metrics) become one stored point.
    In C (``_arrays.c``: a counting sort by point) where it is built and the points are a dense
    range, else by numpy's stable sorts."""
    n = len(point)
    if n == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    if _COMPILED_PAIR_LINES is not None:
        found = _COMPILED_PAIR_LINES(
            np.ascontiguousarray(point, dtype=np.int64), np.ascontiguousarray(ts, dtype=np.int64)
        )
        if found is not None:
            return np.frombuffer(found[0], dtype=np.int64), np.frombuffer(found[1], dtype=np.int64)
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.not_equal(point[1:], point[:-1], out=new[1:])
    if bool(np.all(new[1:] | (ts[1:] >= ts[:-1])) and np.all(point[1:] >= point[:-1])):
        # Already in (point, ts) order (a step of one reading per series, series of a sensor
        # side by side): no sort.
        new[1:] |= ts[1:] != ts[:-1]
        return np.cumsum(new) - 1, np.flatnonzero(new)
    if ts[0] == ts.min() == ts.max():  # one instant (a step of reports sent together): one sort
        order = stable_order(point)
    else:
        by_ts = stable_order(ts)
        order = by_ts[stable_order(point[by_ts])]
    p, t = point[order], ts[order]
    np.not_equal(p[1:], p[:-1], out=new[1:])
    new[1:] |= t[1:] != t[:-1]
    line = np.empty(n, dtype=np.int64)
    line[order] = np.cumsum(new) - 1
    return line, order[new]
