"""Viewport aids (issue 18): toggles in the N-panel that change only what the viewport shows.

- **Hide occlusion faces / border sheets**: a Geometry Nodes modifier "EX4D Viewport Aids" on the DW-mesh
  (after its Mesh Cache, viewport only: ``show_render`` off, F12 unchanged) deletes the faces flagged by the
  per-frame ``ex4d_occluded`` face attribute (``mesh_object.apply_occlusion``) and/or by ``ex4d_border``: the
  faces with a vertex on the border ring (grid vertex ``r * W + c`` with r in {0, H-1} or c in {0, W-1}; the
  ring sits at the border depth and its stretched sheets dominate side views), computed once from the
  topology. Nothing of the mesh data is removed: turning a toggle off shows the faces again.
- **Guide overlay**: the guide's PNG frames (the last ``render_guide``, ``scene.ex4d.guide_color_dir``) as the
  novel camera's background image, in FRONT of the mesh at the set opacity (off: back to the usual background).
- **A/B**: a second background image in front, switched between the latest generated result of the novel
  camera (its VSE strip's frames) and the plate (the footage).
"""

from __future__ import annotations

from typing import Any

import bpy
import numpy as np
from bpy.props import BoolProperty, EnumProperty, FloatProperty

from . import compat, data, mesh_object, panel_base, props, results_scene, strips

MODIFIER = "EX4D Viewport Aids"
NODE_GROUP = "EX4D Hide Faces"
BORDER_ATTRIBUTE = "ex4d_border"  # BOOLEAN face attribute: a face with a vertex on the border ring
IN_OCC, IN_BORDER = "Hide Occlusion", "Hide Border"
AB_KEY = "ex4d_ab_image"  # on the camera data: the image name of the A/B background


# ----------------------------------------------------------------------------------------------
# 1. Hiding faces
# ----------------------------------------------------------------------------------------------
def border_faces(faces: np.ndarray, width: int, height: int) -> np.ndarray:
    """(F,) bool: faces (F, 3) of a W x H pixel grid with a vertex on the border ring."""
    r, c = np.divmod(np.asarray(faces), int(width))
    ring = (r == 0) | (r == height - 1) | (c == 0) | (c == width - 1)
    return ring.any(axis=1)


def _node_group() -> bpy.types.NodeTree:
    ng = bpy.data.node_groups.get(NODE_GROUP)
    if ng is not None:
        return ng
    ng = bpy.data.node_groups.new(NODE_GROUP, "GeometryNodeTree")
    ng.interface.new_socket("Geometry", in_out="INPUT", socket_type="NodeSocketGeometry")
    ng.interface.new_socket(IN_OCC, in_out="INPUT", socket_type="NodeSocketBool")
    ng.interface.new_socket(IN_BORDER, in_out="INPUT", socket_type="NodeSocketBool")
    ng.interface.new_socket("Geometry", in_out="OUTPUT", socket_type="NodeSocketGeometry")
    n, link = ng.nodes, ng.links.new
    gin, gout = n.new("NodeGroupInput"), n.new("NodeGroupOutput")
    terms = []
    for attr, socket in ((data.OCCLUSION_ATTRIBUTE, IN_OCC), (BORDER_ATTRIBUTE, IN_BORDER)):
        named: Any = n.new("GeometryNodeInputNamedAttribute")
        named.data_type = "BOOLEAN"
        name_in: Any = named.inputs["Name"]
        name_in.default_value = attr
        both: Any = n.new("FunctionNodeBooleanMath")
        both.operation = "AND"
        link(named.outputs["Attribute"], both.inputs[0])
        link(gin.outputs[socket], both.inputs[1])
        terms.append(both)
    either: Any = n.new("FunctionNodeBooleanMath")
    either.operation = "OR"
    link(terms[0].outputs[0], either.inputs[0])
    link(terms[1].outputs[0], either.inputs[1])
    delete: Any = n.new("GeometryNodeDeleteGeometry")
    delete.domain = "FACE"
    link(gin.outputs["Geometry"], delete.inputs["Geometry"])
    link(either.outputs[0], delete.inputs["Selection"])
    link(delete.outputs["Geometry"], gout.inputs["Geometry"])
    return ng


def _socket_id(ng: bpy.types.NodeTree, name: str) -> str:
    return next(i.identifier for i in ng.interface.items_tree if i.item_type == "SOCKET" and i.name == name
                and i.in_out == "INPUT")  # fmt: skip


def apply_face_aids(obj: bpy.types.Object, hide_occlusion: bool, hide_border: bool) -> Any:
    """Set up (or update) the DW-mesh's aid modifier; the border attribute is computed on first use."""
    mod: Any = obj.modifiers.get(MODIFIER)
    if mod is None and not (hide_occlusion or hide_border):
        return None
    mesh = obj.data
    if hide_border and BORDER_ATTRIBUTE not in mesh.attributes:
        grid: Any = obj.get("ex4d_grid") or obj["ex4d_size"]  # the vertex grid (the proxy's)
        w, h = (int(v) for v in grid)
        faces = mesh_object._faces(obj)
        if faces is None:
            raise ValueError("the DW-mesh has no triangle grid topology")
        data.set_face_bool(mesh, BORDER_ATTRIBUTE, border_faces(faces, w, h))
    if mod is None:
        mod = obj.modifiers.new(MODIFIER, "NODES")
        mod.node_group = _node_group()
        mod.show_render = False  # a viewport aid: renders (F12, the Workbench checks) are unchanged
    ng = mod.node_group
    compat.set_modifier_input(mod, _socket_id(ng, IN_OCC), bool(hide_occlusion))
    compat.set_modifier_input(mod, _socket_id(ng, IN_BORDER), bool(hide_border))
    mod.show_viewport = bool(hide_occlusion or hide_border)
    obj.update_tag()
    return mod


# ----------------------------------------------------------------------------------------------
# 2. Guide overlay, 3. A/B
# ----------------------------------------------------------------------------------------------
def _guide_background(scene, cam_obj):
    cam = cam_obj.data
    for b in cam.background_images:
        if b.image is not None and b.image.get("ex4d_kind") == strips.GUIDE_KIND:
            return b
    s = scene.ex4d
    files = data.sorted_images(bpy.path.abspath(s.guide_color_dir)) if s.guide_color_dir else []
    if not files:
        return None
    image = strips.load_sequence_image(files, f"EX4D Guide {cam_obj.name}")
    strips.show_on_camera(cam_obj, image, scene.frame_start, len(files))
    return _guide_background(scene, cam_obj)


def apply_guide_overlay(scene, cam_obj, show: bool, opacity: float) -> bool:
    """The guide in front of the mesh at ``opacity`` (``show``), or back behind it at full alpha. False when
    the camera has no guide yet."""
    bg = _guide_background(scene, cam_obj)
    if bg is None:
        return False
    bg.display_depth = "FRONT" if show else "BACK"
    bg.alpha = float(opacity) if show else 1.0
    bg.show_background_image = True
    cam_obj.data.show_background_images = True
    return True


def latest_result(scene, cam_obj) -> tuple[list, int] | None:
    """(frame files, frame start) of the newest generated result strip of ``cam_obj`` (highest version)."""
    found = strips.strips_where(results_scene.strips_scene(scene), kind=strips.RESULT_KIND, camera=cam_obj.name)
    if not found:
        return None
    st = max(found, key=lambda s: (str(s.get("ex4d_version", "")), s.name))
    folder = bpy.path.abspath(st.directory)
    return [f"{folder}/{e.filename}" for e in st.elements], compat.strip_content_start(st)


def apply_ab(scene, cam_obj, view: str) -> str:
    """Show ``view`` ('RESULT' | 'PLATE' | 'OFF') in front through the camera; returns what is shown."""
    from pathlib import Path

    cam = cam_obj.data
    bg = next((b for b in cam.background_images if b.image is not None and b.image.name == cam.get(AB_KEY)), None)
    if view == "OFF":
        if bg is not None:
            bg.show_background_image = False
        return "OFF"
    s = scene.ex4d
    if view == "RESULT":
        res = latest_result(scene, cam_obj)
        if res is None:
            return "OFF"
        files, start = res
        image, n = strips.load_sequence_image([Path(f) for f in files], f"EX4D Result {cam_obj.name}"), len(files)
    else:
        if not s.footage_path:
            return "OFF"
        image, start, n = data.load_footage_image(bpy.path.abspath(s.footage_path)), scene.frame_start, s.n_frames
    if bg is None:
        bg = cam.background_images.new()
    bg.image = image
    for other in [b for b in cam.background_images if b != bg and b.image == image]:
        cam.background_images.remove(other)  # e.g. the compositing result background: one image shown once
    data.configure_image_user(bg.image_user, image, start, max(1, int(n)))
    bg.display_depth, bg.alpha, bg.show_background_image = "FRONT", 1.0, True
    cam[AB_KEY] = image.name
    cam.show_background_images = True
    return view


# ----------------------------------------------------------------------------------------------
# Settings, panel
# ----------------------------------------------------------------------------------------------
def _update_faces(self, context) -> None:
    obj = context.scene.ex4d.dwmesh
    if obj is not None and obj.get("ex4d_size"):
        apply_face_aids(obj, self.hide_occlusion, self.hide_border)


def _update_overlay(self, context) -> None:
    cam = context.scene.ex4d.novel_camera
    if cam is not None and cam.type == "CAMERA":
        apply_guide_overlay(context.scene, cam, self.guide_overlay, self.guide_opacity)


def _update_ab(self, context) -> None:
    cam = context.scene.ex4d.novel_camera
    if cam is not None and cam.type == "CAMERA":
        apply_ab(context.scene, cam, self.ab_view)


class EX4D_AidSettings(bpy.types.PropertyGroup):
    hide_occlusion: BoolProperty(  # type: ignore[valid-type]
        name="Hide Occlusion Faces", default=False, update=_update_faces,
        description="Hide the DW-mesh's occlusion faces in the viewport (renders are unchanged)",
    )  # fmt: skip
    hide_border: BoolProperty(  # type: ignore[valid-type]
        name="Hide Border Sheets", default=False, update=_update_faces,
        description="Hide the faces on the border ring (the sheets at the border depth that fill side views)",
    )  # fmt: skip
    guide_overlay: BoolProperty(  # type: ignore[valid-type]
        name="Guide in Front", default=False, update=_update_overlay,
        description="Show the guide in front of the mesh through the novel camera",
    )  # fmt: skip
    guide_opacity: FloatProperty(  # type: ignore[valid-type]
        name="Opacity", default=0.5, min=0.0, max=1.0, subtype="FACTOR", update=_update_overlay
    )
    ab_view: EnumProperty(  # type: ignore[valid-type]
        name="A/B",
        items=[("OFF", "Off", "No A/B image"), ("RESULT", "Result", "The latest generated result in front"),
               ("PLATE", "Plate", "The footage in front")],
        default="OFF", update=_update_ab,
    )  # fmt: skip


class EX4D_PT_aids(panel_base.SubPanel, bpy.types.Panel):
    bl_idname = "EX4D_PT_aids"
    bl_label = "Viewport Aids"

    def draw(self, context):
        layout, a = self.layout, context.scene.ex4d_aids
        col = layout.column(align=True)
        col.enabled = context.scene.ex4d.dwmesh is not None
        col.prop(a, "hide_occlusion")
        col.prop(a, "hide_border")
        row = layout.row(align=True)
        row.prop(a, "guide_overlay")
        sub = row.row(align=True)
        sub.enabled = a.guide_overlay
        sub.prop(a, "guide_opacity", text="", slider=True)
        layout.row().prop(a, "ab_view", expand=True)


_classes = (EX4D_AidSettings, EX4D_PT_aids)


def register() -> None:
    props.register_classes(_classes)
    scene_type: Any = bpy.types.Scene
    scene_type.ex4d_aids = bpy.props.PointerProperty(type=EX4D_AidSettings)


def unregister() -> None:
    scene_type: Any = bpy.types.Scene
    del scene_type.ex4d_aids
    props.unregister_classes(_classes)
