"""Model management (``ex4d models list|download|verify``) and bad inputs of the depth providers.

Tiny random-weight models in the published layouts stand in for the real weights; the "hub" is
either huggingface_hub in offline mode (the real client) or a local copy of those folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from depth_fixtures import copy_models, depth_models, gradient_clip  # noqa: F401

from ex4d_backend import depth, modelstore
from ex4d_backend.cli import main
from ex4d_backend.errors import MODEL_INVALID, MODEL_MISSING, Ex4dError

SVD = "stabilityai/stable-video-diffusion-img2vid-xt"
DA2 = "depth-anything/Depth-Anything-V2-Small-hf"


def test_models_dir_lookup_order(monkeypatch, tmp_path):
    monkeypatch.delenv("EX4D_MODELS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert modelstore.models_dir() == tmp_path / "cache" / "ex4d" / "models"  # user cache by default
    monkeypatch.setenv("EX4D_MODELS_DIR", str(tmp_path / "env"))
    assert modelstore.models_dir() == tmp_path / "env"
    assert modelstore.models_dir(tmp_path / "flag") == tmp_path / "flag"  # --models-dir wins
    spec = modelstore.get_spec("depthcrafter")
    assert modelstore.model_folder(spec) == tmp_path / "env" / "tencent" / "DepthCrafter"


def test_list_reports_presence(depth_models, capsys):  # noqa: F811
    assert main(["models", "--models-dir", str(depth_models), "list", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["models_dir"] == str(depth_models)
    rows = {r["name"]: r for r in out["models"]}
    for name in ("depthcrafter", "svd-xt", "depth-anything-v2-small"):
        assert rows[name]["present"] and rows[name]["bytes_on_disk"] > 0, name
    assert rows["depthcrafter"]["requires"] == ["svd-xt"]
    assert not rows["depth-anything-v2-large"]["present"]
    assert rows["depth-anything-v2-large"]["missing"] == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]


def test_verify_accepts_the_published_layout(depth_models, capsys):  # noqa: F811
    code = main(
        ["models", "--models-dir", str(depth_models), "verify", "depthcrafter", "depth-anything-v2-small", "--json"]
    )
    res = json.loads(capsys.readouterr().out)
    assert code == 0, res
    assert {r["name"] for r in res} == {"depthcrafter", "svd-xt", "depth-anything-v2-small"}
    assert all(r["ok"] and not r["problems"] for r in res)


def test_verify_finds_a_truncated_weight_file(depth_models, tmp_path, capsys):  # noqa: F811
    root = copy_models(depth_models, tmp_path / "m")
    f = root / "tencent/DepthCrafter/diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])  # an interrupted download
    assert main(["models", "--models-dir", str(root), "verify", "depthcrafter", "--json"]) == 1
    res = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert res["svd-xt"]["ok"] and not res["depthcrafter"]["ok"]
    (problem,) = res["depthcrafter"]["problems"]
    assert "truncated" in problem and str(f) in problem
    # ... and loading it gives one clear error before torch touches the file
    with pytest.raises(Ex4dError) as err:
        depth.estimate(gradient_clip(4), "depthcrafter", models_dir=root, device="cpu")
    assert err.value.code == MODEL_INVALID and str(f) in str(err.value)


def test_verify_finds_a_garbage_header(depth_models, tmp_path):  # noqa: F811
    root = copy_models(depth_models, tmp_path / "m")
    f = root / DA2 / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff" * 8  # the JSON header is no longer JSON
    f.write_bytes(bytes(data))
    (res,) = modelstore.verify("depth-anything-v2-small", root)
    assert not res.ok and "not a readable safetensors file" in res.problems[0]
    with pytest.raises(Ex4dError) as err:
        depth.estimate(gradient_clip(4), "depth-anything-v2", models_dir=root, device="cpu")
    assert err.value.code == MODEL_INVALID


def test_verify_finds_weights_of_another_model(depth_models, tmp_path):  # noqa: F811
    # The files are intact but the config describes a different network: caught by building the
    # model on the meta device and comparing tensor names and shapes (nothing runs).
    root = copy_models(depth_models, tmp_path / "m")
    cfg_path = root / "tencent/DepthCrafter/config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["block_out_channels"] = [32, 96]
    cfg_path.write_text(json.dumps(cfg))
    (svd, dcr) = modelstore.verify("depthcrafter", root)
    assert svd.ok and not dcr.ok
    assert "do not match" in dcr.problems[0] and "wrong shape" in dcr.problems[0]
    assert modelstore.verify("depthcrafter", root, deep=False)[1].ok  # the quick check cannot see it


def test_partial_folder_names_repo_files_and_folder(depth_models, tmp_path, capsys):  # noqa: F811
    root = copy_models(depth_models, tmp_path / "m")
    (root / SVD / "vae" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    shutil.rmtree(root / SVD / "scheduler")
    with pytest.raises(Ex4dError) as err:
        depth.estimate(gradient_clip(4), "depthcrafter", models_dir=root, device="cpu")
    msg = str(err.value)
    assert err.value.code == MODEL_MISSING
    assert "missing 2 file(s)" in msg and "vae/diffusion_pytorch_model.fp16.safetensors" in msg
    assert "scheduler/scheduler_config.json" in msg and SVD in msg and str(root / SVD) in msg
    assert main(["models", "--models-dir", str(root), "verify", "depthcrafter"]) == 1
    assert "PROBLEM" in capsys.readouterr().out


def test_offline_download_gives_one_clear_message(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the real client, offline
    root = tmp_path / "models"
    code = main(["models", "--models-dir", str(root), "download", "depth-anything-v2-small"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    msg = err[-1]
    assert msg.startswith("ex4d models: error: cannot download")
    assert DA2 in msg and str(root / DA2) in msg
    for f in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert f in msg
    assert not root.exists()  # nothing half-made is left behind


def test_download_places_files_in_the_published_layout(depth_models, tmp_path, monkeypatch):  # noqa: F811
    import huggingface_hub

    fetched = []

    def fake_hub(repo_id, filename, *, local_dir, token=None, force_download=False):
        fetched.append((repo_id, filename))
        dst = Path(local_dir) / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(depth_models / repo_id / filename, dst)
        return str(dst)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub)
    root = tmp_path / "models"
    folders = modelstore.download("depthcrafter", root)
    assert folders == [root / SVD, root / "tencent/DepthCrafter"]  # requirements first
    assert ("tencent/DepthCrafter", "config.json") in fetched and len(fetched) == 2 + 6
    assert all(r.ok for r in modelstore.verify("depthcrafter", root))
    fetched.clear()
    modelstore.download("depthcrafter", root)  # present files are kept
    assert fetched == []


def test_unknown_model_name(capsys):
    assert main(["models", "download", "depthcrafterz"]) == 2
    assert "unknown model 'depthcrafterz'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Bad footage


@pytest.mark.parametrize("model", ["depthcrafter", "depth-anything-v2"])
def test_one_frame_footage_is_refused(model, tmp_path):
    frames = gradient_clip(1)
    with pytest.raises(Ex4dError, match="at least 2 frames, the footage has 1"):
        depth.estimate(frames, model, models_dir=tmp_path, device="cpu")  # before any model is looked for


def test_footage_larger_than_the_cap_is_refused(tmp_path):
    big = np.zeros((2, 16, depth.MAX_SIDE + 1, 3), np.uint8)
    with pytest.raises(Ex4dError, match=f"larger than {depth.MAX_SIDE} px") as err:
        depth.estimate(big, "depthcrafter", models_dir=tmp_path, device="cpu")
    assert err.value.hint and "--max-side" in err.value.hint
    long = np.zeros((depth.MAX_FRAMES + 1, 16, 16, 3), np.uint8)
    with pytest.raises(Ex4dError, match=f"more than the {depth.MAX_FRAMES}") as err:
        depth.estimate_cached(None, long, "depth-anything-v2", tmp_path / "cache", models_dir=tmp_path)
    assert not (tmp_path / "cache").exists()


def test_bad_frames_array(tmp_path):
    with pytest.raises(Ex4dError, match="uint8"):
        depth.estimate(np.zeros((3, 32, 32, 3), np.float32), "depthcrafter", models_dir=tmp_path)
    with pytest.raises(Ex4dError, match="unknown depth model"):
        depth.estimate(gradient_clip(3), "midas", models_dir=tmp_path)


def test_depth_cli_bad_input(tmp_path, capsys):
    one = tmp_path / "one"
    one.mkdir()
    import cv2

    cv2.imwrite(str(one / "0000.png"), gradient_clip(1)[0])
    code = main(["depth", "--input", str(one), "--output", str(tmp_path / "d.npz"), "--models-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least 2 frames" in err[0]
    assert not (tmp_path / "d.npz").exists()
