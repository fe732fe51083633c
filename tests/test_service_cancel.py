"""Cancel stops a job at its next step boundary, leaves no result, and frees GPU memory (cuda variant).

Runs the service's own request runner (``Server._run``) in-process so the GPU allocator can be read
after the cancelled job; the cpu variant checks the same path on any machine.
"""

from __future__ import annotations

import io
import json

import pytest
import service_fixtures as sf

from ex4d_backend.service import jobs
from ex4d_backend.service.jobstore import JobStore
from ex4d_backend.service.server import Server, Task


def _cuda_ready() -> bool:
    try:
        import torch

        from ex4d_backend.render import resolve_renderer

        return torch.cuda.is_available() and resolve_renderer("auto") == "cuda"
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.parametrize(
    "renderer",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not _cuda_ready(), reason="no CUDA")])],
)
def test_cancel_at_step_boundary_frees_memory(tmp_path, renderer):
    clip = sf.make_clip(tmp_path / "data", width=128, height=96, n_frames=9)
    server = Server(JobStore(tmp_path / "store", [clip.root]), io.BytesIO(), io.BytesIO())
    # Warm-up: a complete render (plugin build, CUDA context, caches that legitimately stay).
    warm = server._run(Task("warm", "render_guide", clip.params(camera={"preset": "30"}, renderer=renderer)))
    assert warm["event"] == "result", warm
    base = None
    if renderer == "cuda":
        import torch

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    task = Task("job", "render_guide", clip.params(camera={"preset": "90"}, renderer=renderer))
    emitted: list[dict] = []
    original_emit = server.emit

    def emit(event: dict) -> None:
        emitted.append(event)
        if event.get("event") == "progress" and event["stage"] == "render" and event["step"] >= 1:
            task.cancel.set()  # as the reader thread does on a `cancel` request
        original_emit(event)

    server.emit = emit
    final = server._run(task)
    assert final["event"] == "error" and final["error"]["code"] == "cancelled", final
    renders = [e for e in emitted if e.get("event") == "progress" and e["stage"] == "render"]
    assert renders[-1]["step"] == 1 < renders[-1]["total"]  # stopped at the boundary after step 1
    assert not [e for e in emitted if e.get("event") == "progress" and e["stage"] == "write"]
    store = tmp_path / "store"
    assert len(list(store.glob("cache/guide-*"))) == 1 and not list(store.glob("cache/.*"))
    key = jobs.job_key(server.store, "render_guide", task.params)
    state = json.loads((server.store.job_dir("render_guide", key) / "state.json").read_text())
    assert state["state"] == "cancelled"
    if renderer == "cuda":
        import torch

        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == base  # nothing of the cancelled job stays on the GPU
