"""Shot history: every generated result is a version folder (``outputs.version_dir``) with, NEXT TO it,
``<version>.json`` (the sidecar: generator, prompt, cfg, steps, seed, camera hash, size, date, frame range,
the job file's name) and ``<version>.png`` (a thumbnail of the middle frame); inside it the frames,
``settings.json`` and ``job.json`` (``ex4d run`` re-runs it; its paths are relative to the folder).

This module is the functional part (no UI): record a version, list a shot's versions, move one to the
shot's ``.trash`` folder, and the generate settings a version was made with. The thumbnail is written by
the backend's Python (``python -m ex4d_backend.thumbnail``) in a worker thread, never on the main thread.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

SIDECAR = ".json"  # <version>.json next to the version folder
THUMBNAIL = ".png"  # <version>.png next to the version folder
TRASH = ".trash"  # <shot>/.trash/<version>-<UTC stamp>/ holds deleted versions (never removed by the add-on)
VERSION_RE = re.compile(r"^(?P<prefix>.+)_v(?P<n>\d{3,})$")

_thumb_threads: list[threading.Thread] = []


def sidecar_path(version: Path) -> Path:
    return version.with_name(version.name + SIDECAR)


def thumbnail_path(version: Path) -> Path:
    return version.with_name(version.name + THUMBNAIL)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def record_version(version: Path, meta: dict, scene, backend_python: str | None) -> dict:
    """Add the history fields to a result's ``meta`` (date, frame range, sidecar and thumbnail names), write
    the sidecar ``<version>.json`` and start the thumbnail (worker thread). Returns ``meta``."""
    n = len([p for p in version.iterdir() if p.name.startswith("frame_")]) if version.is_dir() else 0
    meta.update(
        {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "frame_start": int(scene.frame_start),
            "frame_end": int(scene.frame_start) + max(n, 1) - 1,
            "thumbnail": thumbnail_path(version).name,
            "folder": version.name,
        }
    )
    _write_json_atomic(sidecar_path(version), meta)
    if backend_python:
        start_thumbnail(version, backend_python)
    return meta


def start_thumbnail(version: Path, backend_python: str) -> threading.Thread:
    """Write ``<version>.png`` with the backend's Python in a daemon thread (returns at once)."""

    def work() -> None:
        try:
            subprocess.run(
                [backend_python, "-m", "ex4d_backend.thumbnail", str(version), str(thumbnail_path(version))],
                capture_output=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"EX-4D: thumbnail of {version.name} failed: {exc}")

    t = threading.Thread(target=work, daemon=True, name=f"ex4d-thumb-{version.name}")
    t.start()
    _thumb_threads.append(t)
    return t


def thumbnails_pending() -> bool:
    _thumb_threads[:] = [t for t in _thumb_threads if t.is_alive()]
    return bool(_thumb_threads)


def wait_thumbnails(timeout: float = 60.0) -> bool:
    """Wait for the thumbnail threads (scripts, tests); True when all finished."""
    deadline = time.monotonic() + timeout
    for t in list(_thumb_threads):
        t.join(max(0.0, deadline - time.monotonic()))
    return not thumbnails_pending()


def list_versions(shot_dir: Path) -> list[dict]:
    """The shot's versions, oldest first: each sidecar's dict plus ``path`` (the version folder, absolute)
    and ``thumbnail_file`` ("" until the thumbnail exists). Folders without a sidecar (a generation that did
    not finish: a reserved, empty folder) are not versions. Reads the disk: call from an operator, never from ``draw``."""
    out: list[dict] = []
    if not shot_dir.is_dir():
        return out
    for folder in sorted(shot_dir.iterdir()):
        if not VERSION_RE.match(folder.name) or not folder.is_dir():
            continue
        side = sidecar_path(folder)
        if not side.is_file():  # a version from before the sidecars: its settings.json
            side = folder / "settings.json"
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        thumb = thumbnail_path(folder)
        meta.update(path=str(folder), thumbnail_file=str(thumb) if thumb.is_file() else "")
        out.append(meta)
    out.sort(key=lambda m: (m.get("date", ""), m["path"]))
    return out


def trash_version(version: Path) -> Path:
    """Move a version (its folder, sidecar and thumbnail) to ``<shot>/.trash/<version>-<UTC stamp>/``;
    nothing is deleted. Returns the trash folder."""
    if not VERSION_RE.match(version.name) or not version.is_dir():
        raise ValueError(f"not a version folder: {version}")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    dest = version.parent / TRASH / f"{version.name}-{stamp}"
    dest.mkdir(parents=True)
    for p in (sidecar_path(version), thumbnail_path(version)):
        if p.exists():
            os.replace(p, dest / p.name)
    os.replace(version, dest / version.name)
    return dest


# The generate settings a version holds -> (scene.ex4d / scene.ex4d_job field, value) to re-run it.
GENERATOR_ENUM = {"ex4d": "EX4D", "preview": "PREVIEW"}


def rerun_settings(meta: dict) -> dict[str, dict]:
    """{"ex4d": {...}, "ex4d_job": {...}}: the scene fields Generate reads, from a version's sidecar."""
    s = meta.get("settings") or {}

    def get(name, default=None):
        return meta.get(name, s.get(name, default))

    ex4d = {"seed": int(get("seed", 0)), "steps": int(get("steps", 1)), "prompt": str(get("prompt", "") or "")}
    gen = GENERATOR_ENUM.get(str(get("generator", "")))
    if gen:
        ex4d["generator"] = gen
    job = {
        "cfg": float(get("cfg", 5.0)),
        "shift": float(get("shift", 5.0)),
        "negative_prompt": str(get("negative_prompt", "") or ""),
    }
    for name in ("width", "height", "num_frames"):
        if s.get(name) or meta.get(name):
            job[name] = int(s.get(name) or meta.get(name))
    return {"ex4d": ex4d, "ex4d_job": job}
