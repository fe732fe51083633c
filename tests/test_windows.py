"""Long shots as chained windows (``generation/windows.py``): the plan, the chaining, the blend, the
frame count and rate, ``--frame-sampling reference``, cancel and resume after a SIGKILL.

Ground truth: the plan is checked against set arithmetic over the frame indices; the chaining and the
blend against the documented formulas written here literally, applied to what the generator actually
received and returned (a recording wrapper around the real preview generator / the tiny EX-4D).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ex4d_backend.errors import Cancelled, Ex4dError
from ex4d_backend.footage import read_footage, write_png_sequence, write_video
from ex4d_backend.generation.preview import PreviewGenerator
from ex4d_backend.generation.windows import (
    CHAIN_VARIANTS,
    ShotOutputs,
    ShotSettings,
    blend_weights,
    generate_shot,
    plan_windows,
)

REPO = Path(__file__).resolve().parents[1]


def make_guide(n: int, w: int = 64, h: int = 64, seed: int = 0):
    """A guide whose every frame differs (moving gradient + noise) with a moving hole."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    color = np.empty((n, h, w, 3), np.uint8)
    mask = np.full((n, h, w), 255, np.uint8)
    for i in range(n):
        color[i, ..., 0] = (xx * 255 // w + 3 * i) % 256
        color[i, ..., 1] = (yy * 255 // h + 5 * i) % 256
        color[i, ..., 2] = rng.integers(0, 255, (h, w))
        x0 = (2 * i) % (w - w // 4)
        mask[i, h // 4 : h // 2, x0 : x0 + w // 4] = 0
    return color, mask


def write_guide(folder: Path, n: int, w: int = 64, h: int = 64, *, mp4_fps: float | None = None):
    """PNG folders (lossless), or an mp4 colour guide at ``mp4_fps`` with a PNG mask."""
    color, mask = make_guide(n, w, h)
    folder.mkdir(parents=True, exist_ok=True)
    if mp4_fps:
        write_video(folder / "color.mp4", color, mp4_fps)
        c = folder / "color.mp4"
    else:
        write_png_sequence(folder / "color", color)
        c = folder / "color"
    write_png_sequence(folder / "mask", np.repeat(mask[..., None], 3, axis=3))
    return c, folder / "mask", color, mask


class Recorder:
    """Wraps a generator; keeps what every call received and returned."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.name = inner.name

    def __call__(self, color, mask, **kw):
        out = self.inner(color, mask, **kw)
        self.calls.append({"color": color.copy(), "mask": mask.copy(), "kw": kw, "out": np.asarray(out).copy()})
        return out

    def close(self):
        pass


class SeedTinted:
    """The real preview generator with its output brightened by 9 levels per seed: windows then differ
    over their shared frames (the preview alone would reproduce them), so the cross-fade is observable."""

    name = "preview"

    def __init__(self):
        self.inner = PreviewGenerator(label=False)

    def __call__(self, color, mask, **kw):
        out = self.inner(color, mask, **kw).astype(np.int16) + 9 * kw["seed"]
        return np.clip(out, 0, 255).astype(np.uint8)

    def close(self):
        pass


def read_pngs(folder: Path) -> np.ndarray:
    return read_footage(folder, max_side=None).frames


# ------------------------------------------------------------------------------------------- plan
@pytest.mark.parametrize("variant", CHAIN_VARIANTS)
@pytest.mark.parametrize("length", [5, 9, 49, 81])
def test_plan_covers_every_frame_once(length, variant):
    """For every shot length 1..300: the result positions the plan finalises partition range(n) (each
    frame exactly once, in order, result index = source index); windows are contiguous runs of real
    frames, full length when n >= L; consecutive windows share >= overlap frames; the chained (given)
    frames lie inside the shared ones. Fails on an off-by-one stride, a dropped tail, a duplicated
    seam frame or a last window running past the shot."""
    for n in range(1, 301):
        if variant == "i2v" or length == 5:
            overlap = None
        else:
            overlap = 1 + n % ((length - 1) // 2)
        plan = plan_windows(n, length=length, overlap=overlap, variant=variant)
        emitted = []
        for i, w in enumerate(plan.windows):
            assert w.indices == tuple(range(w.indices[0], w.indices[0] + len(w.indices)))
            assert w.out_start == w.indices[0]
            assert len(w.indices) == (length if n >= length else n)
            if i:
                prev = plan.windows[i - 1]
                shared = prev.indices[-1] + 1 - w.indices[0]
                assert w.overlap == shared >= plan.overlap
                assert 1 <= w.given <= w.overlap
                assert w.indices[0] > prev.indices[0]
            emitted += list(range(w.out_start, plan.final_stop(i)))
        assert emitted == list(range(n)), (n, plan.summary())
        assert plan.n_out == n


def test_plan_counts_for_241_frames():
    """241 = 49 + 4 x 48: i2v needs 5 windows of stride 48; given (overlap 9, stride 40) needs 6."""
    assert len(plan_windows(241, variant="i2v").windows) == 5
    g = plan_windows(241, variant="given")
    assert [w.indices[0] for w in g.windows] == [0, 40, 80, 120, 160, 192]
    assert [w.overlap for w in g.windows] == [0, 9, 9, 9, 9, 17]
    r = plan_windows(241, sampling="reference")
    assert len(r.windows) == 1 and r.windows[0].indices == tuple(np.linspace(0, 240, 49).astype(int).tolist())


def test_blend_weights_are_the_documented_ones():
    """w_j = (j + 1) / (m + 1) for the cross-faded variants, 0 for i2v (written literally)."""
    for m in (1, 5, 9, 13, 17):
        assert blend_weights(m, "given") == tuple((j + 1) / (m + 1) for j in range(m))
        assert blend_weights(m, "guide") == tuple((j + 1) / (m + 1) for j in range(m))
        assert blend_weights(m, "i2v") == (0.0,) * m


def test_bad_plans_are_one_clear_error():
    for kw, where in (
        (dict(length=48), "--window"),
        (dict(length=49, overlap=25), "--overlap"),
        (dict(length=49, overlap=0), "--overlap"),
        (dict(length=49, overlap=5, variant="i2v"), "--overlap"),
        (dict(length=49, variant="nope"), "--chain-variant"),
        (dict(length=49, sampling="nope"), "--frame-sampling"),
    ):
        with pytest.raises(Ex4dError) as e:
            plan_windows(100, **kw)
        assert e.value.where == where


# -------------------------------------------------------------------------------------- chaining
def _expected_result(rec: Recorder, plan) -> list[np.ndarray]:
    """Rebuild the result from what the generator returned, with the documented blend written out:
    stitched_i[j] = rint((1 - w_j) * stitched_{i-1}[offset + j] + w_j * raw_i[j]), w_j from the variant."""
    result: dict[int, np.ndarray] = {}
    stitched_prev, prev_start = None, 0
    for w, call in zip(plan.windows, rec.calls, strict=True):
        raw = call["out"][: len(w.indices)]
        stitched = raw.copy()
        m = w.overlap
        for j in range(m):
            wj = 0.0 if plan.variant == "i2v" else (j + 1) / (m + 1)
            prev = stitched_prev[w.out_start - prev_start + j].astype(np.float64)
            stitched[j] = np.rint((1 - wj) * prev + wj * raw[j].astype(np.float64)).astype(np.uint8)
        for k in range(len(w.indices)):
            result[w.out_start + k] = stitched[k]  # later windows overwrite the shared frames
        yield_check = (w, call, stitched_prev, prev_start)
        _check_chained(*yield_check)
        stitched_prev, prev_start = stitched, w.out_start
    return [result[i] for i in range(plan.n_out)]


def _check_chained(w, call, stitched_prev, prev_start):
    """The given frames of a window are exactly the previous window's output, with a full mask."""
    g = w.given
    if w.index == 0:
        assert g == 0
        return
    off = w.out_start - prev_start
    np.testing.assert_array_equal(call["color"][:g], stitched_prev[off : off + g])
    assert (call["mask"][:g] == 255).all()


@pytest.mark.parametrize("variant", CHAIN_VARIANTS)
def test_chained_frames_are_the_previous_output_preview(tmp_path, variant):
    """30 frames, window 9: the given frames each window receives are the previous window's (stitched)
    output with mask 255, the rest is the guide (here already at the generation size, so exactly the
    guide's pixels), and the written result is the documented cross-fade of the raw outputs. Fails if
    chaining feeds the guide instead of the output, the wrong offset, a mask < 255, or a wrong blend."""
    c, m, color, mask = write_guide(tmp_path / "g", 30)
    rec = Recorder(SeedTinted())
    overlap = None if variant == "i2v" else 3
    s = ShotSettings(window=9, overlap=overlap, variant=variant, size="64x64")
    rep = generate_shot(rec, c, m, s, ShotOutputs(frames=tmp_path / "out"))
    plan = plan_windows(30, length=9, overlap=overlap, variant=variant)
    assert len(rec.calls) == len(plan.windows) == len(rep.windows)
    for w, call in zip(plan.windows, rec.calls, strict=True):
        g = w.given
        np.testing.assert_array_equal(call["color"][g:], color[list(w.indices[g:])])
        np.testing.assert_array_equal(call["mask"][g:], mask[list(w.indices[g:])])
        assert call["kw"]["seed"] == w.index and call["kw"]["num_frames"] == 9
    expected = _expected_result(rec, plan)
    np.testing.assert_array_equal(read_pngs(tmp_path / "out"), np.stack(expected))


@pytest.mark.slow
def test_chained_frames_are_the_previous_output_ex4d(tmp_path, tmp_path_factory):
    """The same with the real EX-4D pipeline on tiny random weights (8 frames, window 5, overlap 2):
    the chaining works through the unchanged generator interface."""
    pytest.importorskip("diffsynth")
    import generation_fixtures as gf

    from ex4d_backend.generation import load_generator

    gen = load_generator("ex4d", models_dir=gf.shared_models_dir(tmp_path_factory), device="cpu")
    c, m, color, mask = write_guide(tmp_path / "g", 8, 32, 32)
    rec = Recorder(gen)
    s = ShotSettings(window=5, overlap=2, variant="given", size="32x32", steps=2)
    try:
        generate_shot(rec, c, m, s, ShotOutputs(frames=tmp_path / "out"))
    finally:
        gen.close()
    plan = plan_windows(8, length=5, overlap=2, variant="given")
    assert [w.indices[0] for w in plan.windows] == [0, 3]
    expected = _expected_result(rec, plan)
    np.testing.assert_array_equal(read_pngs(tmp_path / "out"), np.stack(expected))


def test_reference_sampling_is_the_single_call(tmp_path):
    """``--frame-sampling reference`` = one generator call on the whole guide with linspace sampling,
    exactly what the generator returns for the whole arrays (the former behaviour)."""
    c, m, color, mask = write_guide(tmp_path / "g", 20)
    gen = PreviewGenerator(label=False)
    s = ShotSettings(window=9, sampling="reference", size="64x64")
    generate_shot(gen, c, m, s, ShotOutputs(frames=tmp_path / "out"))
    expected = gen(color, mask, height=64, width=64, num_frames=9, seed=0)
    np.testing.assert_array_equal(read_pngs(tmp_path / "out"), expected)


# ------------------------------------------------------------------------------ CLI, fps, cancel
def _cli(argv, capsys):
    from ex4d_backend.cli import main

    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_121_frames_at_the_guides_fps(tmp_path, capsys, caplog):
    """A 121-frame guide (mp4 at 12 fps) gives 121 frames at 12 fps through ``ex4d generate``
    (preview, window 49: 3 windows), PNGs and mp4; the composite too, at the guide's resolution."""
    c, m, _, _ = write_guide(tmp_path / "g", 121, 96, 64, mp4_fps=12.0)
    out = tmp_path / "out"
    argv = ["generate", "--generator", "preview", "--color-video", str(c), "--mask-video", str(m)]
    argv += ["--output-video", str(out / "shot.mp4"), "--output-frames", str(out / "frames"), "--size", "64x48"]
    argv += ["--composite-frames", str(out / "comp"), "--cache-dir", str(tmp_path / "store")]
    with caplog.at_level("INFO"):
        rc, stdout, err = _cli(argv, capsys)
    assert rc == 0, err
    plan = json.loads(stdout.split("plan: ", 1)[1])
    assert plan["frames"] == 121 and plan["windows"] == 3 and plan["fps"] == 12.0
    video = read_footage(out / "shot.mp4", max_side=None)
    assert video.frames.shape == (121, 48, 64, 3) and video.fps == pytest.approx(12.0)
    assert read_pngs(out / "frames").shape == (121, 48, 64, 3)
    assert read_pngs(out / "comp").shape == (121, 64, 96, 3)
    assert "[window 3/3] window 3 of 3: generated" in caplog.text  # progress: window n of N ...
    assert "window 2 of 3: preview frame 49/49" in caplog.text  # ... and step m of M


def test_auto_size_through_the_cli(tmp_path, capsys):
    """A 16:9 guide is generated at 832x480 and a 9:16 one at 480x832 by default."""
    for w, h, expected in ((128, 72, (832, 480)), (72, 128, (480, 832))):
        c, m, _, _ = write_guide(tmp_path / f"g{w}", 5, w, h)
        out = tmp_path / f"o{w}"
        argv = ["generate", "--generator", "preview", "--color-video", str(c), "--mask-video", str(m), "--no-cache"]
        rc, stdout, err = _cli(argv + ["--output-video", str(out / "s.mp4"), "--output-frames", str(out / "f")], capsys)
        assert rc == 0, err
        assert read_pngs(out / "f").shape == (5, expected[1], expected[0], 3)


def test_bad_overlap_cli_one_error_nothing_written(tmp_path, capsys):
    c, m, _, _ = write_guide(tmp_path / "g", 5)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["generate", "--generator", "preview", "--color-video", str(c), "--mask-video", str(m)]
    rc, _, err = _cli(argv + ["--output-video", str(out / "s.mp4"), "--overlap", "30", "--no-cache"], capsys)
    assert rc == 2 and "overlap" in err and len([ln for ln in err.splitlines() if "error" in ln]) == 1
    assert list(out.iterdir()) == []


def test_cancel_stops_at_a_step_and_keeps_finished_windows(tmp_path):
    """A Cancelled raised by the progress callback in window 2 stops the job at that step: no result
    files, window 1 stays cached; the next run reuses it and equals a run never cancelled."""
    c, m, _, _ = write_guide(tmp_path / "g", 20)
    s = ShotSettings(window=9, overlap=3, size="64x64")
    store = tmp_path / "store"
    seen = []

    def cancel_in_window_2(stage, step, total, msg):
        seen.append((stage, step, total, msg))
        if msg.startswith("window 2 of 3: ") and stage == "preview" and step == 2:
            raise Cancelled()

    out = ShotOutputs(video=tmp_path / "o" / "s.mp4", frames=tmp_path / "o" / "f")
    with pytest.raises(Cancelled):
        generate_shot(PreviewGenerator(), c, m, s, out, store=store, progress=cancel_in_window_2)
    assert not (tmp_path / "o" / "f").exists() and not (tmp_path / "o" / "s.mp4").exists()
    assert len(list((store / "cache").glob("window-*/meta.json"))) == 1
    assert ("preview", 3, 9, "window 2 of 3: preview frame 3/9") not in seen  # stopped at the step boundary
    rep = generate_shot(PreviewGenerator(), c, m, s, out, store=store)
    assert [w["cached"] for w in rep.windows] == [True, False, False]
    clean = ShotOutputs(frames=tmp_path / "clean")
    generate_shot(PreviewGenerator(), c, m, s, clean)
    np.testing.assert_array_equal(read_pngs(tmp_path / "o" / "f"), read_pngs(tmp_path / "clean"))


def test_window_keys_follow_the_previous_output(tmp_path):
    """A window's cache key covers the previous window's output: when cached window 0 holds other
    (validly hashed) frames, window 0 is reused but window 1, whose given frames changed, is generated
    again; a window file corrupted behind its meta's back is generated again. Fails if the key
    misses the chained frames or a reused result is not verified."""
    from ex4d_backend.generation.windows import WINDOW_STAGE, array_hash
    from ex4d_backend.service.jobstore import JobStore

    c, m, _, _ = write_guide(tmp_path / "g", 15)
    s = ShotSettings(window=9, overlap=3, size="64x64")
    store = JobStore(tmp_path / "store")
    first = generate_shot(SeedTinted(), c, m, s, ShotOutputs(frames=tmp_path / "a"), store=store)
    d0 = store.stage_dir(WINDOW_STAGE, first.windows[0]["key"])
    frames = np.load(d0 / "frames.npy")
    other = (255 - frames).astype(np.uint8)
    meta = {k: v for k, v in store.stage_meta(WINDOW_STAGE, first.windows[0]["key"]).items() if k != "files"}
    with store.write_stage(WINDOW_STAGE, first.windows[0]["key"], {**meta, "sha256": array_hash(other)}) as tmp:
        np.save(tmp / "frames.npy", other)  # a valid entry (store manifest and window hash) with other frames
    again = generate_shot(SeedTinted(), c, m, s, ShotOutputs(frames=tmp_path / "b"), store=store)
    assert [w["cached"] for w in again.windows] == [True, False]
    assert again.windows[1]["key"] != first.windows[1]["key"]
    np.testing.assert_array_equal(read_pngs(tmp_path / "b")[:6], other[:6])
    np.save(d0 / "frames.npy", frames)  # content no longer matches the meta's hash
    third = generate_shot(SeedTinted(), c, m, s, ShotOutputs(frames=tmp_path / "c"), store=store)
    assert [w["cached"] for w in third.windows] == [False, True]  # window 0 regenerated = the original
    np.testing.assert_array_equal(read_pngs(tmp_path / "c"), read_pngs(tmp_path / "a"))


def test_windows_run_as_ordered_tasks(tmp_path):
    """``generate_windows(upto=k)`` (one farm task per window, in order, on one store) computes only
    window k and reuses the earlier ones; the final ``generate_shot`` only reads the cache and equals a
    run in one go."""
    from ex4d_backend.generation.windows import generate_windows

    c, m, _, _ = write_guide(tmp_path / "g", 20)
    s = ShotSettings(window=9, overlap=3, size="64x64")
    store = tmp_path / "store"
    for k in range(3):
        rep = generate_windows(PreviewGenerator(), c, m, s, store=store, upto=k)
        assert [w["cached"] for w in rep.windows] == [True] * k + [False]
    rep = generate_shot(PreviewGenerator(), c, m, s, ShotOutputs(frames=tmp_path / "a"), store=store)
    assert [w["cached"] for w in rep.windows] == [True, True, True]
    generate_shot(PreviewGenerator(), c, m, s, ShotOutputs(frames=tmp_path / "b"))
    np.testing.assert_array_equal(read_pngs(tmp_path / "a"), read_pngs(tmp_path / "b"))


@pytest.mark.slow
def test_killed_job_resumes_at_the_next_window(tmp_path, subprocess_env):
    """A real ``ex4d generate`` subprocess is SIGKILLed after window 1 is cached; running it again
    reuses window 1 (not regenerated: same files, reported cached), generates the rest, and its frames
    equal an uninterrupted run's. Fails if a window is not atomic/cached, if the key changes between
    runs, or if resuming chains from something other than the cached output."""
    c, m, _, _ = write_guide(tmp_path / "g", 30)
    store = tmp_path / "store"

    def cmd(out: Path, store: Path) -> list[str]:
        return [
            sys.executable, "-m", "ex4d_backend", "generate", "--generator", "preview",
            "--color-video", str(c), "--mask-video", str(m), "--size", "64x64", "--window", "9", "--overlap", "3",
            "--output-video", str(out / "s.mp4"), "--output-frames", str(out / "f"), "--cache-dir", str(store),
        ]  # fmt: skip

    env = {**subprocess_env, "EX4D_TEST_WINDOW_DELAY": "60"}
    proc = subprocess.Popen(cmd(tmp_path / "a", store), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not list((store / "cache").glob("window-*/meta.json")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "window 1 was never cached"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    first = list((store / "cache").glob("window-*"))
    assert len(first) == 1 and not (tmp_path / "a" / "f").exists()
    stamp = (first[0] / "frames.npy").stat().st_mtime_ns
    done = subprocess.run(cmd(tmp_path / "a", store), env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(done.stdout.split("plan: ", 1)[1])
    assert plan["windows"] == 5 and plan["cached_windows"] == 1
    assert (first[0] / "frames.npy").stat().st_mtime_ns == stamp
    clean = subprocess.run(
        cmd(tmp_path / "b", tmp_path / "store2"), env=subprocess_env, capture_output=True, text=True, timeout=300
    )
    assert clean.returncode == 0, clean.stderr[-2000:]
    np.testing.assert_array_equal(read_pngs(tmp_path / "a" / "f"), read_pngs(tmp_path / "b" / "f"))
    assert len(read_pngs(tmp_path / "a" / "f")) == 30


# ---------------------------------------------------------------------------------------- memory
def test_peak_host_memory_is_flat_in_shot_length(tmp_path):
    """Peak traced (Python + numpy) memory of a whole windowed run, composite included, for a 27- and an
    81-frame guide at 256x256: the longer shot adds 54 frames (10.6 MB of colour, 3.5 MB of mask) but the
    peak grows by less than 1.5 MB. Fails if the guide or the result is held whole (e.g. read_footage of
    the guide, or frames collected before writing)."""
    import tracemalloc

    peaks = {}
    for n in (9, 27, 81):  # 9: warm-up (first imports and codec set-up are not the shot's memory)
        c, m, _, _ = write_guide(tmp_path / f"g{n}", n, 256, 256)
        s = ShotSettings(window=9, variant="i2v", size="128x128")
        out = ShotOutputs(video=tmp_path / f"o{n}.mp4", frames=tmp_path / f"f{n}", composite_frames=tmp_path / f"c{n}")
        tracemalloc.start()
        try:
            generate_shot(PreviewGenerator(), c, m, s, out)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peaks[81] - peaks[27] < 1.5e6, peaks
