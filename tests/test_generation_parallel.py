"""Several processes for one clip (CFG-parallel, Ulysses sequence parallel) on the CPU with gloo.

Ground truth is the one-process generator on the same tiny random-weight models (published layout,
real loading code) and the same guide: the final latents of 2 and 4 gloo processes must equal its
final latents to float32 rounding. Wrong code each test catches is in its docstring.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ex4d_backend.errors import Cancelled, Ex4dError
from ex4d_backend.generation import parallel

pytest.importorskip("diffsynth")
import generation_fixtures as gf  # noqa: E402

# 48 x 48 x 9: 3 x 3 x 3 = 27 patch tokens, not a multiple of 2: the sequence shards need padding
SIZE = dict(height=48, width=48, num_frames=9, steps=2, seed=0)


def test_plan_layouts_for_40_heads():
    """2 ranks: one CFG branch each; 4 / 8 / 10: CFG x Ulysses 2 / 4 / 5; odd counts: Ulysses only;
    counts whose shards do not divide the heads: one clear error listing the valid ones."""
    p = parallel.plan
    assert (p(1, 40).cfg, p(1, 40).sp) == (1, 1)
    assert (p(2, 40).cfg, p(2, 40).sp) == (2, 1)
    assert (p(4, 40).cfg, p(4, 40).sp) == (2, 2)
    assert (p(8, 40).cfg, p(8, 40).sp) == (2, 4)
    assert (p(10, 40).cfg, p(10, 40).sp) == (2, 5)
    assert (p(5, 40).cfg, p(5, 40).sp) == (1, 5)
    assert (p(2, 40, cfg_active=False).cfg, p(2, 40, cfg_active=False).sp) == (1, 2)
    no_cfg = p(16, 40, cfg_active=False)  # 16 shards would not divide 40 heads: 8 shards, 2 replicas
    assert (no_cfg.cfg, no_cfg.sp, no_cfg.replicas) == (1, 8, 2)
    assert parallel.valid_world_sizes(40) == [1, 2, 4, 5, 8, 10, 16]
    for bad in (3, 6, 0):
        with pytest.raises(Ex4dError, match="--gpus"):
            p(bad, 40)
    lay = p(8, 40)
    assert lay.sp_group_ranks(5) == [4, 5, 6, 7] and lay.cfg_group_ranks(5) == [1, 5]
    assert lay.cfg_index(5) == 1 and lay.sp_rank(5) == 1


def _attention_rank(rank: int, world: int, init_file: str, q, k, v, heads: int, results) -> None:
    import torch.distributed as dist

    from ex4d_backend.generation.fast import Int8Attention

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sp = parallel.SequenceParallel.__new__(parallel.SequenceParallel)  # only the shard helper and length
        sp.sp, sp.sp_rank, sp.full_len = world, rank, q.shape[1]
        att = parallel.UlyssesAttention(Int8Attention(heads, "sdpa"), world, None, sp)
        out = att(sp._chunk(q, 1), sp._chunk(k, 1), sp._chunk(v, 1))
        results.put((rank, out.numpy()))  # numpy: a tensor would need this process alive to be read
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ulysses_attention_equals_full_attention_with_padding(tmp_path):
    """4 gloo ranks, 11 tokens (padded to 12), 4 heads: every rank's output shard equals the
    one-process attention of its tokens. Catches a wrong head-group mapping in the all-to-all, tokens
    out of order, and padding tokens used as keys."""
    import torch.multiprocessing as mp

    from ex4d_backend.generation.fast import Int8Attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 11, 4 * 8, generator=g) for _ in range(3))
    ref = Int8Attention(4, "sdpa")(q, k, v)
    ctx = parallel._mp_context(mp)  # as the generator starts its ranks
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_attention_rank, args=(r, 4, str(tmp_path / "init"), q, k, v, 4, results)) for r in range(4)
    ]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    full = torch.cat([torch.from_numpy(got[r]) for r in range(4)], dim=1)[:, :11]
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return gf.shared_models_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def guide():
    return gf.guide(t=9, h=64, w=64)


@pytest.fixture(scope="module")
def one_process(models, guide):
    """The one-process generator's frames and final latents, with CFG (5) and without (1)."""
    from ex4d_backend.generation import load_generator

    gen = load_generator("ex4d", models_dir=models, device="cpu")
    latents = []
    decode = gen.vae_decode
    gen.vae_decode = lambda x: (latents.append(x.detach().float().clone()), decode(x))[1]
    out = {cfg: (gen(*guide, cfg=cfg, **SIZE), latents[-1]) for cfg in (5.0, 1.0)}
    gen.close()
    return out


def _rel(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
def test_two_processes_cfg_parallel_and_sequence_parallel_equal_one_process(models, guide, one_process):
    """2 gloo ranks: with CFG each rank runs one branch (CFG-parallel), without CFG both split the
    token sequence (Ulysses, 27 tokens padded to 28). Final latents equal the one-process latents to
    float32 rounding (a swapped branch order, a missing gather, a wrong shard fails). Then a cancel
    from the progress callback stops both ranks at the same step (Cancelled; no rank is left in a
    collective: the next clip on the same ranks gives the same result again)."""
    gen = parallel.ParallelGenerator(2, parallel.WorkerSpec(str(models), "cpu"))
    try:
        for cfg in (5.0, 1.0):
            frames = gen(*guide, cfg=cfg, **SIZE)
            ref_frames, ref_latents = one_process[cfg]
            assert _rel(gen.last_latents, ref_latents) < 1e-5, cfg
            assert np.abs(frames.astype(int) - ref_frames.astype(int)).max() <= 1
        seen = []

        def cancel(stage, step, total, msg):
            seen.append((stage, step))
            if stage == "denoise" and step == 1:
                raise Cancelled()

        with pytest.raises(Cancelled):
            gen(*guide, cfg=5.0, callback=cancel, **SIZE)
        assert ("denoise", 1) in seen and ("decode", 0) not in seen
        assert all(p.is_alive() for p in gen.procs)
        gen(*guide, cfg=5.0, **SIZE)
        assert _rel(gen.last_latents, one_process[5.0][1]) < 1e-5
    finally:
        procs = list(gen.procs)
        gen.close()
    assert procs and not any(p.is_alive() for p in procs)


@pytest.mark.slow
def test_four_processes_cfg_times_ulysses_equal_one_process(models, guide, one_process):
    """4 gloo ranks = 2 CFG branches x 2 sequence shards (the composed layout): same final latents as
    one process to float32 rounding. Without CFG the tiny DiT's 2 heads allow 2 shards: 2 replicas."""
    from ex4d_backend.generation import load_generator

    gen = load_generator("ex4d", models_dir=models, device="cpu", gpus=4)  # the entry point the CLI uses
    try:
        assert isinstance(gen, parallel.ParallelGenerator) and gen.world == 4
        frames = gen(*guide, cfg=5.0, **SIZE)
        assert _rel(gen.last_latents, one_process[5.0][1]) < 1e-5
        assert np.abs(frames.astype(int) - one_process[5.0][0].astype(int)).max() <= 1
        gen(*guide, cfg=1.0, **SIZE)
        assert _rel(gen.last_latents, one_process[1.0][1]) < 1e-5
    finally:
        gen.close()


def test_bad_gpu_count_is_one_clear_error(models):
    from ex4d_backend.generation import load_generator

    with pytest.raises(Ex4dError, match="--gpus 3"):
        load_generator("ex4d", models_dir=models, device="cpu", gpus=3)
    if not torch.cuda.is_available():
        with pytest.raises(Ex4dError, match="CUDA GPU"):
            parallel.ParallelGenerator(2, parallel.WorkerSpec(str(models), "cuda"))
