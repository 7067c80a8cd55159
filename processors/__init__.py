"""processors (see design.md)."""

__all__: list[str] = []
