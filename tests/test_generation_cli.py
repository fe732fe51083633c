"""``ex4d generate`` end to end (subprocess, tiny models) and its failures: one clear error each,
nothing (not even a hidden partial file) left in the output folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ex4d_backend.errors import MODEL_INVALID, MODEL_MISSING, Ex4dError

pytest.importorskip("diffsynth")
import generation_fixtures as gf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--height", "32", "--width", "32", "--frames", "5", "--steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return gf.shared_models_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def guide_files(tmp_path_factory):
    """Colour guide as an mp4 at 12 fps, mask guide as a PNG sequence (as `ex4d recon` can write)."""
    from ex4d_backend.footage import write_png_sequence, write_video

    d = tmp_path_factory.mktemp("guide")
    color, mask = gf.guide(t=5, h=64, w=64)
    write_video(d / "color.mp4", color, 12.0)
    write_png_sequence(d / "mask", np.repeat(mask[..., None], 3, axis=3))
    return d / "color.mp4", d / "mask"


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from ex4d_backend.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().err


def test_generate_cli_end_to_end(tmp_path, models, guide_files):
    """PNG sequence + mp4 at the footage's fps; the frames are exactly what the generator returns."""
    from ex4d_backend.footage import read_footage
    from ex4d_backend.generation import load_generator

    color, mask = guide_files
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ex4d_backend", "generate", "--color-video", str(color), "--mask-video", str(mask)]
    cmd += [
        "--output-video",
        str(out / "shot.mp4"),
        "--output-frames",
        str(out / "frames"),
        "--models-dir",
        str(models),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd + ARGS, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["frames", "shot.mp4"]  # no partial files left
    pngs = read_footage(out / "frames", max_side=None)
    assert pngs.frames.shape == (5, 32, 32, 3)
    video = read_footage(out / "shot.mp4", max_side=None)
    assert video.frames.shape == (5, 32, 32, 3) and video.fps == pytest.approx(12.0)

    gen = load_generator("ex4d", models_dir=models, device="cpu")
    c = read_footage(color, max_side=None).frames
    m = read_footage(mask, max_side=None).frames[..., 0]
    expected = gen(c, m, height=32, width=32, num_frames=5, steps=2, seed=0)
    np.testing.assert_array_equal(pngs.frames, expected)


def test_generate_cli_fps_override_and_preview(tmp_path, guide_files, capsys):
    from ex4d_backend.footage import read_footage

    color, mask = guide_files
    out = tmp_path / "p.mp4"
    argv = ["generate", "--generator", "preview", "--color-video", str(color), "--mask-video", str(mask)]
    rc, err = _run_cli(argv + ["--output-video", str(out), "--fps", "30"] + ARGS, capsys)
    assert rc == 0, err
    v = read_footage(out, max_side=None)
    assert v.fps == pytest.approx(30.0) and v.frames.shape == (5, 32, 32, 3)


@pytest.mark.parametrize("problem", ["frames", "size"])
def test_mismatched_guides_one_error_nothing_written(tmp_path, models, guide_files, capsys, problem):
    from ex4d_backend.footage import write_png_sequence

    color, _ = guide_files
    _, mask = gf.guide(t=4 if problem == "frames" else 5, h=64 if problem == "frames" else 48, w=64)
    write_png_sequence(tmp_path / "mask", np.repeat(mask[..., None], 3, axis=3))
    out = tmp_path / "out"
    out.mkdir()
    argv = [
        "generate",
        "--color-video",
        str(color),
        "--mask-video",
        str(tmp_path / "mask"),
        "--models-dir",
        str(models),
    ]
    rc, err = _run_cli(argv + ["--output-video", str(out / "s.mp4"), "--output-frames", str(out / "f")] + ARGS, capsys)
    assert rc == 2
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1
    assert ("5 frames but the mask guide has 4" in lines[0]) if problem == "frames" else ("64x48 px" in lines[0])
    assert list(out.iterdir()) == []


def _bad_checkpoints() -> dict[str, tuple[dict, str, str]]:
    """name -> (files to write into the models dir, expected code, expected text in the message)."""
    state = gf.ex4d_state()
    prefixed = {"pipe.dit." + k: v for k, v in state.items()}
    missing_enc = {k: v for k, v in state.items() if k != "latent_encoder.4.bias"}
    wrong_rank = dict(state)
    k = "blocks.0.self_attn.q.lora_A.default.weight"
    wrong_rank[k] = torch.zeros(8, state[k].shape[1])
    other_model = {"lora_unet_down.weight": torch.zeros(4, 4)}
    return {
        "prefix": ({gf.CKPT: prefixed}, MODEL_INVALID, "extra prefix 'pipe.dit.'"),
        "missing_encoder_tensor": ({gf.CKPT: missing_enc}, MODEL_INVALID, "7 of 8 camera-encoder tensors"),
        "wrong_shape": ({gf.CKPT: wrong_rank}, MODEL_INVALID, "1 of the wrong shape"),
        "other_model": ({gf.CKPT: other_model}, MODEL_INVALID, "0 of 40 LoRA tensors"),
        "not_a_checkpoint": ({gf.CKPT: b"<html>404</html>"}, MODEL_INVALID, "cannot read ex4d.ckpt"),
    }


@pytest.mark.parametrize("case", sorted(_bad_checkpoints()) + ["truncated_ckpt", "truncated_shard", "missing_shard"])
def test_bad_models_one_error_nothing_written(tmp_path, models, guide_files, capsys, case):
    from ex4d_backend.generation import load_generator

    if case == "truncated_ckpt":
        data = (models / gf.CKPT).read_bytes()
        files, code, text = {gf.CKPT: data[: len(data) // 2]}, MODEL_INVALID, "cannot read ex4d.ckpt"
    elif case == "truncated_shard":
        data = (models / gf.SHARD.format(3)).read_bytes()
        files, code, text = {gf.SHARD.format(3): data[: len(data) // 2]}, MODEL_INVALID, "00003-of-00007"
    elif case == "missing_shard":
        files, code, text = {}, MODEL_MISSING, "00004-of-00007"
    else:
        files, code, text = _bad_checkpoints()[case]
    drop = (gf.SHARD.format(4),) if case == "missing_shard" else ()
    root = gf.variant(models, tmp_path / "models", drop=drop, write=files)
    with pytest.raises(Ex4dError) as info:
        load_generator("ex4d", models_dir=root, device="cpu")
    assert info.value.code == code and text in str(info.value), str(info.value)
    assert info.value.hint

    color, mask = guide_files
    out = tmp_path / "out"
    out.mkdir()
    argv = ["generate", "--color-video", str(color), "--mask-video", str(mask), "--models-dir", str(root)]
    rc, err = _run_cli(argv + ["--output-video", str(out / "s.mp4"), "--output-frames", str(out / "f")] + ARGS, capsys)
    assert rc == 2 and len([ln for ln in err.splitlines() if "error" in ln]) == 1 and text in err
    assert list(out.iterdir()) == []


def test_write_outputs_all_or_nothing(tmp_path, monkeypatch):
    """If the mp4 cannot be written, the already written PNG folder is not left behind either."""
    from ex4d_backend import footage
    from ex4d_backend.generation import write_outputs

    frames = np.zeros((5, 32, 32, 3), np.uint8)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(footage, "write_video", broken)
    with pytest.raises(OSError):
        write_outputs(frames, tmp_path / "s.mp4", 24.0, tmp_path / "frames")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    out = write_outputs(frames, tmp_path / "s.mp4", 24.0, tmp_path / "frames")
    assert out["video"].is_file() and len(list(out["frames"].glob("*.png"))) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "s.mp4"]
