"""Guide videos -> the conditioning arrays EX-4D's generator takes (numpy; no torch).

Conventions: colour ``uint8`` (T, H, W, 3) RGB, mask ``uint8`` (T, H, W) with 255 = seen by the
source camera (keep) and 0 = hole to fill. Output sizes are multiples of 16 px (VAE 8x times DiT
patch 2x) and ``num_frames`` = 4k + 1 (VAE: 4x temporal compression plus the first frame).
"""

from __future__ import annotations

import random

import numpy as np

from ..errors import BAD_INPUT, Ex4dError

REFERENCE_PROMPT = "4K ultra HD, surround motion, realistic tone, panoramic shot, wide-angle view, cinematic quality"
REFERENCE_NEGATIVE = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)
RESIZE_MODES = ("crop", "stretch")


def validate_guide(color: np.ndarray, mask: np.ndarray) -> None:
    """One clear error if the colour and mask guides are not (T, H, W, 3) / (T, H, W) uint8 of one size."""
    color, mask = np.asarray(color), np.asarray(mask)
    if color.dtype != np.uint8 or color.ndim != 4 or color.shape[-1] != 3:
        raise Ex4dError(
            f"the colour guide must be uint8 (T, H, W, 3), got {color.dtype} {color.shape}",
            where="color",
            code=BAD_INPUT,
        )
    if mask.ndim == 4 and mask.shape[-1] in (1, 3):
        mask = mask[..., 0]
    if mask.dtype != np.uint8 or mask.ndim != 3:
        raise Ex4dError(f"the mask guide must be uint8 (T, H, W), got {mask.dtype} {mask.shape}", where="mask")
    if color.shape[0] != mask.shape[0]:
        raise Ex4dError(
            f"the colour guide has {color.shape[0]} frames but the mask guide has {mask.shape[0]}",
            where="mask",
            hint="use the colour and mask videos of the same `ex4d recon` run",
        )
    if color.shape[1:3] != mask.shape[1:3]:
        raise Ex4dError(
            f"the colour guide is {color.shape[2]}x{color.shape[1]} px but the mask guide is "
            f"{mask.shape[2]}x{mask.shape[1]} px",
            where="mask",
            hint="use the colour and mask videos of the same `ex4d recon` run",
        )
    if color.shape[0] < 1:
        raise Ex4dError("the guide has no frames", where="color")


def validate_size(height: int, width: int, num_frames: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if v < 16 or v % 16:
            raise Ex4dError(
                f"{name} must be a positive multiple of 16, got {v}", where=f"--{name}", hint="e.g. 512, 480, 832"
            )
    if num_frames < 1 or (num_frames - 1) % 4:
        raise Ex4dError(f"frames must be 4k + 1 (1, 5, 9, ..., 49, 81), got {num_frames}", where="--frames")


def sample_indices(n: int, num_frames: int) -> np.ndarray:
    """The reference's frame choice: linspace(0, n - 1, num_frames) floored; short clips repeat
    their last frame."""
    if n >= num_frames:
        return np.linspace(0, n - 1, num_frames).astype(int)
    return np.concatenate([np.arange(n), np.full(num_frames - n, n - 1)]).astype(int)


def crop_box(src_w: int, src_h: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Centred (x0, y0, w, h) of the largest source window with the target aspect ratio."""
    if src_w * height > width * src_h:  # source wider than target: crop the sides
        w = max(1, round(src_h * width / height))
        return (src_w - w) // 2, 0, w, src_h
    h = max(1, round(src_w * height / width))
    return 0, (src_h - h) // 2, src_w, h


def fit_frame(frame: np.ndarray, width: int, height: int, mode: str = "crop") -> np.ndarray:
    """Resize one frame to (height, width): ``crop`` keeps the aspect ratio (centred crop, then
    resize), ``stretch`` squashes like the reference. Bilinear (cv2's default, as the reference)."""
    import cv2

    if mode == "crop":
        x0, y0, w, h = crop_box(frame.shape[1], frame.shape[0], width, height)
        frame = frame[y0 : y0 + h, x0 : x0 + w]
    elif mode != "stretch":
        raise Ex4dError(f"unknown resize mode '{mode}'", hint=f"one of {', '.join(RESIZE_MODES)}")
    if frame.shape[:2] == (height, width):
        return np.ascontiguousarray(frame)
    return cv2.resize(np.ascontiguousarray(frame), (width, height), interpolation=cv2.INTER_LINEAR)


def prepare_guide(
    color: np.ndarray,
    mask: np.ndarray,
    *,
    height: int,
    width: int,
    num_frames: int,
    seed: int,
    resize: str = "crop",
    erode: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample, resize and erode the guide as the reference does.

    Returns ``colour`` float32 (num_frames, height, width, 3) in [0, 1] already multiplied by the
    mask, and ``mask`` float32 (num_frames, height, width) in {0, 1}. Each mask frame is eroded with a
    square kernel of size ``random.randint(2, 8)`` drawn from ``random.Random(seed)`` (unseeded in
    the reference), then binarised at 0.5.
    """
    import cv2

    validate_guide(color, mask)
    validate_size(height, width, num_frames)
    mask = np.asarray(mask)
    if mask.ndim == 4:
        mask = mask[..., 0]
    rng = random.Random(seed)
    idx = sample_indices(len(color), num_frames)
    out_c = np.empty((num_frames, height, width, 3), np.float32)
    out_m = np.empty((num_frames, height, width), np.float32)
    for j, i in enumerate(idx):
        m = fit_frame(mask[i], width, height, resize)
        if erode:
            k = rng.randint(2, 8)
            m = cv2.erode(m, np.ones((k, k), np.uint8), iterations=1)
        out_m[j] = (m.astype(np.float32) / 255.0) > 0.5
        out_c[j] = fit_frame(color[i], width, height, resize).astype(np.float32) / 255.0 * out_m[j][..., None]
    return out_c, out_m
