"""VAR, Visual Attention Redistribution ("See What You Are Told", ICLR 2025), spec §1.3-1.6.

Sinks: at the prefill, for every modulated layer l, token j of a sample is a sink when
phi(x_j) = max over the sink dims d of |x_jd| / RMS(x_j) > ``tau`` (strict, as the code), x_j being the residual
stream entering layer l. Per (head, query) row A of layer l's attention: image mass a_img = sum over the image
keys; visual non-sink ratio r = sum over the non-sink image keys / a_img; the row is image-centric when
a_img >= ``min_image_mass`` and r >= ``rho``, the query is a text token after the sample's last image (at the
prefill; the new token in decode steps) and the layer has a visual sink. Selected rows give a fraction ``p`` of
the attention on every sink (text sinks too) to the non-sink image keys, in proportion to their attention:
A'[sink] = (1 - p) A[sink], A'[j] = A[j] (1 + p s / a) (s = sink mass, a = non-sink image mass); rows still sum to 1.

``rho`` and ``p`` are in the **paper's** conventions (rho = minimum visual non-sink ratio, p = fraction recycled);
the released code's are 1 - those (issue seilk/VisAttnSink#5): its ``rho: 0.5, p: 0.6`` are our rho 0.5, p 0.4.
Applied as the exact logit-space bias of spec §1.6 step 5 (log(1 - p) on sink columns, log(1 + p s / a) on the
non-sink image columns) through the model's own attention; unselected rows come from the plain call, so they are
the model's own. ``layers``: default 2..L-2 (the paper excludes the last layer; the code's also modifies it:
pass it). Images are the visual slots of each layer's layout, so VAR works after any pruning cut.
``sink_dims``: default the known set of the model's LLM backbone (``SINK_DIMS``, keyed by the text model's type
and shape); other models: ``vtprune calibrate-sinks`` / :func:`find_sink_dims`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.probes import Residual
from ..errors import ConfigError
from ..core.registration import register
from ..space import Float, tuned
from .base import Method

# LLM backbone "type:hidden x layers x ffn" -> sink dimensions (spec §1.5)
SINK_DIMS = {
    "llama:4096x32x11008": (1415, 2533),  # LLaMA-2-7B / Vicuna-7B v1.5 (LLaVA-1.5-7B, LLaVA-NeXT-Vicuna-7B)
    "llama:5120x40x13824": (2100, 4743),  # LLaMA-2-13B / Vicuna-13B (LLaVA-1.5-13B, LLaVA-1.6-Vicuna-13B)
    "qwen2:3584x28x18944": (458, 2570),  # Qwen2-7B (Qwen2-VL-7B)
    "internlm2:4096x32x14336": (3584,),  # InternLM2-7B (InternVL2-8B)
}


def sink_ratio(hidden: torch.Tensor, dims) -> torch.Tensor:
    """[..., D] -> [...]: phi = max over ``dims`` of |x_d| / RMS(x) (RMS with eps 1e-6, as the code)."""
    x = hidden.float()
    rms = x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    return (x[..., list(dims)].abs() / rms).amax(-1)


@register
@dataclass
class VAR(Method):
    tau: float = tuned(20.0, Float(2.0, 40.0, log=True))
    rho: float = tuned(0.5, Float(0.0, 1.0))
    p: float = tuned(0.4, Float(0.0, 0.95))
    min_image_mass: float = tuned(0.2, Float(0.0, 0.5))
    sink_dims: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None

    name: ClassVar[str] = "var"
    description: ClassVar[str] = "Moves attention from visual sink tokens to the rest of the image in image-centric heads."
    has_budget: ClassVar[bool] = False
    prunes: ClassVar[bool] = False

    def check_fields(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise self.field_error("p", "a fraction in [0, 1) of the sink attention recycled (paper convention)")
        if not 0.0 <= self.rho <= 1.0:
            raise self.field_error("rho", "a fraction in [0, 1]: minimum visual non-sink ratio (paper convention)")
        if not 0.0 <= self.min_image_mass <= 1.0:
            raise self.field_error("min_image_mass", "a fraction in [0, 1] of a row's attention on the image")
        if self.tau <= 0:
            raise self.field_error("tau", "a threshold > 0 on max |x_d| / RMS(x)")

    def setup(self, model) -> None:
        dims = self.sink_dims if self.sink_dims is not None else SINK_DIMS.get(model.backbone)
        if dims is None:
            raise ConfigError(
                f"vtprune: var has no known sink dimensions for this LLM ({model.backbone}); pass sink_dims=(...) "
                "(find them with `vtprune calibrate-sinks --model ...`)"
            )
        bad = [d for d in dims if not 0 <= d < model.hidden_size]
        if bad or not dims:
            raise self.field_error("sink_dims", f"hidden dimensions in 0..{model.hidden_size - 1}")
        self._dims = tuple(dims)

    def cuts(self, model):
        return ()

    def modulated_layers(self, model):
        return self.layers if self.layers is not None else tuple(range(2, model.llm_layers - 1))

    def probes(self, model):
        return tuple(Residual(l) for l in self.modulated_layers(model))

    def sinks(self, call) -> torch.Tensor:
        """[B, T] sink keys of this layer: found at the prefill (kept per original position, so decode steps map
        them onto the layout the layer's cache holds, also after ``evict_early_kv``); generated tokens never are."""
        key = ("sinks", call.layer)
        if key not in call.shared:
            hidden, layout = call.records[Residual(call.layer)]  # layout: this layer's, as call.layout here
            call.shared[key] = call.to_positions((sink_ratio(hidden, self._dims) > self.tau) & layout.valid)
        return call.from_positions(call.shared[key])

    def modulate(self, call):
        if call.visual is None or self.p == 0.0:
            return None
        sink, visual = self.sinks(call)[:, None, None, :], call.visual[:, None, None, :]
        probs = call.probs()  # [B, H, q, T]
        image = (probs * visual).sum(-1)
        rest = visual & ~sink
        a = (probs * rest).sum(-1)
        B, _, q, T = probs.shape
        slots = torch.arange(T, device=probs.device)
        last_image = torch.where(call.visual, slots, torch.full_like(slots, -1)).amax(1)  # [B]
        after = torch.arange(T - q, T, device=probs.device)[None] > last_image[:, None]  # [B, q]
        has_sink = (sink & visual).flatten(1).any(1)  # [B]
        selected = ((image >= self.min_image_mass) & (a >= self.rho * image) & (a > 0)
                    & after[:, None, :] & has_sink[:, None, None])
        if not bool(selected.any()):
            return None
        s = (probs * sink).sum(-1)
        grow = torch.log1p(self.p * s / a.clamp_min(1e-30))[..., None]
        bias = torch.where(sink, math.log(1.0 - self.p), torch.where(rest, grow, torch.zeros_like(grow)))
        bias = torch.where(selected[..., None], bias, torch.zeros_like(bias))
        return call.run_rows(selected, bias=bias)  # eager: the redistributed probabilities on selected rows


def find_sink_dims(model, batches, tau: float = 20.0, top: int = 4, min_share: float = 0.5) -> list[int]:
    """Hidden dimensions with massive activations on sink tokens: over ``batches`` (model inputs, e.g. from the
    processor), at the residual stream entering layers 2..L-1, the dims whose |x_d| / RMS(x) exceeds ``tau`` at a
    token, ranked by how many prompts show them; the dims found in at least ``min_share`` of the prompts (at
    most ``top``). Empty when the model has no massive activations."""
    from ..adapters import get_adapter

    layers = get_adapter(model).decoder_layers
    seen: dict[int, int] = {}
    prompts = 0
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch, output_hidden_states=True).hidden_states[2:len(layers)]
            valid = batch.get("attention_mask")
            for b in range(batch["input_ids"].shape[0]):
                prompts += 1
                dims = set()
                for h in hidden:
                    x = h[b].float() if valid is None else h[b][valid[b].bool()].float()  # padding is no token
                    ratio = x.abs() / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()  # [T, D]
                    dims |= set(torch.nonzero(ratio > tau)[:, 1].tolist())
                for d in dims:
                    seen[d] = seen.get(d, 0) + 1
    ranked = sorted(seen, key=lambda d: (-seen[d], d))
    return sorted(d for d in ranked[:top] if seen[d] >= min_share * max(prompts, 1))
