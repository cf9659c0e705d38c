"""Public entry points: ``prune``, ``unprune``, ``pruned``, ``list_methods``, ``list_configs``, ``load_config``."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

from .adapters import get_adapter
from .errors import ConfigError, ConfigNotFoundError, PruneError, UnknownFieldError
from .registry import check_keywords, list_methods, make_method, method_class, method_fields
from .session import Session


CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SHIPPED_MODELS = {"llava": "llava-1.5-7b", "llava_next": "llava-next-7b", "internvl": "internvl"}  # family -> stem
# model-name fragments (lower case, "_" read as "-") -> adapter family; NeXT before the generic LLaVA names
_FAMILY_PATTERNS = (("llava_next", ("llava-next", "llava-v1.6", "llava-1.6")), ("llava", ("llava-1.5", "llava-v1.5")),
                    ("internvl", ("internvl",)))


def list_configs(method: str | None = None) -> list[str]:
    """Shipped configs as ``"<method>/<model>"`` names for ``prune(model, config=name)``, optionally of one method."""
    return sorted(f"{p.parent.name}/{p.stem}" for p in CONFIG_DIR.glob("*/*.yaml") if method in (None, p.parent.name))


def _resolve_config(spec) -> Path:
    """A YAML path (used as given when it is a file) or a shipped name, with or without ``.yaml``."""
    if not isinstance(spec, (str, os.PathLike)):
        raise ConfigError(
            f"vtprune: config must be a YAML path or a shipped name like 'fastv/llava-1.5-7b', got {spec!r}"
        )
    path = Path(spec)
    if path.is_file():
        return path
    name = os.fspath(spec).removesuffix(".yaml")
    if name in list_configs():
        return CONFIG_DIR / f"{name}.yaml"
    raise ConfigNotFoundError(
        f"vtprune: config {os.fspath(spec)!r} is neither a file nor a shipped config; shipped: "
        f"{', '.join(list_configs())} (vtprune.api.list_configs())"
    )


def _key_line(path: Path, key: str) -> str:
    """' line N' where ``key`` sits in the file (for error messages), or ''."""
    import yaml

    node = yaml.compose(path.read_text())
    pairs = node.value if isinstance(node, yaml.MappingNode) else ()
    lines = {k.value: k.start_mark.line + 1 for k, _ in pairs}
    return f" line {lines[key]}" if key in lines else ""


def _load(spec) -> tuple[Path, dict]:
    import yaml

    path = _resolve_config(spec)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err)
        context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and context_mark is not None:
            what += f" ({context} from line {context_mark.line + 1})"
        raise ConfigError(f"vtprune: config {os.fspath(path)} is not valid YAML{where}: {what}; fix the file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"vtprune: config {os.fspath(path)} cannot be read: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("method"), str) or not all(isinstance(k, str) for k in data):
        raise ConfigError(
            f"vtprune: config {os.fspath(path)} must be a mapping of names with a 'method: <name>' entry, "
            f"e.g. 'method: fastv'; methods: {', '.join(list_methods())}"
        )
    if data.get("model") is not None and not isinstance(data["model"], str):
        raise ConfigError(f"vtprune: config {os.fspath(path)}{_key_line(path, 'model')}: 'model' must be a model name")
    try:
        cls = method_class(data["method"])
    except ConfigError as err:
        raise ConfigError(f"{err} (config {os.fspath(path)}{_key_line(path, 'method')})") from None
    keys = set(data) - {"method", "model"}
    try:
        check_keywords(cls, keys)
    except UnknownFieldError as err:
        first = min(keys - set(method_fields(cls)))
        raise UnknownFieldError(f"{err} (config {os.fspath(path)}{_key_line(path, first)})") from None
    return path, data


def load_config(path_or_name) -> dict:
    """Read a config: a YAML path or a shipped ``"<method>/<model>"`` name (see :func:`list_configs`).

    Returns the mapping (``method``, optional ``model`` and keyword entries). Checked without a model: valid YAML
    (the error names the file and line), a known method and only its keywords; values are checked by ``prune``.
    Raises ConfigError (a ValueError) naming the file.
    """
    return _load(path_or_name)[1]


def _model_family(name: str) -> str | None:
    key = name.lower().replace("_", "-")
    return next((fam for fam, parts in _FAMILY_PATTERNS if any(p in key for p in parts)), None)


def _warn_family(path: Path, data: dict, adapter, model) -> None:
    """Warn when the config's ``model:`` names another model family than the model being pruned."""
    family = _model_family(data.get("model") or "")
    if family is None or family == adapter.family:
        return
    hint = f"{data['method']}/{SHIPPED_MODELS[adapter.family]}" if adapter.family in SHIPPED_MODELS else None
    warnings.warn(
        f"vtprune: config {os.fspath(path)} is for {data['model']!r} ({family} family) but the model being pruned is "
        f"a {type(model).__name__} ({adapter.family} family); its settings may not fit"
        + (f"; the shipped config for this model is config={hint!r}" if hint in list_configs() else ""),
        UserWarning, stacklevel=3,
    )


def prune(model, method: str | None = None, *, config=None, **kwargs):
    """Install a pruning method on ``model`` (in place) and return it.

    ``ratio`` = fraction of each image's visual tokens removed, in [0, 1); ``keep`` = visual tokens kept per
    image (for the model's standard image; anyres images scale it). Other keywords are the method's
    hyperparameters, validated here (wrong type or range: ConfigError, a ValueError). ``config`` is a YAML path
    or a shipped name such as ``"flowcut/llava-1.5-7b"`` with ``method:`` and keyword entries (keywords given
    here override it; a ``model:`` of another family warns). A model holds one method at a time: pruning an
    already pruned model raises; call :func:`unprune` first.
    """
    path = data = None
    if config is not None:
        path, data = _load(config)
        if method is not None and method_class(method).name != method_class(data["method"]).name:
            raise ConfigError(f"vtprune: method {method!r} conflicts with {data['method']!r} in config {os.fspath(path)}")
        method = data["method"]
        kwargs = {**{k: v for k, v in data.items() if k not in ("method", "model")}, **kwargs}
    if method is None:
        raise ConfigError("vtprune: name a method, e.g. vtprune.prune(model, 'fastv', ratio=0.75); see vtprune.list_methods()")
    existing = getattr(model, "vtprune", None)
    if isinstance(existing, Session):
        raise PruneError(
            f"vtprune: this model is already pruned with {existing.method.name!r}; stacking methods is not supported. "
            "Call vtprune.unprune(model) first."
        )
    adapter = get_adapter(model)
    source = f" (config {os.fspath(path)})" if path is not None else ""
    if data is not None:
        _warn_family(path, data, adapter, model)
    try:
        method_obj = make_method(method, **kwargs)
    except ConfigError as err:
        if path is None:
            raise
        raise type(err)(f"{err}{source}") from None
    if method_obj.keep is not None and method_obj.keep > adapter.nominal_tokens:
        raise ConfigError(
            f"vtprune: keep={method_obj.keep} is more than the {adapter.nominal_tokens} visual tokens an image has "
            f"for this model; use keep <= {adapter.nominal_tokens}{source}"
        )
    session = Session(model, adapter, method_obj)
    session.install()
    model.vtprune = session
    return model


def unprune(model):
    """Remove vtprune from ``model``: hooks, attention wrappers and state. The model behaves exactly as before."""
    session = getattr(model, "vtprune", None)
    if not isinstance(session, Session):
        warnings.warn("vtprune.unprune: the model is not pruned; nothing to do", stacklevel=2)
        return model
    session.remove()
    return model


@contextlib.contextmanager
def pruned(model, method: str | None = None, **kwargs):
    """``with vtprune.pruned(model, "random", ratio=0.5): ...`` — pruned inside, restored on exit (also on error)."""
    prune(model, method, **kwargs)
    try:
        yield model
    finally:
        if isinstance(getattr(model, "vtprune", None), Session):
            unprune(model)


__all__ = ["prune", "unprune", "pruned", "list_methods", "list_configs", "load_config"]
