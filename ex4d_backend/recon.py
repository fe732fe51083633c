"""Reconstruction: footage frames + depth + a camera -> the guide (colour, mask) EX-4D generates from.

``run_recon`` builds the DW-meshes and renders them in chunks of frames (bounded memory), reporting
progress per chunk; ``write_recon_outputs`` writes the reference's files atomically.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import transfer
from .cameras import CameraPath, load_camera_file, preset_path, reference_intrinsics, save_camera_npz
from .dwmesh import DWMesh, build_dwmesh, write_ply
from .errors import Ex4dError
from .render import guide_tensors, rasterize_rgba, resolve_renderer, rgba_to_guide

Progress = Callable[[str, int, int, str], None]
CHUNK_PIXELS = {"cuda": 16_000_000, "cpu": 6_000_000}  # pixels x frames per chunk (memory bound)


def _finish(pending: tuple, color: np.ndarray, mask: np.ndarray) -> None:
    """Wait for a chunk's asynchronous read-back and copy it out of the pinned buffers."""
    start, stop, col_h, mask_h, event = pending
    event.synchronize()
    torch.from_numpy(color[start:stop]).copy_(col_h)
    torch.from_numpy(mask[start:stop]).copy_(mask_h)


@dataclass
class Guide:
    color: np.ndarray  # (T, H, W, 3) uint8
    mask: np.ndarray  # (T, H, W) uint8 {0, 255}
    camera: CameraPath
    mesh0: DWMesh | None  # DW-mesh of frame 0 (for the PLY export)


def resolve_camera(
    camera: str | os.PathLike | CameraPath, n_frames: int, k: np.ndarray, depth0: np.ndarray, width: int, height: int
) -> CameraPath:
    """A CameraPath from a preset name, a camera file (.json/.npz) or a CameraPath."""
    if isinstance(camera, CameraPath):
        cam = camera
    elif str(camera).lower().endswith((".json", ".npz")):
        cam = load_camera_file(camera, n_frames, width, height, default_k=k)
    else:
        cam = preset_path(str(camera), n_frames, k, depth0, width, height)
    if len(cam) < n_frames:
        raise Ex4dError(f"the camera path has {len(cam)} frames but {n_frames} are needed", where="camera")
    if (cam.width, cam.height) != (width, height):
        raise Ex4dError(
            f"the camera is for {cam.width}x{cam.height} but the footage is processed at {width}x{height}",
            where="camera",
        )
    return cam


def run_recon(
    frames: np.ndarray,
    depth: np.ndarray,
    camera: str | os.PathLike | CameraPath,
    *,
    k: np.ndarray | None = None,
    renderer: str = "auto",
    mesh_filter: str = "angle",
    use_dwmesh: bool = True,
    keep_mesh0: bool = False,
    progress: Progress | None = None,
) -> Guide:
    """Render the guide for a novel camera.

    Args:
        frames: (T, H, W, 3) uint8 source frames.
        depth: (T, H, W) float32 depth (z, scene units) at the frames' size.
        camera: preset name ("90", "zoom_in", ...), camera file path, or a CameraPath (>= T frames).
        k: (3, 3) source intrinsics in pixels (default: the reference's fx = fy = 500).
        renderer: "auto", "cuda" or "cpu".
        mesh_filter: "angle" (reference) or "boundary".
        use_dwmesh: keep occlusion faces (watertight, reference default) or remove them.
        keep_mesh0: keep frame 0's DW-mesh in the result (for PLY export).
        progress: ``progress(stage, step, total, message)``; may raise ``errors.Cancelled``.
    """
    frames = np.asarray(frames)
    depth = np.asarray(depth, dtype=np.float32)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise Ex4dError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if depth.shape != (t, h, w):
        raise Ex4dError(f"depth {depth.shape} does not match the frames {(t, h, w)}", where="depth")
    k = reference_intrinsics(w, h) if k is None else np.asarray(k, dtype=np.float64)
    cam = resolve_camera(camera, t, k, depth[0], w, h)
    backend = resolve_renderer(renderer)
    device = torch.device("cuda") if backend == "cuda" else torch.device("cpu")
    chunk = max(1, CHUNK_PIXELS[backend] // (h * w))
    color = np.empty((t, h, w, 3), np.uint8)
    mask = np.empty((t, h, w), np.uint8)
    mesh0 = None
    n_chunks = (t + chunk - 1) // chunk
    pending: tuple | None = None  # CUDA: (start, stop, pinned colour, pinned mask, event) being read back
    for i, start in enumerate(range(0, t, chunk)):
        if progress:
            progress("render", i, n_chunks, f"frames {start}-{min(t, start + chunk) - 1}")
        stop = min(t, start + chunk)
        if backend == "cuda":  # pinned, asynchronous copies; chunk i's read-back overlaps chunk i+1's work
            slot = i % 2
            d = transfer.upload(depth[start:stop], "depth", slot, device)
            c = transfer.upload(frames[start:stop], "frames", slot, device)
        else:
            d, c = torch.from_numpy(depth[start:stop]), torch.from_numpy(frames[start:stop])
        mesh = build_dwmesh(d, k, c, mesh_filter=mesh_filter)
        sl = slice(start, stop)
        rgba = rasterize_rgba(mesh, cam.extrinsics[sl], cam.intrinsics[sl], renderer=backend, use_dwmesh=use_dwmesh)
        if backend == "cuda":
            col_t, mask_t = guide_tensors(rgba)
            col_h, ev_c = transfer.download_async(col_t, "color", slot)
            mask_h, ev_m = transfer.download_async(mask_t, "mask", slot)
            if pending is not None:
                _finish(pending, color, mask)
            pending = (start, stop, col_h, mask_h, ev_m)
        else:
            color[sl], mask[sl] = rgba_to_guide(rgba)
        if keep_mesh0 and start == 0:
            mesh0 = DWMesh(
                mesh.vertices[:1].cpu(), mesh.faces.cpu(), mesh.invalid[:1].cpu(), mesh.colors[:1].cpu(), h, w
            )
        del mesh, rgba
    if pending is not None:
        _finish(pending, color, mask)
    color[0] = frames[0]  # reference: the guide's frame 0 is the source frame with a full mask
    mask[0] = 255
    if progress:
        progress("render", n_chunks, n_chunks, "done")
    return Guide(color, mask, CameraPath(cam.extrinsics[:t], cam.intrinsics[:t], w, h, cam.name), mesh0)


def write_recon_outputs(
    guide: Guide,
    output_dir: str | os.PathLike,
    cam_name: str,
    fps: float,
    *,
    png: bool = False,
    save_mesh: bool = False,
) -> dict[str, Path]:
    """Write ``color_<cam>.mp4``, ``mask_<cam>.mp4``, ``camera_<cam>.npz`` (+ ``DW-Mesh.ply``, PNG folders
    ``color_<cam>/``, ``mask_<cam>/``) into ``output_dir``, each atomically."""
    from .atomic import atomic_group
    from .footage import write_png_sequence, write_video

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_group() as g:  # all outputs or none (a full disk never leaves a new video beside old files)
        paths = {
            "color_video": write_video(g.path(out / f"color_{cam_name}.mp4"), guide.color, fps),
            "mask_video": write_video(g.path(out / f"mask_{cam_name}.mp4"), guide.mask, fps),
            "camera": save_camera_npz(g.path(out / f"camera_{cam_name}.npz"), guide.camera),
        }
        if png:
            paths["color_frames"] = write_png_sequence(g.path(out / f"color_{cam_name}"), guide.color)
            paths["mask_frames"] = write_png_sequence(g.path(out / f"mask_{cam_name}"), guide.mask)
        if save_mesh:
            if guide.mesh0 is None:
                raise ValueError("run_recon(keep_mesh0=True) is needed to save the mesh")
            paths["mesh"] = write_ply(g.path(out / "DW-Mesh.ply"), guide.mesh0, 0)
    return {key: g.final(p) for key, p in paths.items()}
