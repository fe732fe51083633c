"""CPU guide renderer against analytic ground truth: a textured plane is a homography of the source, a card
in front of a wall masks exactly the disoccluded strip, plus the reference's post-processing rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ex4d_backend import dwmesh, raster_cpu, render
from ex4d_backend.cameras import CameraPath

W, H = 64, 48


def rotation(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    y, p, r = np.radians([yaw_deg, pitch_deg, roll_deg])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


def extrinsics(rot: np.ndarray, centre: np.ndarray) -> np.ndarray:
    e = np.eye(4)
    e[:3, :3] = rot
    e[:3, 3] = -rot @ np.asarray(centre, float)
    return e


def bilinear(grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample (H, W, C) vertex values at continuous (u, v); vertex (r, c) sits at u = c, v = r."""
    c0 = np.clip(np.floor(u).astype(int), 0, grid.shape[1] - 2)
    r0 = np.clip(np.floor(v).astype(int), 0, grid.shape[0] - 2)
    fu, fv = (u - c0)[..., None], (v - r0)[..., None]
    g = grid.astype(np.float64)
    return (
        g[r0, c0] * (1 - fu) * (1 - fv)
        + g[r0, c0 + 1] * fu * (1 - fv)
        + g[r0 + 1, c0] * (1 - fu) * fv
        + g[r0 + 1, c0 + 1] * fu * fv
    )


def triangle_interp(grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Linear interpolation of (H, W) vertex values on the reference triangles of the quad holding (u, v):
    (c, a, b) above the diagonal b-c (fu + fv <= 1), (c, b, d) below it."""
    c0 = np.clip(np.floor(u).astype(int), 0, grid.shape[1] - 2)
    r0 = np.clip(np.floor(v).astype(int), 0, grid.shape[0] - 2)
    fu, fv = u - c0, v - r0
    a, b = grid[r0, c0], grid[r0, c0 + 1]
    c, d = grid[r0 + 1, c0], grid[r0 + 1, c0 + 1]
    upper = a + fu * (b - a) + fv * (c - a)
    lower = d + (1 - fu) * (c - d) + (1 - fv) * (b - d)
    return np.where(fu + fv <= 1, upper, lower)


def separable_texture(rng: np.random.Generator) -> np.ndarray:
    """RGB = a(column) + b(row): bilinear interpolation of it equals the triangles' linear interpolation, so
    the renderer's output must match bilinear sampling exactly (no dependence on the quad's split)."""
    tex = np.empty((H, W, 3), np.uint8)
    for ch in range(3):
        a = rng.integers(0, 128, W)
        b = rng.integers(0, 128, H)
        tex[..., ch] = a[None, :] + b[:, None]
    return tex


# ----------------------------------------------------------------------------------------------
# (1) a fronto-parallel textured plane: the render is the homography of the source image
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "angles,centre",
    [
        ((4.0, -3.0, 2.0), (0.15, -0.1, 0.3)),
        ((-6.0, 2.0, -5.0), (-0.2, 0.12, -0.25)),
        ((0.0, 0.0, 0.0), (0.3, 0.2, 0.0)),
    ],
)
def test_plane_is_a_homography_of_the_source(angles, centre) -> None:
    rng = np.random.default_rng(3)
    z_plane = 3.0
    k = np.array([[60.0, 0, W / 2], [0, 60.0, H / 2], [0, 0, 1]])
    tex = separable_texture(rng)
    depth = np.full((1, H, W), z_plane, np.float32)
    mesh = dwmesh.build_dwmesh(depth, k, tex[None])
    rot = rotation(*angles)
    e = extrinsics(rot, centre)
    rgba = render.rasterize_rgba(mesh, e[None], k[None], renderer="cpu")[0].numpy().astype(np.float64)

    # Homography source -> target for the plane n.X = z_plane, n = (0, 0, 1): K (R + t n^T / z) K^-1.
    hom = k @ (rot + np.outer(e[:3, 3], [0, 0, 1]) / z_plane) @ np.linalg.inv(k)
    j, i = np.mgrid[0:H, 0:W]
    pix = np.stack([i + 0.5, j + 0.5, np.ones_like(i, dtype=float)], -1)  # pixel centres
    src = pix @ np.linalg.inv(hom).T
    us, vs = src[..., 0] / src[..., 2], src[..., 1] / src[..., 2]

    # Colour: wherever the source position is on the plane's vertices (inside the border ring).
    inside = (us >= 1.0) & (us <= W - 2.0) & (vs >= 1.0) & (vs <= H - 2.0)
    interior = (us >= 1.5) & (us <= W - 2.5) & (vs >= 1.5) & (vs <= H - 2.5)
    assert interior.sum() > 0.6 * W * H
    expected_rgb = bilinear(tex, us, vs)
    np.testing.assert_allclose(rgba[interior][:, :3], expected_rgb[interior], atol=0.02)
    # Alpha: 0 on the ring and on the first interior ring (vertices of the stretched ring faces), else 255;
    # not separable, so interpolated on the reference triangles (c, a, b) / (c, b, d) of each quad.
    alpha_grid = np.zeros((H, W))
    alpha_grid[2:-2, 2:-2] = 255.0
    expected_a = triangle_interp(alpha_grid, us, vs)
    np.testing.assert_allclose(rgba[inside][:, 3], expected_a[inside], atol=0.02)
    assert np.all(rgba[(us >= 2) & (us <= W - 3) & (vs >= 2) & (vs <= H - 3)][:, 3] > 254.98)


def test_plane_tri_ids_are_the_faces_under_the_pixel() -> None:
    """nvdiffrast convention: pixel (i, j) samples (i + 0.5, j + 0.5); with the source camera the covering face
    of each interior pixel is the (c, b, d) face of quad (j, i) (centre below the quad's diagonal)."""
    k = np.array([[60.0, 0, W / 2], [0, 60.0, H / 2], [0, 0, 1]])
    mesh = dwmesh.build_dwmesh(np.full((1, H, W), 2.0, np.float32), k, np.zeros((1, H, W, 3), np.uint8))
    clip = render.clip_positions(mesh.vertices, np.eye(4)[None], k[None], W, H).numpy()
    tri, bary = raster_cpu.rasterize(clip, mesh.faces.numpy(), (H, W))
    j, i = np.mgrid[1 : H - 2, 1 : W - 2]
    quad = j * (W - 1) + i
    # centre (i + .5, j + .5) lies on the diagonal b-c of quad (j, i): either face of that quad is correct
    assert np.all((tri[0, 1 : H - 2, 1 : W - 2] == 2 * quad) | (tri[0, 1 : H - 2, 1 : W - 2] == 2 * quad + 1))
    # barycentrics reproduce the pixel centre: u = sum(w_k u_k)
    faces = mesh.faces.numpy()[tri[0, 1 : H - 2, 1 : W - 2]]
    wts = np.concatenate([bary[0, 1 : H - 2, 1 : W - 2], 1 - bary[0, 1 : H - 2, 1 : W - 2].sum(-1, keepdims=True)], -1)
    u_vert = faces % W
    np.testing.assert_allclose((wts * u_vert).sum(-1), i + 0.5, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# (2) a card in front of a wall, camera translated sideways: the mask is the disoccluded strip
# ----------------------------------------------------------------------------------------------
Z_WALL, Z_CARD = 4.0, 2.0
CARD_COLS, CARD_ROWS = (20, 40), (10, 37)  # vertex columns/rows of the card (inclusive)


def card_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = np.array([[50.0, 0, W / 2], [0, 50.0, H / 2], [0, 0, 1]])
    depth = np.full((H, W), Z_WALL, np.float32)
    depth[CARD_ROWS[0] : CARD_ROWS[1] + 1, CARD_COLS[0] : CARD_COLS[1] + 1] = Z_CARD
    frames = separable_texture(np.random.default_rng(5))
    return depth, frames, k


@pytest.mark.parametrize("b", [0.4, -0.4, 0.6])
def test_card_disocclusion_strip(b: float) -> None:
    """Camera centre moved by b along x: a point at depth z moves by -fx b / z pixels. The wall strip that the
    card hid is disoccluded: from the card's edge u_e moved by -fx b / z_card to u_e moved by -fx b / z_wall
    (right edge for b > 0, left edge for b < 0). Mask 0 there, 1 elsewhere (edge pixels excepted)."""
    depth, frames, k = card_scene()
    fx = k[0, 0]
    mesh = dwmesh.build_dwmesh(depth[None].repeat(2, 0), k, frames[None].repeat(2, 0))
    cam = CameraPath(np.stack([np.eye(4), extrinsics(np.eye(3), (b, 0, 0))]), k, W, H)
    color, mask = render.render_guide(mesh, cam, frames[None].repeat(2, 0), renderer="cpu")
    m = mask[1] > 0
    u = np.arange(W) + 0.5
    # the card spans source u in [19.5, 40.5] (half-way to the wall's vertices)
    left, right = CARD_COLS[0] - 0.5, CARD_COLS[1] + 0.5
    if b > 0:
        strip = (right - fx * b / Z_CARD, right - fx * b / Z_WALL)
        other_edge = left - fx * b / Z_CARD
    else:
        strip = (left - fx * b / Z_WALL, left - fx * b / Z_CARD)
        other_edge = right - fx * b / Z_CARD
    in_strip = (u > strip[0]) & (u < strip[1])
    tol = 1.5
    near_edge = (np.abs(u - strip[0]) < tol) | (np.abs(u - strip[1]) < tol) | (np.abs(u - other_edge) < tol)
    # image borders: beyond the source's field of view the border ring's stretched faces show (mask 0)
    shift_wall = -fx * b / Z_WALL
    border = (u > W - 2.5 + shift_wall - tol) | (u < 1.5 + shift_wall + tol)
    check_cols = ~near_edge & ~border
    rows = slice(CARD_ROWS[0] + 3, CARD_ROWS[1] - 2)
    assert in_strip.sum() >= 3 and (in_strip & check_cols).sum() >= 2
    assert not m[rows][:, in_strip & check_cols].any(), "disoccluded strip must be masked out"
    assert m[rows][:, ~in_strip & check_cols].all(), "everything else is seen"
    # rows above and below the card: plain wall, nothing disoccluded
    assert m[2 : CARD_ROWS[0] - 2][:, check_cols | in_strip].all()
    assert m[CARD_ROWS[1] + 3 : H - 2][:, check_cols | in_strip].all()
    # colour is zero exactly where the mask is zero
    assert not color[1][~m].any()
    # seen pixels show the source texture moved by -fx b / z (card and wall each), sampled bilinearly
    j, i = np.mgrid[0:H, 0:W]
    vs = j + 0.5
    us_card, us_wall = i + 0.5 + fx * b / Z_CARD, i + 0.5 + fx * b / Z_WALL  # source u if card / if wall
    card_rows = (vs > CARD_ROWS[0] - 0.5) & (vs < CARD_ROWS[1] + 0.5)
    card_rows_in = (vs > CARD_ROWS[0] + 2) & (vs < CARD_ROWS[1] - 2)
    card_rows_out = (vs < CARD_ROWS[0] - 2.5) | (vs > CARD_ROWS[1] + 2.5)
    on_card = (us_card > left + 2) & (us_card < right - 2) & card_rows_in
    in_card_span = (us_card > left - 2) & (us_card < right + 2) & card_rows
    wall = ~in_card_span & (card_rows_in | card_rows_out) & ~(near_edge | border | in_strip)[None, :]
    ok = m & (on_card | wall) & (vs > 2) & (vs < H - 3)
    us_src = np.where(on_card, us_card, us_wall)
    expected = bilinear(frames, us_src, vs)
    assert ok.sum() > 0.35 * W * H
    np.testing.assert_allclose(color[1][ok], expected[ok], atol=0.51)


# ----------------------------------------------------------------------------------------------
# (3) reference post-processing: frame 0 = source, threshold 125, colour * mask
# ----------------------------------------------------------------------------------------------
def test_mask_threshold_and_colour_times_mask() -> None:
    alpha = torch.tensor([0.0, 124.9, 125.0, 125.001, 126.0, 254.9, 255.0])
    rgb = torch.tensor([[10.4, 200.6, 255.2]]).repeat(len(alpha), 1)
    rgba = torch.cat([rgb, alpha[:, None]], -1).view(1, 1, len(alpha), 4)
    color, mask = render.rgba_to_guide(rgba)
    assert color.dtype == np.uint8 and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask[0, 0], [0, 0, 0, 255, 255, 255, 255])  # alpha > 125, strictly
    expected = np.where(mask[0, 0][:, None] == 255, [[10, 201, 255]], 0)
    np.testing.assert_array_equal(color[0, 0], expected)  # colour * mask / 255, rounded, clipped


def test_frame0_is_the_source_with_full_mask() -> None:
    depth, frames, k = card_scene()
    mesh = dwmesh.build_dwmesh(depth[None].repeat(2, 0), k, frames[None].repeat(2, 0))
    # a camera that starts at the source (frame 0) and moves away (frame 1); one that does NOT start at the
    # source gets a rendered frame 0 (issue 15; tests/test_source_camera.py)
    cam = CameraPath(np.stack([np.eye(4), extrinsics(rotation(10, 0, 0), (0.5, 0, 0))]), k, W, H)
    color, mask = render.render_guide(mesh, cam, frames[None].repeat(2, 0), renderer="cpu")
    assert color.shape == (2, H, W, 3) and mask.shape == (2, H, W)
    np.testing.assert_array_equal(color[0], frames)
    assert np.all(mask[0] == 255)
    assert set(np.unique(mask[1])) <= {0, 255} and (mask[1] == 0).any()
    # chunked rendering: frames after the first chunk are rendered, not replaced
    c2, m2 = render.render_guide(
        dwmesh.build_dwmesh(depth[None], k, frames[None]), cam, frames[None].repeat(2, 0), renderer="cpu", first_frame=1
    )
    np.testing.assert_array_equal(m2[0], mask[1])
    np.testing.assert_array_equal(c2[0], color[1])


# ----------------------------------------------------------------------------------------------
# (4) use_dwmesh: invalid faces kept (occluding) vs removed (non-watertight baseline)
# ----------------------------------------------------------------------------------------------
def test_use_dwmesh_false_removes_occlusion_faces_and_only_reveals() -> None:
    from ex4d_backend import cameras, synthetic

    k = np.array([[45.0, 0, W / 2], [0, 45.0, H / 2], [0, 0, 1]])
    frames, depth, _ = synthetic.make_scene(W, H, 4, k=k)
    mesh = dwmesh.build_dwmesh(depth, k, frames)
    cam = cameras.preset_path("90", 4, k, depth[0], W, H)
    clip = render.clip_positions(mesh.vertices, cam.extrinsics, cam.intrinsics, W, H).numpy()
    faces = mesh.faces.numpy()
    invalid = mesh.invalid.numpy()
    tri_on, bary_on = raster_cpu.rasterize(clip, faces, (H, W))
    tri_off, bary_off = raster_cpu.rasterize(clip, faces, (H, W), ~invalid)
    z_cam = clip[..., 3:4]  # w = camera z
    z_on = raster_cpu.interpolate(z_cam, faces, tri_on, bary_on)[..., 0]
    z_off = raster_cpu.interpolate(z_cam, faces, tri_off, bary_off)[..., 0]
    rgba_on = render.rasterize_rgba(mesh, cam.extrinsics, cam.intrinsics, renderer="cpu", use_dwmesh=True).numpy()
    rgba_off = render.rasterize_rgba(mesh, cam.extrinsics, cam.intrinsics, renderer="cpu", use_dwmesh=False).numpy()
    n_revealed = 0
    for t in range(4):
        on, off = tri_on[t], tri_off[t]
        inv_t = invalid[t]
        assert not inv_t[off[off >= 0]].any(), "use_dwmesh=False must not draw occlusion faces"
        on_invalid = (on >= 0) & inv_t[np.maximum(on, 0)]
        assert on_invalid.any(), "the watertight mesh shows occlusion faces"
        # where the watertight mesh shows a valid face, both renders agree exactly
        same = (on >= 0) & ~on_invalid
        np.testing.assert_array_equal(off[same], on[same])
        np.testing.assert_array_equal(rgba_off[t][same], rgba_on[t][same])
        # occlusion faces carry alpha 0: they hide (mask 0) ...
        assert np.all(rgba_on[t][on_invalid][:, 3] == 0)
        # ... what lies behind them, which the baseline shows instead
        behind = on_invalid & (off >= 0)
        assert np.all(z_off[t][behind] >= z_on[t][behind] - 1e-4)
        n_revealed += int((behind & (rgba_off[t][..., 3] > 125)).sum())
        # removing faces can only reveal: watertight mask is a subset of the baseline's
        assert not ((rgba_on[t][..., 3] > 125) & ~(rgba_off[t][..., 3] > 125)).any()
    assert n_revealed > 50


def test_unknown_renderer_is_an_error() -> None:
    from ex4d_backend.errors import Ex4dError

    with pytest.raises(Ex4dError):
        render.resolve_renderer("opengl")
    assert render.resolve_renderer("cpu") == "cpu"


# ----------------------------------------------------------------------------------------------
# homogeneous rasterisation: triangles crossing the camera plane
# ----------------------------------------------------------------------------------------------
def test_floor_crossing_the_camera_plane_has_the_analytic_depth() -> None:
    """A floor y = 1 from z = -5 (behind the camera) to z = 50, two triangles. Pixel row j (centre v = j + 0.5)
    below the horizon sees the floor at z = fy / (v - cy); rows above it see nothing."""
    k = np.array([[40.0, 0, W / 2], [0, 40.0, H / 2 - 6.5], [0, 0, 1]])
    verts = np.array([[-80, 1, -5], [80, 1, -5], [-80, 1, 50], [80, 1, 50]], np.float32)
    faces = np.array([[0, 1, 2], [1, 3, 2]])
    clip = render.clip_positions(torch.from_numpy(verts)[None], np.eye(4)[None], k[None], W, H).numpy()
    tri, bary = raster_cpu.rasterize(clip, faces, (H, W))
    z = raster_cpu.interpolate(clip[..., 3:4], faces, tri, bary)[0, ..., 0]  # w = camera z
    x = raster_cpu.interpolate(verts[None, :, :1], faces, tri, bary)[0, ..., 0]
    v = np.arange(H) + 0.5
    u = np.arange(W) + 0.5
    below = v - k[1, 2] > 40.0 / 50.0 + 0.05  # the floor ends at z = 50
    above = v - k[1, 2] < 40.0 / 50.0 - 0.05
    assert below.sum() > 10 and above.sum() > 5
    assert np.all(tri[0][below] >= 0) and np.all(tri[0][above] == -1)
    z_true = 40.0 / (v[below] - k[1, 2])
    np.testing.assert_allclose(z[below], np.broadcast_to(z_true[:, None], (below.sum(), W)), rtol=1e-4)
    x_true = (u[None, :] - k[0, 2]) / 40.0 * z_true[:, None]  # perspective-correct attribute interpolation
    np.testing.assert_allclose(x[below], x_true, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# recon: rendering in chunks of frames gives the same guide as one chunk
# ----------------------------------------------------------------------------------------------
def test_recon_chunks_equal_single_chunk(monkeypatch) -> None:
    from ex4d_backend import recon, synthetic

    k = np.array([[45.0, 0, W / 2], [0, 45.0, H / 2], [0, 0, 1]])
    frames, depth, _ = synthetic.make_scene(W, H, 5, k=k)
    calls = []
    whole = recon.run_recon(frames, depth, "90", k=k, renderer="cpu", keep_mesh0=True)
    monkeypatch.setitem(recon.CHUNK_PIXELS, "cpu", 2 * W * H)  # 2 frames per chunk -> 3 chunks
    chunked = recon.run_recon(
        frames, depth, "90", k=k, renderer="cpu", keep_mesh0=True, progress=lambda *a: calls.append(a[1:3])
    )
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]
    np.testing.assert_array_equal(chunked.color, whole.color)
    np.testing.assert_array_equal(chunked.mask, whole.mask)
    np.testing.assert_array_equal(chunked.color[0], frames[0])
    assert (chunked.mask[3] == 0).any()
    np.testing.assert_array_equal(chunked.mesh0.vertices.numpy(), whole.mesh0.vertices.numpy())
    assert len(chunked.camera) == 5


def test_recon_progress_can_cancel(monkeypatch) -> None:
    from ex4d_backend import recon, synthetic
    from ex4d_backend.errors import Cancelled

    frames, depth, k = synthetic.make_scene(W, H, 4)
    monkeypatch.setitem(recon.CHUNK_PIXELS, "cpu", W * H)
    seen = []

    def progress(stage, step, total, message=""):
        seen.append(step)
        if step == 1:
            raise Cancelled()

    with pytest.raises(Cancelled):
        recon.run_recon(frames, depth, "30", k=k, renderer="cpu", progress=progress)
    assert seen == [0, 1]
