"""``pngio.encode_png`` (the guide's PNG frames): valid PNG files, checked against the PNG specification
written literally (chunk layout and CRCs, the "up" filter) and read back by two independent decoders."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest

from ex4d_backend.pngio import encode_png, up_filtered


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk, checking each chunk's CRC-32 over type + payload (PNG spec 5.3)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(kind + payload), kind
        out.append((kind, payload))
        pos += 12 + n
    return out


def _unfilter_up_literally(raw: bytes, h: int, row_bytes: int) -> np.ndarray:
    """The spec's reconstruction for filter type 2: Recon(x) = Filt(x) + Recon(b) mod 256, row by row."""
    out = np.zeros((h, row_bytes), np.uint8)
    prev = [0] * row_bytes
    for y in range(h):
        line = raw[y * (row_bytes + 1) : (y + 1) * (row_bytes + 1)]
        assert line[0] == 2  # every row "up"
        cur = [(line[1 + x] + prev[x]) % 256 for x in range(row_bytes)]
        out[y] = cur
        prev = cur
    return out


@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 7), (31, 45, 3), (48, 64), (64, 96, 3)])
def test_png_is_valid_and_lossless(shape):
    """IHDR says W x H, 8 bits, RGB (2) or grey (0), deflate, no interlace; one IDAT whose zlib stream
    (inflated by the standard library) holds every row "up"-filtered per the spec; IEND last; the CRCs hold;
    OpenCV and Pillow both decode the exact pixels. Fails with a wrong filter, a wrong header field, a
    broken CRC or a stream another decoder cannot read."""
    rng = np.random.default_rng(sum(shape))
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    img[: shape[0] // 2] //= 32  # smooth rows too
    data = encode_png(img)
    chunks = _chunks(data)
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"] and chunks[2][1] == b""
    h, w = shape[:2]
    grey = len(shape) == 2
    assert struct.unpack(">IIBBBBB", chunks[0][1]) == (w, h, 8, 0 if grey else 2, 0, 0, 0)
    rows = _unfilter_up_literally(zlib.decompress(chunks[1][1]), h, w * (1 if grey else 3))
    np.testing.assert_array_equal(rows, img.reshape(h, -1))
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(back if grey else back[..., ::-1], img)
    pil = pytest.importorskip("PIL.Image")
    with pil.open(io.BytesIO(data)) as im:
        assert im.mode == ("L" if grey else "RGB")
        np.testing.assert_array_equal(np.asarray(im), img)


def test_up_filter_is_the_difference_to_the_row_above():
    """The filtered bytes are ``row - row above`` mod 256 (the first row as it is), after a filter byte 2.
    Fails with signed arithmetic, a wrong first row or a missing filter byte."""
    img = np.array([[[10, 250, 0], [5, 5, 5]], [[3, 1, 255], [6, 0, 4]]], np.uint8)
    want = np.array([[2, 10, 250, 0, 5, 5, 5], [2, 249, 7, 255, 1, 251, 255]], np.uint8)
    np.testing.assert_array_equal(up_filtered(img), want)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint16), np.zeros((4, 4, 4), np.uint8), np.zeros(4, np.uint8)])
def test_other_arrays_are_refused(bad):
    """16-bit, 4-channel and 1-D arrays are one ValueError. Fails if they are written as a wrong PNG instead."""
    with pytest.raises(ValueError, match="uint8"):
        encode_png(bad)
