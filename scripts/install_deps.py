#!/usr/bin/env python3
"""Set up (or update) the EX-4D backend: one virtual environment with ``ex4d_backend``, torch and the rest.

Standard library only; runs with any Python >= 3.10, Blender's bundled one included. The virtual
environment uses the Python that runs this script (or ``--python``). Typical use::

    python3 scripts/install_deps.py            # .venv in the repository, torch build picked for this machine
    python3 scripts/install_deps.py --dev      # + test tools, diffsynth, the Blender (bpy) test environments
    python3 scripts/install_deps.py --torch cu128 --venv ~/ex4d-venv
    python3 scripts/install_deps.py --download-wheelhouse wheels/        # online machine: fetch everything
    python3 scripts/install_deps.py --offline --wheelhouse wheels/       # studio machine without internet

Torch build (``--torch auto|cpu|cu126|cu128|cu130|none``): with an NVIDIA GPU the newest CUDA build its
driver and architecture support; without one the ``+cpu`` wheels (PyTorch's CPU index, a wheelhouse
or pip's find-links), or PyPI's build (which also runs without a GPU) where ``--dev`` needs torchvision
and no ``torchvision+cpu`` can be had. Where CUDA meets a GPU the nvdiffrast plugin is built once.

A re-run with nothing changed is a quick no-op: the state file ``<venv>/ex4d-install.json`` records a
hash of pyproject.toml and of the request; it is removed when an install starts and written last, so
an interrupted or failed run never looks ready. pip's full output goes to ``<venv>/ex4d-install.log``.
At the end the backend Python's path is written to ``~/.config/ex4d/backend_python``
(``$XDG_CONFIG_HOME``; Windows ``%APPDATA%\\ex4d\\backend_python``), where the Blender add-on finds it;
a failed run that had changed the environment removes that file if it points there.
Exit status: 0 ready, 1 failed (the last line says what failed and what to do), 2 bad options.
See docs/install.md.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

INSTALLER_VERSION = 1
REPO = Path(__file__).resolve().parent.parent
TORCH_VERSION = "2.13.0"
TORCHVISION_VERSION = "0.28.0"  # diffsynth (the generation library) imports torchvision at import time
TORCH_INDEX = "https://download.pytorch.org/whl"
# diffsynth (the EX-4D generation library) is installed with --no-deps: its own requirements are loose
# (an unpinned torchvision can pull a newer torch); what it needs at run time is in the `generation` extra.
DIFFSYNTH_VERSION = "2.1.12"
MARKER = "ex4d-install.json"
LOG = "ex4d-install.log"

# CUDA builds of torch 2.13.0, newest first: (tag, minimum Linux driver, minimum Windows driver, GPU
# architectures (compute capabilities) with native kernels). Driver minimums are the CUDA toolkits'
# (CUDA release notes, table 3). Update this table together with TORCH_VERSION.
CUDA_BUILDS: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[str, ...]], ...] = (
    ("cu130", (580, 65, 6), (580, 88), ("7.5", "8.0", "8.6", "9.0", "10.0", "12.0")),
    ("cu128", (570, 26), (570, 65), ("7.0", "7.5", "8.0", "8.6", "9.0", "10.0", "12.0")),
    ("cu126", (560, 28, 3), (560, 76), ("5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "9.0")),
)
MINOR_COMPAT_DRIVER = (525, 60, 13)  # CUDA 12.x minor-version compatibility: cu12x runs on any driver >= this
PYPI_LINUX_BUILD = "cu130"  # what `pip install torch==2.13.0` from PyPI gives on Linux x86_64

# Blender test environments for --dev: (venv, Python it needs, requirements). bpy wheels exist for one
# Python per Blender version: 3.11 for 4.2-5.0, 3.13 for 5.1+ (a missing Python is a skip with the reason).
_BPY_TEST_TOOLS = ("pytest>=8", "pytest-timeout>=2.3")
BPY_VENVS = (
    (".venv-bpy5.0", "3.11", ("bpy==5.0.1", "numpy<2", *_BPY_TEST_TOOLS)),
    (".venv-bpy4.2", "3.11", ("bpy==4.2.23", "numpy<2", *_BPY_TEST_TOOLS)),
    (".venv-bpy4.5", "3.11", ("bpy==4.5.*", "numpy<2", *_BPY_TEST_TOOLS)),
    (".venv-bpy5.2", "3.13", ("bpy==5.2.*", "numpy>=1.26,<2.4", *_BPY_TEST_TOOLS)),
)
BPY_PYTHON = "3.11"
# Type-check environments for --dev (tests/test_addon_typecheck.py): mypy against the fake-bpy-module of
# each supported Blender, one small venv each (the stub packages all provide `bpy`; their PEP 695 syntax
# needs Python 3.12+ to parse; 5.2's Python is 3.13).
TYPECHECK_VENVS = tuple(
    (f".venv-fakebpy{v}", py, (f"fake-bpy-module-{v.replace('.', '-')}==20260730", "mypy==1.20.2", "numpy<2.3"))
    for v, py in (("4.2", "3.12"), ("4.5", "3.12"), ("5.0", "3.12"), ("5.2", "3.13"))
)

# Reference side environment for --dev (the generation parity tests): the EX-4D reference's diffsynth 1.1.2
# and transformers 4.51.3 (+ the tokenizers / huggingface-hub they need). It reuses every other package
# (torch, peft, cv2, ...) of the main environment through a .pth file, so only these ~15 MB are fetched.
REF112_VENV = ".venv-ref112"
REF112_REQS = ("diffsynth==1.1.2", "transformers==4.51.3", "tokenizers==0.21.4", "huggingface-hub==0.36.2")
REF112_PTH = "ex4d-main-venv.pth"
REF112_CHECK = """
import importlib.metadata as md, importlib.util, json, torch, transformers  # not diffsynth: its __init__ needs controlnet_aux
print(json.dumps({"diffsynth": md.version("diffsynth"), "transformers": transformers.__version__,
                  "diffsynth_at": importlib.util.find_spec("diffsynth").origin, "torch_at": torch.__file__}))
"""

# pip lines worth showing live; everything goes to the log.
PROGRESS = re.compile(
    r"^(Collecting|Downloading|Installing|Successfully|Building|Obtaining|Processing|Saved|ERROR|error)"
)


class InstallError(Exception):
    """A failure with the one line that tells the user what to do."""

    def __init__(self, what: str, todo: str):
        super().__init__(what)
        self.what, self.todo = what, todo


# ---------------------------------------------------------------------------- machine detection


def parse_version(text: str) -> tuple[int, ...]:
    """'575.51.03' -> (575, 51, 3)."""
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def detect_gpu() -> dict | None:
    """The first NVIDIA GPU as reported by ``nvidia-smi`` (name, driver, capability, memory), or None."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    query = "name,driver_version,memory.total"
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={query},compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if out.returncode != 0:  # old drivers do not know compute_cap
            out = subprocess.run(
                [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=20,
            )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not lines:
        return None
    fields = [f.strip() for f in lines[0].split(",")]
    gpu = {
        "name": fields[0],
        "driver": fields[1],
        "memory_mb": fields[2] if len(fields) > 2 else "",
        "count": len(lines),
    }
    gpu["capability"] = fields[3] if len(fields) > 3 and re.fullmatch(r"\d+\.\d+", fields[3]) else None
    return gpu


def arch_supported(capability: str | None, archs: Sequence[str]) -> bool:
    """Whether kernels built for ``archs`` run on ``capability`` (same major, equal or lower minor)."""
    if not capability:
        return True
    major, minor = (int(x) for x in capability.split("."))
    return any(int(a.split(".")[0]) == major and int(a.split(".")[1]) <= minor for a in archs)


def choose_cuda_build(gpu: dict, system: str | None = None) -> tuple[str, str]:
    """(build tag, reason): the newest CUDA build of torch that this driver and GPU support."""
    system = system or platform.system()
    driver = parse_version(gpu["driver"])
    cap = gpu.get("capability")
    for tag, linux_min, windows_min, archs in CUDA_BUILDS:
        minimum = windows_min if system == "Windows" else linux_min
        if driver >= minimum and arch_supported(cap, archs):
            return tag, f"driver {gpu['driver']} >= {'.'.join(map(str, minimum))}, compute capability {cap or '?'}"
    fits_arch = [t for t, _, _, archs in CUDA_BUILDS if t.startswith("cu12") and arch_supported(cap, archs)]
    if fits_arch and driver >= MINOR_COMPAT_DRIVER:
        tag = fits_arch[-1]
        return tag, f"driver {gpu['driver']} runs CUDA 12 builds through minor-version compatibility"
    if not fits_arch:
        raise InstallError(
            f"no CUDA build of torch {TORCH_VERSION} supports the {gpu['name']} (compute capability {cap})",
            "use --torch cpu (preview generator and CPU guide renderer only)",
        )
    raise InstallError(
        f"NVIDIA driver {gpu['driver']} is too old for torch {TORCH_VERSION}",
        f"update the NVIDIA driver to {'.'.join(map(str, CUDA_BUILDS[-1][1]))} or newer, or use --torch cpu",
    )


def reachable(url: str, timeout: float = 6.0) -> bool:
    """Quick connectivity check (any HTTP answer counts)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------- plan


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def config_file() -> Path:
    """Where the Blender add-on looks for the backend Python."""
    if os.name == "nt":
        base = os.environ.get("APPDATA") or str(Path.home() / "AppData" / "Roaming")
    else:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "ex4d" / "backend_python"


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def tree_hash(folder: Path) -> str:
    """Content hash of a package's sources (for non-editable installs, which copy them)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(folder)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def resolve_torch(args: argparse.Namespace, gpu: dict | None) -> tuple[str, str]:
    """(build: 'cpu' | 'cuXXX' | 'none', why) for --torch; 'auto' without a GPU gives 'cpu' (see torch_plan)."""
    if args.torch in ("none", "cpu") or args.torch.startswith("cu"):
        return args.torch, "requested with --torch"
    if gpu is None:
        return "cpu", "no NVIDIA GPU found (nvidia-smi)"
    if platform.system() == "Darwin":
        return "cpu", "macOS: CPU/MPS build"
    tag, why = choose_cuda_build(gpu)
    return tag, f"{gpu['name']}: {why}"


class TorchPlan:
    """How torch (and torchvision, which the generation library needs) will be installed.

    ``generation`` is False when no torchvision matching this torch build can be had (Linux CPU build
    without PyTorch's CPU index): then diffsynth is not installed, and EX-4D generation (GPU only
    anyway) is unavailable; recon, the CPU guide renderer and the preview generator work."""

    def __init__(self, build: str, reqs: list[str], opts: list[str], where: str, generation: bool, note: str = ""):
        self.build, self.reqs, self.opts, self.where, self.generation, self.note = (
            build,
            reqs,
            opts,
            where,
            generation,
            note,
        )


def pip_finds(py: Path, req: str, opts: Sequence[str], args: argparse.Namespace) -> bool:
    """Whether pip (with its configured find-links/indexes, the wheelhouse and ``opts``) can get ``req``."""
    cmd = [str(py), "-m", "pip", "install", "--dry-run", "--no-deps", "--quiet", *pip_source_options(args), *opts, req]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def pypi_plan(note: str = "") -> TorchPlan:
    """PyPI's own build ('===': exactly the PyPI version, not a '+cpu' wheel from a find-links folder)."""
    return TorchPlan(
        PYPI_LINUX_BUILD if platform.system() == "Linux" else "cpu",
        [f"torch==={TORCH_VERSION}", f"torchvision==={TORCHVISION_VERSION}"],
        [],
        "PyPI"
        + (
            f" (its Linux build is {PYPI_LINUX_BUILD}; it also runs without a GPU)"
            if platform.system() == "Linux"
            else ""
        ),
        True,
        note,
    )


def torch_plan(build: str, args: argparse.Namespace, py: Path) -> TorchPlan:
    """Choose the torch/torchvision wheels and their source for ``build`` (see docs/install.md)."""
    if build == "none":  # torch is yours; the generation libraries only where your torchvision imports
        try:
            vision = subprocess.run([str(py), "-c", "import torchvision"], capture_output=True).returncode == 0
        except OSError:
            vision = False
        note = "" if vision else "--torch none and no importable torchvision: leaving out the generation libraries"
        return TorchPlan("none", [], [], "-", vision, note)
    if args.offline:
        return offline_plan(build, args, py)
    system = platform.system()
    index = f"{args.torch_index.rstrip('/')}/{build}"
    if build != "cpu":
        if reachable(index + "/torch/"):
            reqs = [f"torch=={TORCH_VERSION}+{build}", f"torchvision=={TORCHVISION_VERSION}+{build}"]
            return TorchPlan(build, reqs, ["--index-url", index], index, True)
        if system == "Linux" and build == PYPI_LINUX_BUILD:
            return pypi_plan()
        raise InstallError(
            f"cannot reach {index} for torch {TORCH_VERSION}+{build}",
            f"check the connection or proxy, use --torch {PYPI_LINUX_BUILD} (PyPI's build), or --offline --wheelhouse DIR",
        )
    if system != "Linux":
        return pypi_plan()  # PyPI's Windows and macOS builds are CPU builds
    # Linux CPU build: '+cpu' wheels from PyTorch's CPU index, a wheelhouse or pip's configured find-links.
    opts = ["--extra-index-url", index] if reachable(index + "/torch/") else []
    where = index if opts else "pip's find-links / wheelhouse"
    if not pip_finds(py, f"torch=={TORCH_VERSION}+cpu", opts, args):
        if args.torch == "auto":
            return pypi_plan(
                f"torch {TORCH_VERSION}+cpu is not available ({index} unreachable, not in a find-links folder)"
            )
        raise InstallError(
            f"torch {TORCH_VERSION}+cpu is not available ({index} unreachable, not in pip's find-links or a wheelhouse)",
            f"use --torch {PYPI_LINUX_BUILD} (PyPI's build, about 2.6 GB, also runs without a GPU) "
            f"or --wheelhouse DIR holding torch-{TORCH_VERSION}+cpu",
        )
    if pip_finds(py, f"torchvision=={TORCHVISION_VERSION}+cpu", opts, args):
        reqs = [f"torch=={TORCH_VERSION}+cpu", f"torchvision=={TORCHVISION_VERSION}+cpu"]
        return TorchPlan("cpu", reqs, opts, where, True)
    note = f"no torchvision {TORCHVISION_VERSION}+cpu available (PyPI's torchvision only loads with PyPI's torch build)"
    if args.torch == "auto" and args.dev:
        return pypi_plan(note + "; the generation tests need it (diffsynth imports torchvision)")
    return TorchPlan(
        "cpu",
        [f"torch=={TORCH_VERSION}+cpu"],
        opts,
        where,
        False,
        note + ": installing without torchvision and diffsynth (EX-4D generation needs a GPU anyway; "
        "recon, CPU guide renderer and preview generator work)",
    )


def offline_plan(build: str, args: argparse.Namespace, py: Path) -> TorchPlan:
    """The torch wheels in the wheelhouse: the '+<build>' ones, else PyPI's build where it is the same."""
    linux = platform.system() == "Linux"
    pins = [f"=={TORCH_VERSION}+{build}", f"=={TORCHVISION_VERSION}+{build}"] if linux or build != "cpu" else []
    candidates = [(pins, build)] if pins else []
    if not linux or build == PYPI_LINUX_BUILD or (build == "cpu" and args.torch == "auto"):
        pypi = pypi_plan()
        candidates.append(([f"==={TORCH_VERSION}", f"==={TORCHVISION_VERSION}"], pypi.build))
    for (torch_pin, vision_pin), chosen in candidates:
        if pip_finds(py, f"torch{torch_pin}", [], args):
            vision = pip_finds(py, f"torchvision{vision_pin}", [], args)
            reqs = [f"torch{torch_pin}"] + ([f"torchvision{vision_pin}"] if vision else [])
            note = (
                ""
                if vision
                else f"no matching torchvision in {args.wheelhouse}: installing without the generation libraries"
            )
            return TorchPlan(chosen, reqs, [], f"wheelhouse {args.wheelhouse}", vision, note)
    raise InstallError(
        f"no torch {TORCH_VERSION} ({build}) wheel for this Python in {args.wheelhouse}",
        f"make the wheelhouse on a connected machine with --download-wheelhouse DIR --torch {build} (same OS and Python)",
    )


def extras_for(build: str, args: argparse.Namespace, generation: bool = True) -> list[str]:
    """pyproject extras: 'cuda' (nvdiffrast) only for a CUDA build asked for or chosen for a GPU; the farm
    engines (Ray, OpenJD) with the test tools."""
    extras = ["models"]
    if generation:
        extras.append("generation")
    if build.startswith("cu") and (args.torch.startswith("cu") or detect_gpu() is not None):
        extras.append("cuda")
    if args.dev:
        extras += ["dev", "farm"]  # farm: Ray + openjd-cli, for the farm tests (docs/farm.md)
    return extras


def state_key(args: argparse.Namespace, gpu: dict | None, python: str) -> dict:
    """Everything that, when changed, calls for a new install (the request, not its resolution)."""
    key = {
        "installer": INSTALLER_VERSION,
        "pyproject": file_hash(REPO / "pyproject.toml"),
        "python": python,
        "torch_request": args.torch,
        "gpu": [gpu["name"], gpu["driver"]] if gpu else None,
        "torch_version": TORCH_VERSION,
        "torchvision_version": TORCHVISION_VERSION,
        "diffsynth_version": DIFFSYNTH_VERSION,
        "editable": not args.no_editable,
        "dev": args.dev,
        "offline": bool(args.offline),
        "wheelhouse": str(Path(args.wheelhouse).resolve()) if args.wheelhouse else None,
    }
    if args.no_editable:
        key["sources"] = tree_hash(REPO / "ex4d_backend")
    return key


# ---------------------------------------------------------------------------- running pip


class Runner:
    """Runs commands, shows the progress lines, keeps the full output in a log file."""

    def __init__(self, log_path: Path | None, quiet: bool = False, compile: bool = False):
        self.log_path = log_path
        self.quiet = quiet
        self.compile = compile  # byte-compile at install (pip's default); off: 3x faster, compiled on first import
        self.pip_calls = 0
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        print(text, flush=True)
        self._log(f"[{time.monotonic() - self.started:6.1f} s] {text}")

    def _log(self, text: str) -> None:
        if self.log_path:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(text.rstrip("\n") + "\n")

    def run(self, cmd: Sequence[str], what: str, todo: str, env: dict | None = None) -> str:
        """Run ``cmd``; on failure show the tail of its output and raise InstallError(what, todo)."""
        self._log(f"$ {' '.join(map(str, cmd))}")
        tail: list[str] = []
        out: list[str] = []
        try:
            proc = subprocess.Popen(
                [str(c) for c in cmd],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                env=env,
            )
        except OSError as exc:
            raise InstallError(f"{what}: {exc}", todo) from None
        assert proc.stdout is not None
        for line in proc.stdout:
            self._log(line)
            out.append(line)
            tail = (tail + [line.rstrip()])[-25:]
            if PROGRESS.match(line.strip()) and not self.quiet:
                print("    " + line.strip()[:160], flush=True)
        code = proc.wait()
        if code != 0:
            print("\n".join("    | " + t for t in tail if t), file=sys.stderr)
            where = f" (full log: {self.log_path})" if self.log_path else ""
            raise InstallError(f"{what} (exit status {code}){where}", todo)
        return "".join(out)

    def pip(self, python: Path, pip_args: Sequence[str], what: str, todo: str) -> str:
        self.pip_calls += 1
        if pip_args[0] == "install" and not self.compile:
            pip_args = ["install", "--no-compile", *pip_args[1:]]
        return self.run([str(python), "-m", "pip", *pip_args], what, todo)


def pip_source_options(args: argparse.Namespace) -> list[str]:
    if args.offline:
        return ["--no-index", "--find-links", str(Path(args.wheelhouse).resolve())]
    if args.wheelhouse:
        return ["--find-links", str(Path(args.wheelhouse).resolve())]
    return []


# ---------------------------------------------------------------------------- steps


def ensure_venv(venv: Path, python: str, recreate: bool, runner: Runner) -> Path:
    """Create the virtual environment if needed; return its Python."""
    py = venv_python(venv)
    if venv.exists() and not (venv / "pyvenv.cfg").is_file():
        if any(venv.iterdir()):
            raise InstallError(f"{venv} exists and is not a virtual environment", "pass another folder with --venv")
    if recreate and (venv / "pyvenv.cfg").is_file():
        runner.say(f"removing {venv} (--recreate)")
        shutil.rmtree(venv)
    if (venv / "pyvenv.cfg").is_file():
        probe = subprocess.run([str(py), "-c", "import sys"], capture_output=True) if py.exists() else None
        if probe is None or probe.returncode != 0:
            raise InstallError(
                f"the virtual environment {venv} is broken (its Python does not start)",
                "re-run with --recreate to build it again",
            )
        return py
    runner.say(f"creating the virtual environment {venv} with {python}")
    venv.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([python, "-m", "venv", str(venv)], capture_output=True, text=True)
    if done.returncode != 0 or not py.exists():
        raise InstallError(
            f"could not create a virtual environment with {python}: {(done.stderr or done.stdout).strip()[-300:]}",
            "install the venv module (Debian/Ubuntu: apt install python3-venv) or pass --python",
        )
    return py


def venv_python_version(py: Path) -> str:
    try:
        done = subprocess.run(
            [str(py), "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"], capture_output=True, text=True
        )
    except OSError:
        return ""
    return done.stdout.strip()


VERIFY = """
import importlib, importlib.metadata as md, json, sys
info = {"ex4d_backend": md.version("ex4d-backend"), "location": importlib.import_module("ex4d_backend").__file__}
for name in sys.argv[1:]:
    mod = importlib.import_module(name)
    info[name] = md.version(name)
    if name == "torch":
        info["torch"], info["torch_cuda"] = mod.__version__, mod.version.cuda
print(json.dumps(info))
"""

WARM_NVDIFFRAST = """
import torch
from ex4d_backend import raster_cuda
clip = torch.tensor([[[-1.0, -1.0, 0.0, 1.0], [1.0, -1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]]], device="cuda")
faces = torch.tensor([[0, 1, 2]], dtype=torch.int32, device="cuda")
out, rast = raster_cuda.rasterize_interpolate(clip, faces, torch.ones(1, 3, 1, device="cuda"), (16, 16))
torch.cuda.synchronize()
assert int((rast[..., 3] > 0).sum()) > 0, "empty rasterisation"
print("nvdiffrast plugin ready:", raster_cuda.plugin_status().get("build_dir"))
"""


def install_backend(args: argparse.Namespace, runner: Runner, py: Path, build: str) -> dict:
    """torch (+ torchvision), ex4d_backend with its extras, diffsynth; returns what was installed."""
    src = pip_source_options(args)
    plan = torch_plan(build, args, py)
    if plan.note:
        runner.say(f"note: {plan.note}")
    info: dict = {"torch_build": plan.build, "torch_source": plan.where, "generation_libs": plan.generation}
    if plan.reqs:
        runner.say(f"installing {' + '.join(plan.reqs)} ({plan.build}) from {plan.where}")
        runner.pip(
            py,
            ["install", *src, *plan.opts, *plan.reqs],
            f"installing torch {TORCH_VERSION} ({plan.build}) failed",
            "check the connection (or the wheelhouse), then run the installer again; --torch cpu avoids CUDA builds",
        )
    extras = extras_for(plan.build, args, plan.generation)
    target = f"{REPO}[{','.join(extras)}]"
    runner.say(f"installing ex4d_backend [{', '.join(extras)}] ({'normal' if args.no_editable else 'editable'})")
    # torch is pinned to what was just installed so that no dependency can swap the build.
    pins = [f"torch=={TORCH_VERSION}"] if plan.reqs else []
    runner.pip(
        py,
        ["install", *src, *pins, *([target] if args.no_editable else ["-e", target])],
        "installing ex4d_backend and its dependencies failed",
        "read the log for the package that failed, fix the connection or wheelhouse, then run the installer again",
    )
    modules = ["torch"] if plan.build != "none" else []
    if plan.generation:
        runner.say(f"installing diffsynth {DIFFSYNTH_VERSION} (--no-deps; its dependencies came with ex4d_backend)")
        runner.pip(
            py,
            ["install", *src, "--no-deps", f"diffsynth=={DIFFSYNTH_VERSION}"],
            f"installing diffsynth {DIFFSYNTH_VERSION} failed",
            "check the connection (or the wheelhouse), then run the installer again",
        )
        modules += (["torchvision"] if plan.build != "none" else []) + ["diffsynth"]
    info["extras"] = extras
    runner.say(f"checking that {', '.join(['ex4d_backend', *modules])} import")
    out = runner.run(
        [str(py), "-c", VERIFY, *modules],
        "the backend does not import after installing",
        "re-run with --recreate; if it persists, report the log",
    )
    info.update(json.loads(out.strip().splitlines()[-1]))
    return info


def warm_nvdiffrast(runner: Runner, py: Path) -> str:
    runner.say("building the nvdiffrast CUDA plugin (first time: about a minute)")
    try:
        runner.run(
            [str(py), "-c", WARM_NVDIFFRAST],
            "building the nvdiffrast plugin failed",
            "install the CUDA toolkit (nvcc) matching torch and a C++ compiler, then re-run; the CPU renderer works meanwhile",
        )
        return "ready"
    except InstallError as exc:
        runner.say(f"warning: {exc.what} -- {exc.todo}")
        return "failed"


def find_python(version: str = BPY_PYTHON) -> str | None:
    """A Python ``version`` ("3.11") with venv: this one, ``python3.X`` on PATH, a pyenv install, or
    Windows' ``py -3.X``."""
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
        return sys.executable
    cands = [shutil.which(n) for n in (f"python{version}", f"python{version}.exe")]
    cands += sorted(glob.glob(str(Path.home() / ".pyenv" / "versions" / f"{version}.*" / "bin" / "python3")))[::-1]
    for exe in cands:
        if exe and subprocess.run([exe, "-c", "import sys, venv"], capture_output=True).returncode == 0:
            return exe
    if os.name == "nt" and shutil.which("py"):
        done = subprocess.run(
            ["py", f"-{version}", "-c", "import sys; print(sys.executable)"], capture_output=True, text=True
        )
        if done.returncode == 0:
            return done.stdout.strip()
    return None


def find_python311() -> str | None:
    return find_python("3.11")


def _setup_venv(args: argparse.Namespace, runner: Runner, name: str, python: str, reqs: Sequence[str]) -> None:
    venv = Path(args.bpy_dir).expanduser().resolve() / name
    key = {"installer": INSTALLER_VERSION, "requirements": list(reqs), "offline": bool(args.offline)}
    marker = venv / MARKER
    fresh = not (args.force or args.recreate)
    if fresh and read_marker(marker).get("key") == key and venv_python(venv).exists():
        runner.say(f"{name}: up to date")
        return
    marker.unlink(missing_ok=True)
    py = ensure_venv(venv, python, args.recreate, runner)
    runner.say(f"{name}: installing {' '.join(reqs)}")
    runner.pip(
        py,
        ["install", *pip_source_options(args), *reqs],
        f"setting up the test environment {name} failed",
        "check the connection (bpy wheels are about 300 MB), then run the installer again",
    )
    write_json(marker, {"key": key, "python": str(venv_python(venv)), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def setup_bpy_venvs(args: argparse.Namespace, runner: Runner) -> list[str]:
    """The Blender test environments and the add-on's type-check environments (--dev). Returns warnings;
    a Python a bpy needs that is not installed skips that environment with the reason (its suite skips)."""
    warnings = []
    for name, version, reqs in BPY_VENVS:
        python = find_python(version)
        if python is None:
            msg = (
                f"warning: Python {version} not found (the {reqs[0]} wheels exist for Python {version} only): "
                f"skipping {name}; its Blender tests will be skipped. Install python{version} (e.g. pyenv) and re-run."
            )
            runner.say(msg)
            warnings.append(msg)
            continue
        _setup_venv(args, runner, name, python, reqs)
        runner.run([str(venv_python(Path(args.bpy_dir).expanduser().resolve() / name)), "-c", "import bpy"],
                   f"bpy does not import in {name}", "re-run with --recreate")  # fmt: skip
    for name, version, reqs in TYPECHECK_VENVS:
        python = find_python(version) or (find_python("3.13") if version == "3.12" else None)
        if python is None:
            msg = f"warning: Python {version} not found: skipping {name}; its type check will be skipped"
            runner.say(msg)
            warnings.append(msg)
            continue
        _setup_venv(args, runner, name, python, reqs)
    return warnings


def setup_reference_venv(args: argparse.Namespace, runner: Runner, main_py: Path, venv: Path | None = None) -> Path:
    """The reference side environment (--dev): ``.venv-ref112`` beside the repository's files, made with the
    main environment's Python, holding only REF112_REQS (``pip install --no-deps --target``) and a .pth
    file that appends the main environment's site-packages (its own site-packages come first on sys.path,
    so they shadow only diffsynth / transformers / tokenizers / huggingface-hub). Up to date (a marker with
    the requirements and the main environment's path): nothing done. Returns the side Python."""
    venv = venv or REPO / REF112_VENV
    site_of = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    main_site = runner.run(
        [str(main_py), "-c", site_of], "cannot query the backend environment", "re-run with --recreate"
    )
    main_site = main_site.strip().splitlines()[-1]
    key = {"installer": INSTALLER_VERSION, "requirements": list(REF112_REQS), "main_site": main_site}
    marker = venv / MARKER
    py = venv_python(venv)
    if not (args.force or args.recreate) and read_marker(marker).get("key") == key and py.exists():
        runner.say(f"{venv.name}: up to date")
        return py
    marker.unlink(missing_ok=True)
    started = time.monotonic()
    if venv.exists() and not (venv / "pyvenv.cfg").is_file() and any(venv.iterdir()):
        raise InstallError(f"{venv} exists and is not a virtual environment", "move it away and re-run")
    if not (venv / "pyvenv.cfg").is_file() or args.recreate:
        shutil.rmtree(venv, ignore_errors=True)
        runner.say(f"{venv.name}: creating the reference side environment (diffsynth 1.1.2, transformers 4.51.3)")
        runner.run(
            [str(main_py), "-m", "venv", "--without-pip", str(venv)],
            f"could not create {venv}",
            "install the venv module (Debian/Ubuntu: apt install python3-venv), then re-run",
        )
    side_site = Path(
        runner.run([str(py), "-c", site_of], f"{venv} does not start", "re-run with --recreate")
        .strip()
        .splitlines()[-1]
    )
    side_site.mkdir(parents=True, exist_ok=True)
    (side_site / REF112_PTH).write_text(main_site + "\n", encoding="utf-8")
    runner.say(f"{venv.name}: installing {' '.join(REF112_REQS)} (the rest comes from the backend environment)")
    runner.pip(
        main_py,
        ["install", *pip_source_options(args), "--no-deps", "--upgrade", "--target", str(side_site), *REF112_REQS],
        f"setting up the reference side environment {venv.name} failed",
        "check the connection (or the wheelhouse), then run the installer again",
    )
    out = runner.run(
        [str(py), "-c", REF112_CHECK], f"the reference libraries do not import in {venv.name}", "re-run with --recreate"
    )
    info = json.loads(out.strip().splitlines()[-1])
    if info["diffsynth"] != "1.1.2" or info["transformers"] != "4.51.3":
        raise InstallError(
            f"{venv.name} imports diffsynth {info['diffsynth']} / transformers {info['transformers']}",
            "re-run with --recreate",
        )
    info["seconds"] = round(time.monotonic() - started, 1)
    write_json(marker, {"key": key, "python": str(py), "installed": info, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    runner.say(f"{venv.name}: ready in {info['seconds']:.0f} s")
    return py


def read_marker(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def unregister(py: Path) -> None:
    """After a failed install: stop pointing the add-on at this (now half-installed) environment."""
    target = config_file()
    try:
        if target.read_text(encoding="utf-8").strip() == str(py):
            target.unlink()
    except OSError:
        pass


def register(py: Path, runner: Runner) -> None:
    """Tell the Blender add-on where the backend Python is."""
    target = config_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(str(py) + "\n", encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        runner.say(
            f"warning: could not write {target} ({exc}); set EX4D_BACKEND_PYTHON={py} "
            "or the add-on's 'Backend Python' preference"
        )


def download_wheelhouse(args: argparse.Namespace, runner: Runner, build: str) -> int:
    """Fetch every wheel an offline install needs into a folder (for this platform and Python)."""
    house = Path(args.download_wheelhouse).resolve()
    house.mkdir(parents=True, exist_ok=True)
    runner.log_path = house / "ex4d-download.log"
    runner.say(f"downloading wheels for torch {build} into {house}")
    py = sys.executable
    plan = torch_plan(build, args, Path(py))
    if plan.note:
        runner.say(f"note: {plan.note}")
    build = plan.build
    if plan.reqs:
        runner.pip(
            Path(py),
            ["download", "-d", str(house), *plan.opts, *plan.reqs],
            "downloading torch failed",
            "check the connection",
        )
    extras = extras_for(build, args, plan.generation)
    pins = [f"torch=={TORCH_VERSION}"] if plan.reqs else []
    runner.pip(
        Path(py),
        ["download", "-d", str(house), "--find-links", str(house), *pins, f"{REPO}[{','.join(extras)}]"]
        + ["setuptools>=68", "wheel", "pip"]
        + ([f"diffsynth=={DIFFSYNTH_VERSION}"] if plan.generation else []),
        "downloading the backend's dependencies failed",
        "check the connection",
    )
    if args.dev:
        runner.pip(
            Path(py),
            ["download", "-d", str(house), "--no-deps", *REF112_REQS],
            "downloading the reference libraries failed",
            "check the connection",
        )
        for _, version, reqs in BPY_VENVS:  # wheels for the Python each bpy needs
            target = ["--python-version", version, "--only-binary=:all:"]
            runner.pip(
                Path(py),
                ["download", "-d", str(house), *target, *reqs],
                "downloading bpy failed",
                "check the connection",
            )
        for _, version, reqs in TYPECHECK_VENVS:
            runner.pip(
                Path(py),
                ["download", "-d", str(house), "--python-version", version, "--only-binary=:all:", *reqs],
                "downloading the type checker failed",
                "check the connection",
            )
    for sdist in list(house.glob("*.tar.gz")) + list(house.glob("*.zip")):
        if sdist.name.startswith("ex4d_backend") or sdist.name.startswith("ex4d-backend"):
            sdist.unlink()  # the backend itself is installed from the repository
    runner.say(
        f"wheelhouse ready: {house}\nCopy it with the repository, then run: "
        f"python3 scripts/install_deps.py --offline --wheelhouse {house} --torch {build}"
        + (" --dev" if args.dev else "")
    )
    return 0


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="install_deps.py",
        description="Create or update the EX-4D backend environment (see docs/install.md).",
    )
    p.add_argument(
        "--venv", default=str(REPO / ".venv"), help="virtual environment folder (default: .venv in the repository)"
    )
    p.add_argument("--python", default=sys.executable, help="Python used to create the environment (default: this one)")
    p.add_argument(
        "--torch",
        default="auto",
        help="torch build: auto (NVIDIA driver -> newest CUDA build it supports, else cpu), cpu, cu126, cu128, "
        "cu130, ... or none (do not install torch; you provide it)",
    )
    p.add_argument(
        "--torch-index",
        default=os.environ.get("EX4D_TORCH_INDEX", TORCH_INDEX),
        help="PyTorch wheel index base URL (a mirror)",
    )
    p.add_argument(
        "--dev",
        action="store_true",
        help="also the test tools, the Blender test environments .venv-bpy{4.2,4.5,5.0,5.2} and the type-check environments .venv-fakebpy*",
    )
    p.add_argument(
        "--no-editable", action="store_true", help="install ex4d_backend as a normal package (default: editable)"
    )
    p.add_argument("--offline", action="store_true", help="install only from --wheelhouse (no network)")
    p.add_argument("--wheelhouse", help="folder of wheels (with --offline: the only source; otherwise tried first)")
    p.add_argument(
        "--download-wheelhouse",
        metavar="DIR",
        help="download every wheel needed into DIR for a later --offline install",
    )
    p.add_argument(
        "--bpy-dir",
        default=str(REPO),
        help="where --dev puts the Blender test environments (default: the repository)",
    )
    p.add_argument("--recreate", action="store_true", help="delete and rebuild the virtual environment(s)")
    p.add_argument("--force", action="store_true", help="reinstall even when the state file says nothing changed")
    p.add_argument(
        "--dry-run", action="store_true", help="print the decisions (torch build, extras, up to date?) and stop"
    )
    p.add_argument("--quiet", action="store_true", help="do not echo pip's progress lines")
    p.add_argument(
        "--compile",
        action="store_true",
        help="byte-compile the packages while installing (slower install; default: on first import)",
    )
    args = p.parse_args(argv)
    builds = ["auto", "cpu", "none", *(tag for tag, *_ in CUDA_BUILDS)]
    if args.torch not in builds:
        p.error(f"--torch {args.torch!r}: torch {TORCH_VERSION} has no such build; choose one of {', '.join(builds)}")
    if args.offline and not args.wheelhouse:
        p.error("--offline needs --wheelhouse DIR (make one with --download-wheelhouse DIR on a connected machine)")
    if args.wheelhouse and not Path(args.wheelhouse).is_dir():
        p.error(f"--wheelhouse {args.wheelhouse}: no such folder")
    if args.download_wheelhouse and args.offline:
        p.error("--download-wheelhouse needs the network; it cannot be combined with --offline")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    runner = Runner(None, quiet=args.quiet, compile=args.compile)
    venv = Path(args.venv).expanduser().resolve()
    py = venv_python(venv)
    touched = False  # whether this run changed the environment (a failure then un-registers it)
    try:
        if sys.version_info < (3, 10):  # noqa: UP036 (Blender or an old system Python may run this)
            raise InstallError(
                f"Python {sys.version.split()[0]} is too old", "run this script with Python 3.10 or newer"
            )
        gpu = detect_gpu()
        if args.download_wheelhouse:
            build, why = resolve_torch(args, gpu)
            runner.say(f"torch build: {build} ({why})")
            return download_wheelhouse(args, runner, build)
        marker = venv / MARKER
        state = read_marker(marker)
        python_version = venv_python_version(py) if py.exists() else venv_python_version(Path(args.python))
        key = state_key(args, gpu, python_version)
        up_to_date = (
            not args.force and not args.recreate and state.get("key") == key and py.exists() and bool(python_version)
        )
        if args.dry_run:
            build, why = resolve_torch(args, gpu)
            runner.say(f"torch build: {build} ({why}; the wheels' source is checked when installing)")
            runner.say(f"venv: {venv}\nextras: {', '.join(extras_for(build, args))}\nup to date: {up_to_date}")
            return 0
        if up_to_date:
            installed = state.get("installed", {})
            runner.say(
                f"backend environment up to date ({venv}, torch {installed.get('torch', '-')}); nothing to install"
            )
        else:
            build, why = resolve_torch(args, gpu)
            runner.say(f"torch build: {build} ({why})")
            touched = True
            marker.unlink(missing_ok=True)  # from here on the environment is not ready until the end
            py = ensure_venv(venv, args.python, args.recreate, runner)
            runner.log_path = venv / LOG
            runner._log(f"\n==== ex4d install {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv[1:])}")
            info = install_backend(args, runner, py, build)
            if gpu is not None and info["torch_build"].startswith("cu") and "cuda" in info["extras"]:
                info["nvdiffrast"] = warm_nvdiffrast(runner, py)
            key = state_key(args, gpu, venv_python_version(py))
            state = {"key": key, "installed": info, "python": str(py), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        register(py, runner)
        if not up_to_date:
            write_json(marker, state)  # last: only a complete install is marked ready
        touched = False
        warnings = setup_bpy_venvs(args, runner) if args.dev else []
        installed = state.get("installed", {})
        if args.dev and installed.get("generation_libs", True):
            setup_reference_venv(args, runner, py)
        if not installed.get("generation_libs", True):
            warnings.append("note: torchvision/diffsynth not installed: EX-4D generation and its tests are unavailable")
        runner.say(
            f"\nready in {time.monotonic() - started:.0f} s: backend Python {py}\n"
            f"  torch {installed.get('torch', '-')} (CUDA {installed.get('torch_cuda') or 'none'}), "
            f"ex4d_backend {installed.get('ex4d_backend', '-')}\n"
            f"  the Blender add-on finds it through {config_file()}\n"
            f"  next: {py.parent / 'ex4d'} doctor   (or: {py} -m ex4d_backend doctor)"
        )
        for w in warnings:
            print(w)
        return 0
    except (InstallError, KeyboardInterrupt, Exception) as exc:  # noqa: BLE001 - every failure ends with one line
        if touched:
            unregister(py)
        if isinstance(exc, InstallError):
            line = f"{exc.what} -- {exc.todo}"
        elif isinstance(exc, KeyboardInterrupt):
            line = "interrupted -- run the installer again to finish"
        else:
            line = (
                f"unexpected {type(exc).__name__}: {exc} -- run the installer again; if it persists, report this line"
            )
        print(f"\ninstall failed: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
