"""Tiny random-weight depth models, built with the real classes and saved in the published layouts.

Nothing is downloaded and nothing binary is committed: each builder writes a models directory
(``<root>/<repo id>/...``) exactly as ``ex4d models download`` would lay it out, with configs shrunk
to a few hundred KB so the real loading and inference code runs end to end on the CPU in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

# The published SVD-xt scheduler settings (stabilityai/stable-video-diffusion-img2vid-xt/scheduler).
SVD_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "trained_betas": None,
    "use_karras_sigmas": True,
}
CLIP_PREPROCESSOR = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}
DPT_PREPROCESSOR = {
    "do_normalize": True,
    "do_pad": False,
    "do_rescale": True,
    "do_resize": True,
    "ensure_multiple_of": 14,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "DPTImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "keep_aspect_ratio": True,
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 518, "width": 518},
}

# Tiny shapes. The VAE keeps 4 levels, hence SVD's 8x downsampling.
TINY_UNET = {
    "sample_size": 8,
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    "up_block_types": ("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    "block_out_channels": (32, 64),
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24,
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "transformer_layers_per_block": 1,
    "num_attention_heads": (2, 4),
    "num_frames": 25,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "block_out_channels": (32, 32, 32, 32),
    "layers_per_block": 1,
    "latent_channels": 4,
    "sample_size": 64,
}
TINY_CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 32,
}


def build_depthcrafter(root: Path, seed: int = 0) -> Path:
    """``<root>/tencent/DepthCrafter`` and the used parts of ``<root>/stabilityai/stable-video-diffusion-img2vid-xt``."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet_dir = root / "tencent" / "DepthCrafter"
    UNetSpatioTemporalConditionModel(**TINY_UNET).save_pretrained(unet_dir)
    svd = root / "stabilityai" / "stable-video-diffusion-img2vid-xt"
    AutoencoderKLTemporalDecoder(**TINY_VAE).half().save_pretrained(svd / "vae", variant="fp16")
    CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)).half().save_pretrained(
        svd / "image_encoder", variant="fp16"
    )
    EulerDiscreteScheduler(**SVD_SCHEDULER).save_config(svd / "scheduler")
    (svd / "feature_extractor").mkdir(parents=True, exist_ok=True)
    (svd / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR, indent=2))
    return root


def build_depth_anything(root: Path, size: str = "small", seed: int = 0, side: int = 518) -> Path:
    """``<root>/depth-anything/Depth-Anything-V2-<Size>-hf`` with a tiny DINOv2 + DPT head.

    ``side``: the processor's target size (published: 518); smaller makes tests that only need *a*
    provider (the cache tests) faster."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(seed)
    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=518,
        patch_size=14,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        depth_estimation_type="relative",
    )
    folder = root / "depth-anything" / f"Depth-Anything-V2-{size.capitalize()}-hf"
    model = DepthAnythingForDepthEstimation(config)
    # transformers' init (std 0.02) gives outputs of ~1e-7 that barely depend on the image; PyTorch's
    # default init and a positive output bias give O(1) disparity with real spatial structure.
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
            mod.reset_parameters()
    with torch.no_grad():
        model.head.conv3.weight.mul_(20.0)
        model.head.conv3.bias.fill_(2.0)
    model.save_pretrained(folder)
    pre = {**DPT_PREPROCESSOR, "size": {"height": side, "width": side}}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return root


# ----------------------------------------------------------------------------------------------
# pytest fixtures (import them into a test module: ``from depth_fixtures import depth_models``)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def depth_models(tmp_path_factory) -> Path:
    """A read-only models directory with tiny DepthCrafter + SVD parts + Depth Anything V2 Small.

    Built once per test session; tests that damage files must copy it first (``copy_models``).
    """
    if "root" not in _BUILT:
        root = tmp_path_factory.mktemp("depth-models")
        build_depthcrafter(root)
        build_depth_anything(root, "small")
        _BUILT["root"] = root
    return _BUILT["root"]


@pytest.fixture(scope="session")
def fast_depth_models(tmp_path_factory) -> Path:
    """A models directory with only a tiny Depth Anything V2 Small whose processor works at 98 px."""
    if "fast" not in _BUILT:
        root = tmp_path_factory.mktemp("fast-depth-models")
        build_depth_anything(root, "small", side=98)
        _BUILT["fast"] = root
    return _BUILT["fast"]


def copy_models(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def gradient_clip(n: int = 10, h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 (n, h, w, 3): a colour gradient drifting right one pixel per frame, with a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    for t in range(n):
        img = np.stack([(xx + t) * 255 / (w + n), yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
        frames.append(np.clip(img + rng.normal(0, 2, img.shape), 0, 255))
    return np.stack(frames).astype(np.uint8)
