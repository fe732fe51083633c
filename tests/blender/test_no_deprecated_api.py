"""Blender 5.2 deprecates a strip's ``frame_final_start`` / ``frame_final_end`` / ``frame_final_duration``
(a DeprecationWarning on every access, removal in 6.0): the add-on reads a strip's range through
``compat.strip_frame_range`` / ``compat.strip_duration`` (``left_handle`` / ``right_handle`` / ``duration``
where they exist) and its strip code runs without a DeprecationWarning in any supported Blender."""

from __future__ import annotations

import warnings
from pathlib import Path

import bpy
from conftest import addon_module


def _addon_warnings(caught: list, addon_dir: Path) -> list[str]:
    root = addon_dir.resolve()
    return [
        f"{Path(w.filename).name}:{w.lineno}: {w.message}"
        for w in caught
        if issubclass(w.category, DeprecationWarning) and root in Path(w.filename).resolve().parents
    ]


def test_strip_code_uses_no_deprecated_api(scene, clip):
    """Strips added on overlapping frames (free_channel reads every strip's range), found, read and removed:
    no DeprecationWarning raised from the add-on's files, and the compat readers give the strip's real range
    (start = the frame it was added at, length = its files). Catches a direct ``frame_final_*`` read in the
    add-on (5.2 warns) and a compat reader that picks the wrong attribute (a range off by the length). In 5.2
    the old name must warn from the calling file, else the check proves nothing."""
    compat, strips = addon_module("compat"), addon_module("strips")
    files = sorted(clip["frames_dir"].iterdir())
    addon_dir = Path(compat.__file__).parent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = strips.add_image_strip(scene, "first", files, 5, {"kind": "guide", "camera": "c"})
        b = strips.add_image_strip(scene, "second", files, 6, {})
        assert b.channel == a.channel + 1  # the ranges overlap: a free channel was found through compat
        assert compat.strip_frame_range(a) == (5, 5 + len(files)) and compat.strip_duration(a) == len(files)
        assert strips.strips_where(scene, kind="guide", camera="c") == [a]
        strips.remove_strips(scene, "guide", "c")
    assert not _addon_warnings(caught, addon_dir), _addon_warnings(caught, addon_dir)
    if hasattr(b, "left_handle") and bpy.app.version >= (5, 2, 0):  # the premise: 5.2 warns on the old name
        with warnings.catch_warnings(record=True) as old:
            warnings.simplefilter("always")
            _ = b.frame_final_start
        assert any(issubclass(w.category, DeprecationWarning) and w.filename == __file__ for w in old)
