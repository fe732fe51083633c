"""``ex4d demo``: the whole path on the procedural scene writes the expected files and the preview image."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from ex4d_backend import cli, footage, synthetic

T, H, W = 5, 48, 64


def ref_preset_90(n: int, depth0: np.ndarray) -> np.ndarray:
    """EX4D_REFERENCE.md "Camera presets" for "90", literally."""
    d = depth0.astype(np.float64).copy()
    d[0, :] = d[-1, :] = d[:, 0] = d[:, -1] = 100.0
    r = d.min() + 0.15
    out = []
    for a in np.linspace(0, np.pi / 2, n):
        eye = np.array([r * np.sin(a), 0.2 * r * (abs(np.cos(a)) - 1), r - r * abs(np.cos(a))])
        f = (np.array([0, 0, r]) - eye) / np.linalg.norm(np.array([0, 0, r]) - eye)
        right = np.cross(f, [0.0, 1.0, 0.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, f)
        e = np.eye(4)
        e[:3, :3] = np.stack([-right, up / np.linalg.norm(up), f])
        e[:3, 3] = -e[:3, :3] @ eye
        out.append(e)
    return np.stack(out)


def test_demo_writes_guide_preview_and_side_by_side(tmp_path, ex4d_cmd, subprocess_env) -> None:
    import cv2

    out = tmp_path / "demo"
    cmd = ex4d_cmd + ["demo", "--output-dir", str(out), "--width", str(W), "--height", str(H)]
    cmd += ["--frames", str(T), "--renderer", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = {
        "input.mp4",
        "depth.npz",
        "color_90.mp4",
        "mask_90.mp4",
        "camera_90.npz",
        "DW-Mesh.ply",
        "preview_90.mp4",
        "preview_90",
        "preview.png",
    }
    assert {p.name for p in out.iterdir()} == expected
    assert len(list((out / "preview_90").glob("*.png"))) == T

    # the synthetic scene's depth is exact (ray-cast): frame 0 sees only the wall at z = WALL_Z (the card and
    # the sphere are outside this narrow 64 px view with fx = 500); the middle frame's centre ray hits the
    # sphere centred at (0, 0.35, 3.2), radius 0.55: z = 3.2 - sqrt(0.55^2 - 0.35^2)
    with np.load(out / "depth.npz") as z:
        depth = z["depth"]
    assert depth.shape == (T, H, W)
    assert np.all(depth[0] == synthetic.WALL_Z)
    assert depth[T // 2, H // 2, W // 2] == pytest.approx(3.2 - np.sqrt(0.55**2 - 0.35**2), rel=1e-5)

    with np.load(out / "camera_90.npz") as cam:
        np.testing.assert_allclose(cam["extrinsics"], ref_preset_90(T, depth[0]), atol=1e-9)
        np.testing.assert_allclose(cam["intrinsics"], [[500, 0, W / 2], [0, 500, H / 2], [0, 0, 1]])
    src = footage.read_footage(out / "input.mp4")
    assert src.frames.shape == (T, H, W, 3) and src.fps == pytest.approx(24.0)
    for name in ("color_90.mp4", "mask_90.mp4", "preview_90.mp4"):
        v = footage.read_footage(out / name)
        assert v.frames.shape == (T, H, W, 3), name

    # preview.png: a caption bar, then rows for frames 0, T//2, T-1; columns source | colour | mask | preview
    grid = cv2.cvtColor(cv2.imread(str(out / "preview.png")), cv2.COLOR_BGR2RGB)
    bar = grid.shape[0] - 3 * H
    assert grid.shape == (bar + 3 * H, 4 * W, 3) and 10 <= bar <= 40
    row0 = grid[bar : bar + H]
    assert np.abs(row0[:, :W].astype(int) - src.frames[0].astype(int)).mean() < 3  # source frame 0
    assert np.abs(row0[:, W : 2 * W].astype(int) - src.frames[0].astype(int)).mean() < 3  # guide frame 0 = source
    assert np.all(row0[:, 2 * W : 3 * W] == 255)  # full mask on frame 0
    assert "side-by-side" in proc.stdout


def test_demo_no_preview_in_process(tmp_path, capsys) -> None:
    import cv2

    out = tmp_path / "demo"
    argv = ["demo", "--output-dir", str(out), "--width", "48", "--height", "32", "--frames", "3"]
    assert cli.main(argv + ["--renderer", "cpu", "--no-preview", "--cam", "30"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"color_30.mp4", "mask_30.mp4", "camera_30.npz", "DW-Mesh.ply", "preview.png"} <= names
    assert not any(n.startswith("preview_") for n in names)
    grid = cv2.imread(str(out / "preview.png"))
    assert grid.shape[1] == 3 * 48 and (grid.shape[0] - 3 * 32) > 0
