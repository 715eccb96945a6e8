"""An abstract picture that the image classifier (open_nsfw) flags: ten skin-toned ellipses on green.

Nothing explicit: the shapes were found by a hill climb on the classifier's score over random ellipses
(scored 0.99 by the shipped model), so tests can make a flagged input or output without any real image.
"""

from __future__ import annotations

import base64
import io

from PIL import Image, ImageDraw

BACKGROUND = (142, 221, 131)
# (centre x, centre y, radius x, radius y, r, g, b) on a 224x224 canvas
ELLIPSES = (
    (143, 147, 81, 31, 224, 94, 141),
    (104, 117, 77, 38, 202, 149, 118),
    (117, 1, 50, 85, 181, 124, 138),
    (108, 131, 37, 69, 213, 136, 85),
    (4, 106, 29, 50, 203, 123, 128),
    (168, 86, 19, 57, 209, 117, 122),
    (95, 79, 0, 114, 216, 138, 141),
    (117, 192, 43, 79, 212, 125, 101),
    (219, 118, 54, 83, 185, 142, 87),
    (208, 84, 64, 40, 226, 193, 130),
)


def flagged_image(size: int = 224) -> Image.Image:
    image = Image.new("RGB", (224, 224), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for x, y, rx, ry, r, g, b in ELLIPSES:
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=(r, g, b))
    return image if size == 224 else image.resize((size, size), Image.Resampling.BILINEAR)


def flagged_png_base64(size: int = 224) -> str:
    buffer = io.BytesIO()
    flagged_image(size).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
