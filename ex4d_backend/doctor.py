"""``ex4d doctor``: what this installation can run, as one structured report.

:func:`report` returns a JSON-serialisable dict (the service's ``hello`` and the add-on's
``Check backend`` show it; ``ex4d doctor`` prints it). Every check is guarded: a failing check is
reported, never raised. The report's ``status`` is also the exit status of ``ex4d doctor``:

- ``0`` (:data:`READY`): everything can run: EX-4D generation on the GPU, the CUDA guide renderer (or
  the CPU one when nvdiffrast is unavailable, listed under ``warnings``), the preview generator.
- ``1`` (:data:`NO_GENERATION`): EX-4D generation cannot run (no GPU, a torch build without this GPU's
  architecture, too little VRAM, diffsynth/peft missing or models missing: see ``reasons``), but the
  recon (CPU guide renderer) and the preview generator work. Without a GPU the summary is exactly
  :data:`NO_GPU`.
- ``2`` (:data:`BROKEN`): the installation is broken: torch or a core dependency does not import.
  Re-run ``scripts/install_deps.py``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

READY, NO_GENERATION, BROKEN = 0, 1, 2
NO_GPU = "no GPU: preview generator and CPU guide renderer only"

# VRAM profiles (ex4d_backend.generation.vram), largest first, with the GPU memory each needs (GB, as
# sold; a card qualifies when its total memory in GiB is at least 95 % of that).
PROFILE_NEEDS_GB = (("full", 48), ("24gb", 24), ("12gb", 12))
CORE_MODULES = ("numpy", "av", "cv2", "numba", "OpenEXR", "jsonschema", "xxhash", "isal")
PACKAGES = (
    "torch",
    "torchvision",
    "diffsynth",
    "peft",
    "diffusers",
    "transformers",
    "accelerate",
    "diffrp-nvdiffrast",
    "sageattention",
    "numpy",
    "numba",
    "av",
    "opencv-python-headless",
    "ex4d-backend",
)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:500]


def _try_import(name: str) -> str | None:
    """None when ``name`` imports, else the error."""
    try:
        importlib.import_module(name)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure of an import is a finding
        return _error(exc)


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch build with ``arch_list`` (``torch.cuda.get_arch_list()``) runs on ``capability``.

    Native code for ``sm_XY`` runs on X.Z with Z >= Y; PTX ``compute_XY`` is compiled for any newer GPU."""
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        digits = digits.rstrip("af")
        if not digits.isdigit():
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def vram_profile(total_gib: float) -> str | None:
    """The largest VRAM profile that fits a GPU with ``total_gib`` GiB, or None."""
    for name, gb in PROFILE_NEEDS_GB:
        if total_gib >= 0.95 * gb:
            return name
    return None


def fast_profile_support(capability: tuple[int, int] | None, sageattention: str | None) -> dict:
    """Whether the ``fast`` VRAM profile (FP8 linear layers, generation/fast.py) runs on a GPU of
    ``capability`` (None: no GPU): FP8 tensor cores need compute capability >= 8.9 (Ada, Hopper and
    newer). ``sageattention``: its installed version (8-bit attention) or None (then SDPA)."""
    from .generation.fast import FP8_MIN_CAPABILITY

    need = ".".join(map(str, FP8_MIN_CAPABILITY))
    attention = f"SageAttention {sageattention} (INT8)" if sageattention else "SDPA (pip install sageattention==1.0.6)"
    if capability is None:
        return {
            "supported": False,
            "reason": f"no GPU (FP8 needs compute capability >= {need})",
            "attention": attention,
        }
    cap = f"{capability[0]}.{capability[1]}"
    if tuple(capability) < FP8_MIN_CAPABILITY:
        reason = f"compute capability {cap} < {need}: no FP8 tensor cores (use full / 24gb / 12gb)"
        return {"supported": False, "reason": reason, "attention": attention}
    return {"supported": True, "reason": f"FP8 tensor cores (compute capability {cap})", "attention": attention}


def _nvidia_smi() -> dict:
    """Driver version and GPU names from nvidia-smi (empty when unavailable)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {}
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    rows = [[f.strip() for f in line.split(",")] for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not rows:
        return {}
    return {"driver": rows[0][-1], "names": [r[0] for r in rows]}


def _models(models_dir: str | os.PathLike | None) -> dict:
    from . import modelstore

    info: dict[str, Any] = {"dir": str(modelstore.models_dir(models_dir)), "models": {}, "generation": []}
    for name, spec in sorted(modelstore.all_specs().items()):
        missing = modelstore.missing_files(spec, models_dir)
        info["models"][name] = {
            "repo_id": spec.repo_id,
            "present": not missing,
            "missing_files": len(missing),
            "files": len(spec.files),
        }
    try:
        from .generation import specs as gen_specs

        info["generation"] = [s.name for s in gen_specs.SPECS]
    except ImportError:
        pass
    return info


def report(models_dir: str | os.PathLike | None = None, device_index: int = 0) -> dict:
    """Run every check and return the report (see the module docstring for ``status``)."""
    from . import __version__

    rep: dict[str, Any] = {
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "ex4d_backend": {"version": __version__, "path": os.path.dirname(os.path.abspath(__file__))},
        "packages": {p: _version(p) for p in PACKAGES},
        "torch": None,
        "gpu": None,
        "nvdiffrast": None,
        "models": None,
        "vram_profile": None,
        "fast_profile": None,
        "can": {"recon_cpu": False, "recon_cuda": False, "preview": False, "generate": False},
        "reasons": [],
        "warnings": [],
    }
    reasons, warnings = rep["reasons"], rep["warnings"]
    broken: list[str] = []

    # torch and the core dependencies (recon needs them all)
    torch = None
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        broken.append(f"torch does not import ({_error(exc)})")
    for mod in CORE_MODULES:
        err = _try_import(mod)
        if err:
            broken.append(f"{mod} does not import ({err})")
    if torch is not None:
        rep["torch"] = {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "cuda_available": False,
            "arch_list": [],
        }
        err = _try_import("ex4d_backend.recon")
        if err:
            broken.append(f"the recon pipeline does not import ({err})")
        rep["can"]["recon_cpu"] = not broken
        err = _try_import("ex4d_backend.generation.preview")
        rep["can"]["preview"] = not broken and err is None
        if err and not broken:
            warnings.append(f"preview generator does not import ({err})")

    # GPU
    smi = _nvidia_smi()
    gpu_ok = False
    if torch is not None:
        try:
            available = torch.cuda.is_available()
        except Exception as exc:  # noqa: BLE001
            available = False
            warnings.append(f"torch.cuda.is_available() failed ({_error(exc)})")
        rep["torch"]["cuda_available"] = available
        if available:
            try:
                rep["torch"]["arch_list"] = torch.cuda.get_arch_list()
                props = torch.cuda.get_device_properties(device_index)
                cap = torch.cuda.get_device_capability(device_index)
                free, total = torch.cuda.mem_get_info(device_index)
                driver = smi.get("driver")
                if not driver:
                    v = torch._C._cuda_getDriverVersion()  # CUDA driver API version, e.g. 12080
                    driver = f"CUDA {v // 1000}.{v % 1000 // 10}"
                supported = arch_supported(cap, rep["torch"]["arch_list"])
                rep["gpu"] = {
                    "index": device_index,
                    "count": torch.cuda.device_count(),
                    "name": props.name,
                    "capability": f"{cap[0]}.{cap[1]}",
                    "driver": driver,
                    "vram_total_gib": round(total / 2**30, 2),
                    "vram_free_gib": round(free / 2**30, 2),
                    "arch_supported": supported,
                }
                rep["vram_profile"] = vram_profile(total / 2**30)
                try:
                    rep["fast_profile"] = fast_profile_support(tuple(cap), rep["packages"].get("sageattention"))
                except Exception as exc:  # noqa: BLE001
                    rep["fast_profile"] = {
                        "supported": False,
                        "reason": f"not checked ({_error(exc)})",
                        "attention": "",
                    }
                if not supported:
                    reasons.append(
                        f"torch {torch.__version__} has no kernels for {props.name} (compute capability "
                        f"{cap[0]}.{cap[1]}; built for {', '.join(rep['torch']['arch_list'])}): re-run "
                        "scripts/install_deps.py --torch auto --force"
                    )
                elif rep["vram_profile"] is None:
                    reasons.append(f"{props.name} has {total / 2**30:.1f} GiB; EX-4D generation needs a 12 GB GPU")
                else:
                    gpu_ok = True
                need = dict(PROFILE_NEEDS_GB).get(rep["vram_profile"] or "", 0)
                if gpu_ok and free / 2**30 < 0.9 * need:
                    warnings.append(
                        f"only {free / 2**30:.1f} GiB of {total / 2**30:.1f} GiB free on the GPU: other programs use it"
                    )
            except Exception as exc:  # noqa: BLE001
                reasons.append(f"the GPU cannot be queried ({_error(exc)})")
        elif smi:
            reasons.append(
                f"an NVIDIA GPU is present ({', '.join(smi['names'])}, driver {smi['driver']}) but torch "
                f"{torch.__version__} cannot use it (CUDA {torch.version.cuda or 'none'}): re-run "
                "scripts/install_deps.py --torch auto --force"
            )
        else:
            reasons.append(NO_GPU)

    if rep["fast_profile"] is None and torch is not None:
        try:
            rep["fast_profile"] = fast_profile_support(None, rep["packages"].get("sageattention"))
        except Exception as exc:  # noqa: BLE001
            rep["fast_profile"] = {"supported": False, "reason": f"not checked ({_error(exc)})", "attention": ""}

    # nvdiffrast (the CUDA guide renderer)
    if gpu_ok:
        try:
            from . import raster_cuda

            rep["nvdiffrast"] = raster_cuda.plugin_status()
        except Exception as exc:  # noqa: BLE001
            rep["nvdiffrast"] = {"installed": False, "built": False, "error": _error(exc)}
        nv = rep["nvdiffrast"]
        if not nv.get("installed"):
            warnings.append("nvdiffrast is not installed: guides use the CPU renderer (install_deps.py adds it)")
        elif not nv.get("built"):
            err = _try_import("nvdiffrast.torch")
            if err:
                nv["error"] = err
                warnings.append(f"nvdiffrast does not import ({err}): guides use the CPU renderer")
            else:
                warnings.append("nvdiffrast's CUDA plugin is not built yet: the first CUDA render compiles it")
        rep["can"]["recon_cuda"] = bool(nv.get("installed")) and "error" not in nv
    else:
        rep["nvdiffrast"] = {"installed": _version("diffrp-nvdiffrast") is not None, "built": None}

    # generation libraries (importing diffsynth takes seconds: only where generation could run)
    gen_libs_ok = True
    for lib in ("torchvision", "diffsynth", "peft"):
        if rep["packages"].get(lib) is None:
            reasons.append(
                f"{lib} is not installed: re-run scripts/install_deps.py (a Linux CPU-only install leaves the "
                "generation libraries out unless PyTorch's CPU index is reachable; --torch cu130 adds them)"
            )
            gen_libs_ok = False
    if gen_libs_ok and torch is not None:
        err = _try_import("torchvision")
        if err is None and gpu_ok:
            err = _try_import("diffsynth")
        if err:
            reasons.append(f"the generation libraries do not import ({err}): re-run scripts/install_deps.py --force")
            gen_libs_ok = False

    # models
    try:
        rep["models"] = _models(models_dir)
        missing = [n for n in rep["models"]["generation"] if not rep["models"]["models"].get(n, {}).get("present")]
        if missing:
            reasons.append(
                f"model(s) missing in {rep['models']['dir']}: {', '.join(missing)} (ex4d models download {' '.join(missing)})"
            )
    except Exception as exc:  # noqa: BLE001
        missing = ["?"]
        reasons.append(f"the models directory cannot be checked ({_error(exc)})")

    rep["can"]["generate"] = gpu_ok and gen_libs_ok and not missing and not broken
    if broken:
        rep["status"] = BROKEN
        rep["summary"] = "broken install: " + "; ".join(broken) + " -- re-run scripts/install_deps.py"
        reasons[:0] = broken
    elif rep["can"]["generate"]:
        rep["status"] = READY
        rep["summary"] = f"ready: EX-4D generation on {rep['gpu']['name']} (VRAM profile {rep['vram_profile']})"
    else:
        rep["status"] = NO_GENERATION
        rep["summary"] = NO_GPU if NO_GPU in reasons else "EX-4D generation cannot run: " + reasons[0]
    rep["ok"] = rep["status"] == READY
    return rep


def format_report(rep: dict) -> str:
    """Human-readable text of :func:`report` (what ``ex4d doctor`` prints)."""
    pk = rep["packages"]
    lines = [
        f"python        {rep['python']['version']} ({rep['python']['executable']})",
        f"ex4d_backend  {rep['ex4d_backend']['version']} ({rep['ex4d_backend']['path']})",
    ]
    t = rep.get("torch")
    if t:
        lines.append(
            f"torch         {t['version']} (CUDA build: {t['cuda'] or 'none'}; CUDA available: {t['cuda_available']})"
        )
    else:
        lines.append("torch         not importable")
    g = rep.get("gpu")
    if g:
        lines.append(
            f"gpu           {g['name']} (compute {g['capability']}, driver {g['driver']}, "
            f"{g['vram_free_gib']:.1f} of {g['vram_total_gib']:.1f} GiB free, "
            f"{'supported' if g['arch_supported'] else 'NOT supported'} by this torch build)"
        )
    else:
        lines.append("gpu           none")
    nv = rep.get("nvdiffrast") or {}
    built = {True: "plugin built", False: "plugin not built", None: "not used without a GPU"}[nv.get("built")]
    lines.append(f"nvdiffrast    {'installed' if nv.get('installed') else 'not installed'}, {built}")
    for lib in ("torchvision", "diffsynth", "peft", "diffusers", "transformers"):
        lines.append(f"{lib:13s} {pk.get(lib) or 'not installed'}")
    m = rep.get("models")
    if m:
        lines.append(f"models        {m['dir']}")
        for name, info in m["models"].items():
            state = "present" if info["present"] else f"missing {info['missing_files']}/{info['files']} file(s)"
            lines.append(f"  {name:26s} {state}")
    lines.append(f"vram profile  {rep.get('vram_profile') or 'none fits'}")
    fp = rep.get("fast_profile")
    if fp:
        state = "supported" if fp["supported"] else "not supported"
        lines.append(f"fast profile  {state}: {fp['reason']}; attention {fp['attention']}")
    can = rep["can"]
    lines.append("can run       " + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in can.items()))
    for w in rep["warnings"]:
        lines.append(f"warning: {w}")
    for r in rep["reasons"]:
        if r != rep["summary"]:
            lines.append(f"- {r}")
    lines.append(rep["summary"])
    return "\n".join(lines)
