"""Per-stage timings of the GPU recon (for optimisation): upload, mesh, filter, clip, raster, guide, read-back."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ex4d_backend import raster_cuda  # noqa: E402
from ex4d_backend.cameras import preset_path  # noqa: E402
from ex4d_backend.dwmesh import build_dwmesh  # noqa: E402
from ex4d_backend.render import clip_positions, rgba_to_guide  # noqa: E402
from ex4d_backend.synthetic import make_scene  # noqa: E402


def main() -> None:
    for w, h in [(512, 512), (1920, 1080)]:
        frames, depth, k = make_scene(w, h, 49)
        cam = preset_path("90", 49, k, depth[0], w, h)
        for _rep in range(3):
            marks = {}
            torch.cuda.synchronize()
            t0 = time.perf_counter()

            def mark(name: str, marks: dict = marks, t0: float = t0) -> None:
                torch.cuda.synchronize()
                marks[name] = round(time.perf_counter() - t0, 4)

            d = torch.from_numpy(depth).cuda()
            c = torch.from_numpy(frames).cuda()
            mark("upload")
            mesh = build_dwmesh(d, k, c)
            mark("mesh+filter")
            clip = clip_positions(mesh.vertices, cam.extrinsics, cam.intrinsics, w, h)
            mark("clip")
            faces = mesh.faces.int().contiguous()
            out, _ = raster_cuda.rasterize_interpolate(clip, faces, mesh.colors.float(), (h, w))
            mark("raster+interp+aa")
            color, mask = rgba_to_guide(out)
            mark("guide+readback")
        print(json.dumps({"size": f"{w}x{h}", "cumulative_s": marks}), flush=True)


if __name__ == "__main__":
    main()
