"""A result's thumbnail: its middle frame, long side ``MAX_SIDE`` pixels, as a PNG.

The add-on runs ``<backend python> -m ex4d_backend.thumbnail FRAMES_DIR DEST.png`` in a worker thread
after a generation (Blender's main thread never decodes an image for it); the shot history shows it
through ``bpy.utils.previews``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from .atomic import write_bytes

MAX_SIDE = 192
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def middle_frame(folder: str | os.PathLike) -> Path:
    """The middle image (index len // 2, natural order) of a frame folder."""
    from .errors import Ex4dError
    from .footage import _natural_key

    files = sorted(
        (f for f in Path(folder).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")),
        key=lambda f: _natural_key(f.name),
    )
    if not files:
        raise Ex4dError("the result folder holds no frames", where=str(folder))
    return files[len(files) // 2]


def thumbnail(image: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """(H, W, C) uint8 -> (h, w, C) uint8 with max(h, w) = min(max_side, max(H, W)), area-averaged."""
    import cv2

    h, w = image.shape[:2]
    s = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return image if size == (w, h) else cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def write_thumbnail(folder: str | os.PathLike, dest: str | os.PathLike, max_side: int = MAX_SIDE) -> Path:
    """The middle frame of ``folder`` as a small PNG at ``dest`` (written atomically)."""
    import cv2

    from .errors import Ex4dError

    src = middle_frame(folder)
    img = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise Ex4dError("cannot read the frame", where=str(src), hint="the file is corrupt")
    ok, png = cv2.imencode(".png", thumbnail(img, max_side))
    if not ok:
        raise Ex4dError("cannot encode the thumbnail", where=str(dest))
    write_bytes(dest, png.tobytes())
    return Path(dest)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m ex4d_backend.thumbnail FRAMES_DIR DEST.png", file=sys.stderr)
        return 2
    try:
        write_thumbnail(argv[0], argv[1])
    except Exception as exc:  # noqa: BLE001 - one line for the add-on's log
        print(f"thumbnail failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
