"""nvdiffrast on CUDA (``RasterizeCudaContext``): import, plugin loading, one context per device.

nvdiffrast ships on PyPI as ``diffrp-nvdiffrast`` (the NVlabs 0.3.3 source); its CUDA plugin is compiled
by torch's extension builder on first use (about a minute). With torch >= 2.9 the loader's import of the
freshly built module fails with ``ModuleNotFoundError: nvdiffrast_plugin_...`` because the build folder is
not on ``sys.path``; :func:`nvdiffrast` puts it there first. This is the only place that knows.
"""

from __future__ import annotations

import re
import sys
from functools import cache
from types import ModuleType

import torch

from .errors import DEVICE, Ex4dError


def plugin_name() -> str:
    """The name nvdiffrast gives its CUDA plugin (same formula as ``nvdiffrast.torch.ops._get_plugin``)."""
    import nvdiffrast

    name = f"nvdiffrast_plugin_{nvdiffrast.__version__}_torch{torch.__version__}"
    return re.sub(r"\W|^(?=\d)", "_", name)


@cache
def nvdiffrast() -> ModuleType:
    """``nvdiffrast.torch``, with the plugin's build folder on ``sys.path`` (the torch >= 2.9 fix)."""
    if not torch.cuda.is_available():
        raise Ex4dError("the cuda renderer needs an NVIDIA GPU", hint="use --renderer cpu", code=DEVICE)
    try:
        import nvdiffrast.torch as dr
    except ImportError:
        raise Ex4dError(
            "nvdiffrast is not installed",
            hint="install the backend with scripts/install_deps.py on a CUDA machine, or use --renderer cpu",
            code=DEVICE,
        ) from None
    import torch.utils.cpp_extension as cpp

    build_dir = cpp._get_build_directory(plugin_name(), False)
    if build_dir not in sys.path:
        sys.path.insert(0, build_dir)
    return dr


@cache
def context(device_index: int = 0):
    """One ``RasterizeCudaContext`` per device (creating one compiles/loads the plugin on first use)."""
    return nvdiffrast().RasterizeCudaContext(device=torch.device("cuda", device_index))


def available() -> bool:
    """True when CUDA and nvdiffrast are importable (does not build the plugin)."""
    if not torch.cuda.is_available():
        return False
    try:
        import nvdiffrast.torch  # noqa: F401
    except ImportError:
        return False
    return True


def plugin_status() -> dict:
    """For ``ex4d doctor``: is nvdiffrast importable, is its plugin built, where."""
    status: dict = {"cuda": torch.cuda.is_available(), "installed": False, "built": False}
    try:
        import nvdiffrast

        status["installed"] = True
        status["version"] = nvdiffrast.__version__
        import torch.utils.cpp_extension as cpp

        build_dir = cpp._get_build_directory(plugin_name(), False)
        status["build_dir"] = build_dir
        import os

        status["built"] = (
            any(f.endswith(".so") or f.endswith(".pyd") for f in os.listdir(build_dir))
            if os.path.isdir(build_dir)
            else False
        )
    except ImportError:
        pass
    return status


def rasterize_interpolate(
    clip: torch.Tensor,
    faces: torch.Tensor,
    attr: torch.Tensor,
    resolution: tuple[int, int],
    antialias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rasterise (T, V, 4) clip positions (instanced mode: one ``faces`` (F, 3) int32 for all frames),
    interpolate (T, V, C) float attributes, antialias. Returns (T, H, W, C) attributes and the raster
    output (T, H, W, 4) (u, v, z/w, triangle id + 1)."""
    dr = nvdiffrast()
    ctx = context(clip.device.index or 0)
    rast, _ = dr.rasterize(ctx, clip.contiguous(), faces, resolution, grad_db=False)
    out, _ = dr.interpolate(attr.contiguous(), rast, faces)
    if antialias:
        out = dr.antialias(out.contiguous(), rast, clip.contiguous(), faces)
    return out, rast
