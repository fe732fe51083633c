"""The guide stage's files: lossless PNG frames (the exact guide), H.264 previews and the camera."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..cameras import CameraPath

GUIDE_FILES = ("color.mp4", "mask.mp4", "color", "mask", "camera.npz")  # PNG folders hold frame_00000.png ...
PNG_PREFIX = "frame_"
GUIDE_X264_PRESET = (
    "ultrafast"  # the videos are previews (the PNGs are the exact guide); crf 12 keeps them near-lossless
)
GUIDE_PNG_LEVEL = (
    1  # zlib level of the exact PNG frames: lossless at any level; 1 is several times faster than the default 3
)


def read_png_folder(folder: Path, channels: int) -> np.ndarray:
    """(T, H, W, 3) RGB or (T, H, W) grey uint8 from ``frame_*.png`` files."""
    import cv2

    files = sorted(folder.glob(f"{PNG_PREFIX}*.png"))
    flag = cv2.IMREAD_COLOR if channels == 3 else cv2.IMREAD_GRAYSCALE
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        imgs = list(pool.map(lambda f: cv2.imread(str(f), flag), files))
    if channels == 3:
        imgs = [cv2.cvtColor(i, cv2.COLOR_BGR2RGB) for i in imgs]
    return np.stack(imgs)


def write_guide_files(folder: Path, color: np.ndarray, mask: np.ndarray, fps: float, camera: CameraPath) -> None:
    """The guide's files into ``folder`` (a stage's temporary folder): H.264 previews, lossless PNG frames
    (the exact guide) and the camera; encoded in parallel threads (OpenCV and PyAV release the GIL)."""
    import cv2

    from ..cameras import save_camera_npz
    from ..footage import write_video

    (folder / "color").mkdir()
    (folder / "mask").mkdir()

    def png(args) -> None:
        sub, i, img = args
        if img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(
            str(folder / sub / f"{PNG_PREFIX}{i:05d}.png"), img, [cv2.IMWRITE_PNG_COMPRESSION, GUIDE_PNG_LEVEL]
        ):
            raise OSError(f"cannot write PNG frame {i} in {folder / sub}")

    with ThreadPoolExecutor(max(2, min(16, os.cpu_count() or 1))) as pool:
        videos = [pool.submit(write_video, folder / "color.mp4", color, fps, preset=GUIDE_X264_PRESET)]
        videos.append(pool.submit(write_video, folder / "mask.mp4", mask, fps, preset=GUIDE_X264_PRESET))
        jobs = [("color", i, f) for i, f in enumerate(color)] + [("mask", i, f) for i, f in enumerate(mask)]
        list(pool.map(png, jobs))
        save_camera_npz(folder / "camera.npz", camera)
        for v in videos:
            v.result()
