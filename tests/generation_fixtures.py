"""Tiny random-weight Wan2.1-I2V + EX-4D models in the published file layout (built at test time).

Real diffsynth classes at toy sizes: DiT (2 layers, width 256, 2 heads), umT5 encoder (width 64),
VAE (base width 16), CLIP ViT image tower (1 + 1 layers; width 1280 and 257 tokens are fixed by the
DiT), a word-level tokenizer, and an ``ex4d.ckpt`` with the reference key names and non-zero LoRA /
camera-encoder weights. Nothing here is committed as a binary: everything is written under a pytest
temporary folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WAN_REPO = "Wan-AI/Wan2.1-I2V-14B-480P"
EX4D_REPO = "yihouxiang/EX-4D"
DIT_CFG = dict(
    dim=256,
    in_dim=36,
    ffn_dim=512,
    out_dim=16,
    text_dim=64,
    freq_dim=256,
    eps=1e-6,
    patch_size=(1, 2, 2),
    num_heads=2,
    num_layers=2,
    has_image_input=True,
)
T5_CFG = dict(vocab=64, dim=64, dim_attn=64, dim_ffn=128, num_heads=2, num_layers=2, num_buckets=32, shared_pos=False)
VAE_DIM = 16
CLIP_CFG = dict(embed_dim=64, vision_dim=1280, vision_mlp_ratio=1, vision_heads=16, vision_layers=2)
ENCODER_HIDDEN = 32


def build_dit(seed: int = 0) -> torch.nn.Module:
    from diffsynth.models.wan_video_dit import WanModel

    torch.manual_seed(seed)
    return WanModel(**DIT_CFG).eval()


def write_dit(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in build_dit(seed).state_dict().items()}
    keys = sorted(state)
    for i in range(7):
        part = {k: state[k] for k in keys[i::7]}
        save_file(part, str(folder / f"diffusion_pytorch_model-{i + 1:05d}-of-00007.safetensors"))
    return state


def write_text_encoder(folder: Path, seed: int = 1) -> None:
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder

    torch.manual_seed(seed)
    torch.save(WanTextEncoder(**T5_CFG).state_dict(), folder / "models_t5_umt5-xxl-enc-bf16.pth")


def write_vae(folder: Path, seed: int = 2) -> None:
    from diffsynth.models.wan_video_vae import VideoVAE_

    torch.manual_seed(seed)
    torch.save(VideoVAE_(dim=VAE_DIM, z_dim=16).state_dict(), folder / "Wan2.1_VAE.pth")


def write_image_encoder(folder: Path, seed: int = 3) -> None:
    from diffsynth.models.wan_video_image_encoder import clip_xlm_roberta_vit_h_14

    torch.manual_seed(seed)
    model = clip_xlm_roberta_vit_h_14(pretrained=False, return_transforms=False, **CLIP_CFG)
    state = dict(model.state_dict())
    state["textual.token_embedding.weight"] = torch.zeros(4, 8)  # the published file has a text tower
    torch.save(state, folder / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")


PREPEND_SCHEMES = ("always", "first", "never")


def write_tokenizer(folder: Path, prepend_scheme: str = "always") -> None:
    """A umT5-like tokenizer folder: ``tokenizer.json`` with a Unigram model (pad 0, eos 1, unk 2, as
    umT5), a Metaspace pre-tokenizer with the given ``prepend_scheme`` and a post-processor appending
    ``</s>``; ``tokenizer_config.json`` naming ``T5Tokenizer`` (as google/umt5-xxl), the special tokens
    map and a SentencePiece ``spiece.model`` (the published file list). Ids stay below the tiny
    text encoder's vocabulary (64)."""
    import io

    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    from ex4d_backend.generation.conditioning import REFERENCE_NEGATIVE, REFERENCE_PROMPT

    folder.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.-"]
    seen = {p for p, _ in pieces}
    for word in (REFERENCE_PROMPT + " " + REFERENCE_NEGATIVE).lower().replace(",", " ").split():
        for piece in ("\u2581" + word, word):
            if len(pieces) < T5_CFG["vocab"] and piece not in seen:
                pieces.append((piece, -1.0 - 0.01 * len(pieces)))
                seen.add(piece)
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend_scheme, split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=prepend_scheme, split=True)
    tok.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {**special, "tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([REFERENCE_PROMPT, REFERENCE_NEGATIVE] * 8),
        model_writer=model,
        vocab_size=40,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())


def ex4d_state(seed: int = 4, *, zero_encoder: bool = False, lora_scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A tiny ex4d.ckpt state dict: every LoRA tensor of the tiny DiT + the 8 camera-encoder tensors."""
    from ex4d_backend.generation.camera_encoder import CamVidEncoder
    from ex4d_backend.generation.loading import inject_lora

    gen = torch.Generator().manual_seed(seed)
    dit = inject_lora(build_dit())
    state = {k: torch.randn(v.shape, generator=gen) * lora_scale for k, v in dit.state_dict().items() if ".lora_" in k}
    enc = CamVidEncoder(16, ENCODER_HIDDEN, DIT_CFG["dim"], DIT_CFG["patch_size"])
    for k, v in enc.state_dict().items():
        zero = zero_encoder and k.startswith("latent_patch_embedding")
        state[k] = torch.zeros(v.shape) if zero else torch.randn(v.shape, generator=gen) * 0.05
    return state


def make_models_dir(root: Path, *, zero_encoder: bool = False) -> Path:
    """Write the whole tiny models directory; returns ``root``."""
    wan = root / WAN_REPO
    wan.mkdir(parents=True, exist_ok=True)
    write_dit(wan)
    write_text_encoder(wan)
    write_vae(wan)
    write_image_encoder(wan)
    write_tokenizer(wan / "google" / "umt5-xxl")
    ex4d = root / EX4D_REPO
    ex4d.mkdir(parents=True, exist_ok=True)
    torch.save(ex4d_state(zero_encoder=zero_encoder), ex4d / "ex4d.ckpt")
    return root


def guide(t: int = 5, h: int = 64, w: int = 64, seed: int = 0):
    """A small guide: smooth colour video and a mask with a moving hole (255 = keep, 0 = fill)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    color = np.empty((t, h, w, 3), np.uint8)
    mask = np.full((t, h, w), 255, np.uint8)
    for i in range(t):
        color[i, ..., 0] = (xx * 255 // w + 10 * i) % 256
        color[i, ..., 1] = yy * 255 // h
        color[i, ..., 2] = rng.integers(0, 60)
        if i > 0:
            mask[i, :, w - (w // 4 + 2 * i) :] = 0
    return color, mask


_SHARED: dict[str, Path] = {}


def shared_models_dir(tmp_path_factory) -> Path:
    """One tiny models directory per test session (built once, ~2 s), shared by the test files."""
    if "root" not in _SHARED:
        _SHARED["root"] = make_models_dir(tmp_path_factory.mktemp("gen_models"))
    return _SHARED["root"]


def variant(base: Path, dest: Path, *, drop: tuple[str, ...] = (), write: dict | None = None) -> Path:
    """A models directory at ``dest`` whose files are symlinks into ``base``, minus ``drop`` and with
    ``write`` = {relative path: bytes or a state dict to torch.save} written as real files."""
    write = write or {}
    for src in base.rglob("*"):
        rel = src.relative_to(base).as_posix()
        if src.is_dir() or rel in drop or rel in write:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).symlink_to(src)
    for rel, content in write.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (dest / rel).write_bytes(content)
        else:
            torch.save(content, dest / rel)
    return dest


CKPT = f"{EX4D_REPO}/ex4d.ckpt"
SHARD = f"{WAN_REPO}/diffusion_pytorch_model-{{:05d}}-of-00007.safetensors"


# ------------------------------------------------------------------------- the reference pipeline
REPO = Path(__file__).resolve().parents[1]
REFERENCE_HELPER = REPO / "tests" / "reference_ex4d_112.py"


def reference_python() -> Path:
    """The dev install's reference side environment's Python (``$EX4D_REF112_PYTHON`` or
    ``<repo>/.venv-ref112``); a test failure (not a skip) when it is missing."""
    import os

    import pytest

    py = Path(os.environ.get("EX4D_REF112_PYTHON") or REPO / ".venv-ref112" / "bin" / "python")
    if not py.exists():
        pytest.fail(
            f"{py} is missing: run `python3 scripts/install_deps.py --dev` (it makes the reference environment)"
        )
    return py


def run_in_reference_env(args: list[str], timeout: int = 900) -> str:
    """Run ``args`` with the side environment's Python (no PYTHONPATH: nothing of ours shadows 1.1.2)."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(reference_python()), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def reference_generate(models: Path, folder: Path, cases: dict[str, tuple]) -> tuple[dict, dict]:
    """The reference pipeline (tests/reference_ex4d_112.py: diffsynth 1.1.2 + EX-4D's edits) on each case
    ``name: (color uint8 (T, H, W, 3), mask uint8 (T, H, W), opts)`` in one side-environment process.
    Returns ({name: {"latents", "frames", ...}}, the helper's info: loaded counts, versions)."""
    import numpy as np

    from ex4d_backend.generation.conditioning import REFERENCE_NEGATIVE, REFERENCE_PROMPT

    folder.mkdir(parents=True, exist_ok=True)
    todo = []
    for name, (color, mask, opts) in cases.items():
        np.savez(folder / f"{name}_guide.npz", color=color, mask=mask)
        opts = {"prompt": REFERENCE_PROMPT, "negative_prompt": REFERENCE_NEGATIVE, **opts}
        todo.append({"guide": str(folder / f"{name}_guide.npz"), "out": str(folder / f"{name}_ref.npz"), "opts": opts})
    (folder / "cases.json").write_text(json.dumps(todo))
    cache = _reference_cache(models, todo)
    if cache is not None and (cache / "info.json").is_file():  # the reference's outputs do not depend on our code
        info = json.loads((cache / "info.json").read_text())
        return {name: dict(np.load(cache / f"{name}_ref.npz")) for name in cases}, info
    out = run_in_reference_env([str(REFERENCE_HELPER), str(models), str(folder / "cases.json")])
    info = json.loads(out.strip().splitlines()[-1])
    if cache is not None:
        import shutil

        cache.mkdir(parents=True, exist_ok=True)
        for name in cases:
            shutil.copy(folder / f"{name}_ref.npz", cache / f"{name}_ref.npz")
        (cache / "info.json").write_text(json.dumps(info))
    return {name: dict(np.load(folder / f"{name}_ref.npz")) for name in cases}, info


def _reference_cache(models: Path, todo: list[dict]) -> Path | None:
    """``$EX4D_REF112_CACHE/<hash of the model files, guides, options and the helper>`` (developer use, e.g.
    mutation testing: the reference runs once), or None when the variable is unset."""
    import hashlib
    import os

    root = os.environ.get("EX4D_REF112_CACHE")
    if not root:
        return None
    h = hashlib.sha256(REFERENCE_HELPER.read_bytes())
    for f in sorted(p for p in models.rglob("*") if p.is_file()):
        h.update(f.relative_to(models).as_posix().encode() + f.read_bytes())
    for case in todo:
        h.update(Path(case["guide"]).read_bytes() + json.dumps(case["opts"], sort_keys=True).encode())
    return Path(root) / h.hexdigest()[:16]


def assert_matches_reference(frames, latents, ref: dict, *, latents_rel_l2: float = 1e-4) -> dict:
    """Issue 13's bar: final latents within relative L2 ``latents_rel_l2``; frames at most 1 level apart on
    at most 0.1% of the values. Returns the figures."""
    import numpy as np

    figures = {}
    if latents is not None:
        rel = float(np.linalg.norm(np.asarray(latents) - ref["latents"]) / np.linalg.norm(ref["latents"]))
        figures["latents_rel_l2"] = rel
        assert rel <= latents_rel_l2, f"final latents relative L2 {rel:.2e}"
    diff = np.abs(np.asarray(frames).astype(int) - ref["frames"].astype(int))
    figures.update(frames_max=int(diff.max()), frames_off=float((diff > 0).mean()))
    assert np.asarray(frames).shape == ref["frames"].shape
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, figures
    return figures
