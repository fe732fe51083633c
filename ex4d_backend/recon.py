"""Reconstruction: footage frames + depth + a camera -> the guide (colour, mask) EX-4D generates from.

``run_recon`` is the in-memory entry to the one guide path (``pipeline.guide``: chunked, pinned and
double-buffered on CUDA; a moving source camera and the depth scale through ``pipeline.source``); ``write_recon_outputs`` writes the reference's files atomically. ``ex4d recon``
goes through the job store's stages (``pipeline.stages``), which call the same path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .cameras import CameraPath, reference_intrinsics, save_camera_npz
from .constants import BORDER_DEPTH, MESH_FILTER
from .dwmesh import write_ply
from .errors import Ex4dError
from .pipeline import camera as pipeline_camera
from .pipeline.guide import CHUNK_PIXELS, Guide, render_guide  # noqa: F401 (CHUNK_PIXELS: re-exported)
from .pipeline.settings import MeshSettings, RenderSettings
from .pipeline.source import source_setup

Progress = Callable[[str, int, int, str], None]


def run_recon(
    frames: np.ndarray,
    depth: np.ndarray,
    camera: str | os.PathLike | CameraPath,
    *,
    k: np.ndarray | None = None,
    renderer: str = "auto",
    mesh_filter: str = MESH_FILTER,
    use_dwmesh: bool = True,
    border_depth: float = BORDER_DEPTH,
    keep_mesh0: bool = False,
    progress: Progress | None = None,
    source_camera: str | os.PathLike | CameraPath | None = None,
    depth_scale: float | np.ndarray = 1.0,
    fps: float = 30.0,
) -> Guide:
    """Render the guide for a novel camera, in memory (no store): ``pipeline.guide.render_guide``.

    Args:
        frames: (T, H, W, 3) uint8 source frames.
        depth: (T, H, W) float32 depth (z, scene units) at the frames' size.
        camera: preset name ("90", "zoom_in", ...; relative to the source camera), lock_off[:F],
            stabilize[:S], camera file path, or a CameraPath (>= T frames).
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
    src_spec = {"file": str(source_camera)} if isinstance(source_camera, (str, os.PathLike)) else source_camera
    src = source_setup(src_spec, depth_scale, depth, k, where=("--source-camera", "depth_scale"))
    mesh = MeshSettings(mesh_filter=mesh_filter, border_depth=border_depth)
    spec = pipeline_camera.spec_from_arg(camera)
    cam = pipeline_camera.resolve_camera(
        spec, t, src.k, depth[0], w, h, mesh, where="--cam", source=src.path, fps=fps, depth_scale=float(src.scales[0])
    )
    render = RenderSettings(renderer=renderer, use_dwmesh=use_dwmesh)
    return render_guide(
        frames, depth, src.k, cam, mesh, render, source=src.path, depth_scale=src.scales,
        keep_mesh0=keep_mesh0, progress=progress,
    )  # fmt: skip


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


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    return dst


def copy_atomic(src: Path, dst: Path) -> Path:
    """Copy a file or folder from the store to ``dst`` (a temporary name, renamed when complete)."""
    from .atomic import atomic_path

    with atomic_path(dst) as tmp:
        _copy(src, tmp)
    return dst


def export_guide(
    guide_dir: str | os.PathLike,
    videos_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    cam_name: str,
    *,
    png: bool = False,
    mesh_of: tuple | None = None,
) -> dict[str, Path]:
    """Copy a stored guide (``pipeline.stages.guide_stage``) and its videos (``guide_videos_stage``) out as
    ``ex4d recon``'s files: ``color_<cam>.mp4``, ``mask_<cam>.mp4``, ``camera_<cam>.npz`` (+ PNG folders
    ``color_<cam>/``, ``mask_<cam>/`` with ``png``;
    + ``DW-Mesh.ply`` of frame 0 with ``mesh_of = (clip, depth, k, MeshSettings)``), all or none (renamed
    together when every one is complete); the files are byte for byte the store's."""
    from .atomic import atomic_group

    src, videos, out = Path(guide_dir), Path(videos_dir), Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_group() as g:
        paths = {
            "color_video": _copy(videos / "color.mp4", g.path(out / f"color_{cam_name}.mp4")),
            "mask_video": _copy(videos / "mask.mp4", g.path(out / f"mask_{cam_name}.mp4")),
            "camera": _copy(src / "camera.npz", g.path(out / f"camera_{cam_name}.npz")),
        }
        if png:
            paths["color_frames"] = _copy(src / "color", g.path(out / f"color_{cam_name}"))
            paths["mask_frames"] = _copy(src / "mask", g.path(out / f"mask_{cam_name}"))
        if mesh_of is not None:
            from .dwmesh import build_dwmesh

            clip, depth, k, mesh = mesh_of
            mesh0 = build_dwmesh(
                np.array(depth.depth[:1]),
                k if np.ndim(k) == 2 else k[:1],  # per-frame K (a zooming source camera): frame 0's
                np.array(clip.frames[:1]),
                mesh_filter=mesh.mesh_filter,
                border_depth=mesh.border_depth,
            )
            paths["mesh"] = write_ply(g.path(out / "DW-Mesh.ply"), mesh0, 0)
    return {key: g.final(p) for key, p in paths.items()}
