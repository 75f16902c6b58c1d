"""Real images for the demo, drawn with Pillow (nothing is downloaded).

Each image is a deterministic picture of ``(seed, room, index)``: a colour
gradient, a few filled shapes and lines, and a label. Sizes are chosen in
*image tokens* (the vision tower's grid after merging) so that every model
gets the same token counts; the pixel size is a few pixels off the grid so
the processor's own resize runs, as it does for a photo.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["ImageSpec", "draw", "from_png", "to_png"]

#: Pixels added to each side, under half a token so the processor rounds
#: back to the intended grid (smart_resize rounds to the nearest multiple).
_OFF_GRID = 5


@dataclass(frozen=True)
class ImageSpec:
    """An image ``tokens_w x tokens_h`` image tokens wide and high."""

    tokens_w: int
    tokens_h: int

    @property
    def tokens(self) -> int:
        return self.tokens_w * self.tokens_h

    def pixels(self, pixels_per_token: int) -> tuple[int, int]:
        """``(width, height)`` in pixels for a model with that many pixels per
        token side."""
        return (
            self.tokens_w * pixels_per_token + _OFF_GRID,
            self.tokens_h * pixels_per_token + _OFF_GRID,
        )


def draw(width: int, height: int, seed: int, room: int, index: int) -> Image.Image:
    """An RGB picture of ``width x height`` pixels, the same for the same
    arguments in every process."""
    rng = np.random.default_rng([seed, room, index])
    # a diagonal gradient between two random colours
    a, b = rng.integers(0, 256, size=(2, 3))
    t = (
        np.arange(width)[None, :] / max(width - 1, 1)
        + np.arange(height)[:, None] / max(height - 1, 1)
    ) / 2
    pixels = (a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]).astype(
        np.uint8
    )
    img = Image.fromarray(pixels, "RGB")
    pen = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, size=2))
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == 1:
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            pen.line((x0, y0, x1, y1), fill=fill, width=int(rng.integers(1, 6)))
    pen.text((4, 4), f"room {room} #{index} {width}x{height}", fill=(255, 255, 255))
    return img


def to_png(img: Image.Image) -> bytes:
    """Lossless bytes of ``img``: how a request carries its images between
    processes, so the encoder and the monolithic run see the same pixels."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def from_png(data: bytes) -> Image.Image:
    """Inverse of :func:`to_png`."""
    with Image.open(io.BytesIO(data)) as img:
        rgb: Image.Image = img.convert("RGB")
    return rgb
