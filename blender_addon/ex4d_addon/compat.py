"""The few API differences between Blender 4.2 LTS, 4.5 LTS, 5.0 and 5.2, in one place.

- VSE: ``sequence_editor.strips`` (5.0) vs ``sequence_editor.sequences`` (4.2); ``strips_all`` vs
  ``sequences_all``; a strip's ``content_trim_*`` (5.1) vs ``animation_offset_*``.
- Actions: layered actions with channelbags (4.4+, the only API in 5.0) vs ``action.fcurves`` (4.2).
- EEVEE's engine name: ``BLENDER_EEVEE_NEXT`` (4.2-4.x) vs ``BLENDER_EEVEE`` (5.0).
- A strip's timeline range: ``left_handle`` / ``right_handle`` / ``duration`` vs ``frame_final_start`` /
  ``frame_final_end`` / ``frame_final_duration`` (deprecated in 5.2: a DeprecationWarning on every access).
- FFMPEG output: 5.0 needs ``image_settings.media_type = 'VIDEO'`` before ``file_format = 'FFMPEG'``.
"""

from __future__ import annotations

from typing import Any

import bpy

BLENDER_VERSION: tuple[int, int, int] = tuple(bpy.app.version)  # type: ignore[assignment]


def blend_relative_path_options() -> set[str]:
    """The options a path property needs to keep a "//" path (relative to the .blend): 5.0 warns without
    ``PATH_SUPPORTS_BLEND_RELATIVE``, 4.2 refuses the option. Found by registering a throwaway class."""
    opts = {"PATH_SUPPORTS_BLEND_RELATIVE"}

    prop = bpy.props.StringProperty(subtype="FILE_PATH", options=opts)
    probe: Any = type("EX4D_PG_path_probe", (bpy.types.PropertyGroup,), {"__annotations__": {"path": prop}})
    try:
        bpy.utils.register_class(probe)
    except (ValueError, TypeError, RuntimeError):
        return set()
    bpy.utils.unregister_class(probe)
    return opts


def first_attr(obj: Any, *names: str) -> Any:
    """The first of ``names`` that ``obj`` has (a renamed API: the new name first, then the old ones)."""
    for name in names:
        if hasattr(obj, name):
            return getattr(obj, name)
    raise AttributeError(f"{type(obj).__name__} has none of {names}")


def vse_strips(scene: bpy.types.Scene) -> Any:
    """The top-level strip collection of the scene's sequence editor (created if missing)."""
    sed = scene.sequence_editor or scene.sequence_editor_create()
    return first_attr(sed, "strips", "sequences")  # 5.0 renamed sequences -> strips


def vse_strips_all(scene: bpy.types.Scene) -> list:
    """Every strip of the scene (also inside meta strips); empty without a sequence editor."""
    sed = scene.sequence_editor
    if sed is None:
        return []
    return list(first_attr(sed, "strips_all", "sequences_all"))


def strip_content_trim(strip: Any) -> tuple[int, int]:
    """(start, end) frames trimmed off a strip's content: ``content_trim_*`` (5.1+), ``animation_offset_*``
    before (the same values)."""
    names = (("content_trim_start", "animation_offset_start"), ("content_trim_end", "animation_offset_end"))
    return tuple(int(first_attr(strip, *n)) for n in names)  # type: ignore[return-value]


def strip_frame_range(strip: Any) -> tuple[int, int]:
    """(first frame, first frame after) a strip shows on the timeline, handles applied: ``left_handle`` /
    ``right_handle`` (5.x; ``frame_final_start`` / ``frame_final_end`` warn in 5.2, removed in 6.0), the old
    names before."""
    names = (("left_handle", "frame_final_start"), ("right_handle", "frame_final_end"))
    return tuple(int(first_attr(strip, *n)) for n in names)  # type: ignore[return-value]


def strip_duration(strip: Any) -> int:
    """Frames a strip shows, handles applied: ``duration`` (5.x), ``frame_final_duration`` before."""
    return int(first_attr(strip, "duration", "frame_final_duration"))


def action_fcurves(obj_or_data: bpy.types.ID) -> list:
    """The F-curves animating ``obj_or_data`` (an object or camera data), whatever the action API."""
    anim: Any = getattr(obj_or_data, "animation_data", None)
    if anim is None or anim.action is None:
        return []
    action = anim.action
    slot = getattr(anim, "action_slot", None)
    if slot is not None and hasattr(action, "layers"):
        try:
            from bpy_extras import anim_utils

            name = "action_get_channelbag_for_slot"  # 4.4+ (4.2's API lacks it)
            get_bag: Any = getattr(anim_utils, name)
            bag = get_bag(action, slot)
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
    engine: Any = bpy.types.RenderSettings.bl_rna.properties["engine"]
    items = engine.enum_items.keys()
    return "BLENDER_EEVEE_NEXT" if "BLENDER_EEVEE_NEXT" in items else "BLENDER_EEVEE"


def set_ffmpeg_output(scene: bpy.types.Scene) -> None:
    """Make the scene render to an FFMPEG (H.264 mp4) movie."""
    settings = scene.render.image_settings
    if hasattr(settings, "media_type"):
        settings.media_type = "VIDEO"
    settings.file_format = "FFMPEG"
    scene.render.ffmpeg.format = "MPEG4"
    scene.render.ffmpeg.codec = "H264"


def set_modifier_input(mod: Any, identifier: str, value: Any) -> None:
    """Set a Geometry Nodes modifier's group input ``identifier`` (``Socket_N``): Blender 5.2 moved the
    inputs from ID properties on the modifier (``mod["Socket_1"]``) to ``mod.properties.inputs.Socket_1.value``."""
    inputs = getattr(getattr(mod, "properties", None), "inputs", None)
    if inputs is not None and hasattr(inputs, identifier):
        getattr(inputs, identifier).value = value
    else:
        mod[identifier] = value


def strip_content_start(strip: Any) -> int:
    """The scene frame of a strip's first content frame: ``content_start`` (5.2; ``frame_start`` warns
    there, removed in 6.0), ``frame_start`` before."""
    return int(first_attr(strip, "content_start", "frame_start"))
