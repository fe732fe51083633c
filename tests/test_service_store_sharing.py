"""Two ``ex4d serve`` processes on one job store (the default store is shared by every Blender instance).

Ground truth: the frames the first service stores are the clip's own lossless PNG frames.
"""

from __future__ import annotations

import numpy as np
import pytest
import service_fixtures as sf


@pytest.mark.slow
def test_second_serve_does_not_break_the_first(tmp_path):
    """Service A is in the middle of writing a stage when service B starts on the same store. B's start-up
    clean-up must leave A's live temporary folder alone, A's result must be complete, and both must reuse it.
    Fails where start-up deletes every ``.partial-*`` folder (A then commits a folder holding only
    meta.json, and every later job on that footage fails) or where a deleted temporary is committed."""
    clip = sf.make_clip(tmp_path / "data")
    store = tmp_path / "store"
    a = sf.start_client(store, [clip.root], env={"EX4D_SERVICE_WRITE_DELAY": "8"})
    b = None
    try:
        params = {k: v for k, v in clip.params().items() if k != "focal_px"}
        req = a.submit("estimate_depth", params)
        sf.wait_for(a, lambda: list(store.glob("cache/.frames-*.partial-*/frames.npy")), what="A writing frames")
        b = sf.start_client(store, [clip.root])
        ready = lambda: any("ex4d serve ready" in line for line in b.stderr_tail(50))  # noqa: E731
        sf.wait_for(b, ready, what="B started (its start-up clean-up is over)")
        assert list(store.glob("cache/.frames-*.partial-*")), "B removed A's work in progress"
        a.wait(req, 120)
        r = req.raise_for_error()
        np.testing.assert_array_equal(np.load(r["frames_npy"]), clip.frames)
        again = b.request("estimate_depth", {**params, "depth": {**params["depth"], "scale": 2.0}}, timeout=120)
        assert again["frames_npy"] == r["frames_npy"]  # the frames stage is reused, not recomputed
        np.testing.assert_array_equal(np.load(again["frames_npy"]), clip.frames)
    finally:
        a.close()
        if b is not None:
            b.close()
