"""EX-4D's camera encoder ("CamVidEncoder") and the hook that adds its tokens to the Wan DiT.

The encoder maps the VAE latents of the guide colour video and of the guide mask video (16 + 16
channels, concatenated) through three 1x1x1 convolutions (32 -> 1024 -> 1024 -> 1024, SiLU between)
and a patch convolution (1024 -> DiT width, kernel = stride = (1, 2, 2)) to one token per DiT patch.
The parameter names (``latent_encoder.{0,2,4}``, ``latent_patch_embedding``) match ``ex4d.ckpt``.

:class:`CameraTokenHook` is a forward hook on the DiT's ``patch_embedding`` Conv3d: the camera
tokens (B or 1, dim, f, h, w) are added to its output, i.e. right after patchify and before the
tokens are flattened, exactly where the reference adds them. The same tokens serve both CFG branches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class CamVidEncoder(nn.Module):
    """Guide latents (colour, mask) -> camera tokens shaped like the DiT's patch embedding output."""

    def __init__(self, latent_channels: int = 16, hidden: int = 1024, dim: int = 5120, patch=(1, 2, 2)):
        super().__init__()
        self.latent_encoder = nn.Sequential(
            nn.Conv3d(2 * latent_channels, hidden, kernel_size=1),
            nn.SiLU(),
            nn.Conv3d(hidden, hidden, kernel_size=1),
            nn.SiLU(),
            nn.Conv3d(hidden, hidden, kernel_size=1),
        )
        self.latent_patch_embedding = nn.Conv3d(hidden, dim, kernel_size=patch, stride=patch)
        nn.init.zeros_(self.latent_patch_embedding.weight)  # zero-initialised, as in the reference
        nn.init.zeros_(self.latent_patch_embedding.bias)

    def forward(self, color_latents: torch.Tensor, mask_latents: torch.Tensor) -> torch.Tensor:
        """(B, 16, f, H/8, W/8) each -> (B, dim, f, H/16, W/16)."""
        x = torch.cat([color_latents, mask_latents], dim=1)
        return self.latent_patch_embedding(self.latent_encoder(x))


def _timestep_to_weight_dtype(module: nn.Module, args):
    """The reference passes the timestep in float32 (its DiT embeds it under float32 autocast);
    diffsynth 2.x needs the embedding input in the weight dtype. Taking the float32 timestep and
    casting only its sinusoidal embedding keeps e.g. t = 999.0 exact instead of rounding it to a
    bf16 timestep (1000.0) first."""
    weight = module[0].weight
    return (args[0].to(weight.dtype),) + tuple(args[1:])


class CameraTokenHook:
    """Adds camera tokens to the output of ``dit.patch_embedding`` while :meth:`active` is entered.

    Also lets the DiT take a float32 timestep (a pre-hook on ``dit.time_embedding`` casts the
    sinusoidal embedding to the weight dtype), as the reference pipeline does.
    """

    def __init__(self, dit: nn.Module):
        self.tokens: torch.Tensor | None = None
        self.cast_timestep = True  # False: the float32 timestep embedding stays float32 (reference precision)
        self.handle = dit.patch_embedding.register_forward_hook(self._hook)
        self.time_handle = dit.time_embedding.register_forward_pre_hook(self._time_hook)

    def _time_hook(self, module: nn.Module, args):
        return _timestep_to_weight_dtype(module, args) if self.cast_timestep else None

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if self.tokens is None:
            return output
        if self.tokens.shape[1:] != output.shape[1:]:
            raise RuntimeError(f"camera tokens {tuple(self.tokens.shape)} do not match patches {tuple(output.shape)}")
        return output + self.tokens.to(output.dtype)

    @contextlib.contextmanager
    def active(self, tokens: torch.Tensor) -> Iterator[None]:
        self.tokens = tokens
        try:
            yield
        finally:
            self.tokens = None

    def remove(self) -> None:
        self.handle.remove()
        self.time_handle.remove()
