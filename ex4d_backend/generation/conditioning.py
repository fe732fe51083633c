"""Guide videos -> the conditioning EX-4D's generator takes (numpy; the torch maths at the end import
torch lazily).

Conventions: colour ``uint8`` (T, H, W, 3) RGB, mask ``uint8`` (T, H, W) with 255 = seen by the
source camera (keep) and 0 = hole to fill. Output sizes are multiples of 16 px (VAE 8x times DiT
patch 2x) and ``num_frames`` = 4k + 1 (VAE: 4x temporal compression plus the first frame).
"""

from __future__ import annotations

import random

import numpy as np

from .. import constants as C
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
    check_guide_pair(len(color), (color.shape[2], color.shape[1]), len(mask), (mask.shape[2], mask.shape[1]), "mask")
    if color.shape[0] < 1:
        raise Ex4dError("the guide has no frames", where="color")


def check_guide_pair(
    color_frames: int, color_size: tuple[int, int], mask_frames: int, mask_size: tuple[int, int], where: str
) -> None:
    """One clear error unless the mask guide has the colour guide's frame count and (width, height)."""
    hint = "use the colour and mask videos of the same `ex4d recon` run"
    if color_frames != mask_frames:
        raise Ex4dError(
            f"the colour guide has {color_frames} frames but the mask guide has {mask_frames}",
            where=where,
            hint=hint,
            code=BAD_INPUT,
        )
    if tuple(color_size) != tuple(mask_size):
        raise Ex4dError(
            f"the colour guide is {color_size[0]}x{color_size[1]} px but the mask guide is "
            f"{mask_size[0]}x{mask_size[1]} px",
            where=where,
            hint=hint,
            code=BAD_INPUT,
        )


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


def fit_frame(frame: np.ndarray, width: int, height: int, mode: str = C.RESIZE) -> np.ndarray:
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


def read_indices(n: int, num_frames: int) -> np.ndarray:
    """The guide frames the reference reads: ``linspace(0, n - 1, num_frames)`` floored when the guide
    has at least ``num_frames`` frames, else every frame once (``arange(n)``; padded afterwards)."""
    if n >= num_frames:
        return np.linspace(0, n - 1, num_frames).astype(int)
    return np.arange(n)


def prepare_guide(
    color: np.ndarray,
    mask: np.ndarray,
    *,
    height: int,
    width: int,
    num_frames: int,
    seed: int,
    resize: str = C.RESIZE,
    erode: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample, resize and erode the guide as the reference (``generate.py``) does.

    1. Read the frames :func:`read_indices` picks; resize each (``fit_frame``).
    2. Erode each READ mask frame with a square kernel of size ``random.randint(2, 8)`` drawn from
       ``random.Random(seed)`` in reading order (unseeded in the reference), binarise at 0.5.
    3. A guide shorter than ``num_frames`` is padded by repeating the last eroded mask and the last
       colour frame (no new erosion, no new kernel draw).

    Returns ``colour`` float32 (num_frames, height, width, 3) in [0, 1] already multiplied by the
    mask, and ``mask`` float32 (num_frames, height, width) in {0, 1}.
    """
    import cv2

    validate_guide(color, mask)
    validate_size(height, width, num_frames)
    mask = np.asarray(mask)
    if mask.ndim == 4:
        mask = mask[..., 0]
    rng = random.Random(seed)
    idx = read_indices(len(color), num_frames)
    out_c = np.empty((num_frames, height, width, 3), np.float32)
    out_m = np.empty((num_frames, height, width), np.float32)
    for j, i in enumerate(idx):
        m = fit_frame(mask[i], width, height, resize)
        if erode:
            k = rng.randint(2, 8)
            m = cv2.erode(m, np.ones((k, k), np.uint8), iterations=1)
        out_m[j] = (m.astype(np.float32) / 255.0) > 0.5
        out_c[j] = fit_frame(color[i], width, height, resize).astype(np.float32) / 255.0 * out_m[j][..., None]
    out_m[len(idx) :] = out_m[len(idx) - 1]
    out_c[len(idx) :] = out_c[len(idx) - 1]
    return out_c, out_m


# ------------------------------------------------------------------- conditioning maths (torch)
# Pure functions of the reference's conditioning and sampling arithmetic; each is tested against the
# reference's formulas written literally in tests/test_generation_maths.py.
CONDITIONING_MODES = ("reference", "float")


def guide_conditions(color, mask, mode: str = "reference"):
    """Guide arrays of :func:`prepare_guide` -> (colour_cond, mask_cond), float32 (1, 3, T, H, W).

    colour_cond = colour * mask * 2 - 1 (holes = -1); mask_cond = mask * 2 - 1 (3 channels).
    ``reference``: as ``generate.py``, the masked colour is cast to bfloat16 and ``* 2 - 1`` is done in
    bfloat16 (so colour_cond holds bf16 values); ``float``: the same in float32 (no bf16 rounding).
    """
    import torch

    if mode not in CONDITIONING_MODES:
        raise Ex4dError(f"unknown conditioning mode '{mode}'", hint=", ".join(CONDITIONING_MODES))
    c = torch.as_tensor(color).permute(3, 0, 1, 2)[None]  # (1, 3, T, H, W), already * mask
    m = torch.as_tensor(mask)[None, None].expand(1, 3, -1, -1, -1)
    if mode == "reference":
        return (c.to(torch.bfloat16) * 2 - 1).float(), (m.to(torch.bfloat16) * 2 - 1).float()
    return c.float() * 2 - 1, m.float() * 2 - 1


def camera_encoder_inputs(colour_cond, mask_cond):
    """What the camera encoder's VAE encodes: colour_cond and (mask_cond * 2 - 1), as the reference's
    ``CamVidEncoder.forward`` (the mask enters as (mask01 * 2 - 1) * 2 - 1, i.e. -3 / +1)."""
    return colour_cond, mask_cond * 2 - 1


def i2v_frame(colour_cond, mode: str = "reference"):
    """The I2V image (CLIP input and the VAE's first-frame latent): the FIRST frame of colour_cond,
    (1, 3, T, H, W) -> (1, 3, H, W) float32 in [-1, 1].

    ``reference``: the reference's 8-bit round trip, ``to_pil_image(x * 0.5 + 0.5)`` (``mul(255)``
    then a truncating cast to uint8) and back with ``preprocess_image`` (``u8 * (2 / 255) - 1`` in
    float32); ``float``: the float frame as is."""
    import torch

    frame = colour_cond[:, :, 0].float()
    if mode == "float":
        return frame
    u8 = (frame * 0.5 + 0.5).mul(255).to(torch.uint8)  # truncates, as torchvision's to_pil_image
    return u8.float() * torch.tensor(2 / 255, dtype=torch.float32) - 1


def i2v_video(frame, num_frames: int):
    """The video the VAE encodes for the I2V latent: the frame followed by num_frames - 1 zero frames,
    (1, 3, H, W) -> (1, 3, num_frames, H, W)."""
    import torch

    zeros = frame.new_zeros(frame.shape[0], 3, num_frames - 1, *frame.shape[2:])
    return torch.cat([frame[:, :, None], zeros], dim=2)


def frame_mask_channels(num_frames: int, lat_h: int, lat_w: int):
    """Wan I2V's 4 frame-mask channels, (1, 4, (T-1)/4+1, lat_h, lat_w): ones for latent frame 0 (the
    given frame fills all 4 of its slots), zeros after."""
    import torch

    msk = torch.ones(1, num_frames, lat_h, lat_w)
    msk[:, 1:] = 0
    msk = torch.cat([msk[:, :1].repeat_interleave(4, dim=1), msk[:, 1:]], dim=1)
    return msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w).transpose(1, 2)


def cfg_combine(positive, negative, scale: float):
    """Classifier-free guidance as the reference: ``negative + scale * (positive - negative)``."""
    return negative + scale * (positive - negative)


def flow_sigmas(steps: int, shift: float, denoising_strength: float = 1.0):
    """The reference scheduler's sigmas (diffsynth 1.1.2 ``FlowMatchScheduler(shift, sigma_min=0,
    extra_one_step=True)``): ``s = linspace(strength, 0, steps + 1)[:-1]``, then
    ``shift * s / (1 + (shift - 1) * s)``; timesteps are ``sigmas * 1000``. float32 (steps,)."""
    import torch

    s = torch.linspace(denoising_strength, 0.0, steps + 1)[:-1]
    return shift * s / (1 + (shift - 1) * s)
