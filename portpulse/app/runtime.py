"""Process wiring shared by the long-running commands: logging and signal-driven shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from portpulse.contract.settings import OpsSettings

__all__ = [
    "JsonFormatter",
    "keep_heap_for_reuse",
    "run_until_signal",
    "setup_logging",
    "small_pages_for_arrays",
    "tune_gc_for_streaming",
]

T = TypeVar("T")


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_heap_for_reuse(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Make glibc keep freed heap memory for the next batch instead of returning it to the OS.

    Each processor batch allocates many arrays of a few MB; by default glibc serves and returns
    them with mmap/munmap or trims the heap, so every batch pays page faults on fresh pages
    (measured: a third of the kernels' time on 1 M-reading batches). Allocations below
    ``mmap_threshold`` bytes come from the heap, and up to ``trim_threshold`` bytes of free heap
    stay mapped: resident memory stays at its high-water mark instead of shrinking between
    batches. Returns False where there is no glibc (nothing changes).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def small_pages_for_arrays() -> bool:
    """Ask numpy not to advise transparent huge pages for its large arrays, unless the user chose
    with ``NUMPY_MADVISE_HUGEPAGE`` (numpy's own switch, read when numpy is imported).

    numpy advises huge pages (``madvise``) for every array of 4 MB and more. A step allocates
    and frees many of them, and while the heap grows (a fleet's first minutes: open windows,
    cleaning history) each one on fresh memory costs whole 2 MB pages zeroed, in the kernel
    (measured on the fleet benchmark: the processor's kernel time fell from 0.22 to 0.06 us per
    value and its peak RSS from 540 to 430 MB; its user time did not change). Returns True
    when numpy advises no huge pages from now on.

    The switch is numpy's private ``_set_madvise_hugepage``: where it is gone, this logs a
    warning and changes nothing.
    """
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return os.environ["NUMPY_MADVISE_HUGEPAGE"] == "0"
    from numpy._core import multiarray

    switch = getattr(multiarray, "_set_madvise_hugepage", None)
    if switch is None:
        logging.getLogger("portpulse").warning(
            "numpy has no _set_madvise_hugepage: large arrays may take huge pages (set NUMPY_MADVISE_HUGEPAGE=0)"
        )
        return False
    switch(False)
    return True


def tune_gc_for_streaming(first_generation: int = 50_000) -> None:
    """Collect cycles less often: move what start-up built out of the collector's sight
    (``gc.freeze``) and let the youngest generation grow to ``first_generation`` objects.

    A bridge step makes hundreds of thousands of short-lived containers (parsed JSON, record
    tuples) and creates almost no cycles; with the default threshold (700) the collector ran
    every few hundred readings and re-scanned everything alive (measured: a third of the record
    building time). Reference counting still frees everything that is not a cycle at once.
    """
    import gc

    gc.freeze()
    gc.set_threshold(first_generation, 20, 20)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339, UTC), level, logger, msg, and exc when present."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(ops: OpsSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if ops.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(ops.log_level)
    # aiokafka logs every failed connection attempt at ERROR; our own warnings say it once.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLevelName(ops.log_level)))


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run ``main(stop)``; SIGINT/SIGTERM set ``stop`` so it can drain and return. A second
    signal stops it without draining (a drain can wait on InfluxDB or Kafka for as long as they
    are away) and raises :class:`KeyboardInterrupt`: nothing is lost, as what was not committed
    is read again at the next start."""

    async def runner() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def on_signal() -> None:
            if not stop.is_set():
                stop.set()
            elif task is not None:
                logging.getLogger("portpulse").warning("second signal: stopping without draining")
                task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        return await main(stop)

    try:
        return asyncio.run(runner())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
