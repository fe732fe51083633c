"""Model specifications of the depth estimators (registered with ``ex4d_backend.modelstore``).

Folder layouts are the published Hugging Face ones, under ``<models dir>/<repo id>/``:

- ``depthcrafter`` = ``tencent/DepthCrafter``: the spatio-temporal UNet, ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` at the repository root. It needs ``svd-xt``.
- ``svd-xt`` = ``stabilityai/stable-video-diffusion-img2vid-xt`` (gated: accept the licence on
  huggingface.co and set ``HF_TOKEN`` to download): only the parts DepthCrafter uses, the fp16
  variant as DepthCrafter loads it (VAE, CLIP image encoder, feature extractor, scheduler).
- ``depth-anything-v2-small|base|large`` = ``depth-anything/Depth-Anything-V2-<Size>-hf``
  (transformers layout). ``depth-anything-v2`` on the CLI means the Small model (Apache-2.0);
  Base and Large are CC-BY-NC-4.0 (non-commercial).
"""

from __future__ import annotations

from ..modelstore import ModelFile, ModelSpec

DEPTHCRAFTER = "depthcrafter"
SVD = "svd-xt"
DA2_SIZES = ("small", "base", "large")
DA2_DEFAULT = "depth-anything-v2-small"

UNET_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
SVD_FILES = (
    "feature_extractor/preprocessor_config.json",
    "image_encoder/config.json",
    "image_encoder/model.fp16.safetensors",
    "scheduler/scheduler_config.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
)
DA2_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def _files(paths: tuple[str, ...]) -> tuple[ModelFile, ...]:
    return tuple(ModelFile(p) for p in paths)


SPECS: list[ModelSpec] = [
    ModelSpec(
        name=DEPTHCRAFTER,
        repo_id="tencent/DepthCrafter",
        files=_files(UNET_FILES),
        purpose="video depth (the EX-4D reference): DepthCrafter spatio-temporal UNet, ~3 GB",
        requires=(SVD,),
        check="ex4d_backend.depth.depthcrafter:check_unet_folder",
        license="DepthCrafter licence (see the model page)",
    ),
    ModelSpec(
        name=SVD,
        repo_id="stabilityai/stable-video-diffusion-img2vid-xt",
        files=_files(SVD_FILES),
        purpose="Stable Video Diffusion parts DepthCrafter runs on (VAE, CLIP image encoder), fp16, ~1.5 GB",
        check="ex4d_backend.depth.depthcrafter:check_svd_folder",
        license="Stability AI Community License (see the model page)",
        gated=True,
    ),
] + [
    ModelSpec(
        name=f"depth-anything-v2-{size}",
        repo_id=f"depth-anything/Depth-Anything-V2-{size.capitalize()}-hf",
        files=_files(DA2_FILES),
        purpose=f"per-frame depth, Depth Anything V2 {size.capitalize()} ({mb}), fast alternative to DepthCrafter",
        check="ex4d_backend.depth.depth_anything:check_folder",
        license=lic,
    )
    for size, mb, lic in (
        ("small", "~100 MB", "Apache-2.0"),
        ("base", "~390 MB", "CC-BY-NC-4.0 (non-commercial)"),
        ("large", "~1.3 GB", "CC-BY-NC-4.0 (non-commercial)"),
    )
]
