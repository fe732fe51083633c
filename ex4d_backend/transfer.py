"""Pinned (page-locked) host staging buffers for fast host <-> GPU copies.

Copies between pageable numpy memory and the GPU run at a few GB/s; through pinned memory they run at the
bus's speed and asynchronously, so a chunked pipeline can overlap them with GPU work. Buffers are cached
per (name, slot) and grow as needed; :func:`release` frees them (the service calls it after a job).
"""

from __future__ import annotations

import numpy as np
import torch

_BUFFERS: dict[tuple[str, int], torch.Tensor] = {}


def staging(name: str, slot: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A pinned host tensor of ``shape``/``dtype`` (contents undefined), reused across calls."""
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    buf = _BUFFERS.get((name, slot))
    if buf is None or buf.numel() < nbytes:
        _BUFFERS[(name, slot)] = buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return buf[:nbytes].view(dtype).view(shape)


def upload(array: np.ndarray, name: str, slot: int, device: torch.device) -> torch.Tensor:
    """Copy a numpy array to ``device`` through a pinned buffer (asynchronous on the current stream: do not
    reuse ``(name, slot)`` until that stream has passed this copy)."""
    src = np.asarray(array)  # may be a read-only memory map (the job store's): numpy copies it in
    dtype = torch.from_numpy(np.empty(0, src.dtype)).dtype
    buf = staging(name, slot, tuple(src.shape), dtype)
    buf.numpy()[...] = src
    return buf.to(device, non_blocking=True)


def download_async(tensor: torch.Tensor, name: str, slot: int) -> tuple[torch.Tensor, torch.cuda.Event]:
    """Start copying a GPU tensor into a pinned buffer; returns the buffer and an event to wait on."""
    buf = staging(name, slot, tuple(tensor.shape), tensor.dtype)
    buf.copy_(tensor, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return buf, event


def release() -> None:
    """Free every cached pinned buffer."""
    _BUFFERS.clear()
