"""The clip the guide renderer keeps on the GPU between guide renders (one at a time).

An artist iterating on a camera renders guide after guide of one shot. The frames and depth of that shot
(``(T, H, W, 3)`` uint8 and ``(T, H, W)`` float32, 89 MB at 49 x 512²) are kept on the device after the
first render, keyed by the frames and depth stage keys, so the next camera skips reading and uploading them
(``pipeline.guide.render_guide``'s ``resident_key``). At most one clip of at most ``MAX_BYTES``, only while
the GPU has ``FREE_FACTOR`` times its size free; dropped before a depth model or a generator loads
(:func:`release`), since those need the VRAM. Torch-free: the tensors are only held here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_BYTES = 4 << 30  # the largest clip (frames + depth) kept on the device
FREE_FACTOR = 4  # kept only while the device has this many times the clip's size free


@dataclass
class ResidentClip:
    key: str
    frames: Any  # torch.Tensor (T, H, W, 3) uint8 on the device
    depth: Any  # torch.Tensor (T, H, W) float32 on the device


_CLIP: ResidentClip | None = None


def get(key: str, shape: tuple[int, int, int]) -> ResidentClip | None:
    """The kept clip if it is ``key``'s with depth shape ``shape`` (T, H, W), else None."""
    if _CLIP is not None and _CLIP.key == key and tuple(_CLIP.depth.shape) == tuple(shape):
        return _CLIP
    return None


def allocate(key: str, shape: tuple[int, int, int], device) -> ResidentClip | None:
    """Empty device tensors for a clip of depth shape ``shape`` (the previous clip dropped first), to fill
    while rendering and then :func:`keep`; None when the clip is too large or the device too full."""
    import torch

    release()
    t, h, w = shape
    nbytes = t * h * w * (3 + 4)
    if nbytes > MAX_BYTES or torch.cuda.mem_get_info(device)[0] < FREE_FACTOR * nbytes:
        return None
    return ResidentClip(
        key,
        torch.empty((t, h, w, 3), dtype=torch.uint8, device=device),
        torch.empty((t, h, w), dtype=torch.float32, device=device),
    )


def keep(clip: ResidentClip) -> None:
    """Keep ``clip`` (filled completely) for the next render."""
    global _CLIP
    _CLIP = clip


def release() -> None:
    """Drop the kept clip (its memory returns to torch's cache)."""
    global _CLIP
    _CLIP = None
