"""Model management: where weights live, what each model needs, and one clear error when missing.

The models directory is, in order: the ``models_dir`` argument (CLI ``--models-dir``), the
``EX4D_MODELS_DIR`` environment variable, or ``<user cache>/ex4d/models`` (``$XDG_CACHE_HOME`` or
``~/.cache``). Each model lives in its own sub-folder named after its Hugging Face repository, e.g.
``<models>/Wan-AI/Wan2.1-I2V-14B-480P/``, with the files in the published layout.

Model specifications are registered by the modules that use them (depth: ``ex4d_backend.depth.specs``;
generation: ``ex4d_backend.generation.specs``), each exposing ``SPECS: list[ModelSpec]``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MODEL_MISSING, Ex4dError

SPEC_MODULES = ("ex4d_backend.depth.specs", "ex4d_backend.generation.specs")


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


def model_folder(spec: ModelSpec, root: str | os.PathLike | None = None) -> Path:
    return models_dir(root) / spec.repo_id


def missing_files(spec: ModelSpec, root: str | os.PathLike | None = None) -> list[str]:
    folder = model_folder(spec, root)
    return [f.path for f in spec.files if not (folder / f.path).is_file()]


def require(name: str, root: str | os.PathLike | None = None) -> Path:
    """The model's folder, or one clear error naming the repository, the missing files and the folder."""
    spec = get_spec(name)
    folder = model_folder(spec, root)
    missing = missing_files(spec, root)
    if missing:
        shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        raise Ex4dError(
            f"model '{name}' is missing {len(missing)} file(s): {shown}",
            where=str(folder),
            hint=(
                f"run `ex4d models download {name}` when online, or copy the files of the Hugging Face "
                f"repository {spec.repo_id} into {folder}"
            ),
            code=MODEL_MISSING,
        )
    return folder
