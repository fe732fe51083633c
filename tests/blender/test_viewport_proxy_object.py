# ruff: noqa: F811 - the fixtures imported from test_job_ops are used as arguments
"""The DW-mesh object as a viewport proxy (issue 16: the 1080p build stalled the UI for 0.3-0.7 s in one
``polygons.foreach_set``), in real headless Blender against a real backend.

Ground truth: the card clip of test_job_ops at 600 x 300 (W*H / 65,536 -> stride 2): the reference's
unprojection of the exact depth (border ring at 100) at the kept pixels, the pinhole projection with the
object's K, pixel-centre UVs written out here.
"""

from __future__ import annotations

import bpy
import numpy as np
import pytest
from conftest import addon_module
from test_job_ops import _make_clip, ops  # noqa: F401

W, H, T = 600, 300, 3
CARD = (200, 400, 100, 200)


@pytest.fixture(scope="module")
def big_clip(job_store) -> dict:
    return _make_clip(job_store.parent / "clips", "proxy", w=W, h=H, t=T, card=CARD)


def _kept(n: int, s: int) -> np.ndarray:
    return np.array(sorted(set(range(0, n, s)) | {n - 1}))


def _build(scene, clip, detail: str):
    addon_module("props").prefs(bpy.context).viewport_mesh_detail = detail
    assert bpy.ops.ex4d.import_footage(filepath=str(clip["frames_dir"])) == {"FINISHED"}
    assert bpy.ops.ex4d.build_dwmesh(depth_filepath=str(clip["depth"])) == {"FINISHED"}, scene.ex4d.last_error
    return scene.ex4d.dwmesh


def test_proxy_object_is_the_subsampled_dwmesh(scene, ops, big_clip):
    """With the default "Proxy" preference the object holds the full DW-mesh's vertices at every 2nd column /
    row plus the last (the reference's unprojection of the exact depth there), its UVs are the pixel centres
    of those pixels, its vertices project with K onto those pixels (it lines up with the footage), the Mesh
    Cache modifier plays a point cache of the same size and the occlusion faces follow the frame; "Full"
    builds one vertex per pixel. Catches UVs of the proxy grid stretched over the frame (the last column is
    not on the stride), a proxy point cache of the full size (the modifier then does nothing), a preference
    that is not sent, or a proxy that does not reach the frame's last row / column."""
    obj = _build(scene, big_clip, "proxy")
    cols, rows = _kept(W, 2), _kept(H, 2)
    mesh = obj.data
    assert obj["ex4d_viewport_stride"] == 2 and len(mesh.vertices) == len(cols) * len(rows)
    assert len(mesh.polygons) == 2 * (len(cols) - 1) * (len(rows) - 1) + 2
    co = np.empty(len(mesh.vertices) * 3, np.float32)
    mesh.vertices.foreach_get("co", co)
    co = co.reshape(-1, 3).astype(np.float64)
    k = np.asarray(obj["ex4d_K"], dtype=np.float64).reshape(3, 3)
    d = np.load(big_clip["depth"])[0].astype(np.float64)
    d[0, :] = d[-1, :] = d[:, 0] = d[:, -1] = 100.0
    v, u = np.meshgrid(rows, cols, indexing="ij")
    dd = d[v, u]
    want = np.stack([(u - k[0, 2]) / k[0, 0] * dd, (v - k[1, 2]) / k[1, 1] * dd, dd], -1).reshape(-1, 3)
    np.testing.assert_allclose(co, want, rtol=1e-5, atol=1e-4)
    proj = co @ k.T
    np.testing.assert_allclose(proj[:, :2] / proj[:, 2:], np.stack([u, v], -1).reshape(-1, 2), atol=1e-3)
    uv = np.empty(len(mesh.loops) * 2, np.float32)
    mesh.uv_layers.active.data.foreach_get("uv", uv)
    vi = np.empty(len(mesh.loops), np.int32)
    mesh.loops.foreach_get("vertex_index", vi)
    pix = np.stack([u, v], -1).reshape(-1, 2)[vi]
    np.testing.assert_allclose(uv.reshape(-1, 2)[:, 0], (pix[:, 0] + 0.5) / W, atol=1e-6)
    np.testing.assert_allclose(uv.reshape(-1, 2)[:, 1], 1.0 - (pix[:, 1] + 0.5) / H, atol=1e-6)
    scene.frame_set(scene.frame_start + 1)
    dg = bpy.context.evaluated_depsgraph_get()
    moved = addon_module("data").evaluated_positions(obj, dg)
    assert moved.shape == (len(cols) * len(rows), 3)
    data = addon_module("data")
    occ = data.get_face_bool(mesh, data.OCCLUSION_ATTRIBUTE)
    assert len(occ) == len(mesh.polygons) and 0 < occ.sum() < len(occ)  # the card's edges
    full = _build(scene, big_clip, "full")
    assert full["ex4d_viewport_stride"] == 1 and len(full.data.vertices) == W * H
    addon_module("props").prefs(bpy.context).viewport_mesh_detail = "proxy"
