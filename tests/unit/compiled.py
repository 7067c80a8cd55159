"""Running a compiled half's Python or numpy fallback in a test, as an install without a C compiler does."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType


@contextlib.contextmanager
def compiled_half(module: ModuleType, name: str, kind: str) -> Iterator[None]:
    """Inside the block, ``module.name`` (a compiled half) as built when ``kind`` is "compiled",
    else None: the Python or numpy half runs, as on an install without a compiler."""
    built = getattr(module, name)
    setattr(module, name, built if kind == "compiled" else None)
    try:
        yield
    finally:
        setattr(module, name, built)
