"""Moving source cameras (issue 15) against analytic ground truth: a scene of planes ray-cast exactly,
filmed by a jittering, moving source camera; guides from novel cameras compared with ray-casts from them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scene_fixtures import H, K, W, band, jittery_source_path, pose, psnr, render, rot, source_footage, visible_from

from ex4d_backend import camera_paths as cp
from ex4d_backend.cameras import CameraPath, preset_path
from ex4d_backend.errors import Ex4dError
from ex4d_backend.recon import run_recon

T = 8
DEPTH_SCALE = 2.0  # the depth maps are in half world units; run_recon must bring them back


def random_rigid(rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    e = np.eye(4)
    e[:3, :3] = q
    e[:3, 3] = rng.normal(size=3)
    return e


@pytest.fixture(scope="module")
def shot():
    e_src = jittery_source_path(T)
    frames, depth = source_footage(e_src)
    source = CameraPath(e_src, K, W, H, "source")
    return frames, depth / DEPTH_SCALE, source


def care_region(seen: np.ndarray, pid: np.ndarray) -> np.ndarray:
    """Pixels at least 2 px from a change of seen/unseen or of the surface (the DW-mesh is a 1-px sampled
    surface with a 1-px alpha fade: its boundaries are exact only to about a pixel)."""
    edge = band(seen)
    for i in np.unique(pid):
        edge |= band(pid == i)
    return ~edge


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------
def test_relative_extrinsics_places_the_camera_space_mesh_by_the_source_pose() -> None:
    """x_novel = E_novel inv(E_src) (s x_cam), checked with numpy's general inverse on random rigid poses.
    Catches: inv(E_novel) @ E_src, a transposed rotation, the scale applied after the translation."""
    rng = np.random.default_rng(0)
    e_n = np.stack([random_rigid(rng) for _ in range(4)])
    e_s = np.stack([random_rigid(rng) for _ in range(4)])
    np.testing.assert_allclose(cp.invert_rigid(e_s), np.linalg.inv(e_s), atol=1e-12)
    np.testing.assert_allclose(cp.relative_extrinsics(e_n, e_s), e_n @ np.linalg.inv(e_s), atol=1e-12)
    x_cam = np.append(rng.normal(size=3), 1.0)
    scales = np.array([0.5, 1.0, 2.0, 3.0])
    m = cp.mesh_to_novel(e_n, e_s, scales)
    for t in range(4):
        world = np.linalg.inv(e_s[t]) @ np.append(scales[t] * x_cam[:3], 1.0)
        np.testing.assert_allclose(m[t] @ x_cam, e_n[t] @ world, atol=1e-12)
    np.testing.assert_allclose(cp.mesh_to_novel(e_n), e_n)  # static source at the origin: the reference


def test_presets_follow_the_source_path() -> None:
    """With a moving source, a preset's view of each frame's mesh is exactly the reference's (the preset pose
    relative to source camera t). Catches composing in the wrong order (E_src @ E_preset)."""
    e_src = jittery_source_path(5)
    depth0 = np.full((H, W), 3.0)
    src = CameraPath(e_src, K, W, H)
    ref = preset_path("30", 5, K, depth0, W, H)
    world = cp.novel_camera_path("30", 5, K, depth0, W, H, source=src)
    np.testing.assert_allclose(cp.mesh_to_novel(world.extrinsics, e_src), ref.extrinsics, atol=1e-10)


def test_quaternions_round_trip() -> None:
    """Catches a wrong branch of Shepperd's method (each dominant axis is exercised)."""
    rng = np.random.default_rng(1)
    rs = [rot(*rng.uniform(-180, 180, 3)) for _ in range(200)] + [np.diag([1, -1, -1.0]), np.diag([-1, 1, -1.0])]
    rs = np.stack(rs)
    np.testing.assert_allclose(cp.quaternion_to_rotation(cp.rotation_to_quaternion(rs)), rs, atol=1e-12)


def test_stabilize_removes_jitter_and_keeps_a_smooth_move() -> None:
    """A constant-velocity move (linear centres, constant turn rate) is kept in the shot's interior, jitter
    added to it is removed (centre and angle errors to the smooth path shrink by 3x); strength 0 is the
    identity. Catches averaging world-to-camera translations instead of centres, an unaligned quaternion
    sum (sign flips), a kernel that ignores the strength or the fps."""
    n, fps = 61, 30.0
    smooth = np.stack([pose((0.02 * t, 0.0, 0.01 * t), rot(0.3 * t, 0.1 * t, 0.0)) for t in range(n)])
    rng = np.random.default_rng(2)
    shaky = np.stack(
        [
            pose(np.linalg.inv(e)[:3, 3] + rng.normal(0, 0.01, 3), np.linalg.inv(e)[:3, :3] @ rot(*rng.normal(0, 1, 3)))
            for e in smooth
        ]
    )
    src = lambda e: CameraPath(e, K, W, H)  # noqa: E731

    def errors(e):
        c = cp.invert_rigid(e)[:, :3, 3] - cp.invert_rigid(smooth)[:, :3, 3]
        return np.linalg.norm(c, axis=1), cp.rotation_angle_deg(e[:, :3, :3], smooth[:, :3, :3])

    interior = slice(15, n - 15)
    same = cp.stabilize_path(src(smooth), 0.1, fps).extrinsics
    ce, ae = errors(same)
    assert ce[interior].max() < 1e-9 and ae[interior].max() < 0.01  # degrees (the path is not a geodesic)
    np.testing.assert_allclose(cp.stabilize_path(src(shaky), 0.0, fps).extrinsics, shaky, atol=1e-12)
    c0, a0 = errors(shaky)
    c1, a1 = errors(cp.stabilize_path(src(shaky), 0.15, fps).extrinsics)
    assert c1[interior].mean() < c0[interior].mean() / 3 and a1[interior].mean() < a0[interior].mean() / 3
    # strength in seconds: twice the fps with half the strength is the same smoothing
    np.testing.assert_allclose(
        cp.stabilize_path(src(shaky), 0.15, fps).extrinsics, cp.stabilize_path(src(shaky), 0.075, 2 * fps).extrinsics
    )


def test_lock_off_holds_the_chosen_source_pose() -> None:
    e_src = jittery_source_path(6)
    cam = cp.novel_camera_path("lock_off:3", 6, K, np.ones((H, W)), W, H, source=CameraPath(e_src, K, W, H))
    np.testing.assert_allclose(cam.extrinsics, np.broadcast_to(e_src[3], (6, 4, 4)))
    with pytest.raises(Exception, match="outside the shot"):
        cp.novel_camera_path("lock_off:6", 6, K, np.ones((H, W)), W, H, source=CameraPath(e_src, K, W, H))


def test_starts_at_source_both_ways() -> None:
    """Catches a rule that ignores rotation, translation or intrinsics, or whose tolerance is absolute zero
    (a Blender float32 round trip must still count as 'at the source')."""
    e = pose((0.3, -0.1, 0.2), rot(10, 3, -2))
    assert cp.starts_at_source(e, e)
    assert cp.starts_at_source(e.astype(np.float32).astype(np.float64) + 1e-6, e)
    assert cp.starts_at_source(np.eye(4), None)
    assert not cp.starts_at_source(pose((0.3, -0.1, 0.2), rot(26, 3, -2)), e)  # 16 degrees away
    assert not cp.starts_at_source(pose((0.31, -0.1, 0.2), rot(10, 3, -2)), e)  # 1 cm away
    k2 = K.copy()
    k2[0, 0] = k2[1, 1] = 1.2 * K[0, 0]
    assert not cp.starts_at_source(e, e, k_novel0=k2, k_src0=K)  # a zoomed-in first frame
    assert cp.starts_at_source(e, e, k_novel0=K, k_src0=K)


def test_camera_specs() -> None:
    assert cp.parse_camera_spec("lock_off") == ("lock_off", None)
    assert cp.parse_camera_spec("lock_off:12") == ("lock_off", 12)
    assert cp.parse_camera_spec("Stabilize:0.8") == ("stabilize", 0.8)
    assert cp.parse_camera_spec("90") == ("preset", "90")
    assert cp.parse_camera_spec("a/b.npz") == ("file", "a/b.npz")
    assert cp.camera_spec_name("stabilize:0.8") == "stabilize_0.8"
    for bad in ("lock_off:x", "stabilize:-1", "sideways"):
        with pytest.raises(Ex4dError):
            cp.parse_camera_spec(bad)


# ----------------------------------------------------------------------------------------------
# guides against ray-cast ground truth
# ----------------------------------------------------------------------------------------------
def test_world_fixed_camera_matches_the_raycast_ground_truth(shot) -> None:
    """A world-fixed novel camera over a jittering, moving source: per frame, pixels whose surface source
    camera t saw are kept (>= 0.99), the others masked (>= 0.99), colour PSNR >= 30 dB. Catches placing the
    mesh by E_src instead of inv(E_src), ignoring the source path (static-source guide), a missing depth
    scale, and per-frame pose/mesh misalignment (frame t's mesh with frame t+1's pose)."""
    frames, depth, source = shot
    e_novel = pose((0.3, -0.12, -0.5), rot(-7.0, 2.5, 1.0))
    cam = CameraPath(np.broadcast_to(e_novel, (T, 4, 4)).copy(), K, W, H, "fixed")
    guide = run_recon(frames, depth, cam, k=K, renderer="cpu", source_camera=source, depth_scale=DEPTH_SCALE, fps=24.0)
    assert not guide.frame0_is_source  # the novel camera does not start at the source: frame 0 is rendered
    _, col_gt, pts, pid = render(e_novel, offset=0.5)
    for t in range(T):
        seen = visible_from(pts.reshape(-1, 3), source.extrinsics[t]).reshape(H, W)
        care = care_region(seen, pid)
        m = guide.mask[t] > 0
        kept = (m & seen & care).sum() / (seen & care).sum()
        masked = (~m & ~seen & care).sum() / (~seen & care).sum()
        sel = m & seen & care
        p = psnr(guide.color[t][sel], col_gt[sel] * 255)
        assert (seen & care).sum() > 0.3 * H * W and (~seen & care).sum() > 0.02 * H * W  # both cases exist
        assert kept >= 0.99 and masked >= 0.99, (t, kept, masked)
        assert p >= 30.0, (t, p)


def test_lock_off_guide_is_still(shot) -> None:
    """lock_off on the handheld shot: the static scene does not move in the guide. Measured as the best
    integer global shift between guide frame t and frame 1 over co-seen pixels (0 px) and their PSNR
    (>= 35 dB); the same measures on the footage itself show the shake (a shift or < 30 dB), so they detect
    motion. The guide also matches a ray-cast from source pose 0 (PSNR >= 30 dB)."""
    frames, depth, source = shot
    guide = run_recon(frames, depth, "lock_off", k=K, renderer="cpu", source_camera=source, depth_scale=DEPTH_SCALE)
    assert guide.frame0_is_source  # lock_off at frame 0 starts at the source

    def best_shift(a, ma, b, mb, r=3):
        best, arg = np.inf, None
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                sb = np.roll(b, (dy, dx), (0, 1))
                sm = np.roll(mb, (dy, dx), (0, 1)) & ma
                sm[:r], sm[-r:], sm[:, :r], sm[:, -r:] = False, False, False, False
                err = np.mean((a[sm].astype(float) - sb[sm]) ** 2)
                if err < best:
                    best, arg = err, (dy, dx)
        return arg, 10 * np.log10(255**2 / max(best, 1e-12))

    footage_moves = 0
    _, col_gt, pts, pid = render(source.extrinsics[0], offset=0.5)
    for t in range(2, T):  # frame 0 is the footage itself (sampled half a pixel off the rendered frames)
        shift, p = best_shift(guide.color[1], guide.mask[1] > 0, guide.color[t], guide.mask[t] > 0)
        assert shift == (0, 0) and p >= 35.0, (t, shift, p)
        fshift, fp = best_shift(frames[1], np.ones((H, W), bool), frames[t], np.ones((H, W), bool))
        footage_moves += fshift != (0, 0) or fp < 30.0
        seen = visible_from(pts.reshape(-1, 3), source.extrinsics[t]).reshape(H, W)
        sel = (guide.mask[t] > 0) & seen & care_region(seen, pid)
        assert psnr(guide.color[t][sel], col_gt[sel] * 255) >= 30.0
    assert footage_moves == T - 2


def test_frame0_rule_through_run_recon(shot) -> None:
    """Frame 0 is the source frame with a full mask only when the novel camera starts at the source;
    otherwise it is rendered like any frame (identical to the same pose rendered as a later frame)."""
    frames, depth, source = shot
    at_source = run_recon(
        frames[:2], depth[:2], "lock_off", k=K, renderer="cpu", source_camera=CameraPath(source.extrinsics[:2], K, W, H)
    )
    np.testing.assert_array_equal(at_source.color[0], frames[0])
    assert (at_source.mask[0] == 255).all()
    e_away = source.extrinsics[0].copy()
    e_away[:3, :3] = rot(16.0)[:3, :3].T @ e_away[:3, :3]  # 16 degrees away from source pose 0
    e_away[:3, 3] = rot(16.0)[:3, :3].T @ e_away[:3, 3]
    away = CameraPath(np.stack([e_away, e_away]), K, W, H)
    g = run_recon(
        np.stack([frames[0], frames[0]]),
        np.stack([depth[0], depth[0]]),
        away,
        k=K,
        renderer="cpu",
        source_camera=CameraPath(np.stack([source.extrinsics[0]] * 2), K, W, H),
        depth_scale=DEPTH_SCALE,
    )
    assert not g.frame0_is_source and (g.mask[0] == 0).any()
    np.testing.assert_array_equal(g.color[0], g.color[1])
    np.testing.assert_array_equal(g.mask[0], g.mask[1])


def test_static_source_keeps_the_reference_behaviour(shot) -> None:
    """No source camera: the reference's world (source frame 0 at the origin) and its frame-0 rule for a
    preset. Catches a default source that is not the identity."""
    frames, depth, _ = shot
    a = run_recon(frames[:3], depth[:3], "30", k=K, renderer="cpu")
    b = run_recon(frames[:3], depth[:3], "30", k=K, renderer="cpu", source_camera=cp.static_source(3, K, W, H))
    np.testing.assert_array_equal(a.color, b.color)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.color[0], frames[0])


def test_cli_source_camera_file(shot, tmp_path: Path, capsys) -> None:
    """``ex4d recon --source-camera FILE --cam lock_off`` end to end through ``cli.main`` (the console
    script's entry point, in-process to stay fast): the saved novel path is source pose 0 on every frame;
    a missing source file is one clear error (exit 2) before any output is written."""
    from ex4d_backend import cli
    from ex4d_backend.footage import write_png_sequence

    frames, depth, source = shot
    write_png_sequence(tmp_path / "in", frames[:3])
    np.save(tmp_path / "depth.npy", depth[:3] * DEPTH_SCALE)
    (tmp_path / "src.json").write_text(
        json.dumps({"extrinsics": source.extrinsics[:3].tolist(), "intrinsics": K.tolist()})
    )
    out = tmp_path / "out"
    args = ["recon", "--input", str(tmp_path / "in"), "--depth", str(tmp_path / "depth.npy"), "--cam", "lock_off",
            "--source-camera", str(tmp_path / "src.json"), "--output-dir", str(out), "--renderer", "cpu",
            "--fps", "24"]  # fmt: skip
    assert cli.main(args) == 0
    assert (out / "color_lock_off.mp4").is_file()
    with np.load(out / "camera_lock_off.npz") as cam:
        np.testing.assert_allclose(cam["extrinsics"], np.broadcast_to(source.extrinsics[0], (3, 4, 4)), atol=1e-9)
    bad_out = tmp_path / "bad"
    bad = [str(tmp_path / "missing.json") if a.endswith("src.json") else str(bad_out) if a == str(out) else a
           for a in args]  # fmt: skip
    assert cli.main(bad) == 2
    assert "missing.json" in capsys.readouterr().err and not bad_out.exists()
