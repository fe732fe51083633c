"""A fast lossless PNG encoder for 8-bit frames: the PNG "up" filter (numpy) and ISA-L's deflate (``isal``).

libpng through OpenCV spends 5-11 ms on a 512² RGB frame at zlib level 1 (filter choice and zlib's deflate);
this writes the same kind of file (one IHDR, one IDAT, IEND; 8-bit RGB or grey, no interlace, every row
filtered "up": ``Filt(x) = Orig(x) - Orig(b) mod 256``, PNG spec 9.2) in about 1.3 ms, with ISA-L's
deflate (a standard zlib stream: every PNG decoder reads it). The pixels are exact; the bytes are this
encoder's own (another encoder's differ), the same for the same input on every machine.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILTER_UP = 2  # PNG filter type "Up"
DEFLATE_LEVEL = 1  # ISA-L level 1 (levels 0-3): about the size of zlib's level 1 at 5x its speed


def up_filtered(img: np.ndarray) -> np.ndarray:
    """(H, 1 + W * C) uint8: each row of ``img`` ((H, W) grey or (H, W, C) uint8) as the PNG stream holds
    it: the filter-type byte 2 then ``row - previous row`` mod 256 (the first row against zeros)."""
    h = img.shape[0]
    rows = np.ascontiguousarray(img).reshape(h, -1)
    out = np.empty((h, rows.shape[1] + 1), np.uint8)
    out[:, 0] = FILTER_UP
    out[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=out[1:, 1:])  # uint8 arithmetic wraps: mod 256
    return out


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def encode_png(img: np.ndarray) -> bytes:
    """The PNG file of ``img``: (H, W) grey or (H, W, 3) RGB uint8."""
    from isal import isal_zlib

    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"encode_png takes (H, W) or (H, W, 3) uint8, not {img.shape} {img.dtype}")
    h, w = img.shape[:2]
    colour_type = 0 if img.ndim == 2 else 2  # greyscale / truecolour
    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)  # 8-bit, deflate, adaptive filters, no interlace
    data = isal_zlib.compress(up_filtered(img), DEFLATE_LEVEL)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
