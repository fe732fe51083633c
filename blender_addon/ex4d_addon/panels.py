"""The EX-4D tab of the 3D viewport's N-panel: the whole path, from footage to the generated shot.

Strings are translation-ready: fixed labels go through Blender's translation as they are; labels with
values are formatted from a translated template (``iface_``) and drawn with ``translate=False``. No file
I/O here (``draw`` runs on every redraw).
"""

from __future__ import annotations

import bpy
from bpy.app.translations import pgettext_iface as iface_

from . import depth_tools, panel_base, props, runner, stereo_ui


def _op(layout, idname: str, **kw):
    return layout.operator(idname, **kw)


def _lines(layout, text: str, icon: str, alert: bool = False, width: int = 60) -> None:
    col = layout.column()
    col.alert = alert
    for i in range(0, len(text), width):
        col.label(text=text[i : i + width], icon=icon if i == 0 else "BLANK1", translate=False)


class EX4D_PT_main(panel_base.SidebarPanel, bpy.types.Panel):
    bl_idname = "EX4D_PT_main"
    bl_label = "EX-4D"

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
            text = str(iface_("Processing {} x {}, {} frames")).format(
                s.processing_width, s.processing_height, s.n_frames
            )
            box.label(text=text, translate=False)

        box = layout.box()
        box.label(text="2. DW-Mesh", icon="MESH_GRID")
        box.prop(s, "depth_filepath")
        if s.depth_filepath:
            box.prop(s, "depth_kind")
        _op(box, "ex4d.build_dwmesh", icon="MOD_REMESH")
        if s.dwmesh is not None:
            box.prop(s, "dwmesh", text="")
        depth_tools.draw_stale(box, context)  # any mesh-relevant setting changed since the build
        if s.mesh_stale:
            col = box.column()
            col.alert = True
            col.label(text="Settings changed since the build: Build DW-Mesh again", icon="ERROR")

        box = layout.box()
        box.label(text="3. Novel Camera", icon="CAMERA_DATA")
        row = box.row(align=True)
        row.prop(s, "preset", text="")
        op = _op(row, "ex4d.add_camera_preset", text="Add", icon="ADD")
        op.preset = s.preset
        box.prop(s, "novel_camera")

        box = layout.box()
        box.label(text="4. Guide and 5. Generate", icon="RENDER_ANIMATION")
        _op(box, "ex4d.render_guide", icon="RESTRICT_RENDER_OFF")
        row = box.row(align=True)
        row.prop(s, "generator", text="")
        op = _op(row, "ex4d.generate", icon="PLAY")
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
            box.label(text=f"{s.job_stage}: {s.job_message}", translate=False)
            box.prop(s, "job_progress", text="Progress", slider=True)
        if s.job_running:
            _op(box, "ex4d.cancel_job", icon="CANCEL")
        if s.last_warning:
            _lines(box, s.last_warning, "INFO")
        if s.last_error:
            _lines(box, s.last_error, "ERROR", alert=True)


class EX4D_PT_jobs(panel_base.SubPanel, bpy.types.Panel):
    bl_label = "Generation Settings"
    bl_idname = "EX4D_PT_jobs"

    def draw(self, context):
        js = context.scene.ex4d_job
        col = self.layout.column()
        row = col.row(align=True)  # 0 x 0: auto, the footage's aspect (issue 14)
        row.prop(js, "width")
        row.prop(js, "height")
        col.prop(js, "frame_sampling")
        row = col.row(align=True)
        row.prop(js, "num_frames")
        row.prop(js, "overlap")
        col.prop(js, "chain_variant")
        col.prop(js, "use_preview_range")
        row = col.row(align=True)
        row.prop(js, "cfg")
        row.prop(js, "shift")
        col.prop(js, "negative_prompt")
        col.prop(js, "renderer")
        col.prop(js, "output_dir")
        stereo_ui.draw_settings(col, context)  # issue 18: result strips, EXR, stereo
        job = runner.active_job()
        if job is not None and not job.done:
            col.operator("ex4d.cancel_job", icon="CANCEL")


class EX4D_PT_farm(panel_base.SubPanel, bpy.types.Panel):
    """Submit to Farm beside Generate, and the scene's last submissions (state, progress, Load / Cancel)."""

    bl_label = "Farm"
    bl_idname = "EX4D_PT_farm"
    SHOWN = 5  # the newest submissions listed

    def draw(self, context):
        s, farm = context.scene.ex4d, context.scene.ex4d_farm
        layout = self.layout
        row = layout.row(align=True)
        row.prop(s, "generator", text="")
        op = row.operator("ex4d.submit_farm", icon="NETWORK_DRIVE")
        op.generator = s.generator
        pref = props.prefs(context)
        if pref is not None:
            text = str(iface_("Engine: {}, project: {}")).format(
                pref.farm_engine, pref.farm_project_dir or iface_("the .blend's folder")
            )
            layout.label(text=text, translate=False)
        row = layout.row()
        row.prop(farm, "auto_load")
        row.operator("ex4d.farm_refresh", text="", icon="FILE_REFRESH").index = -1
        n = len(farm.submissions)
        for i in range(n - 1, max(-1, n - 1 - self.SHOWN), -1):
            item = farm.submissions[i]
            box = layout.box()
            name = item.sub_id or item.engine
            box.label(text=str(iface_("{}: {}")).format(name, item.state), translate=False)
            if item.engine == "ray":
                box.prop(item, "progress", text=item.message[:60] or iface_("Progress"), slider=True, translate=False)
                row = box.row(align=True)
                if item.state == "done":
                    row.operator(
                        "ex4d.farm_load", text="Load" if not item.loaded else "Reload", icon="SEQUENCE"
                    ).index = i
                elif item.state not in ("failed", "cancelled"):
                    row.operator("ex4d.farm_cancel", text="Cancel", icon="CANCEL").index = i
            elif item.message:
                _lines(box, item.message, "FILE")


CLASSES = (EX4D_PT_main, EX4D_PT_jobs, EX4D_PT_farm)


def register() -> None:
    props.register_classes(CLASSES)


def unregister() -> None:
    props.unregister_classes(CLASSES)
