"""``precision="reference"`` plumbing on the CPU (tiny models in bf16, CPU bf16 autocast): which tensors are
float32. The reference (diffsynth 1.1.2 + EX-4D under ``torch.autocast(bfloat16)``) keeps float32: the LoRA
weights (cast before ex4d.ckpt is loaded), the timestep embedding and projection and the output head (its
``amp.autocast(float32)`` blocks), hence the DiT's residual stream from the first block on, and CLIP's
LayerNorm (autocast runs layer_norm in float32). The default ``bf16`` keeps everything in bf16."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffsynth")
import generation_fixtures as gf  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return gf.shared_models_dir(tmp_path_factory)


def _dtypes_seen(pipe):
    """Run condition() and one DiT evaluation; return the output dtype of each watched module."""
    import torch.nn as nn

    color, mask = gf.guide(t=5, h=32, w=32)
    from ex4d_backend.generation.conditioning import prepare_guide

    c, m = prepare_guide(color, mask, height=32, width=32, num_frames=5, seed=0)
    clip_norm = next(mod for mod in pipe.image_encoder.modules() if isinstance(mod, nn.LayerNorm))
    watched = {
        "time_embedding": pipe.dit.time_embedding,
        "time_projection": pipe.dit.time_projection,
        "head": pipe.dit.head.head,
        "block_0": pipe.dit.blocks[0],
        "block_last": pipe.dit.blocks[-1],
        "patch_embedding": pipe.dit.patch_embedding,
        "clip_layernorm": clip_norm,
    }
    seen = {}

    def watch(name):
        def hook(module, inputs, out):
            seen.setdefault(name, out.dtype)  # the first call (block_0: its first use)
            if name == "clip_layernorm" and "clip_exact" not in seen:
                x = inputs[0]
                f32 = torch.nn.functional.layer_norm(
                    x.float(), module.normalized_shape, module.weight.float(), module.bias.float(), module.eps
                )
                seen["clip_exact"] = torch.equal(out, f32.to(out.dtype))
                seen["clip_in"] = x.dtype

        return hook

    handles = [mod.register_forward_hook(watch(name)) for name, mod in watched.items()]
    try:
        cond = pipe.condition(c, m, ["a prompt", "a negative prompt"])
        lat = torch.randn(1, 16, 2, 4, 4)
        pred = pipe.predict_noise(lat, torch.tensor([937.5]), cond)
    finally:
        for h in handles:
            h.remove()
    return seen, pred


def test_reference_precision_keeps_the_float32_islands(models):
    """Wrong code it catches: LoRA loaded through bf16 (its values rounded), a bf16 timestep embedding or
    modulation (the residual stream then drops to bf16), CLIP outside autocast, the LoRA merged."""
    from ex4d_backend.generation import load_generator

    pipe = load_generator("ex4d", models_dir=models, device="cpu", dtype=torch.bfloat16, precision="reference")
    assert pipe.lora_merged == 0 and pipe.rope == "float64"
    ckpt = torch.load(models / gf.CKPT, weights_only=True)
    lora = {k: v for k, v in pipe.dit.state_dict().items() if ".lora_" in k}
    assert len(lora) == 2 * 10 * gf.DIT_CFG["num_layers"]
    for k, v in lora.items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, ckpt[k], rtol=0, atol=0)  # the file's values, not bf16-rounded
    assert pipe.dit.blocks[0].self_attn.q.base_layer.weight.dtype == torch.bfloat16  # base weights stay bf16
    seen, pred = _dtypes_seen(pipe)
    for name in ("time_embedding", "time_projection", "head", "block_0", "block_last"):
        assert seen[name] == torch.float32, (name, seen[name])
    assert seen["clip_in"] == torch.bfloat16 and seen["clip_exact"]  # bf16 in, computed in float32
    assert seen["patch_embedding"] == torch.bfloat16  # as the reference: its patchify conv runs in bf16
    assert torch.isfinite(pred).all()


def test_default_bf16_precision_is_bf16_throughout(models):
    """The default: LoRA merged into bf16 weights, every watched output bf16 (the faster arithmetic)."""
    from ex4d_backend.generation import load_generator

    pipe = load_generator("ex4d", models_dir=models, device="cpu", dtype=torch.bfloat16)
    assert pipe.lora_merged == 10 * gf.DIT_CFG["num_layers"] and pipe.precision == "bf16"
    seen, _ = _dtypes_seen(pipe)
    for name in ("time_embedding", "time_projection", "head", "block_0", "block_last", "patch_embedding"):
        assert seen[name] == torch.bfloat16, (name, seen[name])
    assert not seen["clip_exact"]  # CLIP's LayerNorm computed in bf16


def test_unknown_precision_is_one_clear_error(models):
    from ex4d_backend.errors import Ex4dError
    from ex4d_backend.generation import load_generator

    with pytest.raises(Ex4dError, match="unknown precision 'fp8'"):
        load_generator("ex4d", models_dir=models, device="cpu", precision="fp8")
