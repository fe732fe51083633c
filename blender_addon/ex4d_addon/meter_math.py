"""The disocclusion meter's pure part (no bpy): warning ranges, their text, the timeline bar's colours and
geometry. Shares are 0..1 per clip frame; clip frame ``i`` is scene frame ``frame_start + i``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

GREEN = (0.15, 0.75, 0.25)
YELLOW = (0.95, 0.8, 0.1)
RED = (0.9, 0.15, 0.1)


def unseen_ranges(shares: Sequence[float], threshold: float, frame_start: int = 1) -> list[tuple[int, int]]:
    """Inclusive scene-frame ranges ``(first, last)`` of consecutive frames whose share is MORE than
    ``threshold`` (a frame exactly at the threshold is not flagged)."""
    out: list[tuple[int, int]] = []
    start = None
    for i, v in enumerate(shares):
        if float(v) > threshold:
            if start is None:
                start = i
        elif start is not None:
            out.append((frame_start + start, frame_start + i - 1))
            start = None
    if start is not None:
        out.append((frame_start + start, frame_start + len(shares) - 1))
    return out


def format_ranges(ranges: Sequence[tuple[int, int]]) -> str:
    """ "31-49", "7", "3-5, 9" for the ranges."""
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges)


def warning_text(shares: Sequence[float], threshold: float, frame_start: int = 1) -> str:
    """ "frames 31-49 are more than 40% unseen" ("frame 7 is ..." for one frame), "" when no frame is over."""
    ranges = unseen_ranges(shares, threshold, frame_start)
    if not ranges:
        return ""
    one = len(ranges) == 1 and ranges[0][0] == ranges[0][1]
    pct = f"{threshold * 100:.0f}%"
    return f"frame {ranges[0][0]} is more than {pct} unseen" if one else (
        f"frames {format_ranges(ranges)} are more than {pct} unseen")  # fmt: skip


def worst(shares: Sequence[float], frame_start: int = 1) -> tuple[int, float]:
    """(scene frame, share) of the most unseen frame (the first on a tie); (frame_start, 0) for none."""
    if not len(shares):
        return frame_start, 0.0
    i = max(range(len(shares)), key=lambda j: (float(shares[j]), -j))
    return frame_start + i, float(shares[i])


def share_color(share: float, threshold: float) -> tuple[float, float, float, float]:
    """RGBA: green at 0, yellow at half the threshold, red at and above the threshold (linear between)."""
    th = max(float(threshold), 1e-6)
    x = min(max(float(share) / th, 0.0), 1.0)
    a, b, f = (GREEN, YELLOW, x * 2) if x < 0.5 else (YELLOW, RED, x * 2 - 1)
    return (*(a[c] + (b[c] - a[c]) * f for c in range(3)), 0.9)


def bar_geometry(
    shares: Sequence[float],
    threshold: float,
    frame_start: int,
    to_x: Callable[[float], float],
    y0: float,
    height: float,
) -> tuple[list[tuple[float, float]], list[tuple[float, float, float, float]]]:
    """Triangles of the timeline bar: one rectangle per frame from x(f - 0.5) to x(f + 0.5), from ``y0`` up to
    ``y0 + height * share`` (a curve-like bar: taller = more unseen; at least 2 px so 0 stays visible), coloured
    by :func:`share_color`. Returns (positions (6 per frame), colours (one per position))."""
    pos: list[tuple[float, float]] = []
    col: list[tuple[float, float, float, float]] = []
    for i, v in enumerate(shares):
        f = frame_start + i
        x0, x1 = to_x(f - 0.5), to_x(f + 0.5)
        y1 = y0 + max(2.0, height * min(max(float(v), 0.0), 1.0))
        pos += [(x0, y0), (x1, y0), (x1, y1), (x0, y0), (x1, y1), (x0, y1)]
        col += [share_color(v, threshold)] * 6
    return pos, col
