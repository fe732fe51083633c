"""``ex4d doctor``: versions, GPU, renderer, models and VRAM profile; what can run here.

Exit status: 0 everything can run; 1 EX-4D generation cannot run (no GPU, unsupported GPU, too
little VRAM, missing libraries or models) but the recon and the preview generator work; 2 the
installation is broken (re-run ``scripts/install_deps.py``). The last line says why.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="check this installation and say what can run", description=__doc__)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--models-dir", help="models directory (default: $EX4D_MODELS_DIR or ~/.cache/ex4d/models)")
    p.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..doctor import format_report, report

    rep = report(models_dir=args.models_dir, device_index=args.device)
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    return int(rep["status"])
