"""A full disk under ``ex4d serve`` (issue 17 item 6): a clear ``disk_full`` error, the service survives,
nothing half-written is left. Two real ways to run out of space: a small tmpfs holding the store (needs
root to mount; skipped elsewhere) and a file size limit (``ulimit -f``, works for anyone).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import service_fixtures as sf


def _check_survives(client, clip, store: Path, req) -> None:
    assert req.error is not None, "the job succeeded on a full disk"
    assert req.error["code"] == "disk_full", req.error
    assert req.error["hint"] and "free" in (req.error["hint"] + req.error["message"])
    assert client.request("hello", timeout=60)["protocol"]  # still alive
    assert not [p for p in (store / "cache").glob(".*partial*")], "a partial result was left"
    for d in (store / "cache").glob("*-*"):  # what is there is complete and intact
        assert (d / "meta.json").is_file()


@pytest.mark.slow
def test_full_tmpfs_store(tmp_path):
    """The store lives on an 8 MiB tmpfs; the DW-mesh stage needs ~15 MiB. Fails where the mesh is written
    through a sparse memory map (the service dies with SIGBUS: backend_died) or ENOSPC is reported as
    internal."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    store = tmp_path / "store"
    store.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(store)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        clip = sf.make_clip(tmp_path / "data", width=256, height=192, n_frames=10, focal_px=240.0)
        client = sf.start_client(store, [clip.root])
        try:
            req, _ = sf.run(client, "build_dwmesh", clip.params(), timeout=180)
            _check_survives(client, clip, store, req)
        finally:
            client.close()
    finally:
        subprocess.run(["umount", "-l", str(store)])


@pytest.mark.slow
def test_file_size_limit(tmp_path):
    """The service runs under ``ulimit -f`` (4 MiB per file): writing the mesh fails with EFBIG, reported as
    disk_full. Fails where EFBIG becomes an internal error or a SIGBUS/SIGXFSZ kills the service."""
    wrapper = tmp_path / "python_limited"
    wrapper.write_text(f'#!/bin/sh\nulimit -f 4096\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    clip = sf.make_clip(tmp_path / "data", width=256, height=192, n_frames=10, focal_px=240.0)
    store = tmp_path / "store"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(sf.REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    client = sf.bc.BackendClient(str(wrapper), store=store, allow=[clip.root], env=env, cwd=str(sf.REPO))
    client.start()
    try:
        req, _ = sf.run(client, "build_dwmesh", clip.params(), timeout=180)
        _check_survives(client, clip, store, req)
    finally:
        client.close()
