"""Build the diffsynth 2.x Wan modules from the published files, and load + verify ``ex4d.ckpt``.

Module sizes (width, layers, heads, ...) are read from the tensor shapes in the files, so the same
code loads the 14B release and the tiny random-weight models of the tests. Modules are created on
the ``meta`` device and the file tensors are assigned directly on the target device in the target
dtype (no second copy, no fp32 detour for the ~65 GB fp32 DiT shards).

Every problem a user can cause (missing file, truncated file, tensors of another model, a checkpoint
with the wrong keys) is one :class:`~ex4d_backend.errors.Ex4dError` with code ``model_invalid``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import MODEL_INVALID, Ex4dError
from ..modelstore import tensor_mismatch
from . import specs
from .camera_encoder import CamVidEncoder

log = logging.getLogger(__name__)

LORA_RANK = 16
LORA_ALPHA = 16
LORA_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")
# What ex4d.ckpt holds for the 14B DiT (reference figures; checked against the built model).
REFERENCE_LORA_TENSORS = 800
REFERENCE_LORA_PARAMS = 76_677_120
REFERENCE_ENCODER_TENSORS = 8
REFERENCE_ENCODER_PARAMS = 23_109_632
HEAD_DIM = 128  # Wan2.1: 5120 / 40 heads (14B), 1536 / 12 heads (1.3B)


def _invalid(what: str, path: Path, hint: str | None = None) -> Ex4dError:
    return Ex4dError(
        what,
        where=str(path),
        hint=hint or "the file is truncated or is not the published one: download it again",
        code=MODEL_INVALID,
    )


def _count_blocks(keys, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def _assign(module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Load ``state`` into a meta-device ``module`` (strict); one clear error on a mismatch."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    mismatch = tensor_mismatch(expected, {k: tuple(v.shape) for k, v in state.items()})
    if mismatch:
        raise _invalid(f"the {what} weights do not fit the model: {mismatch}", path)
    module.load_state_dict(state, strict=True, assign=True)


def _torch_load(path: Path) -> dict:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means a bad file
        raise _invalid(f"cannot read {path.name} ({type(exc).__name__}: {str(exc)[:120]})", path) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise _invalid(f"{path.name} is not a state dict of tensors", path)
    return obj


# ----------------------------------------------------------------------------------------- DiT
def load_dit(folder: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The Wan I2V DiT (``diffsynth.models.wan_video_dit.WanModel``) from the 7 safetensors shards."""
    from diffsynth.models.wan_video_dit import WanModel, precompute_freqs_cis_3d
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for name in specs.DIT_SHARDS:
        path = folder / name
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    k = key[len("model.") :] if key.startswith("model.") else key
                    state[k] = f.get_tensor(key).to(dtype)
        except Exception as exc:  # noqa: BLE001
            raise _invalid(f"cannot read DiT shard {name} ({type(exc).__name__}: {str(exc)[:120]})", path) from None
    first = folder / specs.DIT_SHARDS[0]
    if "patch_embedding.weight" not in state:
        raise _invalid("the DiT shards hold no 'patch_embedding.weight': not a Wan2.1 DiT", first)
    pe = state["patch_embedding.weight"].shape
    dim, in_dim, patch = pe[0], pe[1], tuple(pe[2:])
    cfg = dict(
        dim=dim,
        in_dim=in_dim,
        ffn_dim=state["blocks.0.ffn.0.weight"].shape[0],
        out_dim=state["head.head.weight"].shape[0] // (patch[0] * patch[1] * patch[2]),
        text_dim=state["text_embedding.0.weight"].shape[1],
        freq_dim=state["time_embedding.0.weight"].shape[1],
        eps=1e-6,
        patch_size=patch,
        num_heads=max(1, dim // HEAD_DIM),
        num_layers=_count_blocks(state, "blocks."),
        has_image_input="img_emb.proj.0.weight" in state,
    )
    if not cfg["has_image_input"] or in_dim != 36:
        raise _invalid(f"the DiT is not an image-to-video Wan2.1 model (in_dim {in_dim}, needs 36)", first)
    with torch.device("meta"):
        dit = WanModel(**cfg)
    _assign(dit, state, folder, "DiT")
    dit.freqs = precompute_freqs_cis_3d(dim // cfg["num_heads"])  # built on meta above: recompute
    log.debug("DiT: %s", cfg)
    return dit.eval().requires_grad_(False)


# -------------------------------------------------------------------------------- text encoder
def load_text_encoder(folder: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The umT5-xxl encoder (``WanTextEncoder``) from ``models_t5_umt5-xxl-enc-bf16.pth``."""
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder

    path = folder / specs.T5_FILE
    state = _torch_load(path)
    try:
        vocab, dim = state["token_embedding.weight"].shape
        cfg = dict(
            vocab=vocab,
            dim=dim,
            dim_attn=state["blocks.0.attn.q.weight"].shape[0],
            dim_ffn=state["blocks.0.ffn.fc1.weight"].shape[0],
            num_heads=state["blocks.0.pos_embedding.embedding.weight"].shape[1],
            num_layers=_count_blocks(state, "blocks."),
            num_buckets=state["blocks.0.pos_embedding.embedding.weight"].shape[0],
            shared_pos=False,
        )
    except KeyError as exc:
        raise _invalid(f"{path.name} is not a umT5 encoder (no {exc})", path) from None
    with torch.device("meta"):
        enc = WanTextEncoder(**cfg)
    _assign(enc, {k: v.to(device, dtype) for k, v in state.items()}, path, "text encoder")
    return enc.eval().requires_grad_(False)


class Umt5Tokenizer:
    """The umT5 tokenizer as the reference reads it: ``tokenizer.json`` through the ``tokenizers``
    library exactly as written (its normalizer, Metaspace pre-tokenizer with the file's
    ``prepend_scheme``, post-processor adding ``</s>``), which is what transformers 4.51.x's fast
    tokenizer (the reference's pin, 4.51.3) runs. transformers 5.x instead rebuilds the Metaspace
    pre-tokenizer from its own defaults, which changes the ids when the file says otherwise.

    Called like diffsynth's ``HuggingfaceTokenizer`` (``clean="whitespace"``: ftfy, HTML unescape,
    whitespace collapsed): ``ids, mask = tok(prompts, return_mask=True)``, int64 (B, seq_len), padded
    with the pad token and truncated to ``seq_len`` (special tokens kept), as ``padding="max_length",
    truncation=True``."""

    def __init__(self, folder: Path, seq_len: int = 512):
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        pad = "<pad>"
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            try:
                cfg = json.loads((folder / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            token = cfg.get("pad_token", pad)
            pad = token.get("content", pad) if isinstance(token, dict) else token
            break
        pad_id = self.tokenizer.token_to_id(pad)
        if pad_id is None:
            raise ValueError(f"the pad token {pad!r} is not in tokenizer.json")
        self.seq_len = seq_len
        self.tokenizer.enable_truncation(max_length=seq_len)
        self.tokenizer.enable_padding(length=seq_len, pad_id=pad_id, pad_token=pad)

    @staticmethod
    def clean(text: str) -> str:
        from diffsynth.models.wan_video_text_encoder import basic_clean, whitespace_clean

        return whitespace_clean(basic_clean(text))

    def __call__(self, sequence, return_mask: bool = False, add_special_tokens: bool = True):
        texts = [sequence] if isinstance(sequence, str) else list(sequence)
        enc = self.tokenizer.encode_batch([self.clean(t) for t in texts], add_special_tokens=add_special_tokens)
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
        return (ids, mask) if return_mask else ids


def load_tokenizer(folder: Path, seq_len: int = 512) -> Umt5Tokenizer:
    """The umT5 tokenizer (``google/umt5-xxl`` folder), padded/truncated to ``seq_len`` tokens; ids equal
    transformers 4.51.x's for the same folder (see :class:`Umt5Tokenizer`)."""
    path = folder / specs.TOKENIZER_DIR
    try:
        return Umt5Tokenizer(path, seq_len=seq_len)
    except Exception as exc:  # noqa: BLE001
        raise _invalid(f"cannot load the tokenizer ({type(exc).__name__}: {str(exc)[:120]})", path) from None


# ---------------------------------------------------------------------------------------- VAE
def load_vae(folder: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The Wan2.1 video VAE (``WanVideoVAE``) from ``Wan2.1_VAE.pth`` (8x spatial, 4x temporal)."""
    from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE

    path = folder / specs.VAE_FILE
    state = _torch_load(path)
    state = state.get("model_state", state)
    if "encoder.conv1.weight" not in state:
        raise _invalid(f"{path.name} is not a Wan2.1 VAE (no encoder.conv1.weight)", path)
    base = state["encoder.conv1.weight"].shape[0]
    z_dim = state["conv2.weight"].shape[0]
    vae = WanVideoVAE(z_dim=z_dim)  # mean/std constants; its default-size model is replaced below
    with torch.device("meta"):
        vae.model = VideoVAE_(dim=base, z_dim=z_dim)
    _assign(vae.model, {k: v.to(device, dtype) for k, v in state.items()}, path, "VAE")
    return vae.eval().requires_grad_(False)


# ------------------------------------------------------------------------------ image encoder
def load_image_encoder(folder: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The open-clip XLM-RoBERTa ViT-H/14 image tower (``WanImageEncoder``); text tower dropped."""
    from diffsynth.models.wan_video_image_encoder import WanImageEncoder, clip_xlm_roberta_vit_h_14

    path = folder / specs.CLIP_FILE
    state = {k: v for k, v in _torch_load(path).items() if not k.startswith("textual.")}
    try:
        pe = state["visual.patch_embedding.weight"].shape
        dim, patch = pe[0], pe[2]
        n_pos = state["visual.pos_embedding"].shape[1]
        cfg = dict(
            embed_dim=state["visual.head"].shape[1],
            image_size=int(round((n_pos - 1) ** 0.5)) * patch,
            patch_size=patch,
            vision_dim=dim,
            vision_mlp_ratio=state["visual.transformer.0.mlp.0.weight"].shape[0] // dim,
            vision_heads=max(1, dim // 80),
            vision_layers=_count_blocks(state, "visual.transformer."),
        )
    except KeyError as exc:
        raise _invalid(f"{path.name} is not an open-clip ViT image encoder (no {exc})", path) from None
    enc = WanImageEncoder.__new__(WanImageEncoder)
    nn.Module.__init__(enc)
    model, transforms = clip_xlm_roberta_vit_h_14(
        pretrained=False, return_transforms=True, return_tokenizer=False, device="meta", **cfg
    )
    enc.model, enc.transforms = model, transforms
    _assign(enc.model, {k: v.to(device, dtype) for k, v in state.items()}, path, "image encoder")
    return enc.eval().requires_grad_(False)


# ------------------------------------------------------------------------- EX-4D checkpoint
def inject_lora(dit: nn.Module) -> nn.Module:
    """Add EX-4D's LoRA to the DiT with peft, as the reference does (r=16, alpha=16,
    targets q, k, v, o, ffn.0, ffn.2: self- and cross-attention and the FFN; not k_img/v_img)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS))
    return inject_adapter_in_model(config, dit)


def lora_to_float32(dit: nn.Module) -> int:
    """Store every LoRA tensor in float32, as the reference's ``add_lora_to_model`` does (its trainable
    parameters are cast to float32 before ``ex4d.ckpt`` is loaded). Returns the number of tensors cast."""
    n = 0
    for name, p in dit.named_parameters():
        if ".lora_" in name and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


def build_camera_encoder(dit: nn.Module, hidden: int = 1024) -> CamVidEncoder:
    return CamVidEncoder(latent_channels=16, hidden=hidden, dim=dit.dim, patch=tuple(dit.patch_size))


def load_ex4d_checkpoint(
    path: Path, dit: nn.Module, device: torch.device, dtype: torch.dtype
) -> tuple[CamVidEncoder, dict]:
    """Load ``ex4d.ckpt`` into the LoRA-injected ``dit`` and a new camera encoder.

    Every LoRA tensor of the DiT and every camera-encoder tensor must be present with the right
    shape and nothing else may be in the file (for the 14B DiT: 800 LoRA tensors = 76,677,120
    parameters, 8 encoder tensors = 23,109,632 parameters); otherwise one error lists what is
    missing or unexpected. (The reference loads with strict=False, which silently loads nothing if
    a key prefix is off.) Returns the encoder and the counts.
    """
    state = _torch_load(path)
    lora_expected = {k: tuple(v.shape) for k, v in dit.state_dict().items() if ".lora_" in k}
    hidden = state["latent_encoder.0.weight"].shape[0] if "latent_encoder.0.weight" in state else 1024
    with torch.device("meta"):
        encoder = build_camera_encoder(dit, hidden)
    enc_expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    expected = {**lora_expected, **enc_expected}
    mismatch = tensor_mismatch(expected, {k: tuple(v.shape) for k, v in state.items()})
    if mismatch:
        n_lora = sum(1 for k in lora_expected if k in state)
        n_enc = sum(1 for k in enc_expected if k in state)
        what = (
            f"{path.name} does not fit the model: {n_lora} of {len(lora_expected)} LoRA tensors and "
            f"{n_enc} of {len(enc_expected)} camera-encoder tensors found; {mismatch}"
        )
        hint = "download yihouxiang/EX-4D ex4d.ckpt again; keys must be flat, e.g. blocks.0.self_attn.q.lora_A.default.weight"
        missing, unexpected = mismatch.missing, mismatch.unexpected
        if unexpected and missing and any(u.endswith(missing[0]) for u in unexpected):
            prefix = next(u for u in unexpected if u.endswith(missing[0]))[: -len(missing[0])]
            hint = f"the keys carry an extra prefix '{prefix}': save the checkpoint without it"
        raise _invalid(what, path, hint)
    # into each LoRA parameter's own dtype (float32 when reference precision made them so: no bf16 detour)
    lora_state = {k: state[k].to(device) for k in lora_expected}
    result = dit.load_state_dict(lora_state, strict=False)
    if result.unexpected_keys:  # cannot happen after the check above; never load silently
        raise _invalid(f"LoRA keys not in the DiT: {result.unexpected_keys[:3]}", path)
    encoder.load_state_dict({k: state[k].to(device, dtype) for k in enc_expected}, strict=True, assign=True)
    counts = {
        "lora_tensors": len(lora_expected),
        "lora_params": sum(state[k].numel() for k in lora_expected),
        "encoder_tensors": len(enc_expected),
        "encoder_params": sum(state[k].numel() for k in enc_expected),
    }
    if dit.dim == 5120 and len(dit.blocks) == 40:
        ref = (REFERENCE_LORA_TENSORS, REFERENCE_LORA_PARAMS, REFERENCE_ENCODER_TENSORS, REFERENCE_ENCODER_PARAMS)
        if tuple(counts.values()) != ref:
            raise _invalid(f"EX-4D checkpoint counts {counts} differ from the reference {ref}", path)
    log.info(
        "EX-4D: loaded %d LoRA tensors (%d params) and %d camera-encoder tensors (%d params)",
        *counts.values(),
    )
    return encoder.eval().requires_grad_(False), counts


def merge_lora(dit: nn.Module) -> int:
    """Fold every peft LoRA layer of ``dit`` into its base Linear (W += B @ A * alpha / r, computed in
    float32, stored in the weight dtype) and put the plain Linear back in its place. Same function as
    the unmerged LoRA up to one rounding of each merged weight; saves ~10 extra matmuls and ~20 full
    activation reads per block and step. Returns the number of merged layers."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(dit.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        with torch.no_grad():
            for adapter in module.active_adapters:
                a = module.lora_A[adapter].weight.float()
                b = module.lora_B[adapter].weight.float()
                delta = (b @ a) * module.scaling[adapter]
                base.weight.copy_((base.weight.float() + delta.to(base.weight.device)).to(base.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(dit.get_submodule(parent_name) if parent_name else dit, child, base)
        merged += 1
    return merged
