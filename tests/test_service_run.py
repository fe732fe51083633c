"""``ex4d run JOB.json`` gives the same outputs as ``ex4d serve`` for the same job definition, runs the
job.json the service stored, resolves relative paths against the job file, and refuses bad job files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import service_fixtures as sf

from ex4d_backend.footage import list_image_sequence, read_image_rgb


def _ex4d_run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(sf.REPO)}
    return subprocess.run(
        [sys.executable, "-m", "ex4d_backend", "run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _frames(folder: str) -> np.ndarray:
    return np.stack([read_image_rgb(p) for p in list_image_sequence(Path(folder))])


def test_run_matches_service(tmp_path):
    clip = sf.make_clip(tmp_path / "data", n_frames=5)
    params = clip.params(camera={"preset": "60"}, renderer="cpu")
    client = sf.start_client(tmp_path / "store", [clip.root])
    try:
        served = client.request("render_guide", params, timeout=180)
        mesh = client.request("build_dwmesh", clip.params(), timeout=60)
    finally:
        client.close()
    job_file = Path(served["job_file"])
    assert json.loads(job_file.read_text()) == {"type": "render_guide", "params": params}
    # The stored job.json, run in another store: everything recomputed, identical outputs.
    proc = _ex4d_run(str(job_file), "--store", str(tmp_path / "store2"), "--allow", str(clip.root), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ran = json.loads(proc.stdout)  # stdout holds the result JSON and nothing else
    assert ran["cached"] == {"frames": False, "depth": False, "guide": False}
    assert ran["job"] == served["job"] and ran["camera_hash"] == served["camera_hash"]
    assert Path(ran["color_dir"]).is_relative_to(tmp_path / "store2")
    np.testing.assert_array_equal(_frames(ran["color_dir"]), _frames(served["color_dir"]))
    np.testing.assert_array_equal(_frames(ran["mask_dir"]), _frames(served["mask_dir"]))
    with np.load(ran["camera_npz"]) as a, np.load(served["camera_npz"]) as b:
        np.testing.assert_array_equal(a["extrinsics"], b["extrinsics"])
    assert "[render " in proc.stderr  # progress goes to stderr
    # A hand-written job file with relative paths and an edit (another job type), plus --output.
    job = {
        "type": "build_dwmesh",
        "params": {**clip.params(), "footage": "data/clip", "depth": {"model": "file", "path": "data/depth.npy"}},
    }
    (tmp_path / "mesh_job.json").write_text(json.dumps(job))
    out = tmp_path / "out"
    proc = _ex4d_run("mesh_job.json", "--store", str(tmp_path / "store2"), "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ran = json.loads(proc.stdout)
    # frames and depth were computed by the render job above (a guide never stores its DW-mesh)
    assert ran["cached"] == {"frames": True, "depth": True, "mesh": False}
    assert ran["job"] == mesh["job"]  # same job key: inputs are keyed by content, not by path spelling
    assert Path(ran["positions_pc2"]).read_bytes() == Path(mesh["positions_pc2"]).read_bytes()
    assert ran["output_positions_pc2"] == str(out / "positions.pc2")
    assert (out / "positions.pc2").read_bytes() == Path(mesh["positions_pc2"]).read_bytes()


def test_run_refuses_bad_job_files(tmp_path, capsys, monkeypatch):
    clip = sf.make_clip(tmp_path / "data", n_frames=3)
    cases = {
        "notjson.json": ("{not json", "not valid JSON"),
        "nan.json": (
            json.dumps({"type": "build_dwmesh", "params": {**clip.params(), "focal_px": float("nan")}}),
            "JSON",
        ),
        "unknown.json": (json.dumps({"type": "frobnicate", "params": {}}), "not a job type"),
        "control.json": (json.dumps({"type": "hello", "params": {}}), "not a job type"),
        "field.json": (
            json.dumps({"type": "build_dwmesh", "params": {**clip.params(), "max_side": "big"}}),
            "max_side",
        ),
        "outside.json": (
            json.dumps({"type": "build_dwmesh", "params": {**clip.params(), "footage": "/etc"}}),
            "allowed",
        ),
        "missing.json": (
            json.dumps({"type": "build_dwmesh", "params": {**clip.params(), "footage": "nope"}}),
            "not exist",
        ),
    }
    from ex4d_backend.cli import main

    monkeypatch.chdir(tmp_path)  # relative job paths resolve against the job file, not the current folder
    for name, (text, needle) in cases.items():
        (tmp_path / name).write_text(text)
        capsys.readouterr()
        code = main(["run", str(tmp_path / name), "--store", str(tmp_path / "store"), "--allow", str(tmp_path)])
        out, err = capsys.readouterr()
        assert code == 2, (name, code, err)
        assert needle in err and out == "", (name, err)
