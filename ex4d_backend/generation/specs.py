"""Model specifications for generation: Wan2.1-I2V-14B-480P and the EX-4D checkpoint.

Files are in the published Hugging Face layouts (``<models>/<repo_id>/<file>``); the lead's
``modelstore`` checks presence (``modelstore.require``) and downloads / verifies them.
"""

from __future__ import annotations

from ..modelstore import ModelFile, ModelSpec

WAN_NAME = "wan2.1-i2v-14b-480p"
WAN_REPO = "Wan-AI/Wan2.1-I2V-14B-480P"
EX4D_NAME = "ex4d"
EX4D_REPO = "yihouxiang/EX-4D"

DIT_SHARDS = tuple(f"diffusion_pytorch_model-{i:05d}-of-00007.safetensors" for i in range(1, 8))
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
TOKENIZER_DIR = "google/umt5-xxl"
TOKENIZER_FILES = ("special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer_config.json")
EX4D_FILE = "ex4d.ckpt"

SPECS: list[ModelSpec] = [
    ModelSpec(
        name=WAN_NAME,
        repo_id=WAN_REPO,
        files=tuple(ModelFile(p) for p in DIT_SHARDS)
        + (ModelFile(T5_FILE), ModelFile(VAE_FILE), ModelFile(CLIP_FILE))
        + tuple(ModelFile(f"{TOKENIZER_DIR}/{f}") for f in TOKENIZER_FILES),
        purpose="Wan2.1 image-to-video 14B (480P): DiT, umT5 text encoder, VAE, CLIP image encoder (~80 GB)",
    ),
    ModelSpec(
        name=EX4D_NAME,
        repo_id=EX4D_REPO,
        files=(ModelFile(EX4D_FILE),),
        purpose="EX-4D LoRA (800 tensors) and camera encoder (8 tensors) for Wan2.1-I2V-14B",
    ),
]
