"""The add-on's viewport proxy of the DW-mesh (issue 16 UI stall, issue 12 store size), through a real
``ex4d serve``: ``build_dwmesh`` with ``viewport_stride`` / ``viewport_detail`` writes a subsample of the
full DW-mesh. Ground truth: the full mesh's own files (``viewport_detail: full``), the reference
triangulation and the pinhole projection written out here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import service_fixtures as sf

from ex4d_backend import viewport_proxy as vp
from ex4d_backend.service.pointcache import read_pc2

W, H, T = 50, 38, 3  # odd sizes: the last column / row is not on the stride


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy")
    clip = sf.make_clip(root / "data", width=W, height=H, n_frames=T, focal_px=45.0)
    client = sf.start_client(root / "store", [clip.root])
    yield clip, client
    client.close()


def _build(svc, **extra) -> dict:
    clip, client = svc
    req, _ = sf.run(client, "build_dwmesh", clip.params(**extra))
    return req.raise_for_error()


def _kept(n: int, s: int) -> np.ndarray:
    return np.array(sorted(set(range(0, n, s)) | {n - 1}))


def test_stride_rule():
    """s is the smallest integer with W*H / s^2 <= 65,536 (512^2 -> 2, 1024x576 -> 3, 1920x1080 at the full
    processing size 1024x576 -> 3; small shots: 1); full detail is 1. Catches a stride rule off by one or
    one that counts the kept last row/column into the limit (512^2 would then need s = 3)."""
    assert vp.viewport_stride(512, 512, "proxy") == 2
    assert vp.viewport_stride(1024, 576, "proxy") == 3
    assert vp.viewport_stride(256, 256, "proxy") == 1 and vp.viewport_stride(257, 256, "proxy") == 2
    assert vp.viewport_stride(1024, 576, "full") == 1
    assert vp.viewport_stride(2048, 1152, "proxy") == 6


@pytest.mark.parametrize("stride", [2, 3])
def test_proxy_is_the_full_mesh_subsampled(svc, stride):
    """Proxy positions (every frame) equal the full mesh's positions at the kept grid indices (every s-th
    column/row plus the last, so the border ring stays); the faces follow the reference triangulation on the
    proxy grid. Catches a proxy that resamples or re-meshes the depth instead of selecting full vertices, one
    that drops the last column/row (the proxy would not span the frame), a transposed index, faces in full
    vertex numbers, a PC2 header with the full point count."""
    full, proxy = _build(svc), _build(svc, viewport_stride=stride)
    assert full["viewport_stride"] == 1 and proxy["viewport_stride"] == stride
    cols, rows = _kept(W, stride), _kept(H, stride)
    assert proxy["mesh_columns"] == cols.tolist() and proxy["mesh_rows"] == rows.tolist()
    pf, _, _ = read_pc2(Path(full["positions_pc2"]))
    pp, _, _ = read_pc2(Path(proxy["positions_pc2"]))
    assert pf.shape == (T, H * W, 3) and pp.shape == (T, len(rows) * len(cols), 3)
    want = pf.reshape(T, H, W, 3)[:, rows][:, :, cols].reshape(T, -1, 3)
    np.testing.assert_array_equal(pp, want)
    hp, wp = len(rows), len(cols)
    faces = np.load(proxy["faces_npy"])
    quads = [[(r + 1) * wp + c, r * wp + c, r * wp + c + 1] for r in range(hp - 1) for c in range(wp - 1)]
    quads2 = [[(r + 1) * wp + c, r * wp + c + 1, (r + 1) * wp + c + 1] for r in range(hp - 1) for c in range(wp - 1)]
    ref = np.array([f for pair in zip(quads, quads2, strict=True) for f in pair] + [
        [wp - 1, 0, hp * wp - 1], [hp * wp - 1, 0, (hp - 1) * wp]])  # fmt: skip
    np.testing.assert_array_equal(faces, ref)
    assert proxy["n_vertices"] == hp * wp and proxy["n_faces"] == len(ref)
    assert proxy["job"] != full["job"] and proxy["positions_pc2"] != full["positions_pc2"]  # cache key has it


def _owners(points: np.ndarray, tris: np.ndarray) -> np.ndarray:
    """(P, K) bool: point p (P, 2) inside or on triangle k (K, 3, 2) (barycentric, pixel coordinates)."""
    a, b, c = tris[:, 0], tris[:, 1], tris[:, 2]
    m = np.stack([b - a, c - a], -1)  # (K, 2, 2): columns b - a, c - a
    lam = np.einsum("kij,pkj->pki", np.linalg.inv(m), points[:, None] - a[None])
    return (lam.min(-1) >= -1e-9) & (lam.sum(-1) <= 1 + 1e-9)


def test_proxy_occlusion_follows_the_full_faces(svc):
    """A proxy face is occlusion iff a full face whose pixel-space centroid lies inside it (a point-in-triangle
    test here, independent of the backend's block arithmetic) is. Catches occlusion recomputed on the coarse
    geometry (the angle filter on the proxy flags other faces), flags copied by face number, a rule that drops
    the closing faces, or the two halves of a proxy quad swapped."""
    stride = 3
    full, proxy = _build(svc), _build(svc, viewport_stride=stride)
    occ_f, occ_p = np.load(full["occlusion_npy"]), np.load(proxy["occlusion_npy"])
    faces_f, faces_p = np.load(full["faces_npy"]), np.load(proxy["faces_npy"])
    cols, rows = _kept(W, stride), _kept(H, stride)
    assert occ_f.any(), "the synthetic scene should have occlusion faces"
    pix_f = np.stack(np.meshgrid(np.arange(W), np.arange(H)), -1).reshape(-1, 2).astype(float)  # (x, y) per vertex
    pix_p = np.stack(np.meshgrid(cols, rows), -1).reshape(-1, 2).astype(float)
    want = np.zeros_like(occ_p)
    n_qf, n_qp = len(faces_f) - 2, len(faces_p) - 2
    inside = _owners(pix_f[faces_f[:n_qf]].mean(1), pix_p[faces_p[:n_qp]])
    assert (inside.sum(1) == 1).all(), "every full face's centroid lies in exactly one proxy face"
    owner = inside.argmax(1)
    for fi in range(n_qf):
        want[:, owner[fi]] |= occ_f[:, fi]
    want[:, n_qp:] = occ_f[:, n_qf:]  # the closing faces join the same corner vertices
    np.testing.assert_array_equal(occ_p, want)
    assert occ_p.shape == (T, len(faces_p)) and occ_p.dtype == np.uint8


def test_proxy_lines_up_with_the_footage(svc):
    """Proxy vertices projected with the result's K land on the pixel centres (integer coordinates in the
    reference's ray convention) of the kept grid columns/rows, every frame. Catches a proxy vertex taken from
    the wrong pixel (an off-by-one in the kept lines or the row-major index)."""
    r = _build(svc, viewport_stride=2)
    k = np.asarray(r["K"])
    pos, _, _ = read_pc2(Path(r["positions_pc2"]))
    uvw = pos.astype(np.float64) @ k.T
    uv = uvw[..., :2] / uvw[..., 2:]
    cols, rows = np.asarray(r["mesh_columns"]), np.asarray(r["mesh_rows"])
    want = np.stack(np.meshgrid(cols, rows), -1).reshape(-1, 2)
    np.testing.assert_allclose(uv, np.broadcast_to(want, uv.shape), atol=1e-3)


def test_bad_viewport_params_are_rejected(svc):
    """An unknown detail or a stride of 0 is one invalid_request error (nothing written)."""
    clip, client = svc
    for extra in ({"viewport_detail": "half"}, {"viewport_stride": 0}, {"viewport_stride": 1.5}):
        req, _ = sf.run(client, "build_dwmesh", clip.params(**extra))
        assert req.error is not None and req.error["code"] == "invalid_request", extra


def _walk_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_store_of_a_49_frame_512_square_shot_with_the_addon_mesh(tmp_path):
    """Issue 12's goal with the add-on's mesh: frames + depth + the add-on's DW-mesh (the proxy the add-on asks
    for, s = 2) + one guide of a 49 x 512^2 shot <= 200 MB, summed over the store's files. Catches a proxy
    that still writes the full point cache (154 MB alone) or a second copy of the positions."""
    from ex4d_backend.service import jobs
    from ex4d_backend.service.jobstore import JobStore

    clip = sf.make_clip(tmp_path / "data", width=512, height=512, n_frames=49, focal_px=500.0)
    store = JobStore(tmp_path / "store", [clip.root])
    r = jobs.run_job("build_dwmesh", clip.params(viewport_detail="proxy"), jobs.Context(store))
    assert r["viewport_stride"] == 2 and r["n_vertices"] == 257 * 257
    jobs.run_job("render_guide", clip.params(camera={"preset": "90"}, renderer="cpu"), jobs.Context(store))
    total = _walk_size(store.root / "cache")
    mesh = _walk_size(Path(r["positions_pc2"]).parent)
    print(f"\nstore with frames + depth + proxy mesh + guide: {total / 1e6:.1f} MB (mesh {mesh / 1e6:.1f} MB)")
    assert total <= 200e6, total
