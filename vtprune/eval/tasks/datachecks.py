"""Checks shared by the MME / GQA / POPE loaders: names that match several image files, JSON keys given twice
and image files that do not decode. Each turns an ambiguity or a broken file into an error naming it, where
loading would otherwise keep one of the candidates silently or fail later, after the model is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from ...images import ImageDecodeError, decode_image

__all__ = ["ImageDecodeError", "files_by_stem", "one_file", "DuplicateKeys", "check_images"]


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


def check_images(paths: Iterable[Path]) -> None:
    """Decode every image in ``paths`` (each once); the first that fails is an :class:`ImageDecodeError` naming
    the file and why, so a broken data folder fails before a model is loaded."""
    for path in dict.fromkeys(Path(p) for p in paths):
        decode_image(path)
