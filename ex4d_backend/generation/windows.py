"""Long shots: every frame at the footage's rate, generated as chained, cross-faded windows.

The generator (EX-4D or the preview) makes ``L = 4k + 1`` frames per call (49; 81 as an option). A
shot of ``n`` frames is cut into windows of ``L`` consecutive source frames (:func:`plan_windows`):

- window 0 starts at frame 0; window i + 1 starts ``L - overlap`` frames after window i; the last
  window is moved back to end exactly at frame ``n`` (so every window is a full ``L`` frames of real
  guide; its overlap with the one before can be longer). A shot of ``n <= L`` frames is one window
  (the generator pads it with its last frame, as the reference does; the padding is dropped).
- **Chaining.** Window i > 0 shares its first ``m = overlap_i`` frames with window i - 1. Its first
  ``given_i`` frames are conditioned on what window i - 1 produced (after its own cross-fade): their
  colour guide IS the previous output and their mask is 255 (fully seen), so frame 0 of the window
  (the I2V image: CLIP + first-frame latent) is the previous window's frame and the given frames pin
  the continuation; the rest of the window is conditioned by the guide rendered from the same
  DW-mesh. The generator interface is unchanged (it only sees a colour and a mask guide), so the same
  chaining works for the preview generator and EX-4D.
- **Cross-fade.** Over the ``m`` shared frames the result is
  ``rint((1 - w_j) * previous_j + w_j * new_j)`` (float64, then uint8) with ``w_j = (j + 1) / (m + 1)``,
  j = 0 .. m - 1 (linear; the new window takes over gradually and neither window's output is used
  alone at a seam), except for ``i2v`` where ``w_j = 0`` (the previous output is kept).

Chaining variants (``--chain-variant``):

=========  ============  ===================================  ===========================
variant    overlap       given frames                          blend
=========  ============  ===================================  ===========================
``given``  9 (default)   all ``m`` overlap frames              linear cross-fade
``i2v``    1             the shared frame (I2V image only)     previous kept (``w = 0``)
``guide``  9             frame 0 only (I2V), the rest guide     linear cross-fade
=========  ============  ===================================  ===========================

Default ``given`` with overlap 9 = 4 * 2 + 1: the given frames fill exactly the first 3 latent frames
(1 + 4 + 4 frames, so the overlap is latent-aligned and the window's stride 40 is a multiple of the
VAE's 4), holes that were filled in the previous window stay filled the same way in the new one (the
model sees them as seen pixels), and the cross-fade hides what the VAE round trip still changes. Cost:
``ceil((n - 9) / 40)`` windows (6 for 241 frames) against ``ceil((n - 1) / 48)`` for ``i2v`` (5): ``i2v``
is the cheapest and never blends, but only one frame carries the previous window's fill, so the
filled holes can change their look at every seam; ``guide`` is the ablation without given frames.
The GPU comparison of the variants is ``benchmarks/bench_long_shot.py``.

``--frame-sampling reference`` keeps the reference's behaviour: ONE window of ``L`` frames sampled
with ``linspace(0, n - 1, L)`` over the whole shot (a time-lapse of a long shot).

**Resumable.** Each window's raw output is a stage result ``window-<key>`` in the job store, written
atomically, keyed by the content hash of everything the generator sees (the window's conditioned
colour and mask guide, which include the previous window's output, the settings, the seed, the
generator); a killed or cancelled job re-reads the finished windows and continues with the next one.
Seeds: window i uses ``seed + i``.

**Memory.** Guide frames are read lazily and resized to the generation size as they are decoded
(:class:`~.frame_streams.FrameReader`); results are written frame by frame. At any time the process
holds one window's guide, its output and the previous window's output (generation size), never the shot.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import constants as C
from ..errors import Ex4dError
from .conditioning import REFERENCE_NEGATIVE, REFERENCE_PROMPT, RESIZE_MODES, check_guide_pair, sample_indices

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int, str], None]
CHAIN_VARIANTS = ("given", "i2v", "guide")
FRAME_SAMPLINGS = ("windows", "reference")
DEFAULT_WINDOW = C.NUM_FRAMES
DEFAULT_OVERLAP = {"given": 9, "i2v": 1, "guide": 9}
WINDOW_STAGE = "window"
WINDOWS_VERSION = 1  # bump when the meaning of a cached window changes


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Window:
    """One generator call. ``indices``: its source frames; ``out_start``: where its first frame goes in
    the result; ``overlap``: leading frames shared with the previous window; ``given``: leading frames
    conditioned on the previous output; ``weights``: the new window's blend weight per shared frame."""

    index: int
    indices: tuple[int, ...]
    out_start: int
    overlap: int = 0
    given: int = 0
    weights: tuple[float, ...] = ()


@dataclass(frozen=True)
class WindowPlan:
    n_source: int
    length: int
    overlap: int
    variant: str
    sampling: str
    windows: tuple[Window, ...]

    @property
    def n_out(self) -> int:
        """Frames in the result: every source frame once (``windows``), or ``length`` (``reference``)."""
        last = self.windows[-1]
        return last.out_start + len(last.indices)

    def final_stop(self, i: int) -> int:
        """After window i, result frames ``[windows[i].out_start, final_stop(i))`` are final."""
        return self.windows[i + 1].out_start if i + 1 < len(self.windows) else self.n_out

    def summary(self) -> dict:
        return {
            "n_source": self.n_source,
            "n_out": self.n_out,
            "length": self.length,
            "overlap": self.overlap,
            "variant": self.variant,
            "sampling": self.sampling,
            "windows": [[w.indices[0], w.indices[-1] + 1, w.overlap, w.given] for w in self.windows],
        }


def blend_weights(overlap: int, variant: str) -> tuple[float, ...]:
    """The new window's weight ``w_j`` for each of its ``overlap`` shared frames (see the module doc)."""
    if variant == "i2v":
        return (0.0,) * overlap
    return tuple((j + 1) / (overlap + 1) for j in range(overlap))


def validate_window(length: int) -> None:
    if length < 5 or (length - 1) % 4:
        raise Ex4dError(f"the window must be 4k + 1 frames (>= 5), got {length}", where="--window", hint="49 or 81")


def resolve_overlap(length: int, overlap: int | None, variant: str) -> int:
    if variant not in CHAIN_VARIANTS:
        raise Ex4dError(f"unknown chain variant '{variant}'", where="--chain-variant", hint=", ".join(CHAIN_VARIANTS))
    if overlap is None:  # the default, shortened for short windows to the largest 4k+1 that fits
        overlap = min(DEFAULT_OVERLAP[variant], 4 * (((length - 1) // 2 - 1) // 4) + 1)
    if variant == "i2v" and overlap != 1:
        raise Ex4dError("the i2v variant chains through exactly one frame", where="--overlap", hint="leave it out")
    if not 1 <= overlap <= (length - 1) // 2:
        raise Ex4dError(
            f"the overlap must be 1 .. {(length - 1) // 2} frames for a {length}-frame window, got {overlap}",
            where="--overlap",
        )
    return overlap


def plan_windows(
    n: int,
    *,
    length: int = DEFAULT_WINDOW,
    overlap: int | None = None,
    variant: str = C.CHAIN_VARIANT,
    sampling: str = C.FRAME_SAMPLING,
) -> WindowPlan:
    """The windows for a shot of ``n`` source frames (module doc)."""
    validate_window(length)
    if n < 1:
        raise Ex4dError("the guide has no frames", where="guide")
    if sampling not in FRAME_SAMPLINGS:
        raise Ex4dError(
            f"unknown frame sampling '{sampling}'", where="--frame-sampling", hint=", ".join(FRAME_SAMPLINGS)
        )
    overlap = resolve_overlap(length, overlap, variant)
    if sampling == "reference":
        only = Window(0, tuple(int(i) for i in sample_indices(n, length)), 0)
        return WindowPlan(n, length, overlap, variant, sampling, (only,))
    starts = [0]
    while starts[-1] + length < n:
        starts.append(min(starts[-1] + length - overlap, n - length))
    windows = []
    for i, s in enumerate(starts):
        stop = min(s + length, n)
        m = 0 if i == 0 else starts[i - 1] + length - s
        given = {"given": m, "i2v": m, "guide": min(m, 1)}[variant]
        windows.append(Window(i, tuple(range(s, stop)), s, m, given, blend_weights(m, variant)))
    return WindowPlan(n, length, overlap, variant, sampling, tuple(windows))


# ------------------------------------------------------------------------------------ chaining maths
def blend(previous: np.ndarray, new: np.ndarray, w: float) -> np.ndarray:
    """``rint((1 - w) * previous + w * new)`` in float64, as uint8."""
    out = (1.0 - w) * previous.astype(np.float64) + w * new.astype(np.float64)
    return np.rint(out).astype(np.uint8)


def chain_guide(color: np.ndarray, mask: np.ndarray, previous: np.ndarray | None, offset: int, given: int):
    """The conditioned guide of a window: its first ``given`` colour frames replaced by the previous
    window's output frames ``previous[offset : offset + given]`` and their mask set to 255.
    ``color`` (L, h, w, 3) / ``mask`` (L, h, w) uint8 at the generation size; modified copies returned."""
    color, mask = color.copy(), mask.copy()
    if given:
        color[:given] = previous[offset : offset + given]
        mask[:given] = 255
    return color, mask


def stitch(previous: np.ndarray | None, offset: int, raw: np.ndarray, window: Window) -> np.ndarray:
    """The window's output after the cross-fade with the previous output over its shared frames."""
    out = raw.copy()
    for j, w in enumerate(window.weights):
        out[j] = blend(previous[offset + j], raw[j], w)
    return out


def array_hash(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class ShotSettings:
    """Everything that decides the generated pixels of a shot (besides the guide and the generator)."""

    window: int = DEFAULT_WINDOW
    overlap: int | None = None
    variant: str = C.CHAIN_VARIANT
    sampling: str = C.FRAME_SAMPLING
    size: str = C.GEN_SIZE
    width: int | None = None
    height: int | None = None
    resize: str = C.RESIZE
    steps: int = C.STEPS
    cfg: float = C.CFG
    shift: float = C.SHIFT
    seed: int = C.SEED
    prompt: str = REFERENCE_PROMPT
    negative_prompt: str = REFERENCE_NEGATIVE


@dataclass
class ShotOutputs:
    """Where the results go (any may be None). The composite is at the guide's resolution."""

    video: str | os.PathLike | None = None
    frames: str | os.PathLike | None = None
    composite_video: str | os.PathLike | None = None
    composite_frames: str | os.PathLike | None = None
    composite_match: str = "affine"
    feather_px: float | None = None
    fps: float | None = None  # default: the colour guide's
    overlay: Callable[[np.ndarray], np.ndarray] | None = None  # drawn on every written frame (the PREVIEW label)


@dataclass
class ShotReport:
    plan: dict
    size: tuple[int, int]
    fps: float
    outputs: dict = field(default_factory=dict)
    windows: list[dict] = field(default_factory=list)  # per window: key, cached, seconds
    composite: dict | None = None  # guide size, the box of it the generation shows, feather width
    source_frames: list[int] = field(default_factory=list)  # the source frame of each result frame


# ---------------------------------------------------------------------------------------- the cache
class WindowCache:
    """Window results in a job store (``<store>/cache/window-<key>/frames.npy`` + ``meta.json``), or
    nothing (``store=None``). A result is reused only if its frames' SHA-256 matches its meta."""

    def __init__(self, store=None, *, recompute: bool = False):
        if store is not None and not hasattr(store, "write_stage"):
            from ..service.jobstore import JobStore

            store = JobStore(store)
        self.store = store
        self.recompute = recompute  # never reuse a cached window (a forced job), still save the new ones

    def lock(self, key: str):
        stage_lock = getattr(self.store, "stage_lock", None)
        return stage_lock(WINDOW_STAGE, key) if stage_lock else contextlib.nullcontext()

    def load(self, key: str) -> np.ndarray | None:
        if self.store is None or self.recompute:
            return None
        meta = self.store.stage_meta(WINDOW_STAGE, key)
        if meta is None:
            return None
        try:
            frames = np.load(self.store.stage_dir(WINDOW_STAGE, key) / "frames.npy")
        except (OSError, ValueError):
            return None
        if list(frames.shape) != meta.get("shape") or array_hash(frames) != meta.get("sha256"):
            log.warning("window %s: cached frames do not match their meta; generating again", key)
            return None
        return frames

    def save(self, key: str, frames: np.ndarray, meta: dict) -> None:
        if self.store is None:
            return
        meta = {**meta, "shape": list(frames.shape), "sha256": array_hash(frames)}
        with self.store.write_stage(WINDOW_STAGE, key, meta) as tmp:
            np.save(tmp / "frames.npy", frames)
        _test_window_delay()


def _test_window_delay() -> None:
    """Test hook: ``EX4D_TEST_WINDOW_DELAY`` seconds of sleep after each window is cached (lets a test
    kill the process between windows). Never set it in production."""
    delay = os.environ.get("EX4D_TEST_WINDOW_DELAY")
    if delay:
        time.sleep(float(delay))


# ------------------------------------------------------------------------------------------ running
def chained_frames(
    generator,
    plan: WindowPlan,
    settings: ShotSettings,
    size: tuple[int, int],
    color_reader,
    mask_reader,
    *,
    cache: WindowCache,
    generator_key: dict | None = None,
    progress: Progress | None = None,
    records: list | None = None,
    stop_after: int | None = None,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Run the plan; yield ``(result index, source index, frame)`` for each result frame, in order, as
    soon as it is final. ``color_reader`` / ``mask_reader`` give frames already at the generation size
    (``size`` = (width, height)); ``generator`` follows the ``load_generator(...)`` interface.
    ``stop_after``: return once that window is done (the windows before it come from the cache)."""
    width, height = size
    n_windows = len(plan.windows)
    previous, prev_start = None, 0

    def report(stage: str, step: int, total: int, msg: str) -> None:
        if progress:
            progress(stage, step, total, msg)

    for w in plan.windows:
        tag = f"window {w.index + 1} of {n_windows}"
        report("window", w.index, n_windows, f"{tag}: source frames {w.indices[0]}-{w.indices[-1]}")
        color, mask = chain_guide(
            color_reader.take(w.indices), mask_reader.take(w.indices), previous, w.out_start - prev_start, w.given
        )
        seed = settings.seed + w.index
        key = _window_key(settings, plan.length, generator_key, size, seed, len(w.indices), color, mask)
        t0 = time.perf_counter()
        with cache.lock(key):
            raw = cache.load(key)
            cached = raw is not None
            if raw is None:

                def step_report(stage: str, step: int, total: int, msg: str, _tag=tag) -> None:
                    report(stage, step, total, f"{_tag}: {msg}")

                out = generator(
                    color,
                    mask,
                    height=height,
                    width=width,
                    num_frames=plan.length,
                    steps=settings.steps,
                    cfg=settings.cfg,
                    shift=settings.shift,
                    seed=seed,
                    prompt=settings.prompt,
                    negative_prompt=settings.negative_prompt,
                    resize=settings.resize,
                    callback=step_report,
                )
                raw = np.ascontiguousarray(out[: len(w.indices)])  # a short shot's padding is dropped
                del out
                meta = {"index": w.index, "of": n_windows, "source": [w.indices[0], w.indices[-1] + 1], "seed": seed}
                cache.save(key, raw, meta)
        seconds = time.perf_counter() - t0
        if records is not None:
            records.append({"index": w.index, "key": key, "cached": cached, "seconds": round(seconds, 3)})
        report("window", w.index + 1, n_windows, f"{tag}: {'cached' if cached else 'generated'}")
        stitched = stitch(previous, w.out_start - prev_start, raw, w)
        del color, mask, raw
        for pos in range(w.out_start, plan.final_stop(w.index)):
            yield pos, w.indices[pos - w.out_start], stitched[pos - w.out_start]
        if stop_after is not None and w.index >= stop_after:
            return
        if w.index + 1 < n_windows:
            nxt = plan.windows[w.index + 1].indices[0]
            color_reader.release(nxt)
            mask_reader.release(nxt)
        previous, prev_start = stitched, w.out_start


KEYED_SETTINGS = ("steps", "cfg", "shift", "prompt", "negative_prompt", "resize")


def _window_key(settings: ShotSettings, length, generator_key, size, seed, n_used, color, mask) -> str:
    """Content key of one generator call: exactly what the generator sees (the conditioned guide, its
    settings, seed, size and length) and which generator; not how the shot was cut into windows."""
    from ..service.jobstore import make_key

    call = {k: v for k, v in asdict(settings).items() if k in KEYED_SETTINGS}
    return make_key(
        WINDOWS_VERSION, call, generator_key or {}, list(size), length, seed, n_used, array_hash(color, mask)
    )


def probe_guides(color_path, mask_path) -> tuple[int, tuple[int, int], float]:
    """(frames, (width, height), fps) of the colour guide, after checking the mask guide matches it
    (frame count and size; one clear error otherwise). Nothing is decoded."""
    from .frame_streams import FrameReader

    with FrameReader(color_path) as c, FrameReader(mask_path) as m:
        check_guide_pair(c.n_frames, c.size, m.n_frames, m.size, str(mask_path))
        return c.n_frames, c.size, c.fps


def shot_plan(color_path, mask_path, settings: ShotSettings, fps: float | None = None):
    """(guide size, generation size, :class:`WindowPlan`, output fps) for a shot, every input checked."""
    from .sizing import generation_size

    if settings.resize not in RESIZE_MODES:
        raise Ex4dError(f"unknown resize mode '{settings.resize}'", where="--resize", hint=", ".join(RESIZE_MODES))
    n_frames, guide_size, guide_fps = probe_guides(color_path, mask_path)
    size = generation_size(*guide_size, settings.size, width=settings.width, height=settings.height)
    plan = plan_windows(
        n_frames, length=settings.window, overlap=settings.overlap, variant=settings.variant, sampling=settings.sampling
    )
    return guide_size, size, plan, float(fps or guide_fps)


def check_settings(settings: ShotSettings) -> None:
    """Everything about ``settings`` that can be checked without the guide (window, overlap, variant,
    sampling, an explicit size, resize): one clear error, before any stage runs."""
    from .sizing import parse_size

    validate_window(settings.window)
    resolve_overlap(settings.window, settings.overlap, settings.variant)
    if settings.sampling not in FRAME_SAMPLINGS:
        raise Ex4dError(
            f"unknown frame sampling '{settings.sampling}'", where="frame_sampling", hint=", ".join(FRAME_SAMPLINGS)
        )
    if settings.resize not in RESIZE_MODES:
        raise Ex4dError(f"unknown resize mode '{settings.resize}'", where="resize", hint=", ".join(RESIZE_MODES))
    for name, v in (("width", settings.width), ("height", settings.height)):
        if v is not None and (v < 16 or v % 16):
            raise Ex4dError(f"the {name} must be a positive multiple of 16, got {v}", where=name)
    if settings.width is None and settings.height is None:
        parse_size(settings.size)


def generate_windows(
    generator,
    color_path,
    mask_path,
    settings: ShotSettings,
    *,
    store,
    upto: int,
    generator_key: dict | None = None,
    progress: Progress | None = None,
) -> ShotReport:
    """Compute (or find in ``store``) windows ``0 .. upto`` of a shot and write no result: one task of a
    farm that runs the windows of a long shot in order (window k needs window k - 1 in the shared store;
    the last task calls :func:`generate_shot`, which then only reads the cache)."""
    from .conditioning import fit_frame
    from .frame_streams import FrameReader

    guide_size, size, plan, fps = shot_plan(color_path, mask_path, settings)
    report = ShotReport(plan=plan.summary(), size=size, fps=fps)
    fit = lambda img: fit_frame(img, size[0], size[1], settings.resize)  # noqa: E731
    with FrameReader(color_path, transform=fit) as c, FrameReader(mask_path, transform=fit, channel0=True) as m:
        for _ in chained_frames(generator, plan, settings, size, c, m, cache=WindowCache(store),
                                generator_key=generator_key, progress=progress, records=report.windows,
                                stop_after=upto):  # fmt: skip
            pass
    return report


def generate_shot(
    generator,
    color_path,
    mask_path,
    settings: ShotSettings = ShotSettings(),
    outputs: ShotOutputs | None = None,
    *,
    store=None,
    generator_key: dict | None = None,
    progress: Progress | None = None,
    recompute: bool = False,
) -> ShotReport:
    """Generate a whole shot from guide files (video or PNG folders) and write the results.

    ``store``: a :class:`~ex4d_backend.service.jobstore.JobStore` (or its folder) that caches each
    window; None caches nothing; ``recompute``: generate every window again (and cache the new ones). ``generator_key``: what identifies the generator's weights and pixel-
    affecting options in the cache keys (e.g. ``{"generator": "ex4d", "rope": "float32"}``).
    Returns the plan, the generation size, the frame rate, the written paths and per-window records."""
    from ..composite import Compositor
    from .conditioning import fit_frame
    from .frame_streams import FrameReader, ResultWriter

    outputs = outputs or ShotOutputs()
    guide_size, size, plan, fps = shot_plan(color_path, mask_path, settings, outputs.fps)
    report = ShotReport(plan=plan.summary(), size=size, fps=fps)
    w, h = size
    fit = lambda img: fit_frame(img, w, h, settings.resize)  # noqa: E731
    want_composite = outputs.composite_video is not None or outputs.composite_frames is not None
    compositor = (
        Compositor(
            guide_size, size, resize=settings.resize, match=outputs.composite_match, feather_px=outputs.feather_px
        )
        if want_composite
        else None
    )
    with contextlib.ExitStack() as stack:
        color_r = stack.enter_context(FrameReader(color_path, transform=fit))
        mask_r = stack.enter_context(FrameReader(mask_path, transform=fit, channel0=True))
        writer = stack.enter_context(ResultWriter(outputs.video, outputs.frames, fps=fps))
        if compositor is not None:
            full_c = stack.enter_context(FrameReader(color_path))
            full_m = stack.enter_context(FrameReader(mask_path, channel0=True))
            comp_writer = stack.enter_context(ResultWriter(outputs.composite_video, outputs.composite_frames, fps=fps))
        frames = chained_frames(
            generator,
            plan,
            settings,
            size,
            color_r,
            mask_r,
            cache=WindowCache(store, recompute=recompute),
            generator_key=generator_key,
            progress=progress,
            records=report.windows,
        )
        mark = outputs.overlay or (lambda f: f)
        for _, src, frame in frames:
            report.source_frames.append(int(src))
            writer.write(mark(frame.copy()) if outputs.overlay else frame)
            if compositor is not None:
                comp_writer.write(mark(compositor(full_c.frame(src), full_m.frame(src), frame)))
                full_c.release(src)
                full_m.release(src)
    report.outputs = {k: str(v) for k, v in writer.paths().items()}
    if compositor is not None:
        report.outputs.update({f"composite_{k}": str(v) for k, v in comp_writer.paths().items()})
        report.composite = {"size": list(guide_size), "box": list(compositor.box), "feather_px": compositor.feather_px}
    return report


__all__ = [
    "CHAIN_VARIANTS",
    "DEFAULT_WINDOW",
    "FRAME_SAMPLINGS",
    "ShotOutputs",
    "ShotReport",
    "ShotSettings",
    "Window",
    "WindowCache",
    "WindowPlan",
    "blend",
    "blend_weights",
    "chain_guide",
    "chained_frames",
    "check_settings",
    "generate_shot",
    "generate_windows",
    "shot_plan",
    "plan_windows",
    "probe_guides",
    "stitch",
]
