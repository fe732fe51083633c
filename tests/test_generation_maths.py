"""The conditioning and sampling maths against the reference's formulas, written literally here (from
``generate.py`` and diffsynth 1.1.2 + EX-4D's ``wan_video.py`` / ``camera.py``, as /work/shared/EX4D_REFERENCE.md
quotes them). Each test names the wrong code it catches. The pure-function tests need no models; the
pipeline-level ones run the real pipeline on the tiny random-weight models (CPU, a few seconds)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ex4d_backend.generation import conditioning as cd

pytest.importorskip("diffsynth")
import generation_fixtures as gf  # noqa: E402


def _guide01(t=5, h=16, w=24, seed=0):
    """Masked colour in k/255 steps (as read from 8-bit video) and a {0, 1} mask, (T, H, W, 3) / (T, H, W)."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 256, (t, h, w, 3)).astype(np.float32) / 255.0
    mask = (rng.random((t, h, w)) > 0.3).astype(np.float32)
    return colour * mask[..., None], mask


# ----------------------------------------------------------------------------------- colour / mask
def test_guide_conditions_are_generate_py_bf16_arithmetic():
    """generate.py: ``color = (color * mask).to(bfloat16) * 2 - 1``; ``mask = mask.to(bfloat16) * 2 - 1``.
    Catches a colour guide without ``* 2 - 1`` (holes 0 instead of -1), a missing bf16 rounding, a mask in
    [0, 1]."""
    colour, mask = _guide01()
    c = torch.from_numpy(colour).permute(3, 0, 1, 2)  # (3, T, H, W), already colour * mask
    m = torch.from_numpy(mask)[None].expand(3, -1, -1, -1)
    want_c = (c.to(torch.bfloat16) * 2 - 1).float()[None]
    want_m = (m.to(torch.bfloat16) * 2 - 1).float()[None]
    got_c, got_m = cd.guide_conditions(colour, mask)
    torch.testing.assert_close(got_c, want_c, rtol=0, atol=0)
    torch.testing.assert_close(got_m, want_m, rtol=0, atol=0)
    assert (got_c[:, :, torch.from_numpy(mask) == 0] == -1).all()  # holes are -1
    assert (got_c.double() != c.double()[None] * 2 - 1).any()  # the bf16 rounding is really there
    f_c, f_m = cd.guide_conditions(colour, mask, "float")  # the named option: no rounding
    torch.testing.assert_close(f_c, c[None] * 2 - 1, rtol=0, atol=0)
    torch.testing.assert_close(f_m, want_m, rtol=0, atol=0)


def test_camera_encoder_gets_mask_times_two_minus_one_twice():
    """camera.py: ``vae.encode(video)`` and ``vae.encode(mask * 2 - 1)`` with mask = mask01 * 2 - 1 already:
    the mask enters as -3 (hole) / +1 (seen). Catches ``* 2 - 1`` applied once."""
    colour, mask = _guide01()
    cc, mc = cd.guide_conditions(colour, mask)
    video, mask_in = cd.camera_encoder_inputs(cc, mc)
    m01 = torch.from_numpy(mask)[None, None].expand(1, 3, -1, -1, -1)
    torch.testing.assert_close(mask_in, (m01 * 2 - 1) * 2 - 1, rtol=0, atol=0)
    assert set(mask_in.unique().tolist()) == {-3.0, 1.0}
    assert video is cc


# --------------------------------------------------------------------------------------- I2V frame
def test_i2v_frame_is_the_first_frame_through_8_bit_truncation():
    """wan_video.py ``encode_images(video[:, :, 0])``: ``to_pil_image(x.float() * 0.5 + 0.5)``, then 1.1.2's
    ``preprocess_image``: ``np.array(image, dtype=np.float32) * (2 / 255) - 1``. Catches the last (or any
    other) guide frame as the I2V frame and the float frame without the truncating round trip."""
    import torchvision

    colour, mask = _guide01(t=4)
    cc, _ = cd.guide_conditions(colour, mask)
    image = torchvision.transforms.functional.to_pil_image(cc[:, :, 0][0].float() * 0.5 + 0.5)
    want = torch.Tensor(np.array(image, dtype=np.float32) * (2 / 255) - 1).permute(2, 0, 1).unsqueeze(0)
    got = cd.i2v_frame(cc)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    lowered = (got < cc[:, :, 0] - 1e-6).float().mean()
    assert lowered > 0.05  # truncation: many values come back one level lower than the bf16 frame
    torch.testing.assert_close(cd.i2v_frame(cc, "float"), cc[:, :, 0], rtol=0, atol=0)


def test_i2v_video_and_frame_mask_channels():
    """encode_image: the VAE encodes [image, T-1 zero frames]; ``msk`` = 4 channels, ones for latent frame 0
    (its one frame repeated 4x), zeros after. Catches a frame mask on the wrong latent frame or channel."""
    frame = torch.randn(1, 3, 8, 16)
    video = cd.i2v_video(frame, 9)
    assert video.shape == (1, 3, 9, 8, 16)
    torch.testing.assert_close(video[:, :, 0], frame, rtol=0, atol=0)
    assert (video[:, :, 1:] == 0).all()
    msk = cd.frame_mask_channels(9, 2, 3)
    assert msk.shape == (1, 4, 3, 2, 3)
    assert (msk[:, :, 0] == 1).all() and (msk[:, :, 1:] == 0).all()


# ------------------------------------------------------------------------------ CFG and scheduler
def test_cfg_combination():
    """wan_video.py: ``noise_pred = noise_pred_nega + cfg_scale * (noise_pred_posi - noise_pred_nega)``.
    Catches a swapped pair and an ignored scale."""
    posi, nega = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    for cfg_scale in (1.0, 5.0, 7.5):
        noise_pred = nega + cfg_scale * (posi - nega)
        torch.testing.assert_close(cd.cfg_combine(posi, nega, cfg_scale), noise_pred, rtol=0, atol=0)
    assert not torch.allclose(cd.cfg_combine(nega, posi, 5.0), cd.cfg_combine(posi, nega, 5.0))


@pytest.mark.parametrize("shift", [5.0, 3.0, 8.0])
def test_scheduler_sigmas_with_shift(shift):
    """1.1.2 ``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True).set_timesteps(n, 1.0, shift)``:
    ``sigma_start = sigma_min + (sigma_max - sigma_min) * denoising_strength``; ``sigmas =
    linspace(sigma_start, sigma_min, n + 1)[:-1]``; ``sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)``;
    ``timesteps = sigmas * 1000``. Catches an ignored or fixed shift in the pipeline's scheduler."""
    from ex4d_backend.generation.pipeline import make_scheduler

    sigma_min, sigma_max, denoising_strength, steps = 0.0, 1.0, 1.0, 25
    sigma_start = sigma_min + (sigma_max - sigma_min) * denoising_strength
    sigmas = torch.linspace(sigma_start, sigma_min, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    torch.testing.assert_close(cd.flow_sigmas(steps, shift), sigmas)
    sched = make_scheduler(steps, shift)
    torch.testing.assert_close(sched.sigmas.float(), sigmas)
    torch.testing.assert_close(sched.timesteps.float(), sigmas * 1000)


# ---------------------------------------------------------------------------------- short guides
def test_short_guide_pads_with_the_last_eroded_mask():
    """generate.py on a guide shorter than num_frames: reads arange(n), erodes each read frame with its own
    ``random.randint(2, 8)`` kernel, pads by repeating the last ERODED mask (no new draw) and the last
    colour frame. Catches padding the indices and eroding every padded frame with new kernels."""
    import cv2

    color, mask = gf.guide(t=3, h=32, w=32)
    mask[:, 8:20, 6:14] = 0
    c, m = cd.prepare_guide(color, mask, height=32, width=32, num_frames=9, seed=4)
    rng = random.Random(4)
    frames = []
    for i in np.arange(3):
        kernel = rng.randint(2, 8)
        frames.append(cv2.erode(mask[i], np.ones((kernel, kernel), np.uint8), iterations=1))
    frames += [frames[-1]] * (9 - len(frames))
    want_m = (np.array(frames).astype(np.float32) / 255.0 > 0.5).astype(np.float32)
    np.testing.assert_array_equal(m, want_m)
    want_c = np.array(list(color) + [color[-1]] * 6).astype(np.float32) / 255.0 * want_m[..., None]
    np.testing.assert_array_equal(c, want_c)


# ------------------------------------------------------------------------------ the pipeline wiring
@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from ex4d_backend.generation import load_generator

    return load_generator("ex4d", models_dir=gf.shared_models_dir(tmp_path_factory), device="cpu")


def test_condition_feeds_the_reference_tensors(pipe):
    """What ``Ex4dPipeline.condition`` hands to the models is the reference's: CLIP gets the first frame's
    8-bit round trip; the VAE batch is [I2V video, colour_cond, (mask01 * 2 - 1) * 2 - 1]; y = frame mask +
    the I2V latent. Catches each of these swapped or skipped at the call site."""
    colour, mask = _guide01(t=5, h=32, w=32, seed=2)
    seen = {}
    enc, clip = pipe.vae_encode, pipe.image_encoder.encode_image
    pipe.vae_encode = lambda v: seen.setdefault("vae", v) is not None and enc(v)
    pipe.image_encoder.encode_image = lambda xs: seen.setdefault("clip", xs[0]) is not None and clip(xs)
    try:
        cond = pipe.condition(colour, mask, ["a prompt"])
    finally:
        del pipe.vae_encode, pipe.image_encoder.encode_image
    c = torch.from_numpy(colour).permute(3, 0, 1, 2)[None]
    colour_cond = (c.to(torch.bfloat16) * 2 - 1).float()
    m01 = torch.from_numpy(mask)[None, None].expand(1, 3, -1, -1, -1)
    u8 = (colour_cond[:, :, 0] * 0.5 + 0.5).mul(255).byte()
    first = u8.float() * (2 / 255) - 1
    torch.testing.assert_close(seen["clip"], first, rtol=0, atol=1e-7)
    v = seen["vae"]
    torch.testing.assert_close(v[0:1, :, 0], first, rtol=0, atol=1e-7)
    assert (v[0:1, :, 1:] == 0).all()
    torch.testing.assert_close(v[1:2], colour_cond, rtol=0, atol=0)
    torch.testing.assert_close(v[2:3], (m01 * 2 - 1) * 2 - 1, rtol=0, atol=0)
    assert (cond.y[:, :4, 0] == 1).all() and (cond.y[:, :4, 1:] == 0).all()
    torch.testing.assert_close(cond.y[:, 4:], enc(v)[0:1])


def test_sampling_loop_is_cfg_then_euler_on_shifted_sigmas(pipe, monkeypatch):
    """The denoising loop with a stand-in DiT whose prediction is known (positive branch: 1.0 * x, negative:
    0.5 * x, told apart by their text embedding): the final latents must be noise * prod(1 + g * (s_k+1 -
    s_k)) with g = 0.5 + cfg * (1 - 0.5) and s the literal shifted sigmas (last step to 0). Catches an
    ignored CFG scale, swapped branches and an ignored sigma shift in ``__call__``."""
    steps, shift, cfg, seed = 4, 3.0, 5.0, 7
    color, mask = gf.guide(t=5, h=32, w=32)
    positive = pipe.encode_prompts(["the positive prompt"])

    def fake_predict(latents, timestep, cond):
        is_pos = [torch.equal(row, positive[0]) for row in cond.context]
        assert sum(is_pos) == 1 and cond.context.shape[0] == 2
        return torch.cat([latents * (1.0 if p else 0.5) for p in is_pos])

    monkeypatch.setattr(pipe, "predict_noise", fake_predict)
    _, latents = pipe(color, mask, height=32, width=32, num_frames=5, steps=steps, cfg=cfg, shift=shift, seed=seed,
                      prompt="the positive prompt", negative_prompt="the negative one", return_latents=True)  # fmt: skip
    s = torch.linspace(1.0, 0.0, steps + 1)[:-1]
    s = torch.cat([shift * s / (1 + (shift - 1) * s), torch.zeros(1)])
    g = 0.5 + cfg * (1.0 - 0.5)
    noise = torch.randn((1, 16, 2, 4, 4), generator=torch.Generator("cpu").manual_seed(seed))
    torch.testing.assert_close(latents, noise * torch.prod(1 + g * (s[1:] - s[:-1])), rtol=1e-5, atol=1e-6)
