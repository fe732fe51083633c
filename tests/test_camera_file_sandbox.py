"""Camera and bundle files are read through one checked handle (issue 17 item 2): a path that points
outside the allowed folders (a symlink placed or swapped in after the name was checked) is refused on the
opened file, and a FIFO never blocks. At 27cafcc both files were re-opened by name with no check, so the
outside file was read (the symlink case) -- the test then fails on the missing ``forbidden_path``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ex4d_backend import safe_io
from ex4d_backend.cameras import load_camera_file, reference_intrinsics
from ex4d_backend.depth_scale import load_bundles
from ex4d_backend.errors import Ex4dError


def _camera_json(path, n=3):
    path.write_text(json.dumps({"extrinsics": [np.eye(4).tolist()] * n}))
    return path


def test_camera_file_symlinked_outside_the_sandbox_is_refused(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir(), outside.mkdir()
    secret = _camera_json(outside / "cam.json")
    link = allowed / "cam.json"
    link.symlink_to(secret)
    k = reference_intrinsics(64, 48)
    assert len(load_camera_file(secret, 3, 64, 48, default_k=k)) == 3  # readable outside any sandbox (the CLI)
    with safe_io.sandbox([allowed.resolve()]), pytest.raises(Ex4dError) as err:
        load_camera_file(link, 3, 64, 48, default_k=k)
    assert err.value.code == "forbidden_path"
    inside = _camera_json(allowed / "inside.json")
    with safe_io.sandbox([allowed.resolve()]):
        assert len(load_camera_file(inside, 3, 64, 48, default_k=k)) == 3


def test_bundle_file_symlinked_outside_the_sandbox_is_refused(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir(), outside.mkdir()
    np.savez(outside / "b.npz", points=np.zeros((2, 3)), visibility=np.ones((3, 2), bool))
    (allowed / "b.npz").symlink_to(outside / "b.npz")
    with safe_io.sandbox([allowed.resolve()]), pytest.raises(Ex4dError) as err:
        load_bundles(allowed / "b.npz", 3)
    assert err.value.code == "forbidden_path"


def test_camera_fifo_does_not_block(tmp_path):
    fifo = tmp_path / "cam.json"
    os.mkfifo(fifo)
    with pytest.raises(Ex4dError):
        load_camera_file(fifo, 3, 64, 48, default_k=reference_intrinsics(64, 48))
