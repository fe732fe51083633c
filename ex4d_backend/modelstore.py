"""Model management: where weights live, what each model needs, download, verify, list.

The models directory is, in order: the ``models_dir`` argument (CLI ``--models-dir``), the
``EX4D_MODELS_DIR`` environment variable, or ``<user cache>/ex4d/models`` (``$XDG_CACHE_HOME`` or
``~/.cache``). Each model lives in its own sub-folder named after its Hugging Face repository, e.g.
``<models>/Wan-AI/Wan2.1-I2V-14B-480P/``, with the files in the published layout (so a folder copied
from a Hugging Face download, or from another machine, works as is).

Model specifications are registered by the modules that use them (depth: ``ex4d_backend.depth.specs``;
generation: ``ex4d_backend.generation.specs``), each exposing ``SPECS: list[ModelSpec]``.

``verify`` never runs a model: it checks that every file is present, has the published size when the
spec knows it, parses (JSON configs; safetensors headers against the file length; ``.pth``/``.ckpt``
zip directories), and then runs the spec's own ``check`` (for example: build the model on the meta
device from its config and compare every tensor name and shape with the weight files).
This module never imports torch; a spec's ``check`` may.
"""

from __future__ import annotations

import importlib
import json
import os
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MODEL_INVALID, MODEL_MISSING, Ex4dError

SPEC_MODULES = ("ex4d_backend.depth.specs", "ex4d_backend.generation.specs")

Progress = Callable[[str, int, int, str], None]


@dataclass(frozen=True)
class ModelFile:
    path: str  # relative to the model's folder, '/'-separated
    size: int | None = None  # bytes of the published file, when known (checked by verify)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # our name, used on the CLI (e.g. "depthcrafter", "wan2.1-i2v-14b-480p", "ex4d")
    repo_id: str  # Hugging Face repository, also the sub-folder of the models directory
    files: tuple[ModelFile, ...]
    purpose: str = ""  # one line for `ex4d models list`
    extra: dict = field(default_factory=dict)
    # Other specs this model cannot run without (downloaded / verified together), by name.
    requires: tuple[str, ...] = ()
    # "package.module:function" called as function(folder: Path) by verify; raises Ex4dError
    # (code MODEL_INVALID) when the weights cannot be loaded. Imported lazily (may import torch).
    check: str | None = None
    license: str = ""  # licence of the published weights, shown by `ex4d models list`
    gated: bool = False  # the Hugging Face repository needs an accepted licence + token to download


def models_dir(override: str | os.PathLike | None = None) -> Path:
    """The models directory (see the module docstring for the lookup order)."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("EX4D_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "ex4d" / "models"


def all_specs() -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    for mod_name in SPEC_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name and mod_name.startswith(exc.name):
                continue
            raise
        for spec in mod.SPECS:
            specs[spec.name] = spec
    return specs


def get_spec(name: str) -> ModelSpec:
    specs = all_specs()
    if name not in specs:
        raise Ex4dError(f"unknown model '{name}'", hint=f"known models: {', '.join(sorted(specs))}")
    return specs[name]


def with_requirements(name: str) -> list[ModelSpec]:
    """The spec ``name`` and, recursively, the specs it requires (each once, requirements first)."""
    out: list[ModelSpec] = []

    def visit(n: str) -> None:
        spec = get_spec(n)
        if spec in out:
            return
        for dep in spec.requires:
            visit(dep)
        out.append(spec)

    visit(name)
    return out


def model_folder(spec: ModelSpec, root: str | os.PathLike | None = None) -> Path:
    return models_dir(root) / spec.repo_id


def weights_fingerprint(names: list[str], models_dir: str | os.PathLike | None = None) -> list:
    """[repo, file, size, mtime_ns] of every weight file of the models ``names`` and what they require
    (files absent are left out). Part of cache keys, so replacing weights never reuses old results."""
    out = []
    for name in names:
        for spec in with_requirements(name):
            folder = model_folder(spec, models_dir)
            for f in spec.files:
                try:
                    st = (folder / f.path).stat()
                except OSError:
                    continue
                out.append([spec.repo_id, f.path, st.st_size, st.st_mtime_ns])
    return out


def missing_files(spec: ModelSpec, root: str | os.PathLike | None = None) -> list[str]:
    folder = model_folder(spec, root)
    return [f.path for f in spec.files if not (folder / f.path).is_file()]


def _missing_error(spec: ModelSpec, folder: Path, missing: list[str]) -> Ex4dError:
    shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
    gated = " (a gated repository: accept its licence on huggingface.co and set HF_TOKEN)" if spec.gated else ""
    return Ex4dError(
        f"model '{spec.name}' is missing {len(missing)} file(s): {shown}",
        where=str(folder),
        hint=(
            f"run `ex4d models download {spec.name}` when online{gated}, or copy the files of the Hugging Face "
            f"repository {spec.repo_id} into {folder}"
        ),
        code=MODEL_MISSING,
    )


def require(name: str, root: str | os.PathLike | None = None) -> Path:
    """The model's folder, or one clear error naming the repository, the missing files and the folder.

    Checks presence only (cheap); ``verify`` does the thorough check.
    """
    spec = get_spec(name)
    folder = model_folder(spec, root)
    missing = missing_files(spec, root)
    if missing:
        raise _missing_error(spec, folder, missing)
    return folder


def require_all(names: list[str], root: str | os.PathLike | None = None) -> list[Path]:
    """The folders of several models, or ONE error naming every missing model, its repository and its
    missing files at once (so the user downloads everything in one go)."""
    folders, problems = [], []
    for name in names:
        spec = get_spec(name)
        folder = model_folder(spec, root)
        missing = missing_files(spec, root)
        folders.append(folder)
        if missing:
            problems.append((spec, folder, missing))
    if len(problems) == 1:
        raise _missing_error(*problems[0])
    if problems:
        parts = [f"'{s.name}' ({len(m)} file(s) from {s.repo_id})" for s, _, m in problems]
        gated = [s.repo_id for s, _, _ in problems if s.gated]
        raise Ex4dError(
            f"{len(problems)} models are missing: {', '.join(parts)}",
            where=str(models_dir(root)),
            hint=(
                f"run `ex4d models download {' '.join(s.name for s, _, _ in problems)}` when online"
                + (
                    f" (gated: {', '.join(gated)}: accept the licence on huggingface.co and set HF_TOKEN)"
                    if gated
                    else ""
                )
                + ", or copy the files of the Hugging Face repositories "
                + ", ".join(f"{s.repo_id} into {f}" for s, f, _ in problems)
            ),
            code=MODEL_MISSING,
        )
    return folders


# ----------------------------------------------------------------------------------------------
# Verify


@dataclass
class VerifyResult:
    name: str
    folder: Path
    ok: bool
    problems: list[str]  # one line each; empty when ok


def safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """The tensors of a ``.safetensors`` file: name -> {"dtype", "shape", "data_offsets"}.

    Reads only the header; raises ``Ex4dError(MODEL_INVALID)`` when the header is unreadable or the
    file is shorter or longer than the header says (a truncated or corrupt download).
    """
    p = Path(path)
    size = p.stat().st_size
    try:
        with open(p, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n <= 0 or n > min(size - 8, 100_000_000):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(fh.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise Ex4dError(
            f"not a readable safetensors file ({exc})",
            where=str(p),
            hint="the file is corrupt or incomplete: delete it and download it again",
            code=MODEL_INVALID,
        ) from None
    header.pop("__metadata__", None)
    end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    if 8 + n + end != size:
        raise Ex4dError(
            f"safetensors file is {size} bytes but its header describes {8 + n + end}",
            where=str(p),
            hint="the file is truncated or corrupt: delete it and download it again",
            code=MODEL_INVALID,
        )
    return header


@dataclass(frozen=True)
class TensorMismatch:
    """How a file's tensors (name -> shape) differ from a model's: names sorted. False when they do not;
    ``str()``: the counts with one example each, "; "-joined."""

    missing: list[str]
    unexpected: list[str]
    wrong: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (name, found shape, expected shape)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong)

    def __str__(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing tensor(s) (e.g. {self.missing[0]})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected tensor(s) (e.g. {self.unexpected[0]})")
        if self.wrong:
            k, got, want = self.wrong[0]
            parts.append(f"{len(self.wrong)} tensor(s) of the wrong shape (e.g. {k}: {got} != {want})")
        return "; ".join(parts)


def tensor_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> TensorMismatch:
    """What keeps ``found`` (name -> shape) from having exactly the names and shapes of ``expected``."""
    both = sorted(set(expected) & set(found))
    return TensorMismatch(
        missing=sorted(set(expected) - set(found)),
        unexpected=sorted(set(found) - set(expected)),
        wrong=[(k, tuple(found[k]), tuple(expected[k])) for k in both if tuple(expected[k]) != tuple(found[k])],
    )


def compare_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise ``Ex4dError(MODEL_INVALID)`` unless ``found`` has exactly the names and shapes of ``expected``."""
    mismatch = tensor_mismatch(expected, found)
    if mismatch:
        raise Ex4dError(
            f"the weights do not match the model's configuration: {mismatch}",
            where=where,
            hint="the folder holds another model or version: download it again",
            code=MODEL_INVALID,
        )


def _check_file(path: Path, expected_size: int | None) -> None:
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise Ex4dError(
            f"{path.name} is {size} bytes, the published file is {expected_size}",
            where=str(path),
            hint="the file is incomplete or another version: delete it and download it again",
            code=MODEL_INVALID,
        )
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise Ex4dError(
                f"not valid JSON ({exc})", where=str(path), hint="download the file again", code=MODEL_INVALID
            ) from None
    elif suffix == ".safetensors":
        safetensors_header(path)
    elif suffix in (".pth", ".pt", ".ckpt", ".bin"):
        # torch.save files are zip archives: a truncated file has no readable central directory.
        if zipfile.is_zipfile(path):
            try:
                with zipfile.ZipFile(path) as zf:
                    zf.infolist()
            except (zipfile.BadZipFile, OSError) as exc:
                raise Ex4dError(
                    f"corrupt weight file ({exc})", where=str(path), hint="download it again", code=MODEL_INVALID
                ) from None
        elif size < 1024:
            raise Ex4dError(
                f"weight file of only {size} bytes (a Git LFS pointer?)",
                where=str(path),
                hint="download the real file (git lfs pull or `ex4d models download`)",
                code=MODEL_INVALID,
            )


def _run_check(spec: ModelSpec, folder: Path) -> None:
    if not spec.check:
        return
    mod_name, _, func_name = spec.check.partition(":")
    func = getattr(importlib.import_module(mod_name), func_name)
    try:
        func(folder)
    except Ex4dError:
        raise
    except Exception as exc:  # a loader failing on the files is a model problem, reported as one
        raise Ex4dError(
            f"the weights cannot be loaded: {type(exc).__name__}: {exc}",
            where=str(folder),
            hint="the folder holds a corrupt or different model: download it again",
            code=MODEL_INVALID,
        ) from exc


def verify(name: str, root: str | os.PathLike | None = None, *, deep: bool = True) -> list[VerifyResult]:
    """Verify model ``name`` and the models it requires; one result per spec, nothing raised.

    ``deep`` also runs the spec's loadability check (builds the model without weights and compares
    tensor names and shapes; never runs it).
    """
    results = []
    for spec in with_requirements(name):
        folder = model_folder(spec, root)
        problems: list[str] = []
        missing = missing_files(spec, root)
        if missing:
            problems.append(str(_missing_error(spec, folder, missing)))
        for f in spec.files:
            path = folder / f.path
            if f.path in missing:
                continue
            try:
                _check_file(path, f.size)
            except Ex4dError as exc:
                problems.append(str(exc))
        if deep and not problems:
            try:
                _run_check(spec, folder)
            except Ex4dError as exc:
                problems.append(str(exc))
        results.append(VerifyResult(spec.name, folder, not problems, problems))
    return results


def require_valid(name: str, root: str | os.PathLike | None = None) -> Path:
    """Like :func:`require`, then the cheap file checks (sizes, headers) of ``verify``; raises the first problem."""
    folder = require(name, root)
    spec = get_spec(name)
    for f in spec.files:
        _check_file(folder / f.path, f.size)
    return folder


# ----------------------------------------------------------------------------------------------
# Download


def download(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    token: str | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> list[Path]:
    """Download model ``name`` (and the models it requires) from the Hugging Face hub.

    Only the files the spec lists are fetched, straight into the published layout under the models
    directory; each file appears under its final name only once complete (huggingface_hub downloads
    to an ``.incomplete`` file and renames). Files already present are kept unless ``force``.
    Offline or refused: one ``Ex4dError(MODEL_MISSING)`` naming the repository, the files and the folder.
    """
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise Ex4dError(
            "huggingface_hub is not installed, so models cannot be downloaded",
            hint="pip install huggingface_hub, or copy the model files by hand (see `ex4d models list`)",
            code=MODEL_MISSING,
        ) from None
    folders = []
    specs = with_requirements(name)
    todo = [(s, f) for s in specs for f in s.files if force or not (model_folder(s, root) / f.path).is_file()]
    created = [model_folder(s, root) for s in specs if not model_folder(s, root).exists()]
    top_existed = models_dir(root).exists()
    for i, (spec, f) in enumerate(todo):
        folder = model_folder(spec, root)
        if progress:
            progress("download", i, len(todo), f"{spec.repo_id}/{f.path}")
        try:
            hf_hub_download(spec.repo_id, f.path, local_dir=folder, token=token, force_download=force)
        except Exception as exc:  # offline, gated, not found, HTTP errors: all end the same way for users
            for new in created:  # leave the disk as it was: no half-made model folders
                _remove_if_no_model_files(new, root)
            if not top_existed and models_dir(root).is_dir() and not any(models_dir(root).iterdir()):
                models_dir(root).rmdir()
            missing = missing_files(spec, root) or [f.path]
            gated = (
                "accept the licence of this gated repository on huggingface.co, set HF_TOKEN, " if spec.gated else ""
            )
            raise Ex4dError(
                f"cannot download {spec.repo_id}/{f.path} ({type(exc).__name__}: {_short(exc)}); "
                f"model '{spec.name}' still lacks {len(missing)} file(s): {', '.join(missing[:8])}",
                where=str(folder),
                hint=f"check the internet connection, {gated}or copy the files of the Hugging Face repository "
                f"{spec.repo_id} into {folder}",
                code=MODEL_MISSING,
            ) from None
    if progress:
        progress("download", len(todo), len(todo), "done")
    for spec in specs:
        folders.append(require(spec.name, root))
    return folders


def _remove_if_no_model_files(folder: Path, root) -> None:
    """Remove ``folder`` (and empty parents up to the models directory) when it holds no finished file."""
    import shutil

    if not folder.exists():
        return
    if any(p.is_file() for p in folder.rglob("*") if ".cache" not in p.relative_to(folder).parts):
        return
    shutil.rmtree(folder, ignore_errors=True)
    top = models_dir(root)
    parent = folder.parent
    while parent != top and parent.is_relative_to(top) and parent.exists() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


# ----------------------------------------------------------------------------------------------
# List


@dataclass
class ModelStatus:
    name: str
    repo_id: str
    folder: Path
    purpose: str
    license: str
    missing: list[str]
    bytes_on_disk: int
    requires: tuple[str, ...]

    @property
    def present(self) -> bool:
        return not self.missing

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "repo_id": self.repo_id,
            "folder": str(self.folder),
            "purpose": self.purpose,
            "license": self.license,
            "present": self.present,
            "missing": self.missing,
            "bytes_on_disk": self.bytes_on_disk,
            "requires": list(self.requires),
        }


def list_models(root: str | os.PathLike | None = None) -> list[ModelStatus]:
    """Every registered model with its presence (cheap: no hashing, no loading)."""
    out = []
    for spec in sorted(all_specs().values(), key=lambda s: s.name):
        folder = model_folder(spec, root)
        missing = missing_files(spec, root)
        size = sum((folder / f.path).stat().st_size for f in spec.files if f.path not in missing)
        out.append(
            ModelStatus(spec.name, spec.repo_id, folder, spec.purpose, spec.license, missing, size, spec.requires)
        )
    return out
