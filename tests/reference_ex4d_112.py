"""The reference EX-4D pipeline, built from the reference's own code: diffsynth 1.1.2 (PyPI) plus EX-4D's
edits, written here as ``/work/shared/EX4D_REFERENCE.md`` ("The reference pipeline, step by step")
describes them. Runs in the side environment ``.venv-ref112`` (diffsynth 1.1.2, transformers 4.51.3;
made by ``scripts/install_deps.py --dev``), never in the main one: both diffsynth releases are called
``diffsynth``.

    .venv-ref112/bin/python tests/reference_ex4d_112.py MODELS_DIR CASES.json

``CASES.json``: a list of ``{"guide": GUIDE.npz, "out": OUT.npz, "opts": {"height": 32, ...}}``. ``GUIDE.npz`` holds ``color`` uint8 (T, H, W, 3) RGB and ``mask`` uint8 (T, H, W); ``OUT.npz`` gets the
final ``latents`` float32 (1, 16, f, h, w) and the ``frames`` uint8 (T, H, W, 3), plus the conditioning
tensors (``colour_cond``, ``mask_cond``, ``clip``, ``y``, ``camera_tokens``) for diagnosis.

What is the reference's code here, and what is ours:
- 1.1.2's code run as is: ``WanVideoPipeline`` (``encode_image`` with its PIL resize and
  ``preprocess_image``, ``generate_noise``, ``check_resize_height_width``, ``tensor2video``), its
  ``WanModel`` / ``WanTextEncoder`` / ``WanVideoVAE`` / ``WanImageEncoder`` and their state-dict
  converters, ``WanPrompter`` with transformers 4.51.3's ``AutoTokenizer``, ``FlowMatchScheduler``.
- EX-4D's edits, written here from the description: ``generate.py``'s guide reading (cv2 resize to
  (width, height), per read mask frame ``random.randint(2, 8)`` erosion, ``> 0.5``, padding by repeating
  the last frames, ``(colour * mask).to(bf16) * 2 - 1``, ``mask.to(bf16) * 2 - 1``), the LoRA injection
  (peft, float32, ``strict=False``), ``CamVidEncoder`` + ``load_cam``, ``encode_images`` (the
  ``to_pil_image`` 8-bit round trip), ``encode_rays``, the ray tokens added right after patchify, and
  EX-4D's ``__call__`` (two DiT calls per step, positive first, untiled decode).
- Deviations needed to run the comparison in float32 on a CPU (each named where it is made):
  1.1.2's bfloat16 autocast blocks are disabled (``torch.amp.autocast`` enters a disabled autocast), so
  the bf16 guide tensors are handed over as float32 (exact); 1.1.2's ``flash_attention`` (it asserts
  CUDA and casts to bf16) is the same softmax(q k^T / sqrt(d)) v through float32 SDPA; the prompter gets
  the pipeline's device (1.1.2 defaults it to "cuda"); the full-size ``WanImageEncoder()`` constructor
  is replaced by 1.1.2's own ``clip_xlm_roberta_vit_h_14`` at the tiny fixture's size.
"""

from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
WAN = "Wan-AI/Wan2.1-I2V-14B-480P"
CKPT = "yihouxiang/EX-4D/ex4d.ckpt"
PROMPT = "4K ultra HD, surround motion, realistic tone, panoramic shot, wide-angle view, cinematic quality"


# ------------------------------------------------------------------------------ import diffsynth 1.1.2
def import_diffsynth_112():
    """1.1.2's modules, skipping only the package ``__init__`` files of ``diffsynth`` and
    ``diffsynth.pipelines``: they import every pipeline and ``controlnet_aux`` (not needed for Wan)."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("diffsynth")
    root = Path(spec.submodule_search_locations[0])
    for name in ("diffsynth", "diffsynth.pipelines"):
        mod = types.ModuleType(name)
        mod.__path__ = [str(root / name.partition(".")[2]) if "." in name else str(root)]
        sys.modules[name] = mod
    import diffsynth.models.utils as utils
    import diffsynth.models.wan_video_dit as dit
    import diffsynth.models.wan_video_image_encoder as clip
    import diffsynth.models.wan_video_text_encoder as t5
    import diffsynth.models.wan_video_vae as vae
    import diffsynth.pipelines.wan_video as wan_video

    assert importlib.metadata.version("diffsynth") == "1.1.2", importlib.metadata.version("diffsynth")
    return types.SimpleNamespace(utils=utils, dit=dit, clip=clip, t5=t5, vae=vae, wan_video=wan_video)


def float32_cpu_patches(d112) -> None:
    """The two deviations that let 1.1.2 run in float32 on the CPU (see the module docstring)."""
    real_autocast = torch.amp.autocast

    def disabled_autocast(device_type="cuda", dtype=None, enabled=True, cache_enabled=None):
        return real_autocast(device_type="cpu", enabled=False)

    torch.amp.autocast = disabled_autocast

    def sdpa_flash_attention(q, k, v, q_lens=None, k_lens=None, **_):
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x.transpose(1, 2).contiguous().to(q.dtype)

    d112.dit.flash_attention = sdpa_flash_attention
    d112.clip.flash_attention = sdpa_flash_attention


# ------------------------------------------------------------------------------ EX-4D's generate.py
def load_video_frames(color: np.ndarray, num_frames: int, height: int, width: int) -> torch.Tensor:
    """generate.py's colour reading (frames already RGB here): (3, T, H, W) float32 in [0, 1]."""
    import cv2

    n = len(color)
    indices = np.linspace(0, n - 1, num_frames, dtype=int) if n >= num_frames else np.arange(n)
    frames = [cv2.resize(color[i], (width, height)) for i in indices]
    if len(frames) < num_frames:
        frames += [frames[-1]] * (num_frames - len(frames))
    frames = np.array(frames[:num_frames])
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255.0


def load_mask_frames(mask: np.ndarray, num_frames: int, height: int, width: int) -> torch.Tensor:
    """generate.py's mask reading: 3-channel frames, resized, each READ frame eroded with its own
    ``random.randint(2, 8)`` kernel, padded with the last eroded frame, binarised ``/255 > 0.5``."""
    import cv2

    n = len(mask)
    indices = np.linspace(0, n - 1, num_frames, dtype=int) if n >= num_frames else np.arange(n)
    frames = []
    for i in indices:
        frame = cv2.resize(np.repeat(mask[i][..., None], 3, axis=2), (width, height))
        kernel = random.randint(2, 8)
        frames.append(cv2.erode(frame, np.ones((kernel, kernel), np.uint8), iterations=1))
    if len(frames) < num_frames:
        frames += [frames[-1]] * (num_frames - len(frames))
    frames = np.array(frames[:num_frames])
    return (torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255.0 > 0.5).float()


# ------------------------------------------------------------------------------ EX-4D's model edits
class CamVidEncoder(torch.nn.Module):
    """EX-4D's camera encoder as described: VAE latents of the colour guide and of (mask * 2 - 1),
    concatenated, three 1x1x1 convolutions with SiLU, then the (1, 2, 2) patch convolution."""

    def __init__(self, in_channels=16, hidden_channels=1024, out_channels=5120):
        super().__init__()
        self.latent_encoder = torch.nn.Sequential(
            torch.nn.Conv3d(in_channels * 2, hidden_channels, 1),
            torch.nn.SiLU(),
            torch.nn.Conv3d(hidden_channels, hidden_channels, 1),
            torch.nn.SiLU(),
            torch.nn.Conv3d(hidden_channels, hidden_channels, 1),
        )
        self.latent_patch_embedding = torch.nn.Conv3d(hidden_channels, out_channels, (1, 2, 2), stride=(1, 2, 2))

    def forward(self, video, mask, vae):
        with torch.no_grad():
            video = vae.encode(video, device=video.device)
            mask = vae.encode(mask * 2 - 1, device=mask.device)
        return self.latent_patch_embedding(self.latent_encoder(torch.cat([video, mask], dim=1)))


def add_ray_tokens(dit) -> None:
    """EX-4D's edit of 1.1.2's ``WanModel.forward``: ``ray_latent`` (1, dim, f, h, w), flattened to tokens,
    is added to the tokens right after patchify. Done by wrapping the patch embedding, whose output
    (before flattening) gets the same addition: flatten(conv + ray) = flatten(conv) + flatten(ray)."""
    conv = dit.patch_embedding
    state = {"ray": None}

    class PatchEmbeddingPlusRays(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            x = self.conv(x)
            return x if state["ray"] is None else x + state["ray"]

    dit.patch_embedding = PatchEmbeddingPlusRays()
    original = dit.forward

    def forward(x, timestep, context, seq_len, clip_fea=None, y=None, ray_latent=None, **kwargs):
        state["ray"] = ray_latent
        try:
            return original(x, timestep, context, seq_len, clip_fea=clip_fea, y=y, **kwargs)
        finally:
            state["ray"] = None

    dit.forward = forward


def add_lora_to_model(model, pretrained_path: Path) -> tuple[int, int]:
    """generate.py's ``add_lora_to_model``: peft LoRA (r = alpha = 16 on q, k, v, o, ffn.0, ffn.2),
    trainable parameters cast to float32, then ``load_state_dict(ex4d.ckpt, strict=False)``."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=16, lora_alpha=16.0, init_lora_weights=True, target_modules="q,k,v,o,ffn.0,ffn.2".split(","))
    model = inject_adapter_in_model(config, model)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.to(torch.float32)
    state = torch.load(pretrained_path, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    return len([n for n, _ in model.named_parameters()]) - len(missing), len(unexpected)


def make_pipeline_class(d112):
    base = d112.wan_video.WanVideoPipeline

    class Ex4dReferencePipeline(base):
        """1.1.2's ``WanVideoPipeline`` with EX-4D's methods."""

        def encode_prompt(self, prompt, positive=True):
            # 1.1.2's WanPrompter.encode_prompt defaults to device="cuda"; give it the pipeline's
            return {"context": self.prompter.encode_prompt(prompt, positive=positive, device=self.device)}

        def encode_images(self, images, num_frames, height, width):
            """EX-4D: each first frame -> PIL (``to_pil_image(x.float() * 0.5 + 0.5)``) -> 1.1.2's
            ``encode_image`` (PIL resize, ``preprocess_image``, CLIP, VAE of [image, zeros], msk)."""
            import torchvision

            clip_context, y = [], []
            for i in range(images.shape[0]):
                image_pil = torchvision.transforms.functional.to_pil_image(images[i].float() * 0.5 + 0.5)
                out = self.encode_image(image_pil, num_frames, height, width)
                clip_context.append(out["clip_fea"])
                y.extend(out["y"])
            return {"clip_fea": torch.cat(clip_context, dim=0), "y": torch.stack(y, dim=0)}

        def encode_rays(self, video, mask):
            with torch.amp.autocast(dtype=torch.bfloat16, device_type=torch.device(self.device).type):
                return self.camera_encoder(video, mask, self.vae)

        def load_cam(self, pretrained_path):
            state = torch.load(pretrained_path, map_location="cpu", weights_only=True)
            missing, unexpected = self.camera_encoder.load_state_dict(state, strict=False)
            return len([n for n, _ in self.camera_encoder.named_parameters()]) - len(missing), len(unexpected)

        @torch.no_grad()
        def __call__(self, prompt, video, mask, negative_prompt="", seed=None, height=480, width=832,
                     num_frames=81, cfg_scale=5.0, num_inference_steps=50, sigma_shift=5.0):  # fmt: skip
            """EX-4D's ``__call__`` (denoising_strength 1, no input video, untiled decode); returns the
            final latents too."""
            height, width = self.check_resize_height_width(height, width)
            self.scheduler.set_timesteps(num_inference_steps, 1.0, shift=sigma_shift)
            shape = (1, 16, (num_frames - 1) // 4 + 1, height // 8, width // 8)
            latents = self.generate_noise(shape, seed=seed, device="cpu", dtype=torch.float32).to(self.device)
            prompt_emb_posi = self.encode_prompt(prompt, positive=True)
            if cfg_scale != 1.0:
                prompt_emb_nega = self.encode_prompt(negative_prompt, positive=False)
            image_emb = self.encode_images(video[:, :, 0], num_frames, height, width)
            image_emb["ray_latent"] = self.encode_rays(video, mask)
            extra_input = self.prepare_extra_input(latents)
            with torch.amp.autocast(dtype=torch.bfloat16, device_type=torch.device(self.device).type):
                for i, timestep in enumerate(self.scheduler.timesteps):
                    timestep = timestep.unsqueeze(0).to(dtype=torch.float32, device=self.device)
                    posi = self.dit(latents, timestep=timestep, **prompt_emb_posi, **image_emb, **extra_input)
                    if cfg_scale != 1.0:
                        nega = self.dit(latents, timestep=timestep, **prompt_emb_nega, **image_emb, **extra_input)
                        noise_pred = nega + cfg_scale * (posi - nega)
                    else:
                        noise_pred = posi
                    latents = self.scheduler.step(noise_pred, self.scheduler.timesteps[i], latents)
            frames = self.decode_video(latents, tiled=False)
            frames = np.stack([np.asarray(f) for f in self.tensor2video(frames[0])])
            return latents, frames, image_emb

    return Ex4dReferencePipeline


# ------------------------------------------------------------------------------ loading the models
def build_pipeline(d112, models: Path, device: str = "cpu"):
    """1.1.2's modules at the tiny fixture's sizes, weights from the published files through 1.1.2's
    own readers and state-dict converters; EX-4D's LoRA, camera encoder and ray tokens on top."""
    sys.path.insert(0, str(HERE))
    import generation_fixtures as gf

    wan = models / WAN
    load = d112.utils.load_state_dict
    state = {}
    for i in range(1, 8):
        state.update(load(str(wan / f"diffusion_pytorch_model-{i:05d}-of-00007.safetensors")))
    state, _ = d112.dit.WanModel.state_dict_converter().from_civitai(state)
    c = gf.DIT_CFG
    dit = d112.dit.WanModel(
        model_type="i2v", patch_size=c["patch_size"], text_len=512, in_dim=c["in_dim"], dim=c["dim"],
        ffn_dim=c["ffn_dim"], freq_dim=c["freq_dim"], text_dim=c["text_dim"], out_dim=c["out_dim"],
        num_heads=c["num_heads"], num_layers=c["num_layers"], qk_norm=True, cross_attn_norm=True, eps=c["eps"],
    )  # fmt: skip
    dit.load_state_dict(state, strict=True)
    text_encoder = d112.t5.WanTextEncoder(**gf.T5_CFG)
    text_encoder.load_state_dict(load(str(wan / "models_t5_umt5-xxl-enc-bf16.pth")), strict=True)
    vae = d112.vae.WanVideoVAE(z_dim=16)
    vae.model = d112.vae.VideoVAE_(dim=gf.VAE_DIM, z_dim=16).eval().requires_grad_(False)
    vae_state = d112.vae.WanVideoVAE.state_dict_converter().from_civitai(load(str(wan / "Wan2.1_VAE.pth")))
    vae.load_state_dict(vae_state, strict=True)
    image_encoder = d112.clip.WanImageEncoder.__new__(d112.clip.WanImageEncoder)
    torch.nn.Module.__init__(image_encoder)
    image_encoder.model, image_encoder.transforms = d112.clip.clip_xlm_roberta_vit_h_14(
        pretrained=False, return_transforms=True, return_tokenizer=False, dtype=torch.float32, device="cpu",
        **gf.CLIP_CFG,
    )  # fmt: skip
    clip_state = d112.clip.WanImageEncoder.state_dict_converter().from_civitai(
        load(str(wan / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"))
    )
    image_encoder.load_state_dict(clip_state, strict=True)

    pipe = make_pipeline_class(d112)(device=device, torch_dtype=torch.float32)
    pipe.text_encoder, pipe.dit, pipe.vae, pipe.image_encoder = text_encoder, dit, vae, image_encoder
    pipe.prompter.fetch_models(text_encoder)
    pipe.prompter.fetch_tokenizer(str(wan / "google" / "umt5-xxl"))
    pipe.camera_encoder = CamVidEncoder(16, gf.ENCODER_HIDDEN, c["dim"])
    lora = add_lora_to_model(pipe.denoising_model(), models / CKPT)
    cam = pipe.load_cam(models / CKPT)
    add_ray_tokens(pipe.dit)
    for m in (dit, text_encoder, vae, image_encoder, pipe.camera_encoder):
        m.to(device).eval()
    return pipe, {"lora_loaded": lora, "camera_loaded": cam}


def run_case(pipe, guide: Path, out: Path, opts: dict) -> None:
    """One generation as generate.py runs it: guide reading, bf16 conditioning, the pipeline."""
    h, w, n = opts["height"], opts["width"], opts["num_frames"]
    g = np.load(guide)
    random.seed(opts.get("seed", 0))  # generate.py draws the kernels unseeded; our port seeds Random(seed)
    mask_tensor = load_mask_frames(g["mask"], n, h, w)
    color_tensor = load_video_frames(g["color"], n, h, w)
    color_tensor = (color_tensor * mask_tensor).to(torch.bfloat16) * 2 - 1
    mask_tensor = mask_tensor.to(torch.bfloat16) * 2 - 1
    # float32 hand-over (exact): with autocast disabled the float32 models need float32 inputs
    video, mask = color_tensor.float()[None], mask_tensor.float()[None]
    latents, frames, emb = pipe(
        prompt=opts.get("prompt", PROMPT),
        negative_prompt=opts.get("negative_prompt", ""),
        video=video,
        mask=mask,
        seed=opts.get("seed", 0),
        height=h,
        width=w,
        num_frames=n,
        cfg_scale=opts.get("cfg", 5.0),
        num_inference_steps=opts.get("steps", 25),
        sigma_shift=opts.get("shift", 5.0),
    )
    np.savez(
        out,
        latents=latents.float().numpy(),
        frames=frames,
        colour_cond=video.numpy(),
        mask_cond=mask.numpy(),
        clip=emb["clip_fea"].float().numpy(),
        y=emb["y"].float().numpy(),
        camera_tokens=emb["ray_latent"].float().numpy(),
    )


def main(models: Path, cases: list[dict]) -> dict:
    """Every case ``{"guide": npz, "out": npz, "opts": {...}}`` with one pipeline (built once)."""
    import transformers

    d112 = import_diffsynth_112()
    float32_cpu_patches(d112)
    pipe, counts = build_pipeline(d112, models)
    for case in cases:
        run_case(pipe, Path(case["guide"]), Path(case["out"]), case["opts"])
    return {**counts, "transformers": transformers.__version__, "diffsynth": "1.1.2"}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))))
