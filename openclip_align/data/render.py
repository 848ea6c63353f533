"""Turning source pictures (bitmaps with alpha, SVGs) into small square RGB images on white.

All sources go through :func:`to_square_rgb` so every image in the corpus has the same look:
content cropped to what is drawn, centred on a white square with a small margin, resampled with
a fixed filter. Everything here is deterministic for a given input.
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image

WHITE = (255, 255, 255, 255)
MARGIN = 0.06          # of the square side, on each side


def content_box(image: Image.Image, threshold: int = 8) -> Optional[tuple]:
    """Bounding box of what is drawn: alpha > threshold, and not plain white once composited."""
    rgba = image.convert("RGBA")
    arr = np.asarray(rgba)
    alpha = arr[..., 3] > threshold
    if not alpha.any():
        return None
    drawn = alpha & (arr[..., :3].min(axis=-1) < 250)
    mask = drawn if drawn.any() else alpha
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def to_square_rgb(image: Image.Image, size: int, crop: bool = True) -> Image.Image:
    """Crop to the drawn content, pad to a centred white square, resize to ``size`` (LANCZOS)."""
    rgba = image.convert("RGBA")
    if crop:
        box = content_box(rgba)
        if box is not None:
            rgba = rgba.crop(box)
    w, h = rgba.size
    side = max(w, h)
    side_with_margin = max(1, int(round(side * (1 + 2 * MARGIN))))
    canvas = Image.new("RGBA", (side_with_margin, side_with_margin), WHITE)
    canvas.alpha_composite(rgba, ((side_with_margin - w) // 2, (side_with_margin - h) // 2))
    rgb = canvas.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.LANCZOS, reducing_gap=None)
    return rgb


def is_blank(image: Image.Image, min_fraction: float = 0.002) -> bool:
    """True if (almost) nothing non-white is drawn: such renders carry no picture."""
    arr = np.asarray(image.convert("L"))
    return float((arr < 245).mean()) < min_fraction


def render_svg(path: str, long_side: int = 128) -> Image.Image:
    """Rasterise an SVG with cairosvg at ``long_side`` pixels wide (RGBA), keeping the aspect ratio.

    One pass: a tall drawing simply comes out taller than ``long_side``; only an extreme one (more
    than 4x) is drawn again by height so it does not cost a huge canvas.
    """
    import cairosvg

    with open(path, "rb") as f:
        data = f.read()
    if b"<text" in data or b"<flowRoot" in data:
        _reset_cairo_font_caches()
    try:
        image = Image.open(io.BytesIO(cairosvg.svg2png(bytestring=data, output_width=long_side, unsafe=False)))
        image.load()
        if image.height > 4 * long_side:
            png = cairosvg.svg2png(bytestring=data, output_height=long_side, unsafe=False)
            image = Image.open(io.BytesIO(png))
            image.load()
    except Exception as err:                      # noqa: BLE001 - cairosvg raises many kinds
        raise RenderError(f"{path}: {err}") from err
    return image


def _reset_cairo_font_caches() -> None:
    """Text comes out slightly differently depending on what cairo drew before in this process (its
    font and glyph caches), which would make rebuilds differ; start every text-bearing SVG from empty
    caches. Cairo allows this only when no cairo object is alive, hence the collection first."""
    import gc

    import cairocffi

    gc.collect()
    reset = getattr(cairocffi.cairo, "cairo_debug_reset_static_data", None)
    if reset is not None:
        reset()


def render_svg_content(path: str, size: int) -> Image.Image:
    """Rasterise an SVG so that what is drawn (not the page) spans at least ``size`` pixels.

    Clip-art is often a small drawing on a large page: drawn at a fixed page width the cropped
    content would be a few pixels, so such files are drawn again, larger (at most 8x).
    """
    long_side = max(128, 2 * size)
    image = render_svg(path, long_side)
    box = content_box(image)
    if box is not None:
        extent = max(box[2] - box[0], box[3] - box[1])
        if extent < size:                         # would be scaled up: draw larger instead
            factor = min(8, -(-2 * size // max(1, extent)))
            if factor > 1:
                image = render_svg(path, long_side * factor)
    return image


def dhash(image: Image.Image, side: int = 8) -> int:
    """64-bit difference hash of the grey image, for near-duplicate filtering."""
    grey = np.asarray(image.convert("L").resize((side + 1, side), Image.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


class RenderError(RuntimeError):
    """A source picture could not be drawn; the item is skipped and counted."""
