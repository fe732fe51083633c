"""``ex4d doctor``: the decision rules (architecture support, VRAM profile, exit status) and the report
on this machine (no GPU), plus simulated GPUs through a patched ``torch.cuda``."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ex4d_backend import doctor
from ex4d_backend.cli import main as cli_main

GIB = 2**30


@pytest.mark.parametrize(
    ("capability", "arch_list", "expected"),
    [
        ((9, 0), ["sm_80", "sm_90"], True),  # native code for this exact arch
        ((8, 9), ["sm_80", "sm_86", "sm_90"], True),  # sm_86 runs on 8.9 (same major, lower minor)
        ((8, 6), ["sm_90"], False),  # newer-arch code never runs on an older GPU
        ((12, 0), ["sm_80", "sm_90"], False),  # Blackwell with a pre-Blackwell build: no kernels
        ((12, 0), ["sm_90", "compute_90"], True),  # PTX is JIT-compiled for any newer GPU
        ((8, 0), ["compute_90"], False),  # ... but not for an older one
        ((9, 0), ["sm_90a"], True),  # arch-specific suffix
        ((7, 5), [], False),
    ],
)
def test_arch_supported(capability, arch_list, expected):
    assert doctor.arch_supported(capability, arch_list) is expected


@pytest.mark.parametrize(
    ("total_gib", "profile"),
    [(79.1, "full"), (47.5, "full"), (23.6, "24gb"), (22.5, "12gb"), (11.7, "12gb"), (11.0, None), (7.8, None)],
)
def test_vram_profile(total_gib, profile):
    # Profiles need 48 / 24 / 12 GB; a card qualifies with >= 95 % of that in GiB (a "24 GB" card has 23.6 GiB).
    assert doctor.vram_profile(total_gib) == profile


def _model_files(root, spec_names):
    """Create every file of the named model specs (empty files: presence is what the doctor checks)."""
    from ex4d_backend import modelstore

    for name in spec_names:
        spec = modelstore.get_spec(name)
        folder = modelstore.model_folder(spec, root)
        for f in spec.files:
            (folder / f.path).parent.mkdir(parents=True, exist_ok=True)
            (folder / f.path).write_bytes(b"")


def test_report_without_gpu(tmp_path, monkeypatch):
    """This machine: no GPU -> the documented summary, exit status 1, recon and preview still possible."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(doctor, "_nvidia_smi", lambda: {})
    rep = doctor.report(models_dir=tmp_path)
    json.dumps(rep)  # JSON-serialisable (the add-on reads --json)
    assert rep["status"] == doctor.NO_GENERATION == 1
    assert rep["summary"] == doctor.NO_GPU == "no GPU: preview generator and CPU guide renderer only"
    assert rep["gpu"] is None and rep["vram_profile"] is None
    assert rep["can"] == {"recon_cpu": True, "recon_cuda": False, "preview": True, "generate": False}
    assert rep["torch"]["version"] == torch.__version__
    assert rep["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    gen = rep["models"]["generation"]
    assert gen and all(not rep["models"]["models"][n]["present"] for n in gen)
    assert any("model(s) missing" in r and all(n in r for n in gen) for r in rep["reasons"])
    assert doctor.format_report(rep).splitlines()[-1] == doctor.NO_GPU


def test_models_present_are_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(doctor, "_nvidia_smi", lambda: {})
    gen = doctor.report(models_dir=tmp_path)["models"]["generation"]
    assert len(gen) >= 2
    _model_files(tmp_path, gen[:-1])
    rep = doctor.report(models_dir=tmp_path)
    assert [rep["models"]["models"][n]["present"] for n in gen] == [True] * (len(gen) - 1) + [False]
    (missing,) = [r for r in rep["reasons"] if "model(s) missing" in r]
    assert missing.startswith(f"model(s) missing in {tmp_path}: {gen[-1]} (")
    _model_files(tmp_path, gen[-1:])
    rep = doctor.report(models_dir=tmp_path)
    assert not [r for r in rep["reasons"] if "model(s) missing" in r]
    assert rep["summary"] == doctor.NO_GPU  # models alone do not make generation possible without a GPU


def _fake_gpu(monkeypatch, name, capability, total_gib, free_gib, arch_list, driver="580.65.06"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(name=name))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capability)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (int(free_gib * GIB), int(total_gib * GIB)))
    monkeypatch.setattr(doctor, "_nvidia_smi", lambda: {"driver": driver, "names": [name]})


def test_gpu_without_kernels_in_this_torch(tmp_path, monkeypatch):
    _fake_gpu(monkeypatch, "NVIDIA RTX PRO 6000", (12, 0), 95.0, 94.0, ["sm_80", "sm_90"])
    rep = doctor.report(models_dir=tmp_path)
    assert rep["status"] == doctor.NO_GENERATION
    assert rep["gpu"]["arch_supported"] is False and rep["gpu"]["capability"] == "12.0"
    assert "has no kernels for NVIDIA RTX PRO 6000" in rep["summary"]
    assert "--torch auto --force" in rep["summary"]


def test_gpu_too_small(tmp_path, monkeypatch):
    _fake_gpu(monkeypatch, "NVIDIA GeForce RTX 3070", (8, 6), 7.8, 7.5, ["sm_80", "sm_86", "sm_90"])
    rep = doctor.report(models_dir=tmp_path)
    assert rep["status"] == doctor.NO_GENERATION and rep["vram_profile"] is None
    assert "needs a 12 GB GPU" in rep["summary"]


def test_gpu_ready_when_models_present(tmp_path, monkeypatch):
    pytest.importorskip("diffsynth")
    _fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0), 79.1, 20.0, ["sm_80", "sm_90"])
    rep = doctor.report(models_dir=tmp_path)
    assert rep["status"] == doctor.NO_GENERATION and "model(s) missing" in rep["summary"]
    _model_files(tmp_path, rep["models"]["generation"])
    rep = doctor.report(models_dir=tmp_path)
    assert rep["status"] == doctor.READY and rep["ok"] is True, rep["reasons"]
    assert rep["gpu"] == {
        "index": 0,
        "count": 1,
        "name": "NVIDIA H100 80GB HBM3",
        "capability": "9.0",
        "driver": "580.65.06",
        "vram_total_gib": 79.1,
        "vram_free_gib": 20.0,
        "arch_supported": True,
    }
    assert rep["vram_profile"] == "full"
    assert rep["summary"] == "ready: EX-4D generation on NVIDIA H100 80GB HBM3 (VRAM profile full)"
    # 20 of 79 GiB free: other programs hold the GPU, which the report warns about
    assert any("only 20.0 GiB of 79.1 GiB free" in w for w in rep["warnings"])


def test_broken_core_dependency(tmp_path, monkeypatch):
    real = doctor._try_import
    monkeypatch.setattr(doctor, "_try_import", lambda n: "ImportError: gone" if n == "av" else real(n))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rep = doctor.report(models_dir=tmp_path)
    assert rep["status"] == doctor.BROKEN == 2
    assert rep["summary"].startswith("broken install: av does not import") and "install_deps.py" in rep["summary"]
    assert rep["can"]["recon_cpu"] is False


def test_cli_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(doctor, "_nvidia_smi", lambda: {})
    rc = cli_main(["doctor", "--json", "--models-dir", str(tmp_path)])
    rep = json.loads(capsys.readouterr().out)
    assert rc == rep["status"] == 1 and rep["summary"] == doctor.NO_GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU report")
def test_cli_on_this_machine(tmp_path):
    """The real command in a fresh process: exit status 1 and the documented last line."""
    done = subprocess.run(
        [sys.executable, "-m", "ex4d_backend", "doctor", "--models-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "no GPU: preview generator and CPU guide renderer only"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_report_on_a_real_gpu(tmp_path):
    rep = doctor.report(models_dir=tmp_path)
    g = rep["gpu"]
    major, minor = torch.cuda.get_device_capability(0)
    free, total = torch.cuda.mem_get_info(0)
    assert g["name"] == torch.cuda.get_device_name(0) and g["capability"] == f"{major}.{minor}"
    assert g["arch_supported"] is True  # the torch that runs this test has kernels for this GPU
    assert abs(g["vram_total_gib"] - total / GIB) < 0.01 and 0 < g["vram_free_gib"] <= g["vram_total_gib"]
    assert rep["vram_profile"] == doctor.vram_profile(total / GIB)
    assert g["driver"]
    assert rep["can"]["recon_cpu"] is True
    print(doctor.format_report(rep))
