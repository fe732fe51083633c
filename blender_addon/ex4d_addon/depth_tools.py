"""Depth tools before meshing (``scene.ex4d_depth``): a scale and offset, a near/far clip, an EXR Z pass
sequence as the depth source, a depth preview on the DW-mesh, and the stale-mesh flag.

The add-on only sends the raw values: ``adjust_params`` goes into every request's ``depth.adjust``
(``backend.clip_params``), and the backend applies ``depth' = clip(scale * depth + offset, near, far)`` in
its depth stage (``ex4d_backend/depth_adjust.py``), so the CLI, the service and the farm agree.

Stale flag: Build DW-Mesh stores (at submission) a hash of the mesh-relevant request params (footage, depth source and
adjustments, focal and sensor, size and frame range, mesh filter); ``mesh_is_stale`` compares it with the
params the scene gives now (string work only, no file I/O: safe in ``draw``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import bpy
from bpy.props import BoolProperty, FloatProperty, PointerProperty, StringProperty

from . import panel_base, props

PREVIEW_MATERIAL = "EX4D Depth Preview"
IGNORED_PARAMS = ("device", "renderer")  # request params that never change the DW-mesh


def _changed(self, context) -> None:  # noqa: ARG001 - property update: nothing is recomputed here
    if self.preview:
        update_preview_ramp(context.scene)


def _preview_changed(self, context) -> None:
    set_preview(context.scene, self.preview)


class EX4D_DepthTools(bpy.types.PropertyGroup):
    """``scene.ex4d_depth``: the depth adjustments sent with every request, and the build's hash."""

    scale: FloatProperty(  # type: ignore[valid-type]
        name="Depth Scale", description="depth' = scale * depth + offset (backend depth units)", default=1.0,
        min=1e-6, soft_max=100.0, update=_changed,
    )  # fmt: skip
    offset: FloatProperty(name="Depth Offset", default=0.0, soft_min=-100.0, soft_max=100.0, update=_changed)  # type: ignore[valid-type]
    use_near: BoolProperty(name="Near Clip", description="Clip nearer depths to Near", default=False)  # type: ignore[valid-type]
    near: FloatProperty(name="Near", default=0.1, min=1e-4, update=_changed)  # type: ignore[valid-type]
    use_far: BoolProperty(name="Far Clip", description="Clip farther depths to Far", default=False)  # type: ignore[valid-type]
    far: FloatProperty(name="Far", default=100.0, min=1e-4, update=_changed)  # type: ignore[valid-type]
    preview: BoolProperty(  # type: ignore[valid-type]
        name="Depth Preview",
        description="Show the DW-mesh's depth as a colour ramp (Material Preview / Rendered shading)",
        default=False,
        update=_preview_changed,
    )
    built_hash: StringProperty(name="Mesh Settings Hash", default="")  # type: ignore[valid-type]


def adjust_params(scene) -> dict:
    """The request's ``depth.adjust`` (only the fields that differ from no adjustment; {}: none)."""
    d = scene.ex4d_depth
    out: dict[str, Any] = {}
    if d.scale != 1.0:
        out["scale"] = float(d.scale)
    if d.offset != 0.0:
        out["offset"] = float(d.offset)
    if d.use_near:
        out["near"] = float(d.near)
    if d.use_far:
        out["far"] = float(d.far)
    return out


def params_hash(params: dict) -> str:
    """A hash of the mesh-relevant request params (``IGNORED_PARAMS`` left out, also inside ``depth``)."""
    p = {k: v for k, v in params.items() if k not in IGNORED_PARAMS}
    if isinstance(p.get("depth"), dict):
        p["depth"] = {k: v for k, v in p["depth"].items() if k not in IGNORED_PARAMS}
    return hashlib.sha1(json.dumps(p, sort_keys=True, default=str).encode()).hexdigest()[:16]


def current_params(context) -> dict | None:
    """The params Build DW-Mesh would send now (None: no footage), with the footage and depth paths as the
    scene stores them (relative to the .blend: moving the project folder does not make the mesh stale)."""
    from . import backend, ops_scene
    from .backend_client import BackendError

    try:
        params, _ = backend.clip_params(context)
    except BackendError:
        return None
    params.update(ops_scene._sensor_params(context.scene))
    s = context.scene.ex4d
    params["footage"] = s.footage_path
    if params["depth"].get("model") == "file":
        params["depth"]["path"] = s.depth_filepath
    return params


def settings_hash(context) -> str:
    """The hash of the mesh-relevant settings now ("" without footage); Build DW-Mesh stores it."""
    params = current_params(context)
    return "" if params is None else params_hash(params)


def mesh_is_stale(context) -> bool:
    """True when a DW-mesh was built and anything it depends on changed since."""
    built = context.scene.ex4d_depth.built_hash
    if not built or context.scene.ex4d.dwmesh is None:
        return False
    return settings_hash(context) != built


def draw_stale(layout, context) -> None:
    """The panel's warning line (no I/O)."""
    if mesh_is_stale(context) and not context.scene.ex4d.mesh_stale:  # (a focal change has its own line)
        col = layout.column()
        col.alert = True
        col.label(text="DW-mesh is stale: rebuild", icon="ERROR")


# -- depth preview: the DW-mesh's object-space z (the depth) through a colour ramp ------------------
def _depth_range(obj) -> tuple[float, float]:
    """(near, far) of the ramp: the clip when set, else the mesh's first frame's z range (no file I/O: the
    mesh's vertices in memory)."""
    import numpy as np

    mesh = obj.data
    co = np.empty(len(mesh.vertices) * 3, np.float32)
    mesh.vertices.foreach_get("co", co)
    z = co[2::3]
    z = z[z < 99.0] if (z < 99.0).any() else z  # leave out the border ring (depth 100)
    return (float(z.min()), float(z.max())) if len(z) else (0.0, 1.0)


def preview_material() -> bpy.types.Material:
    mat = bpy.data.materials.get(PREVIEW_MATERIAL)
    if mat is not None:
        return mat
    mat = bpy.data.materials.new(PREVIEW_MATERIAL)
    if bpy.app.version < (5, 0, 0):  # always node-based (and deprecated) in 5.0
        mat.use_nodes = True
    nt = mat.node_tree
    nt.nodes.clear()
    coords = nt.nodes.new("ShaderNodeTexCoord")
    sep = nt.nodes.new("ShaderNodeSeparateXYZ")
    rng = nt.nodes.new("ShaderNodeMapRange")
    rng.name = "range"
    ramp = nt.nodes.new("ShaderNodeValToRGB")
    emit = nt.nodes.new("ShaderNodeEmission")
    out = nt.nodes.new("ShaderNodeOutputMaterial")
    nt.links.new(coords.outputs["Object"], sep.inputs[0])  # object space = the backend's OpenCV camera space
    nt.links.new(sep.outputs["Z"], rng.inputs["Value"])
    nt.links.new(rng.outputs[0], ramp.inputs["Fac"])
    nt.links.new(ramp.outputs["Color"], emit.inputs["Color"])
    nt.links.new(emit.outputs[0], out.inputs["Surface"])
    ramp.color_ramp.elements[0].color = (1.0, 1.0, 1.0, 1.0)  # near: white, far: black (a depth map's look)
    ramp.color_ramp.elements[1].color = (0.0, 0.0, 0.0, 1.0)
    return mat


def update_preview_ramp(scene) -> None:
    obj = scene.ex4d.dwmesh
    mat = bpy.data.materials.get(PREVIEW_MATERIAL)
    if obj is None or mat is None:
        return
    d = scene.ex4d_depth
    lo, hi = _depth_range(obj)
    lo = d.near if d.use_near else lo
    hi = d.far if d.use_far else hi
    rng = mat.node_tree.nodes["range"]
    rng.inputs["From Min"].default_value, rng.inputs["From Max"].default_value = lo, max(hi, lo + 1e-6)


def set_preview(scene, on: bool) -> None:
    """Show (or stop showing) the depth on the DW-mesh: its first material slot switches between the
    footage material and the depth ramp; the footage material is kept and restored."""
    obj = scene.ex4d.dwmesh
    if obj is None or not obj.data.materials:
        return
    mats = obj.data.materials
    if on:
        if mats[0] is not None and mats[0].name != PREVIEW_MATERIAL:
            obj["ex4d_footage_material"] = mats[0].name
        mats[0] = preview_material()
        update_preview_ramp(scene)
    elif mats[0] is not None and mats[0].name == PREVIEW_MATERIAL:
        footage = bpy.data.materials.get(obj.get("ex4d_footage_material", ""))
        if footage is not None:
            mats[0] = footage


# -- EXR Z pass import --------------------------------------------------------------------------
class EX4D_OT_import_depth_exr(bpy.types.Operator):
    """Use a folder of EXR frames with a Z pass (a CG plate's render, another depth tool) as the depth:
    the backend reads each frame's Z channel (also next to RGBA, or a layer's *.Z). Build DW-Mesh next"""

    bl_idname = "ex4d.import_depth_exr"
    bl_label = "Import EXR Z Sequence"
    bl_options = {"REGISTER", "UNDO"}

    directory: StringProperty(name="Folder", subtype="DIR_PATH")  # type: ignore[valid-type]

    def invoke(self, context, event):  # noqa: ARG002
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        folder = Path(bpy.path.abspath(self.directory))
        if not folder.is_dir() or not any(f.suffix.lower() == ".exr" for f in folder.iterdir()):
            self.report({"ERROR"}, f"EX-4D: {folder} holds no EXR frames")
            return {"CANCELLED"}
        from .outputs import rel

        s = context.scene.ex4d
        s.depth_filepath = rel(str(folder))
        s.depth_kind = "depth"
        self.report({"INFO"}, f"EX-4D: depth from the EXR Z passes in {folder}: Build DW-Mesh to use it")
        return {"FINISHED"}


class EX4D_PT_depth(panel_base.SubPanel, bpy.types.Panel):
    bl_idname = "EX4D_PT_depth"
    bl_label = "Depth Tools"

    def draw(self, context):
        layout = self.layout
        d = context.scene.ex4d_depth
        layout.operator("ex4d.import_depth_exr", icon="IMAGE_ZDEPTH")
        row = layout.row(align=True)
        row.prop(d, "scale")
        row.prop(d, "offset")
        for use, value in (("use_near", "near"), ("use_far", "far")):
            row = layout.row(align=True)
            row.prop(d, use)
            sub = row.row()
            sub.active = getattr(d, use)
            sub.prop(d, value, text="")
        layout.prop(d, "preview", icon="SHADING_RENDERED")
        draw_stale(layout, context)


CLASSES = (EX4D_DepthTools, EX4D_OT_import_depth_exr, EX4D_PT_depth)


def register() -> None:
    props.register_classes(CLASSES)
    bpy.types.Scene.ex4d_depth = PointerProperty(type=EX4D_DepthTools)  # type: ignore[attr-defined]


def unregister() -> None:
    del bpy.types.Scene.ex4d_depth  # type: ignore[attr-defined]
    props.unregister_classes(CLASSES)
