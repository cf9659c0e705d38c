"""Image files decoded in full up front, so that a broken file is an error naming it before any model loads.

Used by ``vtprune viz`` (its ``--image``) and by the benchmark loaders (every image the selected questions use).
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

__all__ = ["ImageDecodeError", "decode_image"]


class ImageDecodeError(ValueError):
    """An image file PIL cannot decode (or refuses as a decompression bomb); the message names the file and why."""


# What PIL raises for a file it cannot decode: UnidentifiedImageError / "image file is truncated" (OSError),
# a broken PNG chunk (SyntaxError), bad header fields (ValueError, struct.error), a short GIF / TIFF (EOFError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def decode_image(path: str | Path):
    """``path`` decoded in full as an RGB PIL image. Raises :class:`ImageDecodeError` for an empty file, one PIL
    cannot read or that is cut short (chunk checksums included, which decoding alone skips), and one over PIL's
    decompression-bomb limit (its warning counts too)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.stat().st_size == 0:
        raise ImageDecodeError(f"{path}: empty image file (0 bytes); replace or remove it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL checks the size when it opens
            with Image.open(path) as img:
                img.verify()
            with Image.open(path) as img:
                return img.convert("RGB")  # decodes every pixel
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(f"{path}: refused as a decompression bomb ({str(err).rstrip('.')}); PIL "
                               f"refuses images over Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels: give a "
                               "smaller image, or raise that limit if the image is genuine") from None
    except _DECODE_ERRORS as err:
        why = ("PIL does not recognise its format" if isinstance(err, UnidentifiedImageError)
               else f"{type(err).__name__}: {err}")  # the former's message repeats the path
        raise ImageDecodeError(f"{path}: not an image PIL can decode ({why}); replace it with a complete PNG or "
                               "JPEG file") from None
