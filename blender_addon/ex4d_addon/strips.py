"""Results in the scene: image-sequence strips in the VSE (fitted to the render size, on a free channel,
their folder relative to the .blend) and guide sequences as a camera's background image."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import bpy

from . import compat, data
from .outputs import rel

GUIDE_KIND, RESULT_KIND = "guide", "generate"
COMPOSITE_KIND = "composite"  # the full-resolution composite of a generate result (issue 14)


def free_channel(scene: bpy.types.Scene, start: int, end: int) -> int:
    """The lowest VSE channel with no strip overlapping frames [start, end)."""
    used: set[int] = set()
    for s in compat.vse_strips_all(scene):
        first, after = compat.strip_frame_range(s)
        if first < end and after > start:
            used.add(s.channel)
    ch = 1
    while ch in used:
        ch += 1
    return ch


def add_image_strip(
    scene: bpy.types.Scene,
    name: str,
    files: Sequence[str | os.PathLike],
    frame_start: int,
    settings: dict | None = None,
):
    """An image-sequence strip of ``files`` (same folder) at ``frame_start`` on a free channel, scaled to fit
    the render frame (``fit_method='FIT'``: a 512 x 512 result in a 1920 x 1080 scene fills its height; an
    832 x 480 result or a composite at the footage's aspect fills the frame),
    its folder stored relative to the .blend. ``settings`` become custom properties ``ex4d_<key>``."""
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("no frames to add")
    channel = free_channel(scene, frame_start, frame_start + len(files))
    strips = compat.vse_strips(scene)
    strip = strips.new_image(
        name=name, filepath=str(files[0]), channel=channel, frame_start=int(frame_start), fit_method="FIT"
    )
    for f in files[1:]:
        strip.elements.append(f.name)
    for key, value in (settings or {}).items():
        if isinstance(value, (str, int, float, bool)):
            strip[f"ex4d_{key}"] = value
        else:
            strip[f"ex4d_{key}"] = json.dumps(value)
    directory = rel(bpy.path.abspath(strip.directory).rstrip("/\\"))
    strip.directory = directory + ("" if directory.endswith(("/", "\\")) else "/")
    return strip


def strips_where(scene, **props) -> list:
    """The strips whose ``ex4d_<key>`` custom properties equal ``props``."""
    return [s for s in compat.vse_strips_all(scene) if all(s.get(f"ex4d_{k}") == v for k, v in props.items())]


def strip_folder(strip) -> str:
    return os.path.realpath(bpy.path.abspath(strip.directory))


def remove_strips(scene, kind: str, camera: str) -> None:
    strips = compat.vse_strips(scene)
    for s in strips_where(scene, kind=kind, camera=camera):
        strips.remove(s)


def load_sequence_image(files: list[Path], name: str) -> bpy.types.Image:
    """The image sequence starting at ``files[0]`` (reloaded if it is already loaded), path relative."""
    path = str(files[0])
    for img in bpy.data.images:
        if img.source == "SEQUENCE" and os.path.realpath(bpy.path.abspath(img.filepath)) == os.path.realpath(path):
            img.reload()
            return img
    img = bpy.data.images.load(path, check_existing=False)
    img.source = "SEQUENCE"
    img.name = name
    img.filepath = rel(path)
    return img


def show_on_camera(
    cam_obj, image: bpy.types.Image, frame_start: int, n_frames: int, kind: str = GUIDE_KIND, depth: str = ""
) -> None:
    """Show ``image`` (a sequence) as ``cam_obj``'s background, replacing an earlier EX-4D background of
    the same ``kind`` (the guide's, or a result's); ``depth``: the display depth (``FRONT``/``BACK``) or
    as it is."""
    cam = cam_obj.data
    bg = None
    for b in cam.background_images:
        if b.image is not None and b.image.get("ex4d_kind") == kind:
            bg = b
            break
    if bg is None:
        bg = cam.background_images.new()
    bg.image = image
    image["ex4d_kind"] = kind
    data.configure_image_user(bg.image_user, image, frame_start, n_frames)
    bg.alpha = 1.0
    if depth:
        bg.display_depth = depth
    bg.show_background_image = True
    cam.show_background_images = True
