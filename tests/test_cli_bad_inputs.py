"""Every bad CLI input exits 2 with one ``error:`` line, no traceback, and leaves the output folder as it was
(issue 17 item 8). Real ``ex4d`` subprocesses on the synthetic clip; the checks are the exit status, the
stderr text and the files on disk.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import service_fixtures as sf

REPO = Path(__file__).resolve().parents[1]


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose IHDR claims width x height (the data is a few bytes): decoding it would allocate GBs."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    path.write_bytes(data + b"\0" * 64)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    clip = sf.make_clip(root)
    (root / "huge").mkdir()
    for i in range(2):
        _png_header_only(root / "huge" / f"f{i}.png", 40000, 40000)
    with open(root / "huge_depth.npy", "wb") as fh:  # a header claiming 10^12 floats
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<f4", "fortran_order": False, "shape": (10**4, 10**4, 10**4)}
        )
        fh.write(b"\0" * 100)
    np.save(root / "zero_disparity.npy", np.zeros_like(clip.depth))
    mirror = np.tile(np.diag([-1.0, 1.0, 1.0, 1.0]), (len(clip.depth), 1, 1))
    (root / "mirror.json").write_text(json.dumps({"extrinsics": mirror.tolist()}))
    k0 = np.tile(np.eye(4), (len(clip.depth), 1, 1))
    (root / "zero_k.json").write_text(json.dumps({"extrinsics": k0.tolist(), "intrinsics": np.zeros((3, 3)).tolist()}))
    neg = np.diag([-500.0, -500.0, 1.0])
    (root / "neg_k.json").write_text(json.dumps({"extrinsics": k0.tolist(), "intrinsics": neg.tolist()}))
    (root / "a_file").write_text("not a folder")
    (root / "out_existing").mkdir()
    (root / "out_existing" / "keep.txt").write_text("mine")
    return clip, root


def _recon(clip, root, *extra, depth=None, out=None):
    return [
        "recon",
        "--input",
        str(clip.footage),
        "--depth",
        str(depth or clip.depth_path),
        "--output-dir",
        str(out or root / "out_existing"),
        "--renderer",
        "cpu",
        "--fx",
        "60",
        *extra,
    ]


def _cases(clip, root):
    return {
        "png claiming 40000x40000": _recon(clip, root)[:2] + [str(root / "huge")] + _recon(clip, root)[3:],
        "depth header claiming 10^12 values": _recon(clip, root, depth=root / "huge_depth.npy"),
        "--cam with 400 digits": _recon(clip, root, "--cam", "9" * 400),
        "output dir is a file": _recon(clip, root, out=root / "a_file"),
        "--fps nan": _recon(clip, root, "--fps", "nan"),
        "--fps -5": _recon(clip, root, "--fps", "-5"),
        "mirrored camera file": _recon(clip, root, "--cam", str(root / "mirror.json")),
        "all-zero K": _recon(clip, root, "--cam", str(root / "zero_k.json")),
        "negative K": _recon(clip, root, "--cam", str(root / "neg_k.json")),
        "--fy 0": _recon(clip, root, "--fy", "0"),
        "--cx nan": _recon(clip, root, "--cx", "nan"),
        "--max-side -8": _recon(clip, root, "--max-side", "-8"),
        "all-zero disparity": _recon(clip, root, "--depth-kind", "disparity", depth=root / "zero_disparity.npy"),
        "output dir below a file": _recon(clip, root, out=root / "a_file" / "sub"),
        "generate output is a folder": [
            "generate",
            "--color-video",
            str(clip.footage),
            "--mask-video",
            str(clip.footage),
            "--output-video",
            str(root / "out_existing"),
            "--generator",
            "preview",
            "--frames",
            "5",
            "--height",
            "48",
            "--width",
            "64",
        ],
    }


@pytest.mark.slow
def test_every_bad_input_exits_2_with_one_message(data, capsys):
    """Through ``cli.main`` (the console script's entry point, in-process so torch is imported once). Fails
    for each input the CLI turns into a traceback (exit 1), accepts silently (exit 0: e.g. a mirrored camera
    or fy = 0 rendering garbage), or after which the output folder changed."""
    from ex4d_backend import cli

    clip, root = data
    out = root / "out_existing"
    before = sorted(p.name for p in out.iterdir())
    bad = {}
    cases = _cases(clip, root)
    for name, argv in cases.items():
        try:
            code = cli.main(argv)
        except BaseException as exc:  # noqa: BLE001 - a traceback: exit 1 from the console script
            code = f"raised {type(exc).__name__}: {exc}"
        stderr = capsys.readouterr().err
        errors = [line for line in stderr.splitlines() if ": error: " in line]
        if code != 2 or len(errors) != 1:
            bad[name] = (code, stderr[-400:])
        if sorted(p.name for p in out.iterdir()) != before or (out / "keep.txt").read_text() != "mine":
            bad[name + " (wrote into the output folder)"] = sorted(p.name for p in out.iterdir())
    print(f"bad CLI inputs tried: {len(cases)}, exit 2 with one message: {len(cases) - len(bad)}")
    assert not bad, bad


@pytest.mark.slow
def test_file_size_limit_leaves_no_partial_output_set(data, subprocess_env, tmp_path):
    """``ex4d recon`` under ``ulimit -f`` (8 KiB: the videos, camera and PNG frames fit, the mesh does not): exit 2 with one
    disk-full message, and none of the new outputs appear (all or nothing), the old file untouched. Fails
    where EFBIG is a traceback or where outputs are renamed one by one (a new video beside old files)."""
    import subprocess

    clip, root = data
    out = tmp_path / "out"
    out.mkdir()
    (out / "color_90.mp4").write_bytes(b"old video")
    script = f'ulimit -f 16; exec "{sys.executable}" -m ex4d_backend "$@"'
    argv = _recon(clip, root, "--png", "--save-mesh", out=out)
    proc = subprocess.run(["sh", "-c", script, "sh", *argv], capture_output=True, text=True, env=subprocess_env)
    assert proc.returncode == 2, proc.stderr[-800:]
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "file size limit" in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["color_90.mp4"]
    assert (out / "color_90.mp4").read_bytes() == b"old video"
