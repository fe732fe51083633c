"""EX-4D generator end to end on tiny random-weight models of the real classes (CPU, no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ex4d_backend.errors import CANCELLED, Cancelled

pytest.importorskip("diffsynth")
import generation_fixtures as gf  # noqa: E402

SIZE = dict(height=64, width=64, num_frames=5, steps=2)


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory):
    return gf.make_models_dir(tmp_path_factory.mktemp("gen_models"))


@pytest.fixture(scope="session")
def pipe(tiny_models_dir):
    from ex4d_backend.generation import load_generator

    return load_generator("ex4d", models_dir=tiny_models_dir, device="cpu")


@pytest.fixture(scope="session")
def guide():
    return gf.guide()


@pytest.fixture(scope="session")
def result(pipe, guide):
    calls = []
    out = pipe(*guide, seed=0, callback=lambda *a: calls.append(a), **SIZE)
    return out, calls


def test_end_to_end_shape_and_progress(result):
    out, calls = result
    assert out.dtype == np.uint8 and out.shape == (5, 64, 64, 3)
    assert out.std() > 0  # random weights still give a non-constant video
    denoise = [(s, i, n) for s, i, n, _ in calls if s == "denoise"]
    assert denoise == [("denoise", 1, 2), ("denoise", 2, 2)]


def test_seed_reproduces_and_differs(pipe, guide, result):
    again = pipe(*guide, seed=0, **SIZE)
    np.testing.assert_array_equal(again, result[0])
    other = pipe(*guide, seed=1, **SIZE)
    assert np.abs(other.astype(int) - result[0].astype(int)).max() > 0


def test_non_square_size(pipe):
    color, mask = gf.guide(t=5, h=90, w=160)  # 16:9 footage -> 96 x 64 output, centre-cropped
    out = pipe(color, mask, height=64, width=96, num_frames=5, steps=1)
    assert out.shape == (5, 64, 96, 3)


def _dit_inputs(pipe, guide, seed=0):
    """Conditioning and noisy latents for one DiT evaluation."""
    from ex4d_backend.generation.conditioning import prepare_guide

    c, m = prepare_guide(*guide, height=64, width=64, num_frames=5, seed=seed)
    cond = pipe.condition(c, m, ["a prompt", "a negative prompt"])
    lat = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor([900.0])
    return cond, lat, t


def test_camera_tokens_reach_dit_patch_tokens(pipe, guide):
    """The patch embedding output seen by the DiT is patch_embedding(x) + encoder(latents), exactly."""
    cond, lat, t = _dit_inputs(pipe, guide)
    seen = {}
    h = pipe.dit.patch_embedding.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0], out=out))
    try:
        pipe.predict_noise(lat, t, cond)
    finally:
        h.remove()
    expected = (
        torch.nn.functional.conv3d(
            seen["x"], pipe.dit.patch_embedding.weight, pipe.dit.patch_embedding.bias, stride=(1, 2, 2)
        )
        + cond.camera_tokens
    )
    assert cond.camera_tokens.abs().max() > 0
    torch.testing.assert_close(seen["out"], expected)


def test_zero_encoder_changes_nothing_nonzero_changes_result(pipe, guide):
    cond, lat, t = _dit_inputs(pipe, guide)
    with_cam = pipe.predict_noise(lat, t, cond)
    zero = pipe.predict_noise(
        lat, t, type(cond)(**{**cond.__dict__, "camera_tokens": torch.zeros_like(cond.camera_tokens)})
    )
    pipe.camera_hook.remove()  # the DiT without any camera hook
    try:
        from diffsynth.pipelines.wan_video import model_fn_wan_video

        plain = model_fn_wan_video(
            pipe.dit, latents=lat, timestep=t, context=cond.context, clip_feature=cond.clip_feature, y=cond.y
        )
    finally:
        pipe.camera_hook.handle = pipe.dit.patch_embedding.register_forward_hook(pipe.camera_hook._hook)
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)
    assert (with_cam - plain).abs().max() > 1e-4


def test_zero_encoder_checkpoint_equals_no_camera(tmp_path, tiny_models_dir, guide):
    """A checkpoint whose zero-initialised encoder output layer was never trained == no camera tokens."""
    from ex4d_backend.generation import load_generator

    root = tmp_path / "models"
    (root / gf.WAN_REPO).parent.mkdir(parents=True)
    (root / gf.WAN_REPO).symlink_to(tiny_models_dir / gf.WAN_REPO)
    (root / gf.EX4D_REPO).mkdir(parents=True)
    torch.save(gf.ex4d_state(zero_encoder=True), root / gf.EX4D_REPO / "ex4d.ckpt")
    p = load_generator("ex4d", models_dir=root, device="cpu")
    cond, lat, t = _dit_inputs(p, guide)
    assert cond.camera_tokens.abs().max() == 0
    with_zero = p.predict_noise(lat, t, cond)
    p.camera_hook.remove()
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    plain = model_fn_wan_video(
        p.dit, latents=lat, timestep=t, context=cond.context, clip_feature=cond.clip_feature, y=cond.y
    )
    torch.testing.assert_close(with_zero, plain, rtol=0, atol=0)


def test_lora_loaded_and_active(pipe, tiny_models_dir):
    """Every LoRA tensor equals the checkpoint's, and a LoRA layer computes base(x) + B(A(x)) * alpha / r."""
    state = torch.load(tiny_models_dir / gf.EX4D_REPO / "ex4d.ckpt", weights_only=True)
    dit_state = pipe.dit.state_dict()
    lora_keys = [k for k in dit_state if ".lora_" in k]
    assert len(lora_keys) == 2 * 10 * gf.DIT_CFG["num_layers"]  # 10 layers per block, A and B
    for k in lora_keys:
        torch.testing.assert_close(dit_state[k], state[k].to(dit_state[k].dtype))
    layer = pipe.dit.blocks[1].cross_attn.q
    x = torch.randn(3, gf.DIT_CFG["dim"])
    a = state["blocks.1.cross_attn.q.lora_A.default.weight"]
    b = state["blocks.1.cross_attn.q.lora_B.default.weight"]
    base = x @ layer.base_layer.weight.T + layer.base_layer.bias
    expected = base + (x @ a.T @ b.T) * (16 / 16)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert (layer(x) - base).abs().max() > 1e-3  # the LoRA changes the output


def test_cancel_stops_between_steps_and_pipeline_still_works(pipe, guide, result):
    steps_seen = []

    def cancel(stage, step, total, msg):
        steps_seen.append((stage, step))
        if stage == "denoise" and step == 1:
            raise Cancelled()

    with pytest.raises(Cancelled) as info:
        pipe(*guide, seed=0, callback=cancel, **SIZE)
    assert info.value.code == CANCELLED
    assert ("denoise", 2) not in steps_seen
    np.testing.assert_array_equal(pipe(*guide, seed=0, **SIZE), result[0])


def test_offload_profile_same_result(tiny_models_dir, guide, result):
    """The 12gb profile (streamed DiT and T5 blocks, sequential CFG and VAE encodes, tiled decode)
    computes the same video as ``full``, up to float reassociation."""
    from ex4d_backend.generation import load_generator

    p = load_generator("ex4d", models_dir=tiny_models_dir, device="cpu", vram_profile="24gb")
    out = p(*guide, seed=0, **SIZE)
    assert np.abs(out.astype(int) - result[0].astype(int)).max() <= 1
    p.close()


def test_reference_sizes_on_meta():
    """The 14B DiT with the reference LoRA has 800 LoRA tensors / 76,677,120 parameters and the camera
    encoder 8 tensors / 23,109,632 parameters (built on the meta device: no memory)."""
    from diffsynth.models.wan_video_dit import WanModel

    from ex4d_backend.generation.camera_encoder import CamVidEncoder
    from ex4d_backend.generation.loading import inject_lora

    with torch.device("meta"):
        dit = WanModel(
            dim=5120,
            in_dim=36,
            ffn_dim=13824,
            out_dim=16,
            text_dim=4096,
            freq_dim=256,
            eps=1e-6,
            patch_size=(1, 2, 2),
            num_heads=40,
            num_layers=40,
            has_image_input=True,
        )
        inject_lora(dit)
        enc = CamVidEncoder()
    lora = {k: v for k, v in dit.state_dict().items() if ".lora_" in k}
    assert len(lora) == 800 and sum(v.numel() for v in lora.values()) == 76_677_120
    assert not any("k_img" in k or "v_img" in k for k in lora)
    sd = enc.state_dict()
    assert len(sd) == 8 and sum(v.numel() for v in sd.values()) == 23_109_632
    assert set(sd) == {f"latent_encoder.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")} | {
        "latent_patch_embedding.weight",
        "latent_patch_embedding.bias",
    }


@pytest.mark.cuda
def test_cancel_frees_gpu_memory(tiny_models_dir, guide):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from ex4d_backend.generation import load_generator

    p = load_generator("ex4d", models_dir=tiny_models_dir, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()

    def cancel(stage, step, total, msg):
        if stage == "denoise":
            raise Cancelled()

    with pytest.raises(Cancelled):
        p(*guide, callback=cancel, **SIZE)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
