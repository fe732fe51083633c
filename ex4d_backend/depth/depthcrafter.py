"""DepthCrafter video depth, written on diffusers' Stable Video Diffusion components.

The published algorithm (DepthCrafter, Hu et al. 2024), reproduced step by step:

1. Frames (RGB in [0, 1]) are resized to multiples of 64 (long side capped at ``max_res``), mapped to
   [-1, 1]; each frame is embedded by the CLIP image encoder (224 x 224, antialiased resize, CLIP
   normalisation); the frames plus 0.02 x Gaussian noise (DepthCrafter's noise augmentation) are
   encoded by the SVD VAE (``latent_dist.mode()``, unscaled; fp32 when the VAE asks for
   ``force_upcast``).
2. The UNet (diffusers ``UNetSpatioTemporalConditionModel`` with DepthCrafter's weights) denoises
   4-channel latents; its input is the scaled noisy latent concatenated with the frames' latents
   (8 channels) and it cross-attends to each frame's own CLIP embedding. Added time ids are
   (fps 7, motion bucket 127, noise augmentation 0.02). EulerDiscrete scheduler with the SVD settings
   (v-prediction, Karras sigmas), 5 steps, guidance 1.0 (no unconditional pass).
3. Long clips are processed in windows of 110 frames overlapping by 25: the first ``overlap``
   latents of a window start from the previous window's result re-noised to the first sigma, and
   after denoising the overlap is blended linearly (weights 0..1 from the old to the new window).
4. The latents are decoded by the VAE's temporal decoder, mapped to [0, 1]; the mean of the three
   channels is the disparity, min-max normalised over the whole clip.

Units: the result is relative disparity in [0, 1] (1 = nearest), at the processing size.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import modelstore
from ..errors import MODEL_INVALID, Ex4dError

log = logging.getLogger(__name__)

DEFAULTS = {
    "steps": 5,  # denoising steps
    "guidance": 1.0,  # classifier-free guidance scale (1.0: conditional pass only)
    "window": 110,  # frames per window
    "overlap": 25,  # frames shared by consecutive windows
    "max_res": 1024,  # cap of the long side of the processing size (rounded to multiples of 64)
    "seed": 42,  # noise seed (DepthCrafter's default)
    "noise_aug": 0.02,  # noise augmentation of the VAE input, also the 3rd added time id (DepthCrafter's)
    "decode_chunk": 8,  # frames per VAE / CLIP chunk
    "cpu_offload": False,  # keep components on the CPU, move each to the GPU only while it runs
}

Progress = Callable[[str, int, int, str], None]


def _unet_class():
    import torch
    from diffusers import UNetSpatioTemporalConditionModel
    from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionOutput

    class DepthCrafterUNet(UNetSpatioTemporalConditionModel):
        """SVD's UNet where every frame cross-attends to its own image embedding.

        ``encoder_hidden_states`` is (batch, frames, dim) instead of SVD's (batch, 1, dim); the rest is
        diffusers' forward, with the inputs cast to the weights' dtype.
        """

        def forward(self, sample, timestep, encoder_hidden_states, added_time_ids, return_dict=True):
            batch, frames = sample.shape[:2]
            dtype = self.conv_in.weight.dtype
            t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], dtype=torch.float64)
            t = t.reshape(-1)[:1].to(sample.device).expand(batch)
            emb = self.time_embedding(self.time_proj(t).to(dtype))
            time_embeds = self.add_time_proj(added_time_ids.flatten()).reshape(batch, -1).to(emb.dtype)
            emb = (emb + self.add_embedding(time_embeds)).repeat_interleave(frames, dim=0)
            context = encoder_hidden_states.flatten(0, 1).unsqueeze(1).to(dtype)  # (B*T, 1, dim)
            x = self.conv_in(sample.flatten(0, 1).to(dtype))
            indicator = torch.zeros(batch, frames, dtype=x.dtype, device=x.device)
            skips = (x,)
            for block in self.down_blocks:
                if getattr(block, "has_cross_attention", False):
                    x, res = block(
                        hidden_states=x, temb=emb, encoder_hidden_states=context, image_only_indicator=indicator
                    )
                else:
                    x, res = block(hidden_states=x, temb=emb, image_only_indicator=indicator)
                skips += res
            x = self.mid_block(hidden_states=x, temb=emb, encoder_hidden_states=context, image_only_indicator=indicator)
            for block in self.up_blocks:
                res, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
                kwargs = {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}
                x = block(
                    hidden_states=x, temb=emb, res_hidden_states_tuple=res, image_only_indicator=indicator, **kwargs
                )
            x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
            x = x.reshape(batch, frames, *x.shape[1:])
            return (x,) if not return_dict else UNetSpatioTemporalConditionOutput(sample=x)

    return DepthCrafterUNet


@dataclass
class DepthCrafterModels:
    unet: object
    vae: object
    image_encoder: object
    scheduler: object
    clip_mean: tuple[float, float, float]
    clip_std: tuple[float, float, float]
    device: object  # torch.device that runs the models
    dtype: object  # torch dtype of the weights (fp16 on CUDA, fp32 on CPU)
    cpu_offload: bool = False

    def to(self, device) -> None:
        for m in (self.unet, self.vae, self.image_encoder):
            m.to(device)


def _weights_file(folder: Path, stem: str) -> Path:
    """``<stem>.fp16.safetensors`` (published variant) or ``<stem>.safetensors``."""
    for name in (f"{stem}.fp16.safetensors", f"{stem}.safetensors"):
        if (folder / name).is_file():
            return folder / name
    return folder / f"{stem}.fp16.safetensors"


def _invalid(folder: Path, exc: Exception) -> Ex4dError:
    return Ex4dError(
        f"cannot load the model: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
        where=str(folder),
        hint="the files are corrupt, incomplete or of another model: run `ex4d models verify depthcrafter` "
        "and download again",
        code=MODEL_INVALID,
    )


def load(models_dir=None, device=None, dtype=None, *, cpu_offload: bool = False) -> DepthCrafterModels:
    """Load DepthCrafter's UNet and SVD's VAE, CLIP image encoder and scheduler from the models directory."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler
    from transformers import CLIPVisionModelWithProjection

    unet_dir = modelstore.require("depthcrafter", models_dir)
    svd_dir = modelstore.require("svd-xt", models_dir)
    for name in ("depthcrafter", "svd-xt"):
        modelstore.require_valid(name, models_dir)  # sizes and headers: a clear error before torch tries
    device = torch.device(device or "cpu")
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    variant = "fp16" if _weights_file(svd_dir / "vae", "diffusion_pytorch_model").name.count(".") == 2 else None
    try:
        unet = _unet_class().from_pretrained(unet_dir, torch_dtype=dtype, low_cpu_mem_usage=True)
        vae = AutoencoderKLTemporalDecoder.from_pretrained(svd_dir / "vae", variant=variant, torch_dtype=dtype)
        enc_variant = "fp16" if (svd_dir / "image_encoder" / "model.fp16.safetensors").is_file() else None
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            svd_dir / "image_encoder", variant=enc_variant, dtype=dtype
        )
        scheduler = EulerDiscreteScheduler.from_pretrained(svd_dir / "scheduler")
        fe = json.loads((svd_dir / "feature_extractor" / "preprocessor_config.json").read_text())
    except Ex4dError:
        raise
    except Exception as exc:
        raise _invalid(unet_dir.parent, exc) from exc
    models = DepthCrafterModels(
        unet=unet.eval(),
        vae=vae.eval(),
        image_encoder=image_encoder.eval(),
        scheduler=scheduler,
        clip_mean=tuple(fe.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
        clip_std=tuple(fe.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
        device=device,
        dtype=dtype,
        cpu_offload=cpu_offload and device.type == "cuda",
    )
    if not models.cpu_offload:
        models.to(device)
    return models


def processing_size(width: int, height: int, max_res: int = 1024) -> tuple[int, int]:
    """DepthCrafter's processing (width, height): rounded to multiples of 64, long side <= ``max_res``."""
    scale = min(1.0, max_res / max(width, height))
    w = max(64, int(round(width * scale / 64)) * 64)
    h = max(64, int(round(height * scale / 64)) * 64)
    return w, h


def windows(n_frames: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) frame ranges of DepthCrafter's windows; a clip that fits one window has one."""
    if n_frames <= window:
        return [(0, n_frames)]
    stride = window - overlap
    out, start = [], 0
    while start < n_frames - overlap:
        out.append((start, min(start + window, n_frames)))
        start += stride
    return out


def stitch(result, latents, overlap: int):
    """Append window ``latents`` (1, t, ...) to ``result`` (1, n, ...) whose last ``overlap`` frames they share.

    The shared frames are blended linearly, weight of the new window rising from 0 to 1 across the
    overlap (DepthCrafter's blending), so the hand-over between windows has no step.
    """
    import torch

    if overlap == 0:
        return torch.cat([result, latents], dim=1)
    w = torch.linspace(0, 1, overlap, device=latents.device)  # fp32 weights, as DepthCrafter
    w = w.view(1, overlap, *([1] * (latents.ndim - 2)))
    out = result.clone()
    out[:, -overlap:] = (latents[:, :overlap].float() * w + result[:, -overlap:].float() * (1 - w)).to(out.dtype)
    return torch.cat([out, latents[:, overlap:]], dim=1)


class _OnDevice:
    """Context: move a module to the compute device for its use when CPU offload is on."""

    def __init__(self, models: DepthCrafterModels, module):
        self.models, self.module = models, module

    def __enter__(self):
        if self.models.cpu_offload:
            self.module.to(self.models.device)
        return self.module

    def __exit__(self, *exc):
        if self.models.cpu_offload:
            import torch

            self.module.to("cpu")
            torch.cuda.empty_cache()


def _resize_224(video):
    import torch.nn.functional as F

    try:
        from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
            _resize_with_antialiasing,
        )

        return _resize_with_antialiasing(video, (224, 224))
    except ImportError:  # pragma: no cover - older/newer diffusers without the helper
        return F.interpolate(video, size=(224, 224), mode="bicubic", align_corners=True, antialias=True)


def _video_chunks(frames: np.ndarray, w: int, h: int, chunk: int):
    """Yield (start, float32 (n, 3, h, w) in [-1, 1]) chunks of uint8 ``frames`` at the processing size.

    Chunked so a long clip never sits on the host as one float tensor.
    """
    import torch

    for i in range(0, len(frames), chunk):
        x = torch.from_numpy(np.ascontiguousarray(frames[i : i + chunk])).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-2:] != (h, w):
            x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        yield i, x * 2.0 - 1.0


def encode(
    frames: np.ndarray,
    models: DepthCrafterModels,
    size: tuple[int, int],
    generator,
    *,
    noise_aug: float = DEFAULTS["noise_aug"],
    chunk: int = DEFAULTS["decode_chunk"],
):
    """(CLIP embeddings (1, T, dim), VAE latents (1, T, 4, h/8, w/8)) of the frames, both in ``models.dtype``.

    As DepthCrafter: the CLIP embedding sees the clean frames; the VAE sees the frames plus
    ``noise_aug`` times unit Gaussian noise (drawn from ``generator``, frame by frame, so the values
    do not depend on ``chunk``), encoded with ``latent_dist.mode()`` and unscaled.
    """
    import torch

    w, h = size
    dev, dtype = models.device, models.dtype
    mean = torch.tensor(models.clip_mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(models.clip_std, device=dev).view(1, 3, 1, 1)
    embeds = []
    with _OnDevice(models, models.image_encoder) as enc:
        for _, video in _video_chunks(frames, w, h, chunk):
            x = (_resize_224(video.to(dev)) + 1.0) / 2.0
            embeds.append(enc(((x - mean) / std).to(dtype)).image_embeds)
    embeds = torch.cat(embeds).unsqueeze(0)

    vae = models.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast  # fp32 encode, like diffusers' SVD
    lat = []
    with _OnDevice(models, vae):
        if upcast:
            vae.to(torch.float32)
        try:
            for _, video in _video_chunks(frames, w, h, chunk):
                if noise_aug:
                    noise = torch.stack([torch.randn(video.shape[1:], generator=generator) for _ in range(len(video))])
                    video = video + noise_aug * noise
                lat.append(vae.encode(video.to(dev, vae.dtype)).latent_dist.mode().to(dtype))
        finally:
            if upcast:
                vae.to(torch.float16)
    return embeds, torch.cat(lat).unsqueeze(0)


def denoise(
    embeds,
    frame_latents,
    models: DepthCrafterModels,
    generator,
    *,
    steps: int = DEFAULTS["steps"],
    guidance: float = DEFAULTS["guidance"],
    window: int = DEFAULTS["window"],
    overlap: int = DEFAULTS["overlap"],
    noise_aug: float = DEFAULTS["noise_aug"],
    progress: Progress | None = None,
    trace: dict | None = None,
):
    """Denoised latents (1, T, 4, h/8, w/8) of the whole clip, window by window (DepthCrafter's loop).

    Window k + 1 starts from the previous windows' result on its first ``overlap`` frames, re-noised
    to the first sigma with the same noise draws, and its result is blended into them linearly
    (:func:`stitch`). ``trace`` (a dict, for tests) receives ``windows``: per window its ``span``,
    ``initial`` latents (after re-noising) and ``final`` latents, float32 on the CPU.
    """
    import torch

    n = frame_latents.shape[1]
    dev, dtype = models.device, models.dtype
    spans = windows(n, window, overlap)
    win = spans[0][1] - spans[0][0]
    ov = overlap if len(spans) > 1 else 0
    stride = win - ov
    report = progress or (lambda *a: None)
    sched = models.scheduler
    sched.set_timesteps(steps, device=dev)
    timesteps = sched.timesteps
    time_ids = torch.tensor([[7.0, 127.0, float(noise_aug)]], dtype=dtype, device=dev)  # fps, motion, noise aug
    c_lat = models.unet.config.in_channels // 2
    shape = (1, win, c_lat, frame_latents.shape[-2], frame_latents.shape[-1])
    init = torch.randn(shape, generator=generator, dtype=torch.float32).to(dev, dtype) * sched.init_noise_sigma
    if trace is not None:
        trace["windows"] = []
    result = None
    total = len(spans) * steps
    with _OnDevice(models, models.unet) as unet:
        for wi, (s, e) in enumerate(spans):
            sched.set_timesteps(steps, device=dev)
            latents = init[:, : e - s].clone()
            if ov:  # DepthCrafter's noise for the next window: the last `overlap` + first `stride` draws
                init = torch.cat([init[:, -ov:], init[:, :stride]], dim=1)
            cond_lat, cond_emb = frame_latents[:, s:e], embeds[:, s:e]
            for i, t in enumerate(timesteps):
                if result is not None and ov and i == 0:  # continue from the previous window's overlap
                    latents[:, :ov] = result[:, -ov:] + latents[:, :ov] / sched.init_noise_sigma * sched.sigmas[0]
                if trace is not None and i == 0:
                    trace["windows"].append({"span": (s, e), "initial": latents.float().cpu()})
                x = torch.cat([sched.scale_model_input(latents, t), cond_lat], dim=2)
                pred = unet(x, t, encoder_hidden_states=cond_emb, added_time_ids=time_ids, return_dict=False)[0]
                if guidance != 1.0:
                    x0 = torch.cat([sched.scale_model_input(latents, t), torch.zeros_like(cond_lat)], dim=2)
                    uncond = unet(
                        x0,
                        t,
                        encoder_hidden_states=torch.zeros_like(cond_emb),
                        added_time_ids=time_ids,
                        return_dict=False,
                    )[0]
                    pred = uncond + guidance * (pred - uncond)
                latents = sched.step(pred, t, latents).prev_sample.to(dtype)
                report("denoise", wi * steps + i + 1, total, f"window {wi + 1}/{len(spans)}, step {i + 1}/{steps}")
            if trace is not None:
                trace["windows"][-1]["final"] = latents.float().cpu()
            result = latents.clone() if result is None else stitch(result, latents, ov)
    return result


def decode(latents, models: DepthCrafterModels, *, chunk: int = DEFAULTS["decode_chunk"]) -> np.ndarray:
    """Relative disparity (T, h, w) float32 in [0, 1]: VAE temporal decoder (in chunks), mean of the
    three channels of (image / 2 + 0.5) clamped to [0, 1], min-max normalised over the clip."""
    import torch

    vae = models.vae
    out = []
    with _OnDevice(models, vae):
        z = latents[0] / vae.config.scaling_factor
        for i in range(0, z.shape[0], chunk):
            part = z[i : i + chunk].to(models.device, vae.dtype)
            img = vae.decode(part, num_frames=part.shape[0]).sample.float()
            out.append(((img / 2 + 0.5).clamp(0, 1)).mean(dim=1).cpu())
    disp = torch.cat(out).numpy().astype(np.float32)
    lo, hi = float(disp.min()), float(disp.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise Ex4dError(
            "DepthCrafter produced non-finite values",
            where="depthcrafter",
            hint="the weights may be corrupt (run `ex4d models verify depthcrafter`); on a GPU without fp16 "
            "support use --device cpu",
            code=MODEL_INVALID,
        )
    return (disp - lo) / (hi - lo) if hi > lo else np.zeros_like(disp)


def infer(
    frames: np.ndarray,
    models: DepthCrafterModels,
    *,
    steps: int = DEFAULTS["steps"],
    guidance: float = DEFAULTS["guidance"],
    window: int = DEFAULTS["window"],
    overlap: int = DEFAULTS["overlap"],
    max_res: int = DEFAULTS["max_res"],
    seed: int = DEFAULTS["seed"],
    noise_aug: float = DEFAULTS["noise_aug"],
    decode_chunk: int = DEFAULTS["decode_chunk"],
    progress: Progress | None = None,
    trace: dict | None = None,
) -> np.ndarray:
    """Relative disparity (T, h, w) float32 in [0, 1] at DepthCrafter's processing size (1 = nearest).

    ``frames``: uint8 (T, H, W, 3) RGB. All noise (the VAE input's noise augmentation, then the
    initial latents) comes from one CPU generator seeded with ``seed``, so a seed gives the same noise
    on every device. ``progress("depth", step, total, message)`` is called after encoding, after
    every denoising step of every window and after decoding; it may raise ``errors.Cancelled``.
    """
    import torch

    if not (0 <= overlap < window):
        raise Ex4dError(f"overlap {overlap} must be >= 0 and smaller than the window {window}", where="--overlap")
    if steps < 1:
        raise Ex4dError(f"steps must be >= 1, got {steps}", where="--steps")
    if decode_chunk < 1:
        raise Ex4dError(f"decode_chunk must be >= 1, got {decode_chunk}", where="decode_chunk")
    n, height, width = frames.shape[:3]
    size = processing_size(width, height, max_res)
    n_windows = len(windows(n, window, overlap))
    total = 2 + n_windows * steps  # encode, each window step, decode: one "depth" stage, steps never decrease
    report = progress or (lambda *a: None)

    def window_progress(stage: str, step: int, _total: int, message: str) -> None:
        report("depth", 1 + step, total, message)

    gen = torch.Generator("cpu").manual_seed(int(seed))
    with torch.inference_mode():
        report("depth", 0, total, f"encoding {n} frames at {size[0]}x{size[1]}")
        embeds, frame_latents = encode(frames, models, size, gen, noise_aug=noise_aug, chunk=decode_chunk)
        report("depth", 1, total, "encoded")
        latents = denoise(
            embeds,
            frame_latents,
            models,
            gen,
            steps=steps,
            guidance=guidance,
            window=window,
            overlap=overlap,
            noise_aug=noise_aug,
            progress=window_progress,
            trace=trace,
        )
        del embeds, frame_latents
        if trace is not None:
            trace["latents"] = latents.float().cpu()
        disp = decode(latents, models, chunk=decode_chunk)
        report("depth", total, total, "decoded")
    return disp


# ----------------------------------------------------------------------------------------------
# Loadability checks for `ex4d models verify` (build on the meta device, compare names and shapes)


def _meta_shapes(build) -> dict[str, tuple[int, ...]]:
    import torch

    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v["shape"]) for k, v in modelstore.safetensors_header(path).items()}


def check_unet_folder(folder: Path) -> None:
    """DepthCrafter UNet: its config builds, and the weights have exactly that model's tensors."""
    cls = _unet_class()
    config = cls.load_config(folder)
    expected = _meta_shapes(lambda: cls.from_config(config))
    path = folder / "diffusion_pytorch_model.safetensors"
    modelstore.compare_tensors(expected, _file_shapes(path), str(path))


def check_svd_folder(folder: Path) -> None:
    """SVD parts: VAE and CLIP image encoder configs build and match their weights; scheduler loads."""
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    vae_cfg = AutoencoderKLTemporalDecoder.load_config(folder / "vae")
    expected = _meta_shapes(lambda: AutoencoderKLTemporalDecoder.from_config(vae_cfg))
    path = _weights_file(folder / "vae", "diffusion_pytorch_model")
    modelstore.compare_tensors(expected, _file_shapes(path), str(path))
    enc_cfg = CLIPVisionConfig.from_pretrained(folder / "image_encoder")
    expected = _meta_shapes(lambda: CLIPVisionModelWithProjection(enc_cfg))
    path = _weights_file(folder / "image_encoder", "model")
    found = _file_shapes(path)
    # Non-persistent buffers (position ids) may or may not be saved depending on the writer.
    expected = {k: v for k, v in expected.items() if not k.endswith("position_ids")}
    found = {k: v for k, v in found.items() if not k.endswith("position_ids")}
    modelstore.compare_tensors(expected, found, str(path))
    EulerDiscreteScheduler.from_pretrained(folder / "scheduler")
