"""Depth estimation from footage: one interface, three providers, a cache.

Providers (``model`` argument / ``--model``):

- ``depthcrafter``: the EX-4D reference (DepthCrafter on Stable Video Diffusion), temporally
  consistent, ~24 GB of GPU memory at the reference settings in fp16 (``cpu_offload=True`` for less).
- ``depth-anything-v2`` (= ``depth-anything-v2-small``), ``depth-anything-v2-base``,
  ``depth-anything-v2-large``: per-frame, much faster, stabilised by per-frame scale/shift alignment.
- ``file``: an existing depth or disparity file (``path=``, ``kind="depth"|"disparity"``,
  ``repair=``, ``scale=``), read by ``ex4d_backend.depth_io.load_depth``.

Convention (all providers): ``DepthResult.disparity`` is relative disparity min-max normalised over
the clip to [0, 1] (1 = nearest), and ``DepthResult.depth`` is the reference's mapping of it,
``depth_io.disparity_to_depth`` (10000 / (3900 d), clipped to [1e-4, 1e4]; nearest surface at about
2.56 units). Both float32 (T, H, W) at the footage size. For ``file``, depth is the file's depth in
scene units and disparity is 1 / depth.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import constants as C
from ..errors import BAD_INPUT, DEVICE, Ex4dError
from .specs import DA2_DEFAULT, DA2_SIZES, DEPTHCRAFTER

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int, str], None]

MODELS = (DEPTHCRAFTER, "depth-anything-v2", *(f"depth-anything-v2-{s}" for s in DA2_SIZES), "file")
MAX_FRAMES = 2000  # longest clip accepted (memory of the latents / disparity on the host)
MAX_SIDE = 2048  # largest frame side accepted; footage is normally capped at 1024 by read_footage
CACHE_VERSION = 2  # bump when a change alters results, so stale cache entries are never reused
NO_KEY_OPTIONS = ("cpu_offload",)  # options that do not change the result (left out of the cache key)


@dataclass
class DepthResult:
    depth: np.ndarray  # float32 (T, H, W), scene units (reference mapping), at the footage size
    disparity: np.ndarray  # float32 (T, H, W), relative disparity in [0, 1], 1 = nearest
    model: str = ""
    options: dict = field(default_factory=dict)
    cached: bool = False  # True when read from the depth cache
    # float64 (3, 3) pixel intrinsics at the footage size: the reference's fx = fy = 500, (W/2, H/2),
    # unless a focal length was given (``focal_px``, or ``focal_mm`` + ``sensor_width_mm``).
    intrinsics: np.ndarray | None = None


def canonical_model(model: str) -> str:
    """Our name of a provider (``depth-anything-v2`` -> ``depth-anything-v2-small``); errors for unknown names."""
    name = (model or "").strip().lower()
    if name == "depth-anything-v2":
        return DA2_DEFAULT
    if name not in MODELS:
        raise Ex4dError(f"unknown depth model '{model}'", where="--model", hint=f"use one of: {', '.join(MODELS)}")
    return name


def resolve_device(device: str | None = C.DEVICE):
    """``"auto"``: CUDA when available, else the CPU. An explicit ``cuda`` without CUDA is an error."""
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Ex4dError("CUDA is not available", where="--device", hint="use --device cpu or auto", code=DEVICE)
    return dev


def _check_frames(frames: np.ndarray, model: str) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise Ex4dError(
            f"frames must be uint8 (T, H, W, 3), got {getattr(frames, 'dtype', type(frames))} "
            f"{getattr(frames, 'shape', '')}",
            where="frames",
            code=BAD_INPUT,
        )
    t, h, w = frames.shape[:3]
    if t < 2 and model != "file":
        raise Ex4dError(
            f"depth estimation needs at least 2 frames, the footage has {t}",
            where="footage",
            hint="use a clip of 2 or more frames (a still image is not footage)",
        )
    if t > MAX_FRAMES:
        raise Ex4dError(
            f"the footage has {t} frames, more than the {MAX_FRAMES} a depth run accepts",
            where="footage",
            hint="limit the frames (--max-frames) or split the shot",
        )
    if max(h, w) > MAX_SIDE:
        raise Ex4dError(
            f"frames of {w}x{h} are larger than {MAX_SIDE} px",
            where="footage",
            hint=f"read the footage with its long side capped (--max-side, at most {MAX_SIDE})",
        )
    if min(h, w) < 16:
        raise Ex4dError(f"frames of {w}x{h} are too small for depth estimation", where="footage")


def _to_depth(disparity: np.ndarray) -> np.ndarray:
    from ..depth_io import disparity_to_depth

    return disparity_to_depth(disparity)


def _resize(disp: np.ndarray, width: int, height: int) -> np.ndarray:
    if disp.shape[1:] == (height, width):
        return disp.astype(np.float32, copy=False)
    import cv2

    out = np.stack([cv2.resize(d, (width, height), interpolation=cv2.INTER_LINEAR) for d in disp])
    lo, hi = float(out.min()), float(out.max())  # keep the clip-wise [0, 1] normalisation exact
    return ((out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)).astype(np.float32)


def quiet_loading() -> None:
    """Silence the libraries' own loading bars: our ``progress`` callback reports instead."""
    for mod in ("transformers.utils.logging", "diffusers.utils.logging"):
        try:
            import importlib

            importlib.import_module(mod).disable_progress_bar()
        except (ImportError, AttributeError):
            pass


def _free(device) -> None:
    import gc

    gc.collect()
    if getattr(device, "type", "") == "cuda":
        import torch

        torch.cuda.empty_cache()


def estimate(
    frames: np.ndarray,
    model: str,
    *,
    models_dir: str | os.PathLike | None = None,
    device: str | None = C.DEVICE,
    progress: Progress | None = None,
    focal_px: float | None = None,
    focal_mm: float | None = None,
    sensor_width_mm: float = C.SENSOR_WIDTH_MM,
    **options,
) -> DepthResult:
    """Depth and disparity (float32 (T, H, W), at the footage size) for uint8 RGB ``frames`` (T, H, W, 3).

    ``DepthResult.intrinsics`` is K at the footage size: ``focal_px`` (pixels), else ``focal_mm`` with
    ``sensor_width_mm`` (the sensor width spans the frame width), else the reference's 500 px.

    ``model``: see the module docstring. ``options`` are per provider:

    - depthcrafter: ``steps`` (5), ``guidance`` (1.0), ``window`` (110), ``overlap`` (25),
      ``max_res`` (1024), ``seed`` (42), ``noise_aug`` (0.02), ``decode_chunk`` (8),
      ``cpu_offload`` (False; CUDA only: each component visits the GPU only while it runs).
    - depth-anything-v2*: ``batch`` (4), ``align`` ("previous" | "none").
    - file: ``path`` (required), ``kind`` ("depth"), ``repair`` (False), ``scale`` (1.0),
      ``total_frames`` (frames in the whole footage when ``frames`` is its first part).

    ``progress(stage, step, total, message)`` is called per window step / frame; it may raise
    ``errors.Cancelled``, which propagates after the models are released.
    """
    name = canonical_model(model)
    _check_frames(frames, name)
    t, h, w = frames.shape[:3]
    k = intrinsics(w, h, focal_px, focal_mm, sensor_width_mm)
    if name == "file":
        result = _estimate_file(frames, options)
        result.intrinsics = k
        return result
    dev = resolve_device(device)
    report = progress or (lambda *a: None)
    from .. import modelstore

    needed = [spec.name for spec in modelstore.with_requirements(name)]
    modelstore.require_all(needed, models_dir)  # every missing model named at once, before any progress
    for spec_name in needed:  # then corrupt files: one error before any progress
        modelstore.require_valid(spec_name, models_dir)
    quiet_loading()
    if name == DEPTHCRAFTER:
        from . import depthcrafter as provider

        opts = _provider_options(provider.DEFAULTS, options, "depthcrafter")
        if dev.type != "cuda":
            log.warning(
                "depth: DepthCrafter on the CPU takes hours for a real clip (about 2 B parameters, fp32); "
                "use a CUDA GPU or --model depth-anything-v2"
            )
        report("load", 0, 1, "loading DepthCrafter")
        models = provider.load(models_dir, dev, cpu_offload=bool(opts.pop("cpu_offload")))
    else:
        from . import depth_anything as provider

        opts = _provider_options(provider.DEFAULTS, options, "depth-anything")
        report("load", 0, 1, f"loading {name}")
        models = provider.load(name, models_dir, dev)
    try:
        report("load", 1, 1, "loaded")
        disp = provider.infer(frames, models, progress=progress, **opts)
    finally:
        del models
        _free(dev)
    disp = _resize(disp, w, h)
    return DepthResult(depth=_to_depth(disp), disparity=disp, model=name, options=dict(options), intrinsics=k)


def _provider_options(defaults: dict, options: dict, label: str) -> dict:
    """A depth model's ``defaults`` updated with the given ``options``; one error for an unknown one."""
    unknown = set(options) - set(defaults)
    if unknown:
        raise Ex4dError(f"unknown {label} option(s): {', '.join(sorted(unknown))}", where="options")
    return {**defaults, **options}


def intrinsics(
    width: int,
    height: int,
    focal_px: float | None = None,
    focal_mm: float | None = None,
    sensor_width_mm: float = C.SENSOR_WIDTH_MM,
) -> np.ndarray:
    """K (float64 3x3) at ``width`` x ``height``: see :func:`ex4d_backend.cameras.intrinsics_from_focal`."""
    from ..cameras import intrinsics_from_focal

    if focal_px is not None and focal_mm is not None:
        raise Ex4dError(
            "give the focal length either in pixels or in mm, not both", where="focal", hint="drop one of them"
        )
    return np.asarray(
        intrinsics_from_focal(width, height, focal_mm=focal_mm, sensor_width_mm=sensor_width_mm, focal_px=focal_px),
        dtype=np.float64,
    )


def _estimate_file(frames: np.ndarray, options: dict) -> DepthResult:
    from ..depth_io import load_depth

    opts = dict(options)
    path = opts.pop("path", None)
    if not path:
        raise Ex4dError("the 'file' depth provider needs a path", where="--depth", hint="pass the depth file")
    allowed = {"kind", "repair", "scale", "total_frames"}
    unknown = set(opts) - allowed
    if unknown:
        raise Ex4dError(f"unknown file-depth option(s): {', '.join(sorted(unknown))}", where="options")
    t, h, w = frames.shape[:3]
    depth = load_depth(path, size=(w, h), n_frames=t, **opts).astype(np.float32)
    disparity = (1.0 / np.maximum(depth, 1e-12)).astype(np.float32)
    return DepthResult(depth=depth, disparity=disparity, model="file", options=dict(options))


# ----------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> Path:
    """``$EX4D_CACHE_DIR/depth`` or ``<user cache>/ex4d/depth``."""
    root = os.environ.get("EX4D_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "depth"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "ex4d" / "depth"


def model_fingerprint(model: str, models_dir: str | os.PathLike | None = None) -> list:
    """(file, size, mtime_ns) of every weight file of ``model`` and what it requires; [] when absent.

    Part of the cache key, so replacing the weights (another version) never reuses old results.
    """
    from .. import modelstore

    name = canonical_model(model)
    return [] if name == "file" else modelstore.weights_fingerprint([name], models_dir)


def cache_key(
    frames: np.ndarray,
    model: str,
    options: dict,
    footage_hash: str | None = None,
    fingerprint: list | None = None,
) -> str:
    """Hex key of a depth result: the frames' bytes and shape, the model, its options (those that change
    the result), the weights' ``fingerprint`` (:func:`model_fingerprint`) and the cache version.

    The frames themselves are hashed (fast) so a different frame range, size or footage never hits;
    the camera, mesh and generation settings are not part of it. ``footage_hash``
    (``footage.content_hash``) is only mixed in when given.
    """
    name = canonical_model(model)
    opts = sorted((k, v) for k, v in options.items() if k not in NO_KEY_OPTIONS)
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [CACHE_VERSION, name, opts, list(frames.shape), footage_hash, fingerprint or []], default=str
        ).encode()
    )
    h.update(hashlib.blake2b(np.ascontiguousarray(frames).data, digest_size=32).digest())
    return h.hexdigest()[:32]


def estimate_cached(
    footage_path: str | os.PathLike | None,
    frames: np.ndarray,
    model: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    models_dir: str | os.PathLike | None = None,
    device: str | None = C.DEVICE,
    progress: Progress | None = None,
    refresh: bool = False,
    focal_px: float | None = None,
    focal_mm: float | None = None,
    sensor_width_mm: float = C.SENSOR_WIDTH_MM,
    **options,
) -> DepthResult:
    """:func:`estimate`, reusing ``<cache_dir>/<key>.npz`` when the same frames, model and options ran before.

    ``footage_path`` is recorded in the entry (for people browsing the cache); the key comes from the
    frames (see :func:`cache_key`), so changing the camera, the mesh or the generation never re-runs
    depth. ``cache_dir`` defaults to :func:`default_cache_dir`. ``refresh`` recomputes and overwrites.
    The ``file`` provider is never cached (it is a file read already).
    """
    name = canonical_model(model)
    focal = {"focal_px": focal_px, "focal_mm": focal_mm, "sensor_width_mm": sensor_width_mm}
    if name == "file":
        return estimate(frames, name, models_dir=models_dir, device=device, progress=progress, **focal, **options)
    _check_frames(frames, name)
    k = intrinsics(frames.shape[2], frames.shape[1], focal_px, focal_mm, sensor_width_mm)
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cache_key(frames, name, options, fingerprint=model_fingerprint(name, models_dir))
    entry = folder / f"{key}.npz"
    if entry.is_file() and not refresh:
        try:
            with np.load(entry, allow_pickle=False) as data:
                depth, disparity = data["depth"], data["disparity"]
            if depth.shape == frames.shape[:3] and disparity.shape == frames.shape[:3]:
                log.info("depth: reusing the cached result %s", entry)
                if progress:
                    progress("depth", 1, 1, "cached")
                return DepthResult(depth, disparity, name, dict(options), cached=True, intrinsics=k)
        except (OSError, ValueError, KeyError):
            log.warning("depth: ignoring an unreadable cache entry %s", entry)
    result = estimate(frames, name, models_dir=models_dir, device=device, progress=progress, **focal, **options)
    from ..atomic import atomic_path

    try:
        with atomic_path(entry) as tmp:
            meta = json.dumps(
                {"model": name, "options": options, "footage": str(footage_path or ""), "version": CACHE_VERSION},
                default=str,
            )
            with open(tmp, "wb") as fh:
                np.savez(fh, depth=result.depth, disparity=result.disparity, meta=np.array(meta))
    except OSError as exc:  # a full or read-only cache must not fail the job
        log.warning("depth: cannot write the cache entry %s (%s)", entry, exc)
    return result


__all__ = [
    "MODELS",
    "DepthResult",
    "cache_key",
    "canonical_model",
    "default_cache_dir",
    "estimate",
    "estimate_cached",
    "intrinsics",
    "model_fingerprint",
    "resolve_device",
]
