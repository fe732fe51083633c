"""VRAM profiles: where the generator's weights live while it runs.

- ``full``: everything on the GPU (about 48 GB at 512 x 512 x 49 in bf16; the reference's setting).
- ``24gb``: models wait in (pinned) CPU memory and come to the GPU only while used; the DiT keeps
  its first ``resident_blocks`` (8 of 40: ~6.5 GB) transformer blocks on the GPU and streams the others block by block,
  copying block i+1 on a side CUDA stream while block i computes.
- ``12gb``: as ``24gb`` with no resident DiT block, the T5 blocks streamed too, the CFG branches run
  one after the other, the three VAE encodes one by one and the VAE decode tiled.
- ``fast`` (opt-in, GPU with compute capability >= 8.9): as ``full``, but the DiT blocks' linear layers
  in FP8 (weights stored in float8_e4m3fn: ~16 GB less), their self-attention through SageAttention
  (INT8) where installed, and torch.compile on the GPU; see :mod:`.fast`. NOT exact: a different
  arithmetic, its deviation from ``full`` is measured by ``benchmarks/bench_fast.py``.

The arithmetic is the same in ``full``, ``24gb`` and ``12gb``; only where the weights sit changes. The
step cache (:class:`~.fast.StepCache`, ``Profile.step_cache`` > 0, any profile) is off by default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BAD_INPUT, DEVICE, Ex4dError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Profile:
    name: str
    resident: bool  # every model stays on the GPU
    resident_blocks: int  # DiT blocks kept on the GPU when not resident (the rest are streamed)
    stream_text_encoder: bool  # stream the T5 blocks too
    cfg_batch: bool  # both CFG branches as one batch of 2
    vae_batch: bool  # the 3 VAE encodes as one batch of 3
    vae_tiled: bool  # tiled VAE decode
    fp8: bool = False  # the DiT blocks' linear layers in FP8 (fast.convert_dit)
    attention: str = "exact"  # "exact": diffsynth's SDPA; "auto" / "sage" / "sdpa": fast.Int8Attention
    compile: bool = False  # torch.compile the DiT blocks (on the GPU)
    step_cache: float = 0.0  # > 0: fast.StepCache threshold (skips DiT evaluations); 0: off


PROFILES: dict[str, Profile] = {
    "full": Profile("full", True, 0, False, True, True, False),
    "24gb": Profile("24gb", False, 8, False, True, True, False),
    "12gb": Profile("12gb", False, 0, True, False, False, True),
    "fast": Profile("fast", True, 0, False, True, True, False, fp8=True, attention="auto", compile=True),
}
DEFAULT_STEP_CACHE = 0.1  # threshold when the step cache is asked for without one


def resolve_profile(profile: str | Profile, *, step_cache: float | None = None) -> Profile:
    """A :class:`Profile` from its name (or itself), with the step cache threshold set when given
    (``0`` turns it off). One clear error for an unknown name or a negative threshold."""
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise Ex4dError(
                f"unknown VRAM profile '{profile}'",
                where="--vram-profile",
                hint=f"one of {', '.join(PROFILES)}",
                code=BAD_INPUT,
            )
        profile = PROFILES[profile]
    if step_cache is not None:
        if not step_cache >= 0:
            raise Ex4dError(f"step cache threshold {step_cache} < 0", where="--step-cache", code=BAD_INPUT)
        profile = dataclasses.replace(profile, step_cache=float(step_cache))
    return profile


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


class BlockStreamer:
    """Keeps ``blocks[n_resident:]`` in CPU memory and copies each to ``device`` right before it
    runs (forward pre-hook), prefetching the next streamed block on a side stream; a block's GPU
    copy is dropped right after it ran (forward hook)."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device, n_resident: int = 0):
        self.blocks, self.device = blocks, device
        self.order = list(range(min(n_resident, len(blocks)), len(blocks)))
        cuda = device.type == "cuda"
        for i in range(len(blocks)):
            if i not in self.order:
                blocks[i].to(device)
        self.cpu: dict[int, list[torch.Tensor]] = {}
        for i in self.order:
            for t in _tensors(blocks[i]):
                host = t.data.to("cpu")
                t.data = host.pin_memory() if cuda else host
            self.cpu[i] = [t.data for t in _tensors(blocks[i])]
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.loaded: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.handles = []
        for i in self.order:
            self.handles.append(blocks[i].register_forward_pre_hook(self._pre_hook(i)))
            self.handles.append(blocks[i].register_forward_hook(self._post_hook(i)))

    def _load(self, i: int) -> None:
        if i in self.loaded:
            return
        if self.stream is None:
            self.loaded[i] = ([t.to(self.device) for t in self.cpu[i]], None)
            return
        with torch.cuda.stream(self.stream):
            gpu = [t.to(self.device, non_blocking=True) for t in self.cpu[i]]
            event = torch.cuda.Event()
            event.record(self.stream)
        self.loaded[i] = (gpu, event)

    def _pre_hook(self, i: int):
        def hook(module, args):
            self._load(i)
            gpu, event = self.loaded[i]
            if event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                for g in gpu:
                    g.record_stream(current)
            for t, g in zip(_tensors(module), gpu, strict=True):
                t.data = g
            k = self.order.index(i)
            self._load(self.order[(k + 1) % len(self.order)])  # prefetch the next streamed block

        return hook

    def _post_hook(self, i: int):
        def hook(module, args, output):
            for t, c in zip(_tensors(module), self.cpu[i], strict=True):
                t.data = c
            self.loaded.pop(i, None)

        return hook

    def release(self) -> None:
        """Drop prefetched copies (between clips)."""
        self.loaded.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.loaded.clear()


def _move_except(module: nn.Module, device: torch.device, skip: nn.Module | None) -> None:
    for child in module.children():
        if child is not skip:
            child.to(device)
    for name, p in module._parameters.items():
        if p is not None:
            module._parameters[name].data = p.data.to(device)


class Placement:
    """Applies a :class:`Profile` to an :class:`~.pipeline.Ex4dPipeline`'s models."""

    def __init__(self, pipe, profile: Profile, device: torch.device):
        self.profile, self.device = profile, device
        self.streamers: dict[int, BlockStreamer] = {}
        self.fast_info: dict = {}
        self.step_cache = None
        if profile.step_cache > 0:
            from .fast import StepCache

            self.step_cache = StepCache(profile.step_cache)
            pipe.predict_noise = self.step_cache.wrap(pipe.predict_noise)
        if profile.resident:
            for m in (pipe.dit, pipe.vae, pipe.text_encoder, pipe.image_encoder, pipe.camera_encoder):
                m.to(device)
            self._apply_fast(pipe)
            return
        pipe.camera_encoder.to(device)
        _move_except(pipe.dit, device, pipe.dit.blocks)
        self.streamers[id(pipe.dit)] = BlockStreamer(pipe.dit.blocks, device, profile.resident_blocks)
        if profile.stream_text_encoder:
            self.streamers[id(pipe.text_encoder)] = BlockStreamer(pipe.text_encoder.blocks, device, 0)
        if device.type == "cuda":  # pinned host memory makes the on/off-loads fast
            for m in (pipe.vae, pipe.image_encoder) + (() if profile.stream_text_encoder else (pipe.text_encoder,)):
                for t in _tensors(m):
                    t.data = t.data.pin_memory()

    @contextlib.contextmanager
    def onload(self, module: nn.Module) -> Iterator[None]:
        """Bring ``module`` to the GPU for the block (no-op when resident). Weights are read-only,
        so leaving only re-points them at their (pinned) host copies: nothing is copied back."""
        if self.profile.resident or module is None:
            yield
            return
        streamer = self.streamers.get(id(module))
        skip = set(map(id, _tensors(streamer.blocks))) if streamer else set()
        tensors = [t for t in _tensors(module) if id(t) not in skip]
        host = [t.data for t in tensors]
        for t in tensors:
            t.data = t.data.to(self.device, non_blocking=True)
        try:
            yield
        finally:
            for t, h in zip(tensors, host, strict=True):
                t.data = h
            if streamer:
                streamer.release()

    def _apply_fast(self, pipe) -> None:
        """The ``fast`` arithmetic (:mod:`.fast`) on the DiT, where the profile asks for it."""
        from . import fast

        if self.profile.fp8:
            if self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < fast.FP8_MIN_CAPABILITY:
                cap = ".".join(map(str, torch.cuda.get_device_capability(self.device)))
                raise Ex4dError(
                    f"the fast profile needs FP8 tensor cores (compute capability >= 8.9); this GPU has {cap}",
                    where="--vram-profile",
                    hint="use --vram-profile full, 24gb or 12gb (see ex4d doctor)",
                    code=DEVICE,
                )
            try:
                conv = fast.convert_dit(pipe.dit)
            except RuntimeError as exc:
                raise Ex4dError(
                    str(exc)[:300], where="--vram-profile", hint="use --vram-profile full", code=DEVICE
                ) from exc
            pipe.lora_merged = max(getattr(pipe, "lora_merged", 0), conv.lora_merged)
            self.fast_info.update(
                activation_scaling=conv.activation_scaling,
                fp8_layers=len(conv.converted),
                kept_layers=len(conv.kept),
                fp8_weight_gib_saved=round((conv.bytes_before - conv.bytes_after) / 2**30, 2),
            )
            log.info("fast profile: %d linear layers in FP8, %d kept", len(conv.converted), len(conv.kept))
        if self.profile.attention != "exact":
            self.fast_info["attention"] = fast.use_8bit_attention(pipe.dit, self.device, self.profile.attention)

    @contextlib.contextmanager
    def dit_forward(self) -> Iterator[None]:
        # The DiT's non-block parts stay on the GPU; its blocks are streamed by hooks. diffsynth's own
        # attention calls stay on SDPA even where sageattention is installed (exact profiles stay exact;
        # ``fast`` routes only its self-attention through fast.Int8Attention).
        from .fast import exact_attention

        with exact_attention():
            yield

    def release(self) -> None:
        if self.step_cache is not None:
            self.step_cache.reset()
        for s in self.streamers.values():
            s.release()

    def close(self) -> None:
        for s in self.streamers.values():
            s.close()
        self.streamers.clear()
