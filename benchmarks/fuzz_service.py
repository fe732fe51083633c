"""Seeded protocol fuzzer for ``ex4d serve``: mutated and malformed request lines against a real service.

Every line sent must get exactly one final event (``result`` or ``error``), no error may be ``internal``
(a bug), the service must stay alive, and everything must be answered within the time limit (no hangs).

    .venv/bin/python benchmarks/fuzz_service.py --lines 10000 --seed 17 [--json out.json]

Prints (and writes with ``--json``) the figures: lines sent, final events, internal errors, deaths, hangs,
seconds. ``tests/test_service_fuzz.py`` runs a smaller count in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

WEIRD_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    3.0,
    2.5,
    1e308,
    -1e308,
    2**70,
    "",
    "x" * 5000,
    "\ud800",
    "../../etc/passwd",
    "/etc/passwd",
    "/dev/zero",
    "a" * 300,
    [],
    {},
    [[[[[]]]]],
    {"a": {"b": {"c": {}}}},
    "file:///etc/passwd",
    "data:video/mp4;base64,AAAA",
    "concat:/etc/passwd",
    "http://127.0.0.1/x.mp4",
]
RAW_LINES = [
    b"{",
    b"[]",
    b"null",
    b"42",
    b'"str"',
    b'{"id": NaN, "type": "hello"}',
    b'{"id": "r", "type": "hello", "params": {"x": Infinity}}',
    b'{"id": "r", "type": "hello", "params": 1e999}',
    b"\xff\xfe\xfd",
    b'{"id": "' + b"9" * 5000 + b'"}',
    b"[" * 3000 + b"]" * 3000,
    b'{"id": "r", "type": "hello"' + b", " * 10,
]


def base_requests(clip) -> list[dict]:
    depth = {"model": "file", "path": str(clip.depth_path)}
    common = {"footage": str(clip.footage), "depth": depth}
    return [
        {"type": "hello", "params": {}},
        {"type": "jobs", "params": {}},
        {"type": "probe_footage", "params": {"footage": str(clip.footage)}},
        {"type": "estimate_depth", "params": dict(common)},
        {"type": "build_dwmesh", "params": {**common, "focal_px": 60.0}},
        {"type": "camera_preset", "params": {**common, "preset": "90"}},
        {"type": "render_guide", "params": {**common, "camera": {"preset": "30"}, "renderer": "cpu"}},
        {"type": "cancel", "params": {"target": "f0"}},
    ]


def _mutate_value(rng: random.Random, obj, depth: int = 0):
    """A copy of ``obj`` with one random field (at any depth) replaced, removed or added."""
    if isinstance(obj, dict) and obj and depth < 4:
        out = dict(obj)
        key = rng.choice(list(out))
        roll = rng.random()
        if roll < 0.15:
            out.pop(key)
        elif roll < 0.25:
            out[rng.choice(["extra", "force", "max_side", "max_frames", "fps", "kind", "\ud800"])] = rng.choice(
                WEIRD_VALUES
            )
        elif roll < 0.6 and isinstance(out[key], (dict, list)) and out[key]:
            out[key] = _mutate_value(rng, out[key], depth + 1)
        else:
            out[key] = rng.choice(WEIRD_VALUES)
        return out
    if isinstance(obj, list) and obj:
        out = list(obj)
        out[rng.randrange(len(out))] = rng.choice(WEIRD_VALUES)
        return out
    return rng.choice(WEIRD_VALUES)


def make_line(rng: random.Random, i: int, bases: list[dict], inputs: dict) -> bytes:
    roll = rng.random()
    if roll < 0.06:
        return rng.choice(RAW_LINES)
    req = json.loads(json.dumps(rng.choice(bases)))
    req["id"] = f"f{i}"
    if roll < 0.10:
        pass  # valid (or nearly): exercises the jobs themselves
    elif roll < 0.35:
        req["params"]["footage" if "footage" in req["params"] else "x"] = rng.choice(list(inputs.values()))
    elif roll < 0.40:
        req["type"] = rng.choice(["shutdownx", "", "HELLO", "generate", "x" * 100])
    elif roll < 0.45:
        req["id"] = rng.choice(WEIRD_VALUES)
    else:
        req["params"] = _mutate_value(rng, req["params"])
        if rng.random() < 0.2:
            req = _mutate_value(rng, req) if rng.random() < 0.5 else req
    if isinstance(req, dict) and req.get("type") == "shutdown":
        req["type"] = "hello"
    if isinstance(req, dict) and req.get("type") == "generate" and isinstance(req.get("params"), dict):
        req["params"]["generator"] = "preview"  # never the real generator (no weights)
    text = json.dumps(req, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


def run_fuzz(n_lines: int, seed: int, workdir: Path, time_limit: float = 600.0) -> dict:
    import service_fixtures as sf

    clip = sf.make_clip(workdir / "allowed")
    outside = workdir / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.mp4").write_bytes(b"\0" * 100)
    link = clip.root / "link.mp4"
    if not link.exists():
        link.symlink_to(outside / "secret.mp4")
    fifo = clip.root / "fifo.mp4"
    if not fifo.exists():
        os.mkfifo(fifo)
    playlist = clip.root / "list.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXTINF:1.0,\n{outside / 'secret.mp4'}\n#EXT-X-ENDLIST\n")
    inputs = {
        "link": str(link),
        "fifo": str(fifo),
        "playlist": str(playlist),
        "outside": str(outside / "secret.mp4"),
        "missing": str(clip.root / "missing.mp4"),
        "long": str(clip.root / ("n" * 300)),
        "dir": str(clip.root),
    }
    rng = random.Random(seed)
    bases = base_requests(clip)
    client = sf.start_client(workdir / "store", [clip.root])
    client.request("hello", timeout=180)
    finals = internal = 0
    codes: dict[str, int] = {}
    t0 = time.monotonic()
    sent = 0
    hung = False
    try:
        while sent < n_lines or finals < sent:
            while sent < n_lines and sent - finals < 64:
                client.send_raw(make_line(rng, sent, bases, inputs))
                sent += 1
            got = client.poll()
            for e in got:
                if e.get("event") in ("result", "error"):
                    finals += 1
                    if e.get("event") == "error":
                        code = e["error"]["code"]
                        codes[code] = codes.get(code, 0) + 1
                        internal += code == "internal"
            if not got:
                time.sleep(0.002)
            if not client.running:
                break
            if time.monotonic() - t0 > time_limit:
                hung = True
                break
        alive = client.running and bool(client.request("hello", timeout=60)["protocol"])
    finally:
        client.close()
    return {
        "lines_sent": sent,
        "final_events": finals,
        "unanswered": max(0, sent - finals),
        "internal_errors": internal,
        "deaths": 0 if alive else 1,
        "hangs": int(hung or finals < sent),
        "seconds": round(time.monotonic() - t0, 1),
        "error_codes": dict(sorted(codes.items())),
        "seed": seed,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--time-limit", type=float, default=900)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stats = run_fuzz(args.lines, args.seed, Path(tmp), args.time_limit)
    print(json.dumps(stats, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=1))
    ok = stats["internal_errors"] == 0 and stats["deaths"] == 0 and stats["hangs"] == 0 and stats["unanswered"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
