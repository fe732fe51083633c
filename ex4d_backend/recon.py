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
from .camera_paths import (
    default_intrinsics,
    guide_starts_at_source,
    load_source_camera,
    mesh_to_novel,
    novel_camera_path,
)
from .cameras import CameraPath, reference_intrinsics, save_camera_npz
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
    source: CameraPath | None = None  # the source camera path (None: static at the origin)
    frame0_is_source: bool = True  # guide frame 0 is the source frame (the novel camera starts at the source)


def resolve_camera(
    camera: str | os.PathLike | CameraPath,
    n_frames: int,
    k: np.ndarray,
    depth0: np.ndarray,
    width: int,
    height: int,
    source: CameraPath | None = None,
    fps: float = 30.0,
    depth_scale: float = 1.0,
) -> CameraPath:
    """A CameraPath from a preset name (relative to ``source``), lock_off[:F], stabilize[:S], a camera file
    (.json/.npz) or a CameraPath (see ``camera_paths.novel_camera_path``)."""
    if isinstance(camera, CameraPath):
        cam = camera
    else:
        cam = novel_camera_path(
            camera, n_frames, k, depth0, width, height, source=source, fps=fps, depth_scale=depth_scale
        )
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
    source_camera: str | os.PathLike | CameraPath | None = None,
    depth_scale: float | np.ndarray = 1.0,
    fps: float = 30.0,
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
        source_camera: the source camera path (file or CameraPath, world-to-camera in the novel camera's
            world; its intrinsics replace ``k``); None: static source at the origin (the reference).
        depth_scale: depth units -> world units, a number or (T,) per frame (``depth_scale.py``).
        fps: frame rate (for ``stabilize``'s strength in seconds).
    """
    frames = np.asarray(frames)
    depth = np.asarray(depth, dtype=np.float32)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise Ex4dError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if depth.shape != (t, h, w):
        raise Ex4dError(f"depth {depth.shape} does not match the frames {(t, h, w)}", where="depth")
    k = reference_intrinsics(w, h) if k is None else np.asarray(k, dtype=np.float64)
    src = source_camera
    if src is not None and not isinstance(src, CameraPath):
        src = load_source_camera(src, t, w, h, default_k=k)
    if src is not None and len(src) < t:
        raise Ex4dError(f"the source camera has {len(src)} frames but {t} are needed", where="--source-camera")
    k_mesh = default_intrinsics(src, k, w, h)  # (3, 3) or (T, 3, 3)
    k = k_mesh if k_mesh.ndim == 2 else k_mesh[0]
    scale = np.broadcast_to(np.asarray(depth_scale, dtype=np.float64), (t,))
    cam = resolve_camera(camera, t, k, depth[0], w, h, source=src, fps=fps, depth_scale=float(scale[0]))
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
        sl = slice(start, stop)
        mesh = build_dwmesh(d, k_mesh if k_mesh.ndim == 2 else k_mesh[sl], c, mesh_filter=mesh_filter)
        ext = mesh_to_novel(cam.extrinsics[sl], None if src is None else src.extrinsics[sl], scale[sl])
        rgba = rasterize_rgba(mesh, ext, cam.intrinsics[sl], renderer=backend, use_dwmesh=use_dwmesh)
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
    frame0_is_source = guide_starts_at_source(cam, src, k)
    if frame0_is_source:  # reference: frame 0 is the source frame with a full mask (when the camera starts there)
        color[0] = frames[0]
        mask[0] = 255
    if progress:
        progress("render", n_chunks, n_chunks, "done")
    path = CameraPath(cam.extrinsics[:t], cam.intrinsics[:t], w, h, cam.name)
    return Guide(color, mask, path, mesh0, src, frame0_is_source)


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
