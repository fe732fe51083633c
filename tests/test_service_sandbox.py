"""Sandbox escapes through ``ex4d serve`` (issue 17 items 1-3, 10): playlists, symlink swaps (TOCTOU), FIFOs,
cancel while hashing, the max_side bound. Ground truth: the outside clip is a flat colour no allowed input
has, so any of its pixels in a result is an escape.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import service_fixtures as sf

from ex4d_backend.footage import write_video

SECRET_VALUE = 201  # the outside clip's flat grey level


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sandbox")
    clip = sf.make_clip(root / "allowed")
    outside = root / "outside"
    outside.mkdir()
    write_video(outside / "secret.mp4", np.full((7, 48, 64, 3), SECRET_VALUE, np.uint8), 24)
    write_video(clip.root / "clip.mp4", clip.frames, 24)
    client = sf.start_client(root / "store", [clip.root], env={"EX4D_SERVICE_STEP_DELAY": "0.3"})
    client.request("hello", timeout=120)
    yield clip, client, root
    client.close()


def _frames_params(clip, footage) -> dict:
    return {"footage": str(footage), "depth": {"model": "file", "path": str(clip.depth_path)}}


def _no_escape(client, req) -> None:
    """The request failed with a user error (never internal), and read nothing of the secret."""
    assert req.error is not None, f"an escape: the job succeeded with {req.result}"
    assert req.error["code"] in ("bad_input", "forbidden_path", "not_found"), req.error
    if req.result and "frames_npy" in req.result:
        assert not (np.load(req.result["frames_npy"]) == SECRET_VALUE).all()


PLAYLISTS = {
    "list.m3u8": "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\n{secret}\n#EXT-X-ENDLIST\n",
    "list_url.m3u8": "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\nfile://{secret}\n#EXT-X-ENDLIST\n",
    "renamed_hls.mp4": "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\n{secret}\n#EXT-X-ENDLIST\n",
    "concat.mp4": "ffconcat version 1.0\nfile link_to_secret.mp4\n",
    "concat_abs.ffconcat": "ffconcat version 1.0\nfile {secret}\n",
    "dash.mpd": '<?xml version="1.0"?><MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static">'
    '<Period><AdaptationSet><Representation id="1" bandwidth="1"><BaseURL>{secret}</BaseURL>'
    "</Representation></AdaptationSet></Period></MPD>",
}


@pytest.mark.parametrize("name", sorted(PLAYLISTS))
def test_playlists_and_lists_are_refused(env, name):
    """Files that make FFmpeg open other files (HLS, DASH, ffconcat; whatever their name) are refused.
    Fails where the container format is not checked, or FFmpeg may open nested files: the outside clip is
    then read and stored."""
    clip, client, root = env
    secret = root / "outside" / "secret.mp4"
    link = clip.root / "link_to_secret.mp4"
    if not link.is_symlink():
        link.symlink_to(secret)
    path = clip.root / name
    path.write_text(PLAYLISTS[name].format(secret=secret))
    for type_ in ("estimate_depth", "probe_footage"):
        params = _frames_params(clip, path) if type_ == "estimate_depth" else {"footage": str(path)}
        req, _ = sf.run(client, type_, params, timeout=60)
        _no_escape(client, req)
        assert req.error["code"] in ("bad_input", "forbidden_path"), req.error


def test_symlink_swap_after_the_check_is_caught(env):
    """TOCTOU: the footage is an allowed video when it is checked and hashed, then (while the job waits at
    its 'reading the footage' step) it is swapped for a symlink to the outside clip. Fails where the reader
    opens the path again by name after the check (it then decodes the outside clip)."""
    clip, client, root = env
    victim = clip.root / "swap.mp4"
    victim.write_bytes((clip.root / "clip.mp4").read_bytes())
    req = client.submit("estimate_depth", _frames_params(clip, victim))
    sf.wait_for(client, lambda: req.done or (req.progress and "reading" in req.progress[3]), what="the read step")
    assert not req.done
    victim.unlink()
    victim.symlink_to(root / "outside" / "secret.mp4")
    client.wait(req, 60)
    _no_escape(client, req)
    assert req.error["code"] == "forbidden_path"


def test_fifo_is_refused_and_the_service_stays_responsive(env):
    """A FIFO as footage, depth file or probe target is refused at once (bad_input), and ``hello`` still
    answers. Fails where the FIFO is opened or read blocking (the hash or the probe hangs the worker)."""
    clip, client, root = env
    fifo = clip.root / "pipe.mp4"
    if not fifo.exists():
        os.mkfifo(fifo)
    t0 = time.monotonic()
    for type_, params in (
        ("probe_footage", {"footage": str(fifo)}),
        ("estimate_depth", _frames_params(clip, fifo)),
        ("estimate_depth", {"footage": str(clip.footage), "depth": {"model": "file", "path": str(fifo)}}),
    ):
        req, _ = sf.run(client, type_, params, timeout=20)
        assert req.error is not None and req.error["code"] == "bad_input", (type_, req.error)
        assert "FIFO" in req.error["message"]
    assert client.request("hello", timeout=20)["protocol"]
    assert time.monotonic() - t0 < 20


def test_cancel_while_hashing_a_large_input(env, tmp_path):
    """Cancel arrives while a 2 GiB input is being hashed: the error comes back within a second. Fails where
    hashing reads the whole file before any cancel check (seconds on any disk)."""
    clip, client, root = env
    big = clip.root / "big.mp4"
    with open(big, "wb") as fh:
        fh.truncate(2 << 30)  # sparse: cheap to make, still 2 GiB to read
    try:
        req = client.submit("estimate_depth", _frames_params(clip, big))
        sf.wait_for(client, lambda: req.progress is not None and req.progress[0] == "inputs", what="inputs step")
        time.sleep(0.5)  # past the step delay: now hashing
        assert not req.done
        t0 = time.monotonic()
        client.cancel(req.id)
        client.wait(req, 30)
        assert req.error is not None and req.error["code"] == "cancelled", req.error
        assert time.monotonic() - t0 < 1.0
    finally:
        big.unlink()


def test_max_side_is_bounded_by_the_schema(env):
    """The schema refuses max_side above what later stages accept (2048) before any work. Fails where 8192
    passes the schema and frames are stored that the mesh or render stage then refuses."""
    clip, client, root = env
    req, _ = sf.run(client, "estimate_depth", {**_frames_params(clip, clip.footage), "max_side": 4096})
    assert req.error is not None and req.error["code"] == "invalid_request", req.error
    assert not list((root / "store" / "cache").glob("frames-*"))


def test_no_escape_left_the_secret_in_the_store(env):
    """After every attack above, no stored frames hold the outside clip (checked last in this module)."""
    clip, client, root = env
    for f in Path(root / "store" / "cache").glob("frames-*/frames.npy"):
        assert not (np.load(f) == SECRET_VALUE).all(), f
