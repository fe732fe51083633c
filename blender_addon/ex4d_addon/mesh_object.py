"""The DW-mesh as a Blender object: built in slices from the backend's ``build_dwmesh`` result, its
occlusion faces following the frame (a ``frame_change_pre`` handler), and a check that its files still exist
when a .blend is opened.

The object keeps the backend's vertex coordinates; its ``matrix_world`` is the backend's ``cv_to_blender``
(the add-on holds no convention of its own). Scene frame ``frame_start + i`` shows clip frame ``i``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator, Iterator

import bpy
import numpy as np
from bpy.app.handlers import persistent
from mathutils import Matrix

from . import data, props
from .runner import add_handler, remove_handler

DWMESH_NAME = "EX4D DW-Mesh"
FOOTAGE_MATERIAL = "EX4D Footage"
OCCLUSION_MATERIAL = "EX4D Occlusion"
COLLECTION_NAME = "EX-4D"
_CACHE: dict[str, np.ndarray] = {}
_suspended = [0]


def collection(scene: bpy.types.Scene) -> bpy.types.Collection:
    """The scene's "EX-4D" collection (created and linked if missing): every object the add-on makes."""
    coll = bpy.data.collections.get(COLLECTION_NAME)
    if coll is None:
        coll = bpy.data.collections.new(COLLECTION_NAME)
    if coll.name not in scene.collection.children:
        scene.collection.children.link(coll)
    return coll


def link(scene: bpy.types.Scene, obj: bpy.types.Object) -> None:
    """Put ``obj`` into the scene's EX-4D collection (and only there, if it was nowhere)."""
    coll = collection(scene)
    if obj.name not in coll.objects:
        coll.objects.link(obj)


@contextlib.contextmanager
def occlusion_suspended() -> Iterator[None]:
    """Frame changes inside do not update the DW-meshes (camera sampling: nothing is drawn)."""
    _suspended[0] += 1
    try:
        yield
    finally:
        _suspended[0] -= 1


def _occlusion(path: str) -> np.ndarray | None:
    arr = _CACHE.get(path)
    if arr is None:
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            return None
        _CACHE[path] = arr
    return arr


def _faces(obj: bpy.types.Object) -> np.ndarray | None:
    """(F, 3) vertex indices of the DW-mesh (cached; the topology never changes)."""
    key = f"faces:{obj.name_full}:{len(obj.data.polygons)}"
    arr = _CACHE.get(key)
    if arr is None:
        mesh = obj.data
        if len(mesh.polygons) == 0 or mesh.polygons[0].loop_total != 3:
            return None
        arr = np.empty(len(mesh.loops), dtype=np.int32)
        corner_vert = mesh.attributes.get(".corner_vert")
        if corner_vert is not None:  # the attribute API: a memory copy
            corner_vert.data.foreach_get("value", arr)
        else:
            mesh.loops.foreach_get("vertex_index", arr)
        arr = arr.reshape(-1, 3)
        if len(arr) != len(mesh.polygons):
            return None
        _CACHE[key] = arr
    return arr


def apply_occlusion(obj: bpy.types.Object, frame: int) -> bool:
    """Write clip frame (``frame`` - start)'s occlusion flags into the DW-mesh's face attribute and material
    indices (slot 1 = the occlusion colour). True when something was written."""
    path = obj.get("ex4d_occlusion_npy")
    mesh = obj.data
    if not path or mesh is None:
        return False
    occ = _occlusion(bpy.path.abspath(path))
    if occ is None or occ.shape[1] != len(mesh.polygons):
        return False
    t = int(min(max(frame - int(obj.get("ex4d_frame_start", 1)), 0), occ.shape[0] - 1))
    if obj.get("ex4d_occlusion_frame") == t and data.OCCLUSION_ATTRIBUTE in mesh.attributes:
        return False
    flags = np.asarray(occ[t], dtype=bool)
    data.set_face_bool(mesh, data.OCCLUSION_ATTRIBUTE, flags)
    mat_index = mesh.attributes.get("material_index")  # the attribute API is ~1000x faster than polygons
    if mat_index is None:
        mat_index = mesh.attributes.new("material_index", "INT", "FACE")
    mat_index.data.foreach_set("value", flags.astype(np.int32))
    faces = _faces(obj)
    if faces is not None:  # the guide's vertex alpha: 0 on every vertex of an occlusion face
        seen = np.ones(len(mesh.vertices), dtype=np.float32)
        seen[faces[flags].ravel()] = 0.0
        data.set_point_gray(mesh, data.MASK_ATTRIBUTE, seen)
    mesh.update_tag()
    obj["ex4d_occlusion_frame"] = t
    return True


def dwmesh_objects() -> list:
    return [ob for ob in bpy.data.objects if ob.type == "MESH" and ob.get("ex4d_occlusion_npy")]


def missing_files(obj: bpy.types.Object) -> list[str]:
    """The DW-mesh's backend files that are gone (a cleaned job store)."""
    paths = [obj.get("ex4d_occlusion_npy", "")]
    paths += [getattr(m, "filepath", "") for m in obj.modifiers if m.type == "MESH_CACHE"]
    return [p for p in paths if p and not os.path.exists(bpy.path.abspath(p))]


@persistent
def _on_frame_change(scene, depsgraph=None):  # noqa: ARG001
    if _suspended[0]:
        return
    for ob in dwmesh_objects():
        apply_occlusion(ob, scene.frame_current)


@persistent
def _on_load_post(*_args):
    _CACHE.clear()
    for ob in dwmesh_objects():
        ob["ex4d_occlusion_frame"] = -1
        gone = missing_files(ob)
        if gone:  # say so instead of a silently frozen mesh
            text = (
                f"EX-4D: the DW-mesh '{ob.name}' lost its files in the job store ({gone[0]}) -- "
                "run Build DW-Mesh again [not_found]"
            )
            print(text)
            for sc in bpy.data.scenes:
                s = getattr(sc, "ex4d", None)
                if s is not None and s.dwmesh == ob:
                    s.last_error, s.mesh_stale = text, True
            continue
        apply_occlusion(ob, bpy.context.scene.frame_current if bpy.context.scene else 1)


def occlusion_material() -> bpy.types.Material:
    mat = bpy.data.materials.get(OCCLUSION_MATERIAL)
    if mat is not None:
        return mat
    mat = bpy.data.materials.new(OCCLUSION_MATERIAL)
    mat.diffuse_color = data.OCCLUDED_COLOR  # Workbench (material colour) and the viewport
    if bpy.app.version < (5, 0, 0):  # always node-based (and deprecated) in 5.0
        mat.use_nodes = True
    nodes = mat.node_tree.nodes
    nodes.clear()
    emit = nodes.new("ShaderNodeEmission")
    emit.inputs["Color"].default_value = data.OCCLUDED_COLOR
    out = nodes.new("ShaderNodeOutputMaterial")
    mat.node_tree.links.new(emit.outputs["Emission"], out.inputs["Surface"])
    return mat


def footage_material(image, frame_start: int, n_frames: int) -> bpy.types.Material:
    """The one "EX4D Footage" material, made once and updated on a rebuild (never a ``.001`` copy)."""
    mat = bpy.data.materials.get(FOOTAGE_MATERIAL)
    if mat is not None and mat.node_tree is not None:
        tex = next((n for n in mat.node_tree.nodes if n.type == "TEX_IMAGE"), None)
        if tex is not None and image is not None:
            tex.image = image
            data.configure_image_user(tex.image_user, image, frame_start, n_frames)
            return mat
        if tex is None and image is None:
            return mat
    if mat is not None:
        bpy.data.materials.remove(mat)
    return data.footage_material(FOOTAGE_MATERIAL, image, frame_start, n_frames)


def viewport_detail(context: bpy.types.Context | None = None) -> str:
    """The ``viewport_detail`` a build asks for (the "Viewport Mesh Detail" preference; proxy by default)."""
    pref = props.prefs(context)
    return str(getattr(pref, "viewport_mesh_detail", "proxy")) if pref is not None else "proxy"


def proxy_uvs(columns: list[int], rows: list[int], width: int, height: int) -> np.ndarray:
    """(len(rows) * len(columns), 2) float32 UVs of the proxy's vertices (row-major): the centres of their
    pixels (column, row) in the W x H footage, as :func:`data.grid_uvs` for the full grid."""
    cols, rws = np.meshgrid(np.asarray(columns, dtype=np.float64), np.asarray(rows, dtype=np.float64))
    u = (cols.ravel() + 0.5) / width
    v = 1.0 - (rws.ravel() + 0.5) / height
    return np.stack([u, v], axis=1).astype(np.float32)


def build_dwmesh_object(
    scene: bpy.types.Scene, result: dict, name: str = DWMESH_NAME, backend_python: str | None = None
) -> Generator[None, None, bpy.types.Object]:
    """The DW-mesh object from a ``build_dwmesh`` result (PROTOCOL.md), built in slices (one ``yield``
    between the expensive steps).

    One mesh with the pixel-grid topology (or, with ``viewport_stride`` > 1, the backend's viewport proxy:
    every s-th pixel column / row and the last), base positions = clip frame 0; a Mesh Cache modifier plays the
    backend's PC2; UVs at pixel centres; the ``ex4d_occluded`` face attribute (and material slot 1) follow
    the frame. The previous object of that name is replaced."""
    w, h = int(result["width"]), int(result["height"])
    pos0 = np.asarray(data.read_pc2(result["positions_pc2"])[0])
    python = backend_python or ""
    stride = int(result.get("viewport_stride", 1))
    if stride > 1:  # the viewport proxy (~65k vertices, its UVs at the kept pixels' centres)
        uvs = proxy_uvs(result["mesh_columns"], result["mesh_rows"], w, h)
        if python:  # edges in the backend's Python (cached per topology) as for the full grid
            wp, hp = len(result["mesh_columns"]), len(result["mesh_rows"])
            topo = dict(
                (yield from data.topology_arrays(result["faces_npy"], wp, hp, props.data_dir("topology"), python))
            )
            faces = topo["faces"]
            topo["corner_uv"] = uvs[np.asarray(faces).ravel()]  # (its grid UVs assume evenly spaced lines)
        else:
            faces = np.load(result["faces_npy"])
            topo = data.mesh_arrays(pos0, faces, uvs)
        yield
        mesh = yield from data.mesh_from_arrays_sliced(name, pos0, faces, topology=topo)
    elif python:  # the topology in the backend's Python (cached per size): nothing heavy on this thread
        topo = yield from data.topology_arrays(result["faces_npy"], w, h, props.data_dir("topology"), python)
        faces = topo["faces"]
        mesh = yield from data.mesh_from_arrays_sliced(name, pos0, faces, topology=topo)
    else:
        faces = np.load(result["faces_npy"])
        mesh = yield from data.mesh_from_arrays_sliced(name, pos0, faces, data.grid_uvs(w, h))
    old = bpy.data.objects.get(name)
    if old is not None:
        old_mesh = old.data
        bpy.data.objects.remove(old)
        if old_mesh is not None and old_mesh.users == 0:
            bpy.data.meshes.remove(old_mesh)
        mesh.name = name
    obj = bpy.data.objects.new(name, mesh)
    link(scene, obj)
    obj.matrix_world = Matrix(result["cv_to_blender"])
    start = scene.frame_start
    data.add_mesh_cache(obj, result["positions_pc2"], start)
    yield
    s = props.settings(scene)
    image = None
    if s.footage_path:
        try:
            image = data.load_footage_image(bpy.path.abspath(s.footage_path))
        except (OSError, RuntimeError, ValueError):
            image = None
    mesh.materials.append(footage_material(image, start, int(result["n_frames"])))
    mesh.materials.append(occlusion_material())
    obj["ex4d_occlusion_npy"] = result["occlusion_npy"]
    obj["ex4d_positions_npy"] = result.get("positions_npy", "")
    obj["ex4d_frame_start"] = start
    obj["ex4d_n_frames"] = int(result["n_frames"])
    obj["ex4d_size"] = [w, h]
    obj["ex4d_viewport_stride"] = stride
    obj["ex4d_grid"] = (  # vertex grid columns x rows (the proxy's, or the pixel grid's)
        [len(result["mesh_columns"]), len(result["mesh_rows"])] if stride > 1 else [w, h]
    )
    obj["ex4d_K"] = [float(v) for row in result["K"] for v in row]
    obj["ex4d_job"] = result.get("job", "")
    obj["ex4d_occlusion_frame"] = -1
    obj["ex4d_extent"] = float(np.abs(pos0).max()) if len(pos0) else 0.0  # the cameras' clip_end covers it
    _CACHE[f"faces:{obj.name_full}:{len(faces)}"] = np.ascontiguousarray(faces, dtype=np.int32)
    yield
    apply_occlusion(obj, scene.frame_current)
    s.dwmesh = obj
    return obj


def build_now(scene, result: dict, name: str = DWMESH_NAME) -> bpy.types.Object:
    """:func:`build_dwmesh_object` at once (scripts, tests)."""
    return data.run_to_end(build_dwmesh_object(scene, result, name))


def _handlers() -> tuple:
    return ((bpy.app.handlers.frame_change_pre, _on_frame_change), (bpy.app.handlers.load_post, _on_load_post))


def register() -> None:
    for lst, fn in _handlers():
        add_handler(lst, fn)


def unregister() -> None:
    for lst, fn in _handlers():
        remove_handler(lst, fn)
    _CACHE.clear()
