"""``ex4d generate`` end to end (subprocess, tiny models) and its failures: one clear error each,
nothing (not even a hidden partial file) left in the output folder."""

from __future__ import annotations

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


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_generate_cli_end_to_end(tmp_path, models, capsys):
    """PNG sequence + mp4 at the guide's fps, and the frames are the REFERENCE pipeline's (diffsynth 1.1.2 +
    EX-4D, run in the side environment) on the same guide: catches a CLI that reads, resizes or seeds the
    guide differently from the reference, or writes other frames than it generated."""
    from ex4d_backend.footage import read_footage, write_png_sequence

    color, mask = gf.guide(t=5, h=64, w=64, seed=5)
    mask[:, 20:36, 10:24] = 0
    write_png_sequence(tmp_path / "color", color)  # lossless guide files: both sides see the same pixels
    write_png_sequence(tmp_path / "mask", np.repeat(mask[..., None], 3, axis=3))
    out = tmp_path / "out"
    argv = ["generate", "--color-video", str(tmp_path / "color"), "--mask-video", str(tmp_path / "mask")]
    argv += ["--output-video", str(out / "shot.mp4"), "--output-frames", str(out / "frames"), "--fps", "12"]
    rc, err = _run_cli(argv + ["--models-dir", str(models)] + ARGS, capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["frames", "shot.mp4"]  # no partial files left
    pngs = read_footage(out / "frames", max_side=None)
    video = read_footage(out / "shot.mp4", max_side=None)
    assert video.frames.shape == (5, 32, 32, 3) and video.fps == pytest.approx(12.0)
    refs, _ = gf.reference_generate(
        models, tmp_path / "ref", {"cli": (color, mask, dict(height=32, width=32, num_frames=5, steps=2, seed=0))}
    )
    gf.assert_matches_reference(pngs.frames, None, refs["cli"])


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
        "wrong_shape": ({gf.CKPT: wrong_rank}, MODEL_INVALID, "1 tensor(s) of the wrong shape"),
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


def test_write_outputs_all_or_nothing_on_a_failure_mid_write(tmp_path, monkeypatch):
    """A failure injected in the middle of encoding the mp4 (after its temporary file holds muxed packets):
    neither the PNG folder nor the mp4 appears, no temporary is left, and the user's existing file at the
    output path keeps its bytes. Catches writing in place, renaming before completion, leaking temps."""
    import av

    from ex4d_backend.generation import write_outputs

    frames = np.random.default_rng(0).integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    (tmp_path / "s.mp4").write_bytes(b"the user's earlier take")
    real = av.VideoFrame.from_ndarray
    seen = {"n": 0}

    def failing_from_ndarray(*a, **k):
        seen["n"] += 1
        if seen["n"] == 55:  # x264 has muxed packets by now (its lookahead is 40 frames)
            temps = [p for p in tmp_path.iterdir() if p.name not in ("s.mp4",) and p.is_file()]
            seen["temp_bytes"] = max((p.stat().st_size for p in temps), default=0)
            seen["pngs_in_temp"] = sum(1 for p in tmp_path.rglob("*.png"))
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", staticmethod(failing_from_ndarray))
    with pytest.raises(OSError, match="disk full"):
        write_outputs(frames, tmp_path / "s.mp4", 24.0, tmp_path / "frames")
    assert seen["temp_bytes"] > 0 and seen["pngs_in_temp"] == 60  # the failure really was mid-write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.mp4"]
    assert (tmp_path / "s.mp4").read_bytes() == b"the user's earlier take"
    monkeypatch.undo()
    out = write_outputs(frames, tmp_path / "s.mp4", 24.0, tmp_path / "frames")
    assert out["video"].stat().st_size > 1000 and len(list(out["frames"].glob("*.png"))) == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "s.mp4"]
