"""The one guide-rendering path: frames + depth + K + a camera -> colour and mask guide frames.

Used by ``ex4d recon`` (``recon.run_recon``), the service's ``render_guide``/``generate`` jobs, ``ex4d demo``
and ``ex4d run`` alike. Steps, per chunk of frames (:func:`chunk_frames`):

1. upload the chunk's depth and frames (CUDA: through pinned, double-buffered staging buffers; none when the
   clip is still on the device from the previous render of the same shot, ``pipeline.resident_clip``);
2. build its DW-meshes on the device (``dwmesh.build_dwmesh``, border ring at ``mesh.border_depth``; the
   source intrinsics per frame for a zooming source camera);
3. rasterise them from the novel camera (``render.rasterize_novel``: frame t's mesh placed by the moving
   source camera and the depth scale) and apply the reference's mask rule (``render.guide_tensors``);
4. read the chunk back (CUDA: asynchronously, overlapping the next chunk's work);
then :func:`apply_frame0_rule`. The DW-mesh is never written for the guide: re-meshing is cheaper than
reading it back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .. import transfer
from ..cameras import CameraPath
from ..dwmesh import DWMesh, build_dwmesh
from ..render import guide_tensors, rasterize_novel, resolve_renderer, rgba_to_guide
from . import resident_clip
from .settings import MeshSettings, RenderSettings

Progress = Callable[[str, int, int, str], None]
CHUNK_PIXELS = {"cuda": 16_000_000, "cpu": 6_000_000}  # pixels x frames per chunk (memory bound)
MIN_CHUNKS = 4  # at least this many chunks (when there are enough frames): progress and cancel stay fine


@dataclass
class Guide:
    color: np.ndarray  # (T, H, W, 3) uint8
    mask: np.ndarray  # (T, H, W) uint8 {0, 255}
    camera: CameraPath  # the T cameras used
    mesh0: DWMesh | None = None  # DW-mesh of frame 0 (for the PLY export), when asked for
    source: CameraPath | None = None  # the source camera path (None: static at the origin)
    frame0_is_source: bool = True  # guide frame 0 is the source frame (the novel camera starts at the source)


def chunk_frames(width: int, height: int, n_frames: int, backend: str) -> int:
    """Frames per chunk: bounded memory (``CHUNK_PIXELS``), and at least ``MIN_CHUNKS`` chunks."""
    by_memory = max(1, CHUNK_PIXELS.get(backend, CHUNK_PIXELS["cpu"]) // (width * height))
    return max(1, min(by_memory, -(-n_frames // MIN_CHUNKS)))


def apply_frame0_rule(
    color: np.ndarray,
    mask: np.ndarray,
    frames: np.ndarray,
    camera: CameraPath,
    source: CameraPath | None = None,
    k_src: np.ndarray | None = None,
) -> bool:
    """The guide's frame-0 rule, in place; True when frame 0 was replaced.

    The reference's rule (frame 0 is the source frame with a full mask) applied only when the novel camera
    starts at the source (``camera_paths.guide_starts_at_source``: frame-0 pose, and intrinsics against
    ``source``'s or ``k_src`` (3, 3)); otherwise frame 0 stays rendered like every other frame."""
    from ..camera_paths import guide_starts_at_source

    if not guide_starts_at_source(camera, source, k_src):
        return False
    color[0] = frames[0]
    mask[0] = 255
    return True


def _finish(pending: tuple, color: np.ndarray, mask: np.ndarray) -> None:
    """Wait for a chunk's asynchronous read-back and copy it out of the pinned buffers."""
    start, stop, col_h, mask_h, event = pending
    event.synchronize()
    torch.from_numpy(color[start:stop]).copy_(col_h)
    torch.from_numpy(mask[start:stop]).copy_(mask_h)


def render_guide(
    frames: np.ndarray,
    depth: np.ndarray,
    k: np.ndarray,
    camera: CameraPath,
    mesh: MeshSettings = MeshSettings(),
    render: RenderSettings = RenderSettings(),
    *,
    source: CameraPath | None = None,
    depth_scale: float | np.ndarray = 1.0,
    keep_mesh0: bool = False,
    progress: Progress | None = None,
    resident_key: str | None = None,
) -> Guide:
    """Colour and mask guide of ``camera`` (>= T frames, checked by the camera stage).

    Args:
        frames: (T, H, W, 3) uint8 source frames (may be memory-mapped).
        depth: (T, H, W) float32 depth (z, scene units) at the frames' size (may be memory-mapped).
        k: (3, 3) source intrinsics, pixels, or (T, 3, 3) per frame (a zooming source camera).
        source: the source camera path (>= T frames, world-to-camera in ``camera``'s world); None: static
            at the origin (the reference).
        depth_scale: depth units -> world units, a number or (T,) per frame (``depth_scale.py``).
        keep_mesh0: keep frame 0's DW-mesh in the result (PLY export).
        progress: ``progress("render", chunk, n_chunks, message)``; may raise ``errors.Cancelled``.
        resident_key: the identity of ``frames`` and ``depth`` (the stage keys): on CUDA the clip stays on the
            device after the render (``pipeline.resident_clip``) and the next render with this key uses it
            instead of reading and uploading the arrays again.
    """
    t, h, w = depth.shape
    backend = resolve_renderer(render.renderer)
    device = torch.device("cuda") if backend == "cuda" else torch.device("cpu")
    chunk = chunk_frames(w, h, t, backend)
    k = np.asarray(k, dtype=np.float64)
    k0 = k if k.ndim == 2 else k[0]
    color = np.empty((t, h, w, 3), np.uint8)
    mask = np.empty((t, h, w), np.uint8)
    mesh0 = None
    n_chunks = -(-t // chunk)
    pending: tuple | None = None  # CUDA: (start, stop, pinned colour, pinned mask, event) being read back
    kept = fill = None  # CUDA: the clip kept on the device (resident_clip), or the one being filled
    if backend == "cuda" and resident_key:
        kept = resident_clip.get(resident_key, (t, h, w))
        fill = None if kept is not None else resident_clip.allocate(resident_key, (t, h, w), device)
    for i, start in enumerate(range(0, t, chunk)):
        stop = min(t, start + chunk)
        if progress:
            progress("render", i, n_chunks, f"frames {start}-{stop - 1}")
        slot = i % 2  # CUDA: the staging buffers of this chunk (double-buffered)
        if kept is not None:  # the clip is on the device already
            d, c = kept.depth[start:stop], kept.frames[start:stop]
        elif backend == "cuda":  # pinned, asynchronous copies; chunk i's read-back overlaps chunk i+1's work
            d = transfer.upload(depth[start:stop], "depth", slot, device)
            c = transfer.upload(frames[start:stop], "frames", slot, device)
            if fill is not None:
                fill.depth[start:stop].copy_(d, non_blocking=True)
                fill.frames[start:stop].copy_(c, non_blocking=True)
        else:
            d = torch.from_numpy(np.array(depth[start:stop], dtype=np.float32))  # a copy: the store's are read-only
            c = torch.from_numpy(np.array(frames[start:stop]))
        sl = slice(start, stop)
        k_sl = k if k.ndim == 2 else k[sl]
        m = build_dwmesh(d, k_sl, c, mesh_filter=mesh.mesh_filter, border_depth=mesh.border_depth)
        rgba = rasterize_novel(
            m, camera, start, source=source, depth_scale=depth_scale, renderer=backend, use_dwmesh=render.use_dwmesh
        )
        if backend == "cuda":
            col_t, mask_t = guide_tensors(rgba)
            col_h, _ = transfer.download_async(col_t, "color", slot)
            mask_h, ev_m = transfer.download_async(mask_t, "mask", slot)
            if pending is not None:
                _finish(pending, color, mask)
            pending = (start, stop, col_h, mask_h, ev_m)
        else:
            color[sl], mask[sl] = rgba_to_guide(rgba)
        if keep_mesh0 and start == 0:
            mesh0 = DWMesh(m.vertices[:1].cpu(), m.faces.cpu(), m.invalid[:1].cpu(), m.colors[:1].cpu(), h, w)
        del m, rgba
    if pending is not None:
        _finish(pending, color, mask)
    if fill is not None:
        resident_clip.keep(fill)  # complete: every chunk was copied in (same stream, before the read-backs)
    cam = CameraPath(camera.extrinsics[:t], camera.intrinsics[:t], w, h, camera.name)
    frame0_is_source = apply_frame0_rule(color, mask, frames, cam, source, k0)
    if progress:
        progress("render", n_chunks, n_chunks, "done")
    return Guide(color, mask, cam, mesh0, source, frame0_is_source)
