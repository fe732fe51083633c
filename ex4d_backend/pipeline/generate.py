"""Stage 6, generate: guide -> the generated shot, as chained windows (``generation.windows``).

``generate_stage`` writes the results (``frames/`` + ``video.mp4`` at the generation size, ``composite/``
+ ``composite.mp4`` at the guide's size); each finished window is its own store entry (``window-<key>``),
so a cancelled or killed job continues with the next window. ``generate_windows_stage`` computes windows
``0 .. k`` only (an ordered farm step, ``farm.plan``). The stage key is ``make_key(STAGE_VERSION,
"generate", guide key, WINDOWS_VERSION, settings)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..service.jobstore import make_key
from ..service.resident import free_memory
from .settings import GenerateSettings
from .stages import STAGE_VERSION, Clip, Context, GuideEntry, _locked, _lookup, _reused


@dataclass
class GenerateEntry:
    key: str
    dir: Path
    meta: dict


def generator_key(s: dict, models_dir: str | None) -> dict:
    """What identifies the generator's pixels in the window cache keys (``generation.windows``): the
    generator, for EX-4D its weight files (replaced weights never reuse a window) and the ``fast`` profile
    (other arithmetic); not the other VRAM profiles, which compute the same result."""
    key: dict = {"generator": s["generator"]}
    if s["generator"] == "ex4d":
        from ..generation.windows_cli import weights_fingerprint

        key["weights"] = weights_fingerprint(models_dir)
        if s["vram_profile"] == "fast":
            key["vram_profile"] = "fast"
    return key


def _acquire_generator(ctx: Context, s: dict):
    """(the loaded generator of resolved settings ``s``, the "load" progress message to report): the
    service keeps one resident (``ResidentGenerator``); call ``ctx.resident.done(ok)`` after the work."""
    from ..generation import load_generator
    from .resident_clip import release

    release()  # the generator needs the VRAM of the clip the guide renderer keeps

    def load():
        ctx.progress("load", 0, 1, f"loading the {s['generator']} generator")
        return load_generator(
            s["generator"], models_dir=ctx.models_dir, device=s["device"], vram_profile=s["vram_profile"]
        )

    gen, reused = ctx.resident.acquire((s["generator"], str(ctx.models_dir), s["device"], s["vram_profile"]), load)
    return gen, "the generator was still loaded" if reused else "loaded"


def generate_stage(ctx: Context, clip: Clip, guide: GuideEntry, gs: GenerateSettings) -> GenerateEntry:
    """Guide -> the generated shot (``generation.windows.generate_shot``): ``frames/`` PNGs + ``video.mp4``
    at the generation size (``size`` "auto": the guide's aspect) and the full-resolution composite
    ``composite/`` + ``composite.mp4`` at the guide's size. ``frame_sampling`` "windows" (default): every
    guide frame once at the guide's fps, as chained windows of ``num_frames``; "reference": one window
    sampled with linspace. Each finished window is its own store entry (``window-<key>``): a cancelled or
    killed job continues with the next window. Progress: stage ``window`` (n of N) around the generator's
    own steps, whose messages start with ``window n of N:``; a cancel stops at a step."""
    from ..generation.windows import WINDOWS_VERSION, ShotOutputs, generate_shot

    s = gs.resolved()
    shot = gs.shot_settings()
    key = make_key(STAGE_VERSION, "generate", guide.key, WINDOWS_VERSION, {f: v for f, v in s.items() if f != "device"})
    with _locked(ctx, "generate", key):
        meta = _lookup(ctx, "generate", key)
        cached = meta is not None
        if meta is None:
            gen, loaded = _acquire_generator(ctx, s)
            overlay = None
            if s["generator"] == "preview":  # chain from unlabelled frames; the label goes on every written frame
                from ..generation.preview import _label

                gen.label, overlay = False, _label
            meta = {
                "shot": clip.key,
                "settings": s,
                "camera_hash": guide.meta["camera_hash"],
                "fps": clip.fps,
            }
            ok = False
            try:
                ctx.progress("load", 1, 1, loaded)  # may raise Cancelled: inside the try (resident.done)
                with ctx.store.write_stage("generate", key, meta) as tmp:
                    rep = generate_shot(
                        gen,
                        guide.dir / "color",
                        guide.dir / "mask",
                        shot,
                        ShotOutputs(
                            video=tmp / "video.mp4",
                            frames=tmp / "frames",
                            composite_video=tmp / "composite.mp4",
                            composite_frames=tmp / "composite",
                            fps=clip.fps,
                            overlay=overlay,
                        ),
                        store=ctx.store,
                        generator_key=generator_key(s, ctx.models_dir),
                        progress=ctx.progress,
                        recompute=ctx.force_stage == "generate",  # ``force``: the windows too
                    )
                    ctx.progress("save", 0, 1, "results")
                    meta.update(
                        source_frames=rep.source_frames,
                        n_frames=len(rep.source_frames),
                        width=rep.size[0],
                        height=rep.size[1],
                        size=list(rep.size),
                        plan=rep.plan,
                        composite=rep.composite,
                        windows=[{k: w[k] for k in ("index", "cached", "seconds")} for w in rep.windows],
                    )
                ok = True
            finally:
                ctx.resident.done(ok)  # kept for the next job, or closed (a cancel, an error, keep-alive 0)
                del gen
                free_memory()
            ctx.progress("save", 1, 1, "done")
    _reused(ctx, "generate", key, cached)
    return GenerateEntry(key, ctx.store.stage_dir("generate", key), meta)


def generate_windows_stage(ctx: Context, guide: GuideEntry, gs: GenerateSettings, upto: int) -> dict:
    """Windows ``0 .. upto`` of the shot into the store (``generation.windows.generate_windows``), no
    result written: one ordered farm step of a long shot (``farm.plan``). Returns the plan, the size and
    per-window records (index, cached, seconds)."""
    from ..generation.windows import generate_windows

    s = gs.resolved()
    gen, loaded = _acquire_generator(ctx, s)
    if s["generator"] == "preview":
        gen.label = False  # as generate_stage: the windows chain from unlabelled frames
    ok = False
    try:
        ctx.progress("load", 1, 1, loaded)
        rep = generate_windows(
            gen,
            guide.dir / "color",
            guide.dir / "mask",
            gs.shot_settings(),
            store=ctx.store,
            upto=upto,
            generator_key=generator_key(s, ctx.models_dir),
            progress=ctx.progress,
        )
        ok = True
    finally:
        ctx.resident.done(ok)
        del gen
        free_memory()
    return {
        "upto_window": upto,
        "size": list(rep.size),
        "plan": rep.plan,
        "windows": [{k: w[k] for k in ("index", "cached", "seconds")} for w in rep.windows],
    }
