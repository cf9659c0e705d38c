"""Public entry points: ``prune``, ``unprune``, ``pruned``, ``method``, ``list_methods``, ``list_configs``, ``load_config``."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

from .adapters import get_adapter
from .budget import check_keep
from .errors import ConfigError, ConfigNotFoundError, PruneError, UnknownFieldError
from .methods.base import Method
from .registry import check_keywords, list_methods, make_method, method_class, method_fields
from .session import Session


CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PIPELINE_OPTIONS = ("evict_early_kv",)  # config keys beside ``method:`` / ``pipeline:`` that apply to the pipeline
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


def _key_line(path: Path, key: str, entry: int | None = None) -> str:
    """' line N' where ``key`` sits in the file (in pipeline entry ``entry`` when given), for error messages, or ''."""
    import yaml

    node = yaml.compose(path.read_text())
    if entry is not None:
        if isinstance(node, yaml.MappingNode):  # 'pipeline:' beside other keys, or a top-level list
            pipeline = next((v for k, v in node.value if k.value == "pipeline"), None)
            node = pipeline if pipeline is not None or entry else node  # one method: it is entry 0
        node = node.value[entry] if isinstance(node, yaml.SequenceNode) and entry < len(node.value) else node
    pairs = node.value if isinstance(node, yaml.MappingNode) else ()
    lines = {k.value: k.start_mark.line + 1 for k, _ in pairs}
    return f" line {lines[key]}" if key in lines else ""


def _unique_key_loader():
    """A SafeLoader that refuses a key given twice in one mapping (YAML would silently keep the last value)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "in the mapping", node.start_mark,
                        f"key {key!r} is given twice (first at line {seen[key] + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _load(spec) -> tuple[Path, dict]:
    """(path, mapping): one method (``method:`` and its keywords) or a pipeline (``pipeline:`` list of those; a
    top-level YAML list is read as one)."""
    path = _resolve_config(spec)
    data = _read_yaml(path)
    if isinstance(data, list):
        data = {"pipeline": data}
    if isinstance(data, dict) and "pipeline" in data:
        entries = data["pipeline"]
        if not isinstance(entries, list) or not entries or set(data) - {"pipeline", "model", *PIPELINE_OPTIONS}:
            raise ConfigError(
                f"vtprune: config {os.fspath(path)}: 'pipeline' must be a non-empty list of '{{method: <name>, ...}}' "
                f"entries (and at most 'model:' and {', '.join(repr(o + ':') for o in PIPELINE_OPTIONS)} beside it)"
            )
        _check_model_key(path, data)
        _check_options(path, data)
        for i, entry in enumerate(entries):
            _check_entry(path, entry, i)
        return path, data
    _check_entry(path, data)
    _check_model_key(path, data)
    _check_options(path, data)
    return path, data


def _read_yaml(path: Path):
    import yaml

    try:
        return yaml.load(path.read_text(), Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader
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


def _check_model_key(path: Path, data: dict) -> None:
    if data.get("model") is not None and not isinstance(data["model"], str):
        raise ConfigError(f"vtprune: config {os.fspath(path)}{_key_line(path, 'model')}: 'model' must be a model name")


def _check_options(path: Path, data: dict) -> None:
    for key in PIPELINE_OPTIONS:
        if key in data:
            _check_evict_early_kv(data[key], f" (config {os.fspath(path)}{_key_line(path, key)})")


def _check_evict_early_kv(value, source: str = "") -> None:
    if not isinstance(value, bool):
        raise ConfigError(
            f"vtprune: evict_early_kv must be a bool (True or False; true / false in YAML), got {value!r}{source}"
        )


def _check_entry(path: Path, data, entry: int | None = None) -> None:
    """One method's mapping (pipeline entry ``entry``): a known ``method:`` name and only its keywords."""
    if not isinstance(data, dict) or not isinstance(data.get("method"), str) or not all(isinstance(k, str) for k in data):
        raise ConfigError(
            f"vtprune: config {os.fspath(path)} must be a mapping of names with a 'method: <name>' entry, "
            f"e.g. 'method: fastv' (or a list of those for a pipeline); methods: {', '.join(list_methods())}"
        )
    try:
        cls = method_class(data["method"])
    except ConfigError as err:
        raise ConfigError(f"{err} (config {os.fspath(path)}{_key_line(path, 'method', entry)})") from None
    if entry is not None:
        _check_entry_options(path, data, entry)
    keys = set(data) - {"method", "model", *PIPELINE_OPTIONS}
    try:
        check_keywords(cls, keys)
    except UnknownFieldError as err:
        first = min(keys - set(method_fields(cls)))
        raise UnknownFieldError(f"{err} (config {os.fspath(path)}{_key_line(path, first, entry)})") from None


def _check_entry_options(path: Path, data: dict, entry: int) -> None:
    """``model:`` and the pipeline options belong to the whole pipeline: inside an entry they would be ignored."""
    for key in ("model", *PIPELINE_OPTIONS):
        if key in data:
            raise ConfigError(
                f"vtprune: config {os.fspath(path)}{_key_line(path, key, entry)}: '{key}:' is set inside pipeline "
                f"entry {entry + 1} ({data['method']}), but it applies to the whole pipeline; write it once beside "
                f"'pipeline:' at the top level (a bare list becomes 'pipeline:' with the list under it)"
            )


def load_config(path_or_name) -> dict:
    """Read a config: a YAML path or a shipped ``"<method>/<model>"`` name (see :func:`list_configs`).

    Returns the mapping (``method``, optional ``model`` and keyword entries; a pipeline: ``pipeline``, a list of
    such mappings; either may carry the pipeline option ``evict_early_kv: true``, beside ``method:`` or
    ``pipeline:``: inside a pipeline entry it, like ``model:``, is an error naming the line). Checked without a model:
    valid YAML (the error names the file and line), known methods and only their keywords, a boolean
    ``evict_early_kv``; method values are checked by ``prune``.
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
    hint = (f"{data['method']}/{SHIPPED_MODELS[adapter.family]}"
            if "method" in data and adapter.family in SHIPPED_MODELS else None)
    warnings.warn(
        f"vtprune: config {os.fspath(path)} is for {data['model']!r} ({family} family) but the model being pruned is "
        f"a {type(model).__name__} ({adapter.family} family); its settings may not fit"
        + (f"; the shipped config for this model is config={hint!r}" if hint in list_configs() else ""),
        UserWarning, stacklevel=3,
    )


def method(name: str, **kwargs) -> Method:
    """A method object by name, e.g. ``vtprune.method("fastv", ratio=0.5)``; fields are validated here."""
    return make_method(name, **kwargs)


def _methods_from_config(config, method, kwargs) -> tuple[list, Path, dict]:
    path, data = _load(config)
    entries = data.get("pipeline", [data])
    if len(entries) > 1 and (method is not None or kwargs):
        raise ConfigError(f"vtprune: config {os.fspath(path)} is a pipeline; pass no method or keywords beside it")
    if method is not None and method_class(method).name != method_class(entries[0]["method"]).name:
        raise ConfigError(f"vtprune: method {method!r} conflicts with {entries[0]['method']!r} in config {os.fspath(path)}")
    methods = []
    for i, entry in enumerate(entries):
        own = {k: v for k, v in entry.items() if k not in ("method", "model", *PIPELINE_OPTIONS)}
        fields = {**own, **kwargs}
        try:
            methods.append(make_method(entry["method"], **fields))
        except ConfigError as err:
            # the field at fault is not known here: in a pipeline the entry's method: line tells it from the others
            raise type(err)(f"{err}{_entry(i, len(entries), path, 'method' if len(entries) > 1 else None)}") from None
    return methods, path, data


def _methods(method, kwargs) -> list[Method]:
    """A name with keywords, a Method object, or a list of names / objects (a pipeline, no keywords)."""
    if method is None:
        raise ConfigError("vtprune: name a method, e.g. vtprune.prune(model, 'fastv', ratio=0.75); see vtprune.list_methods()")
    if isinstance(method, (list, tuple)):
        if not method or kwargs:
            raise ConfigError(
                "vtprune: a pipeline is a non-empty list of method objects or names, with no keywords beside it, "
                "e.g. prune(model, [VisionZip(keep=192), FastV(ratio=0.5)])"
            )
        return [m if isinstance(m, Method) else _pipeline_entry(m, i, len(method)) for i, m in enumerate(method)]
    if isinstance(method, Method):
        if kwargs:
            raise ConfigError(f"vtprune: set {', '.join(sorted(kwargs))} on the {method.name} object, not beside it")
        return [method]
    return [make_method(method, **kwargs)]


def _pipeline_entry(name, i: int, n: int) -> Method:
    try:
        return make_method(name)
    except ConfigError as err:
        raise type(err)(
            f"{err} (pipeline entry {name!r} ({i + 1} of {n}): give it its fields as an object, e.g. "
            f"vtprune.method({name!r}, keep=64))"
        ) from None


def _entry(i: int, n: int, path: Path | None = None, key: str | None = None) -> str:
    """Where method ``i`` of ``n`` comes from, for its errors: ' (pipeline entry 2 of 3)' (only in a pipeline),
    plus the config file and ``key``'s line in that entry when it was read from one."""
    where = [f"pipeline entry {i + 1} of {n}"] if n > 1 else []
    if path is not None:
        where.insert(0, f"config {os.fspath(path)}{_key_line(path, key, i) if key else ''}")
    return f" ({', '.join(where)})" if where else ""


def prune(model, method=None, *, config=None, evict_early_kv: bool | None = None, **kwargs):
    """Install a method, or a pipeline of methods, on ``model`` (in place) and return it.

    ``method``: a name with keywords (``prune(model, "fastv", ratio=0.5)``), a method object
    (``prune(model, FastV(ratio=0.5))``) or a list of them, run as a pipeline in order
    (``prune(model, [VisionZip(keep=192), FastV(ratio=0.5)])``). ``ratio`` = fraction of the visual tokens a
    method receives that it removes, in [0, 1); ``keep`` = visual tokens kept per image after it (for the
    model's standard image; anyres images scale it). Other keywords are the method's hyperparameters,
    validated here (wrong type or range: ConfigError, a ValueError). ``config`` is a YAML path or a shipped name
    such as ``"flowcut/llava-1.5-7b"`` with ``method:`` and keyword entries, or a list of those (a pipeline);
    keywords given here override a one-method config; a ``model:`` of another family warns. Each method of a
    pipeline must cut at or after the ones before it. A model holds one session: call :func:`unprune` first.

    ``evict_early_kv`` (default False; None takes the config's ``evict_early_kv:``, else False) applies to the
    whole pipeline: after each prefill, every LLM layer's KV cache keeps only the text tokens and the visual
    tokens that survive the pipeline's last cut, so the layers before an LLM cut (FastV's 0..K-1, the layers
    between TransPrune's / DyVTE's / VFlowOpt's cuts) decode on the kept set too. Their memory and decode
    attention shrink to it; the trade-off: those layers no longer see the dropped tokens in decode (the prefill
    did), so outputs can differ from the default run. Cached keys keep their rope positions (no re-rotation); a
    merged token's row keeps, in the early layers, the key of the token at its original position. With no LLM-side
    cut (vision or pre-LLM methods only) it changes nothing. ``stats.evicted_early_kv`` says whether it happened.
    Needs the default ``DynamicCache``. A non-bool value is a ConfigError.
    """
    _check_not_pruned(model)
    if evict_early_kv is not None:
        _check_evict_early_kv(evict_early_kv)
    path = data = None
    if config is not None:
        methods, path, data = _methods_from_config(config, method, kwargs)
        if evict_early_kv is None:
            evict_early_kv = data.get("evict_early_kv", False)
    else:
        methods = _methods(method, kwargs)
    model.vtprune = _install(model, methods, path, data, bool(evict_early_kv))
    return model


def _check_not_pruned(model) -> None:
    """A model holds one session: stacking is a pipeline, not a second ``prune``."""
    existing = getattr(model, "vtprune", None)
    if isinstance(existing, Session):
        raise PruneError(
            f"vtprune: this model is already pruned with {existing.plan_name!r}; to stack methods, pass them as one "
            "pipeline (a list). Call vtprune.unprune(model) first."
        )


def _install(model, methods: list[Method], path: Path | None, data: dict | None, evict_early_kv: bool) -> Session:
    """Check the methods against ``model``'s adapter and install them; errors name the config file if any."""
    adapter = get_adapter(model)
    source = f" (config {os.fspath(path)})" if path is not None else ""
    if data is not None:
        _warn_family(path, data, adapter, model)
    for i, m in enumerate(methods):
        check_keep(m.keep, adapter.nominal_tokens, m.name, _entry(i, len(methods), path, "keep"))
    session = Session(model, adapter, tuple(methods), evict_early_kv=evict_early_kv)
    try:
        session.install()  # checks every method against the model (layers, probes)
    except ConfigError as err:
        raise type(err)(f"{err}{source}") from None
    return session


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
    """``with vtprune.pruned(model, "random", ratio=0.5): ...`` — pruned inside, restored on exit (also on error).
    Takes what :func:`prune` takes (``config=``, ``evict_early_kv=True``, method keywords)."""
    prune(model, method, **kwargs)
    try:
        yield model
    finally:
        if isinstance(getattr(model, "vtprune", None), Session):
            unprune(model)


__all__ = ["prune", "unprune", "pruned", "method", "list_methods", "list_configs", "load_config"]
