"""Checks shared by the MME / GQA / POPE loaders: names that match several image files, JSON keys given twice
and image files that do not decode. Each turns an ambiguity or a broken file into an error naming it, where
loading would otherwise keep one of the candidates silently or fail later, after the model is loaded."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["ImageDecodeError", "files_by_stem", "one_file", "DuplicateKeys", "check_images"]


class ImageDecodeError(ValueError):
    """An image file of a benchmark folder that PIL cannot decode; the message names the file and the reason."""


def files_by_stem(folder: Path, extensions: Sequence[str]) -> dict[str, list[Path]]:
    """The files of ``folder`` whose suffix (any case) is in ``extensions``, grouped by stem, each group sorted."""
    out: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in extensions:
            out.setdefault(p.stem, []).append(p)
    return out


def one_file(paths: Sequence[Path], name: str, error: type[Exception] = ValueError) -> Path:
    """The single file found for ``name`` (e.g. an image id); several are an ``error`` naming every one of them,
    since which one the questions mean cannot be told."""
    if len(paths) > 1:
        raise error(f"{name}: {len(paths)} image files match ({', '.join(str(p) for p in paths)}); "
                    "keep one of them (which one is meant is ambiguous)")
    return paths[0]


class DuplicateKeys:
    """``object_pairs_hook`` for :mod:`json`: builds each object as ``json`` does (the last value wins) and records
    in ``found`` every (object, key) given twice, so a loader can name what a plain ``json.loads`` would hide."""

    def __init__(self):
        self.found: list[tuple[dict, str]] = []

    def __call__(self, pairs: list[tuple[str, object]]) -> dict:
        obj = dict(pairs)
        if len(obj) < len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    self.found.append((obj, key))
                seen.add(key)
        return obj


# What PIL raises for a file it cannot decode: UnidentifiedImageError / "image file is truncated" (OSError),
# a broken PNG chunk (SyntaxError), bad header fields (ValueError, struct.error), a short GIF / TIFF (EOFError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def _decode(path: Path) -> None:
    """Decode ``path`` fully, as the runner will; PIL's decompression-bomb warning counts as an error."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.convert("RGB")


def check_images(paths: Iterable[Path]) -> None:
    """Decode every image in ``paths`` (each once); the first that fails is an :class:`ImageDecodeError` naming
    the file and why, so a broken data folder fails before a model is loaded."""
    from PIL import Image, UnidentifiedImageError

    for path in dict.fromkeys(Path(p) for p in paths):
        if path.stat().st_size == 0:
            raise ImageDecodeError(f"{path}: empty image file (0 bytes); replace or remove it")
        try:
            _decode(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageDecodeError(f"{path}: refused as a decompression bomb ({err}); raise "
                                   "PIL.Image.MAX_IMAGE_PIXELS if the image is genuine") from None
        except _DECODE_ERRORS as err:
            why = ("PIL does not recognise its format" if isinstance(err, UnidentifiedImageError)
                   else f"{type(err).__name__}: {err}")  # the former's message repeats the path
            raise ImageDecodeError(f"{path}: not a decodable image ({why}); replace or remove it") from None
