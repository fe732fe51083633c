"""``ex4d generate`` for shots of any length and aspect: the flags and the run (windows, sizing, composite).

``commands/generate.py`` registers its flags and then calls :func:`add_arguments` and :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import logging

from .. import constants as C
from ..composite import MATCH_MODES
from .windows import CHAIN_VARIANTS, DEFAULT_WINDOW, FRAME_SAMPLINGS, ShotOutputs, ShotSettings, generate_shot

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The long-shot / aspect / composite flags (added to ``ex4d generate``)."""
    g = p.add_argument_group("long and wide shots")
    g.add_argument(
        "--frame-sampling",
        choices=FRAME_SAMPLINGS,
        default=C.FRAME_SAMPLING,
        help="windows: every guide frame at the guide's fps, as chained windows; reference: ONE window of "
        "--window frames sampled with linspace over the whole guide (the reference's time-lapse)",
    )
    g.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="frames per generator call, 4k+1 (49 or 81)")
    g.add_argument(
        "--overlap", type=int, default=None, help="frames shared by consecutive windows (default: given/guide 9, i2v 1)"
    )
    g.add_argument(
        "--chain-variant",
        choices=CHAIN_VARIANTS,
        default=C.CHAIN_VARIANT,
        help="given: the overlap is given from the previous window + linear cross-fade; i2v: only the shared "
        "first frame (I2V image) is given; guide: I2V frame given, rest of the overlap from the guide, cross-fade",
    )
    g.add_argument(
        "--size",
        default=C.GEN_SIZE,
        help="auto (follows the guide's aspect: 832x480 for 16:9, 480x832 for 9:16, 512x512 square; "
        "--width/--height override) or WxH, multiples of 16",
    )
    g.add_argument("--composite-video", default=None, help="also write the full-resolution composite as an mp4")
    g.add_argument("--composite-frames", default=None, help="also write the full-resolution composite as PNGs")
    g.add_argument("--composite-match", choices=MATCH_MODES, default="affine")
    g.add_argument("--feather", type=float, default=None, help="composite feather width in guide px (default 8 gen px)")
    g.add_argument("--cache-dir", default=None, help="job store that caches finished windows (default: the user store)")
    g.add_argument("--no-cache", action="store_true", help="do not cache windows (a killed job starts again)")
    p.set_defaults(height=None, width=None, frames=None)  # size: auto unless given


def generator_key(args: argparse.Namespace, options: dict) -> dict:
    """What identifies the generator's pixels in the window cache keys (not the VRAM profile: every
    profile computes the same result; not compile)."""
    key = {"generator": args.generator}
    if args.generator == "ex4d":
        key["weights"] = weights_fingerprint(args.models_dir)
        key.update({k: v for k, v in options.items() if k != "compile"})
        if getattr(args, "vram_profile", "full") == "fast":  # fast / the step cache: other arithmetic
            key["vram_profile"] = "fast"
        if getattr(args, "step_cache", None):
            key["step_cache"] = args.step_cache
    return key


def weights_fingerprint(models_dir=None) -> list:
    """(repo, file, size, mtime_ns) of every Wan2.1 / EX-4D weight file: replacing the weights never
    reuses windows generated with the old ones (the same rule as the depth cache's)."""
    from .. import modelstore
    from . import specs

    return modelstore.weights_fingerprint([specs.WAN_NAME, specs.EX4D_NAME], models_dir)


def run(args: argparse.Namespace) -> int:
    from ..generation import load_generator
    from ..pipeline.settings import GenerateSettings

    window = args.window if args.frames is None else args.frames  # --frames: the old name of --window
    settings = GenerateSettings(
        num_frames=window,
        overlap=args.overlap,
        chain_variant=args.chain_variant,
        frame_sampling=args.frame_sampling,
        size=args.size,
        width=args.width,
        height=args.height,
        resize=args.resize,
        steps=args.steps,
        cfg=args.cfg,
        shift=args.shift,
        seed=args.seed,
        prompt=args.prompt,  # None: the reference's (GenerateSettings.resolved)
        negative_prompt=args.negative_prompt,
    ).shot_settings()
    outputs = ShotOutputs(
        video=args.output_video,
        frames=args.output_frames,
        composite_video=args.composite_video,
        composite_frames=args.composite_frames,
        composite_match=args.composite_match,
        feather_px=args.feather,
        fps=args.fps,
    )
    _check(args, settings)

    def progress(stage: str, step: int, total: int, message: str) -> None:
        log.info("[%s %d/%d] %s", stage, step, total, message)

    options = {}
    if args.generator == "ex4d":
        options = dict(
            compile=args.compile,
            attention=args.attention,
            merge_lora=not args.no_merge_lora,
            rope=args.rope,
            precision=args.precision,
            conditioning=args.conditioning,
        )
    store = None
    if not args.no_cache:
        from ..service.jobstore import JobStore

        store = JobStore(args.cache_dir) if args.cache_dir else JobStore()
    vram_profile = args.vram_profile
    if args.generator == "ex4d" and getattr(args, "step_cache", None) is not None:
        from .vram import resolve_profile

        vram_profile = resolve_profile(args.vram_profile, step_cache=args.step_cache)
    gen = load_generator(
        args.generator,
        models_dir=args.models_dir,
        device=args.device,
        vram_profile=vram_profile,
        progress=progress,
        **({"gpus": args.gpus} if getattr(args, "gpus", 1) != 1 else {}),
        **options,
    )
    if args.generator == "preview":  # chain from unlabelled frames; label every written frame instead
        from .preview import _label

        gen.label, outputs.overlay = False, _label
    try:
        report = generate_shot(
            gen,
            args.color_video,
            args.mask_video,
            settings,
            outputs,
            store=store,
            generator_key=generator_key(args, options),
            progress=progress,
        )
    finally:
        gen.close()
    for kind, path in report.outputs.items():
        print(f"{kind}: {path}")
    cached = sum(1 for w in report.windows if w["cached"])
    print(
        "plan: "
        + json.dumps(
            {
                "frames": report.plan["n_out"],
                "fps": report.fps,
                "size": list(report.size),
                "windows": len(report.windows),
                "cached_windows": cached,
            }
        )
    )
    return 0


def _check(args: argparse.Namespace, settings: ShotSettings) -> None:
    """The guides, the size and the plan, checked before the generator loads (same function)."""
    from .windows import shot_plan

    shot_plan(args.color_video, args.mask_video, settings)


__all__ = ["add_arguments", "run"]
