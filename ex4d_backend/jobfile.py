"""Portable job files: the same ``JOB.json`` runs unchanged on any worker that sees the shared storage.

A job file is the request of PROTOCOL.md without its id, plus three optional fields of its own::

    {
      "ex4d_job": 1,                   # version of this file format (JOB_FILE_VERSION)
      "project_root": "..",            # inputs' base folder, relative to the job file's folder (default ".")
      "backend_version": "0.1.0",      # informational: the backend that wrote it
      "type": "generate",
      "params": {"footage": "shots/a/footage/a.mp4", "depth": {"model": "file", "path": "shots/a/depth.npz"},
                 ... every setting spelled out ...}
    }

Input paths (``INPUT_FIELDS``: the footage, a depth file, a camera file) are resolved, in this order:

1. an absolute path goes through the path map (``--path-map /mnt/a=/shots/a``, repeatable; the longest
   matching prefix wins, whole path components only; ``\\`` and ``/`` are the same separator, so a Windows
   artist's ``Z:\\shots=/mnt/shots`` works);
2. a relative path is joined to the project root: ``--project-root`` if given, else the file's
   ``project_root`` (itself relative to the job file's folder, or absolute and path-mapped), else the job
   file's folder.

Files written by :func:`write_job` carry their settings in full (:func:`complete_params`: every default
spelled out, so a worker whose backend has other defaults still computes the same shot) and relative input
paths. :func:`collect` copies a shot's inputs into a project folder and writes such a job there.
Older job files (``{"type", "params"}`` only, as the service stores them) load the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from . import __version__
from .atomic import atomic_path, write_bytes
from .errors import NOT_FOUND, Ex4dError

JOB_FILE_VERSION = 1
FILE_FIELDS = ("ex4d_job", "project_root", "backend_version")  # job-file fields beside type/params
# Params holding input paths (source_camera, depth_scale: a moving source, issue 15).
INPUT_FIELDS = (("footage",), ("depth", "path"), ("camera", "file"), ("source_camera", "file"), ("depth_scale", "file"))


@dataclass(frozen=True)
class PathMap:
    """One ``SRC=DST`` rule: an absolute path under SRC (whole components) is read under DST."""

    src: str
    dst: str

    @classmethod
    def parse(cls, text: str) -> PathMap:
        src, sep, dst = text.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise Ex4dError(
                f"a path map must look like SRC=DST, got {text[:200]!r}",
                where="--path-map",
                hint="e.g. --path-map /mnt/shots=/shots (repeatable)",
            )
        return cls(_norm(src), _norm(dst))

    def apply(self, path: str) -> str | None:
        p = _norm(path)
        if p == self.src:
            return self.dst
        prefix = self.src if self.src.endswith("/") else self.src + "/"
        if p.startswith(prefix):
            return self.dst.rstrip("/") + "/" + p[len(prefix) :]
        return None


def _norm(path: str) -> str:
    p = path.strip().replace("\\", "/")
    return p if p in ("/",) or re.fullmatch(r"[A-Za-z]:/", p) else p.rstrip("/")


def parse_path_maps(texts: Iterable[str] | None) -> list[PathMap]:
    """``SRC=DST`` strings -> rules, longest source first (the most specific rule wins)."""
    maps = [PathMap.parse(t) for t in texts or ()]
    return sorted(maps, key=lambda m: len(m.src), reverse=True)


def _is_absolute(path: str) -> bool:
    return path.startswith(("/", "\\")) or bool(re.match(r"[A-Za-z]:[\\/]", path)) or path.startswith("~")


def map_path(path: str, maps: Sequence[PathMap]) -> str:
    """An absolute path through the first (longest) matching rule; unchanged if none matches."""
    for m in maps:
        mapped = m.apply(path)
        if mapped is not None:
            return mapped
    return path


def resolve_input(path: str, root: Path, maps: Sequence[PathMap]) -> str:
    """Where a worker reads one input path of a job file (see the module docstring)."""
    if _is_absolute(path):
        return str(Path(map_path(path, maps)).expanduser())
    if re.match(r"[A-Za-z]:", path):
        raise Ex4dError(f"unusable input path {path[:200]!r}", hint="write paths relative to the project root")
    return str(root / Path(*PurePosixPath(path.replace("\\", "/")).parts))


def _get(params: dict, field: tuple[str, ...]):
    obj = params
    for name in field[:-1]:
        obj = obj.get(name) if isinstance(obj, dict) else None
    return obj.get(field[-1]) if isinstance(obj, dict) and isinstance(obj.get(field[-1]), str) else None


def _set(params: dict, field: tuple[str, ...], value: str) -> None:
    obj = params
    for name in field[:-1]:
        obj = obj[name]
    obj[field[-1]] = value


def input_paths(params: dict) -> dict[tuple[str, ...], str]:
    """The input paths a job's params name, by field."""
    return {f: v for f in INPUT_FIELDS if (v := _get(params, f)) is not None}


def map_inputs(params: dict, fn) -> dict:
    """A deep copy of ``params`` with every input path replaced by ``fn(field, path)``."""
    out = json.loads(json.dumps(params))
    for field, value in input_paths(out).items():
        _set(out, field, fn(field, value))
    return out


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
@dataclass
class LoadedJob:
    path: Path  # the job file
    type: str
    params: dict  # validated, input paths absolute (as this worker sees them)
    root: Path  # the project root the relative inputs were joined to
    version: int | None  # the file's ex4d_job field (None: a plain service job file)


def read_job_file(path: str | os.PathLike) -> dict:
    """The job file's JSON object (strict: no NaN); Ex4dError if unreadable."""
    from .service import protocol

    job_path = Path(path).expanduser()
    if not job_path.is_file():
        raise Ex4dError("job file not found", where=str(job_path), code=NOT_FOUND)
    try:
        job = protocol.loads_strict(job_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise Ex4dError(f"the job file is not valid JSON: {exc}", where=str(job_path)) from None
    if not isinstance(job, dict):
        raise Ex4dError('a job file is a JSON object {"type": ..., "params": {...}}', where=str(job_path))
    return job


def project_root_of(job: dict, job_path: Path, maps: Sequence[PathMap], project_root: str | None = None) -> Path:
    """The folder relative inputs are joined to (``project_root`` argument > file field > job folder)."""
    if project_root:
        return Path(map_path(str(project_root), maps)).expanduser().resolve()
    field = job.get("project_root")
    if field is None:
        return job_path.parent.resolve()
    if not isinstance(field, str) or not field:
        raise Ex4dError("the job file's project_root must be a folder path", where=f"{job_path}: project_root")
    return Path(resolve_input(field, job_path.parent.resolve(), maps)).resolve()


def load_job(
    path: str | os.PathLike, *, path_maps: Iterable[str] | Sequence[PathMap] = (), project_root: str | None = None
) -> LoadedJob:
    """Read, check and resolve a job file for this worker (Ex4dError, exit 2, on anything wrong)."""
    from .service import jobs, protocol

    job_path = Path(path).expanduser().resolve()
    maps = _maps(path_maps)
    job = read_job_file(job_path)
    version = job.get("ex4d_job")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
        raise Ex4dError("the job file's ex4d_job field must be a positive integer", where=str(job_path))
    if isinstance(version, int) and version > JOB_FILE_VERSION:
        raise Ex4dError(
            f"the job file has format version {version}; this backend reads up to {JOB_FILE_VERSION}",
            where=str(job_path),
            hint="update the backend on this worker",
        )
    root = project_root_of(job, job_path, maps, project_root)
    request = {k: v for k, v in job.items() if k not in FILE_FIELDS}
    try:
        type_, params = jobs.check_job_file(request)
    except protocol.ProtocolError as exc:
        raise Ex4dError(exc.message, where=str(job_path), hint=exc.hint or "see PROTOCOL.md", code=exc.code) from None
    params = map_inputs(params, lambda _f, p: resolve_input(p, root, maps))
    return LoadedJob(job_path, type_, params, root, version)


def _maps(path_maps) -> list[PathMap]:
    items = list(path_maps or ())
    if all(isinstance(m, PathMap) for m in items):
        return sorted(items, key=lambda m: len(m.src), reverse=True)
    return parse_path_maps(items)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def complete_params(type_: str, params: dict) -> dict:
    """``params`` with every setting the job type has spelled out at this backend's defaults."""
    from .service import protocol

    out = json.loads(json.dumps(params))
    allowed = set(protocol.PARAMS[type_]["properties"])
    for name, value in setting_defaults(out).items():
        if name in allowed and name not in out:
            out[name] = value
    out.pop("force", None)
    return out


def setting_defaults(params: dict) -> dict:
    """This backend's defaults for the settings a job may leave out (the values the stages apply): the
    stage settings dataclasses' (``pipeline.settings``, defined once in ``constants``; prompts resolved)."""
    from .pipeline.settings import defaults as stage_defaults

    d = stage_defaults()
    defaults = {**d["frames"], **d["mesh"], **d["render"], **d["generate"]}
    if "lens" not in params and "focal_px" not in params:
        from .cameras import REFERENCE_FOCAL_PX

        defaults["focal_px"] = float(REFERENCE_FOCAL_PX)
    return defaults


def relative_to_root(path: str, root: Path) -> str:
    """``path`` relative to ``root`` in POSIX form; Ex4dError if it lies outside."""
    p = Path(path).expanduser().resolve()
    try:
        return p.relative_to(root.resolve()).as_posix() or "."
    except ValueError:
        raise Ex4dError(
            "an input lies outside the project folder",
            where=str(p),
            hint="collect the shot first (`ex4d farm collect JOB.json PROJECT_DIR`) or use --path-map",
        ) from None


def job_document(type_: str, params: dict, *, project_root: str | None = None) -> dict:
    doc: dict = {"ex4d_job": JOB_FILE_VERSION, "backend_version": __version__}
    if project_root is not None:
        doc["project_root"] = project_root
    doc.update({"type": type_, "params": params})
    return doc


def write_job(path: str | os.PathLike, type_: str, params: dict, root: str | os.PathLike) -> Path:
    """Write a portable job file at ``path``: settings in full, inputs relative to ``root`` (which must
    hold them), ``project_root`` relative to the file's folder. Atomic; returns the path."""
    path = Path(path).expanduser().resolve()
    root = Path(root).expanduser().resolve()
    full = complete_params(type_, params)
    rel = map_inputs(full, lambda _f, p: relative_to_root(p, root))
    doc = job_document(type_, rel, project_root=Path(os.path.relpath(root, path.parent)).as_posix())
    write_bytes(path, (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode())
    return path


# ----------------------------------------------------------------------------------------------
# Collect
# ----------------------------------------------------------------------------------------------
COLLECT_FOLDERS = {
    ("footage",): "footage",
    ("depth", "path"): "depth",
    ("camera", "file"): "camera",
    ("source_camera", "file"): "source_camera",
    ("depth_scale", "file"): "depth_scale",
}


def shot_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "shot"
    return name[:64]


def collect(
    job_file: str | os.PathLike,
    project_dir: str | os.PathLike,
    *,
    shot: str | None = None,
    path_maps: Iterable[str] = (),
    project_root: str | None = None,
    job_name: str | None = None,
) -> Path:
    """Copy a job's inputs (footage file or image-sequence folder, depth file or folder, camera file)
    into ``<project_dir>/shots/<shot>/<footage|depth|camera>/`` and write the portable job
    ``<project_dir>/jobs/<shot>.json`` (inputs relative to ``project_dir``). Inputs already inside
    ``project_dir`` stay where they are. Never overwrites: an existing file with other content is an
    error; identical content is reused. ``job_name``: the job file's name (default: the shot's), so several
    jobs of one shot (other cameras, settings) share the shot's input copies. Returns the new job file's path."""
    loaded = load_job(job_file, path_maps=path_maps, project_root=project_root)
    project = Path(project_dir).expanduser().resolve()
    name = shot_name(shot or loaded.path.stem)
    dest_job = project / "jobs" / f"{shot_name(job_name) if job_name else name}.json"
    sources = input_paths(loaded.params)
    for field, src in sources.items():
        if not Path(src).exists():
            raise Ex4dError(f"the {COLLECT_FOLDERS[field]} input does not exist", where=src, code=NOT_FOUND)
    placed: dict[tuple[str, ...], str] = {}
    for field, src in sources.items():
        s = Path(src).resolve()
        if s == project or s.is_relative_to(project):
            placed[field] = str(s)
            continue
        dst = project / "shots" / name / COLLECT_FOLDERS[field] / s.name
        _copy_input(s, dst)
        placed[field] = str(dst)
    params = map_inputs(loaded.params, lambda f, _p: placed[f])
    if dest_job.exists():  # collected before: the same job again is fine, another one is refused
        old = read_job_file(dest_job)
        fresh = load_job(dest_job)
        if old.get("type") != loaded.type or fresh.params != complete_params(loaded.type, params):
            raise Ex4dError(
                "another job of that shot name is already collected",
                where=str(dest_job),
                hint="collect under another name (--shot) or remove the old job file yourself",
            )
        return dest_job
    dest_job.parent.mkdir(parents=True, exist_ok=True)
    return write_job(dest_job, loaded.type, params, project)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _copy_input(src: Path, dst: Path) -> None:
    """Copy a file or folder to ``dst`` atomically; reuse an identical copy, refuse a different one."""
    if dst.exists():
        if src.is_dir() == dst.is_dir() and _digest(src) == _digest(dst):
            return
        raise Ex4dError(
            "another file of that name is already collected",
            where=str(dst),
            hint="collect the shot under another name (--shot) or remove the old copy yourself",
        )
    with atomic_path(dst) as tmp:
        if src.is_dir():
            shutil.copytree(src, tmp, symlinks=False)
        else:
            shutil.copy2(src, tmp)
