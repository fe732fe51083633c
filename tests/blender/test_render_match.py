"""The convention check: Blender's render of the DW-mesh from the novel camera = the backend's guide.

The DW-mesh (Mesh Cache + occlusion attribute/material) is rendered with Workbench (flat light, texture
colour, no anti-aliasing, Standard view transform) from a keyframed preset camera, and compared with the
colour/mask guide that the backend service renders for the same camera, sent as raw Blender values
(``render_guide`` with ``camera.blender``, evaluated ``matrix_world`` + lens + sensor). Any mismatch in the
world mapping (CV_TO_BLENDER), the camera axes, lens/sensor -> K, UVs, or the clip-frame <-> scene-frame
mapping moves the image by pixels and fails the thresholds (the negative control proves they can fail).

Thresholds (64 x 48 frames, measured in bpy 5.0.1 and 4.2.23):
- mask IoU > 0.95 (measured 0.9993-1.0): Blender's mask is the ``ex4d_mask`` vertex attribute (0 on every
  vertex of an occlusion face, as the guide's vertex alpha) rendered with Workbench's attribute colour and
  thresholded at 125/255 like the guide; only rasterisation ties at triangle edges differ.
- PSNR > 28 dB on pixels both call covered (measured 33.0-33.4 dB on the PNG sequence, 34.2-34.5 dB on the
  H.264 movie): Blender samples the footage texture bilinearly between pixel centres, the backend interpolates
  vertex colours barycentrically inside each triangle; they agree on the triangle edges and differ inside by
  at most a quarter of the quad's "twist" (a - b - c + d), zero on flat colour and large only on the
  checker/stripe edges of the synthetic texture (nearest-texel sampling instead of bilinear measures 24-25 dB,
  below the threshold). Negative control: comparing with the neighbouring frame's guide (camera 6 degrees
  away) gives IoU 0.69-0.73 and 12-15 dB, so a one-frame offset or a wrong axis fails.
"""

from __future__ import annotations

import shutil

import bpy
import numpy as np
import pytest
from conftest import addon_module

IOU_MIN = 0.95
PSNR_MIN = 28.0
MAGENTA = np.array([255, 0, 255])


def _load_png(path) -> np.ndarray:
    """(H, W, 4) uint8, row 0 at the top, as stored in the file (Blender's pixels are bottom-up)."""
    img = bpy.data.images.load(str(path), check_existing=False)
    try:
        w, h = img.size
        px = np.empty(w * h * 4, np.float32)
        img.pixels.foreach_get(px)
    finally:
        bpy.data.images.remove(img)
    return np.round(px.reshape(h, w, 4)[::-1] * 255).astype(np.uint8)


def _workbench(scene, width: int, height: int, color_type: str) -> None:
    """Workbench, flat light, no anti-aliasing, transparent film (uncovered pixels: alpha 0).
    TEXTURE colour: the footage texture, Standard view (sRGB in = sRGB out). VERTEX ("Attribute") colour: the active
    colour attribute (the ``ex4d_mask`` vertex mask), Raw view (linear value = stored value)."""
    scene.render.engine = "BLENDER_WORKBENCH"
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = width, height, 100
    sh = scene.display.shading
    sh.light = "FLAT"
    sh.color_type = color_type
    sh.show_shadows = sh.show_cavity = sh.show_object_outline = sh.show_specular_highlight = False
    sh.show_backface_culling = False
    scene.display.render_aa = "OFF"
    scene.render.film_transparent = True
    vs = scene.view_settings
    vs.view_transform = "Standard" if color_type == "TEXTURE" else "Raw"
    vs.look, vs.exposure, vs.gamma = "None", 0.0, 1.0
    scene.display_settings.display_device = "sRGB"
    st = scene.render.image_settings
    st.file_format, st.color_mode, st.color_depth = "PNG", "RGBA", "8"


def _render(scene, frame: int, path) -> np.ndarray:
    scene.frame_set(frame)
    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)
    return _load_png(path)


def _metrics(rgb: np.ndarray, blender_mask: np.ndarray, color: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    guide_mask = mask > 127
    iou = (blender_mask & guide_mask).sum() / max(1, (blender_mask | guide_mask).sum())
    both = blender_mask & guide_mask
    diff = rgb[both].astype(np.float64) - color[both].astype(np.float64)
    mse = float(np.mean(diff**2)) if diff.size else 65025.0
    psnr = 10 * np.log10(255.0**2 / max(mse, 1e-10))
    return float(iou), float(psnr)


@pytest.mark.slow
@pytest.mark.parametrize("footage", ["frames_dir", "video"])
def test_workbench_render_matches_backend_guide(scene, clip, tmp_path, record_property, footage):
    backend = addon_module("backend")
    scene.frame_start = 7  # not 1: the clip-frame <-> scene-frame mapping is part of the check
    assert bpy.ops.ex4d.import_footage(filepath=str(clip[footage]), focal_px=clip["focal_px"]) == {"FINISHED"}
    assert bpy.ops.ex4d.build_dwmesh(depth_filepath=str(clip["depth"])) == {"FINISHED"}, scene.ex4d.last_error
    assert bpy.ops.ex4d.add_camera_preset(preset="30") == {"FINISHED"}
    cam = scene.ex4d.novel_camera
    n, w, h = clip["n_frames"], clip["width"], clip["height"]
    frames = [scene.frame_start + i for i in range(n)]
    params, paths = backend.clip_params(bpy.context)
    params["camera"] = {"blender": addon_module("sampling").sample_all(scene, cam, frames), "name": "render-match"}
    params["renderer"] = "cpu"
    res = backend.run_blocking(bpy.context, "render_guide", params, paths, timeout=600)
    guide_color = [_load_png(f"{res['color_dir']}/frame_{i:05d}.png")[..., :3] for i in range(n)]
    guide_mask = [_load_png(f"{res['mask_dir']}/frame_{i:05d}.png")[..., 0] for i in range(n)]
    for sub in ("color_dir", "mask_dir"):  # kept beside Blender's renders for inspection
        shutil.copytree(res[sub], tmp_path / sub)

    scene.camera = cam
    renders = {}
    for color_type in ("TEXTURE", "VERTEX"):
        _workbench(scene, w, h, color_type)
        for i in (2, 5):  # frame 0 of a guide is the source frame itself: compare novel views
            renders[color_type, i] = _render(scene, scene.frame_start + i, tmp_path / f"blender_{color_type}_{i}.png")
    results = {}
    for i in (2, 5):
        tex, att = renders["TEXTURE", i], renders["VERTEX", i]
        # covered, and the interpolated vertex mask above the guide's threshold (125 of 255)
        blender_mask = (att[..., 3] > 0) & (att[..., 0] > 125)
        rgb = tex[..., :3]
        iou, psnr = _metrics(rgb, blender_mask, guide_color[i], guide_mask[i])
        results[i] = (iou, psnr)
        record_property(f"frame{i}_iou", iou)
        record_property(f"frame{i}_psnr", psnr)
        # the negative control: the guide of the neighbouring frame (camera 6 degrees away, sphere moved)
        bad_iou, bad_psnr = _metrics(rgb, blender_mask, guide_color[i - 1], guide_mask[i - 1])
        print(f"\nframe {i}: IoU {iou:.4f} PSNR {psnr:.2f} dB | neighbour frame: IoU {bad_iou:.4f} PSNR {bad_psnr:.2f}")
        assert not (bad_iou > IOU_MIN and bad_psnr > PSNR_MIN), "the thresholds cannot tell frames apart"
        assert 0.05 < 1 - guide_mask[i].mean() / 255 < 0.9, "the guide must show disocclusions for a real test"
        magenta = np.all(rgb == MAGENTA, axis=-1) & (tex[..., 3] > 0)
        assert magenta.any() and not (magenta & blender_mask).any(), "occlusion faces are magenta and masked"
    for i, (iou, psnr) in results.items():
        assert iou > IOU_MIN, f"frame {i}: mask IoU {iou:.4f} <= {IOU_MIN}"
        assert psnr > PSNR_MIN, f"frame {i}: PSNR {psnr:.2f} dB <= {PSNR_MIN}"
    assert len(guide_color) == n and pytest.approx(res["n_frames"]) == n
