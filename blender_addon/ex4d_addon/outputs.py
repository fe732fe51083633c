"""Where results go, next to the .blend: one folder per shot, one per guide camera and one VERSION per
generation (never overwritten), paths stored relative to the .blend (``//``) so a project folder can move.

Layout: ``<output_dir>/<shot>/guide_<camera hash>/{color,mask}/frame_<scene frame>.png`` and
``<output_dir>/<shot>/<generator>_<camera hash>_v<NNN>/frame_<scene frame>.png`` + ``settings.json`` +
``job.json`` (the backend's job file with its input paths relative to that folder, so ``ex4d run`` runs it
from wherever the project is).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Generator
from pathlib import Path

import bpy
import numpy as np

from . import data, props
from .runner import SLICE_BUDGET, time_left

VERSION_DIGITS = 3


def rel(path: str | os.PathLike) -> str:
    """``path`` relative to the saved .blend (``//...``) when it can be, so a moved project still works."""
    path = str(path)
    if bpy.data.filepath:
        try:
            return bpy.path.relpath(path)
        except ValueError:  # another drive (Windows)
            pass
    return path


def output_root(context) -> tuple[Path, str]:
    """(``ex4d_job.output_dir`` made absolute, a warning or ""). A relative folder of an unsaved .blend
    lands in the add-on's user folder, and the warning says so."""
    out = context.scene.ex4d_job.output_dir or "//ex4d"
    if out.startswith("//") and not bpy.data.filepath:
        root = props.data_dir("unsaved") / out[2:].strip("/\\")
        return root, f"the .blend is not saved: results go to {root} (save the file to keep them next to it)"
    return Path(bpy.path.abspath(out)), ""


def shot_name(context) -> str:
    """A folder-safe name of the footage: its stem (or sequence folder) plus a short hash of the footage
    path as stored (relative to the .blend when saved), so two clips both named ``input.mp4`` never share
    a folder while a moved project keeps its folders."""
    stored = context.scene.ex4d.footage_path.rstrip("/\\")
    path = bpy.path.abspath(stored)
    stem = Path(path).stem if path else context.scene.name
    digest = hashlib.sha1(stored.replace("\\", "/").encode()).hexdigest()[:6]
    return f"{bpy.path.clean_name(stem) or 'shot'}_{digest}"


def version_dir(shot_dir: Path, prefix: str, job_key: str) -> tuple[Path, bool]:
    """(folder, existing) for a result: the existing version made by the same backend job (identical
    settings: reused, nothing duplicated), else the next free ``<prefix>_v<NNN>``, created empty here
    (``os.mkdir`` of the next number in a loop: two writers never get the same folder)."""
    versions = sorted(shot_dir.glob(f"{prefix}_v" + "[0-9]" * VERSION_DIGITS)) if shot_dir.is_dir() else []
    for v in versions:
        try:
            meta = json.loads((v / "settings.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if job_key and meta.get("job") == job_key:
            return v, True
    trashed = [t.name.rsplit("-", 1)[0] for t in shot_dir.glob(f".trash/{prefix}_v*-*")]  # history.trash_version
    n = max([int(v.name.rsplit("_v", 1)[1]) for v in versions] + [_number(t) for t in trashed] + [0]) + 1
    shot_dir.mkdir(parents=True, exist_ok=True)
    while True:  # reserve the folder atomically: another Blender writing at once takes the next number
        folder = shot_dir / f"{prefix}_v{n:0{VERSION_DIGITS}d}"
        try:
            folder.mkdir()
        except FileExistsError:
            n += 1
            continue
        return folder, False


def _number(name: str) -> int:
    """The version number of ``<prefix>_v<NNN>`` (0 if it is none): a deleted number is never reused."""
    tail = name.rsplit("_v", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _install_dir(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the complete folder ``tmp`` (the old one is removed only afterwards); an empty
    ``final`` (a version folder reserved by ``version_dir``) stays in place and receives ``tmp``'s files."""
    if final.is_dir() and not any(final.iterdir()):
        for f in tmp.iterdir():
            os.replace(f, final / f.name)
        tmp.rmdir()
        return
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def copy_sequence(src_files: list[Path], dest: Path, first_frame: int) -> Generator[None, None, list[Path]]:
    """Copy frames to ``dest/frame_<scene frame>.png`` (scene frame = first_frame + i), atomically, in
    slices of about ``SLICE_BUDGET`` seconds (a generator for the job runner)."""
    import time

    tmp = dest.with_name(dest.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    for i, f in enumerate(src_files):
        if not time_left(t0, SLICE_BUDGET):
            yield
            t0 = time.perf_counter()
        shutil.copyfile(f, tmp / f"frame_{first_frame + i:05d}{f.suffix.lower()}")
    _install_dir(tmp, dest)
    return data.sorted_images(dest)


def retime_indices(source_frames: list[int], n_clip: int) -> list[int]:
    """For each clip frame i, the generated frame to show: the first one made from clip frame i, else the
    last one made from an earlier clip frame (the generator samples ``num_frames`` of the clip)."""
    src = np.asarray(source_frames, dtype=np.int64)
    out = []
    for i in range(n_clip):
        j = int(np.searchsorted(src, i, side="left"))
        if j >= len(src) or src[j] != i:
            j = max(0, int(np.searchsorted(src, i, side="right")) - 1)
        out.append(j)
    return out


PATH_KEYS = (("footage",), ("depth", "path"), ("camera", "file"))


def write_job_file(type_: str, params: dict, dest: Path) -> Path:
    """Write the job ``{"type", "params"}`` (a backend request without its id: what ``ex4d run`` and
    ``ex4d farm collect`` read) to ``dest/job.json``, its input paths relative to ``dest`` (PROTOCOL.md:
    relative paths in a job file are relative to its folder). The one writer of job files: the copy
    beside a local result and the job a farm submission collects."""
    params = json.loads(json.dumps(params))  # a deep copy: the caller's params keep their paths
    for keys in PATH_KEYS:
        holder = params
        for k in keys[:-1]:
            holder = holder.get(k) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and isinstance(holder.get(keys[-1]), str):
            try:
                holder[keys[-1]] = os.path.relpath(holder[keys[-1]], dest)
            except ValueError:  # another drive (Windows): keep it absolute
                pass
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / "job.json"
    out.write_text(json.dumps({"type": type_, "params": params}, indent=1), encoding="utf-8")
    return out


def portable_job_file(job_file: str, dest: Path) -> Path | None:
    """Copy the backend's ``job.json`` to ``dest/job.json`` through :func:`write_job_file`; None if there
    is none."""
    try:
        job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return write_job_file(job.get("type", ""), job.get("params", {}), dest)
