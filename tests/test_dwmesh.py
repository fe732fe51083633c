"""DW-mesh against a literal numpy implementation of EX4D_REFERENCE.md, "DW-mesh" (loops over faces, arccos)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ex4d_backend import dwmesh
from ex4d_backend.errors import Ex4dError

RNG = np.random.default_rng(7)


def ref_faces(h: int, w: int) -> np.ndarray:
    """Reference triangulation, written as the doc says: quad (r, c) -> (c, a, b), (c, b, d); 2 closing faces."""
    faces = []
    for r in range(h - 1):
        for c in range(w - 1):
            a, b = r * w + c, r * w + c + 1
            cc, d = (r + 1) * w + c, (r + 1) * w + c + 1
            faces.append((cc, a, b))
            faces.append((cc, b, d))
    faces.append((w - 1, 0, h * w - 1))
    faces.append((h * w - 1, 0, (h - 1) * w))
    return np.array(faces)


def ref_vertices(depth: np.ndarray, k: np.ndarray) -> np.ndarray:
    d = depth.astype(np.float64).copy()
    d[0, :] = d[-1, :] = d[:, 0] = d[:, -1] = 100.0
    h, w = d.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    ray = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], -1)
    return (d[..., None] * ray).reshape(-1, 3)


def ref_min_angle_deg(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    p = verts[faces]  # (F, 3, 3)
    angles = []
    for i in range(3):
        e1 = p[:, (i + 1) % 3] - p[:, i]
        e2 = p[:, (i + 2) % 3] - p[:, i]
        cos = (e1 * e2).sum(1) / (np.linalg.norm(e1, axis=1) * np.linalg.norm(e2, axis=1))
        angles.append(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
    return np.min(angles, axis=0)


def ref_boundary(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    p = verts[faces]
    ext = p.max(1) - p.min(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return ext[:, 2] / np.maximum(ext[:, 0], ext[:, 1]) > 2.0


def ref_alpha(n_verts: int, faces: np.ndarray, invalid: np.ndarray) -> np.ndarray:
    alpha = np.full(n_verts, 255, np.uint8)
    for f in faces[invalid]:
        alpha[f] = 0
    return alpha


def random_scene(t: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocky random depth (real discontinuities) plus noise, random colours, a random K."""
    blocks = RNG.uniform(1.0, 8.0, size=(t, h // 4 + 1, w // 4 + 1))
    depth = np.repeat(np.repeat(blocks, 4, 1), 4, 2)[:, :h, :w]
    depth = depth * RNG.uniform(0.97, 1.03, size=depth.shape)
    colors = RNG.integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)
    f = RNG.uniform(15, 40)
    k = np.array([[f, 0, w / 2 + RNG.uniform(-2, 2)], [0, f * RNG.uniform(0.9, 1.1), h / 2], [0, 0, 1]])
    return depth.astype(np.float32), colors, k


@pytest.mark.parametrize("h,w", [(2, 2), (3, 5), (7, 4), (48, 64)])
def test_grid_faces_are_the_reference_triangulation(h: int, w: int) -> None:
    faces = dwmesh.grid_faces(h, w).numpy()
    assert faces.shape == (2 * (h - 1) * (w - 1) + 2, 3) and faces.dtype == np.int64
    np.testing.assert_array_equal(faces, ref_faces(h, w))
    # Orientation: every grid face is wound the same way in the image (u right, v down).
    v, u = np.divmod(faces[:-2], w)
    area2 = (u[:, 1] - u[:, 0]) * (v[:, 2] - v[:, 0]) - (v[:, 1] - v[:, 0]) * (u[:, 2] - u[:, 0])
    assert np.all(area2 == 1)


def test_vertices_border_ring_and_colours() -> None:
    depth, colors, k = random_scene(2, 12, 16)
    mesh = dwmesh.build_dwmesh(depth, k, colors)
    assert mesh.vertices.shape == (2, 12 * 16, 3) and mesh.vertices.dtype == torch.float32
    assert mesh.colors.shape == (2, 12 * 16, 4) and mesh.colors.dtype == torch.uint8
    assert mesh.invalid.shape == (2, mesh.faces.shape[0])
    for t in range(2):
        np.testing.assert_allclose(mesh.vertices[t].numpy(), ref_vertices(depth[t], k), rtol=1e-6, atol=1e-6)
        z = mesh.vertices[t, :, 2].numpy().reshape(12, 16)
        ring = np.ones((12, 16), bool)
        ring[1:-1, 1:-1] = False
        assert np.all(z[ring] == 100.0)
        np.testing.assert_array_equal(mesh.colors[t, :, :3].numpy(), colors[t].reshape(-1, 3))
    # the input depth is not modified in place
    assert depth[:, 0, 0].max() < 100


@pytest.mark.parametrize("seed", range(4))
def test_angle_filter_matches_literal_arccos_reference(seed: int) -> None:
    global RNG
    RNG = np.random.default_rng(100 + seed)
    t, h, w = 3, 20, 26
    depth, colors, k = random_scene(t, h, w)
    mesh = dwmesh.build_dwmesh(depth, k, colors, mesh_filter="angle")
    faces = ref_faces(h, w)
    n_invalid = 0
    for i in range(t):
        verts = mesh.vertices[i].numpy().astype(np.float64)  # the same float32 positions
        min_angle = ref_min_angle_deg(verts, faces)
        expected = min_angle < 2.5
        got = mesh.invalid[i].numpy()
        differ = got != expected
        # only faces within 1e-4 degrees of the threshold may round differently
        assert np.all(np.abs(min_angle[differ] - 2.5) < 1e-4), min_angle[differ]
        assert 0 < expected.sum() < len(faces)  # a real mix of valid and occlusion faces
        n_invalid += int(expected.sum())
        alpha = ref_alpha(h * w, faces, got)
        np.testing.assert_array_equal(mesh.colors[i, :, 3].numpy(), alpha)
    assert n_invalid > 50


def test_angle_filter_flags_steps_and_border_faces_only() -> None:
    h, w = 16, 20
    k = np.array([[50.0, 0, 10], [0, 50.0, 8], [0, 0, 1]])  # step faces: smallest angle about 1.1 degrees
    depth = np.full((1, h, w), 3.0, np.float32)
    depth[:, :, 10:] = 6.0  # a vertical step between columns 9 and 10
    mesh = dwmesh.build_dwmesh(depth, k, np.zeros((1, h, w, 3), np.uint8))
    faces = ref_faces(h, w)
    inv = mesh.invalid[0].numpy()
    rr, cc = np.divmod(faces[:-2], w)
    on_ring = (rr == 0) | (rr == h - 1) | (cc == 0) | (cc == w - 1)
    touches_ring = on_ring.any(1)
    on_step = (cc.min(1) == 9) & (cc.max(1) == 10)
    # interior faces on a plane are valid; faces across the step are invalid; ring faces are stretched
    assert not inv[:-2][~touches_ring & ~on_step].any()
    assert inv[:-2][~touches_ring & on_step].all()
    assert inv[:-2][touches_ring & ~on_ring.all(1)].all()  # faces between the ring (z = 100) and the scene
    assert not inv[:-2][on_ring.all(1)].any()  # faces lying in the ring itself are planar at z = 100


@pytest.mark.parametrize("seed", range(2))
def test_boundary_filter_matches_reference(seed: int) -> None:
    global RNG
    RNG = np.random.default_rng(200 + seed)
    t, h, w = 2, 18, 22
    depth, colors, k = random_scene(t, h, w)
    mesh = dwmesh.build_dwmesh(depth, k, colors, mesh_filter="boundary")
    faces = ref_faces(h, w)
    for i in range(t):
        verts = mesh.vertices[i].numpy().astype(np.float64)
        expected = ref_boundary(verts, faces)
        assert 0 < expected.sum() < len(faces)
        np.testing.assert_array_equal(mesh.invalid[i].numpy(), expected)
        np.testing.assert_array_equal(mesh.colors[i, :, 3].numpy(), ref_alpha(h * w, faces, expected))


def test_closing_triangles_use_the_corners() -> None:
    depth, colors, k = random_scene(1, 9, 13)
    mesh = dwmesh.build_dwmesh(depth, k, colors)
    closing = mesh.faces[-2:].numpy()
    np.testing.assert_array_equal(closing, [[12, 0, 9 * 13 - 1], [9 * 13 - 1, 0, 8 * 13]])
    # the four corners are on the border ring (depth 100): the closing pair is a planar quad at z = 100
    assert np.all(mesh.vertices[0, closing.ravel(), 2].numpy() == 100.0)


def test_invalid_faces_are_kept_not_removed() -> None:
    depth, colors, k = random_scene(2, 10, 12)
    mesh = dwmesh.build_dwmesh(depth, k, colors)
    assert mesh.faces.shape[0] == 2 * 9 * 11 + 2
    assert mesh.invalid.any()  # occlusion faces exist and are still part of the face list


def test_build_dwmesh_rejects_bad_input() -> None:
    k = np.eye(3)
    with pytest.raises(Ex4dError):
        dwmesh.build_dwmesh(np.ones((4, 5), np.float32), k, np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(Ex4dError):
        dwmesh.build_dwmesh(np.ones((1, 1, 5), np.float32), k, np.zeros((1, 1, 5, 3), np.uint8))
    with pytest.raises(Ex4dError):
        dwmesh.build_dwmesh(np.ones((1, 4, 5), np.float32), k, np.zeros((1, 4, 6, 3), np.uint8))
    with pytest.raises(Ex4dError):
        dwmesh.build_dwmesh(np.ones((1, 4, 5), np.float32), k, np.zeros((1, 4, 5, 3), np.uint8), mesh_filter="x")


def _parse_ply(data: bytes) -> tuple[dict, bytes]:
    """A small generic binary-PLY header parser (independent of dwmesh.read_ply)."""
    end = data.index(b"end_header\n") + len(b"end_header\n")
    elements: dict = {}
    current = None
    for line in data[:end].decode("ascii").splitlines():
        parts = line.split()
        if parts[0] == "format":
            assert parts[1] == "binary_little_endian"
        elif parts[0] == "element":
            current = parts[1]
            elements[current] = {"count": int(parts[2]), "props": []}
        elif parts[0] == "property":
            elements[current]["props"].append(parts[1:])
    return elements, data[end:]


def test_ply_round_trip_with_colours_and_occlusion_flag(tmp_path) -> None:
    depth, colors, k = random_scene(2, 9, 11)
    mesh = dwmesh.build_dwmesh(depth, k, colors)
    path = dwmesh.write_ply(tmp_path / "DW-Mesh.ply", mesh, t=1)
    assert [p.name for p in tmp_path.iterdir()] == ["DW-Mesh.ply"]  # nothing temporary left
    verts, cols, faces, occl = dwmesh.read_ply(path)
    np.testing.assert_array_equal(verts, mesh.vertices[1].numpy())
    np.testing.assert_array_equal(cols, mesh.colors[1].numpy())
    np.testing.assert_array_equal(faces, mesh.faces.numpy())
    np.testing.assert_array_equal(occl, mesh.invalid[1].numpy().astype(np.uint8))
    # Independent parse of the file layout.
    elements, body = _parse_ply(path.read_bytes())
    assert elements["vertex"]["count"] == 9 * 11 and elements["face"]["count"] == 2 * 8 * 10 + 2
    vprops = [p[-1] for p in elements["vertex"]["props"]]
    assert vprops == ["x", "y", "z", "red", "green", "blue", "alpha"]
    assert elements["face"]["props"] == [["list", "uchar", "int", "vertex_indices"], ["uchar", "occluded"]]
    vsize = 3 * 4 + 4
    raw_v = np.frombuffer(body[: vsize * 99], np.uint8).reshape(99, vsize)
    np.testing.assert_array_equal(raw_v[:, :12].copy().view("<f4"), mesh.vertices[1].numpy())
    np.testing.assert_array_equal(raw_v[:, 12:], mesh.colors[1].numpy())
    raw_f = np.frombuffer(body[vsize * 99 :], np.uint8).reshape(-1, 1 + 12 + 1)
    assert np.all(raw_f[:, 0] == 3)
    np.testing.assert_array_equal(raw_f[:, 1:13].copy().view("<i4"), mesh.faces.numpy())
    np.testing.assert_array_equal(raw_f[:, 13], mesh.invalid[1].numpy())
    assert raw_f[:, 13].any() and not raw_f[:, 13].all()
