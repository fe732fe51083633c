"""Helpers for the service tests: a synthetic clip on disk and a real ``ex4d serve`` subprocess driven
through the add-on's client module (``blender_addon/ex4d_addon/backend_client.py``, no bpy)."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLIENT_PATH = REPO / "blender_addon" / "ex4d_addon" / "backend_client.py"


def load_client_module():
    """``backend_client`` imported from its file (exactly the module the add-on ships; no package import)."""
    name = "ex4d_backend_client_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, CLIENT_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bc = load_client_module()


@dataclass
class Clip:
    root: Path  # the folder the service may read (``--allow``)
    footage: Path  # PNG sequence folder (lossless: the backend sees exactly ``frames``)
    depth_path: Path  # depth.npy (T, H, W) float32, exact ray-cast depth
    frames: np.ndarray
    depth: np.ndarray
    k: np.ndarray

    def params(self, **extra) -> dict:
        """Common job params for this clip (file depth, the clip's focal length)."""
        return {
            "footage": str(self.footage),
            "depth": {"model": "file", "path": str(self.depth_path)},
            "focal_px": float(self.k[0, 0]),
            **extra,
        }


def make_clip(root: Path, width: int = 64, height: int = 48, n_frames: int = 7, focal_px: float = 60.0) -> Clip:
    """The synthetic scene (``ex4d_backend.synthetic``) as a PNG sequence plus its exact depth."""
    from ex4d_backend.cameras import reference_intrinsics
    from ex4d_backend.footage import write_png_sequence
    from ex4d_backend.synthetic import make_scene

    root.mkdir(parents=True, exist_ok=True)
    k = reference_intrinsics(width, height, focal_px)
    frames, depth, k = make_scene(width, height, n_frames, k=k)
    write_png_sequence(root / "clip", frames)
    np.save(root / "depth.npy", depth)
    return Clip(root, root / "clip", root / "depth.npy", frames, depth, k)


def start_client(store: Path, allow: list[Path], env: dict[str, str] | None = None):
    """A started ``BackendClient`` on ``python -m ex4d_backend serve`` with this repo importable."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for name in ("EX4D_SERVICE_STEP_DELAY", "EX4D_SERVICE_WRITE_DELAY"):
        full_env.pop(name, None)
    full_env.update(env or {})
    client = bc.BackendClient(sys.executable, store=store, allow=allow, env=full_env, cwd=str(REPO))
    client.start()
    return client


def run(client, type_: str, params: dict | None = None, timeout: float = 120.0):
    """(request, its events in arrival order); the request has finished (result or error)."""
    events: list[dict] = []
    req = client.submit(type_, params or {})
    client.wait(req, timeout, on_event=events.append)
    return req, events


def wait_for(client, predicate, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll the client until ``predicate()`` is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        client.poll()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; backend stderr: {client.stderr_tail(10)}")
        time.sleep(0.02)


def check_progress_order(events: list[dict], stages: list[str], loop: tuple[str, ...] = ()) -> None:
    """``started`` first, the final event last, stages in ``stages`` order, steps never decreasing.
    ``loop``: stages that alternate with each other (a generate job's ``window`` and generator stages)."""
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started", kinds
    assert kinds[-1] in ("result", "error") and kinds.count("result") + kinds.count("error") == 1
    seen: list[str] = []
    last: dict[str, int] = {}
    for e in events:
        if e["event"] != "progress":
            continue
        assert 0 <= e["step"] <= e["total"] or e["total"] == 0, e
        if e["stage"] in loop and e["stage"] in seen and all(s in loop for s in seen[seen.index(e["stage"]) :]):
            assert e["step"] >= last.get(e["stage"], 0) or e["stage"] != "window", e
            last[e["stage"]] = e["step"] if e["stage"] == "window" else 0
            continue
        if not seen or seen[-1] != e["stage"]:
            assert e["stage"] not in seen, f"stage {e['stage']} came back after {seen}"
            seen.append(e["stage"])
        assert e["step"] >= last.get(e["stage"], 0), e
        last[e["stage"]] = e["step"]
    assert [s for s in seen if s in stages] == stages, seen
