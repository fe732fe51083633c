"""With none of DepthCrafter's files present, ``ex4d depth --model depthcrafter`` names every missing model
and repository at once (issue 17 item 9). Ground truth: the model specs' own names and repositories."""

from __future__ import annotations

import service_fixtures as sf

from ex4d_backend import cli, modelstore


def test_every_missing_model_is_named_at_once(tmp_path, capsys):
    """Fails where the check stops at the first missing model (the user downloads svd-xt, runs again, and
    only then learns that depthcrafter is missing too)."""
    clip = sf.make_clip(tmp_path / "data")
    empty = tmp_path / "models"
    empty.mkdir()
    argv = ["depth", "-i", str(clip.footage), "-o", str(tmp_path / "d.npz"), "--model", "depthcrafter"]
    code = cli.main([*argv, "--models-dir", str(empty), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    needed = modelstore.with_requirements("depthcrafter")
    assert len(needed) >= 2
    for spec in needed:
        assert f"'{spec.name}'" in lines[0] and spec.repo_id in lines[0], (spec.name, lines[0])
    assert not (tmp_path / "d.npz").exists()
