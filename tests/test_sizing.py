"""The generation size follows the footage (``generation/sizing.py``), against the documented rule."""

from __future__ import annotations

import math

import pytest

from ex4d_backend.errors import Ex4dError
from ex4d_backend.generation.sizing import auto_size, generation_size, parse_size


@pytest.mark.parametrize(
    "guide, expected",
    [
        ((1920, 1080), (832, 480)),  # 16:9 -> Wan 480P landscape
        ((1024, 576), (832, 480)),
        ((3840, 2160), (832, 480)),
        ((1080, 1920), (480, 832)),  # 9:16 -> portrait
        ((576, 1024), (480, 832)),
        ((1024, 1024), (512, 512)),  # square -> the reference's size
        ((1000, 1040), (512, 512)),  # within 5 % of square
    ],
)
def test_canonical_sizes(guide, expected):
    """16:9, 9:16 and square footage get the documented sizes. Fails if the rule forgets the snap
    (16:9 would give 848x480 / 832x464) or swaps orientation."""
    assert auto_size(*guide) == expected


@pytest.mark.parametrize("guide", [(1024, 768), (2390, 1000), (1850, 1000), (720, 480), (4096, 1716), (1000, 1400)])
def test_other_aspects_follow_the_area_rule(guide):
    """Aspects more than 5 % from every canonical size: w = round16(sqrt(A a)), h = round16(sqrt(A / a)),
    A = 832 * 480, written here literally. Fails on a floor instead of a rounding or on another area."""
    a = guide[0] / guide[1]
    for cw, ch in ((512, 512), (832, 480), (480, 832)):
        assert abs(math.log(a * ch / cw)) > math.log(1.05)
    area = 832 * 480
    w = int(math.floor(math.sqrt(area * a) / 16 + 0.5)) * 16
    h = int(math.floor(math.sqrt(area / a) / 16 + 0.5)) * 16
    assert auto_size(*guide) == (w, h)
    assert w % 16 == 0 and h % 16 == 0 and abs(w * h / area - 1) < 0.06


def test_overrides_and_errors():
    """Explicit WxH and --width/--height win over the rule; a size not a multiple of 16 is one clear error."""
    assert generation_size(1920, 1080, "512x512") == (512, 512)
    assert generation_size(1920, 1080, "auto", width=640, height=368) == (640, 368)
    assert generation_size(1920, 1080, "auto", width=640) == (640, 368)  # 640 / (16/9) = 360 -> 368
    assert parse_size("auto") is None
    for bad in ("830x480", "banana", "0x16"):
        with pytest.raises(Ex4dError) as e:
            parse_size(bad)
        assert e.value.where == "--size"
