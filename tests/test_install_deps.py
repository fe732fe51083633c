"""scripts/install_deps.py: the torch build choice (against the CUDA driver table), option errors, and a
real install into a temporary folder (CPU torch from the machine's wheel), run again (no-op), broken
(clear error, nothing left marked ready) and repaired by running it again."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install_deps.py"
_spec = importlib.util.spec_from_file_location("install_deps", SCRIPT)
inst = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(inst)


def gpu(driver: str, capability: str | None, name: str = "GPU") -> dict:
    return {"name": name, "driver": driver, "capability": capability, "memory_mb": "", "count": 1}


# Minimum drivers from NVIDIA's CUDA release notes (toolkit / driver table): CUDA 13.0 GA >= 580.65.06
# (Linux) / 580.88 (Windows); 12.8 GA >= 570.26 / 570.65; 12.6 GA >= 560.28.03 / 560.76; any CUDA 12.x
# runs on >= 525.60.13 through minor-version compatibility. Architectures: CUDA 13 dropped Maxwell,
# Pascal and Volta (< 7.5); torch's cu128/cu130 builds start at 7.0/7.5, cu126 covers 5.0 - 9.0.
@pytest.mark.parametrize(
    ("driver", "cap", "system", "expected"),
    [
        ("580.65.06", "9.0", "Linux", "cu130"),  # H100 on a CUDA 13 driver
        ("580.65.05", "9.0", "Linux", "cu128"),  # one patch level short of CUDA 13
        ("575.51.03", "8.6", "Linux", "cu128"),
        ("570.26", "12.0", "Linux", "cu128"),  # Blackwell needs cu128+
        ("560.35.03", "8.9", "Linux", "cu126"),
        ("560.35.03", "6.1", "Linux", "cu126"),  # Pascal: only cu126 has kernels
        ("580.82.07", "6.1", "Linux", "cu126"),  # ... even on a CUDA 13 driver
        ("535.183.01", "8.6", "Linux", "cu126"),  # minor-version compatibility
        ("525.60.13", "8.6", "Linux", "cu126"),  # the oldest driver that runs CUDA 12.x builds
        ("580.88", "8.9", "Windows", "cu130"),
        ("572.16", "8.9", "Windows", "cu128"),
        ("566.36", "8.9", "Windows", "cu126"),
    ],
)
def test_choose_cuda_build(driver, cap, system, expected):
    tag, why = inst.choose_cuda_build(gpu(driver, cap), system)
    assert tag == expected, why


@pytest.mark.parametrize(
    ("driver", "cap", "message"),
    [
        ("470.256.02", "8.6", "too old"),  # CUDA 11.4 driver
        ("525.60.12", "8.6", "too old"),  # just below CUDA 12's minor-version compatibility
        ("580.65.06", "3.7", "no CUDA build"),  # Kepler
    ],
)
def test_unsupported_gpu_or_driver(driver, cap, message):
    with pytest.raises(inst.InstallError) as err:
        inst.choose_cuda_build(gpu(driver, cap), "Linux")
    assert message in str(err.value) and "--torch cpu" in err.value.todo


def test_auto_without_gpu_is_cpu():
    args = inst.parse_args(["--torch", "auto"])
    assert inst.resolve_torch(args, None) == ("cpu", "no NVIDIA GPU found (nvidia-smi)")
    assert inst.resolve_torch(inst.parse_args(["--torch", "cu128"]), None)[0] == "cu128"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--torch", "cu999"], "no such build"),
        (["--torch", "rocm"], "no such build"),
        (["--offline"], "--offline needs --wheelhouse"),
        (["--wheelhouse", "/nonexistent/wheels"], "no such folder"),
    ],
)
def test_bad_options_exit_2(argv, message, capsys, tmp_path):
    venv = tmp_path / "venv"
    with pytest.raises(SystemExit) as exc:
        inst.main([*argv, "--venv", str(venv)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not venv.exists()


def test_state_key_tracks_what_matters():
    a = inst.parse_args([])
    base = inst.state_key(a, None, "3.11.7")
    assert inst.state_key(inst.parse_args([]), None, "3.11.7") == base
    assert inst.state_key(inst.parse_args(["--dev"]), None, "3.11.7") != base
    assert inst.state_key(inst.parse_args(["--torch", "cpu"]), None, "3.11.7") != base
    assert inst.state_key(a, None, "3.11.8") != base
    assert inst.state_key(a, gpu("580.65.06", "9.0"), "3.11.7") != base


# ---------------------------------------------------------------------------- the real installer


def _run(args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=1200)
    return done, time.monotonic() - t0


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """One real install (--torch cpu) into a temporary folder; the add-on's path file in a temporary config."""
    probe = argparse.Namespace(offline=False, wheelhouse=None)
    if not inst.pip_finds(Path(sys.executable), f"torch=={inst.TORCH_VERSION}+cpu", [], probe):
        pytest.skip(f"pip finds no torch {inst.TORCH_VERSION}+cpu wheel on this machine")
    tmp = tmp_path_factory.mktemp("install")
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp / "config"), "APPDATA": str(tmp / "config")}
    venv = tmp / "venv"
    done, seconds = _run(["--torch", "cpu", "--venv", str(venv), "--quiet"], env)
    return {"tmp": tmp, "env": env, "venv": venv, "done": done, "seconds": seconds}


def _marker(venv: Path) -> Path:
    return venv / inst.MARKER


def _path_file(env: dict) -> Path:
    return Path(env["XDG_CONFIG_HOME"]) / "ex4d" / "backend_python"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_install_run_again_break_repair(installed):
    venv, env, done = installed["venv"], installed["env"], installed["done"]
    py = inst.venv_python(venv)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"fresh install: {installed['seconds']:.0f} s")

    # ready: state file, the add-on's path file, the printed backend Python
    state = json.loads(_marker(venv).read_text())
    assert state["installed"]["torch"] == f"{inst.TORCH_VERSION}+cpu"
    assert state["installed"]["torch_cuda"] is None
    assert Path(state["installed"]["location"]).resolve() == ROOT / "ex4d_backend" / "__init__.py"
    assert _path_file(env).read_text().strip() == str(py)
    assert f"backend Python {py}" in done.stdout

    # the installed backend works: its doctor reports the no-GPU status (exit 1) on this machine
    doc = subprocess.run(
        [str(venv / "bin" / "ex4d"), "doctor", "--json", "--models-dir", str(installed["tmp"] / "models")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    rep = json.loads(doc.stdout)
    assert doc.returncode == rep["status"] == 1, doc.stderr
    assert rep["torch"]["version"] == f"{inst.TORCH_VERSION}+cpu" and rep["can"]["recon_cpu"] is True
    if rep["gpu"] is None:
        assert rep["summary"] == "no GPU: preview generator and CPU guide renderer only"

    # run again: nothing changes, quickly
    before = {p: p.stat().st_mtime_ns for p in (_marker(venv), venv / inst.LOG, _path_file(env))}
    marker_bytes = _marker(venv).read_bytes()
    again, seconds = _run(["--torch", "cpu", "--venv", str(venv), "--quiet"], env)
    assert again.returncode == 0, again.stderr
    assert "nothing to install" in again.stdout
    assert seconds < 20
    assert _marker(venv).read_bytes() == marker_bytes
    assert before[_marker(venv)] == _marker(venv).stat().st_mtime_ns
    assert before[venv / inst.LOG] == (venv / inst.LOG).stat().st_mtime_ns  # no pip call was logged

    # a broken option (a CUDA build from an empty wheelhouse): one clear line, non-zero, nothing left ready
    empty = installed["tmp"] / "empty-wheelhouse"
    empty.mkdir()
    broken, _ = _run(["--torch", "cu128", "--offline", "--wheelhouse", str(empty), "--venv", str(venv)], env)
    assert broken.returncode == 1
    last = broken.stderr.strip().splitlines()[-1]
    assert last.startswith(f"install failed: no torch {inst.TORCH_VERSION} (cu128) wheel for this Python in {empty}")
    assert last.endswith("--download-wheelhouse DIR --torch cu128 (same OS and Python)")
    assert not _marker(venv).exists()
    assert not _path_file(env).exists()  # the add-on is no longer pointed at a half-updated environment

    # the same command as the first time repairs it
    repaired, _ = _run(["--torch", "cpu", "--venv", str(venv), "--quiet"], env)
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    assert json.loads(_marker(venv).read_text())["installed"]["torch"] == f"{inst.TORCH_VERSION}+cpu"
    assert _path_file(env).read_text().strip() == str(py)


def test_failure_in_a_fresh_folder_leaves_nothing_ready(tmp_path):
    """No network needed: an offline install from an empty wheelhouse fails at the first pip step."""
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "PIP_FIND_LINKS": "",
        "PIP_CONFIG_FILE": os.devnull,
    }
    (tmp_path / "wheels").mkdir()
    venv = tmp_path / "venv"
    done, _ = _run(["--torch", "cpu", "--offline", "--wheelhouse", str(tmp_path / "wheels"), "--venv", str(venv)], env)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("install failed: ") and " -- " in last
    assert (venv / "pyvenv.cfg").is_file()  # it got as far as the environment ...
    assert not (venv / inst.MARKER).exists()  # ... which is not marked ready
    assert not (tmp_path / "config" / "ex4d" / "backend_python").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not importlib.util.find_spec("nvdiffrast"), reason="needs nvdiffrast (diffrp-nvdiffrast)")
def test_nvdiffrast_warm_up_on_gpu(tmp_path):
    """The installer's plugin warm-up, run with this Python: builds (or finds) the plugin and rasterises."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    runner = inst.Runner(tmp_path / "warm.log")
    assert inst.warm_nvdiffrast(runner, Path(sys.executable)) == "ready", (tmp_path / "warm.log").read_text()


# ---------------------------------------------------------------------------- where torch comes from

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the Linux wheel rules")


def _plan(monkeypatch, argv, index_up: bool, findable: set[str]):
    """torch_plan with the PyTorch index (un)reachable and pip finding exactly ``findable``."""
    monkeypatch.setattr(inst, "reachable", lambda url, timeout=6.0: index_up)
    monkeypatch.setattr(inst, "pip_finds", lambda py, req, opts, args: req in findable)
    args = inst.parse_args(argv)
    build, _ = inst.resolve_torch(args, None)
    return inst.torch_plan(build, args, Path(sys.executable))


V, TV = inst.TORCH_VERSION, inst.TORCHVISION_VERSION


@linux_only
@pytest.mark.parametrize("argv", [["--torch", "cpu"], ["--torch", "auto"], ["--torch", "cpu", "--dev"]])
def test_cpu_wheel_without_cpu_torchvision(monkeypatch, argv):
    """The machine's +cpu torch, no torchvision+cpu: torch alone, generation libraries left out."""
    plan = _plan(monkeypatch, argv, False, {f"torch=={V}+cpu"})
    assert (plan.build, plan.reqs, plan.generation) == ("cpu", [f"torch=={V}+cpu"], False)
    assert "without torchvision" in plan.note


@linux_only
def test_auto_dev_takes_pypi_build_for_the_generation_tests(monkeypatch):
    plan = _plan(monkeypatch, ["--dev"], False, {f"torch=={V}+cpu"})
    assert (plan.build, plan.reqs, plan.opts, plan.generation) == (
        inst.PYPI_LINUX_BUILD,
        [f"torch==={V}", f"torchvision==={TV}"],
        [],
        True,
    )


@linux_only
def test_cpu_index_reachable(monkeypatch):
    plan = _plan(monkeypatch, ["--torch", "cpu"], True, {f"torch=={V}+cpu", f"torchvision=={TV}+cpu"})
    assert plan.reqs == [f"torch=={V}+cpu", f"torchvision=={TV}+cpu"] and plan.generation
    assert plan.opts == ["--extra-index-url", f"{inst.TORCH_INDEX}/cpu"]


@linux_only
def test_no_cpu_wheel_anywhere(monkeypatch):
    with pytest.raises(inst.InstallError) as err:
        _plan(monkeypatch, ["--torch", "cpu"], False, set())
    assert f"--torch {inst.PYPI_LINUX_BUILD}" in err.value.todo
    assert _plan(monkeypatch, ["--torch", "auto"], False, set()).reqs == [f"torch==={V}", f"torchvision==={TV}"]


@linux_only
def test_cuda_build_sources(monkeypatch):
    plan = _plan(monkeypatch, ["--torch", "cu128"], True, set())
    assert plan.reqs == [f"torch=={V}+cu128", f"torchvision=={TV}+cu128"]
    assert plan.opts == ["--index-url", f"{inst.TORCH_INDEX}/cu128"]
    assert _plan(monkeypatch, ["--torch", inst.PYPI_LINUX_BUILD], False, set()).reqs[0] == f"torch==={V}"
    with pytest.raises(inst.InstallError, match="cannot reach"):
        _plan(monkeypatch, ["--torch", "cu126"], False, set())


@linux_only
def test_offline_wheelhouse_with_pypi_build(monkeypatch, tmp_path):
    argv = ["--torch", inst.PYPI_LINUX_BUILD, "--offline", "--wheelhouse", str(tmp_path)]
    plan = _plan(monkeypatch, argv, False, {f"torch==={V}", f"torchvision==={TV}"})
    assert plan.reqs == [f"torch==={V}", f"torchvision==={TV}"] and plan.generation
    with pytest.raises(inst.InstallError, match="no torch .* wheel") as err:
        _plan(monkeypatch, ["--torch", "cu128", "--offline", "--wheelhouse", str(tmp_path)], False, set())
    assert "--download-wheelhouse DIR --torch cu128" in err.value.todo


def test_auto_with_gpu_picks_cuda_build():
    args = inst.parse_args([])
    build, why = inst.resolve_torch(args, gpu("580.65.06", "9.0", "NVIDIA H100 80GB HBM3"))
    assert build == "cu130" and why.startswith("NVIDIA H100 80GB HBM3: driver 580.65.06")


def test_torch_none_keeps_generation_only_with_a_working_torchvision(tmp_path):
    args = inst.parse_args(["--torch", "none"])
    has_vision = importlib.util.find_spec("torchvision") is not None
    plan = inst.torch_plan("none", args, Path(sys.executable))
    assert (plan.reqs, plan.generation) == ([], has_vision)
    assert inst.torch_plan("none", args, tmp_path / "no-python").generation is False
