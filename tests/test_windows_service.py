"""The service's generate job over windows (issue 14), through a real ``ex4d serve`` subprocess and the
preview generator: every guide frame at the guide's fps, the documented auto size, the composite at the
guide's resolution, and a cancelled job that resumes at the next window with the uninterrupted result."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import service_fixtures as sf

N_FRAMES = 13  # window 9 (overlap 1 -> moved back: windows [0, 9) and [4, 13)): two windows
WINDOW = 9


def _read(folder: str | Path, channels: int = 3) -> np.ndarray:
    from ex4d_backend.pipeline.stages import read_png_folder

    return read_png_folder(Path(folder), channels)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A 16:9 clip (64 x 36) and a service on a fresh store."""
    root = tmp_path_factory.mktemp("win")
    clip = sf.make_clip(root / "data", width=64, height=36, n_frames=N_FRAMES)
    client = sf.start_client(root / "store", [clip.root])
    yield clip, client, root
    client.close()


def _params(clip: sf.Clip, **extra) -> dict:
    return clip.params(
        camera={"preset": "90"}, renderer="cpu", generator="preview", num_frames=WINDOW, resize="stretch", **extra
    )


def _pngs(folder: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted(Path(folder).glob("*.png"))]


def _ranked_source(result: np.ndarray, guide: np.ndarray, mask: np.ndarray) -> list[int]:
    """For each result frame, the guide frame it matches best (mean error over the seen pixels of the
    lower half, where the preview keeps the guide's colour and draws no label)."""
    h, w = result.shape[1:3]
    big = np.stack([cv2.resize(g, (w, h), interpolation=cv2.INTER_LINEAR) for g in guide]).astype(np.int16)
    seen = np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST) == 255 for m in mask])
    rows = slice(h // 2, None)
    out = []
    for r in result.astype(np.int16):
        errs = [np.abs(r[rows] - g[rows])[s[rows]].mean() for g, s in zip(big, seen, strict=True)]
        out.append(int(np.argmin(errs)))
    return out


def test_a_guide_longer_than_a_window_gives_every_frame(served):
    """A 13-frame guide with a 9-frame window: 13 result frames at the guide's fps, frame k made from
    guide frame k (linspace sampling, a misplaced window or dropped overlap frames would break the
    match), at the documented auto size for 16:9 (832 x 480), with a composite at the guide's 64 x 36
    that equals the guide where the source saw (away from the feathered edge)."""
    clip, client, _ = served
    req, events = sf.run(client, "generate", _params(clip), timeout=300)
    r = req.raise_for_error()
    sf.check_progress_order(
        events,
        ["inputs", "frames", "depth", "camera", "render", "write", "window", "preview", "save"],
        ("window", "preview"),
    )
    windows = [e for e in events if e["event"] == "progress" and e["stage"] == "window"]
    assert [(e["step"], e["total"]) for e in windows] == [(0, 2), (1, 2), (1, 2), (2, 2)]
    assert windows[2]["message"].startswith("window 2 of 2")
    assert any(e["stage"] == "preview" and e["message"].startswith("window 2 of 2:") for e in events if "stage" in e)
    assert r["n_frames"] == N_FRAMES and r["source_frames"] == list(range(N_FRAMES))
    assert r["size"] == [832, 480] and (r["width"], r["height"]) == (832, 480)
    assert r["plan"]["windows"] == [[0, 9, 0, 0], [4, 13, 5, 5]]
    frames = _read(r["frames_dir"])
    assert frames.shape == (N_FRAMES, 480, 832, 3)
    guide = _read(Path(r["guide_dir"]) / "color")
    mask = _read(Path(r["guide_dir"]) / "mask", 1)
    assert _ranked_source(frames, guide, mask) == list(range(N_FRAMES))
    cap = cv2.VideoCapture(r["video_mp4"])
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(r["fps"], rel=1e-3) and r["fps"] > 0
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == N_FRAMES
    cap.release()
    comp = _read(r["composite_dir"])
    assert comp.shape == (N_FRAMES, 36, 64, 3) and r["composite_size"] == [64, 36]
    inner = np.stack([cv2.erode((m == 255).astype(np.uint8), np.ones((9, 9), np.uint8)) for m in mask]) > 0
    inner[:, :20] = False  # the PREVIEW label (top left)
    assert inner.sum() > 100
    np.testing.assert_array_equal(comp[inner], guide[inner])
    assert Path(r["composite_mp4"]).stat().st_size > 0


@pytest.mark.slow
def test_cancelled_job_resumes_at_the_next_window(served):
    """A slow service (a delay per progress step) cancelled after window 1 of 2 was cached: the same job
    run again takes window 1 from the store, generates only window 2, and its frames and composite have
    the bytes of the uninterrupted run (the first test's service, another store). Wrong code (windows not
    cached, the cache keyed on something that changes, a partial window kept) fails here."""
    clip, client, root = served
    params = _params(clip)
    clean = client.submit("generate", params)
    client.wait(clean, 300)
    clean = clean.raise_for_error()
    slow = sf.start_client(root / "store2", [clip.root], env={"EX4D_SERVICE_STEP_DELAY": "0.05"})
    try:
        a = slow.submit("generate", params)
        sf.wait_for(
            slow, lambda: a.progress is not None and a.progress[0] == "preview" and "window 2 of 2" in a.progress[3],
            timeout=240, what="window 2 started",
        )  # fmt: skip
        slow.cancel(a.id)
        slow.wait(a, 120)
        assert a.error is not None and a.error["code"] == "cancelled", a.error
        assert len(list((root / "store2").glob("cache/window-*/meta.json"))) == 1
        b = slow.submit("generate", params)
        slow.wait(b, 300)
        r = b.raise_for_error()
    finally:
        slow.close()
    assert [(w["index"], w["cached"]) for w in r["windows"]] == [(0, True), (1, False)]
    assert r["cached"]["guide"] is True and r["cached"]["generate"] is False
    forced = client.submit("generate", {**params, "force": True})  # force: every window generated again
    client.wait(forced, 300)
    forced = forced.raise_for_error()
    assert [(w["index"], w["cached"]) for w in forced["windows"]] == [(0, False), (1, False)]
    assert _pngs(forced["frames_dir"]) == _pngs(clean["frames_dir"])
    for name in ("frames_dir", "composite_dir"):
        ours, ref = sorted(Path(r[name]).glob("*.png")), sorted(Path(clean[name]).glob("*.png"))
        assert [p.name for p in ours] == [p.name for p in ref] and len(ours) == N_FRAMES
        assert all(p.read_bytes() == q.read_bytes() for p, q in zip(ours, ref, strict=True)), name
