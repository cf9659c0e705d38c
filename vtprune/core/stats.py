"""What ``model.vtprune.stats`` reports about the last prefill: per image, every stage of every method."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageStats:
    stage: str  # "vision" | "pre_llm" | "llm"
    layer: int | None
    tokens_in: int
    tokens_out: int
    kept_index: list[int]
    method: str = ""
    note: str | None = None  # what the method reports about this stage (e.g. a budget it could not reach)


@dataclass
class ImageStats:
    sample: int
    image: int
    n_tokens: int
    stages: list[StageStats] = field(default_factory=list)
    equivalent_tokens: float = 0.0
    # the same average with an LLM cut before layer K counted from layer K-1 on (the layer that decided it): the
    # official SparseVLM "Equal Tokens" counter (spec sparsevlm_pdrop §1.6); equivalent_tokens counts layer inputs
    equivalent_tokens_post_cut: float = 0.0

    @property
    def kept(self) -> int:
        return self.stages[-1].tokens_out if self.stages else self.n_tokens

    @property
    def kept_index(self) -> list[int]:
        return self.stages[-1].kept_index if self.stages else list(range(self.n_tokens))


@dataclass
class PruneStats:
    """Stats of the last prefill: one :class:`ImageStats` per image (batch order). ``method``: the pipeline's
    method names joined by ``+``. ``evicted_early_kv``: the layers before the last LLM cut had their KV cache
    cut to the final kept tokens after this prefill (``evict_early_kv=True`` and an LLM cut removed tokens).
    ``reports``: method name -> what a modulator reports about this prefill beyond kept visual tokens (ZipVL: its
    per-layer, per-sample kept counts)."""

    method: str
    images: list[ImageStats] = field(default_factory=list)
    llm_layers: int = 0
    evicted_early_kv: bool = False
    reports: dict = field(default_factory=dict)

    @property
    def visual_tokens(self) -> int:
        return sum(i.n_tokens for i in self.images)

    @property
    def kept_tokens(self) -> int:
        return sum(i.kept for i in self.images)

    @property
    def equivalent_tokens(self) -> float:
        """Layer-averaged visual tokens the LLM processed, summed over images."""
        return float(sum(i.equivalent_tokens for i in self.images))

    @property
    def equivalent_tokens_post_cut(self) -> float:
        """The same, counting an LLM cut from the layer before it (SparseVLM's official convention), summed."""
        return float(sum(i.equivalent_tokens_post_cut for i in self.images))

    def finish(self) -> None:
        """Fill every image's layer-averaged token count from its stages."""
        L = self.llm_layers
        for img in self.images:
            counts = [img.n_tokens] * L
            for st in img.stages:
                for layer in range(st.layer if st.stage == "llm" else 0, L):
                    counts[layer] = st.tokens_out
            img.equivalent_tokens = sum(counts) / L if L else float(img.n_tokens)
            post = counts[1:] + counts[-1:]  # layer K-1 already holds what the cut before K kept
            img.equivalent_tokens_post_cut = sum(post) / L if L else float(img.n_tokens)

    def summary(self) -> str:
        return (
            f"{self.method}: {len(self.images)} image(s), visual tokens {self.visual_tokens} -> {self.kept_tokens} "
            f"(layer-averaged equivalent {self.equivalent_tokens:.1f})"
        )
