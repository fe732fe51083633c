"""Scene operators (import footage, DW-mesh, camera presets). Being written."""

from __future__ import annotations


def register() -> None:
    pass


def unregister() -> None:
    pass
