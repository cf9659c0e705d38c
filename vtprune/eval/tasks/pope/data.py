"""POPE's data: the loader for its two layouts (see :mod:`vtprune.eval.tasks.pope`), ``--limit`` and the
LLaVA-style answers file :func:`write_answers` writes."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..datachecks import DuplicateKeys, one_file
from ..mme import record_field

CATEGORIES = ("random", "popular", "adversarial")
QUESTIONS_FILE = "pope.jsonl"  # the name the synthetic writer uses; any *pope*.json[l] is found
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg")
_CATEGORY_FILE = re.compile(r"^(?P<dataset>.+)_pope_(?P<category>[A-Za-z]+)\.jsonl?$")


class POPEFormatError(ValueError):
    """A malformed POPE folder or question file; the message starts with ``<file>:<line>:`` where it can."""


@dataclass(frozen=True)
class POPEQuestion:
    question_id: str
    category: str           # random / popular / adversarial (or another name a file gives)
    image: str              # the image field as stored
    image_path: Path
    question: str           # as stored, e.g. "Is there a snowboard in the image?"
    answer: str             # "yes" or "no"
    source: Path = field(default=None, compare=False)
    line: int = field(default=0, compare=False)

    @property
    def key(self) -> str:
        """Unique id over all categories (official per-category files restart their ids)."""
        return f"{self.category}/{self.question_id}"


# --------------------------------------------------------------------------- loading

def _question_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".json", ".jsonl")
                  and not p.name.startswith("."))


def find_question_files(root: Path) -> list[Path]:
    """The question file(s) of a POPE folder: the official per-category files, or one records file."""
    files = _question_files(root)
    named = [p for p in files if "pope" in p.name.lower()]
    per_category = [p for p in named if _CATEGORY_FILE.match(p.name)]
    if per_category:
        datasets = sorted({_CATEGORY_FILE.match(p.name)["dataset"] for p in per_category})
        if len(datasets) > 1:
            raise POPEFormatError(f"{root}: per-category files of several POPE datasets ({', '.join(datasets)}); "
                                  "point at a folder (or a file) holding one of them")
        extra = [p.name for p in named if p not in per_category]
        if extra:
            raise POPEFormatError(f"{root}: both per-category files ({', '.join(p.name for p in per_category)}) "
                                  f"and other POPE files ({', '.join(extra)}); keep one layout per folder")
        return per_category
    candidates = named or [p for p in files if p.suffix.lower() == ".jsonl"]
    if len(candidates) == 1:
        return candidates
    if not candidates:
        raise POPEFormatError(f"{root}: no POPE question file (<dataset>_pope_{{random,popular,adversarial}}.json, "
                              f"a *pope*.json[l] file or one .jsonl file)")
    raise POPEFormatError(f"{root}: several POPE question files ({', '.join(p.name for p in candidates)}); "
                          "pass one file")


def is_pope_folder(root: str | Path) -> bool:
    """A folder with a ``*pope*.json[l]`` file, or with ``.jsonl`` files and no GQA ``*questions*.json``."""
    root = Path(root)
    if not root.is_dir():
        return False
    files = _question_files(root)
    if any("pope" in p.name.lower() for p in files):
        return True
    return any(p.suffix.lower() == ".jsonl" for p in files) and not any("questions" in p.name for p in files)


def _no_key_twice(twice: DuplicateKeys, where: str) -> None:
    """A record giving a key twice (``json`` keeps the last value silently) is an error; ``twice`` is reset."""
    if twice.found:
        raise POPEFormatError(f"{where}: the record gives the key {twice.found[0][1]!r} twice; keep one")
    twice.found.clear()


def _jsonl_records(text: str, path: Path) -> Iterable[tuple[int, object]]:
    twice = DuplicateKeys()
    for lineno, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw, object_pairs_hook=twice)
        except json.JSONDecodeError as e:
            hint = " (expected one JSON object per line, or a JSON array)" if raw.strip() in "{[" else ""
            raise POPEFormatError(f"{path}:{lineno}: invalid JSON ({e.msg}){hint}") from None
        _no_key_twice(twice, f"{path}:{lineno}")
        yield lineno, record


def _array_records(text: str, path: Path) -> list[tuple[int, object]]:
    """The items of a JSON array with the line each starts on."""
    twice = DuplicateKeys()
    dec, n = json.JSONDecoder(object_pairs_hook=twice), len(text)
    out, pos, line, counted = [], text.index("[") + 1, 1, 0

    def skip(i):
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def line_at(i):
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    pos = skip(pos)
    if pos < n and text[pos] == "]":
        return out
    while True:
        pos = skip(pos)
        start = line_at(pos)
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise POPEFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        _no_key_twice(twice, f"{path}:{start}")
        out.append((start, obj))
        pos = skip(pos)
        if pos < n and text[pos] == ",":
            pos += 1
            continue
        if pos < n and text[pos] == "]" and not text[pos + 1:].strip():
            return out
        raise POPEFormatError(f"{path}:{line_at(min(pos, n))}: expected ',' or the closing ']' of the JSON array")


def _read_records(path: Path) -> list[tuple[int, object]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise POPEFormatError(f"{path}:1: not UTF-8 text ({e})") from None
    if text.lstrip().startswith("["):
        return _array_records(text, path)
    return list(_jsonl_records(text, path))


def _images_dir(root: Path, images_dir) -> Path:
    if images_dir is not None:
        d = Path(images_dir)
        if not d.is_dir():
            raise POPEFormatError(f"{d}: images folder not found")
        return d
    for d in (root / "images", root / "val2014"):
        if d.is_dir():
            return d
    return root


def _resolve_image(name: str, images: Path, root: Path, where: str) -> Path | None:
    """The file of the image field ``name`` (first in ``images``, then in ``root``); a name without an extension
    that matches several files there (``a.jpg`` and ``a.png``) is an error naming them."""
    names = [name] if Path(name).suffix else [name, *(name + ext for ext in IMAGE_EXTENSIONS)]
    for base in (images, root):
        found = [base / n for n in names if (base / n).is_file()]
        if found:
            return one_file(found, f"{where}: image {name!r}", POPEFormatError)
    return None


def _text_field(rec: dict, names: Sequence[str], where: str, what: str) -> str:
    for name in names:
        if name in rec:
            value = rec[name]
            if name in ("image", "image_source") and isinstance(value, dict) and isinstance(value.get("path"), str):
                value = value["path"]  # an HF image feature exported as {"bytes": ..., "path": ...}
            if not isinstance(value, str) or not value.strip():
                raise POPEFormatError(f"{where}: field {name!r} ({what}) must be a non-empty string, got {value!r}")
            return value.strip()
    raise POPEFormatError(f"{where}: no {' / '.join(repr(n) for n in names)} field ({what})")


def _question_id(rec: dict, path: Path, lineno: int, where: str) -> str:
    qid = next((rec[k] for k in ("question_id", "id") if k in rec), None)
    if qid is None:
        return f"{path.stem}-{lineno}"
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        raise POPEFormatError(f"{where}: 'question_id' must be a string or an integer, got {qid!r}")
    return str(qid)


def _record_question(rec, path: Path, lineno: int, file_category: str | None, images: Path,
                     folder: Path) -> POPEQuestion:
    """One checked record of ``path`` (starting on ``lineno``) as a question; its image must be found."""
    where = f"{path}:{lineno}"
    if not isinstance(rec, dict):
        raise POPEFormatError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    question = _text_field(rec, ("question", "text"), where, "the question")
    answer = _text_field(rec, ("answer", "label"), where, "yes or no").lower()
    if answer not in ("yes", "no"):
        raise POPEFormatError(f"{where}: the answer must be 'yes' or 'no', got {answer!r}")
    image = _text_field(rec, ("image", "image_source"), where, "the image file name")
    if "category" in rec:
        category = _text_field(rec, ("category",), where, "random, popular or adversarial").lower()
    elif file_category:
        category = file_category
    else:
        raise POPEFormatError(f"{where}: no 'category' field, and the file name does not give one "
                              "(<dataset>_pope_<category>.json)")
    qid = _question_id(rec, path, lineno, where)
    image_path = _resolve_image(image, images, folder, where)
    if image_path is None:
        raise POPEFormatError(f"{where}: image {image!r} not found (looked in {images}"
                              + (f" and {folder}" if images != folder else "") + ")")
    return POPEQuestion(qid, category, image, image_path, question, answer, path, lineno)


def load_pope(root: str | Path, images_dir: str | Path | None = None,
              categories: Sequence[str] | None = None) -> list[POPEQuestion]:
    """Load a POPE folder (or one question file); questions come grouped by category (random, popular,
    adversarial, then any other in name order), in file order within a category.

    ``categories`` keeps only those (an absent one is an error).  Malformed input raises
    :class:`POPEFormatError` naming the file and line; so does a question id given twice in one category.
    """
    root = Path(root)
    if root.is_file():
        files, folder = [root], root.parent
    elif root.is_dir():
        files, folder = find_question_files(root), root
    else:
        raise POPEFormatError(f"{root}: POPE folder or file not found")
    images = _images_dir(folder, images_dir)
    by_category: dict[str, list[POPEQuestion]] = {}
    seen: dict[tuple[str, str], str] = {}  # (category, question id) -> where it was first given
    for path in files:
        m = _CATEGORY_FILE.match(path.name)
        records = _read_records(path)
        if not records:
            raise POPEFormatError(f"{path}:1: no questions")
        for lineno, rec in records:
            q = _record_question(rec, path, lineno, m["category"].lower() if m else None, images, folder)
            if (q.category, q.question_id) in seen:
                raise POPEFormatError(f"{path}:{lineno}: question id {q.question_id!r} of category "
                                      f"{q.category!r} repeats {seen[q.category, q.question_id]}")
            seen[q.category, q.question_id] = f"{path}:{lineno}"
            by_category.setdefault(q.category, []).append(q)
    order = [c for c in CATEGORIES if c in by_category] + sorted(c for c in by_category if c not in CATEGORIES)
    if categories is not None:
        missing = [c for c in categories if c not in by_category]
        if missing:
            raise POPEFormatError(f"{root}: no {', '.join(map(repr, missing))} questions; found {order}")
        order = [c for c in order if c in categories]
    return [q for c in order for q in by_category[c]]


def limit_pope(questions: Sequence[POPEQuestion], limit: int | None) -> list[POPEQuestion]:
    """The first ``limit`` questions taken round-robin over the categories (each category's first questions),
    in the loader's order."""
    if limit is None:
        return list(questions)
    queues: "OrderedDict[str, list[int]]" = OrderedDict()
    for i, q in enumerate(questions):
        queues.setdefault(q.category, []).append(i)
    chosen: set[int] = set()
    depth = 0
    while len(chosen) < limit and any(depth < len(v) for v in queues.values()):
        for idx in queues.values():
            if depth < len(idx) and len(chosen) < limit:
                chosen.add(idx[depth])
        depth += 1
    return [q for i, q in enumerate(questions) if i in chosen]




def write_answers(path: str | Path, questions: Sequence[POPEQuestion], predictions: Sequence[str]) -> Path:
    """LLaVA-style answers JSONL (``question_id``, ``prompt``, ``text``) plus ``category``, ``image``, ``label``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for q, p in zip(questions, predictions):
            f.write(json.dumps({"question_id": q.question_id, "category": q.category, "image": q.image,
                                "prompt": q.question, "text": p, "label": q.answer}) + "\n")
    return path
