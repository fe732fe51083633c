"""Guide rendering: DW-meshes seen from the novel camera -> colour + occlusion-mask frames.

As the reference: rasterise each frame's DW-mesh (OpenGL projection from K, near 1e-3, far 1e3, rows
top-down), interpolate RGBA, antialias (cuda backend), mask = 255 where alpha > 125 else 0,
colour = colour * mask / 255 and frame 0 by ``pipeline.guide.apply_frame0_rule``
(the chunked pipeline everybody uses is ``pipeline.guide.render_guide``). Frame t's mesh is placed by
``camera_paths.mesh_to_novel`` (a moving source camera, the depth scale; :func:`rasterize_novel`).
Two backends behind one function: ``cuda`` (nvdiffrast) and ``cpu`` (numba, no antialiasing).
"""

from __future__ import annotations

import numpy as np
import torch

from . import raster_cuda
from .cameras import CameraPath, projection_matrix
from .constants import FAR, NEAR, RENDERER, USE_DWMESH
from .dwmesh import DWMesh
from .errors import DEVICE, Ex4dError

MASK_THRESHOLD = 125  # alpha (0..255) above which a rendered pixel counts as seen


def guide_masked_share(mask: np.ndarray) -> np.ndarray:
    """(T,) the masked (unseen) share of a full guide's mask frames (T, H, W) uint8 {0, 255}."""
    flat = np.asarray(mask).reshape(len(mask), -1)
    return (flat.shape[1] - np.count_nonzero(flat, axis=1)) / flat.shape[1]  # = mean(mask == 0), no bool copy


RENDERERS = ("auto", "cuda", "cpu")


def resolve_renderer(name: str = RENDERER) -> str:
    """ "auto" -> "cuda" when an NVIDIA GPU and nvdiffrast are available, else "cpu"."""
    if name not in RENDERERS:
        raise Ex4dError(f"unknown renderer '{name}'", where="--renderer", hint="use auto, cuda or cpu")
    if name == "auto":
        return "cuda" if raster_cuda.available() else "cpu"
    if name == "cuda" and not raster_cuda.available():
        raise Ex4dError(
            "the cuda renderer needs an NVIDIA GPU with nvdiffrast installed",
            where="--renderer cuda",
            hint="use --renderer cpu (or auto)",
            code=DEVICE,
        )
    return name


def clip_positions(
    vertices: torch.Tensor, extrinsics: np.ndarray, intrinsics: np.ndarray, width: int, height: int
) -> torch.Tensor:
    """(T, V, 4) float32 clip-space positions of (T, V, 3) world vertices for per-frame cameras."""
    mvp = projection_matrix(intrinsics, width, height, NEAR, FAR) @ extrinsics  # (T, 4, 4) float64
    mvp = torch.as_tensor(mvp, dtype=torch.float32, device=vertices.device)
    rot, trans = mvp[:, :, :3], mvp[:, :, 3]
    return torch.baddbmm(trans.unsqueeze(1), vertices, rot.transpose(1, 2))


def rasterize_rgba(
    mesh: DWMesh,
    extrinsics: np.ndarray,
    intrinsics: np.ndarray,
    *,
    renderer: str = "cpu",
    use_dwmesh: bool = USE_DWMESH,
) -> torch.Tensor:
    """(T, H, W, 4) float32 RGBA (0..255) of each frame's DW-mesh seen by that frame's camera."""
    h, w = mesh.height, mesh.width
    clip = clip_positions(mesh.vertices, extrinsics, intrinsics, w, h)
    attr = mesh.colors.to(torch.float32)
    if renderer == "cuda":
        faces = mesh.faces.to(device=clip.device, dtype=torch.int32).contiguous()
        if use_dwmesh:
            out, _ = raster_cuda.rasterize_interpolate(clip, faces, attr, (h, w))
            return out
        frames = []
        for t in range(len(mesh)):  # the non-watertight baseline: each frame has its own face list
            keep = faces[~mesh.invalid[t].to(clip.device)].contiguous()
            out, _ = raster_cuda.rasterize_interpolate(clip[t : t + 1], keep, attr[t : t + 1], (h, w))
            frames.append(out)
        return torch.cat(frames)
    from . import raster_cpu

    valid = None if use_dwmesh else (~mesh.invalid).cpu().numpy()
    tri, bary = raster_cpu.rasterize(clip.cpu().numpy(), mesh.faces.cpu().numpy(), (h, w), valid)
    return torch.from_numpy(raster_cpu.interpolate(attr.cpu().numpy(), mesh.faces.cpu().numpy(), tri, bary))


def guide_tensors(rgba: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference post-processing on the renderer's device: mask = 255 where alpha > 125; colour = colour * mask
    (uint8 tensors (T, H, W, 3) and (T, H, W))."""
    seen = rgba[..., 3] > MASK_THRESHOLD
    color = torch.where(seen.unsqueeze(-1), rgba[..., :3], torch.zeros((), device=rgba.device))
    color = color.clamp_(0, 255).round_().to(torch.uint8)
    mask = seen.to(torch.uint8) * 255
    return color, mask


def rgba_to_guide(rgba: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """:func:`guide_tensors` read back as numpy uint8 arrays."""
    color, mask = guide_tensors(rgba)
    return color.cpu().numpy(), mask.cpu().numpy()


def novel_extrinsics(
    n_frames: int,
    camera: CameraPath,
    first_frame: int = 0,
    source: CameraPath | None = None,
    depth_scale: float | np.ndarray = 1.0,
) -> np.ndarray:
    """(n, 4, 4) ``camera_paths.mesh_to_novel`` for frames ``first_frame`` .. ``first_frame + n - 1``: frame t's
    mesh (source camera t's frame, depth units) -> novel camera t's frame. ``source``: the source camera
    path in the novel camera's world (None: static at the origin); ``depth_scale`` a number or per frame
    (all frames) depth units -> world units."""
    from .camera_paths import mesh_to_novel

    sl = slice(first_frame, first_frame + n_frames)
    if len(camera) < first_frame + n_frames:
        raise Ex4dError(f"the camera path has {len(camera)} frames, {first_frame + n_frames} needed", where="camera")
    scale = np.asarray(depth_scale, dtype=np.float64)
    scale = np.broadcast_to(scale, (n_frames,)) if scale.ndim == 0 else scale[sl]
    return mesh_to_novel(camera.extrinsics[sl], None if source is None else source.extrinsics[sl], scale)


def rasterize_novel(
    mesh: DWMesh,
    camera: CameraPath,
    first_frame: int = 0,
    *,
    source: CameraPath | None = None,
    depth_scale: float | np.ndarray = 1.0,
    renderer: str = "cpu",
    use_dwmesh: bool = USE_DWMESH,
) -> torch.Tensor:
    """(T, H, W, 4) RGBA of ``mesh`` frame i (built in source camera ``first_frame + i``'s frame, depth
    units) seen by ``camera`` frame ``first_frame + i``, placed by :func:`novel_extrinsics`."""
    ext = novel_extrinsics(len(mesh), camera, first_frame, source, depth_scale)
    sl = slice(first_frame, first_frame + len(mesh))
    return rasterize_rgba(mesh, ext, camera.intrinsics[sl], renderer=renderer, use_dwmesh=use_dwmesh)


def render_guide(
    mesh: DWMesh,
    camera: CameraPath,
    source_frames: np.ndarray,
    *,
    renderer: str = RENDERER,
    use_dwmesh: bool = USE_DWMESH,
    first_frame: int = 0,
    source: CameraPath | None = None,
    depth_scale: float | np.ndarray = 1.0,
    source_k: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Colour (T, H, W, 3) uint8 and mask (T, H, W) uint8 {0, 255} guide frames of one built mesh
    (:func:`rasterize_novel`; a whole shot goes through ``pipeline.guide.render_guide``).

    The guide's frame 0 follows ``pipeline.guide.apply_frame0_rule`` (only when ``first_frame`` is 0;
    intrinsics compared with ``source_k`` when given). ``use_dwmesh=False`` removes occlusion faces instead
    of keeping them (the non-watertight baseline)."""
    backend = resolve_renderer(renderer)
    rgba = rasterize_novel(
        mesh, camera, first_frame, source=source, depth_scale=depth_scale, renderer=backend, use_dwmesh=use_dwmesh
    )
    color, mask = rgba_to_guide(rgba)
    if first_frame == 0:
        from .pipeline.guide import apply_frame0_rule

        apply_frame0_rule(color, mask, source_frames, camera, source, source_k)
    return color, mask
