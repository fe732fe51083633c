"""EX-4D generation pipeline on diffsynth 2.x: guide (colour + mask) -> new-view video.

Built from diffsynth's Wan modules (``WanModel``, ``WanVideoVAE``, ``WanTextEncoder``,
``WanImageEncoder``), its DiT step function (``model_fn_wan_video``) and its flow-matching scheduler
(``FlowMatchScheduler("Wan")``). EX-4D adds, as the reference does:

- the LoRA (peft, r=16, alpha=16 on q, k, v, o, ffn.0, ffn.2), loaded from ``ex4d.ckpt``;
- the camera tokens: :class:`CamVidEncoder` on the VAE latents of the masked colour guide and the
  mask guide, added to the DiT patch embedding by :class:`CameraTokenHook`.

Differences from the reference, all with identical math: the two CFG branches run as one batch of 2,
the three VAE encodes (I2V first frame, colour guide, mask guide) run as one batch of 3 (``full``),
the prompt and negative prompt are encoded together, and latents are kept in float32 between steps.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .. import constants as C
from ..errors import DEVICE, Ex4dError
from .conditioning import (
    CONDITIONING_MODES,
    REFERENCE_NEGATIVE,
    REFERENCE_PROMPT,
    camera_encoder_inputs,
    cfg_combine,
    frame_mask_channels,
    guide_conditions,
    i2v_frame,
    i2v_video,
    prepare_guide,
)
from .vram import PROFILES, Placement, Profile

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int, str], None]
ATTENTION_BACKENDS = ("auto", "cudnn", "flash")


def attention_backend(name: str):
    """Context that makes ``F.scaled_dot_product_attention`` prefer the named kernel (``auto``:
    torch's own choice). Falls back through flash / memory-efficient / math when unsupported."""
    import contextlib

    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION]}[name]
    rest = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    order = first + [b for b in rest if b not in first]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # older torch: no priorities, only the allowed set
        return sdpa_kernel(order)


def resolve_device(device: str | torch.device = C.DEVICE) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Ex4dError("CUDA was requested but no NVIDIA GPU is available", where="--device", code=DEVICE)
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on the GPU (as the reference); float32 on the CPU (bf16 convolutions are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class Conditioning:
    """Everything the denoiser needs, computed once per clip."""

    context: torch.Tensor  # (B, L, 4096) text embeddings: [prompt] or [prompt, negative prompt]
    clip_feature: torch.Tensor  # (B, 257, 1280) CLIP tokens of the first guide frame
    y: torch.Tensor  # (B, 20, f, h, w): 4 first-frame mask channels + 16 latent channels
    camera_tokens: torch.Tensor  # (1, dim, f, h/2, w/2) EX-4D camera tokens


ROPE_PRECISIONS = ("float32", "float64")


def rope_apply_float32(x: torch.Tensor, freqs: torch.Tensor, num_heads: int) -> torch.Tensor:
    """diffsynth's ``rope_apply`` (x: (B, S, heads * head_dim); freqs: (S, 1, head_dim / 2) complex)
    with the rotation done in float32 real arithmetic instead of complex float64: the same result
    to ~1e-7 relative (far below the bf16 rounding of its output), one fused pass under
    ``torch.compile`` instead of ~5 passes over 4x wider float64 copies of q and k."""
    xr = x.unflatten(2, (num_heads, -1)).unflatten(-1, (-1, 2)).float()  # (B, S, n, d/2, 2)
    f = torch.view_as_real(freqs).to(torch.float32)  # (S, 1, d/2, 2): cos, sin
    cos, sin = f[..., 0], f[..., 1]
    x0, x1 = xr[..., 0], xr[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(2).to(x.dtype)


@contextlib.contextmanager
def rope_precision(precision: str):
    """While entered, diffsynth's Wan DiT applies its rotary embedding in ``precision``
    (``float64``: diffsynth's own complex128 code, as the reference; ``float32``: the faster
    :func:`rope_apply_float32`). Scoped: diffsynth's module is restored on exit."""
    if precision == "float64":
        yield
        return
    from diffsynth.models import wan_video_dit

    original = wan_video_dit.rope_apply
    wan_video_dit.rope_apply = rope_apply_float32
    try:
        yield
    finally:
        wan_video_dit.rope_apply = original


def make_scheduler(steps: int, shift: float):
    """diffsynth 2.x's Wan flow-matching scheduler with ``steps`` timesteps and sigma ``shift``: the
    reference's ``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)`` (sigmas:
    :func:`~.conditioning.flow_sigmas`; ``step`` is the Euler update ``x + v * (sigma_next - sigma)``)."""
    from diffsynth.diffusion.flow_match import FlowMatchScheduler

    scheduler = FlowMatchScheduler("Wan")
    scheduler.set_timesteps(steps, shift=shift)
    return scheduler


@torch.no_grad()
def conditioned_dit(
    dit,
    camera_hook,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor,
    clip_feature: torch.Tensor,
    y: torch.Tensor,
    camera_tokens: torch.Tensor | None,
    dtype: torch.dtype,
    rope: str = "float32",
    precision: str = "bf16",
) -> torch.Tensor:
    """EX-4D's conditioned DiT: diffsynth 2.x ``model_fn_wan_video`` with the camera tokens added
    right after patchify (``camera_hook``, a :class:`~.camera_encoder.CameraTokenHook` on ``dit``).

    ``latents`` (1, 16, f, h, w) (repeated to the batch of ``context`` for merged CFG); ``timestep``
    (1,) float32; ``context`` (B, 512, 4096); ``clip_feature`` (B, 257, 1280); ``y`` (B, 20, f, h, w);
    ``camera_tokens`` (1, dim, f, h/2, w/2); ``rope``: see :func:`rope_precision`. Returns the flow
    prediction (B, 16, f, h, w).
    ``benchmarks/compare_diffsynth_112.py`` compares exactly this function with diffsynth 1.1.2.
    """
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    reference = precision == "reference" and dtype != torch.float32
    with camera_hook.active(camera_tokens), rope_precision(rope), bf16_autocast(latents.device, reference):
        return model_fn_wan_video(
            dit,
            latents=latents.float() if reference else latents.to(dtype),
            timestep=timestep.float(),
            context=context.to(dtype),
            clip_feature=clip_feature.to(dtype),
            y=y.to(dtype),
        )


PRECISIONS = ("bf16", "reference")


def bf16_autocast(device: torch.device, enabled: bool):
    """``torch.autocast(bfloat16)`` on ``device`` (as the reference runs every model) or nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def float32_island(module: torch.nn.Module) -> None:
    """Make ``module`` compute in float32 whatever the surrounding autocast (the reference's
    ``amp.autocast(dtype=float32)`` blocks): float32 copies of its weights and of its input, autocast
    off inside. Set as an instance ``forward``: the state dict is unchanged."""
    original = type(module).forward

    def forward(x):
        params = list(module.parameters())
        stored = [p.data for p in params]
        try:
            for p in params:
                p.data = p.data.float()
            with torch.autocast(device_type=x.device.type, enabled=False):
                return original(module, x.float())
        finally:
            for p, d in zip(params, stored, strict=True):
                p.data = d

    module.forward = forward


def layer_norm_island(module: torch.nn.LayerNorm) -> None:
    """What CUDA autocast does to a LayerNorm (layer_norm is on its float32 list), on any device: computed
    in float32 from float32 copies of input and weights; a plain ``nn.LayerNorm`` returns float32, a
    subclass whose forward ends in ``.type_as(x)`` (diffsynth's CLIP ``LayerNorm``) the input's dtype."""
    keep_dtype = type(module) is not torch.nn.LayerNorm

    def forward(x):
        w = None if module.weight is None else module.weight.float()
        b = None if module.bias is None else module.bias.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = torch.nn.functional.layer_norm(x.float(), module.normalized_shape, w, b, module.eps)
        return out.to(x.dtype) if keep_dtype else out

    module.forward = forward


def float32_island_modules(dit) -> tuple[torch.nn.Module, ...]:
    """The DiT modules the reference computes in float32 under its bf16 autocast (its
    ``amp.autocast(float32)`` blocks)."""
    return (dit.time_embedding, dit.time_projection, dit.head.head)


def layer_norms(module: torch.nn.Module) -> list[torch.nn.LayerNorm]:
    return [m for m in module.modules() if isinstance(m, torch.nn.LayerNorm)]


def disable_reference_precision(dit: torch.nn.Module, camera_hook) -> None:
    """Undo :func:`enable_reference_precision` (LoRA back to the base weights' dtype; benchmarks)."""
    dtype = dit.patch_embedding.weight.dtype
    for name, p in dit.named_parameters():
        if ".lora_" in name:
            p.data = p.data.to(dtype)
    for m in (*float32_island_modules(dit), *layer_norms(dit)):
        m.__dict__.pop("forward", None)
    camera_hook.cast_timestep = True


def enable_reference_precision(dit: torch.nn.Module, camera_hook) -> None:
    """The reference's float32 islands in a bf16 DiT run under bf16 autocast (diffsynth 1.1.2 + EX-4D):
    the LoRA weights stored in float32 (its ``add_lora_to_model`` casts them), the timestep embedding,
    time projection and output head computed in float32 (its ``amp.autocast(float32)`` blocks), the
    float32 timestep fed as is, the LayerNorms as CUDA autocast runs them (:func:`layer_norm_island`, so
    the CPU computes what the GPU does). With a float32 modulation the residual stream stays float32 from the
    first block on, as in the reference."""
    from .loading import lora_to_float32

    lora_to_float32(dit)
    for m in float32_island_modules(dit):
        float32_island(m)
    for m in layer_norms(dit):
        layer_norm_island(m)
    camera_hook.cast_timestep = False


class Ex4dPipeline:
    """Wan2.1-I2V-14B + EX-4D (LoRA + camera encoder). Call it with a guide; see :meth:`__call__`."""

    name = "ex4d"

    def __init__(
        self,
        *,
        dit,
        vae,
        text_encoder,
        tokenizer,
        image_encoder,
        camera_encoder,
        device,
        dtype,
        vram_profile: str | Profile = C.VRAM_PROFILE,
        merge_lora: bool = True,
        compile: bool = False,
        attention: str = "auto",
        rope: str = "float32",
        precision: str = "bf16",
        conditioning: str = "reference",
    ):
        """``merge_lora`` folds the LoRA into the DiT weights (same function, faster; ``False`` runs
        peft's LoRA layers as the reference does). ``compile`` wraps each DiT block's forward in
        ``torch.compile`` (GPU; pays off from the first clip on, ~1 min to compile). ``attention``
        picks the SDPA kernel: ``auto`` (torch's choice), ``cudnn`` or ``flash``. ``rope``:
        ``float32`` (default, faster) or ``float64`` (diffsynth's / the reference's exact code).
        ``precision`` (GPU, bf16): ``bf16`` (default: every tensor in bf16, LoRA merged) or ``reference``
        (every model under bf16 autocast with the reference's float32 islands, LoRA unmerged in float32,
        float64 rope: :func:`enable_reference_precision`). ``conditioning``: ``reference`` (default: the bf16-rounded
        guide and the 8-bit truncating first-frame round trip of ``generate.py``) or ``float`` (no
        rounding); see :mod:`.conditioning`."""
        from . import loading
        from .camera_encoder import CameraTokenHook

        if attention not in ATTENTION_BACKENDS:
            raise Ex4dError(
                f"unknown attention backend '{attention}'", where="attention", hint=", ".join(ATTENTION_BACKENDS)
            )
        self.dit, self.vae, self.text_encoder = dit, vae, text_encoder
        self.tokenizer, self.image_encoder, self.camera_encoder = tokenizer, image_encoder, camera_encoder
        if rope not in ROPE_PRECISIONS:
            raise Ex4dError(f"unknown rope precision '{rope}'", where="rope", hint=", ".join(ROPE_PRECISIONS))
        if precision not in PRECISIONS:
            raise Ex4dError(f"unknown precision '{precision}'", where="--precision", hint=", ".join(PRECISIONS))
        if conditioning not in CONDITIONING_MODES:
            raise Ex4dError(
                f"unknown conditioning '{conditioning}'", where="conditioning", hint=", ".join(CONDITIONING_MODES)
            )
        self.device, self.dtype, self.attention, self.rope = device, dtype, attention, rope
        self.precision, self.conditioning = precision, conditioning
        reference = precision == "reference"
        if reference:
            self.rope = "float64"  # the reference's complex float64 rotary embedding
        self.lora_merged = loading.merge_lora(dit) if merge_lora and not reference else 0
        self.camera_hook = CameraTokenHook(dit)
        if reference:
            enable_reference_precision(dit, self.camera_hook)
            for m in layer_norms(image_encoder):  # CLIP's LayerNorms in float32, as under CUDA autocast
                layer_norm_island(m)
        profile = PROFILES[vram_profile] if isinstance(vram_profile, str) else vram_profile
        self.placement = Placement(self, profile, device)
        self.compiled = False
        if compile or (profile.compile and torch.device(device).type == "cuda"):  # the fast profile compiles on the GPU
            self.compile_blocks()

    def compile_blocks(self) -> None:
        """``torch.compile`` each DiT block's forward (one graph shared by all blocks: same code,
        same shapes). Hooks (camera tokens on the patch embedding, block streaming) stay eager."""
        for block in self.dit.blocks:
            block.forward = torch.compile(type(block).forward.__get__(block), dynamic=False)
        self.compiled = True

    def uncompile_blocks(self) -> None:
        for block in self.dit.blocks:
            block.__dict__.pop("forward", None)
        self.compiled = False

    # ------------------------------------------------------------------------------- loading
    @classmethod
    def from_models_dir(
        cls,
        models_dir=None,
        *,
        device=C.DEVICE,
        dtype=None,
        vram_profile=C.VRAM_PROFILE,
        progress: Progress | None = None,
        **options,
    ) -> Ex4dPipeline:
        """Load Wan2.1-I2V-14B-480P and ex4d.ckpt from the models directory (published layouts)."""
        from .. import modelstore
        from . import loading, specs

        if isinstance(vram_profile, str) and vram_profile not in PROFILES:
            raise Ex4dError(
                f"unknown VRAM profile '{vram_profile}'", where="--vram-profile", hint=f"one of {', '.join(PROFILES)}"
            )
        dev = resolve_device(device)
        dtype = dtype or default_dtype(dev)
        wan = modelstore.require(specs.WAN_NAME, models_dir)
        ex4d = modelstore.require(specs.EX4D_NAME, models_dir)
        profile = PROFILES[vram_profile] if isinstance(vram_profile, str) else vram_profile
        load_dev = dev if profile.resident else torch.device("cpu")

        def step(i: int, msg: str) -> None:
            if progress:
                progress("load", i, 5, msg)

        step(0, "loading the DiT")
        dit = loading.load_dit(wan, load_dev, dtype)
        loading.inject_lora(dit)
        if options.get("precision") == "reference":
            loading.lora_to_float32(dit)  # before loading: ex4d.ckpt's values without a bf16 detour
        step(1, "loading ex4d.ckpt")
        camera_encoder, _ = loading.load_ex4d_checkpoint(ex4d / specs.EX4D_FILE, dit, load_dev, dtype)
        step(2, "loading the text encoder")
        text_encoder = loading.load_text_encoder(wan, load_dev, dtype)
        tokenizer = loading.load_tokenizer(wan)
        step(3, "loading the VAE and the image encoder")
        vae = loading.load_vae(wan, load_dev, dtype)
        image_encoder = loading.load_image_encoder(wan, load_dev, dtype)
        step(4, "models loaded")
        return cls(
            dit=dit,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            image_encoder=image_encoder,
            camera_encoder=camera_encoder,
            device=dev,
            dtype=dtype,
            vram_profile=vram_profile,
            **options,
        )

    # ---------------------------------------------------------------------------- encoders
    def autocast(self):
        """bf16 autocast around every model call under ``precision="reference"`` (as the reference's
        ``generate.py`` runs its whole pipeline); nothing otherwise."""
        return bf16_autocast(self.device, self.precision == "reference" and self.dtype != torch.float32)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """umT5 embeddings (B, 512, 4096); positions after each prompt's last token are zero."""
        ids, mask = self.tokenizer(prompts, return_mask=True, add_special_tokens=True)
        with self.placement.onload(self.text_encoder), self.autocast():
            ids, mask = ids.to(self.device), mask.to(self.device)
            emb = self.text_encoder(ids, mask)
        for i, n in enumerate(mask.gt(0).sum(dim=1).tolist()):
            emb[i, n:] = 0
        return emb.to(self.dtype)

    @torch.no_grad()
    def vae_encode(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> normalised latents (B, 16, (T-1)/4+1, H/8, W/8)."""
        with self.placement.onload(self.vae), self.autocast():
            if self.placement.profile.vae_batch:
                return self.vae.model.encode(videos.to(self.device, self.dtype), self.vae.scale)
            return torch.cat(
                [self.vae.model.encode(v[None].to(self.device, self.dtype), self.vae.scale) for v in videos]
            )

    @torch.no_grad()
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (1, 16, f, h, w) -> video (1, 3, T, H, W) in [-1, 1]."""
        with self.placement.onload(self.vae), self.autocast():
            if self.placement.profile.vae_tiled:
                return self.vae.decode(latents.to(self.dtype), device=self.device, tiled=True).to(self.device)
            return self.vae.model.decode(latents.to(self.device, self.dtype), self.vae.scale).clamp_(-1, 1)

    @torch.no_grad()
    def condition(self, color: np.ndarray, mask: np.ndarray, prompts: list[str]) -> Conditioning:
        """Guide arrays from :func:`prepare_guide` -> :class:`Conditioning` (the reference's math,
        step by step in :mod:`.conditioning`):

        1. colour_cond, mask_cond = :func:`guide_conditions` (``* 2 - 1``; bf16-rounded as ``generate.py``).
        2. The I2V image = :func:`i2v_frame` (first frame of colour_cond, 8-bit round trip): CLIP, and
           :func:`i2v_video` (followed by zero frames) through the VAE; y = 4 :func:`frame_mask_channels`
           + its 16 latent channels.
        3. Camera tokens: the camera encoder on the VAE latents of :func:`camera_encoder_inputs`.
        """
        dev, dt = self.device, self.dtype
        colour_cond, mask_cond = guide_conditions(color, mask, self.conditioning)
        cam_colour, cam_mask = camera_encoder_inputs(colour_cond, mask_cond)
        _, _, t, h, w = colour_cond.shape
        frame = i2v_frame(colour_cond, self.conditioning)
        context = self.encode_prompts(prompts)
        with self.placement.onload(self.image_encoder), self.autocast():
            clip_feature = self.image_encoder.encode_image([frame.to(dev, dt)]).to(dt)
        lat = self.vae_encode(torch.cat([i2v_video(frame, t), cam_colour, cam_mask]))
        first_lat, color_lat, mask_lat = lat[0:1], lat[1:2], lat[2:3]
        with self.placement.onload(self.camera_encoder), self.autocast():
            cam = self.camera_encoder(color_lat.to(dev, dt), mask_lat.to(dev, dt))
        msk = frame_mask_channels(t, h // 8, w // 8).to(dev, dt)
        y = torch.cat([msk, first_lat.to(dev, dt)], dim=1)
        b = context.shape[0]
        return Conditioning(
            context=context,
            clip_feature=clip_feature.expand(b, -1, -1),
            y=y.expand(b, -1, -1, -1, -1),
            camera_tokens=cam.to(dt),
        )

    # ------------------------------------------------------------------------------ denoise
    @torch.no_grad()
    def predict_noise(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One DiT evaluation (both CFG branches as one batch when ``cond`` has 2 prompts).

        ``latents`` (1, 16, f, h, w); ``timestep`` (1,) float32 in [0, 1000]."""
        with self.placement.dit_forward(), attention_backend(self.attention):
            if self.placement.profile.cfg_batch or cond.context.shape[0] == 1:
                return conditioned_dit(
                    self.dit,
                    self.camera_hook,
                    latents,
                    timestep,
                    cond.context,
                    cond.clip_feature,
                    cond.y,
                    cond.camera_tokens,
                    self.dtype,
                    self.rope,
                    self.precision,
                )
            outs = [
                conditioned_dit(
                    self.dit,
                    self.camera_hook,
                    latents,
                    timestep,
                    cond.context[i : i + 1],
                    cond.clip_feature[i : i + 1],
                    cond.y[i : i + 1],
                    cond.camera_tokens,
                    self.dtype,
                    self.rope,
                    self.precision,
                )
                for i in range(cond.context.shape[0])
            ]
            return torch.cat(outs)

    # -------------------------------------------------------------------------------- call
    def __call__(
        self,
        color: np.ndarray,
        mask: np.ndarray,
        *,
        height: int = C.GEN_HEIGHT,
        width: int = C.GEN_WIDTH,
        num_frames: int = C.NUM_FRAMES,
        steps: int = C.STEPS,
        cfg: float = C.CFG,
        shift: float = C.SHIFT,
        seed: int = C.SEED,
        prompt: str = REFERENCE_PROMPT,
        negative_prompt: str = REFERENCE_NEGATIVE,
        resize: str = C.RESIZE,
        callback: Progress | None = None,
        return_latents: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, torch.Tensor]:
        """Generate the new-view video from a guide.

        Args:
            color: guide colour, uint8 (T, H, W, 3) RGB (holes may hold anything; they are masked).
            mask: guide mask, uint8 (T, H, W), 255 = visible from the source, 0 = to be filled.
            height, width: output size in px, multiples of 16 (reference: 512 x 512; 832 x 480 works).
            num_frames: output frames, 4k + 1, sampled from the guide with linspace (reference: 49).
            steps: denoising steps (25). cfg: classifier-free guidance scale (5; 1 = no negative branch).
            shift: flow-matching sigma shift (5). seed: seeds the noise and the mask erosion.
            prompt, negative_prompt: text conditioning (defaults: the reference's fixed prompts).
            resize: ``crop`` keeps the guide's aspect (centred crop to the output aspect, then resize);
                ``stretch`` squashes like the reference.
            callback: ``callback(stage, step, total, message)``; called after every denoising step
                with stage ``"denoise"``; raising :class:`~ex4d_backend.errors.Cancelled` stops the run
                between steps and frees GPU memory.
            return_latents: also return the final latents (float32 (1, 16, f, h/8, w/8), on the CPU).

        Returns:
            uint8 (num_frames, height, width, 3) RGB frames (and the latents with ``return_latents``).
        """

        def report(stage: str, i: int, n: int, msg: str) -> None:
            if callback:
                callback(stage, i, n, msg)

        color_f, mask_f = prepare_guide(
            color, mask, height=height, width=width, num_frames=num_frames, seed=seed, resize=resize
        )
        # every per-clip tensor is named here and dropped in ``finally``: a cancel's traceback keeps
        # this frame alive, and it must not keep GPU memory alive with it
        cond = latents = video = pred = pos = neg = timestep = None
        try:
            report("condition", 0, 1, "encoding prompt, first frame and guide")
            prompts = [prompt, negative_prompt] if cfg != 1.0 else [prompt]
            cond = self.condition(color_f, mask_f, prompts)
            report("condition", 1, 1, "conditioning ready")
            scheduler = make_scheduler(steps, shift)
            shape = (1, 16, (num_frames - 1) // 4 + 1, height // 8, width // 8)
            gen = torch.Generator("cpu").manual_seed(seed)
            latents = torch.randn(shape, generator=gen, dtype=torch.float32).to(self.device)
            for i, t in enumerate(scheduler.timesteps):
                timestep = t[None].to(self.device, torch.float32)  # float32, as the reference
                pred = self.predict_noise(latents, timestep, cond).float()
                if cond.context.shape[0] == 2:  # [positive, negative], as encoded in condition()
                    pos, neg = pred.chunk(2)
                    pred = cfg_combine(pos, neg, cfg)
                latents = scheduler.step(pred, t, latents)
                report("denoise", i + 1, steps, f"denoising step {i + 1}/{steps}")
            report("decode", 0, 1, "decoding")
            video = self.vae_decode(latents)
            frames = ((video[0].float().permute(1, 2, 3, 0) + 1) * 127.5).clamp(0, 255).cpu().numpy()
            report("decode", 1, 1, "done")
            if return_latents:
                return frames.astype(np.uint8), latents.float().cpu()
            return frames.astype(np.uint8)
        finally:
            del cond, latents, video, pred, pos, neg, timestep
            self.placement.release()
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def close(self) -> None:
        """Drop every model and free GPU memory."""
        self.camera_hook.remove()
        self.placement.close()
        for name in ("dit", "vae", "text_encoder", "image_encoder", "camera_encoder"):
            setattr(self, name, None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
