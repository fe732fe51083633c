"""``ex4d generate``: guide videos (colour + mask from ``ex4d recon``) -> the new-view video."""

from __future__ import annotations

import argparse
import logging

from ..generation import GENERATORS
from ..generation.conditioning import CONDITIONING_MODES, RESIZE_MODES
from ..pipeline.settings import GenerateSettings

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="fill the guide's holes: EX-4D (Wan2.1-I2V-14B + EX-4D) or the weight-free preview",
        description=(
            "Generate the shot seen from the new camera from the guide colour and mask videos. "
            "--generator ex4d needs the Wan2.1-I2V-14B-480P and EX-4D weights (see `ex4d models`); "
            "--generator preview needs none (OpenCV inpainting, labelled PREVIEW)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--color-video", required=True, help="guide colour video or image-sequence folder")
    p.add_argument("--mask-video", required=True, help="guide mask video or folder (white = seen, black = fill)")
    p.add_argument("--output-video", required=True, help="output mp4")
    p.add_argument("--output-frames", default=None, help="also write the frames as PNGs into this folder")
    d = GenerateSettings()  # the reference's defaults (constants.py)
    p.add_argument("--generator", choices=GENERATORS, default=d.generator)
    p.add_argument("--models-dir", default=None, help="models directory (default: $EX4D_MODELS_DIR or the cache)")
    # --height/--width/--frames default to None (windows_cli.add_arguments): the size follows the guide's aspect
    p.add_argument("--height", type=int, default=None, help="output height, multiple of 16 (overrides --size)")
    p.add_argument("--width", type=int, default=None, help="output width, multiple of 16 (overrides --size)")
    p.add_argument("--frames", type=int, default=None, help="old name of --window (frames per generator call, 4k+1)")
    p.add_argument("--steps", type=int, default=d.steps, help="denoising steps")
    p.add_argument("--cfg", type=float, default=d.cfg, help="classifier-free guidance scale")
    p.add_argument("--shift", type=float, default=d.shift, help="flow-matching sigma shift")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the noise and of the mask erosion")
    p.add_argument("--prompt", default=None, help="text prompt (default: the reference's)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (default: the reference's)")
    p.add_argument(
        "--resize",
        choices=RESIZE_MODES,
        default=d.resize,
        help="crop keeps the guide's aspect (centred crop); stretch squashes like the reference",
    )
    p.add_argument(
        "--vram-profile",
        choices=("full", "24gb", "12gb", "fast"),
        default=d.vram_profile,
        help="fast: FP8 linear layers + 8-bit attention + compile (GPU of compute capability >= 8.9; not exact)",
    )
    p.add_argument(
        "--step-cache",
        type=float,
        default=None,
        metavar="THRESHOLD",
        help="skip DiT evaluations whose output would barely change (off by default; e.g. 0.1; quality unverified)",
    )
    p.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="GPUs for one clip: 2 = one CFG branch each; 4, 8, 10 (or 5) add sequence parallel within a branch",
    )
    p.add_argument("--device", default=d.device, help="auto, cuda, cuda:1 or cpu")
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the colour video's)")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the DiT blocks (GPU; ~1 min once, then faster steps)"
    )
    p.add_argument(
        "--attention", choices=("auto", "cudnn", "flash"), default="auto", help="SDPA kernel for the DiT attention"
    )
    p.add_argument(
        "--rope",
        choices=("float32", "float64"),
        default="float32",
        help="rotary-embedding precision; float64 runs diffsynth's (and the reference's) complex128 code",
    )
    p.add_argument(
        "--no-merge-lora",
        action="store_true",
        help="run the EX-4D LoRA as separate peft layers (the reference's arithmetic) instead of merged weights",
    )
    p.add_argument(
        "--precision",
        choices=("bf16", "reference"),
        default="bf16",
        help="GPU arithmetic: bf16 (faster) or reference (bf16 autocast with the reference's float32 islands)",
    )
    p.add_argument(
        "--conditioning",
        choices=CONDITIONING_MODES,
        default="reference",
        help="reference: the bf16-rounded guide and 8-bit first frame of generate.py; float: no rounding",
    )
    from ..generation import windows_cli

    windows_cli.add_arguments(p)  # --window/--overlap/--chain-variant/--frame-sampling/--size/--composite-*
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Every frame of the guide at its fps as chained windows (or ``--frame-sampling reference``):
    see :mod:`ex4d_backend.generation.windows`."""
    from pathlib import Path

    from ..errors import Ex4dError
    from ..generation import windows_cli

    for flag, path in (("--output-video", args.output_video), ("--composite-video", args.composite_video)):
        if path and Path(path).is_dir():
            raise Ex4dError(f"{flag} is a folder", where=str(path), hint="give a file name ending in .mp4")
    return windows_cli.run(args)
