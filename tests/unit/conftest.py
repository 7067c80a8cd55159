"""Unit tests run without network and without the caller's PORTPULSE_* environment."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def clean_portpulse_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PORTPULSE_"):
            monkeypatch.delenv(name)
