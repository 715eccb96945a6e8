"""Decoding untrusted images: base64 or bytes in, an RGB image out, or an error naming the field.

The header is read before any pixel is decoded, so a small file that claims a huge size (a
decompression bomb) is refused without allocating it.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from fluxserve.errors import FetchError, InvalidInput
from fluxserve.safety.fetch import parse_url

_DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
FORMATS = ("PNG", "JPEG", "WEBP")


def is_url(value: str) -> bool:
    """Whether ``value`` is an http(s) URL that can be fetched as written (:func:`parse_url`); an odd or
    malformed one is not, so a submit refuses it with a 400 naming the field rather than queueing a job
    that could never fetch it."""
    text = value.strip()
    if not text[:8].lower().startswith(("http://", "https://")):
        return False
    try:
        parse_url(text)
    except FetchError:
        return False
    return True


def decode_image_input(value: str, field: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Base64 (optionally a ``data:image/...;base64,`` URI; whitespace tolerated) to an RGB image.

    A value written as an http(s) URL that :func:`is_url` refused gets the URL's own problem, not a base64
    error."""
    if value.strip()[:8].lower().startswith(("http://", "https://")):
        try:
            parse_url(value)
        except FetchError as error:
            raise InvalidInput(field, str(error)) from None
    text = _WHITESPACE.sub("", _DATA_URI.sub("", value.strip(), count=1))
    if len(text) * 3 // 4 > max_bytes:
        raise InvalidInput(field, f"larger than the {max_bytes // 1024} KiB limit")
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidInput(field, "not valid base64 (nor an http(s) URL)") from error
    return decode_image_bytes(data, field, max_pixels)


def decode_image_bytes(data: bytes, field: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidInput(
                    field, f"{width}x{height} exceeds the {max_pixels / 1e6:g} megapixel limit"
                )
            image.load()
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidInput(field, "image dimensions too large (decompression bomb)") from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise InvalidInput(field, "not a decodable image (PNG, JPEG or WebP)") from error
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")
