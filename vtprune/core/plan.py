"""The plan of a pipeline: every method's cut points, probes and modulated layers, merged and validated against
the model once, at ``prune()`` time. The stage runners only read the plan; they never ask which method runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError, PruneError
from ..methods.base import Cut, Method, ModelInfo
from .probes import FeatureLayer, Probe, VisionAttentionMap, VisionCLS


@dataclass(frozen=True)
class Step:
    """One method acting at one cut point; ``slot`` is its place in the pipeline (keys its per-forward state)."""

    slot: int
    method: Method
    cut: Cut


@dataclass
class Plan:
    info: ModelInfo
    methods: tuple[Method, ...]
    vision: dict[int, list[Step]] = field(default_factory=dict)  # vision layer -> steps cutting before it
    pre_llm: list[Step] = field(default_factory=list)
    llm: dict[int, list[Step]] = field(default_factory=dict)  # LLM layer -> steps cutting before it
    probes: list[Probe] = field(default_factory=list)  # merged: equal probes attach once
    declared: dict[int, frozenset] = field(default_factory=dict)  # slot -> the probes that method may read
    modulators: dict[int, list[tuple[int, Method]]] = field(default_factory=dict)  # LLM layer -> (slot, method)

    @property
    def name(self) -> str:
        return "+".join(m.name for m in self.methods)

    @property
    def active(self) -> bool:
        """Whether anything is cut, observed or modulated (False for ratio 0 everywhere)."""
        return bool(self.vision or self.pre_llm or self.llm or self.probes or self.modulators)

    @property
    def vision_step(self) -> Step | None:
        """The first vision-cutting step: its method owns the LLM-input cut implied by the vision cuts."""
        return next((s for layer in sorted(self.vision) for s in self.vision[layer]), None)


def model_info(adapter) -> ModelInfo:
    return ModelInfo(family=adapter.family, vision_layers=len(adapter.vision_layers),
                     feature_layer=adapter.vision_feature_layer, llm_layers=len(adapter.decoder_layers),
                     nominal_tokens=adapter.nominal_tokens,
                     hidden_size=int(adapter.language_model.config.hidden_size),
                     name_or_path=str(getattr(adapter.config, "_name_or_path", "") or ""),
                     backbone=_backbone(adapter.language_model.config), vision_cuts=adapter.vision_cuts)


def _backbone(config) -> str:
    return (f"{config.model_type}:{config.hidden_size}x{config.num_hidden_layers}x"
            f"{getattr(config, 'intermediate_size', 0)}")


def build_plan(methods: tuple[Method, ...], info: ModelInfo) -> Plan:
    """Validate every method against the model (also at ratio 0) and merge what they declare."""
    plan = Plan(info=info, methods=methods)
    previous: tuple[Method, Cut] | None = None  # the latest cut of the methods so far
    readers: list[tuple[Method, Probe]] = []  # methods so far that read the full patch grid outside the tower
    for slot, method in enumerate(methods):
        try:
            cuts, probes, layers = _declared(method, info)
        except PruneError as err:  # the layers come from the method's fields: name them, they are what to change
            settings = method.layer_settings()
            raise ConfigError(str(err) if settings in str(err) else f"{err} (from {method.name} {settings})") from None
        _check_vision_cuts(method, cuts, probes, info)
        if cuts and previous is not None and min(c.order for c in cuts) < previous[1].order:
            first = min(cuts, key=lambda c: c.order)
            raise PruneError(
                f"vtprune: pipeline order: {method.name} cuts at {first}, before {previous[0].name}'s cut at "
                f"{previous[1]} listed ahead of it; each method must cut at or after the methods before it "
                f"(the forward runs vision -> LLM input -> LLM layers), so list {method.name} earlier"
            )
        reads = _full_grid_probe(cuts, probes, layers)
        _check_full_grid(plan, method, reads, cuts, readers)
        if reads is not None:
            readers.append((method, reads))
        method.setup(info)
        if cuts:
            previous = (method, max(cuts, key=lambda c: c.order))
        if method.is_noop:
            continue  # ratio 0: validated, but nothing is cut and nothing is computed
        _add(plan, slot, method, cuts, probes, layers)
    return plan


def _declared(method: Method, info: ModelInfo) -> tuple[tuple, tuple, tuple]:
    """The cuts, probes and modulated layers ``method`` declares for this model, each checked against it."""
    cuts = tuple(method.cuts(info))
    probes = tuple(method.probes(info))
    layers = tuple(method.modulated_layers(info))
    if not (cuts or layers):
        raise PruneError(f"vtprune: {method.name} declares no cut and no modulated layer, so it would do nothing")
    for cut in cuts:
        _check_cut(method, cut, info)
    for probe in probes:
        probe.check(info)
    for layer in layers:
        if not 0 <= layer < info.llm_layers:
            raise PruneError(f"vtprune: {method.name} modulates LLM layer {layer}; the model has 0..{info.llm_layers - 1}")
    return cuts, probes, layers


def _add(plan: Plan, slot: int, method: Method, cuts, probes, layers) -> None:
    for cut in sorted(set(cuts), key=lambda c: c.order):
        step = Step(slot, method, cut)
        if cut.where == "vision":
            plan.vision.setdefault(cut.layer, []).append(step)
        elif cut.where == "pre_llm":
            plan.pre_llm.append(step)
        else:
            plan.llm.setdefault(cut.layer, []).append(step)
    for probe in probes:
        if probe not in plan.probes:
            plan.probes.append(probe)
    plan.declared[slot] = frozenset(probes)
    for layer in layers:
        before = plan.modulators.setdefault(layer, [])
        rewriter = next((m for _, m in before if m.rewrites_attention), None)
        if rewriter is not None:
            raise PruneError(f"vtprune: {method.name} modulates LLM layer {layer} after {rewriter.name}, which computes "
                             f"that layer's attention on other tokens; list {method.name} before {rewriter.name}")
        before.append((slot, method))


def _check_vision_cuts(method: Method, cuts, probes, info: ModelInfo) -> None:
    """Models whose vision tower has no per-crop [crops, 1+n, D] sequence (Qwen-VL packs every image's patches in
    one window-permuted run, without CLS) offer no vision cut and no vision probe: refuse at ``prune()``."""
    if info.vision_cuts:
        return
    inside = next((f"cuts at {c}" for c in cuts if c.where == "vision"), None)
    inside = inside or next((f"reads {p}" for p in probes if p.scope == "vision" and getattr(p, "needs_crops", True)),
                            None)
    if inside is not None:
        raise PruneError(
            f"vtprune: {method.name} {inside}, inside the vision tower, which {info.family} does not offer (its "
            "tower packs every image's patches in one sequence, with no per-crop [crops, 1+n, D] layout and no CLS "
            "token); use a method that scores at the LLM input or inside the LLM (README: \"Qwen-VL\")"
        )


def _check_cut(method: Method, cut: Cut, info: ModelInfo) -> None:
    if cut.where == "vision" and not 0 < cut.layer <= info.feature_layer:
        raise PruneError(
            f"vtprune: {method.name} cuts before vision layer {cut.layer}; use a layer in 1..{info.feature_layer} "
            f"(the model reads features after layer {info.feature_layer} of 0..{info.vision_layers - 1})"
        )
    if cut.where == "llm" and not 0 < cut.layer < info.llm_layers:
        raise PruneError(
            f"vtprune: {method.name} cuts before LLM layer {cut.layer}, but the model has layers "
            f"0..{info.llm_layers - 1}; use a layer in 1..{info.llm_layers - 1}"
        )


def _full_grid_probe(cuts, probes, layers) -> Probe | None:
    """The first probe that maps the tower's full patch grid onto tokens, when the method reads it outside the
    tower (an LLM-input or LLM-layer cut, or a modulated LLM layer); None otherwise."""
    reads_grid = [p for p in probes if isinstance(p, (FeatureLayer, VisionCLS, VisionAttentionMap))]
    outside = bool(layers) or any(c.where != "vision" for c in cuts)
    return reads_grid[0] if reads_grid and outside else None


def _check_full_grid(plan: Plan, method: Method, reads: Probe | None, cuts, readers) -> None:
    """Full-grid views and cuts inside the vision tower exclude each other whatever the list order: a reader acts
    after every vision cut (a modulator's LLM layers run after the tower even when it is listed first)."""
    if reads is not None and plan.vision:
        cutter = plan.vision_step.method.name
        raise PruneError(
            f"vtprune: {method.name} reads the vision tower's full patch grid ({reads}), but {cutter} "
            f"already cuts patches inside the tower, so the grid is gone by then; run {method.name} without it"
        )
    if readers and not method.is_noop and any(c.where == "vision" for c in cuts):
        reader, probe = readers[0]
        raise PruneError(
            f"vtprune: {method.name} cuts patches inside the vision tower, but {reader.name}, listed before it, reads "
            f"the tower's full patch grid ({probe}) after the tower has run, when the cut patches are gone, wherever "
            f"it is listed; run {reader.name} without {method.name}"
        )
