"""Portable job files (``ex4d_backend.jobfile``): path maps, project roots, settings in full, ``collect``,
and ``ex4d run`` of such files on a "worker" that sees the project at another place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import farm_fixtures as ff
import pytest

from ex4d_backend import jobfile
from ex4d_backend.errors import Ex4dError


def test_path_map_rules():
    """Longest source wins, whole components only, Windows separators; a wrong rule (prefix match on
    characters, first rule wins, no backslash handling) maps one of these wrongly."""
    maps = jobfile.parse_path_maps(["/mnt=/x", "/mnt/a=/shots/a", "Z:\\proj=/proj"])
    assert jobfile.map_path("/mnt/a/b.mp4", maps) == "/shots/a/b.mp4"
    assert jobfile.map_path("/mnt/ab/c.mp4", maps) == "/x/ab/c.mp4"  # /mnt/a is not a prefix of /mnt/ab
    assert jobfile.map_path("/mnt/a", maps) == "/shots/a"
    assert jobfile.map_path("Z:\\proj\\s1\\clip.mov", maps) == "/proj/s1/clip.mov"
    assert jobfile.map_path("/other/c.mp4", maps) == "/other/c.mp4"
    for bad in ("/mnt", "=/x", "/a="):
        with pytest.raises(Ex4dError, match="SRC=DST"):
            jobfile.parse_path_maps([bad])


def test_relative_inputs_follow_the_project_root(tmp_path):
    """Inputs resolve against --project-root, else the file's project_root (relative to the job file),
    else the job file's folder; absolute ones through the path map."""
    job = tmp_path / "p" / "jobs" / "a.json"
    job.parent.mkdir(parents=True)
    params = {"footage": "s/clip", "depth": {"model": "file", "path": "/mnt/d/depth.npy"}, "camera": {"file": "c.npz"}}
    job.write_text(json.dumps({"ex4d_job": 1, "project_root": "..", "type": "render_guide", "params": params}))
    loaded = jobfile.load_job(job, path_maps=["/mnt/d=/data/d"])
    assert loaded.root == tmp_path / "p"
    assert loaded.params["footage"] == str(tmp_path / "p" / "s" / "clip")
    assert loaded.params["depth"]["path"] == "/data/d/depth.npy"
    assert loaded.params["camera"]["file"] == str(tmp_path / "p" / "c.npz")
    other = jobfile.load_job(job, project_root=str(tmp_path / "q"))
    assert other.params["footage"] == str(tmp_path / "q" / "s" / "clip")
    job.write_text(json.dumps({"type": "render_guide", "params": params}))  # a plain service job file
    assert jobfile.load_job(job).params["footage"] == str(job.parent / "s" / "clip")
    job.write_text(json.dumps({"ex4d_job": 99, "type": "render_guide", "params": params}))
    with pytest.raises(Ex4dError, match="format version 99"):
        jobfile.load_job(job)


@pytest.mark.slow  # the first CPU render of the session compiles the numba rasteriser
def test_moved_project_runs_unchanged_with_a_path_map(tmp_path, capfd):
    """A job with relative inputs, and one with absolute inputs plus --path-map, give on a "worker" that
    sees the project at another path exactly the outputs of the original place. Wrong code (paths joined to
    the current folder, a path map ignored) fails with not_found or gives other bytes."""
    job = ff.make_project(tmp_path / "a", "s1")
    here = ff.run_job_inproc(capfd, job, tmp_path / "store_a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = ff.run_job_inproc(capfd, tmp_path / "b" / "jobs" / "s1.json", tmp_path / "store_b")
    assert ff.result_files(moved) == ff.result_files(here)
    assert moved["job"] == here["job"]  # the job key hashes the inputs' content, not their paths
    # The same job with absolute paths into /a, read on a worker that mounts the project at /b.
    doc = json.loads(job.read_text())
    doc.pop("project_root")
    doc["params"]["footage"] = str(tmp_path / "a" / doc["params"]["footage"])
    doc["params"]["depth"]["path"] = str(tmp_path / "a" / doc["params"]["depth"]["path"])
    absolute = tmp_path / "abs.json"
    absolute.write_text(json.dumps(doc))
    shutil.rmtree(tmp_path / "a")  # only /b exists now
    mapped = ff.run_job_inproc(
        capfd, absolute, tmp_path / "store_c", "--path-map", f"{tmp_path / 'a'}={tmp_path / 'b'}"
    )
    assert ff.result_files(mapped) == ff.result_files(here)
    code, _, err = ff.run_inproc(capfd, "run", str(absolute), "--store", str(tmp_path / "store_d"))
    assert code == 2 and "does not exist" in err  # without the map: one clear error


def test_written_job_carries_every_setting_at_the_backend_defaults(tmp_path, capfd):
    """``write_job`` spells out every setting; running the full file reuses every stage the sparse job
    computed (so each written default is the value the stages really apply: a wrong one, e.g. max_side 512
    or border_depth 50, changes a stage key and recomputes)."""
    from ex4d_backend.service import protocol

    job = ff.make_project(tmp_path / "p", "s1")
    sparse = ff.run_job_inproc(capfd, job, tmp_path / "store")
    loaded = jobfile.load_job(job)
    full_path = jobfile.write_job(tmp_path / "p" / "jobs" / "full.json", loaded.type, loaded.params, loaded.root)
    doc = json.loads(full_path.read_text())
    assert doc["ex4d_job"] == jobfile.JOB_FILE_VERSION and doc["project_root"] == ".."
    expected = set(protocol.PARAMS["generate"]["properties"]) - {"force", "lens", "sensor_width"}
    expected -= {"sensor_height", "sensor_fit"}  # only with a lens
    expected -= {"source_camera", "depth_scale"}  # optional inputs of a moving source: no default
    expected -= {"stereo", "eye", "exr", "upto_window"}  # optional modes (stereo eyes, EXR passes, a farm window step)
    assert set(doc["params"]) == expected
    assert doc["params"]["footage"] == "shots/s1/clip"  # relative to the project root
    full = ff.run_job_inproc(capfd, full_path, tmp_path / "store")
    # every stage from the store (the guide re-meshes on the device: a DW-mesh is no stage of a generate job)
    assert full["cached"] == {"frames": True, "depth": True, "guide": True, "generate": True}
    assert full["frames_dir"] == sparse["frames_dir"]


def test_collect_copies_the_inputs_and_writes_a_relative_job(tmp_path, capfd):
    """``ex4d farm collect`` copies footage, depth and camera files into the project, the new job runs
    with the originals deleted, to the same bytes; collecting again is a no-op; a different file of the
    same name is refused and left alone."""
    from ex4d_backend.cameras import preset_path
    from ex4d_backend.cameras import save_camera_npz as save

    src = ff.make_project(tmp_path / "artist", "s1")
    loaded = jobfile.load_job(src)
    import numpy as np

    depth = np.load(loaded.params["depth"]["path"])
    k = np.array([[60.0, 0, 32], [0, 60.0, 24], [0, 0, 1]])
    save(tmp_path / "artist" / "cam.npz", preset_path("90", depth.shape[0], k, depth[0], 64, 48))
    doc = json.loads(src.read_text())
    doc["params"]["camera"] = {"file": "cam.npz"}
    src.write_text(json.dumps(doc))
    before = ff.run_job_inproc(capfd, src, tmp_path / "store1")
    code, out, err = ff.run_inproc(capfd, "farm", "collect", str(src), str(tmp_path / "project"), "--shot", "sh010")
    assert code == 0, err
    collected = Path(json.loads(out)["job_file"])
    assert collected == tmp_path / "project" / "jobs" / "sh010.json"
    cdoc = json.loads(collected.read_text())
    assert cdoc["params"]["footage"] == "shots/sh010/footage/clip"
    assert cdoc["params"]["depth"]["path"] == "shots/sh010/depth/depth.npy"
    assert cdoc["params"]["camera"]["file"] == "shots/sh010/camera/cam.npz"
    shutil.rmtree(tmp_path / "artist")
    after = ff.run_job_inproc(capfd, collected, tmp_path / "store2")
    assert ff.result_files(after) == ff.result_files(before)
    code, out, _ = ff.run_inproc(capfd, "farm", "collect", str(collected), str(tmp_path / "project"), "--shot", "sh010")
    assert code == 0 and Path(json.loads(out)["job_file"]) == collected
    # Another shot whose depth file has the same name but other content: refused, the old copy kept.
    other = ff.make_project(tmp_path / "artist2", "s1", n_frames=4)
    kept = (tmp_path / "project" / "shots" / "sh010" / "depth" / "depth.npy").read_bytes()
    code, _, err = ff.run_inproc(capfd, "farm", "collect", str(other), str(tmp_path / "project"), "--shot", "sh010")
    assert code == 2 and "already collected" in err
    assert (tmp_path / "project" / "shots" / "sh010" / "depth" / "depth.npy").read_bytes() == kept
