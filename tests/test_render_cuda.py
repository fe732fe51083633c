"""CUDA (nvdiffrast) guide renderer: agreement with the CPU renderer and the analytic plane/card scenes.

Runs only where CUDA is available (``@pytest.mark.cuda``; conftest skips it elsewhere). The first run
compiles nvdiffrast's plugin (about a minute).
"""

from __future__ import annotations

import numpy as np
import pytest

from ex4d_backend import cameras, dwmesh, render, synthetic

pytestmark = pytest.mark.cuda

MIN_IOU = 0.99
MIN_PSNR_DB = 35.0


def _agreement(color_a, mask_a, color_b, mask_b) -> tuple[float, float]:
    """Mask IoU and colour PSNR (dB) over pixels covered in both, frames 1.. (frame 0 is the source)."""
    ma, mb = mask_a[1:] > 0, mask_b[1:] > 0
    iou = float((ma & mb).sum() / max(1, (ma | mb).sum()))
    both = ma & mb
    diff = color_a[1:][both].astype(np.float64) - color_b[1:][both].astype(np.float64)
    mse = float((diff**2).mean()) if diff.size else 0.0
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    return iou, psnr


@pytest.mark.parametrize("preset", ["90", "30", "180", "zoom_out"])
@pytest.mark.parametrize("use_dwmesh", [True, False])
def test_cpu_and_cuda_agree_on_the_synthetic_scene(preset: str, use_dwmesh: bool) -> None:
    import torch

    w, h, n = 256, 192, 9
    frames, depth, k = synthetic.make_scene(w, h, n)
    cam = cameras.preset_path(preset, n, k, depth[0], w, h)
    out = {}
    for backend, device in (("cpu", "cpu"), ("cuda", "cuda")):
        mesh = dwmesh.build_dwmesh(torch.from_numpy(depth).to(device), k, torch.from_numpy(frames).to(device))
        out[backend] = render.render_guide(mesh, cam, frames, renderer=backend, use_dwmesh=use_dwmesh)
    iou, psnr = _agreement(*out["cpu"], *out["cuda"])
    print(f"preset {preset} use_dwmesh={use_dwmesh}: mask IoU {iou:.4f}, colour PSNR {psnr:.2f} dB")
    assert iou >= MIN_IOU
    assert psnr >= MIN_PSNR_DB
    # masks and frame 0 follow the reference on both backends
    for color, mask in out.values():
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(color[0], frames[0])
        assert np.all(mask[0] == 255)


def test_cuda_plane_is_a_homography_of_the_source() -> None:
    from test_render_cpu import H, W, bilinear, extrinsics, rotation, separable_texture

    k = np.array([[60.0, 0, W / 2], [0, 60.0, H / 2], [0, 0, 1]])
    tex = separable_texture(np.random.default_rng(3))
    z_plane = 3.0
    mesh = dwmesh.build_dwmesh(np.full((1, H, W), z_plane, np.float32), k, tex[None], device="cuda")
    rot = rotation(4.0, -3.0, 2.0)
    e = extrinsics(rot, (0.15, -0.1, 0.3))
    rgba = render.rasterize_rgba(mesh, e[None], k[None], renderer="cuda")[0].cpu().numpy().astype(np.float64)
    hom = k @ (rot + np.outer(e[:3, 3], [0, 0, 1]) / z_plane) @ np.linalg.inv(k)
    j, i = np.mgrid[0:H, 0:W]
    src = np.stack([i + 0.5, j + 0.5, np.ones((H, W))], -1) @ np.linalg.inv(hom).T
    us, vs = src[..., 0] / src[..., 2], src[..., 1] / src[..., 2]
    interior = (us >= 2.5) & (us <= W - 3.5) & (vs >= 2.5) & (vs <= H - 3.5)
    # nvdiffrast snaps vertices to a fixed-point sub-pixel grid and interpolates in float32, so unlike the CPU
    # rasteriser (within 0.02) it is not exact; measured on an H100: mean 0.021, 99th percentile 0.71, max 4.1
    # (of 255). A half-pixel or axis error gives errors of tens (the texture's gradient is up to ~60 per pixel).
    err = np.abs(rgba[interior][:, :3] - bilinear(tex, us, vs)[interior])
    assert err.mean() < 0.1
    assert np.percentile(err, 99) < 1.5
    assert err.max() < 8.0
    assert np.all(rgba[interior][:, 3] > 254.9)


def test_cuda_card_strip_matches_cpu() -> None:
    from test_render_cpu import H, W, card_scene, extrinsics

    depth, frames, k = card_scene()
    masks = {}
    for backend in ("cpu", "cuda"):
        mesh = dwmesh.build_dwmesh(
            depth[None].repeat(2, 0), k, frames[None].repeat(2, 0), device="cuda" if backend == "cuda" else "cpu"
        )
        cam = cameras.CameraPath(np.stack([np.eye(4), extrinsics(np.eye(3), (0.4, 0, 0))]), k, W, H)
        masks[backend] = render.render_guide(mesh, cam, frames[None].repeat(2, 0), renderer=backend)[1][1] > 0
    # the strip (columns 30.5..35.5 in the card's rows) is masked on both; differences only at edges
    rows = slice(13, 35)
    assert not masks["cuda"][rows, 32:34].any()
    differ = masks["cpu"] != masks["cuda"]
    assert differ.sum() <= 0.05 * H * W  # antialiasing moves silhouette-edge pixels only


def test_the_clip_kept_on_the_device_renders_the_same_guide(monkeypatch) -> None:
    """``render_guide`` with a ``resident_key``: the first render uploads the clip and keeps it on the device,
    the next render with that key uses it (no upload), and both give byte for byte the guides of a render
    without a key; another key, other arrays or a released clip upload again; a clip too large is never
    kept. Fails if the kept clip misses a chunk, is filled after its use, or is reused for other arrays."""
    from ex4d_backend import transfer
    from ex4d_backend.pipeline import resident_clip
    from ex4d_backend.pipeline.guide import render_guide
    from ex4d_backend.pipeline.settings import MeshSettings, RenderSettings

    w, h, n = 96, 64, 11  # several chunks
    frames, depth, k = synthetic.make_scene(w, h, n)
    rs = RenderSettings("cuda")
    cams = [cameras.preset_path(p, n, k, depth[0], w, h) for p in ("90", "zoom_out")]
    uploads = []
    real_upload = transfer.upload
    monkeypatch.setattr(transfer, "upload", lambda *a, **kw: uploads.append(a[1]) or real_upload(*a, **kw))
    for cam in cams:
        resident_clip.release()
        want = render_guide(frames, depth, k, cam, MeshSettings(), rs)
        assert uploads and resident_clip._CLIP is None  # no key: nothing kept
        uploads.clear()
        first = render_guide(frames, depth, k, cam, MeshSettings(), rs, resident_key="shot-a")
        assert uploads and resident_clip.get("shot-a", depth.shape) is not None
        uploads.clear()
        again = render_guide(frames, depth, k, cam, MeshSettings(), rs, resident_key="shot-a")
        assert not uploads  # the kept clip
        for got in (first, again):
            np.testing.assert_array_equal(got.color, want.color)
            np.testing.assert_array_equal(got.mask, want.mask)
    other = np.ascontiguousarray(frames[:, ::-1])
    got = render_guide(other, depth, k, cams[0], MeshSettings(), rs, resident_key="shot-b")
    assert uploads and resident_clip.get("shot-a", depth.shape) is None  # one clip at a time
    np.testing.assert_array_equal(got.color, render_guide(other, depth, k, cams[0], MeshSettings(), rs).color)
    resident_clip.release()
    monkeypatch.setattr(resident_clip, "MAX_BYTES", 1000)
    render_guide(frames, depth, k, cams[0], MeshSettings(), rs, resident_key="shot-a")
    assert resident_clip._CLIP is None
