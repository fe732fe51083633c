"""Light requests, answered beside the GPU job: ``hello`` (versions, devices, models, defaults) and
``probe_footage`` (size, rate, frame count and the matching source camera), plus the store's
housekeeping requests ``store_info`` and ``store_clean``."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

from .. import __version__
from ..pipeline.settings import IntrinsicsSettings
from . import protocol
from .jobstore import JobStore


def probe_footage(store: JobStore, p: dict) -> dict:
    """Size, rate and frame count of footage (without decoding it all) and the matching source camera."""
    from ..constants import MAX_SIDE
    from ..footage import list_image_sequence, processing_size, read_footage

    path = store.check_input(p["footage"], "footage")
    f = read_footage(path, max_frames=1, max_side=None)
    total = f.total_frames
    if not path.is_dir() and total <= 1:
        total = _count_video_frames(path)
    elif path.is_dir():
        total = len(list_image_sequence(path))
    w, h = f.source_size
    intr = IntrinsicsSettings.from_params(p)
    pw, ph = processing_size(w, h, p.get("max_side", MAX_SIDE))
    k = intr.matrix(pw, ph)
    blender = blender_source_camera(k, pw, ph, intr.sensor_width)
    return {
        "footage": str(path),
        "width": w,
        "height": h,
        "fps": f.fps,
        "frame_count": int(total),
        "processing_width": pw,
        "processing_height": ph,
        "focal_px": float(k[0, 0]),
        "K": k.tolist(),
        **blender,
    }


def blender_source_camera(k, width: int, height: int, sensor_width: float = 36.0) -> dict:
    """The source camera as Blender camera data, for the add-on (which holds no camera convention):
    ``matrix_world`` (4x4, the pose of source frame 0 = the world origin) and lens/sensor/shift for ``k``
    ((3, 3); frame 0's of per-frame intrinsics)."""
    import numpy as np

    from .. import cameras

    k = np.asarray(k, dtype=np.float64)
    k = k if k.ndim == 2 else k[0]
    mw = cameras.opencv_to_blender_matrix_world(np.eye(4)[None])[0]
    return {
        "matrix_world": mw.tolist(),
        **cameras.intrinsics_to_blender(k, width, height, float(sensor_width), "HORIZONTAL"),
    }


def _count_video_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for pkt in container.demux(stream) if pkt.size)


def hello(store: JobStore, models_dir: str | None, interrupted: list[dict]) -> dict:
    """Versions, devices, free VRAM and which models are present."""
    from .. import modelstore

    info: dict = {
        "protocol": protocol.PROTOCOL_VERSION,
        "backend_version": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "pid": os.getpid(),
        "torch": None,
        "cuda": False,
        "devices": [],
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = bool(torch.cuda.is_available())
        for i in range(torch.cuda.device_count() if info["cuda"] else 0):
            free, total = torch.cuda.mem_get_info(i)
            info["devices"].append(
                {"index": i, "name": torch.cuda.get_device_name(i), "total_vram": int(total), "free_vram": int(free)}
            )
    except Exception as exc:  # noqa: BLE001 - a broken torch is reported, not fatal
        info["torch_error"] = f"{type(exc).__name__}: {exc}"[:300]
    models = {}
    try:
        for name, spec in sorted(modelstore.all_specs().items()):
            missing = modelstore.missing_files(spec, models_dir)
            models[name] = {
                "present": not missing,
                "missing": len(missing),
                "repo_id": spec.repo_id,
                "purpose": spec.purpose,
            }
    except Exception as exc:  # noqa: BLE001
        info["models_error"] = f"{type(exc).__name__}: {exc}"[:300]
    try:
        from ..depth import MODELS as depth_models
    except Exception:  # noqa: BLE001
        depth_models = ("file",)
    counts: dict[str, int] = {}
    for j in store.list_jobs(limit=10000):
        counts[j["state"]] = counts.get(j["state"], 0) + 1
    info.update(
        {
            "models": models,
            "models_dir": str(modelstore.models_dir(models_dir)),
            "store": str(store.root),
            "allowed": [str(a) for a in store.allowed],
            "generators": list(protocol.GENERATORS),
            "depth_models": list(depth_models),
            "presets": list(protocol.PRESETS),
            "jobs": counts,
            "interrupted": [j["job"] for j in interrupted],
            "time": time.time(),
            "defaults": settings_defaults(),
        }
    )
    return info


def settings_defaults() -> dict:
    """{stage: {field: default}} of the pipeline's settings (``pipeline.settings.defaults``), for the add-on."""
    from ..pipeline.settings import defaults

    return defaults()


def store_info(store: JobStore, p: dict) -> dict:
    """Sizes of the store per stage and per shot (``pipeline.housekeeping.info``)."""
    from ..pipeline import housekeeping

    return housekeeping.info(store)


def store_clean(store: JobStore, p: dict) -> dict:
    """Remove least-recently-used stage entries (``pipeline.housekeeping.clean``); params ``older_than_days``,
    ``max_size_gb`` (neither: everything not in use), ``dry_run``."""
    from ..pipeline import housekeeping

    gb = p.get("max_size_gb")
    return housekeeping.clean(
        store,
        older_than_days=p.get("older_than_days"),
        max_size_bytes=None if gb is None else int(float(gb) * 1e9),
        dry_run=bool(p.get("dry_run", False)),
    )
