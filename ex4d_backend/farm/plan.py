"""The farm's task graph: each job split into steps by the hardware its stages need.

A job of type ``generate`` becomes up to three steps, each an ordinary ``ex4d run`` of a portable job file::

    depth     estimate_depth   1 GPU   (only when depth comes from a model, not from a file)
    guide     render_guide     0 GPU   (frames, DW-mesh, camera, guide; 1 GPU only with renderer "cuda")
    generate  generate         1 GPU   (0 with the preview generator)

Consecutive steps that ask for the same hardware are merged into the later one (a preview-generator job is
one CPU step; an EX-4D job with file depth is guide on a CPU host, then generate on a GPU host). Each step
depends on the one before it. A later step re-enters the earlier stages, finds them in the shared
job store (content-keyed, locked per stage) and computes only its own, so the split changes no output: the
last step is the job itself, byte for byte the result ``ex4d run JOB.json`` gives. Independent jobs share
nothing but cache entries and run in parallel.

A long shot (issue 14: ``frame_sampling`` "windows", more frames than one window) generates its windows as
ordered steps: ``generate-w0``, ``generate-w1``, ... ``generate-w<N-2>`` are the generate job with
``upto_window`` k (windows 0 .. k computed, or found in the shared store, and cached; no result written), each
depending on the one before, and the final ``generate`` step computes the last window and writes the
results. So an engine runs the windows of one shot in order (a window is conditioned on the previous one's
output) and the shots in parallel; a killed window step is retried and continues from the store. Window
steps are never merged away (each is one window of GPU work, a resumable unit). The window count comes from
the footage's frame count (``max_frames`` applied); a wrong count only changes how the work is split, never
the result: the final step is the job itself.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_bytes
from ..jobfile import JOB_FILE_VERSION, LoadedJob, complete_params, map_inputs, shot_name

log = logging.getLogger("ex4d_backend.farm")
DEPTH_MODELS_WITHOUT_GPU = ("file",)  # depth sources that need no GPU


@dataclass
class Step:
    """One task: run job ``type`` with ``params`` (a subset of the job's) on a host with ``gpus`` GPUs."""

    shot: str  # the job's name (unique within a submission)
    name: str  # depth / guide / generate / mesh / ...
    type: str
    params: dict  # input paths absolute as the submitting host resolved them
    gpus: int
    after: list[str] = field(default_factory=list)  # ids of steps that must finish first
    final: bool = False  # the job itself (its result is the job's result)
    window: int | None = None  # a window step of a long shot (params carry ``upto_window``)

    @property
    def id(self) -> str:
        return f"{self.shot}.{self.name}"


def _subset(type_: str, params: dict) -> dict:
    """The params the job type ``type_`` accepts (each type's schema lists them)."""
    from ..service import protocol

    allowed = protocol.PARAMS[type_]["properties"]
    return {k: v for k, v in params.items() if k in allowed and k != "force"}


def depth_needs_gpu(params: dict) -> bool:
    """Depth from a model (not a file) on a device other than the CPU."""
    depth = params["depth"]
    return depth["model"] not in DEPTH_MODELS_WITHOUT_GPU and depth.get("device", "auto") != "cpu"


STEP_NAMES = {"estimate_depth": "depth", "build_dwmesh": "mesh", "camera_preset": "camera", "render_guide": "guide"}


def plan_job(job: LoadedJob, shot: str) -> list[Step]:
    """The steps of one job, in order (see the module docstring)."""
    p = job.params
    depth_gpus = int(depth_needs_gpu(p))
    if job.type == "estimate_depth":
        return [Step(shot, "depth", job.type, _subset(job.type, p), depth_gpus, final=True)]
    steps: list[Step] = []
    if p["depth"]["model"] not in DEPTH_MODELS_WITHOUT_GPU:
        steps.append(Step(shot, "depth", "estimate_depth", _subset("estimate_depth", p), depth_gpus))
    guide_gpus = int(p.get("renderer") == "cuda")
    if job.type == "generate":
        steps.append(Step(shot, "guide", "render_guide", _subset("render_guide", p), guide_gpus))
        gen_gpus = 0 if p.get("generator") == "preview" or p.get("device") == "cpu" else 1
        gen_params = _subset("generate", p)
        for k in range(n_windows(p) - 1):
            steps.append(Step(shot, f"generate-w{k}", "generate", {**gen_params, "upto_window": k}, gen_gpus, window=k))
        steps.append(Step(shot, "generate", "generate", gen_params, gen_gpus, final=True))
    else:
        gpus = guide_gpus if job.type == "render_guide" else 0
        steps.append(Step(shot, STEP_NAMES[job.type], job.type, _subset(job.type, p), gpus, final=True))
    steps = _merge_same_hardware(steps)
    for before, step in zip(steps, steps[1:], strict=False):
        step.after.append(before.id)
    return steps


def footage_frames(params: dict) -> int:
    """The number of frames the job's guide will have: the footage's frame count (a video's packets, an
    image sequence's files), at most ``max_frames`` (0 = all). Nothing is decoded but the first frame."""
    from ..footage import list_image_sequence, read_footage
    from ..service.info import _count_video_frames

    path = Path(params["footage"])
    if path.is_dir():
        total = len(list_image_sequence(path))
    else:
        total = read_footage(path, max_frames=1, max_side=None).total_frames
        if total <= 1:
            total = _count_video_frames(path)
    cap = int(params.get("max_frames") or 0)
    return min(total, cap) if cap > 0 else int(total)


def n_windows(params: dict) -> int:
    """How many windows the generate job's shot has (``generation.windows.plan_windows``); 1 for
    ``frame_sampling`` "reference" or a shot that fits one window."""
    from ..errors import Ex4dError
    from ..generation.windows import plan_windows
    from ..pipeline.settings import GenerateSettings

    shot = GenerateSettings.from_params(params).shot_settings()
    if shot.sampling != "windows":
        return 1
    try:
        n = footage_frames(params)
    except (Ex4dError, OSError) as exc:  # not readable here (another host's path): one step does all windows
        log.warning("cannot count the frames of %s (%s): the shot's windows run as one step", params["footage"], exc)
        return 1
    plan = plan_windows(max(n, 1), length=shot.window, overlap=shot.overlap, variant=shot.variant)
    return len(plan.windows)


def _merge_same_hardware(steps: list[Step]) -> list[Step]:
    """A step followed by one that asks for the same GPUs is left out: the later step computes its stages
    anyway (one process start and one task fewer; the split only pays where the hardware changes)."""
    out: list[Step] = []
    for step in steps:
        if out and out[-1].gpus == step.gpus and out[-1].window is None:
            out.pop()
        out.append(step)
    return out


def plan_jobs(jobs: list[LoadedJob]) -> list[Step]:
    """All steps of several jobs; shot names are the job files' stems, made unique."""
    steps: list[Step] = []
    seen: dict[str, int] = {}
    for job in jobs:
        base = shot_name(job.path.stem)
        n = seen.get(base, 0)
        seen[base] = n + 1
        steps += plan_job(job, base if n == 0 else f"{base}-{n}")
    return steps


def write_step_files(steps: list[Step], jobs_dir: Path, roots: dict[str, Path]) -> dict[str, Path]:
    """One portable job file per step in ``jobs_dir`` (``<shot>.<step>.json``), inputs relative to the
    shot's project root, ``project_root`` relative to ``jobs_dir`` (so the folder and the project can move
    together, or be path-mapped). Returns step id -> file."""
    jobs_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for step in steps:
        root = roots[step.shot]
        full = complete_params(step.type, step.params)  # settings in full: the exporter's defaults travel
        rel = map_inputs(full, lambda _f, p, root=root: _portable(p, root))
        doc = {
            "ex4d_job": JOB_FILE_VERSION,
            "project_root": Path(os.path.relpath(root, jobs_dir)).as_posix(),
            "type": step.type,
            "params": rel,
        }
        path = jobs_dir / f"{step.id}.json"
        write_bytes(path, (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode())
        out[step.id] = path
    return out


def _portable(path: str, root: Path) -> str:
    """Relative to the project root when inside it, else absolute (a worker's --path-map then applies)."""
    p = Path(path).resolve()
    return p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)
