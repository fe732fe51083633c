"""The EX-4D N-panel. Being written."""

from __future__ import annotations


def register() -> None:
    pass


def unregister() -> None:
    pass
