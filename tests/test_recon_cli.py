"""``ex4d recon`` end to end on a small synthetic clip: output names and contents, camera file contents
against the reference preset formulas, mesh and PNG exports, custom camera files, and bad inputs (exit
status 2, one message, nothing written, existing files untouched).

The successful runs and one failing run go through a real subprocess (``python -m ex4d_backend``); the
other bad inputs call the same entry point in-process (``cli.main``), which is what the console script
runs, to keep the suite fast."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from ex4d_backend import cli, dwmesh, footage, synthetic

T, H, W = 5, 48, 64
FX = 45.0
K = np.array([[FX, 0, W / 2], [0, FX, H / 2], [0, 0, 1]])


def ref_preset_extrinsics(deg: int, n: int, depth0: np.ndarray) -> np.ndarray:
    """EX4D_REFERENCE.md "Camera presets", literally (angle presets other than 180)."""
    d = depth0.astype(np.float64).copy()
    d[0, :] = d[-1, :] = d[:, 0] = d[:, -1] = 100.0
    r = d.min() + 0.15
    target = np.array([0.0, 0.0, r])
    out = []
    for a in np.linspace(0, np.deg2rad(deg), n):
        eye = np.array([r * np.sin(a), 0.2 * r * (abs(np.cos(a)) - 1), r - r * abs(np.cos(a))])
        f = (target - eye) / np.linalg.norm(target - eye)
        right = np.cross(f, [0.0, 1.0, 0.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, f)
        up /= np.linalg.norm(up)
        e = np.eye(4)
        e[:3, :3] = np.stack([-right, up, f])
        e[:3, 3] = -e[:3, :3] @ eye
        out.append(e)
    return np.stack(out)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("recon_clip")
    frames, depth, _ = synthetic.make_scene(W, H, T, k=K)
    footage.write_video(root / "input.mp4", frames, 10)
    np.save(root / "depth.npy", depth)
    return root


def listing(folder) -> dict[str, bytes]:
    return {p.name: (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(folder.iterdir())}


def run_cli(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_recon_preset_with_mesh_and_png(clip, tmp_path, ex4d_cmd, subprocess_env) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["recon", "--input", str(clip / "input.mp4"), "--depth", str(clip / "depth.npy"), "--cam", "90"]
    args += ["--output-dir", str(out), "--frames", str(T), "--renderer", "cpu", "--fx", str(FX), "--save-mesh", "--png"]
    proc = run_cli(ex4d_cmd + args, subprocess_env)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["keep.txt", "color_90.mp4", "mask_90.mp4", "camera_90.npz", "DW-Mesh.ply"] + ["color_90", "mask_90"]
    )
    assert (out / "keep.txt").read_text() == "mine"

    depth = np.load(clip / "depth.npy")
    src = footage.read_footage(clip / "input.mp4")
    # camera file: OpenCV world-to-camera, equal to the reference's preset path; K from --fx
    with np.load(out / "camera_90.npz") as cam:
        assert cam["extrinsics"].shape == (T, 4, 4) and cam["intrinsics"].shape == (3, 3)
        np.testing.assert_allclose(cam["extrinsics"], ref_preset_extrinsics(90, T, depth[0]), atol=1e-9)
        np.testing.assert_allclose(cam["intrinsics"], K)
        assert int(cam["width"]) == W and int(cam["height"]) == H
    # videos: T frames at the footage's size and rate
    color_v, mask_v = footage.read_footage(out / "color_90.mp4"), footage.read_footage(out / "mask_90.mp4")
    for v in (color_v, mask_v):
        assert v.frames.shape == (T, H, W, 3) and v.fps == pytest.approx(10.0)
    # PNGs (lossless): frame 0 = the source frame with a full mask; colour = colour * mask
    color_p, mask_p = footage.read_footage(out / "color_90"), footage.read_footage(out / "mask_90")
    assert color_p.frames.shape == (T, H, W, 3) and mask_p.frames.shape == (T, H, W, 3)
    np.testing.assert_array_equal(color_p.frames[0], src.frames[0])
    m = mask_p.frames[..., 0]
    assert set(np.unique(m)) <= {0, 255} and np.all(m[0] == 255)
    assert (m[1:] == 0).any() and (m[1:] == 255).any()
    assert not color_p.frames[m == 0].any()
    # the mask video encodes the same masks
    assert np.abs(mask_v.frames[..., 0].astype(int) - m).mean() < 3
    # mesh of frame 0: one vertex per pixel at depth * ray (border ring at 100), reference face count
    verts, cols, faces, occl = dwmesh.read_ply(out / "DW-Mesh.ply")
    assert len(verts) == H * W and len(faces) == 2 * (H - 1) * (W - 1) + 2
    d0 = depth[0].astype(np.float64).copy()
    d0[0, :] = d0[-1, :] = d0[:, 0] = d0[:, -1] = 100.0
    v, u = np.mgrid[0:H, 0:W]
    ref = np.stack([(u - K[0, 2]) / FX * d0, (v - K[1, 2]) / FX * d0, d0], -1).reshape(-1, 3)
    np.testing.assert_allclose(verts, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cols[:, :3], src.frames[0].reshape(-1, 3))
    assert occl.any() and not occl.all()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_recon_custom_camera_file(clip, tmp_path, ex4d_cmd, subprocess_env) -> None:
    ext = np.tile(np.eye(4), (T + 2, 1, 1))
    ext[:, 0, 3] = -np.linspace(0, 0.3, T + 2)  # camera moving right
    k_cam = [[50.0, 0, 30.0], [0, 50.0, 25.0], [0, 0, 1]]
    cam_file = tmp_path / "my_path.json"
    cam_file.write_text(json.dumps({"extrinsics": ext.tolist(), "intrinsics": k_cam}))
    out = tmp_path / "out"
    args = ["recon", "--input", str(clip / "input.mp4"), "--depth", str(clip / "depth.npy"), "--cam", str(cam_file)]
    args += ["--output-dir", str(out), "--frames", "0", "--renderer", "cpu", "--fx", str(FX)]
    proc = run_cli(ex4d_cmd + args, subprocess_env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["camera_my_path.npz", "color_my_path.mp4", "mask_my_path.mp4"]
    with np.load(out / "camera_my_path.npz") as cam:
        np.testing.assert_allclose(cam["extrinsics"], ext[:T])  # the first T of the file's frames
        np.testing.assert_allclose(cam["intrinsics"], k_cam)
    assert len(footage.read_footage(out / "mask_my_path.mp4").frames) == T


def test_recon_bad_input_subprocess(clip, tmp_path, ex4d_cmd, subprocess_env) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    out = tmp_path / "out"
    out.mkdir()
    (out / "color_90.mp4").write_bytes(b"previous result")
    proc = run_cli(
        ex4d_cmd + ["recon", "--input", str(bad), "--depth", str(clip / "depth.npy"), "--output-dir", str(out)],
        subprocess_env,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ex4d recon: error:") and str(bad) in lines[0]
    assert "Traceback" not in proc.stderr
    assert listing(out) == {"color_90.mp4": b"previous result"}


def _bad_cases(clip, tmp):
    depth = np.load(clip / "depth.npy")
    cases = {}
    (tmp / "junk.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    cases["corrupt video"] = (["--input", str(tmp / "junk.mp4")], "video")
    cases["missing video"] = (["--input", str(tmp / "nope.mp4")], "not found")
    np.save(tmp / "square.npy", np.ones((T, 48, 48), np.float32))
    cases["depth wrong size"] = (["--depth", str(tmp / "square.npy")], "aspect")
    np.save(tmp / "short.npy", depth[:3])
    cases["depth frame count"] = (["--depth", str(tmp / "short.npy")], "frames")
    nan = depth.copy()
    nan[2, 10, 10] = np.nan
    np.save(tmp / "nan.npy", nan)
    cases["NaN depth"] = (["--depth", str(tmp / "nan.npy")], "NaN")
    cases["unknown preset"] = (["--cam", "sideways"], "preset")
    np.savez(tmp / "shape.npz", extrinsics=np.zeros((T, 3, 4)))
    cases["camera file shape"] = (["--cam", str(tmp / "shape.npz")], "(N, 4, 4)")
    np.savez(tmp / "few.npz", extrinsics=np.tile(np.eye(4), (2, 1, 1)))
    cases["camera file frames"] = (["--cam", str(tmp / "few.npz")], "frames")
    cases["missing camera file"] = (["--cam", str(tmp / "nope.json")], "not found")
    cases["negative frames"] = (["--frames", "-1"], "--frames")
    cases["bad focal"] = (["--fx", "-5"], "focal")
    return cases


CASES = [
    "corrupt video",
    "missing video",
    "depth wrong size",
    "depth frame count",
    "NaN depth",
    "unknown preset",
    "camera file shape",
    "camera file frames",
    "missing camera file",
    "negative frames",
    "bad focal",
]


@pytest.mark.parametrize("case", CASES)
def test_recon_bad_inputs(case, clip, tmp_path, capsys) -> None:
    overrides, needle = _bad_cases(clip, tmp_path)[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "mask_90.mp4").write_bytes(b"previous result")
    base = {
        "--input": str(clip / "input.mp4"),
        "--depth": str(clip / "depth.npy"),
        "--cam": "90",
        "--output-dir": str(out),
        "--frames": str(T),
        "--renderer": "cpu",
        "--fx": str(FX),
    }
    base.update(dict(zip(overrides[::2], overrides[1::2], strict=True)))
    argv = ["recon"] + [x for kv in base.items() for x in kv]
    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("ex4d recon")]
    assert len(lines) == 1 and lines[0].startswith("ex4d recon: error:"), err
    assert needle.lower() in lines[0].lower(), lines[0]
    assert listing(out) == {"keep.txt": b"mine", "mask_90.mp4": b"previous result"}


def test_recon_cuda_without_gpu_is_a_clear_error(clip, tmp_path, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "out"
    argv = ["recon", "--input", str(clip / "input.mp4"), "--depth", str(clip / "depth.npy")]
    argv += ["--output-dir", str(out), "--frames", str(T), "--renderer", "cuda"]
    assert cli.main(argv) == 2
    assert "--renderer cpu" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
