"""Thin data layer: numpy arrays in and out of Blender data (no operators, no UI, no backend).

Conventions:
- DW-mesh vertices are the backend's coordinates as they come (the object gets the backend's
  ``cv_to_blender`` as its ``matrix_world``; the add-on holds no camera convention of its own).
- Vertex ``i = row * W + col`` of the pixel grid; its UV is the centre of that footage pixel:
  ``u = (col + 0.5) / W``, ``v = 1 - (row + 0.5) / H`` (Blender's UV origin is bottom-left).
- Cameras are Blender ``matrix_world`` (camera looks down its local -Z, +Y up) and ``lens`` in mm.
- Scene frame ``frame_start + i`` shows clip frame ``i``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import bpy
import numpy as np
from mathutils import Matrix

from . import compat

OCCLUSION_ATTRIBUTE = "ex4d_occluded"  # BOOLEAN face attribute: True = occlusion ("invalid") face
MASK_ATTRIBUTE = "ex4d_mask"  # FLOAT_COLOR point attribute: 1 = seen, 0 = vertex of an occlusion face
MASK_THRESHOLD = 125.0 / 255.0  # the guide's mask: interpolated vertex alpha > 125 (of 255)
OCCLUDED_COLOR = (1.0, 0.0, 1.0, 1.0)  # magenta: the occlusion faces in the viewport and renders
PC2_MAGIC = b"POINTCACHE2\0"


# -- point caches (PC2) -----------------------------------------------------------------------------
def write_pc2(path: str | os.PathLike, positions: np.ndarray, start: float = 0.0, rate: float = 1.0) -> Path:
    """Write (T, N, 3) float positions as a PC2 point cache (little-endian float32)."""
    positions = np.ascontiguousarray(positions, dtype="<f4")
    t, n, _ = positions.shape
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        fh.write(PC2_MAGIC + struct.pack("<iiffi", 1, n, float(start), float(rate), t))
        fh.write(positions.tobytes())
    os.replace(tmp, path)
    return path


def read_pc2(path: str | os.PathLike) -> np.ndarray:
    """Read a PC2 point cache as a (T, N, 3) float32 array (memory-mapped)."""
    with open(path, "rb") as fh:
        head = fh.read(32)
    if head[:12] != PC2_MAGIC:
        raise ValueError(f"{path}: not a PC2 point cache")
    _version, n, _start, _rate, t = struct.unpack("<iiffi", head[12:32])
    return np.memmap(path, dtype="<f4", mode="r", offset=32, shape=(t, n, 3))


# -- mesh -----------------------------------------------------------------------------------------
def grid_uvs(width: int, height: int) -> np.ndarray:
    """(H*W, 2) float32 UVs of the pixel-grid vertices (row-major), at pixel centres."""
    cols, rows = np.meshgrid(np.arange(width), np.arange(height))
    u = (cols.ravel() + 0.5) / width
    v = 1.0 - (rows.ravel() + 0.5) / height
    return np.stack([u, v], axis=1).astype(np.float32)


def run_to_end(gen: Generator[Any, Any, Any]) -> Any:
    """Run a slice generator (the job runner's ``prepare`` / ``finish`` steps) at once; its return value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def mesh_from_arrays(
    name: str, vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray | None = None
) -> bpy.types.Mesh:
    """A triangle mesh from (N, 3) vertices and (F, 3) vertex indices, optionally per-vertex UVs (N, 2)."""
    return run_to_end(mesh_from_arrays_sliced(name, vertices, faces, uvs))


TOPOLOGY_SCRIPT = """
import sys, numpy as np
faces = np.ascontiguousarray(np.load(sys.argv[1]), dtype=np.int32).reshape(-1, 3)
w, h, out = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pairs = np.stack([faces, np.roll(faces, -1, axis=1)], -1).reshape(-1, 2).astype(np.int64)
key = np.minimum(pairs[:, 0], pairs[:, 1]) * (1 << 32) + np.maximum(pairs[:, 0], pairs[:, 1])
uniq, corner_edge = np.unique(key, return_inverse=True)
edges = np.stack([uniq >> 32, uniq & 0xFFFFFFFF], 1).astype(np.int32)
cols, rows = np.meshgrid(np.arange(w), np.arange(h))
uv = np.stack([(cols.ravel() + 0.5) / w, 1.0 - (rows.ravel() + 0.5) / h], 1).astype(np.float32)
np.save(out + ".edges.npy", edges)
np.save(out + ".corner_edge.npy", corner_edge.astype(np.int32))
np.save(out + ".corner_uv.npy", np.ascontiguousarray(uv[faces.ravel()]))
np.save(out + ".faces.npy", faces)
"""
TOPOLOGY_PARTS = ("faces", "edges", "corner_edge", "corner_uv")


def topology_arrays(
    faces_npy: str, width: int, height: int, cache_dir: Path, python: str
) -> Generator[None, None, dict]:
    """The pixel-grid mesh's topology arrays (faces, unique edges, each corner's edge, corner UVs at pixel
    centres), computed once per topology in a separate ``python`` process (numpy there: the main thread
    only polls it) and cached in ``cache_dir`` (keyed by the faces file's content). Memory-mapped."""
    import hashlib
    import subprocess

    digest = hashlib.sha1()
    with open(faces_npy, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    stem = cache_dir / f"topology_{width}x{height}_{digest.hexdigest()[:16]}"
    files = {k: Path(f"{stem}.{k}.npy") for k in TOPOLOGY_PARTS}
    if not all(f.is_file() for f in files.values()):
        tmp = Path(f"{stem}.{os.getpid()}.part")
        proc = subprocess.Popen(
            [python, "-c", TOPOLOGY_SCRIPT, str(faces_npy), str(width), str(height), str(tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        while proc.poll() is None:
            yield
        if proc.returncode != 0:
            err = proc.stderr.read().decode("utf-8", "replace").strip().splitlines()[-1:] if proc.stderr else []
            raise RuntimeError(f"computing the mesh topology failed: {' '.join(err)}")
        for k, f in files.items():
            os.replace(f"{tmp}.{k}.npy", f)
    return {k: np.load(f, mmap_mode="r") for k, f in files.items()}


def mesh_arrays(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray | None) -> dict:
    """The arrays a triangle mesh is made of (numpy only, no bpy): positions, corner vertices, unique
    edges and each corner's edge, corner UVs."""
    faces = np.ascontiguousarray(faces, dtype=np.int32).reshape(-1, 3)
    pairs = np.stack([faces, np.roll(faces, -1, axis=1)], -1).reshape(-1, 2).astype(np.int64)
    key = np.minimum(pairs[:, 0], pairs[:, 1]) * (1 << 32) + np.maximum(pairs[:, 0], pairs[:, 1])
    uniq, corner_edge = np.unique(key, return_inverse=True)
    out = {"faces": faces, "edges": np.stack([uniq >> 32, uniq & 0xFFFFFFFF], 1).astype(np.int32),
           "corner_edge": corner_edge.astype(np.int32)}  # fmt: skip
    if uvs is not None:
        out["corner_uv"] = np.ascontiguousarray(np.asarray(uvs, dtype=np.float32)[faces.ravel()])
    return out


def mesh_from_arrays_sliced(
    name: str, vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray | None = None, topology: dict | None = None
) -> Generator[None, None, bpy.types.Mesh]:
    """:func:`mesh_from_arrays` in slices for the job runner, written through the attribute API
    (``position``, ``.edge_verts``, ``.corner_vert``, ``.corner_edge``, the UV map: a memory copy each, where
    the classic ``vertices.foreach_set("co")`` and ``mesh.update(calc_edges=True)`` take seconds at
    1024 x 576). ``topology``: precomputed arrays (:func:`topology_arrays`), else computed here."""
    arr = dict(topology) if topology is not None else mesh_arrays(vertices, faces, uvs)
    verts = np.ascontiguousarray(vertices, dtype=np.float32).reshape(-1, 3)
    n_faces = len(arr["faces"])
    mesh = bpy.data.meshes.new(name)
    mesh.vertices.add(len(verts))
    mesh.edges.add(len(arr["edges"]))
    attrs: Any = mesh.attributes  # the generic Attribute has .data in every version; the stubs narrow it
    fast = all(n in attrs for n in ("position", ".edge_verts"))
    if fast:
        attrs["position"].data.foreach_set("vector", verts.ravel())
        attrs[".edge_verts"].data.foreach_set("value", np.ascontiguousarray(arr["edges"]).ravel())
    else:
        mesh.vertices.foreach_set("co", verts.ravel())
        mesh.edges.foreach_set("vertices", np.ascontiguousarray(arr["edges"]).ravel())
    yield
    mesh.loops.add(n_faces * 3)
    corner_vert = np.ascontiguousarray(arr["faces"], dtype=np.int32).ravel()
    corner_edge = np.ascontiguousarray(arr["corner_edge"], dtype=np.int32)
    if fast and ".corner_vert" in attrs and ".corner_edge" in attrs:
        attrs[".corner_vert"].data.foreach_set("value", corner_vert)
        attrs[".corner_edge"].data.foreach_set("value", corner_edge)
    else:
        mesh.loops.foreach_set("vertex_index", corner_vert)
        mesh.loops.foreach_set("edge_index", corner_edge)
    yield
    mesh.polygons.add(n_faces)
    mesh.polygons.foreach_set("loop_start", np.arange(0, n_faces * 3, 3, dtype=np.int32))
    try:  # read-only (derived from loop_start) in newer Blenders
        mesh.polygons.foreach_set("loop_total", np.full(n_faces, 3, dtype=np.int32))
    except (AttributeError, TypeError, RuntimeError):
        pass
    yield
    if "corner_uv" in arr:
        layer = mesh.uv_layers.new(name="UVMap")
        uv = np.ascontiguousarray(arr["corner_uv"], dtype=np.float32).ravel()
        uv_attr = attrs.get(layer.name)
        if uv_attr is not None and uv_attr.data_type == "FLOAT2":
            uv_attr.data.foreach_set("vector", uv)
        else:
            layer.data.foreach_set("uv", uv)
        yield
    mesh.update()  # the edges are given: nothing is recomputed
    return mesh


def set_face_bool(mesh: bpy.types.Mesh, name: str, values: np.ndarray) -> None:
    """Create or overwrite a BOOLEAN face attribute from an (F,) array."""
    attr: Any = mesh.attributes.get(name)
    if attr is None or attr.domain != "FACE" or attr.data_type != "BOOLEAN":
        if attr is not None:
            mesh.attributes.remove(attr)
        attr = mesh.attributes.new(name, "BOOLEAN", "FACE")
    attr.data.foreach_set("value", np.ascontiguousarray(values, dtype=bool).ravel())
    mesh.update_tag()


def set_point_gray(mesh: bpy.types.Mesh, name: str, values: np.ndarray) -> None:
    """Create or overwrite a FLOAT_COLOR point attribute (v, v, v, 1) from an (N,) array; make it the
    active colour attribute (Workbench's "Attribute" colour shows it)."""
    attr: Any = mesh.attributes.get(name)
    if attr is None or attr.domain != "POINT" or attr.data_type != "FLOAT_COLOR":
        if attr is not None:
            mesh.attributes.remove(attr)
        attr = mesh.color_attributes.new(name, "FLOAT_COLOR", "POINT")
    rgba = np.repeat(np.asarray(values, dtype=np.float32), 4)
    rgba[3::4] = 1.0
    attr.data.foreach_set("color", rgba)
    if mesh.color_attributes.active_color_name != name:
        mesh.color_attributes.active_color = mesh.color_attributes[name]


def get_face_bool(mesh: bpy.types.Mesh, name: str) -> np.ndarray:
    """A BOOLEAN face attribute as an (F,) bool array."""
    attr: Any = mesh.attributes[name]
    out = np.zeros(len(attr.data), dtype=bool)
    attr.data.foreach_get("value", out)
    return out


def evaluated_positions(obj: bpy.types.Object, depsgraph: bpy.types.Depsgraph) -> np.ndarray:
    """(N, 3) evaluated vertex positions in the object's local frame (OpenCV for the DW-mesh)."""
    ob_eval = obj.evaluated_get(depsgraph)
    mesh = ob_eval.to_mesh()
    try:
        out = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
        mesh.vertices.foreach_get("co", out)
    finally:
        ob_eval.to_mesh_clear()
    return out.reshape(-1, 3)


def add_mesh_cache(obj: bpy.types.Object, pc2_path: str, frame_start: int) -> bpy.types.Modifier:
    """A Mesh Cache modifier playing a PC2 cache so that cache sample 0 shows at ``frame_start``."""
    mod: Any = obj.modifiers.new("EX4D Mesh Cache", "MESH_CACHE")
    mod.cache_format = "PC2"
    mod.filepath = str(pc2_path)
    mod.play_mode = "SCENE"
    mod.time_mode = "FRAME"
    mod.frame_start = float(frame_start)
    mod.frame_scale = 1.0
    mod.interpolation = "NONE"
    mod.forward_axis = "POS_Y"  # identity: the cache holds the object's local (OpenCV) coordinates
    mod.up_axis = "POS_Z"
    return mod


def footage_material(name: str, image: bpy.types.Image | None, frame_start: int, n_frames: int) -> bpy.types.Material:
    """Unlit material: the footage frame (UVs on the pixel grid), magenta on occlusion faces."""
    mat = bpy.data.materials.new(name)
    if bpy.app.version < (5, 0, 0):  # always node-based (and deprecated) in 5.0
        mat.use_nodes = True
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    nodes.clear()
    out = nodes.new("ShaderNodeOutputMaterial")
    emit = nodes.new("ShaderNodeEmission")
    mix = nodes.new("ShaderNodeMix")
    mix.data_type = "RGBA"
    attr = nodes.new("ShaderNodeAttribute")  # the guide's mask: magenta where it will be black
    attr.attribute_type = "GEOMETRY"
    attr.attribute_name = MASK_ATTRIBUTE
    less = nodes.new("ShaderNodeMath")
    less.operation = "LESS_THAN"
    less.inputs[1].default_value = MASK_THRESHOLD
    mix.inputs["B"].default_value = OCCLUDED_COLOR
    links.new(attr.outputs["Fac"], less.inputs[0])
    links.new(less.outputs["Value"], mix.inputs["Factor"])
    if image is not None:
        tex = nodes.new("ShaderNodeTexImage")
        tex.image = image
        tex.interpolation = "Linear"  # bilinear between pixel centres ~ the backend's barycentric vertex colours
        tex.extension = "EXTEND"
        configure_image_user(tex.image_user, image, frame_start, n_frames)
        links.new(tex.outputs["Color"], mix.inputs["A"])
        nodes.active = tex  # Workbench's "Texture" colour shows the active image node
    links.new(mix.outputs["Result"], emit.inputs["Color"])
    links.new(emit.outputs["Emission"], out.inputs["Surface"])
    mat.diffuse_color = (0.8, 0.8, 0.8, 1.0)
    return mat


def configure_image_user(user, image: bpy.types.Image, frame_start: int, n_frames: int) -> None:
    """Make an ImageUser play a movie / image sequence so that clip frame 0 shows at ``frame_start``."""
    if image.source not in {"MOVIE", "SEQUENCE"}:
        return
    user.frame_duration = int(n_frames)
    user.frame_start = int(frame_start)
    user.frame_offset = sequence_first_number(image) - 1 if image.source == "SEQUENCE" else 0
    user.use_auto_refresh = True
    user.use_cyclic = False


def sequence_first_number(image: bpy.types.Image) -> int:
    """The frame number in the file name of an image sequence's first file (e.g. 1 for frame_0001.png)."""
    import re

    name = os.path.basename(bpy.path.abspath(image.filepath))
    nums = re.findall(r"(\d+)", name)
    return int(nums[-1]) if nums else 1


def load_footage_image(path: str) -> bpy.types.Image:
    """The footage as a Blender image: a movie, or the first file of an image sequence (source SEQUENCE)."""
    p = Path(path)
    if p.is_dir():
        files = sorted_images(p)
        if not files:
            raise ValueError(f"no images in {p}")
        image = bpy.data.images.load(str(files[0]), check_existing=True)
        image.source = "SEQUENCE"
        return image
    image = bpy.data.images.load(str(p), check_existing=True)
    if p.suffix.lower() in {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mxf"}:
        image.source = "MOVIE"
    return image


def sorted_images(folder: str | os.PathLike) -> list[Path]:
    """Image files of a folder in natural order (frame_2 before frame_10)."""
    import re

    def key(p: Path) -> list:
        return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]

    exts = {".png", ".jpg", ".jpeg", ".exr", ".tif", ".tiff"}
    return sorted((p for p in Path(folder).iterdir() if p.suffix.lower() in exts), key=key)


# -- cameras -------------------------------------------------------------------------------------
def keyframe_camera(cam_obj: bpy.types.Object, matrices: np.ndarray, lens: Sequence[float], frame_start: int) -> None:
    """Key ``cam_obj`` on every frame: Blender ``matrix_world`` (N, 4, 4) and ``lens`` (N,) in mm, linear.

    The object must have no parent or constraints (its matrix_world is its basis)."""
    matrices = np.asarray(matrices, dtype=np.float64).reshape(-1, 4, 4)
    lens = np.asarray(lens, dtype=np.float64).reshape(-1)
    n = len(matrices)
    if len(lens) == 1:
        lens = np.full(n, lens[0])
    cam_obj.rotation_mode = "XYZ"
    locs = np.empty((n, 3))
    rots = np.empty((n, 3))
    prev = None
    for i, m in enumerate(matrices):
        mat = Matrix(m.tolist())
        loc, quat, _scale = mat.decompose()
        eul = quat.to_euler("XYZ", prev) if prev is not None else quat.to_euler("XYZ")
        prev = eul
        locs[i] = loc
        rots[i] = eul
    cam_obj.location = locs[0]
    cam_obj.rotation_euler = rots[0]
    cam_obj.scale = (1.0, 1.0, 1.0)
    cam_obj.data.lens = float(lens[0])
    cam_obj.keyframe_insert("location", frame=frame_start)
    cam_obj.keyframe_insert("rotation_euler", frame=frame_start)
    cam_obj.data.keyframe_insert("lens", frame=frame_start)
    frames = frame_start + np.arange(n, dtype=np.float64)
    for fc in compat.action_fcurves(cam_obj):
        values = {"location": locs, "rotation_euler": rots}.get(fc.data_path)
        if values is not None:
            _fill_fcurve(fc, frames, values[:, fc.array_index])
    for fc in compat.action_fcurves(cam_obj.data):
        if fc.data_path == "lens":
            _fill_fcurve(fc, frames, lens)


def _fill_fcurve(fc, frames: np.ndarray, values: np.ndarray) -> None:
    """Replace an F-curve's keys by linear keys at (frames, values)."""
    points = fc.keyframe_points
    while len(points) > 1:
        points.remove(points[-1], fast=True)
    points.add(len(frames) - len(points))
    co = np.stack([frames, values], axis=1).astype(np.float32).ravel()
    points.foreach_set("co", co)
    points.foreach_set("handle_left", co)
    points.foreach_set("handle_right", co)
    points.foreach_set("interpolation", np.full(len(frames), 1, dtype=np.int32))  # 1 = LINEAR
    fc.update()
