"""``lmms-eval --model vtprune``: lmms-eval's own chat class for the checkpoint, pruned with ``vtprune.prune``
right after it loads the model (serving_eval.md §3.4). lmms-eval's prompt building and ``generate`` call run
unchanged; vtprune adds three things:

* ``--model_args`` are split and checked (:mod:`.args`) before anything is loaded: a bad method, field or budget
  is one error line and exit status 2;
* a generation that raises fails the run (status 1, with the first traceback): the chat classes catch every
  generation exception and score an empty answer, which would silently lower the score;
* each request's token / FLOP / KV stats (:mod:`.recorder`) go into its logged sample's ``token_counts``
  (``--log_samples``) and, for the shipped task pack, into the task's metrics; a per-task summary is logged.
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from dataclasses import dataclass, field

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger

from .args import PluginExit, check_prune_args, split_args, usage_error
from .recorder import STATS, Recorder, failure_report, summarize

# checkpoint model_type -> lmms-eval chat class that loads it (and has a vtprune adapter)
HOSTS = {
    "llava": "lmms_eval.models.chat.llava_hf:LlavaHf",
    "llava_next": "lmms_eval.models.chat.llava_hf:LlavaHf",
    "internvl": "lmms_eval.models.chat.internvl_hf:InternVLHf",
}


@dataclass
class VtpruneTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus vtprune's stats of the prefill (keys ``vtprune_<stat>``)."""
    vtprune: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**super().to_dict(), **{f"vtprune_{k}": v for k, v in self.vtprune.items()}}


def _model_type(pretrained) -> str:
    from transformers import AutoConfig

    if pretrained is None:
        raise usage_error("give pretrained=<checkpoint folder> (the plugin never downloads a default model)")
    try:
        return AutoConfig.from_pretrained(pretrained).model_type
    except (OSError, ValueError) as err:
        raise usage_error(f"pretrained={pretrained}: cannot read its config ({str(err).splitlines()[0]})") from None


def host_class(model_type: str):
    if model_type not in HOSTS:
        raise usage_error(f"model_type {model_type!r} has no lmms-eval class with a vtprune adapter; "
                          f"supported: {', '.join(sorted(HOSTS))}")
    module, name = HOSTS[model_type].split(":")
    return getattr(importlib.import_module(module), name)


_PLUGIN_CLASSES: dict = {}


def plugin_class(host):
    """The plugin subclass of the lmms-eval class ``host`` (one per host)."""
    if host not in _PLUGIN_CLASSES:
        _PLUGIN_CLASSES[host] = type(f"Vtprune{host.__name__}", (PluginMixin, host),
                                     {"is_simple": False, "vtprune_host": host})
    return _PLUGIN_CLASSES[host]


class Vtprune(lmms):
    """The class the ``vtprune`` manifest names: it builds the plugin subclass of the checkpoint's lmms-eval
    class (``HOSTS``) instead of itself."""

    is_simple = False

    def __new__(cls, pretrained=None, **kwargs):
        host = host_class(_model_type(pretrained))
        return plugin_class(host)(pretrained=pretrained, **kwargs)

    def loglikelihood(self, requests):  # never reached: __new__ returns the plugin subclass
        raise NotImplementedError

    generate_until = generate_until_multi_round = loglikelihood


def _default_device(host_kwargs: dict) -> None:
    """The host's ``device`` default is ``cuda`` and ``device_map=""`` is refused by transformers 5.24
    (serving_eval.md §3.1): default both to vtprune's device choice (this process's GPU under accelerate)."""
    from ..loading import resolve_device

    if "device" not in host_kwargs:
        device = resolve_device("auto")
        if device.type == "cuda":
            from accelerate import PartialState

            device = f"cuda:{PartialState().local_process_index}"
        host_kwargs["device"] = str(device)
    host_kwargs.setdefault("device_map", str(host_kwargs["device"]))


class PluginMixin:
    """Put before an lmms-eval chat class (:func:`plugin_class`): prune after loading, record each request."""

    def __init__(self, pretrained=None, **kwargs):
        prune_args, host_kwargs = split_args(kwargs, self.vtprune_host)
        check_prune_args(prune_args)  # before any weights or data are loaded
        _default_device(host_kwargs)
        super().__init__(pretrained=pretrained, **host_kwargs)
        self.vtprune_args = prune_args
        self._vtp_recorder = Recorder()
        self._vtp_recorder.watch_images(self.model)
        if prune_args.prunes:
            self._prune(prune_args)
        self._vtp_recorder.attach(self.model)
        eval_logger.info(f"vtprune: {pretrained} {prune_args.describe()}")

    def _prune(self, args) -> None:
        from ..api import prune
        from ..errors import PruneError

        try:
            prune(self.model, args.method, config=args.config, evict_early_kv=args.evict_early_kv, **args.fields)
        except PruneError as err:  # what only the model can tell (a layer beyond its depth, missing routers)
            raise usage_error(str(err)) from None

    def generate_until(self, requests):
        """The host's answers, each request tracked; raises :class:`PluginExit` if any generation raised."""
        recorder = self._vtp_recorder
        recorder.failures, recorder.started = [], 0
        saved = [r.arguments for r in requests]
        for r in requests:
            r.arguments = _tracked(r, recorder, len(requests))
        try:
            results = super().generate_until(requests)
        finally:
            for r, arguments in zip(requests, saved):
                r.arguments = arguments
        _check_failures(recorder, requests, results)
        _log_summary(requests)
        return [_with_stats(r, res) for r, res in zip(requests, results)]


def _tracked(request, recorder: Recorder, total: int) -> tuple:
    """The request's arguments with its ``doc_to_messages`` telling the recorder which request runs (the chat
    classes call it right before encoding that request, outside their try block); after a failure it stops the
    run there (vtprune has unpruned the model, so the answers left would be unpruned ones)."""
    args = request.args
    if len(args) < 2 or not callable(args[1]):
        return request.arguments
    inner, key = args[1], (request.task_name, request.doc_id)

    def doc_to_messages(*a, **kw):
        if recorder.failures:
            raise PluginExit(failure_report(recorder.failures, recorder.started, total), 1)
        recorder.begin(*key)
        return inner(*a, **kw)

    return (args[0], doc_to_messages, *args[2:])


def _failed(result) -> bool:
    """The chat classes answer a generation that raised with an empty text and no token counts."""
    return isinstance(result, GenerationResult) and result.text == "" and result.token_counts is None


def _check_failures(recorder: Recorder, requests, results) -> None:
    failures = list(recorder.failures)
    silent = sum(_failed(r) for r in results) - len(failures)
    if not failures and silent <= 0:
        return
    if not failures:
        raise PluginExit(f"vtprune: {silent} of {len(requests)} generation(s) failed outside the model's forward "
                         f"(empty answer, no tokens); see the host's 'Error ... in generating' log lines", 1)
    raise PluginExit(failure_report(failures, recorder.started, len(requests)), 1)


def _log_summary(requests) -> None:
    by_task = defaultdict(list)
    for r in requests:
        if (r.task_name, r.doc_id) in STATS:
            by_task[r.task_name].append(STATS[(r.task_name, r.doc_id)])
    for task, records in by_task.items():
        s = summarize(records)
        flops = "-" if s["prefill_flops"] is None else f"{s['prefill_flops'] / 1e9:.4g}"
        kv = "-" if s["kv_bytes"] is None else f"{s['kv_bytes'] / 2**20:.4g}"
        eval_logger.info(f"vtprune {task}: {s['requests']} requests, visual tokens {s['visual_tokens']:.1f} -> "
                         f"kept {s['kept_tokens']:.1f}, equivalent {s['equivalent_tokens']:.1f}, prefill "
                         f"{flops} GFLOPs, KV {kv} MiB (means per request)")


def _with_stats(request, result):
    stats = STATS.get((request.task_name, request.doc_id))
    if stats is None or not isinstance(result, GenerationResult):
        return result
    tc = result.token_counts or TokenCounts()
    counts = VtpruneTokenCounts(tc.input_tokens, tc.output_tokens, tc.reasoning_tokens, vtprune=dict(stats))
    return GenerationResult(text=result.text, token_counts=counts)
