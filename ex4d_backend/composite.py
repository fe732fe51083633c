"""Full-resolution composite: the guide's own pixels where the source saw, the generation in the holes.

The generator works at about 832 x 480; the guide can be rendered at the footage's full size (recon
``--max-side`` up to 4096). Per frame, with G the guide colour (H, W, 3), M its mask (H, W; 255 =
seen) and g the generated frame (h, w, 3):

1. **Field of view.** ``crop`` generation saw the centred box ``crop_box(W, H, w, h)`` of the guide
   (:func:`~ex4d_backend.generation.conditioning.crop_box`), ``stretch`` the whole guide. g is upscaled
   to that box with bicubic interpolation (``cv2.INTER_CUBIC``); outside the box (``crop`` only: at
   most 2.5 % a side for the snapped sizes of :mod:`~ex4d_backend.generation.sizing`) the box's edge
   pixels are repeated (``cv2.BORDER_REPLICATE``). Call the result U (H, W, 3).
2. **Colour match** (``match``), fitted at the generation size on the pixels the guide saw, the mask
   eroded by ``FIT_ERODE_PX`` (8: the largest erosion the generator applies, so the edge pixels the
   model repaints are left out): ``affine`` (default) solves the 3 x 4 matrix A minimising
   ``sum |A [g, 1] - G_small|^2 + LAMBDA * n * |A - [I, 0]|^2`` (least squares, a ridge towards the
   identity so a small or flat seen region cannot blow the colours up); ``meanstd`` matches each
   channel's mean and standard deviation (``c' = (c - mean_g) * std_G / std_g + mean_G``); ``none``
   keeps g. Fitted per frame (the seen region of a frame is tens of thousands of pixels, so the fit
   is steady; a per-window fit would jump at window boundaries). Fewer than ``MIN_FIT_PIXELS`` seen
   pixels: identity.
3. **Feathered mask.** ``alpha = min(1, d / F)`` where d is the exact Euclidean distance (px, guide
   resolution) from a seen pixel to the nearest hole pixel (0 in the holes) and ``F`` the feather
   width, by default 8 generation pixels in guide pixels (``8 * max(box_w / w, box_h / h)``).
4. ``out = rint(alpha * G + (1 - alpha) * A(U))``, uint8: exactly the guide where the source saw (at
   least F px from a hole), exactly the colour-matched upscaled generation in the holes.
"""

from __future__ import annotations

import numpy as np

from . import constants as C
from .errors import BAD_INPUT, Ex4dError

MATCH_MODES = ("affine", "meanstd", "none")
FIT_ERODE_PX = 8  # generation px left out of the colour fit at the mask's edge
FEATHER_GEN_PX = 8  # default feather width, in generation pixels
MIN_FIT_PIXELS = 256
LAMBDA = 1e-3  # ridge weight towards the identity, per fitted pixel
MAX_FIT_PIXELS = 65536  # the fit uses at most this many seen pixels (a fixed stride)


def field_box(guide_w: int, guide_h: int, gen_w: int, gen_h: int, resize: str) -> tuple[int, int, int, int]:
    """(x0, y0, w, h) of the guide that the generated frame shows."""
    from .generation.conditioning import crop_box

    if resize == "stretch":
        return 0, 0, guide_w, guide_h
    return crop_box(guide_w, guide_h, gen_w, gen_h)


def feather_alpha(mask: np.ndarray, feather_px: float) -> np.ndarray:
    """float32 (H, W): ``min(1, d / feather_px)``, d = Euclidean distance of a seen pixel (mask > 127)
    to the nearest hole pixel; 0 in the holes; 1 everywhere when the frame has no hole."""
    import cv2

    seen = (np.asarray(mask) > 127).astype(np.uint8)
    if seen.all():
        return np.ones(seen.shape, np.float32)
    d = cv2.distanceTransform(seen, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.minimum(1.0, d / max(float(feather_px), 1e-6)).astype(np.float32)


def fit_colour(generated: np.ndarray, guide: np.ndarray, seen: np.ndarray, mode: str = "affine") -> np.ndarray:
    """The (3, 4) colour transform A with ``A @ [r, g, b, 1]`` mapping generated colours onto the guide's,
    fitted on the ``seen`` (bool (h, w)) pixels of uint8 (h, w, 3) ``generated`` / ``guide``."""
    if mode not in MATCH_MODES:
        raise Ex4dError(f"unknown colour match '{mode}'", where="--composite-match", hint=", ".join(MATCH_MODES))
    ident = np.hstack([np.eye(3), np.zeros((3, 1))])
    idx = np.flatnonzero(seen.ravel())
    if mode == "none" or idx.size < MIN_FIT_PIXELS:
        return ident
    idx = idx[:: max(1, idx.size // MAX_FIT_PIXELS)]
    x = generated.reshape(-1, 3)[idx].astype(np.float64)
    y = guide.reshape(-1, 3)[idx].astype(np.float64)
    if mode == "meanstd":
        mx, sx, my, sy = x.mean(0), x.std(0), y.mean(0), y.std(0)
        scale = np.where(sx > 1e-6, sy / np.maximum(sx, 1e-6), 1.0)
        return np.hstack([np.diag(scale), (my - scale * mx)[:, None]])
    xh = np.hstack([x, np.ones((len(x), 1))])  # (n, 4)
    lam = LAMBDA * len(x)
    a = xh.T @ xh + lam * np.eye(4)
    b = xh.T @ y + lam * ident.T  # (4, 3)
    return np.linalg.solve(a, b).T


def apply_colour(frame: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """float32 (H, W, 3) = ``transform[:, :3] @ c + transform[:, 3]`` per pixel, clipped to [0, 255]."""
    out = frame.astype(np.float32) @ transform[:, :3].T.astype(np.float32) + transform[:, 3].astype(np.float32)
    return np.clip(out, 0.0, 255.0)


def upscale_to_guide(generated: np.ndarray, guide_w: int, guide_h: int, box: tuple[int, int, int, int]):
    """uint8 (H, W, 3): the generated frame resized (bicubic) into ``box``, its edges repeated outside."""
    import cv2

    x0, y0, bw, bh = box
    up = cv2.resize(np.ascontiguousarray(generated), (bw, bh), interpolation=cv2.INTER_CUBIC)
    if (bw, bh) == (guide_w, guide_h):
        return up
    return cv2.copyMakeBorder(up, y0, guide_h - y0 - bh, x0, guide_w - x0 - bw, cv2.BORDER_REPLICATE)


class Compositor:
    """Per-frame composite for one guide size / generation size / resize mode (see the module doc)."""

    def __init__(
        self,
        guide_size: tuple[int, int],
        gen_size: tuple[int, int],
        *,
        resize: str = C.RESIZE,
        match: str = "affine",
        feather_px: float | None = None,
    ):
        if match not in MATCH_MODES:
            raise Ex4dError(f"unknown colour match '{match}'", where="--composite-match", hint=", ".join(MATCH_MODES))
        self.guide_w, self.guide_h = guide_size
        self.gen_w, self.gen_h = gen_size
        self.resize, self.match = resize, match
        self.box = field_box(self.guide_w, self.guide_h, self.gen_w, self.gen_h, resize)
        scale = max(self.box[2] / self.gen_w, self.box[3] / self.gen_h)
        self.feather_px = float(feather_px) if feather_px is not None else FEATHER_GEN_PX * scale

    def colour_transform(self, guide: np.ndarray, mask: np.ndarray, generated: np.ndarray) -> np.ndarray:
        """The fitted (3, 4) transform for one frame (step 2)."""
        import cv2

        from .generation.conditioning import fit_frame

        if self.match == "none":
            return fit_colour(generated, generated, np.zeros(generated.shape[:2], bool), "none")
        g_small = fit_frame(guide, self.gen_w, self.gen_h, self.resize)
        m_small = fit_frame(np.ascontiguousarray(mask), self.gen_w, self.gen_h, self.resize)
        k = 2 * FIT_ERODE_PX + 1
        seen = cv2.erode((m_small > 127).astype(np.uint8), np.ones((k, k), np.uint8)) > 0
        return fit_colour(generated, g_small, seen, self.match)

    def __call__(self, guide: np.ndarray, mask: np.ndarray, generated: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) composite of guide colour (H, W, 3), mask (H, W) and a generated (h, w, 3) frame."""
        if guide.shape[:2] != (self.guide_h, self.guide_w) or mask.shape[:2] != guide.shape[:2]:
            raise Ex4dError(
                f"guide frame {guide.shape[1]}x{guide.shape[0]} / mask {mask.shape[1]}x{mask.shape[0]} "
                f"do not match the composite size {self.guide_w}x{self.guide_h}",
                where="composite",
                code=BAD_INPUT,
            )
        transform = self.colour_transform(guide, mask, generated)
        up = apply_colour(upscale_to_guide(generated, self.guide_w, self.guide_h, self.box), transform)
        alpha = feather_alpha(mask, self.feather_px)[..., None]
        out = alpha * guide.astype(np.float32) + (1.0 - alpha) * up
        return np.rint(out).astype(np.uint8)


__all__ = ["MATCH_MODES", "Compositor", "apply_colour", "feather_alpha", "field_box", "fit_colour", "upscale_to_guide"]
