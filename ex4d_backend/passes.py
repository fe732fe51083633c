"""Compositing passes of a novel view: colour, the guide mask and the depth (Z) rendered from the DW-mesh,
written as multi-channel EXR frames (issue 18).

Depth pass: each vertex's camera-space z in the NOVEL camera (world units: depth units times the depth
scale) is interpolated with perspective-correct barycentrics, which is exact on the planar triangles of
the mesh (z is an affine function of the 3D point). Z covers every pixel the DW-mesh covers, the masked
(unseen) pixels included: there it is the depth of the occlusion sheet; pixels no face covers get
``Z_EMPTY`` (Blender's own "nothing here" depth). Frame 0, when the novel camera starts at the source
(``camera_paths.starts_at_source``), is the source frame with a full mask and the source depth as Z, as in
the guide. The colour is the guide's (alpha-thresholded, colour * mask).

EXR frames (``frame_00000.exr`` ...): channels R, G, B (linear, converted from the guide's sRGB; half
float), A (the guide mask 0/1: alpha; also usable as a matte) and Z (float32, camera-space distance along
the optical axis, as Blender's Z pass), ZIP compression, written atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path
from .cameras import CameraPath
from .constants import MESH_FILTER, RENDERER
from .dwmesh import DWMesh
from .errors import Ex4dError
from .render import MASK_THRESHOLD, clip_positions, novel_extrinsics, resolve_renderer

Z_EMPTY = 1e10  # depth of pixels no face covers (Blender writes 1e10 for the background in its Z pass)


@dataclass
class Passes:
    color: np.ndarray  # (T, H, W, 3) uint8 sRGB, the guide's colour
    mask: np.ndarray  # (T, H, W) uint8 {0, 255}, the guide's mask
    z: np.ndarray  # (T, H, W) float32, novel camera-space depth (world units), Z_EMPTY where empty


def render_passes(
    mesh: DWMesh,
    camera: CameraPath,
    source_frames: np.ndarray,
    source_depth: np.ndarray,
    *,
    source: CameraPath | None = None,
    depth_scale: float | np.ndarray = 1.0,
    source_k: np.ndarray | None = None,
    renderer: str = RENDERER,
    first_frame: int = 0,
) -> Passes:
    """Colour, mask and Z of ``mesh`` (frames ``first_frame`` ...) seen by ``camera`` (see the module
    docstring). ``source_depth`` (T, H, W) depth units, for frame 0's Z when it is the source frame."""
    backend = resolve_renderer(renderer)
    n, h, w = len(mesh), mesh.height, mesh.width
    sl = slice(first_frame, first_frame + n)
    ext = novel_extrinsics(n, camera, first_frame, source, depth_scale)
    verts = mesh.vertices
    e = torch.as_tensor(ext, dtype=torch.float32, device=verts.device)
    z_vert = (verts @ e[:, 2, :3].unsqueeze(-1)).squeeze(-1) + e[:, 2, 3:4]  # (T, V)
    attr = torch.cat([mesh.colors.to(torch.float32), z_vert.unsqueeze(-1)], -1)  # (T, V, 5)
    clip = clip_positions(verts, ext, camera.intrinsics[sl], w, h)
    if backend == "cuda":
        from . import raster_cuda

        faces = mesh.faces.to(device=clip.device, dtype=torch.int32).contiguous()
        rgba, _ = raster_cuda.rasterize_interpolate(clip, faces, attr[..., :4], (h, w))  # antialiased, as the guide
        zz, rast = raster_cuda.rasterize_interpolate(clip, faces, attr[..., 4:], (h, w), antialias=False)
        covered = (rast[..., 3] > 0).cpu().numpy()
        out = torch.cat([rgba, zz], -1).cpu().numpy()
    else:
        from . import raster_cpu

        f_np = mesh.faces.cpu().numpy()
        tri, bary = raster_cpu.rasterize(clip.cpu().numpy(), f_np, (h, w))
        out = raster_cpu.interpolate(attr.cpu().numpy(), f_np, tri, bary)
        covered = tri >= 0
    seen = out[..., 3] > MASK_THRESHOLD
    color = np.where(seen[..., None], np.clip(np.round(out[..., :3]), 0, 255), 0).astype(np.uint8)
    mask = seen.astype(np.uint8) * 255
    z = np.where(covered, out[..., 4], Z_EMPTY).astype(np.float32)
    if first_frame == 0:
        from .pipeline.guide import apply_frame0_rule

        if apply_frame0_rule(color, mask, source_frames, camera, source, source_k):  # the guide's one rule
            z[0] = np.asarray(source_depth[0], dtype=np.float64) * np.asarray(depth_scale).reshape(-1)[0]
    return Passes(color, mask, z)


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear light (the IEC 61966-2-1 curve)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def write_exr(
    path: str | os.PathLike, color: np.ndarray, mask: np.ndarray, z: np.ndarray, *, linear: bool = True
) -> Path:
    """One EXR frame: R, G, B (half; ``color`` (H, W, 3) uint8 sRGB, converted to linear unless ``linear``
    is False), A (half, ``mask`` (H, W) uint8 {0, 255} -> 0/1) and Z (float32, ``z`` (H, W))."""
    import OpenEXR

    color, mask, z = np.asarray(color), np.asarray(mask), np.asarray(z)
    h, w = mask.shape
    if color.shape != (h, w, 3) or z.shape != (h, w):
        raise Ex4dError(f"EXR planes disagree: colour {color.shape}, mask {mask.shape}, z {z.shape}")
    rgb = color.astype(np.float64) / 255.0
    rgb = srgb_to_linear(rgb) if linear else rgb
    channels = {
        "R": np.ascontiguousarray(rgb[..., 0], dtype=np.float16),
        "G": np.ascontiguousarray(rgb[..., 1], dtype=np.float16),
        "B": np.ascontiguousarray(rgb[..., 2], dtype=np.float16),
        "A": np.ascontiguousarray(mask > 127, dtype=np.float16),
        "Z": np.ascontiguousarray(z, dtype=np.float32),
    }
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    final = Path(path)
    with atomic_path(final) as tmp:
        with OpenEXR.File(header, channels) as f:
            f.write(str(tmp))
    return final


def write_exr_sequence(folder: str | os.PathLike, passes: Passes, *, prefix: str = "frame_") -> Path:
    """``<prefix>00000.exr`` ... in ``folder`` (the folder replaced atomically when complete)."""
    final = Path(folder)
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        for i in range(len(passes.mask)):
            write_exr(tmp / f"{prefix}{i:05d}.exr", passes.color[i], passes.mask[i], passes.z[i])
    return final


def read_exr_channels(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All channels of an EXR's first part by name (for tests and tools)."""
    import OpenEXR

    with OpenEXR.File(str(path), separate_channels=True) as f:
        return {name: np.array(ch.pixels) for name, ch in f.channels().items()}


def recon_passes(
    frames: np.ndarray,
    depth: np.ndarray,
    camera: CameraPath,
    k: np.ndarray,
    *,
    source: CameraPath | None = None,
    depth_scale: float | np.ndarray = 1.0,
    renderer: str = RENDERER,
    mesh_filter: str = MESH_FILTER,
    border_depth: float | None = None,
    chunk: int = 8,
) -> Passes:
    """:func:`render_passes` over a whole shot, building the DW-meshes ``chunk`` frames at a time (as
    ``recon.run_recon``). ``k``: the source intrinsics (3, 3) or (T, 3, 3); ``border_depth``: the border
    ring's depth (None: ``dwmesh.BORDER_DEPTH``), as the guide's ``MeshSettings``."""
    from .dwmesh import BORDER_DEPTH, build_dwmesh

    backend = resolve_renderer(renderer)
    device = torch.device("cuda") if backend == "cuda" else torch.device("cpu")
    t = len(frames)
    k = np.asarray(k, dtype=np.float64)
    k0 = k if k.ndim == 2 else k[0]
    parts = []
    for start in range(0, t, chunk):
        sl = slice(start, min(t, start + chunk))
        mesh = build_dwmesh(
            torch.from_numpy(np.array(depth[sl], dtype=np.float32)).to(device),
            k if k.ndim == 2 else k[sl],
            torch.from_numpy(np.array(frames[sl])).to(device),
            mesh_filter=mesh_filter,
            border_depth=BORDER_DEPTH if border_depth is None else border_depth,
        )
        parts.append(
            render_passes(
                mesh,
                camera,
                frames,
                depth,
                source=source,
                depth_scale=depth_scale,
                source_k=k0,
                renderer=backend,
                first_frame=start,
            )  # fmt: skip
        )
    return Passes(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("color", "mask", "z")))
