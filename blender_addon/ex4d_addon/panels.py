"""The EX-4D tab of the 3D viewport's N-panel: the whole path, from footage to the generated shot."""

from __future__ import annotations

import bpy


def _op(layout, idname: str, **kw):
    """An operator button, or a disabled label when the operator is not registered (ops_jobs missing)."""
    mod, name = idname.split(".")
    try:
        getattr(getattr(bpy.ops, mod), name).get_rna_type()
    except (AttributeError, KeyError):
        layout.label(text=f"({idname} unavailable)")
        return None
    return layout.operator(idname, **kw)


class EX4D_PT_main(bpy.types.Panel):
    bl_idname = "EX4D_PT_main"
    bl_label = "EX-4D"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "EX-4D"

    def draw(self, context):
        layout = self.layout
        s = context.scene.ex4d

        box = layout.box()
        box.label(text="1. Footage", icon="FILE_MOVIE")
        box.prop(s, "footage_path", text="")
        _op(box, "ex4d.import_footage", icon="IMPORT")
        row = box.row(align=True)
        row.prop(s, "focal_px")
        row.prop(s, "max_side")
        box.prop(s, "max_frames")
        if s.processing_width:
            box.label(text=f"Processing {s.processing_width} x {s.processing_height}, {s.n_frames} frames")

        box = layout.box()
        box.label(text="2. DW-Mesh", icon="MESH_GRID")
        box.prop(s, "depth_filepath")
        if s.depth_filepath:
            box.prop(s, "depth_kind")
        _op(box, "ex4d.build_dwmesh", icon="MOD_REMESH")
        if s.dwmesh is not None:
            box.prop(s, "dwmesh", text="")

        box = layout.box()
        box.label(text="3. Novel Camera", icon="CAMERA_DATA")
        row = box.row(align=True)
        row.prop(s, "preset", text="")
        op = _op(row, "ex4d.add_camera_preset", text="Add", icon="ADD")
        if op is not None:
            op.preset = s.preset
        box.prop(s, "novel_camera")

        box = layout.box()
        box.label(text="4. Guide and 5. Generate", icon="RENDER_ANIMATION")
        _op(box, "ex4d.render_guide", icon="RESTRICT_RENDER_OFF")
        row = box.row(align=True)
        row.prop(s, "generator", text="")
        op = _op(row, "ex4d.generate", icon="PLAY")
        if op is not None and hasattr(op, "generator"):
            op.generator = s.generator
        box.prop(s, "prompt")
        row = box.row(align=True)
        row.prop(s, "seed")
        row.prop(s, "steps")

        box = layout.box()
        row = box.row()
        row.label(text="Job", icon="SORTTIME")
        _op(row, "ex4d.check_backend", text="", icon="CHECKMARK")
        if s.job_running or s.job_stage:
            box.label(text=f"{s.job_stage}: {s.job_message}")
            box.prop(s, "job_progress", text="Progress", slider=True)
        if s.job_running:
            _op(box, "ex4d.cancel_job", icon="CANCEL")
        if s.last_error:
            col = box.column()
            col.alert = True
            for i in range(0, len(s.last_error), 60):
                col.label(text=s.last_error[i : i + 60], icon="ERROR" if i == 0 else "BLANK1")


CLASSES = (EX4D_PT_main,)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
