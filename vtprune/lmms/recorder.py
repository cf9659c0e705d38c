"""What the lmms-eval plugin records about each generation: vtprune's token / FLOP / KV stats of its prefill, and
the exception when it fails.

A forward hook on the HF model (``always_call=True``, so it also runs when the forward raises) sees every forward
of ``generate()``; the prefill is the one that gets the images (``pixel_values``, or in transformers 5
``mm_encoder_outputs``: ``generate()`` encodes the images first, through ``get_image_features``, which the
recorder shadows on the instance, as vtprune's session does, to keep their ``pixel_values`` / ``image_sizes``).
The plugin tells the recorder which request runs (``begin``) just before the host class encodes it, so each
record belongs to one ``(task, doc_id)``.

Per request (one prompt, batch of 1), from ``model.vtprune.stats`` (None: unpruned) and
:mod:`vtprune.perf.flops`: visual tokens, kept tokens (after the last cut), layer-averaged equivalent tokens,
prefill FLOPs (vision tower + projector + LLM prefill, analytic) and KV-cache bytes after the prefill (analytic,
at the model's dtype).
"""

from __future__ import annotations

import functools
import sys
import traceback
from dataclasses import asdict, dataclass, field

STAT_KEYS = ("visual_tokens", "kept_tokens", "equivalent_tokens", "prefill_flops", "kv_bytes")

# (task, doc_id) -> the stats of that request's prefill, in this process; the shipped task pack's
# process_results reads them (vtprune.lmms.docs) so that they are metrics of the task in lmms-eval's results.
STATS: dict[tuple[str, int], dict] = {}


@dataclass
class Failure:
    task: str | None
    doc_id: int | None
    error: BaseException
    trace: str


@dataclass
class Recorder:
    """Records of one plugin model; ``handle`` is its forward hook's."""
    current: tuple | None = None
    started: int = 0  # requests begun in the current generate_until
    failures: list = field(default_factory=list)
    handle: object = None
    images: dict = field(default_factory=dict)  # the keywords of the last get_image_features call

    def watch_images(self, model) -> None:
        """Shadow ``model.model.get_image_features`` (call it before ``vtprune.prune``, whose session then wraps
        this wrapper, and unprune leaves it)."""
        original = model.model.get_image_features

        @functools.wraps(original)  # generate() reads its signature to pick the keywords
        def get_image_features(*args, **kwargs):
            self.images = {k: kwargs.get(k) for k in ("pixel_values", "image_sizes")}
            return original(*args, **kwargs)

        model.model.get_image_features = get_image_features

    def attach(self, model) -> None:
        """The forward hook; after ``vtprune.prune``, so that the session has published its stats."""
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True, always_call=True)

    def begin(self, task: str, doc_id: int) -> None:
        self.started += 1
        self.current = (task, doc_id)
        STATS.pop(self.current, None)

    def _hook(self, model, args, kwargs, output):
        error = sys.exc_info()[1] if output is None else None
        if error is not None:  # always_call: the forward raised (the host class will swallow it)
            task, doc = self.current or (None, None)
            trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            self.failures.append(Failure(task, doc, error, trace))
            return None
        images = kwargs.get("pixel_values") is not None or kwargs.get("mm_encoder_outputs")
        if not images or self.current is None:
            return None  # a decode step, or a forward outside a request
        STATS[self.current] = prefill_stats(model, {**self.images, **_given(kwargs)})
        return None


def _given(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if v is not None}


def _inputs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")
            if kwargs.get(k) is not None}


def prefill_stats(model, kwargs: dict) -> dict:
    """The stats of one prefill forward (its keywords ``kwargs``), as :data:`STAT_KEYS`."""
    from ..perf.flops import breakdown, cache_tokens_per_layer, kv_bytes, shape_of

    inputs = _inputs(kwargs)
    session = getattr(model, "vtprune", None)
    stats = getattr(session, "stats", None)
    if stats is not None and stats.images:
        visual, kept, equiv = stats.visual_tokens, stats.kept_tokens, stats.equivalent_tokens
    else:
        stats = None
        visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
        kept, equiv = visual, float(visual)
    out = {"visual_tokens": int(visual), "kept_tokens": int(kept), "equivalent_tokens": float(equiv),
           "prefill_flops": None, "kv_bytes": None}
    if inputs["input_ids"].shape[0] == 1 and "pixel_values" in inputs:  # the analytic counts are per prompt
        dtype_bytes = next(model.parameters()).element_size()
        out["prefill_flops"] = breakdown(model, inputs, stats).prefill
        out["kv_bytes"] = kv_bytes(shape_of(model), cache_tokens_per_layer(model, inputs, stats), dtype_bytes)
    return out


def summarize(records: list[dict]) -> dict:
    """Means over requests of each stat (None where no request had it), and how many requests."""
    out = {"requests": len(records)}
    for key in STAT_KEYS:
        values = [r[key] for r in records if r.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def failure_report(failures: list, started: int, total: int) -> str:
    """The message a failed run ends with: where the first generation raised, and its traceback."""
    first = failures[0]
    where = f"task {first.task}, doc {first.doc_id}" if first.task is not None else "a request"
    return (f"vtprune: a generation raised ({where}; {len(failures)} failure(s) after {started} of {total} "
            f"request(s)). lmms-eval would have scored it as an empty answer, and a method that raises leaves the "
            f"model unpruned, so the run stops here:\n{first.trace}")


__all__ = ["STAT_KEYS", "STATS", "Failure", "Recorder", "prefill_stats", "summarize", "failure_report", "asdict"]
