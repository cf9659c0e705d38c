"""CDPruner (Zhang et al., NeurIPS 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity for
Token Pruning in MLLMs"), spec §4.

Algorithm (official ``llava_arch.py`` ``encode_images``, spec §4.2-4.3), per image before the LLM:
1. similarity S = cosine of the projector outputs (the LLM input rows of the image);
2. relevance: the image's CLIP joint-space patch embeddings (the projector inputs through CLIP's
   ``post_layernorm`` and ``visual_projection``) against the CLIP text embeddings of the instruction,
   rho_i = mean_m cos(u_i, t_m), **negated** as the official code (``negate``), then min-max normalised per image
   (r = (rho - min + 1e-6) / (max - min));
3. kernel L = diag(r) S diag(r); fast greedy MAP (Cholesky-style updates) for exactly T picks: each pick has the
   largest d^2 = det(L_{Y+j}) / det(L_Y); kept tokens go to the LLM in original order, renumbered.

Where we differ, on purpose: relevance min-max is per image (the code's spans the whole batch); the greedy stops
updating once every d^2 is rounding noise (``D2_FLOOR``, relative; the code runs on into NaN rows) and fills the rest of T by relevance
(ties: lower index); computation is fp32 (the code normalises in fp16); the kernel is built whole only up to
``FULL_KERNEL_MAX`` tokens, above that its rows are computed as picked (O(T N) memory; the same picks).

Relevance sources. ``relevance="clip"`` (default, official): the CLIP text tower and visual projection are not in
llava-hf checkpoints; ``clip=`` names a local CLIP checkpoint directory (``CLIPModel`` with its tokenizer, e.g.
openai/clip-vit-large-patch14-336 downloaded), loaded offline at ``prune()``. Its vision width must equal the
projector input (a CLIP tower): elsewhere use ``relevance="llm"``, the Qwen-port convention (instruction rows of
the LLM input embeddings against the projector outputs, not negated). The instruction is ``instruction=`` or the
prompt's tokens after the sample's last image, decoded with the model's tokenizer (``tokenizer=`` a directory,
default the model's own folder), with the ``strip`` strings removed (the benchmarks' answer-format sentences, as
the official eval, and chat-template tails). Long instructions are cut into CLIP-context segments (77 tokens,
zero-padded) whose embeddings are averaged, as the code. No instruction tokens: r = 1 (plain diversity).

LLaVA-NeXT, ``anyres="per_crop"`` (default, official): T = ``keep`` (per 576-patch crop) or ``ratio`` per crop,
each crop (base + grid) selected on all its patches, relevance normalised over the image's crops jointly. The
code runs NeXT without unpadding; we keep the model's unpadding: picks in regions the model unpads away have no
token and are lost, newline tokens are kept (so official NeXT numbers used another layout).
``anyres="global"``: one selection over the packed image, newlines included (no CLIP embedding: r = 0).

Qwen-VL (no CLIP tower, no per-crop sequence): ``relevance="llm"`` only (``"clip"`` is refused at ``prune()``);
similarity and relevance both come from the LLM input rows, one selection per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..budget import tokens_to_keep
from ..core.probes import FeatureLayer, Instruction
from ..core.registration import register
from ..errors import ConfigError, PruneError
from ..space import Choice, tuned
from .base import ImageView, Method, Selection

FULL_KERNEL_MAX = 4096  # tokens: above, L's rows are computed as picked (a whole N x N fp32 kernel would be > 64 MiB)
D2_FLOOR = 1e-10  # d^2 at or below this x max diag(L) (or the dtype's eps x N): rank exhausted, the update would divide by ~0
STRIP = ("Answer the question using a single word or phrase.",
         "Answer with the option's letter from the given choices directly.",
         "ASSISTANT:", "[/INST]", "<|im_start|>assistant", "<|im_end|>", "<|assistant|>")
RELEVANCE = ("clip", "llm")
ANYRES_MODES = ("per_crop", "global")


def dpp_greedy(x: torch.Tensor, r: torch.Tensor, k: int, full_max: int = FULL_KERNEL_MAX):
    """Fast greedy MAP on L = diag(r) (x x^T) diag(r), x [n, D] unit rows, r [n] -> (picks [k] in pick order,
    d2 [k] each pick's d^2 at selection; their product is det(L_Y) while every update ran)."""
    n, k = x.shape[0], max(0, min(int(k), x.shape[0]))
    full = r[:, None] * (x @ x.T) * r[None] if n <= full_max else None

    def row(j: int) -> torch.Tensor:
        return full[j] if full is not None else r[j] * (x @ x[j]) * r

    d2 = full.diagonal().clone() if full is not None else r * (x * x).sum(-1) * r
    floor = max(D2_FLOOR, torch.finfo(x.dtype).eps * n) * float(d2.max()) if n else 0.0  # below: rounding noise
    c = x.new_zeros(k, n)
    alive = torch.ones(n, dtype=torch.bool, device=x.device)
    picks, gains = [], []
    for i in range(k):
        j = int(d2.masked_fill(~alive, float("-inf")).argmax())
        if float(d2[j]) <= floor:
            break  # rank exhausted: fill the rest by relevance below
        e = (row(j) - c[:i, j] @ c[:i]) / d2[j].sqrt()
        c[i] = e
        picks.append(j)
        gains.append(d2[j].clone())
        d2 = d2 - e * e
        alive[j] = False
    if len(picks) < k:
        rest = torch.nonzero(alive).flatten()
        order = torch.sort(r[rest], descending=True, stable=True).indices[: k - len(picks)]
        picks += rest[order].tolist()
        gains += [d2.new_zeros(())] * len(order)
    return torch.tensor(picks, dtype=torch.long, device=x.device), torch.stack(gains) if gains else d2[:0]


def normalised_relevance(image_emb: torch.Tensor, text_emb: torch.Tensor, negate: bool) -> torch.Tensor:
    """[n] r = min-max of rho, rho_i = (-)mean_m cos(image_emb_i, text_emb_m) (spec §4.2); r = 1 without text."""
    if text_emb.shape[0] == 0:
        return image_emb.new_ones(image_emb.shape[0])
    rho = (F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T).mean(1)
    rho = -rho if negate else rho
    span = rho.max() - rho.min()
    return (rho - rho.min() + 1e-6) / span if float(span) > 0 else torch.ones_like(rho)


@register
@dataclass
class CDPruner(Method):
    """Fields: see the module doc. ``negate`` None = the convention of the source (True for CLIP, False for LLM)."""

    relevance: str = "clip"
    clip: str | None = None
    negate: bool | None = tuned(None, Choice((True, False), derive=lambda m, _: m.relevance == "clip"))
    instruction: str | None = None
    tokenizer: str | None = None
    strip: tuple[str, ...] = STRIP
    anyres: str = tuned("per_crop", Choice(ANYRES_MODES, only_for=("llava_next",)))
    positions: str = "renumber"

    name: ClassVar[str] = "cdpruner"
    description: ClassVar[str] = "Conditional DPP (projector-output similarity x instruction relevance), cut before the LLM."

    @classmethod
    def available_for(cls, model_path: str | None) -> bool:
        """Default sweeps leave it out: its default relevance needs a CLIP checkpoint (``clip=``) the model folder
        does not hold; name it with ``--set clip=DIR`` or ``--set relevance=llm``."""
        return False

    def check_fields(self) -> None:
        if self.relevance not in RELEVANCE:
            raise self.field_error("relevance", "'clip' (official: a CLIP checkpoint via clip=) or 'llm'")
        if self.anyres not in ANYRES_MODES:
            raise self.field_error("anyres", "'per_crop' (official LLaVA-NeXT budget per crop) or 'global'")

    @property
    def negated(self) -> bool:
        return self.relevance == "clip" if self.negate is None else self.negate

    def setup(self, model) -> None:
        self.__dict__["_aux"] = {}
        if self.relevance == "clip":
            self._aux.update(_load_clip(self.clip))
        if self.relevance == "clip" and self.instruction is None:
            self._aux["llm_tokenizer"] = _load_tokenizer(self.tokenizer or model.name_or_path, "tokenizer")

    def probes(self, model):
        if model.vision_cuts:
            return (FeatureLayer(), Instruction())
        if self.relevance == "clip":  # CLIP patch embeddings come from the feature layer's per-crop sequence
            raise self.field_error("relevance", f"'llm' on {model.family}, whose vision tower has no CLIP feature layer "
                                                "(relevance='llm' scores with the LLM's instruction embeddings)")
        return (Instruction(),)  # relevance and similarity from the LLM input rows only

    def budget(self, image: ImageView) -> int:
        if not image.vision_cuts or not self._per_crop(image.vision):
            return super().budget(image)
        crops, patches = image.vision.crop_tokens.shape
        return tokens_to_keep(patches, self.ratio, self.keep, image.nominal, self.name)  # per crop

    def _per_crop(self, v) -> bool:
        return self.anyres == "per_crop" and v.crop_tokens is not None

    def select(self, image: ImageView, n_keep: int | None) -> Selection:
        v = image.vision if image.vision_cuts else None
        if v is not None and self._per_crop(v):
            return self._select_per_crop(image, v, n_keep)
        text = self.text_embeddings(image)
        if self.relevance == "clip":
            feats, has = _patch_features(v, image)
            emb = self.clip_image_embeddings(feats)
            r = torch.zeros(image.n, dtype=emb.dtype, device=emb.device)
            r[has] = normalised_relevance(emb, text, self.negated).to(r.dtype)
        else:
            r = normalised_relevance(image.embeds.float(), text, self.negated)
        x = F.normalize(image.embeds.float(), dim=-1)
        picks, _ = dpp_greedy(x, r.to(x.device), image.n if n_keep is None else n_keep)
        return Selection(keep=torch.sort(picks).values)

    def _select_per_crop(self, image: ImageView, v, per_crop: int | None) -> Selection:
        """Each crop on all its patches (spec §4.4); relevance normalised over the image's crops jointly."""
        crops, patches = v.crop_tokens.shape
        feats = v.crop_features[:, 1:]  # [C, P, D_in], CLS row dropped (the code's select_feature='patch')
        with torch.no_grad():
            projected = v.project(feats.reshape(crops * patches, -1)).float()
        text = self.text_embeddings(image)
        emb = self.clip_image_embeddings(feats.reshape(crops * patches, -1)) if self.relevance == "clip" else projected
        r = normalised_relevance(emb, text, self.negated).reshape(crops, patches)
        x = F.normalize(projected, dim=-1).reshape(crops, patches, -1)
        tokens = [v.crop_tokens[c, dpp_greedy(x[c], r[c].to(x.device), patches if per_crop is None else per_crop)[0]]
                  for c in range(crops)]
        _, from_patches = image.from_patches(torch.zeros(crops, patches))
        kept = torch.zeros(image.n_tokens, dtype=torch.bool)
        kept[~from_patches.cpu()] = True  # newline tokens (no patch): kept, the model's layout stays whole
        picked = torch.cat(tokens).cpu()
        kept[picked[picked >= 0]] = True
        return Selection(keep=torch.nonzero(kept[image.index.cpu()]).flatten().to(image.index.device))

    def text_embeddings(self, image: ImageView) -> torch.Tensor:
        """[M, E] the instruction's embeddings: CLIP text segments, or the LLM's input rows; cached per sample."""
        key = ("cdpruner_text", image.sample)
        if key not in image.shared:
            rows = image[Instruction()]
            if self.relevance == "llm":
                with torch.no_grad():
                    image.shared[key] = rows.embeds().float()
            else:
                text = self.instruction if self.instruction is not None else self._aux["llm_tokenizer"].decode(
                    rows.ids.tolist(), skip_special_tokens=True)
                image.shared[key] = self.clip_text(strip_instruction(text, self.strip), rows.ids.device)
        return image.shared[key]

    def clip_text(self, text: str, device) -> torch.Tensor:
        """[M, E] CLIP text embeddings of ``text`` cut into zero-padded context-length segments (spec §4.1)."""
        clip, tok = self._clip_on(device), self._aux["clip_tokenizer"]
        ids = tok(text).input_ids if text else []
        if not ids:
            return torch.zeros(0, clip.text_projection.out_features, device=device)
        ctx = clip.config.text_config.max_position_embeddings
        ids = torch.tensor(ids + [0] * (-len(ids) % ctx), device=device).reshape(-1, ctx)
        with torch.no_grad():
            return clip.text_projection(clip.text_model(input_ids=ids).pooler_output).float()

    def clip_image_embeddings(self, feats: torch.Tensor) -> torch.Tensor:
        """[k, E] CLIP joint-space embeddings of projector inputs ``feats`` [k, D_in] (post_layernorm, visual_projection)."""
        clip = self._clip_on(feats.device)
        norm = clip.vision_model.post_layernorm
        if feats.shape[-1] != norm.normalized_shape[0]:
            raise PruneError(f"vtprune: cdpruner relevance='clip' needs projector inputs of the CLIP tower's width "
                             f"{norm.normalized_shape[0]}, got {feats.shape[-1]} (no CLIP tower here); use relevance='llm'")
        with torch.no_grad():
            return clip.visual_projection(norm(feats.to(norm.weight.dtype))).float()

    def _clip_on(self, device):
        clip = self._aux["clip"]
        if clip.text_projection.weight.device != torch.device(device):
            self._aux["clip"] = clip = clip.to(device)
        return clip


def strip_instruction(text: str, strip: tuple[str, ...]) -> str:
    """The raw question: every ``strip`` string removed, whitespace trimmed (the official eval's answer-format strip)."""
    for s in strip:
        text = text.replace(s, "")
    return " ".join(text.split())


def _patch_features(v, image: ImageView) -> tuple[torch.Tensor, torch.Tensor]:
    """([k, D_in] projector inputs of the image's current tokens that have one, [n] bool which do)."""
    if v.pre_projector is not None:
        return v.pre_projector[image.index], torch.ones(image.n, dtype=torch.bool, device=image.index.device)
    if v.crop_tokens is None:
        raise PruneError("vtprune: cdpruner relevance='clip' needs the projector inputs, which this model does not "
                         "expose per token; use relevance='llm'")
    feats = v.crop_features[:, 1:].reshape(-1, v.crop_features.shape[-1])
    tokens = v.crop_tokens.reshape(-1)
    row = torch.full((image.n_tokens,), -1, dtype=torch.long, device=tokens.device)
    present = torch.nonzero(tokens >= 0).flatten()
    row[tokens[present]] = present
    row = row[image.index.to(row.device)]
    return feats[row[row >= 0]], (row >= 0).to(image.index.device)


def _load_clip(path: str | None) -> dict:
    if not path:
        raise ConfigError("vtprune: cdpruner relevance='clip' needs clip=<a local CLIP checkpoint directory> (the CLIP "
                          "text tower and visual projection are not in llava-hf checkpoints, e.g. a download of "
                          "openai/clip-vit-large-patch14-336); or use relevance='llm'")
    from transformers import CLIPModel

    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    except Exception as exc:  # missing folder or weights, wrong architecture
        raise ConfigError(f"vtprune: cdpruner could not load the CLIP weights from clip={path!r} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); give a local CLIPModel checkpoint "
                          "directory (config.json, weights and tokenizer files)") from None
    return dict(clip=model, clip_tokenizer=_load_tokenizer(path, "clip"))


def _load_tokenizer(path: str, field: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        fix = "give instruction= or tokenizer=<a local tokenizer directory>" if field == "tokenizer" else \
            "put the CLIP tokenizer files next to its weights"
        raise ConfigError(f"vtprune: cdpruner could not load a tokenizer from {field}={path!r} to read the "
                          f"instruction ({type(exc).__name__}); {fix}") from None
