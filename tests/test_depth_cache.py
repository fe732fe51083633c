"""Depth cache: keyed by the footage content (and model, options, weights), never by the camera.

Evidence is timing-free: the real provider's ``infer`` is wrapped to count its calls, and the cache
entry's modification time must not change when it is reused.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from depth_fixtures import copy_models, fast_depth_models, gradient_clip  # noqa: F401

from ex4d_backend import depth
from ex4d_backend.cli import main
from ex4d_backend.depth import depth_anything


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = depth_anything.infer

    def infer(frames, m, **kw):
        calls.append(frames.shape)
        return real(frames, m, **kw)

    monkeypatch.setattr(depth_anything, "infer", infer)
    return calls


def test_same_frames_reuse_the_cache(fast_depth_models, tmp_path, counted):  # noqa: F811
    frames = gradient_clip(5, 32, 48)
    cache = tmp_path / "cache"
    first = depth.estimate_cached(
        "clip.mp4", frames, "depth-anything-v2", cache, models_dir=fast_depth_models, device="cpu"
    )
    (entry,) = cache.glob("*.npz")
    mtime = entry.stat().st_mtime_ns
    again = depth.estimate_cached(
        "renamed.mp4", frames.copy(), "depth-anything-v2-small", cache, models_dir=fast_depth_models, device="cpu"
    )
    assert counted == [(5, 32, 48, 3)] and not first.cached and again.cached
    assert entry.stat().st_mtime_ns == mtime and len(list(cache.glob("*.npz"))) == 1
    np.testing.assert_array_equal(first.depth, again.depth)
    np.testing.assert_array_equal(first.disparity, again.disparity)
    # a focal length changes the intrinsics, never the depth
    f = depth.estimate_cached(None, frames, "depth-anything-v2", cache, models_dir=fast_depth_models, focal_mm=50)
    assert f.cached and f.intrinsics[0, 0] == pytest.approx(50 / 36 * 48) and len(counted) == 1


def test_different_content_options_or_weights_recompute(fast_depth_models, tmp_path, counted):  # noqa: F811
    frames = gradient_clip(5, 32, 48)
    cache = tmp_path / "cache"
    run = dict(models_dir=fast_depth_models, device="cpu")
    depth.estimate_cached(None, frames, "depth-anything-v2", cache, **run)
    changed = frames.copy()
    changed[3, 10, 10, 0] ^= 1  # one bit of one pixel
    depth.estimate_cached(None, changed, "depth-anything-v2", cache, **run)
    depth.estimate_cached(None, frames, "depth-anything-v2", cache, align="none", **run)
    assert len(counted) == 3 and len(list(cache.glob("*.npz"))) == 3
    depth.estimate_cached(None, frames, "depth-anything-v2", cache, refresh=True, **run)
    assert len(counted) == 4
    # the same files copied elsewhere (sizes and times kept) are the same weights: reused
    root = copy_models(fast_depth_models, tmp_path / "m")
    depth.estimate_cached(None, frames, "depth-anything-v2", cache, models_dir=root, device="cpu")
    assert len(counted) == 4
    # replaced weights (another version): never the old result
    w = root / "depth-anything/Depth-Anything-V2-Small-hf/model.safetensors"
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))
    depth.estimate_cached(None, frames, "depth-anything-v2", cache, models_dir=root, device="cpu")
    assert len(counted) == 5


def test_unreadable_cache_entry_is_recomputed(fast_depth_models, tmp_path, counted):  # noqa: F811
    frames = gradient_clip(4, 32, 48)
    cache = tmp_path / "cache"
    depth.estimate_cached(None, frames, "depth-anything-v2", cache, models_dir=fast_depth_models, device="cpu")
    (entry,) = cache.glob("*.npz")
    entry.write_bytes(b"not an npz")
    res = depth.estimate_cached(None, frames, "depth-anything-v2", cache, models_dir=fast_depth_models, device="cpu")
    assert not res.cached and len(counted) == 2 and np.load(entry)["depth"].shape == (4, 32, 48)


def test_recon_with_another_camera_never_reruns_depth(fast_depth_models, tmp_path, counted):  # noqa: F811
    from ex4d_backend.footage import write_video

    video = write_video(tmp_path / "clip.mp4", gradient_clip(4, 32, 48), 24)
    store = tmp_path / "store"  # estimated depth is a stage of the job store (shared with the service)
    common = ["--input", str(video), "--depth-model", "depth-anything-v2", "--models-dir", str(fast_depth_models)]
    common += ["--store", str(store), "--renderer", "cpu", "--frames", "0"]
    assert main(["recon", *common, "--cam", "30", "--output-dir", str(tmp_path / "a")]) == 0
    (entry,) = store.glob("cache/depth-*/depth.npy")
    mtime = entry.stat().st_mtime_ns
    assert main(["recon", *common, "--cam", "60", "--focal-mm", "35", "--output-dir", str(tmp_path / "b")]) == 0
    assert len(counted) == 1 and entry.stat().st_mtime_ns == mtime
    assert (tmp_path / "b" / "color_60.mp4").is_file()


def test_depth_cli_writes_depth_disparity_and_intrinsics(fast_depth_models, tmp_path, counted, capsys):  # noqa: F811
    from ex4d_backend.depth_io import disparity_to_depth
    from ex4d_backend.footage import write_video

    video = write_video(tmp_path / "clip.mp4", gradient_clip(3, 32, 48), 24)
    out = tmp_path / "d.npz"
    args = [
        "depth",
        "-i",
        str(video),
        "-o",
        str(out),
        "-m",
        "depth-anything-v2",
        "--models-dir",
        str(fast_depth_models),
    ]
    args += ["--cache-dir", str(tmp_path / "cache"), "--focal-mm", "24", "--sensor-width", "36", "--json"]
    assert main(args) == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["event"] == "done" and done["frames"] == 3 and done["size"] == [48, 32] and not done["cached"]
    with np.load(out) as d:
        assert d["depth"].shape == d["disparity"].shape == (3, 32, 48)
        np.testing.assert_allclose(d["depth"], disparity_to_depth(d["disparity"]), rtol=1e-6)
        np.testing.assert_allclose(d["intrinsics"], [[24 / 36 * 48, 0, 24], [0, 24 / 36 * 48, 16], [0, 0, 1]])
    with pytest.raises(SystemExit) as exc:  # px and mm together: argparse's one-line usage error
        main(args[:-1] + ["--focal-px", "100"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert main([*args[:9], "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0  # no focal: 500 px
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cached"] and len(counted) == 1
    with np.load(out) as d:
        np.testing.assert_allclose(d["intrinsics"], [[500, 0, 24], [0, 500, 16], [0, 0, 1]])


def test_recon_refuses_focal_in_px_and_mm(tmp_path, capsys):
    from ex4d_backend.footage import write_video

    video = write_video(tmp_path / "clip.mp4", gradient_clip(2, 32, 48), 24)
    code = main(
        ["recon", "--input", str(video), "--depth-model", "depth-anything-v2", "--output-dir", str(tmp_path / "o")]
        + ["--fx", "300", "--focal-mm", "35"]
    )
    assert code == 2 and "either in pixels (--fx) or in mm (--focal-mm)" in capsys.readouterr().err


def test_recon_with_a_missing_depth_model_prints_one_line(tmp_path, capsys):
    from ex4d_backend.footage import write_video

    video = write_video(tmp_path / "clip.mp4", gradient_clip(2, 32, 48), 24)
    empty = tmp_path / "models"
    args = ["recon", "--input", str(video), "--depth-model", "depth-anything-v2", "--models-dir", str(empty)]
    assert main([*args, "--output-dir", str(tmp_path / "o"), "--depth-cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ex4d recon: error: model 'depth-anything-v2-small' is missing 3")
    assert "depth-anything/Depth-Anything-V2-Small-hf" in err[0] and str(empty) in err[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()
