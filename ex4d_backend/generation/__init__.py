"""EX-4D generation: guide (colour + mask) -> the shot seen from the new camera.

``load_generator("ex4d")`` loads Wan2.1-I2V-14B-480P with EX-4D's LoRA and camera encoder on
diffsynth 2.x (:class:`~.pipeline.Ex4dPipeline`); ``load_generator("preview")`` returns the
weight-free OpenCV :class:`~.preview.PreviewGenerator`. Both are called the same way::

    gen = load_generator("ex4d", models_dir=None, device="auto", vram_profile="full")
    frames = gen(color, mask, height=512, width=512, num_frames=49, steps=25, cfg=5.0, shift=5.0,
                 seed=0, callback=lambda stage, step, total, msg: ...)
    write_outputs(frames, "out.mp4", fps=24, frames_dir="out_frames")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from .. import constants as C
from ..errors import BAD_INPUT, Ex4dError
from .conditioning import REFERENCE_NEGATIVE, REFERENCE_PROMPT

GENERATORS = ("ex4d", "preview")


class Generator(Protocol):
    name: str

    def __call__(self, color: np.ndarray, mask: np.ndarray, **kwargs) -> np.ndarray: ...

    def close(self) -> None: ...


def load_generator(
    name: str = "ex4d",
    *,
    models_dir=None,
    device=C.DEVICE,
    vram_profile: str = C.VRAM_PROFILE,
    dtype=None,
    progress=None,
    gpus: int = 1,
    **options,
) -> Generator:
    """``"ex4d"`` (needs the weights, see ``ex4d models``) or ``"preview"`` (no weights).

    ``options`` go to :class:`~.pipeline.Ex4dPipeline` (``merge_lora``, ``compile``, ``attention``);
    the preview generator ignores them. ``gpus`` > 1: one clip on that many GPUs (CFG-parallel and
    sequence parallel, :class:`~.parallel.ParallelGenerator`; with ``device="cpu"``, CPU processes)."""
    if name == "preview":
        from .preview import PreviewGenerator

        return PreviewGenerator()
    if name == "ex4d" and gpus != 1:
        from .parallel import WAN_14B_HEADS, ParallelGenerator, WorkerSpec, plan

        plan(gpus, WAN_14B_HEADS)  # one clear error for a count that cannot split the DiT's heads
        dev = "cuda" if str(device) in ("auto", "cuda") and _cuda() else str(device)
        spec = WorkerSpec(str(models_dir) if models_dir else None, dev, vram_profile, dict(options, dtype=dtype))
        return ParallelGenerator(gpus, spec)
    if name == "ex4d":
        from .pipeline import Ex4dPipeline

        return Ex4dPipeline.from_models_dir(
            models_dir, device=device, dtype=dtype, vram_profile=vram_profile, progress=progress, **options
        )
    raise Ex4dError(
        f"unknown generator '{name}'", where="--generator", hint=f"one of {', '.join(GENERATORS)}", code=BAD_INPUT
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def write_outputs(
    frames: np.ndarray, video: str | os.PathLike | None, fps: float, frames_dir: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Write the result as an H.264 mp4 at ``fps`` and/or a PNG sequence (``frame_00000.png`` ...).

    All or nothing: the PNG folder is renamed into place only after the mp4 is complete too, so a
    failure leaves neither (and never a half-written file) at the final paths."""
    from ..atomic import atomic_path
    from ..footage import write_png_sequence, write_video

    out: dict[str, Path] = {}
    if frames_dir is None:
        if video is not None:
            out["video"] = write_video(video, frames, fps)
        return out
    with atomic_path(frames_dir) as tmp:
        write_png_sequence(tmp, frames)
        if video is not None:
            out["video"] = write_video(video, frames, fps)
    out["frames"] = Path(frames_dir)
    return out


__all__ = ["GENERATORS", "REFERENCE_NEGATIVE", "REFERENCE_PROMPT", "Generator", "load_generator", "write_outputs"]
