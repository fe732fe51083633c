"""Footage decoding bounds and the encoder's reproducibility (issue 17 items 10 and 12), in subprocesses so
memory and CPU affinity are those of a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

PEAK = r"""
import resource, sys
import numpy as np
from ex4d_backend.footage import read_footage
read_footage(sys.argv[1], max_frames=1, max_side=64)  # warm: codecs, cv2, buffers
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
f = read_footage(sys.argv[1], max_side=64)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f.frames.shape[0], f.frames.shape[1], f.frames.shape[2], (after - before) // 1024)
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_frames_are_resized_while_decoding(tmp_path):
    """40 frames of 1024 x 1024 read with max_side 64: the peak memory grows by less than 25 MiB (the
    full-resolution frames take 120 MiB; 27cafcc grew 51 MiB). Fails where every frame is decoded and kept at full size before resizing."""
    import av

    path = tmp_path / "big.mp4"
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=24)
        s.width = s.height = 1024
        s.pix_fmt = "yuv420p"
        s.options = {"preset": "ultrafast", "crf": "30"}
        ramp = np.linspace(0, 255, 1024).astype(np.int64)
        for i in range(40):
            img = np.ascontiguousarray(np.broadcast_to(((ramp[None, :, None] + 5 * i) % 256), (1024, 1024, 3)))
            for p in s.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    out = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, env=_env())
    assert out.returncode == 0, out.stderr
    t, h, w, grew_mib = map(int, out.stdout.split())
    assert (t, h, w) == (40, 64, 64)
    assert grew_mib < 25, f"peak memory grew by {grew_mib} MiB"


ENCODE = r"""
import os, sys
import numpy as np
if sys.argv[2] == "one-cpu":
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
from ex4d_backend.footage import write_video
rng = np.random.default_rng(0)
frames = (rng.random((24, 128, 160, 3)) * 255).astype(np.uint8)
write_video(sys.argv[1], frames, 24)
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to vary the core count")
def test_encode_does_not_depend_on_the_core_count(tmp_path):
    """The same frames encoded by a process on one CPU and by one on all CPUs decode to identical pixels.
    Fails where x264 picks its thread count from the machine (a different stream, pixels up to 44 apart)."""
    from ex4d_backend.footage import read_footage

    decoded = []
    for mode in ("one-cpu", "all-cpus"):
        path = tmp_path / f"{mode}.mp4"
        subprocess.run([sys.executable, "-c", ENCODE, str(path), mode], check=True, env=_env())
        decoded.append(read_footage(path, max_side=None).frames)
    np.testing.assert_array_equal(decoded[0], decoded[1])
