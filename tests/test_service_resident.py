"""The service keeps the generator loaded between ``generate`` jobs (``ex4d serve --keep-generator``).

The policy (``ResidentGenerator``) is checked with a controlled clock; the service part drives a real
``ex4d serve`` subprocess with the tiny random-weight EX-4D models in the published layout. Ground truth
for "reusing the loaded model changes nothing": a job recomputed on the kept generator after another
seed ran on it gives exactly the frames of the first job, computed right after a fresh load.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import service_fixtures as sf

from ex4d_backend.footage import list_image_sequence, read_image_rgb
from ex4d_backend.service.resident import ResidentGenerator

pytest.importorskip("diffsynth")
import generation_fixtures as gf  # noqa: E402 (needs torch + diffsynth)


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class _Loaded:
    """Stands for a loaded model: records whether it was closed."""

    def __init__(self, name: str) -> None:
        self.name, self.closed = name, False

    def close(self) -> None:
        self.closed = True


def test_policy_reuse_switch_fail_and_expiry():
    clock = _Clock()
    r = ResidentGenerator(60, clock=clock)
    loads: list[str] = []

    def loader(name):
        return lambda: loads.append(name) or _Loaded(name)

    a, reused = r.acquire("a", loader("a"))
    assert not reused and loads == ["a"] and r.seconds_left() is None  # in use: cannot expire
    r.done(True)
    assert r.seconds_left() == 60 and r.loaded == "a"
    clock.t += 59
    a2, reused = r.acquire("a", loader("a"))
    assert reused and a2 is a and loads == ["a"]
    r.done(True)
    b, reused = r.acquire("b", loader("b"))  # another key: the old one is closed first
    assert not reused and a.closed and not b.closed and loads == ["a", "b"]
    r.done(False)  # cancelled or failed: closed at once
    assert b.closed and r.loaded is None and r.seconds_left() is None
    c, _ = r.acquire("c", loader("c"))
    r.done(True)
    clock.t += 59.5
    assert not r.expire() and not c.closed and r.seconds_left() == pytest.approx(0.5)
    clock.t += 0.5
    assert r.expire() and c.closed and r.loaded is None
    zero = ResidentGenerator(0, clock=clock)  # keep_alive 0: load per job
    d, _ = zero.acquire("d", loader("d"))
    zero.done(True)
    assert d.closed and zero.loaded is None


def test_policy_failed_load_keeps_nothing():
    r = ResidentGenerator(60)
    first, _ = r.acquire("a", lambda: _Loaded("a"))
    r.done(True)

    def broken():
        raise RuntimeError("missing shard")

    with pytest.raises(RuntimeError):
        r.acquire("b", broken)
    assert first.closed and r.loaded is None  # the old one was closed before the new load was tried


def _frames(result: dict) -> np.ndarray:
    return np.stack([read_image_rgb(p) for p in list_image_sequence(Path(result["frames_dir"]))])


def _load_messages(events: list[dict]) -> list[str]:
    return [e["message"] for e in events if e["event"] == "progress" and e["stage"] == "load"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return gf.shared_models_dir(tmp_path_factory)


def _params(clip: sf.Clip, **extra) -> dict:
    return clip.params(
        camera={"preset": "30"}, renderer="cpu", generator="ex4d", width=64, height=48, num_frames=5, steps=2, **extra
    )


def test_service_reuses_the_generator_with_identical_results(tmp_path, models):
    clip = sf.make_clip(tmp_path / "data")
    client = sf.start_client(tmp_path / "store", [clip.root], env={"EX4D_MODELS_DIR": str(models)})
    try:
        _, ev_a = sf.run(client, "generate", _params(clip, seed=0), timeout=300)
        req_a = [e for e in ev_a if e["event"] in ("result", "error")][-1]
        assert req_a["event"] == "result", req_a
        assert any(m.startswith("loading the ex4d generator") for m in _load_messages(ev_a))

        req_b, ev_b = sf.run(client, "generate", _params(clip, seed=1), timeout=300)
        rb = req_b.raise_for_error()
        assert _load_messages(ev_b) == ["the generator was still loaded"]

        req_c, ev_c = sf.run(client, "generate", _params(clip, seed=0, force=True), timeout=300)
        rc = req_c.raise_for_error()
        assert _load_messages(ev_c) == ["the generator was still loaded"]
        fa = _frames(req_a["result"])
        assert np.array_equal(_frames(rc), fa)  # the kept model computes what a fresh load computes
        assert not np.array_equal(_frames(rb), fa)  # (and the seed does matter)
    finally:
        client.close()


def test_service_cancel_and_idle_release_the_generator(tmp_path, models):
    clip = sf.make_clip(tmp_path / "data")
    env = {"EX4D_MODELS_DIR": str(models), "EX4D_KEEP_GENERATOR": "2", "EX4D_SERVICE_STEP_DELAY": "0.05"}
    client = sf.start_client(tmp_path / "store", [clip.root], env=env)
    try:
        sf.run(client, "generate", _params(clip, seed=0), timeout=300)[0].raise_for_error()
        slow = client.submit("generate", _params(clip, seed=1))
        sf.wait_for(client, lambda: slow.progress is not None and slow.progress[0] == "denoise", 300, "denoising")
        client.cancel(slow.id)
        client.wait(slow, 120)
        assert slow.error["code"] == "cancelled"
        req, events = sf.run(client, "generate", _params(clip, seed=2), timeout=300)
        req.raise_for_error()
        assert any(m.startswith("loading") for m in _load_messages(events))  # cancel closed it
        req, events = sf.run(client, "generate", _params(clip, seed=3), timeout=300)
        req.raise_for_error()
        assert _load_messages(events) == ["the generator was still loaded"]
        time.sleep(3.5)  # longer than EX4D_KEEP_GENERATOR=2 s
        req, events = sf.run(client, "generate", _params(clip, seed=4), timeout=300)
        req.raise_for_error()
        assert any(m.startswith("loading") for m in _load_messages(events))  # idle: closed, loaded again
        log = (tmp_path / "store" / "logs" / "service.log").read_text()
        assert "closed after 2 s idle" in log
    finally:
        client.close()


@pytest.mark.parametrize("value", ["-1", "soon", "nan"])
def test_bad_keep_generator_one_error(tmp_path, value):
    proc = subprocess.run(
        [sys.executable, "-m", "ex4d_backend", "serve", "--store", str(tmp_path / "store"), "--keep-generator", value],
        input=b"",
        capture_output=True,
        timeout=120,
        cwd=sf.REPO,
    )
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "--keep-generator" in err and "seconds" in err, err
    assert not (tmp_path / "store").exists()  # nothing was created


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_kept_generator_memory_is_freed_by_cancel_and_idle(tmp_path, models, device):
    """In-process (``Server._run``, as the GPU worker calls it) so the allocator can be read: the kept
    generator holds its weights between jobs; a cancel and the idle expiry give all of it back."""
    import io

    from ex4d_backend.service.jobstore import JobStore
    from ex4d_backend.service.server import Server, Task

    clip = sf.make_clip(tmp_path / "data")
    server = Server(JobStore(tmp_path / "store", [clip.root]), io.BytesIO(), io.BytesIO(), models_dir=str(models))
    server.resident.keep_alive_s = 600

    def allocated() -> int:
        if device != "cuda":
            return 0
        import torch

        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    def job(seed: int, cancel_at_denoise: bool = False) -> dict:
        task = Task(f"job{seed}", "generate", _params(clip, seed=seed, device=device))
        original = server.emit

        def emit(event: dict) -> None:
            if cancel_at_denoise and event.get("event") == "progress" and event["stage"] == "denoise":
                task.cancel.set()
            original(event)

        server.emit = emit
        try:
            return server._run(task)
        finally:
            server.emit = original

    assert job(0)["event"] == "result" and server.resident.loaded is not None
    first = server.resident._gen
    server.resident.release()  # after one complete cycle: what stays now is not the generator's
    base = allocated()
    assert job(1)["event"] == "result" and server.resident._gen is not first  # released: loaded anew
    kept = allocated()
    assert server.resident.loaded is not None and (device != "cuda" or kept > base)
    assert job(2)["event"] == "result" and allocated() == kept  # reused: nothing more allocated
    final = job(3, cancel_at_denoise=True)
    assert final["event"] == "error" and final["error"]["code"] == "cancelled", final
    assert server.resident.loaded is None and allocated() == base
    assert job(4)["event"] == "result" and server.resident.loaded is not None
    server.resident.keep_alive_s = 0.2
    server.resident.done(True)  # restart the idle clock with the short keep-alive
    time.sleep(0.3)
    assert server.resident.expire() and server.resident.loaded is None and allocated() == base
