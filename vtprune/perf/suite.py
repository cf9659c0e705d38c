"""``vtprune perf``: vanilla, the oracle at each budget and every method, timed in one interleaved run.

Each configuration is timed as one greedy ``generate`` of 1 + D tokens per round (a logits processor stamps
every token): prefill = time to the first token, decode ms/token = median gap between later tokens, vision ms =
the vision tower's share of the prefill. Every round runs every configuration once, back to back; even rounds in
setup order, odd rounds reversed (so a method is timed after its oracle in one round and before it in the next,
and a slow drift of the machine cancels out). The first ``warmup`` rounds are not kept.

Derived per configuration, each the median over rounds of the value computed from that round's paired timings
(ms = prefill ms of this configuration in the round, vanilla / oracle(keep) / replay from the same round), never
a ratio of medians; ``<key>_rounds`` keeps the per-round values and ``<key>_q1`` / ``<key>_q3`` their quartiles:
    speedup         vanilla / ms
    oracle_fraction oracle(keep) / ms: the share of the oracle's speed-up reached (:mod:`.oracle`)
    overhead        (ms - oracle(keep)) / vanilla
    replay_fraction, scoring_overhead   the same against the replay of the method's own token schedule (methods
                    that cut inside the vision tower or the LLM; for LLM-input methods the oracle is that replay)
    peer_ratio      peer_ms / ms, with peer_ms the configuration under eager attention with attention outputs
                    requested: what the official code of attention-scored methods pays
    ideal_fraction  speedup / ideal_speedup, with ideal_speedup = vanilla prefill FLOPs / this configuration's
                    prefill FLOPs (:mod:`.flops`, one number)
Machine noise (:func:`machine_noise`): vanilla's own round-to-round spread, interquartile range / median.
KV bytes are measured on the cache tensors after the run (less the D decode positions every layer appended)
and computed from the per-layer token counts (``kv_bytes_analytic``); peak memory is CUDA's max allocated, or
on CPU the process's peak-RSS rise during the configuration's generate.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import traceback
from dataclasses import dataclass, field

import torch

from .. import api
from ..adapters import get_adapter
from ..core.stats import ImageStats, PruneStats, StageStats
from ..methods.base import Cut
from ..registry import make_method, method_class
from . import flops
from . import timing as perf
from .oracle import even_keep, oracle, replay_of
from ..eval.sweep import BenchConfig

__all__ = ["Setup", "Timing", "plan_setups", "run_perf", "round_order", "records", "derive", "machine_noise",
           "DEFAULT_ROUNDS", "NOISE_WARNING"]

# 8 recorded rounds: as many forward as reversed ones; the median of n paired ratios moves by about
# 1.25 * sigma / sqrt(n) = 0.44 sigma, so with a quiet CPU's per-round ratio noise (sigma 2-4 %) two runs agree
# within a few percent, and within 10 points up to sigma ~8 %; more rounds buy little (1 / sqrt(n)) and each costs
# a full round (vanilla is half of it)
DEFAULT_ROUNDS = 8
NOISE_WARNING = 0.10  # vanilla IQR / median above which the table warns


@dataclass
class Setup:
    """One timed configuration. kind: "vanilla" | "oracle" | "method" | "replay"."""

    name: str
    kind: str
    keep: int | None = None
    ratio: float | None = None
    config: BenchConfig | None = None  # methods: what to prune with
    evict: bool = False  # methods: evict_early_kv
    methods: tuple = ()  # replays: the Replay method
    kept: list | None = None  # oracles: per-image kept indices
    of: str | None = None  # replays: the label of the configuration replayed

    @property
    def budget(self) -> str:
        """"@64" (keep), "@r0.5" (ratio) or "" (the method's schedule / file decides)."""
        return f"@{self.keep}" if self.keep is not None else f"@r{self.ratio:g}" if self.ratio is not None else ""

    @property
    def label(self) -> str:
        if self.kind == "vanilla":
            return "vanilla"
        if self.kind == "replay":
            return f"replay[{self.of}]"
        return f"{self.name}{self.budget}" + ("+evict" if self.evict else "")

    @contextlib.contextmanager
    def applied(self, model, input_ids):
        if self.kind == "vanilla":
            yield
        elif self.kind == "oracle":
            with oracle(model, input_ids, self.kept):
                yield
        else:
            methods = self.methods or _methods_of(self.config)
            extra = dict(self.config.options) if self.config is not None else {}
            if self.evict:
                extra["evict_early_kv"] = True
            with api.pruned(model, list(methods), **extra):
                yield


def _methods_of(config: BenchConfig) -> list:
    if config.pipeline:
        return [make_method(m, **dict(kw)) for m, kw in config.pipeline]
    return [make_method(config.method, **config.prune_kwargs())]


@dataclass
class Timing:
    """What the rounds measured for one setup: one entry per recorded round it ran, in round order."""

    prefill: list = field(default_factory=list)
    decode: list = field(default_factory=list)
    vision: list = field(default_factory=list)
    peer: list = field(default_factory=list)
    positions: list = field(default_factory=list)  # its place in each recorded round's running order
    peak: int | None = None
    kv_bytes: int | None = None
    stats: PruneStats | None = None
    error: str | None = None


# ------------------------------------------------------------------------------------------------------------
# setups
def plan_setups(model, inputs: dict, configs: list[BenchConfig], keeps=(), ratios=(), *,
                evict: bool = False) -> list[Setup]:
    """vanilla, the oracle at every keep and ratio, then every configuration (and, with ``evict``, its evicting
    twin for configurations that cut inside the LLM)."""
    from ..budget import tokens_to_keep

    n_tokens = _image_tokens(model, inputs)
    nominal = get_adapter(model).image_nominal  # None on Qwen-VL: keep per image
    setups = [Setup("vanilla", "vanilla")]
    setups += [Setup("oracle", "oracle", keep=k, kept=[even_keep(n, tokens_to_keep(n, None, k, nominal)) for n in n_tokens])
               for k in keeps]
    setups += [Setup("oracle", "oracle", ratio=r, kept=[even_keep(n, tokens_to_keep(n, r, None)) for n in n_tokens])
               for r in ratios]
    for config in configs:
        if config.method is None:
            continue
        name = config.method + _variant(config) + (f"[{config.source}]" if config.source else "")
        setup = Setup(name, "method", keep=config.keep, ratio=config.ratio, config=config)
        setups.append(setup)
        if evict and _cuts_in_llm(model, config):
            setups.append(Setup(setup.name, "method", keep=config.keep, ratio=config.ratio, config=config, evict=True))
    return setups


def _variant(config: BenchConfig) -> str:
    """``(kv_mode=mixed)`` for a point of the method's ``sweep_variants`` (ZipVL's KV modes): they share a budget, so
    the name tells them apart; "" otherwise."""
    fields = {k for v in method_class(config.method).sweep_variants for k in v}
    given = [f"{k}={v}" for k, v in config.hyper if k in fields]
    return f"({','.join(given)})" if given else ""


def _image_tokens(model, inputs: dict) -> list[int]:
    from ..adapters.base import find_runs

    ids = inputs["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError(f"vtprune perf times one prompt at a time; got a batch of {ids.shape[0]}")
    return [n for _, n in find_runs(ids[0], get_adapter(model).image_token_id)]


def _cuts_in_llm(model, config: BenchConfig) -> bool:
    from ..core.plan import model_info

    info = model_info(get_adapter(model))
    return any(c.where == "llm" for m in _methods_of(config) for c in m.cuts(info))


def _oracle_stats(model, inputs: dict, setup: Setup) -> PruneStats:
    """The stats a pre-LLM cut to the oracle's kept sets would report (for its FLOPs and KV bytes)."""
    n_layers = len(get_adapter(model).decoder_layers)
    images = [ImageStats(0, i, n, [StageStats("pre_llm", None, n, len(k), [int(x) for x in k])])
              for i, (n, k) in enumerate(zip(_image_tokens(model, inputs), setup.kept))]
    stats = PruneStats("oracle", images, n_layers)
    stats.finish()
    return stats


# ------------------------------------------------------------------------------------------------------------
# timing
@contextlib.contextmanager
def _vision_clock(model, out: list):
    """Appends the vision tower's wall time (ms) of every call inside the ``with`` to ``out``."""
    import time

    tower = get_adapter(model).vision_tower
    device = perf._device_of(model)
    start = []

    def pre(module, args):
        perf.synchronize(device)
        start.append(time.perf_counter())

    def post(module, args, output):
        perf.synchronize(device)
        out.append((time.perf_counter() - start.pop()) * 1000.0)

    handles = [tower.register_forward_pre_hook(pre), tower.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run_once(model, inputs: dict, setup: Setup, timing: Timing, decode_tokens: int, record: bool) -> None:
    vision: list = []
    device = perf._device_of(model)
    with setup.applied(model, inputs["input_ids"]), perf.PeakMemory(device) as mem, _vision_clock(model, vision):
        clock, out = perf.timed_generate(model, inputs, 1 + decode_tokens)
        stats = getattr(getattr(model, "vtprune", None), "stats", None)
    if timing.stats is None:
        timing.stats = stats if setup.kind != "oracle" else _oracle_stats(model, inputs, setup)
        timing.kv_bytes = perf.kv_cache_bytes(perf._output_cache(out)) - _decode_kv_bytes(model, decode_tokens)
    if record:
        timing.prefill.append(clock.ttft_ms)
        timing.vision.append(sum(vision))
        if clock.step_ms:
            timing.decode.append(statistics.median(clock.step_ms))
        timing.peak = max(timing.peak or 0, mem.peak) if mem.peak is not None else timing.peak
    del out


def _run_peer(model, inputs: dict, setup: Setup, timing: Timing, record: bool) -> None:
    """Prefill of the setup with every attention eager and attention outputs requested (the official codes' way)."""
    with perf.eager_attention(model), setup.applied(model, inputs["input_ids"]):
        clock, out = perf.timed_generate(model, inputs, 1, output_attentions=True)
    if record:
        timing.peer.append(clock.ttft_ms)
    del out


def _decode_kv_bytes(model, decode_tokens: int) -> int:
    shape = flops.shape_of(model)
    return flops.kv_bytes(shape, [decode_tokens] * shape.llm_layers, _element_bytes(model))


def _element_bytes(model) -> int:
    return next(p for p in get_adapter(model).language_model.parameters()).element_size()


def run_perf(model, inputs: dict, setups: list[Setup], *, rounds: int = DEFAULT_ROUNDS, warmup: int = 1,
             decode_tokens: int = 8, peer: bool = True, replays: bool = True, on_step=None) -> dict[str, Timing]:
    """Time every setup (plus, with ``replays``, the replay of each method's token schedule, built from its
    first run and timed right after it) over ``warmup + rounds`` rounds in :func:`round_order`. Returns label ->
    :class:`Timing`; a setup that fails is recorded with its error and left out of later rounds."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    timings = {s.label: Timing() for s in setups}
    setups = list(setups)
    for rnd in range(warmup + rounds):
        record, ran = rnd >= warmup, 0
        for setup in round_order(setups, rnd):
            todo = [setup]
            while todo:
                current = todo.pop()
                if not timings[current.label].error:
                    _time_setup(model, inputs, current, timings[current.label], decode_tokens, record, peer, ran)
                    ran += 1
                if on_step is not None:
                    on_step(rnd, current.label)
                replay = _replay_setup(current, timings[current.label], model) if rnd == 0 and replays else None
                if replay is not None:  # timed right after its method from the first round on
                    setups.insert(setups.index(current) + 1, replay)
                    timings[replay.label] = Timing()
                    todo.append(replay)
    return timings


def round_order(setups: list[Setup], rnd: int) -> list[Setup]:
    """Round ``rnd``'s running order: even rounds in setup order, odd rounds reversed (every pair of
    configurations is timed in both orders, and a linear drift of the machine hits both sides alike)."""
    return list(setups) if rnd % 2 == 0 else list(reversed(setups))


def _time_setup(model, inputs: dict, setup: Setup, timing: Timing, decode_tokens: int, record: bool, peer: bool,
                position: int) -> None:
    try:
        _run_once(model, inputs, setup, timing, decode_tokens, record)
        if peer and setup.kind != "replay":
            _run_peer(model, inputs, setup, timing, record)
    except Exception as err:  # noqa: BLE001 - one failing method must not stop the run
        timing.error = f"{type(err).__name__}: {err}"
        traceback.print_exception(err, file=sys.stderr)  # the row's note is short; the cause keeps its trace
    if record and not timing.error:
        timing.positions.append(position)


def _replay_setup(setup: Setup, timing: Timing, model) -> Setup | None:
    """The replay of a method that cuts inside the vision tower or the LLM (pre-LLM-only methods: the oracle is it;
    evicting twins: the replay of their configuration)."""
    if setup.kind != "method" or setup.evict or timing.error:
        return None
    stats = timing.stats
    if stats is None or all(st.stage == "pre_llm" for img in stats.images for st in img.stages):
        return None
    replay = replay_of(stats, tuple(_methods_of(setup.config)))
    if replay is None:
        return None
    return Setup(setup.name, "replay", keep=setup.keep, ratio=setup.ratio, methods=(replay,), of=setup.label)


# ------------------------------------------------------------------------------------------------------------
# records
def _median(xs):
    return statistics.median(xs) if xs else None


def _quartiles(xs: list) -> tuple:
    """(q1, q3) of ``xs`` (inclusive method: within the observed values); (None, None) when empty."""
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (None, None)
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q3


def derive(rows: list[dict]) -> list[dict]:
    """Fill the derived ratios of every record from the measured fields (also on a saved results.json)."""
    by_label = {r["label"]: r for r in rows}
    for r in rows:
        _derive(r, by_label.get("vanilla"), by_label)
    return rows


def records(model, inputs: dict, setups: list[Setup], timings: dict[str, Timing]) -> list[dict]:
    """One record per timed configuration (results.json), with the derived ratios."""
    shape = flops.shape_of(model)
    rows = []
    for label in _ordered(setups, timings):
        setup = next((s for s in setups if s.label == label), None)
        kind = setup.kind if setup is not None else "replay"
        rows.append(_record(model, inputs, shape, label, kind, setup, timings[label]))
    return derive(rows)


def _ordered(setups: list[Setup], timings: dict) -> list[str]:
    """Labels in setup order, each replay right after the configuration it replays."""
    out = []
    for s in setups:
        out.append(s.label)
        if f"replay[{s.label}]" in timings:
            out.append(f"replay[{s.label}]")
    return out + [label for label in timings if label not in out]


def _record(model, inputs, shape, label, kind, setup, t: Timing) -> dict:
    fl = flops.breakdown(model, inputs, t.stats) if t.stats is not None or kind == "vanilla" else None
    tokens = flops.cache_tokens_per_layer(model, inputs, t.stats) if fl is not None else None
    prefill = t.prefill
    q1, q3 = _quartiles(prefill)
    return {
        "label": label,
        "name": "replay" if kind == "replay" else setup.name,
        "kind": kind,
        "replays": None if kind != "replay" else label[len("replay["):-1],
        "keep": None if setup is None else setup.keep,
        "ratio": None if setup is None else setup.ratio,
        "evict_early_kv": bool(setup.evict) if setup is not None else False,
        "visual_tokens": None if t.stats is None else t.stats.kept_tokens,
        "equivalent_tokens": None if t.stats is None else t.stats.equivalent_tokens,
        "prefill_ms": _median(prefill),
        "prefill_ms_min": min(prefill) if prefill else None,
        "prefill_ms_max": max(prefill) if prefill else None,
        "prefill_ms_q1": q1,
        "prefill_ms_q3": q3,
        "prefill_ms_rounds": prefill,
        "round_positions": t.positions,
        "vision_ms": _median(t.vision),
        "vision_ms_rounds": t.vision,
        "decode_ms_per_token": _median(t.decode),
        "decode_ms_rounds": t.decode,
        "peer_ms": _median(t.peer),
        "peer_ms_rounds": t.peer,
        "peak_memory_bytes": t.peak,
        "kv_bytes": t.kv_bytes,
        "kv_bytes_analytic": _analytic_kv_bytes(model, shape, tokens, t.stats),
        "flops": None if fl is None else fl.to_dict(),
        "token_ratio": _reported(t.stats, "token_ratio"),  # a layer-wise sparsifier's (ZipVL's) own report
        "attention_flop_reduction": _reported(t.stats, "attention_flop_reduction"),
        "error": t.error,
    }


def _analytic_kv_bytes(model, shape, tokens, stats: PruneStats | None) -> int | None:
    """The KV cache after the prefill, analytic: a method's own KV store where it reports its size (ZipVL's packed
    or evicted layers, ``report.kv_bytes``), else the dense cache of ``tokens`` per layer."""
    if tokens is None:
        return None
    element_bytes = _element_bytes(model)
    store_size = _reported(stats, "kv_bytes")
    nbytes = None if store_size is None else store_size(shape.kv_heads, shape.head_dim, element_bytes)
    return nbytes if nbytes is not None else flops.kv_bytes(shape, tokens, element_bytes)


def _reported(stats: PruneStats | None, key: str):
    """``key`` (a number or a method) of the first method report of the prefill that has it
    (``PruneStats.reports``), else None."""
    for report in (stats.reports.values() if stats is not None else ()):
        if getattr(report, key, None) is not None:
            return getattr(report, key)
    return None


def _derive(r: dict, vanilla: dict | None, by_label: dict) -> None:
    """Each ratio of ``r`` from its per-round values, each computed from one round's paired prefill ms."""
    budget = f"@{r['keep']}" if r["keep"] is not None else f"@r{r['ratio']:g}" if r["ratio"] is not None else None
    keep_oracle = by_label.get(f"oracle{budget}") if budget else None
    replay = by_label.get(f"replay[{r['label'].removesuffix('+evict')}]")  # an evicting twin: same prefill
    sched = replay if replay else keep_oracle if r["kind"] == "method" else None
    ms, v, o, s = (_rounds(x) for x in (r, vanilla, keep_oracle, sched))
    flops_total, base_flops = _prefill_flops(r), _prefill_flops(vanilla)
    r["ideal_speedup"] = ideal = base_flops / flops_total if flops_total and base_flops else None
    per_round = {
        "speedup": _paired(lambda m, b: b / m, ms, v),
        "ideal_fraction": _paired(lambda m, b: b / m / ideal, ms, v) if ideal else [],
        "oracle_fraction": _paired(lambda m, x: x / m, ms, o),
        "overhead": _paired(lambda m, x, b: (m - x) / b, ms, o, v),
        "replay_fraction": _paired(lambda m, x: x / m, ms, s),
        "scoring_overhead": _paired(lambda m, x, b: (m - x) / b, ms, s, v),
        "peer_ratio": _paired(lambda p, m: p / m, r.get("peer_ms_rounds") or [], ms),
    }
    for key, values in per_round.items():
        q1, q3 = _quartiles(values)
        r.update({key: _median(values), f"{key}_q1": q1, f"{key}_q3": q3, f"{key}_rounds": values})


def _rounds(r: dict | None) -> list:
    """A record's per-round prefill ms; none for a missing or failed configuration (no ratio against it)."""
    return [] if r is None or r.get("error") else list(r.get("prefill_ms_rounds") or [])


def _paired(fn, *series) -> list:
    """``fn`` of each round's values (round i of every series: all start at the first recorded round, a failed
    setup's stop early); empty when a series is."""
    if not all(series):
        return []
    return [fn(*xs) for xs in zip(*series)]


def machine_noise(rows: list[dict]) -> dict | None:
    """Vanilla's own round-to-round prefill spread: ``iqr`` = interquartile range / median (the warning's
    measure: one slow round moves no paired median, a busy machine moves many) and ``range`` = (max - min) /
    median. None without a vanilla record that has rounds."""
    vanilla = next((r for r in rows if r["kind"] == "vanilla"), None)
    ms = _rounds(vanilla)
    if not ms:
        return None
    mid, (q1, q3) = statistics.median(ms), _quartiles(ms)
    iqr = (q3 - q1) / mid
    return {"measure": "vanilla prefill ms, interquartile range / median over rounds", "iqr": iqr,
            "range": (max(ms) - min(ms)) / mid, "rounds": len(ms), "threshold": NOISE_WARNING,
            "warning": iqr > NOISE_WARNING}


def _prefill_flops(r: dict | None) -> float | None:
    f = (r or {}).get("flops")
    return f["vision"] + f["projector"] + f["llm_prefill"] if f else None
