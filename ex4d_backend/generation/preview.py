"""The weight-free PREVIEW generator: fills the guide's holes with OpenCV inpainting plus a simple
temporal propagation, so an artist can judge a camera move in seconds. It is NOT EX-4D: no
diffusion model runs, and every frame carries a "PREVIEW" label (``label=False`` removes it).

Per output frame: the guide is sampled/resized exactly as for the real generator (no erosion); the
holes are filled spatially by Telea inpainting computed at 1/4 resolution (fast even for large
holes), then blended 50/50 with the previous output frame (temporal propagation: steadier fills).
"""

from __future__ import annotations

import numpy as np

from .. import constants as C
from .conditioning import REFERENCE_NEGATIVE, REFERENCE_PROMPT, prepare_guide

LABEL = "EX-4D PREVIEW - not generated"


def _inpaint(frame: np.ndarray, holes: np.ndarray, scale: int = 4) -> np.ndarray:
    """Telea inpainting of ``holes`` (bool) computed at 1/scale resolution, pasted into the holes."""
    import cv2

    h, w = holes.shape
    small_w, small_h = max(8, w // scale), max(8, h // scale)
    small = cv2.resize(frame, (small_w, small_h), interpolation=cv2.INTER_AREA)
    small_holes = cv2.resize(holes.astype(np.uint8) * 255, (small_w, small_h), interpolation=cv2.INTER_NEAREST)
    small_holes = cv2.dilate(small_holes, np.ones((3, 3), np.uint8))
    filled = cv2.inpaint(small, small_holes, 3, cv2.INPAINT_TELEA)
    up = cv2.resize(filled, (w, h), interpolation=cv2.INTER_LINEAR)
    out = frame.copy()
    out[holes] = up[holes]
    return out


def _label(frame: np.ndarray) -> np.ndarray:
    import cv2

    scale = max(0.35, frame.shape[1] / 1400)
    org = (8, int(8 + 22 * scale))
    cv2.putText(frame, LABEL, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(frame, LABEL, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 0), 1, cv2.LINE_AA)
    return frame


class PreviewGenerator:
    """Same call as :class:`~.pipeline.Ex4dPipeline`; text, steps, cfg and shift are ignored."""

    name = "preview"

    def __init__(self, *, label: bool = True):
        self.label = label

    def __call__(
        self,
        color: np.ndarray,
        mask: np.ndarray,
        *,
        height: int = C.GEN_HEIGHT,
        width: int = C.GEN_WIDTH,
        num_frames: int = C.NUM_FRAMES,
        steps: int = C.STEPS,
        cfg: float = C.CFG,
        shift: float = C.SHIFT,
        seed: int = C.SEED,
        prompt: str = REFERENCE_PROMPT,
        negative_prompt: str = REFERENCE_NEGATIVE,
        resize: str = C.RESIZE,
        callback=None,
    ) -> np.ndarray:
        """uint8 (num_frames, height, width, 3); ``callback("preview", i, num_frames, msg)`` per frame."""
        color_f, mask_f = prepare_guide(
            color, mask, height=height, width=width, num_frames=num_frames, seed=seed, resize=resize, erode=False
        )
        out = np.empty((num_frames, height, width, 3), np.uint8)
        prev = None
        for i in range(num_frames):
            frame = np.round(color_f[i] * 255).astype(np.uint8)
            holes = mask_f[i] < 0.5
            if holes.any():
                filled = _inpaint(frame, holes)
                if prev is not None:
                    blend = (filled.astype(np.uint16) + prev.astype(np.uint16) + 1) // 2
                    filled[holes] = blend[holes].astype(np.uint8)
                frame = filled
            out[i] = frame
            prev = frame
            if callback:
                callback("preview", i + 1, num_frames, f"preview frame {i + 1}/{num_frames}")
        if self.label:
            for f in out:
                _label(f)
        return out

    def close(self) -> None:
        pass
