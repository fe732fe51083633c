"""``ex4d farm collect --job-name``: several jobs of one shot (the add-on's Submit to Farm: one per camera and
settings) share the shot's input copies and get a job file each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_two_jobs_of_one_shot_share_the_inputs(tmp_path: Path) -> None:
    """Two jobs (seed 1 and 2) collected under one shot with their own job names: one footage copy, two job
    files, each naming its seed; without --job-name the second is refused (the documented rule). Catches a
    job name ignored (the second job refused or overwriting the first) or used for the input folder."""
    footage = tmp_path / "src" / "clip.mp4"
    footage.parent.mkdir()
    footage.write_bytes(b"not really a video: collect only copies it")
    project = tmp_path / "proj"

    def collect(seed: int, *extra: str) -> subprocess.CompletedProcess:
        job = tmp_path / f"job{seed}.json"
        job.write_text(
            json.dumps(
                {
                    "type": "generate",
                    "params": {
                        "footage": str(footage),
                        "depth": {"model": "depthcrafter"},
                        "camera": {"preset": "90"},
                        "seed": seed,
                    },
                }
            )
        )
        cmd = [sys.executable, "-m", "ex4d_backend", "farm", "collect", str(job), str(project), "--shot", "sh010"]
        return subprocess.run(cmd + list(extra), capture_output=True, text=True, timeout=120)

    a, b = collect(1, "--job-name", "sh010_a"), collect(2, "--job-name", "sh010_b")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    files = [Path(json.loads(p.stdout)["job_file"]) for p in (a, b)]
    assert [f.name for f in files] == ["sh010_a.json", "sh010_b.json"]
    assert [json.loads(f.read_text())["params"]["seed"] for f in files] == [1, 2]
    assert sorted(p.name for p in (project / "shots").iterdir()) == ["sh010"]
    assert (project / "shots" / "sh010" / "footage" / "clip.mp4").read_bytes() == footage.read_bytes()
    assert collect(3).returncode == 0  # jobs/sh010.json is new
    refused = collect(4)
    assert refused.returncode == 2 and "already collected" in refused.stderr
