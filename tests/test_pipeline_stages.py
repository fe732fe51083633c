"""The one stage pipeline: ``ex4d recon`` and ``ex4d serve`` compute the same guide through the same stages
and share the job store; the settings' defaults are the reference's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import service_fixtures as sf
from test_demo import ref_preset_90

from ex4d_backend.pipeline import housekeeping, settings
from ex4d_backend.service.jobstore import JobStore


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _walk_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _recon(ex4d_cmd, env, clip: sf.Clip, store: Path, out: Path) -> subprocess.CompletedProcess:
    args = ["recon", "--input", str(clip.footage), "--depth", str(clip.depth_path), "--cam", "90"]
    args += ["--fx", str(clip.k[0, 0]), "--frames", "0", "--renderer", "cpu", "--png"]
    args += ["--store", str(store), "--output-dir", str(out)]
    return subprocess.run(ex4d_cmd + args, capture_output=True, text=True, env=env, timeout=300)


def test_cli_and_service_guides_are_byte_identical_and_share_the_store(tmp_path, ex4d_cmd, subprocess_env):
    """A guide from a real ``ex4d serve`` and from ``ex4d recon`` in another store (computed again, in
    another process) have byte-identical PNG frames and the same camera; both equal an unchunked render of
    the whole clip from the reference's preset-90 path (written literally) with the reference's frame-0 rule.
    ``ex4d recon`` on the service's store reuses the service's files (no new guide; outputs are copies).
    Fails if the CLI and the service chunk, mesh, order cameras or apply frame 0 differently, or if the CLI
    keeps a cache of its own."""
    from ex4d_backend.dwmesh import build_dwmesh
    from ex4d_backend.render import render_guide

    clip = sf.make_clip(tmp_path / "data", n_frames=7)
    store_a, store_b = tmp_path / "store_a", tmp_path / "store_b"
    client = sf.start_client(store_a, [clip.root])
    try:
        params = clip.params(camera={"preset": "90"}, renderer="cpu", videos=True)  # + the guide videos stage
        served = client.request("render_guide", params, timeout=180)
        info = client.request("store_info", {}, timeout=60)
    finally:
        client.close()
    guide_dir = Path(served["color_dir"]).parent
    # store_info's sizes are the files' sizes.
    for stage in ("frames", "depth", "camera", "guide"):
        dirs = list(store_a.glob(f"cache/{stage}-*"))
        assert info["stages"][stage]["size"] == sum(_walk_size(d) for d in dirs) > 0, stage
    assert info["cache_size"] == sum(_walk_size(d) for d in store_a.glob("cache/*-*"))

    # 1. The CLI in its own store: recomputed, byte-identical frames.
    proc = _recon(ex4d_cmd, subprocess_env, clip, store_b, tmp_path / "out_b")
    assert proc.returncode == 0, proc.stderr
    out_b = tmp_path / "out_b"
    assert _files(out_b / "color_90") == _files(guide_dir / "color")
    assert _files(out_b / "mask_90") == _files(guide_dir / "mask")
    with np.load(out_b / "camera_90.npz") as a, np.load(guide_dir / "camera.npz") as b:
        np.testing.assert_array_equal(a["extrinsics"], b["extrinsics"])
        np.testing.assert_array_equal(a["intrinsics"], b["intrinsics"])
        ext = a["extrinsics"]
    # ... and the ground truth: the reference's camera, one whole-clip render, frame 0 = source, full mask.
    np.testing.assert_allclose(ext, ref_preset_90(len(clip.frames), clip.depth[0]), atol=1e-9)
    from ex4d_backend.cameras import CameraPath

    mesh = build_dwmesh(clip.depth, clip.k, clip.frames)
    want_c, want_m = render_guide(mesh, CameraPath(ext, clip.k, 64, 48), clip.frames, renderer="cpu")
    color = sf_read(guide_dir / "color", 3)
    np.testing.assert_array_equal(color, want_c)
    np.testing.assert_array_equal(sf_read(guide_dir / "mask", 1), want_m)
    np.testing.assert_array_equal(color[0], clip.frames[0])
    assert (want_m[0] == 255).all() and (want_m[-1] == 0).any()

    # 2. The CLI on the service's store: the same stage results, nothing recomputed.
    entries = sorted(p.name for p in store_a.glob("cache/*-*"))
    stamps = {p: p.stat().st_mtime_ns for p in store_a.glob("cache/*-*/*.npy")}
    proc = _recon(ex4d_cmd, subprocess_env, clip, store_a, tmp_path / "out_a")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in store_a.glob("cache/*-*")) == entries
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    out_a = tmp_path / "out_a"
    assert (out_a / "color_90.mp4").read_bytes() == Path(served["color_mp4"]).read_bytes()
    assert (out_a / "mask_90.mp4").read_bytes() == Path(served["mask_mp4"]).read_bytes()
    assert _files(out_a / "color_90") == _files(guide_dir / "color")


def sf_read(folder: Path, channels: int) -> np.ndarray:
    from ex4d_backend.pipeline.stages import read_png_folder

    return read_png_folder(folder, channels)


def test_defaults_are_the_references():
    """The settings' defaults, as the add-on gets them (``hello``'s ``defaults``), are EX4D_REFERENCE.md's
    values written literally here. Fails if a default drifts in the constants module."""
    from ex4d_backend.service.info import settings_defaults

    d = settings_defaults()
    assert d == json.loads(json.dumps(settings.defaults()))
    assert d["mesh"] == {"mesh_filter": "angle", "border_depth": 100.0}
    assert d["render"] == {"renderer": "auto", "use_dwmesh": True}
    assert d["frames"]["max_side"] == 1024
    g = d["generate"]
    assert (g["steps"], g["cfg"], g["shift"], g["num_frames"]) == (25, 5.0, 5.0, 49)
    assert (g["size"], g["height"], g["width"], g["frame_sampling"]) == ("auto", None, None, "windows")  # issue 14
    assert g["prompt"].startswith("4K ultra HD, surround motion") and g["negative_prompt"].startswith("Bright tones")
    k = settings.IntrinsicsSettings().matrix(640, 360)
    np.testing.assert_array_equal(k, [[500, 0, 320], [0, 500, 180], [0, 0, 1]])


# ----------------------------------------------------------------------------------------------
# Store housekeeping
# ----------------------------------------------------------------------------------------------
def _entry(store: JobStore, stage: str, key: str, nbytes: int, used: float, shot: str = "shot1") -> None:
    with store.write_stage(stage, key, {"shot": shot}) as tmp:
        (tmp / "data.bin").write_bytes(b"x" * nbytes)
    housekeeping.touch(store, stage, key)
    f = store.root / housekeeping.USAGE / f"{stage}-{key}"
    import os

    os.utime(f, (used, used))


def test_store_info_sizes_and_clean_lru_never_a_held_entry(tmp_path):
    """Entries of known sizes and last-use times: info's per-stage and per-shot sizes equal the files'
    sizes; clean --max-size removes least recently used first, skips an entry whose stage lock is held and
    entries a running job may be reading. Fails with most-recent-first or size-first eviction, or if
    clean ignores locks or running jobs."""
    import time

    store = JobStore(tmp_path / "store", [tmp_path])
    now = time.time()
    _entry(store, "frames", "shot1", 1000, now - 50 * 86400)  # oldest
    _entry(store, "depth", "a", 2000, now - 40 * 86400)  # held by a worker below
    _entry(store, "guide", "b", 3000, now - 30 * 86400)
    _entry(store, "guide", "c", 4000, now - 20 * 86400, shot="shot2")
    _entry(store, "mesh", "d", 5000, now - 1)  # recent
    info = housekeeping.info(store)
    for e in housekeeping.entries(store):
        assert e.size == _walk_size(e.path)  # data.bin + meta.json
    assert info["stages"]["guide"]["size"] == _walk_size(store.stage_dir("guide", "b")) + _walk_size(
        store.stage_dir("guide", "c")
    )
    shots = {s["shot"]: s for s in info["shots"]}
    assert shots["shot2"]["size"] == _walk_size(store.stage_dir("guide", "c"))
    assert info["cache_size"] == sum(_walk_size(d) for d in (store.root / "cache").glob("*-*"))

    meta = _walk_size(store.stage_dir("frames", "shot1")) - 1000  # meta.json's size
    with store.stage_lock("depth", "a"):
        assert store.is_held("depth", "a")
        # Keep at most the two newest data payloads' worth: frames (oldest) and guide b go; depth a is held.
        limit = 4000 + 5000 + 2000 + 3 * meta + 10
        result = housekeeping.clean(store, max_size_bytes=limit)
    removed = [(e["stage"], e["key"]) for e in result["removed"]]
    assert removed == [("frames", "shot1"), ("guide", "b")]
    assert ("depth", "a") in [(e["stage"], e["key"]) for e in result["kept_back"]]
    assert store.stage_dir("depth", "a").is_dir() and not store.stage_dir("guide", "b").exists()
    assert result["cache_size"] <= limit

    # A running job (a live process: this one) protects what was used since it started.
    job = store.begin_job("render_guide", "k1", {}, None)
    housekeeping.touch(store, "guide", "c")
    result = housekeeping.clean(store)  # everything that may go: mesh d was last used before the job began
    assert [(e["stage"], e["key"]) for e in result["removed"]] == [("depth", "a"), ("mesh", "d")]
    assert store.stage_dir("guide", "c").is_dir() and [e["key"] for e in result["kept_back"]] == ["c"]
    store.finish_job(job, "done")
    result = housekeeping.clean(store, older_than_days=10)  # guide c was just used: stays
    assert result["removed"] == [] and store.stage_dir("guide", "c").is_dir()
    assert not list((store.root / "cache").glob(".*"))  # nothing half-removed left behind


def test_store_limit_cleans_after_each_job(tmp_path, capsys):
    """``ex4d store limit`` sets the size every finished job cleans down to (least recently used first)."""
    import time

    from ex4d_backend import cli

    store = JobStore(tmp_path / "store", [tmp_path])
    _entry(store, "guide", "old", 10_000, time.time() - 100)
    _entry(store, "guide", "new", 10_000, time.time())
    assert cli.main(["store", "--store", str(store.root), "limit", "0.000015", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"max_size_gb": 0.000015}
    result = housekeeping.enforce_limit(store)
    assert [e["key"] for e in result["removed"]] == ["old"]
    assert cli.main(["store", "--store", str(store.root), "info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stages"]["guide"]["entries"] == 1 and data["max_size_gb"] == 0.000015
    assert cli.main(["store", "--store", str(store.root), "clean", "--max-size", "-1"]) == 2


@pytest.mark.slow
def test_store_size_of_a_49_frame_512_square_shot(tmp_path):
    """A 49 x 512 x 512 shot (synthetic, CPU renderer) through render_guide: frames + depth + one guide
    <= 200 MB, and the DW-mesh for the add-on (build_dwmesh) is one copy of the positions: positions.pc2 of
    exactly 32 + 49 * 512^2 * 12 bytes, no positions.npy / colors.npy. Sizes from the files themselves."""
    from ex4d_backend.service import jobs

    clip = sf.make_clip(tmp_path / "data", width=512, height=512, n_frames=49, focal_px=500.0)
    store = JobStore(tmp_path / "store", [clip.root])
    ctx = jobs.Context(store)
    jobs.run_job("render_guide", clip.params(camera={"preset": "90"}, renderer="cpu"), ctx)
    shot = _walk_size(store.root / "cache")
    print(f"frames + depth + guide: {shot / 1e6:.1f} MB")
    assert shot <= 200e6, shot
    r = jobs.run_job("build_dwmesh", clip.params(), jobs.Context(store))
    mesh_dir = Path(r["positions_pc2"]).parent
    assert sorted(p.name for p in mesh_dir.iterdir()) == ["faces.npy", "meta.json", "occlusion.npy", "positions.pc2"]
    assert (mesh_dir / "positions.pc2").stat().st_size == 32 + 49 * 512 * 512 * 12
    info = housekeeping.info(store)
    assert info["cache_size"] == _walk_size(store.root / "cache")
    print(f"with the add-on's DW-mesh: {info['cache_size'] / 1e6:.1f} MB (mesh {_walk_size(mesh_dir) / 1e6:.1f} MB)")


def test_service_and_cli_start_without_torch(subprocess_env):
    """The stage modules import torch only when a stage renders: ``ex4d serve`` is ready (and ``ex4d --help``
    answers) without it. Fails if a module-level ``import torch`` creeps into pipeline/, jobs.py or info.py
    (a second service then starts seconds later, after another's temporary files were finished)."""
    import sys

    code = (
        "import sys; import ex4d_backend.service.server, ex4d_backend.pipeline.stages, ex4d_backend.cli as c; "
        "c.build_parser(); assert 'torch' not in sys.modules, 'torch imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env)
    assert proc.returncode == 0, proc.stderr
