"""The GPU benchmark script runs (tiny configs, CPU) and its full-size configs are DepthCrafter's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_depthcrafter.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_depthcrafter", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_full_size_configs_have_the_published_parameter_counts():
    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ex4d_backend.depth import depthcrafter as dc

    b = _load()
    with torch.device("meta"):
        unet = dc._unet_class()(**b.UNET_CONFIG)
        vae = AutoencoderKLTemporalDecoder(**b.VAE_CONFIG)
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**b.CLIP_CONFIG))
    # SVD-xt / DepthCrafter UNet 1.52 B, SVD temporal VAE 97.7 M, OpenCLIP ViT-H/14 vision tower 632 M
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 1524.6
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6, 1) == 97.7
    assert round(sum(p.numel() for p in clip.parameters()) / 1e6, 1) == 632.1


def test_benchmark_script_runs_tiny_on_cpu(capsys):
    b = _load()
    assert (
        b.main(["--tiny", "--device", "cpu", "--frames", "3", "--width", "64", "--height", "64", "--steps", "1"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["frames"] == 3 and out["options"]["window"] == 110 and out["options"]["overlap"] == 25
    for run in ("cold", "warm"):
        r = out["runs"][run]
        assert r["finite"] and r["output_shape"] == [3, 64, 64] and r["seconds"] > 0
