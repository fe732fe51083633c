"""The Shot History sub-panel: a UIList of the shot's versions (``history``) with a thumbnail, and the
operators ``ex4d.history_refresh``, ``ex4d.history_load(index)``, ``ex4d.history_rerun(index)`` and
``ex4d.history_delete(index)`` (a confirm dialog; the version moves to the shot's ``.trash`` folder).

``draw`` reads only ``scene.ex4d_history`` (filled by the refresh operator and after each generation) and
the icon ids of previews loaded by the refresh: no file I/O on redraw. Blender loads the previews'
pixels lazily (``bpy.utils.previews``, deferred).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bpy
import bpy.utils.previews
from bpy.props import CollectionProperty, IntProperty, PointerProperty, StringProperty

from . import compat, data, history, outputs, panel_base, props, results_scene, strips

_previews: Any = None
POLL_S = 0.5  # how often a timer looks for finished thumbnails


class EX4D_HistoryItem(bpy.types.PropertyGroup):
    """One version of the shot (``scene.ex4d_history.versions``): what the list shows."""

    path: StringProperty(name="Folder", subtype="DIR_PATH")  # type: ignore[valid-type]
    generator: StringProperty(name="Generator")  # type: ignore[valid-type]
    seed: IntProperty(name="Seed")  # type: ignore[valid-type]
    steps: IntProperty(name="Steps")  # type: ignore[valid-type]
    prompt: StringProperty(name="Prompt")  # type: ignore[valid-type]
    date: StringProperty(name="Date")  # type: ignore[valid-type]
    camera_hash: StringProperty(name="Camera Hash")  # type: ignore[valid-type]
    thumbnail: StringProperty(name="Thumbnail")  # type: ignore[valid-type]  # "<png path>?<mtime ns>": the preview key
    sidecar: StringProperty(name="Settings")  # type: ignore[valid-type]  # the sidecar as JSON text


class EX4D_HistorySettings(bpy.types.PropertyGroup):
    versions: CollectionProperty(type=EX4D_HistoryItem)  # type: ignore[valid-type]
    index: IntProperty(name="Version", default=0)  # type: ignore[valid-type]


def shot_dir(context) -> Path:
    root, _ = outputs.output_root(context)
    return root / outputs.shot_name(context)


def refresh(context) -> int:
    """Re-read the shot's versions into ``scene.ex4d_history`` and load their thumbnails' previews (lazily:
    Blender reads the pixels when an icon is first drawn). Returns the number of versions."""
    h = context.scene.ex4d_history
    found = history.list_versions(shot_dir(context)) if context.scene.ex4d.footage_path else []
    h.versions.clear()
    for meta in found:
        item = h.versions.add()
        item.name = Path(meta["path"]).name
        item.path = meta["path"]
        item.generator = str(meta.get("generator", ""))
        item.seed, item.steps = int(meta.get("seed", 0)), int(meta.get("steps", 0))
        item.prompt, item.date = str(meta.get("prompt", "")), str(meta.get("date", ""))
        item.camera_hash = str(meta.get("camera_hash", ""))
        item.thumbnail = meta.get("thumbnail_file", "")
        if item.thumbnail:  # the preview's key changes when the file does (never a stale icon)
            item.thumbnail += f"?{Path(item.thumbnail).stat().st_mtime_ns}"
        item.sidecar = json.dumps({k: v for k, v in meta.items() if k not in ("path", "thumbnail_file")})
        if item.thumbnail and _previews is not None and item.thumbnail not in _previews:
            _previews.load(item.thumbnail, item.thumbnail.rsplit("?", 1)[0], "IMAGE")
    h.index = min(max(h.index, 0), max(len(h.versions) - 1, 0))
    return len(h.versions)


def icon_id(item) -> int:
    """The thumbnail's preview icon (0: none yet). No I/O: only previews loaded by ``refresh``."""
    if _previews is None or not item.thumbnail or item.thumbnail not in _previews:
        return 0
    return _previews[item.thumbnail].icon_id


def after_generate(context) -> None:
    """Refresh the list now, and again once the thumbnail threads are done (a timer on the main thread)."""
    refresh(context)
    scene_name = context.scene.name

    def poll():
        if history.thumbnails_pending():
            return POLL_S
        scene = bpy.data.scenes.get(scene_name)
        if scene is not None:
            refresh(SimpleNamespace(scene=scene))  # what ``refresh`` reads of a context
        return None

    bpy.app.timers.register(poll, first_interval=POLL_S)


def backend_python(job) -> str | None:
    """The Python that runs the backend (the job's client's, else the preferences'; farm results have no
    local client): it writes the thumbnail."""
    client = getattr(job, "client", None)
    if client is not None and getattr(client, "python", None):
        return client.python
    pref = props.prefs()
    python, _ = props.find_backend_python(pref.backend_python if pref else "")
    return python or None


def _item(context, index: int):
    versions = context.scene.ex4d_history.versions
    if not 0 <= index < len(versions):
        return None
    return versions[index]


class _VersionOperator:
    index: IntProperty(name="Version", default=-1)  # type: ignore[valid-type]  # -1: the selected one

    def item(self, context):
        i = self.index if self.index >= 0 else context.scene.ex4d_history.index
        return _item(context, i)

    @classmethod
    def poll(cls, context):
        return len(context.scene.ex4d_history.versions) > 0


class EX4D_OT_history_refresh(bpy.types.Operator):
    """Re-read this shot's versions from its output folder"""

    bl_idname = "ex4d.history_refresh"
    bl_label = "Refresh Shot History"
    bl_options = {"REGISTER"}

    def execute(self, context):
        n = refresh(context)
        self.report({"INFO"}, f"EX-4D: {n} version(s) of this shot")
        return {"FINISHED"}


class EX4D_OT_history_load(_VersionOperator, bpy.types.Operator):
    """Load this version into the sequencer (a new image strip on a free channel)"""

    bl_idname = "ex4d.history_load"
    bl_label = "Load Version"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        item = self.item(context)
        if item is None or not Path(item.path).is_dir():
            self.report({"ERROR"}, "EX-4D: that version's folder is missing (refresh the history)")
            return {"CANCELLED"}
        meta = json.loads(item.sidecar or "{}")
        files = [f for f in data.sorted_images(item.path) if f.name.startswith("frame_")]
        if not files:
            self.report({"ERROR"}, f"EX-4D: {item.name} holds no frames")
            return {"CANCELLED"}
        start = int(meta.get("frame_start", context.scene.frame_start))
        settings = {k: v for k, v in meta.items() if k not in ("thumbnail", "folder")}
        settings.setdefault("kind", strips.RESULT_KIND)
        strip = strips.add_image_strip(results_scene.target(context.scene), f"EX4D {item.name}", files, start, settings)
        results_scene.place(context.scene, strip)
        self.report({"INFO"}, f"EX-4D: {item.name} loaded as strip '{strip.name}'")
        return {"FINISHED"}


class EX4D_OT_history_rerun(_VersionOperator, bpy.types.Operator):
    """Fill the Generate settings (generator, prompt, seed, steps, CFG, shift, size) from this version,
    to edit them and press Generate"""

    bl_idname = "ex4d.history_rerun"
    bl_label = "Re-run with Edits"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        item = self.item(context)
        if item is None:
            return {"CANCELLED"}
        fields = history.rerun_settings(json.loads(item.sidecar or "{}"))
        for group, values in fields.items():
            target = getattr(context.scene, group)
            for name, value in values.items():
                setattr(target, name, value)
        cam = bpy.data.objects.get(json.loads(item.sidecar or "{}").get("camera", ""))
        note = ""
        if cam is not None and cam.type == "CAMERA":
            context.scene.ex4d.novel_camera = cam
        else:
            note = " (its camera is gone: choose the Novel Camera)"
        self.report({"INFO"}, f"EX-4D: the settings of {item.name} are filled in: edit them and press Generate{note}")
        return {"FINISHED"}


class EX4D_OT_history_delete(_VersionOperator, bpy.types.Operator):
    """Move this version (frames, settings, thumbnail, job file) to the shot's .trash folder, after a
    confirmation; its strips are removed from the sequencer"""

    bl_idname = "ex4d.history_delete"
    bl_label = "Delete Version"
    bl_options = {"REGISTER", "UNDO"}

    def invoke(self, context, event):
        return context.window_manager.invoke_confirm(self, event)

    def execute(self, context):
        item = self.item(context)
        if item is None or not Path(item.path).is_dir():
            self.report({"ERROR"}, "EX-4D: that version's folder is missing (refresh the history)")
            return {"CANCELLED"}
        folder = str(Path(item.path).resolve())
        holder = results_scene.strips_scene(context.scene)
        for st in list(strips.strips_where(holder, kind=strips.RESULT_KIND)):
            if strips.strip_folder(st) == folder:
                compat.vse_strips(holder).remove(st)
        trash = history.trash_version(Path(item.path))
        refresh(context)
        self.report({"INFO"}, f"EX-4D: {Path(folder).name} moved to {trash}")
        return {"FINISHED"}


class EX4D_UL_versions(bpy.types.UIList):
    def draw_item(  # noqa: PLR0913 - Blender's signature
        self, context, layout, data, item, icon, active_data, active_property, index=0, flt_flag=0
    ):  # noqa: ARG002
        row = layout.row(align=True)
        icon_value = icon_id(item)
        label = f"{item.name}  seed {item.seed}  {item.date[:16].replace('T', ' ')}"
        if icon_value:
            row.label(text=label, icon_value=icon_value, translate=False)
        else:
            row.label(text=label, icon="IMAGE_DATA", translate=False)


class EX4D_PT_history(panel_base.SubPanel, bpy.types.Panel):
    bl_idname = "EX4D_PT_history"
    bl_label = "Shot History"

    def draw(self, context):
        layout = self.layout
        h = context.scene.ex4d_history
        row = layout.row()
        row.template_list("EX4D_UL_versions", "", h, "versions", h, "index", rows=3)
        col = row.column(align=True)
        col.operator("ex4d.history_refresh", text="", icon="FILE_REFRESH")
        col.operator("ex4d.history_load", text="", icon="SEQUENCE").index = -1
        col.operator("ex4d.history_rerun", text="", icon="RECOVER_LAST").index = -1
        col.operator("ex4d.history_delete", text="", icon="TRASH").index = -1
        item = _item(context, h.index)
        if item is not None:
            icon_value = icon_id(item)
            if icon_value:
                layout.template_icon(icon_value=icon_value, scale=6.0)
            layout.label(text=f"{item.generator}, {item.steps} steps, seed {item.seed}", translate=False)
            if item.prompt:
                layout.label(text=item.prompt[:80], translate=False)


CLASSES = (
    EX4D_HistoryItem,
    EX4D_HistorySettings,
    EX4D_OT_history_refresh,
    EX4D_OT_history_load,
    EX4D_OT_history_rerun,
    EX4D_OT_history_delete,
    EX4D_UL_versions,
    EX4D_PT_history,
)


def register() -> None:
    global _previews
    props.register_classes(CLASSES)
    bpy.types.Scene.ex4d_history = PointerProperty(type=EX4D_HistorySettings)  # type: ignore[attr-defined]
    _previews = bpy.utils.previews.new()


def unregister() -> None:
    global _previews
    if _previews is not None:
        bpy.utils.previews.remove(_previews)
        _previews = None
    del bpy.types.Scene.ex4d_history  # type: ignore[attr-defined]
    props.unregister_classes(CLASSES)
