"""Helpers for the farm tests: portable job files on synthetic clips, ``ex4d run`` as a subprocess, and a
comparison of result files by their bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import service_fixtures as sf

REPO = sf.REPO


def env(**extra: str) -> dict:
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    for name in ("EX4D_SERVICE_STEP_DELAY", "EX4D_SERVICE_WRITE_DELAY"):
        e.pop(name, None)
    e.update(extra)
    return e


def ex4d(*args: str, cwd: Path | None = None, timeout: float = 300, **env_extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ex4d_backend", *args],
        cwd=cwd or REPO,
        env=env(**env_extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ex4d_run(job: Path, store: Path, *extra: str) -> dict:
    proc = ex4d("run", str(job), "--store", str(store), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def run_inproc(capfd, *args: str) -> tuple[int, str, str]:
    """``ex4d ARGS`` in this process (the same code as the console script, without a Python start-up per
    call): (exit code, stdout, stderr)."""
    from ex4d_backend.cli import main

    capfd.readouterr()
    code = main(list(args))
    out, err = capfd.readouterr()
    return code, out, err


def run_job_inproc(capfd, job: Path, store: Path, *extra: str) -> dict:
    code, out, err = run_inproc(capfd, "run", str(job), "--store", str(store), *extra)
    assert code == 0, err[-3000:]
    return json.loads(out)


def make_project(
    root: Path,
    shot: str,
    *,
    n_frames: int = 5,
    preset: str = "60",
    generate: bool = True,
    size=(64, 48),
    window: int = 0,
) -> Path:
    """A project folder holding a synthetic clip under ``shots/<shot>/`` and ``jobs/<shot>.json``, a
    portable job (paths relative to the project root). ``window``: the generation window (default: one
    window holding the whole clip; smaller: a windowed shot). Returns the job file."""
    clip = sf.make_clip(root / "shots" / shot, width=size[0], height=size[1], n_frames=n_frames)
    params = {
        "footage": f"shots/{shot}/clip",
        "depth": {"model": "file", "path": f"shots/{shot}/depth.npy"},
        "focal_px": float(clip.k[0, 0]),
        "camera": {"preset": preset},
        "renderer": "cpu",
    }
    if generate:
        fit = 4 * ((max(n_frames, 2) + 2) // 4) + 1  # the 4k + 1 window holding the clip (5 for 4 or 5 frames)
        params.update(generator="preview", width=size[0], height=size[1], num_frames=window or fit)
    job = {"ex4d_job": 1, "project_root": "..", "type": "generate" if generate else "render_guide", "params": params}
    path = root / "jobs" / f"{shot}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(job, indent=1))
    return path


def tree_bytes(folder: str | Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path -> bytes."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def result_files(result: dict) -> dict[str, bytes]:
    """The bytes of a generate/render result's frame sequences and arrays (the videos are left out:
    H.264 encoding is not bit-reproducible yet, issue 17 item 12)."""
    out = {}
    if "frames_dir" in result:
        out.update({f"frames/{k}": v for k, v in tree_bytes(result["frames_dir"]).items()})
        if "composite_dir" in result:  # the full-resolution composite (issue 14)
            out.update({f"composite/{k}": v for k, v in tree_bytes(result["composite_dir"]).items()})
        guide = Path(result["guide_dir"])
    else:
        guide = Path(result["color_dir"]).parent
    for name in ("color", "mask"):  # the PNG frames: the exact guide (the stage stores no .npy copies)
        out.update({f"{name}/{k}": v for k, v in tree_bytes(guide / name).items()})
    out["camera.npz"] = (guide / "camera.npz").read_bytes()
    return out
