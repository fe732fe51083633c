"""Depth Anything V2 per-frame depth (transformers), stabilised over time.

Each frame is resized like the published ``DPTImageProcessor`` (the side closest to 518 px becomes
518, the other keeps the aspect ratio, both rounded to multiples of 14; bicubic), ImageNet-normalised
and run through ``AutoModelForDepthEstimation``; the output (relative disparity, larger = nearer) is
resized bilinearly back to the frame size.

Temporal stabilisation: a per-frame model has its own unknown scale and shift in every frame, which
makes a static scene flicker. Frame t is therefore mapped by the scale/shift (least squares, then
refitted on the 80 % best-fitting pixels) that best matches the already aligned frame t - 1. Finally
the clip is min-max normalised to [0, 1] like DepthCrafter's output, so both providers share the
reference's disparity-to-depth mapping.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import modelstore
from ..errors import MODEL_INVALID, Ex4dError

DEFAULTS = {"batch": 4, "align": "previous"}  # align: "previous" | "none"

Progress = Callable[[str, int, int, str], None]


@dataclass
class DepthAnythingModel:
    model: object
    size: int  # target side (518)
    multiple: int  # 14
    keep_aspect: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: object
    dtype: object


def load(name: str, models_dir=None, device=None, dtype=None) -> DepthAnythingModel:
    """Load ``depth-anything-v2-small|base|large`` from the models directory."""
    import torch
    from transformers import AutoModelForDepthEstimation

    folder = modelstore.require_valid(name, models_dir)
    device = torch.device(device or "cpu")
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    try:
        pre = json.loads((folder / "preprocessor_config.json").read_text())
        model = AutoModelForDepthEstimation.from_pretrained(folder, dtype=dtype).eval().to(device)
    except Exception as exc:
        raise Ex4dError(
            f"cannot load {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
            where=str(folder),
            hint=f"run `ex4d models verify {name}` and download it again",
            code=MODEL_INVALID,
        ) from exc
    size = pre.get("size", {})
    side = int(size.get("height", size.get("shortest_edge", 518))) if isinstance(size, dict) else int(size)
    return DepthAnythingModel(
        model=model,
        size=side,
        multiple=int(pre.get("ensure_multiple_of", 14) or 1),
        keep_aspect=bool(pre.get("keep_aspect_ratio", True)),
        mean=tuple(pre.get("image_mean", (0.485, 0.456, 0.406))),
        std=tuple(pre.get("image_std", (0.229, 0.224, 0.225))),
        device=device,
        dtype=dtype,
    )


def input_size(
    width: int, height: int, side: int = 518, multiple: int = 14, keep_aspect: bool = True
) -> tuple[int, int]:
    """(width, height) the DPT processor resizes a frame to (``keep_aspect_ratio`` + ``ensure_multiple_of``)."""
    sh, sw = side / height, side / width
    if keep_aspect:
        if abs(1 - sw) < abs(1 - sh):
            sh = sw
        else:
            sw = sh

    def fit(x: float) -> int:
        return max(multiple, int(round(x / multiple) * multiple))  # DPT's constrain_to_multiple_of

    return fit(sw * width), fit(sh * height)


def infer(
    frames: np.ndarray,
    m: DepthAnythingModel,
    *,
    batch: int = DEFAULTS["batch"],
    align: str = DEFAULTS["align"],
    progress: Progress | None = None,
) -> np.ndarray:
    """Relative disparity (T, H, W) float32 in [0, 1] at the frame size (1 = nearest)."""
    import torch
    import torch.nn.functional as F

    if align not in ("previous", "none"):
        raise Ex4dError(f"unknown alignment '{align}'", where="align", hint="use 'previous' or 'none'")
    n, height, width = frames.shape[:3]
    w, h = input_size(width, height, m.size, m.multiple, m.keep_aspect)
    mean = torch.tensor(m.mean, device=m.device).view(1, 3, 1, 1)
    std = torch.tensor(m.std, device=m.device).view(1, 3, 1, 1)
    report = progress or (lambda *a: None)
    out = np.empty((n, height, width), np.float32)
    with torch.inference_mode():
        for i in range(0, n, max(1, batch)):
            report("depth", i, n, f"frame {i + 1}/{n}")
            x = (
                torch.from_numpy(np.ascontiguousarray(frames[i : i + batch])).to(m.device).permute(0, 3, 1, 2).float()
                / 255
            )
            x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
            x = ((x - mean) / std).to(m.dtype)
            pred = m.model(pixel_values=x).predicted_depth.float()  # (B, h, w)
            pred = F.interpolate(pred[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
            out[i : i + len(pred)] = pred.cpu().numpy()
    report("depth", n, n, "aligning frames")
    if align == "previous":
        out = align_to_previous(out)
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)


def fit_scale_shift(src: np.ndarray, dst: np.ndarray, keep: float = 0.8, iters: int = 4) -> tuple[float, float]:
    """(s, b) with s * src + b ~= dst, robust to outliers (moving objects, occlusions).

    Starts from a median / inter-quartile-range match, then refits by least squares on the ``keep``
    fraction of pixels with the smallest residuals, ``iters`` times. Falls back to the robust start
    when a fit is degenerate (no variance, s <= 0).
    """
    a, d = src.ravel().astype(np.float64), dst.ravel().astype(np.float64)
    qa, qd = np.percentile(a, [25, 50, 75]), np.percentile(d, [25, 50, 75])
    s = (qd[2] - qd[0]) / (qa[2] - qa[0]) if qa[2] - qa[0] > 1e-12 else 1.0
    b = qd[1] - s * qa[1]
    for _ in range(iters):
        r = np.abs(s * a + b - d)
        sel = r <= np.quantile(r, keep)
        if sel.sum() < 16:
            break
        x, y = a[sel], d[sel]
        var = x.var()
        if var <= 1e-12:
            break
        s_new = float(((x - x.mean()) * (y - y.mean())).mean() / var)
        if not np.isfinite(s_new) or s_new <= 0:
            break
        s, b = s_new, float(y.mean() - s_new * x.mean())
    return float(s), float(b)


def align_to_previous(disp: np.ndarray, max_pixels: int = 65536) -> np.ndarray:
    """Map each frame by the scale/shift that matches it to the aligned previous frame (frame 0 is kept)."""
    out = disp.astype(np.float32).copy()
    step = max(1, int(math.sqrt(disp[0].size / max_pixels)))
    for t in range(1, len(out)):
        s, b = fit_scale_shift(out[t][::step, ::step], out[t - 1][::step, ::step])
        out[t] = out[t] * s + b
    return out


def check_folder(folder: Path) -> None:
    """Depth Anything V2: transformers loads ``model.safetensors`` into the configured model with no
    missing, unexpected or mis-shaped tensor (transformers' own key mapping applies; nothing runs)."""
    from transformers import AutoModelForDepthEstimation

    json.loads((folder / "preprocessor_config.json").read_text())
    modelstore.safetensors_header(folder / "model.safetensors")
    _, info = AutoModelForDepthEstimation.from_pretrained(folder, output_loading_info=True)
    missing, unexpected = info.get("missing_keys") or [], info.get("unexpected_keys") or []
    mismatched = info.get("mismatched_keys") or []
    if missing or unexpected or mismatched:
        first = (list(missing) + list(unexpected) + [str(m[0]) for m in mismatched])[0]
        raise Ex4dError(
            f"the weights do not match the configuration: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} mis-shaped tensor(s) (e.g. {first})",
            where=str(folder / "model.safetensors"),
            hint="the folder holds another model or version: download it again",
            code=MODEL_INVALID,
        )
