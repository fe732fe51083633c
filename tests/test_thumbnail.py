"""A result's thumbnail (``ex4d_backend.thumbnail``): the middle frame, long side 192 px, as a PNG."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

from ex4d_backend import thumbnail
from ex4d_backend.errors import Ex4dError
from ex4d_backend.footage import write_png_sequence


def test_thumbnail_is_the_middle_frame_scaled(tmp_path, subprocess_env):
    """5 flat frames of distinct colours (frame_00000 .. frame_00004): the thumbnail is frame 2's colour at
    192 x 128. Fails on the first/last frame or an unscaled copy."""
    colours = [(10 * i, 200 - 30 * i, 50 + i) for i in range(5)]
    frames = np.stack([np.full((200, 300, 3), c, np.uint8) for c in colours])
    write_png_sequence(tmp_path / "v", frames)
    dest = tmp_path / "v.png"
    proc = subprocess.run([sys.executable, "-m", "ex4d_backend.thumbnail", str(tmp_path / "v"), str(dest)],
                          env=subprocess_env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    img = cv2.cvtColor(cv2.imread(str(dest)), cv2.COLOR_BGR2RGB)
    assert img.shape == (128, 192, 3)
    assert (img == np.array(colours[2], np.uint8)).all()
    assert thumbnail.thumbnail(np.zeros((40, 60, 3), np.uint8)).shape == (40, 60, 3)  # small frames stay


def test_thumbnail_of_an_empty_folder_is_one_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Ex4dError):
        thumbnail.write_thumbnail(tmp_path / "empty", tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()
    assert thumbnail.main(["only-one"]) == 2
