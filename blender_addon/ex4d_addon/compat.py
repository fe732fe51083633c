"""The few API differences between Blender 4.2 LTS and 5.0, in one place.

- VSE: ``sequence_editor.strips`` (5.0) vs ``sequence_editor.sequences`` (4.2); ``strips_all`` vs
  ``sequences_all``.
- Actions: layered actions with channelbags (4.4+, the only API in 5.0) vs ``action.fcurves`` (4.2).
- EEVEE's engine name: ``BLENDER_EEVEE_NEXT`` (4.2-4.x) vs ``BLENDER_EEVEE`` (5.0).
- FFMPEG output: 5.0 needs ``image_settings.media_type = 'VIDEO'`` before ``file_format = 'FFMPEG'``.
"""

from __future__ import annotations

import bpy

BLENDER_VERSION: tuple[int, int, int] = tuple(bpy.app.version)  # type: ignore[assignment]


def vse_strips(scene: bpy.types.Scene):
    """The top-level strip collection of the scene's sequence editor (created if missing)."""
    sed = scene.sequence_editor or scene.sequence_editor_create()
    return sed.strips if hasattr(sed, "strips") else sed.sequences


def vse_strips_all(scene: bpy.types.Scene) -> list:
    """Every strip of the scene (also inside meta strips); empty without a sequence editor."""
    sed = scene.sequence_editor
    if sed is None:
        return []
    return list(sed.strips_all if hasattr(sed, "strips_all") else sed.sequences_all)


def action_fcurves(obj_or_data: bpy.types.ID) -> list:
    """The F-curves animating ``obj_or_data`` (an object or camera data), whatever the action API."""
    anim = obj_or_data.animation_data
    if anim is None or anim.action is None:
        return []
    action = anim.action
    slot = getattr(anim, "action_slot", None)
    if slot is not None and hasattr(action, "layers"):
        try:
            from bpy_extras import anim_utils

            bag = anim_utils.action_get_channelbag_for_slot(action, slot)
            return list(bag.fcurves) if bag is not None else []
        except (ImportError, AttributeError):
            pass
        for layer in action.layers:
            for strip in layer.strips:
                bag = strip.channelbag(slot)
                if bag is not None:
                    return list(bag.fcurves)
        return []
    return list(action.fcurves)


def eevee_engine() -> str:
    """EEVEE's render engine identifier in this Blender."""
    items = bpy.types.RenderSettings.bl_rna.properties["engine"].enum_items.keys()
    return "BLENDER_EEVEE_NEXT" if "BLENDER_EEVEE_NEXT" in items else "BLENDER_EEVEE"


def set_ffmpeg_output(scene: bpy.types.Scene) -> None:
    """Make the scene render to an FFMPEG (H.264 mp4) movie."""
    settings = scene.render.image_settings
    if hasattr(settings, "media_type"):
        settings.media_type = "VIDEO"
    settings.file_format = "FFMPEG"
    scene.render.ffmpeg.format = "MPEG4"
    scene.render.ffmpeg.codec = "H264"
