"""Damaged cache entries are detected on reuse and computed again (issue 17 item 5), through a real
``ex4d serve``. Ground truth: the bytes of every stage file as first written (the inputs are fixed), so "caught" means the
job succeeded, handed out the same files, and the damaged stage folder is intact and byte-identical to the
pristine one again (videos: the same pixels, see ``_same``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import service_fixtures as sf

from ex4d_backend.service.jobstore import JobStore


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)])


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) * 2 // 3] ^= 0x5A
    p.write_bytes(bytes(data))


def _zero(p: Path) -> None:
    p.write_bytes(b"")


def _delete(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() else p.unlink()


def _bad_json(p: Path) -> None:
    p.write_text(p.read_text()[:-10] + "}{")


def _drop_manifest(p: Path) -> None:
    meta = json.loads(p.read_text())
    meta.pop("files")
    p.write_text(json.dumps(meta))


def _lie_in_manifest(p: Path) -> None:  # a manifest claiming other content for a file
    meta = json.loads(p.read_text())
    name = sorted(meta["files"])[0]
    meta["files"][name][1] = "0" * 32
    p.write_text(json.dumps(meta))


CORRUPTIONS = [  # (stage, file, damage)
    ("frames", "frames.npy", _truncate),
    ("frames", "frames.npy", _flip),
    ("frames", "frames.npy", _zero),
    ("frames", "meta.json", _bad_json),
    ("depth", "depth.npy", _truncate),
    ("depth", "depth.npy", _flip),
    ("depth", "depth.npy", _delete),
    ("depth", "meta.json", _drop_manifest),
    ("mesh", "positions.pc2", _zero),  # the one copy of the positions (issue 12: no positions.npy)
    ("mesh", "positions.pc2", _truncate),
    ("mesh", "positions.pc2", _flip),
    ("mesh", "faces.npy", _delete),
    ("mesh", "occlusion.npy", _flip),
    ("mesh", "occlusion.npy", _truncate),  # (no colors.npy: the vertex colours are the frames)
    ("mesh", "meta.json", _delete),
    ("guide_videos", "color.mp4", _flip),
    ("guide_videos", "mask.mp4", _truncate),
    ("guide", "color/frame_00000.png", _truncate),  # (no mask.npy: the PNG frames are the exact guide)
    ("guide", "color/frame_00003.png", _delete),
    ("guide", "mask/frame_00001.png", _flip),
    ("guide", "camera.npz", _flip),
    ("guide", "meta.json", _lie_in_manifest),
]


def _same(a: dict[str, bytes], b: dict[str, bytes]) -> bool:
    """Every file byte-identical, except H.264 videos (x264 does not promise identical bytes; see
    PROTOCOL.md) and meta.json (which records their hashes): those decode to the same pixels within 3 levels
    on average."""
    if set(a) != set(b):
        return False
    for name in a:
        if name.endswith(".mp4"):
            pa, pb = _decode(a[name]), _decode(b[name])
            if pa.shape != pb.shape or np.abs(pa.astype(int) - pb).mean() > 3:
                return False
        elif name != "meta.json" and a[name] != b[name]:
            return False
    return True


def _decode(data: bytes) -> np.ndarray:
    import io

    import av

    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_every_corruption_is_caught_and_repaired(tmp_path):
    """22 kinds of damage (truncation, byte flips, empty and missing files, broken or lying JSON) to the
    files of every stage. Fails where reuse trusts meta.json alone (the damaged file is handed out, or
    loading it crashes with internal), or where a damaged entry is never recomputed."""
    clip = sf.make_clip(tmp_path / "data")
    store = tmp_path / "store"
    client = sf.start_client(store, [clip.root])
    guide = clip.params(camera={"preset": "90"}, renderer="cpu")
    depth = {k: v for k, v in clip.params().items() if k != "focal_px"}
    jobs = {  # the job that hands out each stage's files
        "frames": ("estimate_depth", depth),
        "depth": ("estimate_depth", depth),
        "mesh": ("build_dwmesh", clip.params()),
        "guide": ("render_guide", guide),
        "guide_videos": ("render_guide", {**guide, "videos": True}),
    }
    try:
        first = {stage: client.request(type_, p, timeout=180) for stage, (type_, p) in jobs.items()}
        pristine = {d.name: _snapshot(d) for d in (store / "cache").iterdir() if not d.name.startswith(".")}
        stages = {name.split("-")[0]: name for name in pristine}
        assert set(stages) >= {"frames", "depth", "mesh", "guide", "guide_videos"}
        caught = []
        for stage, rel, damage in CORRUPTIONS:
            target = store / "cache" / stages[stage] / rel
            assert target.exists(), target
            damage(target)
            req, _ = sf.run(client, *jobs[stage], timeout=180)
            r = req.raise_for_error()
            assert {k: v for k, v in r.items() if k != "cached"} == {
                k: v for k, v in first[stage].items() if k != "cached"
            }
            repaired = _snapshot(store / "cache" / stages[stage])
            if _same(repaired, pristine[stages[stage]]) and JobStore(store).verify_stage_dir(
                store / "cache" / stages[stage], full=True
            ):
                caught.append((stage, rel, damage.__name__))

        print(f"corruptions caught: {len(caught)} of {len(CORRUPTIONS)}")
        tried = [(stage, rel, damage.__name__) for stage, rel, damage in CORRUPTIONS]
        assert caught == tried, [t for t in tried if t not in caught]
    finally:
        client.close()
