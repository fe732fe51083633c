"""The generation size follows the footage's aspect ratio (Wan2.1-I2V-14B-480P's sizes).

Rule (``auto``), for a guide of W x H pixels, aspect ``a = W / H``:

1. **Snap to a trained size.** If ``a`` is within 5 % of one of the canonical sizes' aspect ratios
   (``|ln(a / a_c)| <= ln 1.05``), use that size:
   ``512 x 512`` (the reference's square), ``832 x 480`` (Wan 480P landscape: 16:9 footage, 1.733 vs
   1.778, loses 2.5 % of its width to the centred crop), ``480 x 832`` (portrait, 9:16).
2. **Otherwise keep the model's 480P area** (``AREA_480P = 832 * 480`` px): ``w = round16(sqrt(AREA * a))``,
   ``h = round16(sqrt(AREA / a))`` where ``round16`` rounds to the nearest positive multiple of 16
   (VAE 8x times DiT patch 2x). E.g. 4:3 -> 736 x 544, 2.39:1 -> 976 x 416, 1.85:1 -> 864 x 464.

An explicit ``WxH`` (or ``--width/--height``) overrides the rule; it must be multiples of 16.
``--resize crop`` (default) then centre-crops the guide to the generation aspect before resizing;
``stretch`` squashes it (the reference).
"""

from __future__ import annotations

import math
import re

from ..errors import BAD_INPUT, Ex4dError

AREA_480P = 832 * 480  # Wan2.1-I2V-14B-480P's training area
CANONICAL_SIZES = ((512, 512), (832, 480), (480, 832))  # (width, height): reference square, 16:9-ish, 9:16-ish
SNAP_TOLERANCE = 1.05  # aspect ratios within 5 % snap to a canonical size
SIZE_MULTIPLE = 16


def round16(x: float) -> int:
    """Nearest positive multiple of 16 (ties up)."""
    return max(SIZE_MULTIPLE, int(math.floor(x / SIZE_MULTIPLE + 0.5)) * SIZE_MULTIPLE)


def auto_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of the generation for a guide of ``width`` x ``height`` px (the rule above)."""
    if width < 1 or height < 1:
        raise Ex4dError(f"the guide has no pixels ({width}x{height})", where="guide", code=BAD_INPUT)
    a = width / height
    best = min(CANONICAL_SIZES, key=lambda s: abs(math.log(a * s[1] / s[0])))
    if abs(math.log(a * best[1] / best[0])) <= math.log(SNAP_TOLERANCE):
        return best
    return round16(math.sqrt(AREA_480P * a)), round16(math.sqrt(AREA_480P / a))


def parse_size(text: str) -> tuple[int, int] | None:
    """``"auto"`` -> None; ``"WxH"`` -> (W, H), multiples of 16, else one clear error."""
    text = str(text).strip().lower()
    if text == "auto":
        return None
    m = re.fullmatch(r"(\d+)\s*[x*]\s*(\d+)", text)
    if not m:
        raise Ex4dError(f"cannot read the size '{text}'", where="--size", hint="auto or WxH, e.g. 832x480")
    w, h = int(m.group(1)), int(m.group(2))
    for name, v in (("width", w), ("height", h)):
        if v < SIZE_MULTIPLE or v % SIZE_MULTIPLE:
            raise Ex4dError(
                f"the {name} must be a positive multiple of 16, got {v}", where="--size", hint="e.g. 832x480, 512x512"
            )
    return w, h


def generation_size(
    guide_width: int,
    guide_height: int,
    size: str | tuple[int, int] | None = "auto",
    *,
    width: int | None = None,
    height: int | None = None,
) -> tuple[int, int]:
    """The (width, height) to generate at: explicit ``width``/``height`` (both, or one with the other
    from the rule scaled to keep the aspect), else ``size`` (``auto`` / ``"WxH"`` / a tuple)."""
    if width is not None and height is not None:
        return parse_size(f"{width}x{height}")
    if width is not None or height is not None:
        a = guide_width / guide_height
        w = width if width is not None else round16(height * a)
        h = height if height is not None else round16(width / a)
        return parse_size(f"{w}x{h}")
    if size is None or (isinstance(size, str) and size.strip().lower() == "auto"):
        return auto_size(guide_width, guide_height)
    if isinstance(size, str):
        return parse_size(size)
    return parse_size(f"{size[0]}x{size[1]}")


__all__ = ["AREA_480P", "CANONICAL_SIZES", "auto_size", "generation_size", "parse_size", "round16"]
