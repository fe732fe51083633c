"""Depth tools through a real ``ex4d serve``: the depth adjustments (scale, offset, near/far clip) and an
EXR Z pass folder as the depth source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import service_fixtures as sf

from ex4d_backend import depth_adjust, depth_io
from ex4d_backend.errors import Ex4dError
from ex4d_backend.service.pointcache import read_pc2


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("depthtools")
    clip = sf.make_clip(root / "data", width=32, height=24, n_frames=3)
    client = sf.start_client(root / "store", [clip.root])
    client.store_dir = root / "store"
    yield clip, client
    client.close()


def _unprojected(depth: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(T, H*W, 3): every pixel (u, v) times its depth along its ray K^-1 [u, v, 1]; the outer ring at the
    reference's border depth 100 (set after the adjustment)."""
    t, h, w = depth.shape
    d = depth.astype(np.float64).copy()
    d[:, [0, -1], :] = 100.0
    d[:, :, [0, -1]] = 100.0
    v, u = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([(u - k[0, 2]) / k[0, 0] * d, (v - k[1, 2]) / k[1, 1] * d, d], -1).reshape(t, h * w, 3)


def test_adjusted_depth_moves_every_vertex_along_its_ray(env):
    """The DW-mesh of an adjusted depth is clip(scale * d + offset, near, far) * ray, the formula written
    here. Fails if the adjustment is skipped, applied after meshing, in the wrong order (offset before
    scale), or if the clip is missing; the cache keys (depth and mesh folders) change with the adjustment
    and the same adjustment again is reused."""
    clip, client = env
    near, far = 4.5, 8.0  # the scene spans 2.65 .. 6, adjusted 3.7 .. 8.75
    adjust = {"scale": 1.5, "offset": -0.25, "near": near, "far": far}
    raw = sf.run(client, "build_dwmesh", clip.params())[0].raise_for_error()
    r = sf.run(client, "build_dwmesh", clip.params(depth={"model": "file", "path": str(clip.depth_path), "adjust": adjust}))[0].raise_for_error()  # fmt: skip
    want_depth = np.clip(1.5 * clip.depth.astype(np.float64) - 0.25, near, far)
    assert (want_depth == near).any() and (want_depth == far).any()  # both clips act in this scene
    np.testing.assert_allclose(np.load(r["depth_npy"]), want_depth, rtol=1e-6)
    pos, _, _ = read_pc2(Path(r["positions_pc2"]))
    np.testing.assert_allclose(pos, _unprojected(want_depth, clip.k), rtol=1e-5, atol=1e-4)
    # the cache keys hold the adjustment: new depth and mesh entries; the raw depth entry is kept
    assert r["depth_npy"] != raw["depth_npy"] and r["positions_pc2"] != raw["positions_pc2"]
    np.testing.assert_allclose(np.load(raw["depth_npy"]), clip.depth, rtol=1e-6)
    other = sf.run(client, "build_dwmesh", clip.params(depth={"model": "file", "path": str(clip.depth_path), "adjust": {**adjust, "far": 7.0}}))[0].raise_for_error()  # fmt: skip
    assert other["positions_pc2"] != r["positions_pc2"]
    again = sf.run(client, "build_dwmesh", clip.params(depth={"model": "file", "path": str(clip.depth_path), "adjust": adjust}))[0].raise_for_error()  # fmt: skip
    assert again["positions_pc2"] == r["positions_pc2"] and all(again["cached"].values())


def test_bad_adjustment_is_one_clear_error(env):
    """near >= far and a non-positive scale are refused (the schema or the check), nothing is built."""
    clip, client = env
    for adjust in ({"near": 3.0, "far": 2.0}, {"scale": 0}, {"scale": 1, "bogus": 1}):
        req, _ = sf.run(client, "build_dwmesh", clip.params(depth={"model": "file", "path": str(clip.depth_path), "adjust": adjust}))  # fmt: skip
        assert req.error is not None, adjust


def write_exr(path: Path, channels: dict[str, np.ndarray]) -> None:
    import OpenEXR

    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    with OpenEXR.File(header, {k: np.ascontiguousarray(v, np.float32) for k, v in channels.items()}) as f:
        f.write(str(path))


@pytest.mark.parametrize("layout", ["Z", "RGBA+Z", "ViewLayer.Depth.Z"])
def test_exr_z_folder_is_the_depth(env, layout):
    """A folder of EXR frames holding a Z pass (alone, next to RGBA as a render writes it, or in Blender's
    multilayer naming) as the depth source gives exactly the depth written into it. Fails if the reader
    takes R of an RGBA render as depth, or ignores layer-named Z channels."""
    clip, client = env
    folder = clip.root / f"z_{layout.replace('+', '_').replace('.', '_')}"
    folder.mkdir(exist_ok=True)
    for i, z in enumerate(clip.depth):
        ch = {"ViewLayer.Depth.Z": z} if layout.startswith("ViewLayer") else {"Z": z}
        if layout == "RGBA+Z":
            ch = {"R": z * 0 + 7, "G": z * 0, "B": z * 0, "A": z * 0 + 1, **ch}
        write_exr(folder / f"depth_{i:04d}.exr", ch)
    params = {"footage": str(clip.footage), "depth": {"model": "file", "path": str(folder)}}
    r = sf.run(client, "estimate_depth", params)[0].raise_for_error()
    np.testing.assert_array_equal(np.load(r["depth_npy"]), clip.depth.astype(np.float32))


def test_adjust_depth_formula_and_checks():
    """The pure core: the formula, the reference's floor for a negative result, and its refusals."""
    d = np.array([[[0.5, 1.0, 4.0]]], np.float32)
    np.testing.assert_allclose(depth_adjust.adjust_depth(d, {"scale": 2, "offset": -2}), [[[1e-4, 1e-4, 6.0]]], rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(depth_adjust.adjust_depth(d, {"near": 0.8, "far": 2}), [[[0.8, 1.0, 2.0]]], rtol=1e-6)
    assert depth_adjust.is_identity({}) and not depth_adjust.is_identity({"offset": 0.1})
    for bad in ({"scale": -1}, {"near": 0}, {"near": 2, "far": 1}, {"offset": float("nan")}, {"x": 1}):
        with pytest.raises(Ex4dError):
            depth_adjust.normalized(bad)
    assert depth_io.exr_depth_channel(["R", "G", "B", "A", "Z"]) == "Z"
    assert depth_io.exr_depth_channel(["ViewLayer.Combined.R", "ViewLayer.Depth.Z"]) == "ViewLayer.Depth.Z"
    assert depth_io.exr_depth_channel(["R", "G", "B"]) is None


@pytest.mark.slow
def test_cli_and_service_share_the_adjusted_depth(env, tmp_path, ex4d_cmd, subprocess_env):
    """``ex4d recon --adjust-*`` computes the same adjusted depth entry (same cache key) that the service
    then reuses: one definition for the CLI and the service. Fails if the CLI drops the flags or keys the
    adjustment differently."""
    import subprocess

    clip, client = env
    adjust = {"scale": 1.25, "offset": 0.5, "far": 7.0}
    args = ["recon", "--input", str(clip.footage), "--depth", str(clip.depth_path), "--cam", "30",
            "--fx", str(float(clip.k[0, 0])), "--output-dir", str(tmp_path / "out"), "--frames", "0",
            "--store", str(client.store_dir), "--renderer", "cpu", "--adjust-scale", "1.25",
            "--adjust-offset", "0.5", "--adjust-far", "7"]  # fmt: skip
    proc = subprocess.run(ex4d_cmd + args, capture_output=True, text=True, env=subprocess_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    params = clip.params(depth={"model": "file", "path": str(clip.depth_path), "adjust": adjust})
    r = sf.run(client, "estimate_depth", {k: v for k, v in params.items() if k != "focal_px"})[0].raise_for_error()
    assert r["cached"]["depth"] is True  # computed by the CLI
    np.testing.assert_allclose(np.load(r["depth_npy"]), np.clip(1.25 * clip.depth + 0.5, 1e-4, 7.0), rtol=1e-6)


def test_a_new_adjustment_reuses_the_raw_depth(tmp_path, monkeypatch):
    """Changing only the adjustment derives a new depth entry from the stored raw depth: the depth source
    (a model, or here the file reader) runs once for three adjustments; no adjustment keeps the raw entry's
    key (old caches stay valid). Fails if the adjustment is folded into the raw depth's key."""
    from ex4d_backend import depth_io
    from ex4d_backend.pipeline import stages
    from ex4d_backend.pipeline.settings import DepthSettings, FrameSettings
    from ex4d_backend.service.jobstore import JobStore

    clip = sf.make_clip(tmp_path / "data", width=32, height=24, n_frames=2)
    ctx = stages.Context(JobStore(tmp_path / "store", [tmp_path]))
    calls = []
    real = depth_io.load_depth  # the file depth's reader (the depth stage imports it at call time)
    monkeypatch.setattr(depth_io, "load_depth", lambda *a, **k: calls.append(1) or real(*a, **k))
    c = stages.frames_stage(ctx, clip.footage, FrameSettings())
    raw = stages.depth_stage(ctx, c, DepthSettings(path=str(clip.depth_path)))
    keys = {raw.key}
    for adjust in ({"scale": 2.0}, {"offset": 1.0}, {"far": 3.0}):
        d = stages.depth_stage(ctx, c, DepthSettings(path=str(clip.depth_path), adjust=adjust))
        np.testing.assert_allclose(d.depth, depth_adjust.adjust_depth(clip.depth, adjust), rtol=1e-6)
        keys.add(d.key)
    assert len(calls) == 1 and len(keys) == 4
    assert stages.depth_stage(ctx, c, DepthSettings(path=str(clip.depth_path), adjust={"scale": 1.0})).key == raw.key
