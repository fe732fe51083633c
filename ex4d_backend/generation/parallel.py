"""Several GPUs (or CPU processes) for one clip: CFG-parallel and Ulysses sequence parallel.

Layout (:func:`plan`) of ``world`` ranks for a clip: with classifier-free guidance and an even
``world`` the two CFG branches run on two halves of the ranks (``cfg = 2``), each half splits its
branch's token sequence over ``sp = world / cfg`` ranks (Ulysses); ``sp`` must divide the DiT's heads
(40 for the 14B: 2, 4, 5, 8 ranks per branch). Rank ``r`` computes branch ``r // sp`` with sequence
shard ``r % sp``.

1. **CFG-parallel** (:func:`cfg_parallel_predict`): each rank evaluates the DiT on its branch (batch 1)
   and the two predictions are all-gathered in branch order, so every rank combines the same CFG
   prediction and takes the same scheduler step (the latents stay identical on every rank).
2. **Ulysses sequence parallel** (:class:`SequenceParallel`): after patchify (so EX-4D's camera tokens,
   added to the patch embedding, are split with the tokens) the first DiT block's input is padded to a
   multiple of ``sp`` and sharded along the sequence; each self-attention all-to-alls q, k, v from
   (local tokens, all heads) to (all tokens, heads / sp), drops the padding, attends, and all-to-alls
   back; cross-attention and the FFN are per token and need no communication; the last block's output
   is all-gathered. The arithmetic is the one-process arithmetic up to reduction order.
3. **Processes** (:class:`ParallelGenerator`): the backend starts ``world`` worker processes
   (``torch.multiprocessing``, spawn; one GPU each, NCCL with ``NCCL_NVLS_ENABLE=0``; gloo on the CPU),
   each loads the models once and waits for clips. A cancel is agreed on by all ranks at every progress
   point (an all-reduce of the cancel flag), so every rank stops at the same step; a rank that fails
   or hangs gets every worker terminated.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import queue
import sys
import tempfile
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import constants as C
from ..errors import BAD_INPUT, CANCELLED, DEVICE, Cancelled, Ex4dError

log = logging.getLogger(__name__)

WAN_14B_HEADS = 40  # attention heads of Wan2.1-I2V-14B (5120 / 128)
WORKER_TIMEOUT_S = 600.0  # a rank silent this long (loading, a step) is taken as hung
CANCEL_GRACE_S = 60.0  # after a cancel, how long the ranks get to reach the next progress point


# ------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class Layout:
    world: int
    cfg: int  # rank groups that each run one CFG branch (1 or 2)
    sp: int  # ranks per group (sequence shards)
    replicas: int = 1  # groups that compute the same thing (a clip without CFG on more ranks than fit)

    def cfg_index(self, rank: int) -> int:
        """The CFG branch (or replica) of ``rank``'s group."""
        return rank // self.sp

    def sp_rank(self, rank: int) -> int:
        return rank % self.sp

    def sp_group_ranks(self, rank: int) -> list[int]:
        c = self.cfg_index(rank)
        return list(range(c * self.sp, (c + 1) * self.sp))

    def cfg_group_ranks(self, rank: int) -> list[int]:
        j = self.sp_rank(rank)
        return [c * self.sp + j for c in range(self.cfg)]


def plan(world: int, num_heads: int, *, cfg_active: bool = True) -> Layout:
    """The layout of ``world`` ranks (see the module docstring); one clear error when ``world`` does
    not fit the model (``num_heads`` not divisible by the ranks per branch)."""
    if world < 1:
        raise Ex4dError(f"--gpus {world}: needs at least 1", where="--gpus", code=BAD_INPUT)
    if not cfg_active:  # one branch: the most shards that divide both; the other ranks replicate
        sp = max(d for d in range(1, world + 1) if world % d == 0 and num_heads % d == 0)
        return Layout(world, 1, sp, world // sp)
    cfg = 2 if world % 2 == 0 else 1
    sp = world // cfg
    if num_heads % sp:
        ok = valid_world_sizes(num_heads)
        raise Ex4dError(
            f"--gpus {world}: {sp} sequence shards per CFG branch do not divide the DiT's {num_heads} heads",
            where="--gpus",
            hint=f"use one of {', '.join(map(str, ok))}",
            code=BAD_INPUT,
        )
    return Layout(world, cfg, sp)


def valid_world_sizes(num_heads: int, limit: int = 16) -> list[int]:
    """World sizes <= ``limit`` that :func:`plan` accepts with CFG (for 40 heads: 1, 2, 4, 5, 8, 10, 16)."""
    out = []
    for n in range(1, limit + 1):
        cfg = 2 if n % 2 == 0 else 1
        if num_heads % (n // cfg) == 0:
            out.append(n)
    return out


@dataclass
class Groups:
    """The process groups of a :class:`Layout` as seen by ``rank`` (None: a group of one rank)."""

    layout: Layout
    rank: int
    sp_group: object | None
    cfg_group: object | None


def make_groups(layout: Layout, rank: int) -> Groups:
    """Create every SP and CFG group (all ranks must call this, in the same order) and return this
    rank's. Groups of one rank are None (no communication)."""
    sp_group = cfg_group = None
    for c in range(layout.cfg * layout.replicas):
        ranks = list(range(c * layout.sp, (c + 1) * layout.sp))
        g = dist.new_group(ranks) if layout.sp > 1 else None
        if rank in ranks:
            sp_group = g
    for j in range(layout.sp):
        ranks = [c * layout.sp + j for c in range(layout.cfg)]
        g = dist.new_group(ranks) if layout.cfg > 1 else None
        if rank in ranks:
            cfg_group = g
    return Groups(layout, rank, sp_group, cfg_group)


# ----------------------------------------------------------------------------------- Ulysses
@torch.compiler.disable
def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


@torch.compiler.disable
def _all_gather_cat(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def seq_to_heads(x: torch.Tensor, sp: int, group) -> torch.Tensor:
    """(B, S / sp, heads * d) local tokens, all heads -> (B, S, heads / sp * d): all tokens (in global
    order), this rank's head group (heads [r * heads / sp, (r + 1) * heads / sp))."""
    b, s, hd = x.shape
    x = x.reshape(b, s, sp, hd // sp).permute(2, 0, 1, 3).contiguous()  # chunk j: head group j
    out = _all_to_all(x, group)  # chunk i: rank i's tokens, this rank's head group
    return out.permute(1, 0, 2, 3).reshape(b, sp * s, hd // sp)


def heads_to_seq(x: torch.Tensor, sp: int, group) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: (B, S, heads / sp * d) -> (B, S / sp, heads * d)."""
    b, n, hdl = x.shape
    s = n // sp
    x = x.reshape(b, sp, s, hdl).permute(1, 0, 2, 3).contiguous()  # chunk i: rank i's tokens
    out = _all_to_all(x, group)  # chunk j: this rank's tokens, head group j
    return out.permute(1, 2, 0, 3).reshape(b, s, sp * hdl)


class UlyssesAttention(nn.Module):
    """Wraps a DiT self-attention kernel module (diffsynth's ``AttentionModule`` or
    :class:`~.fast.Int8Attention`): sequence-sharded q, k, v in, sequence-sharded output out."""

    def __init__(self, inner: nn.Module, sp: int, group, state: SequenceParallel):
        super().__init__()
        if inner.num_heads % sp:
            raise ValueError(f"{inner.num_heads} heads cannot be split over {sp} ranks")
        self.local = copy.copy(inner)  # the same kernel on heads / sp heads
        self.local.num_heads = inner.num_heads // sp
        self.sp, self.group, self.state = sp, group, state

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = self.state.full_len
        q, k, v = (seq_to_heads(t, self.sp, self.group) for t in (q, k, v))
        pad = q.shape[1] - n
        out = self.local(q[:, :n], k[:, :n], v[:, :n])  # the padding is neither query nor key
        if pad:
            out = torch.cat([out, out.new_zeros(out.shape[0], pad, out.shape[2])], dim=1)
        return heads_to_seq(out, self.sp, self.group)


class SequenceParallel:
    """Installs Ulysses sequence parallelism on a diffsynth ``WanModel`` (hooks, reversible)."""

    def __init__(self, dit: nn.Module, sp: int, sp_rank: int, group):
        self.dit, self.sp, self.sp_rank, self.group = dit, sp, sp_rank, group
        self.full_len = 0
        self._freqs: tuple[int, torch.Tensor] | None = None
        self.originals = [b.self_attn.attn for b in dit.blocks]
        for block in dit.blocks:
            block.self_attn.attn = UlyssesAttention(block.self_attn.attn, sp, group, self)
        self.handles = [dit.blocks[0].register_forward_pre_hook(self._shard_input)]
        self.handles += [b.register_forward_pre_hook(self._shard_freqs) for b in dit.blocks[1:]]
        self.handles.append(dit.blocks[-1].register_forward_hook(self._gather_output))

    def _chunk(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim]
        padded = -(-n // self.sp) * self.sp
        if padded != n:
            shape = list(t.shape)
            shape[dim] = padded - n
            t = torch.cat([t, t.new_zeros(shape)], dim=dim)
        return t.chunk(self.sp, dim=dim)[self.sp_rank]

    def _local_freqs(self, freqs: torch.Tensor) -> torch.Tensor:
        if self._freqs is None or self._freqs[0] != id(freqs):
            self._freqs = (id(freqs), self._chunk(freqs, 0))
        return self._freqs[1]

    def _shard_input(self, module, args):
        x, context, t_mod, freqs = args
        self.full_len = x.shape[1]
        return (self._chunk(x, 1), context, t_mod, self._local_freqs(freqs))

    def _shard_freqs(self, module, args):
        x, context, t_mod, freqs = args
        return (x, context, t_mod, self._local_freqs(freqs))

    def _gather_output(self, module, args, output):
        self._freqs = None
        return _all_gather_cat(output, self.group, 1)[:, : self.full_len]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for block, attn in zip(self.dit.blocks, self.originals, strict=True):
            block.self_attn.attn = attn
        self.handles.clear()


# --------------------------------------------------------------------------------------- CFG
def cfg_parallel_predict(predict, cfg_index: int, group):
    """Wrap ``predict(latents, timestep, cond)``: this rank evaluates CFG branch ``cfg_index`` only
    (batch 1), the branches are all-gathered in order, the result is the batch-2 prediction."""

    def predict_branch(latents, timestep, cond):
        if cond.context.shape[0] == 1:  # no CFG in this clip: every rank runs the single branch
            return predict(latents, timestep, cond)
        i = cfg_index
        mine = replace(cond, context=cond.context[i : i + 1], clip_feature=cond.clip_feature[i : i + 1], y=cond.y[i : i + 1])  # fmt: skip
        return _all_gather_cat(predict(latents, timestep, mine), group, 0)

    return predict_branch


class ParallelPipeline:
    """One rank's view of an :class:`~.pipeline.Ex4dPipeline`: ``layout(cfg_active)`` installs the
    CFG split and the sequence sharding for a clip (groups for both layouts made once, up front)."""

    def __init__(self, pipe, world: int, rank: int):
        self.pipe, self.world, self.rank = pipe, world, rank
        heads = pipe.dit.blocks[0].num_heads
        self.layouts = {c: plan(world, heads, cfg_active=c) for c in (True, False)}
        self.groups = {c: make_groups(self.layouts[c], rank) for c in (True, False)}  # same order on all ranks
        self.active: tuple[bool, SequenceParallel | None] | None = None
        self.base_predict = type(pipe).predict_noise.__get__(pipe)

    @contextlib.contextmanager
    def clip(self, cfg_active: bool):
        g = self.groups[cfg_active]
        lay = g.layout
        sp = SequenceParallel(self.pipe.dit, lay.sp, lay.sp_rank(self.rank), g.sp_group) if lay.sp > 1 else None
        predict = self.base_predict
        if lay.cfg > 1:
            predict = cfg_parallel_predict(predict, lay.cfg_index(self.rank), g.cfg_group)
        cache = self.pipe.placement.step_cache
        self.pipe.predict_noise = cache.wrap(predict) if cache is not None else predict  # cache outside
        try:
            yield lay
        finally:
            if sp is not None:
                sp.remove()
            self.pipe.__dict__.pop("predict_noise", None)


# ---------------------------------------------------------------------------------- processes
@dataclass
class WorkerSpec:
    """What every rank loads: ``load_generator("ex4d", models_dir=..., device=<its device>, ...)``."""

    models_dir: str | None
    device: str  # "cuda" or "cpu"
    vram_profile: object = C.VRAM_PROFILE
    options: dict | None = None
    factory: str | None = None  # "module:function" called as function(device) -> pipeline (benchmarks)


def _agree_cancel(cancel_event, device: torch.device) -> bool:
    """True on every rank when any rank's cancel flag is set (one all-reduce of the flag)."""
    flag = torch.tensor([1.0 if cancel_event.is_set() else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def _worker(rank: int, world: int, init_file: str, spec: WorkerSpec, jobs, results, cancel_event) -> None:
    """One rank: load the models, then run clips from ``jobs[rank]`` until it sends None."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    cuda = spec.device.startswith("cuda")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        **({"device_id": device} if cuda else {}),
    )  # fmt: skip
    try:
        if spec.factory:
            import importlib

            module, _, function = spec.factory.partition(":")
            pipe = getattr(importlib.import_module(module), function)(device)
        else:
            from . import load_generator

            pipe = load_generator(
                "ex4d", models_dir=spec.models_dir, device=str(device), vram_profile=spec.vram_profile, **(spec.options or {})
            )  # fmt: skip
        par = ParallelPipeline(pipe, world, rank)
        latents: list[torch.Tensor] = []  # rank 0 returns the final latents too (small; tests, benchmarks)
        decode = pipe.vae_decode

        def capture(x):
            if rank == 0:
                latents.append(x.detach().float().cpu())
            return decode(x)

        pipe.vae_decode = capture
        results.put(("ready", rank, None))
        while True:
            job = jobs[rank].get()
            if job is None:
                break
            color, mask, kwargs = job

            def callback(stage, step, total, msg):
                if _agree_cancel(cancel_event, device):
                    raise Cancelled()
                if rank == 0:
                    results.put(("progress", rank, (stage, step, total, msg)))

            latents.clear()
            try:
                with par.clip(kwargs.get("cfg", C.CFG) != 1.0):
                    frames = pipe(color, mask, callback=callback, **kwargs)
                extra = latents[-1].numpy() if latents and rank == 0 else None
                results.put(("done", rank, (frames, extra) if rank == 0 else None))
            except Cancelled:
                results.put(("cancelled", rank, None))
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which stops every rank
                results.put(("error", rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"))
                break
    except Exception as exc:  # noqa: BLE001
        results.put(("error", rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"))
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# modules every rank needs: imported once by the fork server, then each rank forks from it
PRELOAD = ["torch", "ex4d_backend.generation.pipeline", "diffsynth.pipelines.wan_video", "peft"]


def _mp_context(mp):
    """``forkserver`` on Linux (the server imports torch / diffsynth once, before any CUDA use; the
    ranks fork from it in milliseconds instead of importing for seconds each), else ``spawn``."""
    if sys.platform.startswith("linux"):
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return mp.get_context("spawn")


class ParallelGenerator:
    """The EX-4D generator on ``world`` processes (one GPU each, or CPU processes with gloo), called
    like :class:`~.pipeline.Ex4dPipeline` (``gen(color, mask, **kwargs) -> frames``; ``close()``).

    ``callback`` receives rank 0's progress; raising :class:`~ex4d_backend.errors.Cancelled` from it
    stops every rank at its next progress point (all ranks agree on it) and the call raises Cancelled."""

    name = "ex4d"

    def __init__(self, world: int, spec: WorkerSpec, *, timeout: float = WORKER_TIMEOUT_S):
        import torch.multiprocessing as mp

        if spec.device.startswith("cuda"):
            if not torch.cuda.is_available() or torch.cuda.device_count() < world:
                have = torch.cuda.device_count() if torch.cuda.is_available() else 0
                raise Ex4dError(f"--gpus {world}: only {have} CUDA GPU(s) visible", where="--gpus", code=DEVICE)
        self.world, self.spec, self.timeout = world, spec, timeout
        self.last_latents: np.ndarray | None = None  # rank 0's final latents of the last clip (float32)
        self._dir = tempfile.TemporaryDirectory(prefix="ex4d-dist-")
        ctx = _mp_context(mp)
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(world)]
        self.cancel_event = ctx.Event()
        init_file = str(Path(self._dir.name) / "init")
        self.procs = [
            ctx.Process(
                target=_worker,
                args=(r, world, init_file, spec, self.jobs, self.results, self.cancel_event),
                daemon=True,
                name=f"ex4d-rank{r}",
            )
            for r in range(world)
        ]
        for p in self.procs:
            p.start()
        try:
            ready = set()
            while len(ready) < world:
                kind, rank, payload = self._next(self.timeout)
                if kind == "error":
                    raise self._failure(rank, payload)
                if kind == "ready":
                    ready.add(rank)
        except BaseException:
            self.close()
            raise

    def _next(self, timeout: float):
        try:
            return self.results.get(timeout=timeout)
        except queue.Empty:
            dead = [p.name for p in self.procs if not p.is_alive()]
            raise Ex4dError(
                f"the generator ranks did not answer within {timeout:.0f} s" + (f" ({', '.join(dead)} died)" if dead else ""),
                code=DEVICE,
            ) from None  # fmt: skip

    def _failure(self, rank: int, message: str) -> Ex4dError:
        first = message.splitlines()[0] if message else "unknown error"
        log.error("generator rank %d failed:\n%s", rank, message)
        return Ex4dError(f"generator rank {rank} failed: {first[:300]}", code=DEVICE)

    def __call__(self, color: np.ndarray, mask: np.ndarray, *, callback=None, **kwargs) -> np.ndarray:
        if not self.procs:
            raise Ex4dError("the parallel generator was closed", code=DEVICE)
        self.cancel_event.clear()
        for q in self.jobs:
            q.put((color, mask, kwargs))
        finished: dict[int, object] = {}
        cancelled = False
        deadline_timeout = self.timeout
        try:
            while len(finished) < self.world:
                kind, rank, payload = self._next(deadline_timeout)
                if kind == "progress":
                    if callback is not None and not cancelled:
                        try:
                            callback(*payload)
                        except Cancelled:
                            cancelled = True
                            self.cancel_event.set()
                            deadline_timeout = CANCEL_GRACE_S
                elif kind == "error":
                    raise self._failure(rank, payload)
                elif kind in ("done", "cancelled"):
                    finished[rank] = (kind, payload)
        except BaseException:
            self.close()  # a failed or hung rank leaves the others in a collective: stop them all
            raise
        kinds = {k for k, _ in finished.values()}
        if "cancelled" in kinds or cancelled:
            raise Cancelled()
        frames, latents = finished[0][1]
        self.last_latents = latents
        return frames

    def close(self) -> None:
        """Stop every rank (politely, then by force) and free their GPUs."""
        for q in self.jobs:
            with contextlib.suppress(Exception):
                q.put(None)
        for p in self.procs:
            p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.procs = []
        with contextlib.suppress(Exception):
            self._dir.cleanup()


__all__ = [
    "CANCELLED",
    "Layout",
    "ParallelGenerator",
    "ParallelPipeline",
    "SequenceParallel",
    "WorkerSpec",
    "cfg_parallel_predict",
    "heads_to_seq",
    "plan",
    "seq_to_heads",
    "valid_world_sizes",
]
