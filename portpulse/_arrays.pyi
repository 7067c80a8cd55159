"""Compiled factorising of names for arrays.factorise (portpulse/_arrays.c)."""

from typing import Any

def factorise(items: list[Any], /) -> tuple[bytearray, list[Any]]:
    """int64 codes (n,) of the items and the distinct ones, in order of first appearance."""
