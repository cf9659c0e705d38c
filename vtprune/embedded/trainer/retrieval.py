"""Stage-2 auxiliary losses on the language model: attention supervision of one head and a read-out of the referent."""

from __future__ import annotations

import torch

from ...adapters import get_adapter
from .. import synthetic
from .patches import _GLYPH_CLASSES, patch_classes, referent_classes


class RetrievalAux:
    """Attention supervision for one language-model head (stage 2, ``--retrieval-head``).

    Why: in the checkpoint trained without it, one layer-1 head puts all of its
    attention on the object a *colour* names ("What shape is the red object?", 100%
    right), but no head finds an object by its *shape* ("What color is the circle?",
    position questions), although the visual tokens encode shape.  This loss gives the
    head that dense signal: at the position that predicts each answer, its attention
    mass on the patches of the referred object(s) (:func:`referent_classes`) is pushed
    to 1 (mean ``-log`` mass over the answer turns that have such patches).  With a
    ``tokenizer`` the last noun of each question ("the red *circle*") is supervised too:
    there the referent can be found from the adjacent words alone, and later positions
    can read the result from that token.  The head's
    attention is recomputed from the layer's own input (captured by a forward pre-hook on
    the instance, removed by :meth:`remove`), so the model keeps its SDPA attention.
    """

    # the words a referring phrase ends in: its noun (the token that is supervised to look at the referent)
    NOUNS = (*synthetic.PLURAL, *synthetic.PLURAL.values(), "letter", "number")

    def __init__(self, model, layer: int, head: int, min_pixels: int = 6, tokenizer=None):
        from transformers.models.llama.modeling_llama import rotate_half

        adapter = get_adapter(model)
        self.attn = adapter.decoder_layers[layer].self_attn
        n_heads = model.config.text_config.num_attention_heads
        if not 0 <= head < n_heads:
            raise ValueError(f"--retrieval-head: head {head} out of range (the LM has {n_heads} heads)")
        self.head, self.image_token_id = head, adapter.image_token_id
        vc = model.config.vision_config
        self.grid, self.patch, self.min_pixels = vc.image_size // vc.patch_size, vc.patch_size, min_pixels
        self._rotate_half = rotate_half
        self._hook = self.attn.register_forward_pre_hook(self._grab, with_kwargs=True)
        self.noun_ids = self.color_ids = None
        if tokenizer is not None:
            def ids(words):
                found = [tokenizer.convert_tokens_to_ids(w) for w in words]
                return torch.tensor([i for i in found if i is not None and i != tokenizer.unk_token_id])
            self.noun_ids, self.color_ids = ids(self.NOUNS), ids(synthetic.COLORS)
        self.inputs = self.queries = self.targets = None
        self.last = float("nan")
        self.mass = float("nan")  # mean attention mass on the referred patches, latest step

    def _grab(self, module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.inputs = (hidden, kwargs.get("position_embeddings"))

    def remove(self) -> None:
        self._hook.remove()
        self.inputs = None

    def set_targets(self, conversations, batch: dict) -> None:
        """Query positions (each answer position, plus the question's last noun) and their target patch masks."""
        labels = batch["labels"]
        starts = (labels[:, 1:] != -100) & (labels[:, :-1] == -100)  # position t predicts the first answer token
        visual = batch["input_ids"] == self.image_token_id
        nouns, colors = ((torch.isin(batch["input_ids"], w) if w is not None else torch.zeros_like(visual))
                         for w in (self.noun_ids, self.color_ids))
        rows, cols, masks = [], [], []
        self.referents = []  # (scene, referent classes) per query row, for ReadoutAux
        for i, conv in enumerate(conversations):
            positions = starts[i].nonzero().squeeze(1).tolist()
            if len(positions) != len(conv.turns):
                continue
            classes = torch.from_numpy(patch_classes(conv.scene, self.grid, self.patch, self.min_pixels))
            prev = int(visual[i].nonzero().max())
            for pos, (question, _answer, family, _kind) in zip(positions, conv.turns):
                ref = referent_classes(question, family)
                mask = torch.isin(classes, torch.tensor(sorted(ref), dtype=classes.dtype)) if ref else None
                if mask is not None and mask.any():
                    # the answer position, and (with a tokenizer) the question's last noun: "the red *circle*";
                    # not when a colour that narrows the referent comes after it ("Which shape is green?")
                    span = slice(prev + 1, pos + 1)
                    noun, color = nouns[i, span].nonzero(), colors[i, span].nonzero()
                    use_noun = len(noun) and (synthetic.family_key(family) == "color" or not len(color)
                                              or int(color.max()) < int(noun.max()))
                    for q in [pos] + ([prev + 1 + int(noun.max())] if use_noun else []):
                        rows.append(i)
                        cols.append(q)
                        masks.append(mask)
                        self.referents.append((conv.scene, ref))
                prev = pos
                while prev + 1 < labels.shape[1] and labels[i, prev + 1] != -100:
                    prev += 1  # skip this turn's answer: a shape answer ("circle") is not the next question's noun
        self.queries = (torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long))
        self.targets = torch.stack(masks) if masks else None
        self.visual = visual
        self.seq_targets = None
        self.valid = None

    def remap(self, kept_rows) -> None:
        """Move the targets of :meth:`set_targets` onto a :func:`drop_visual_tokens` batch.

        ``kept_rows[i]``: the original positions sample ``i`` keeps, in order.  Query positions move to
        their compacted index; each query's patch mask becomes a mask over the compacted sequence (the
        kept patches of the referent).  Queries whose referent lost every patch are left out of the loss
        (``valid``); :class:`ReadoutAux` ignores them too.
        """
        rows, cols = self.queries
        if self.targets is None or not len(rows):
            self.valid = torch.zeros(len(rows), dtype=torch.bool)
            return
        width = max(int(r.numel()) for r in kept_rows)
        new_index = []
        for i, r in enumerate(kept_rows):
            m = torch.full((self.visual.shape[1],), -1, dtype=torch.long)
            m[r] = torch.arange(r.numel())
            new_index.append(m)
        new_index = torch.stack(new_index)
        new_cols = new_index[rows, cols]
        seq = torch.zeros(len(rows), width)
        for n, i in enumerate(rows.tolist()):
            where = self.visual[i].nonzero().squeeze(1)            # original positions of the 144 patches
            hit = where[self.targets[n]]                            # ... of the referent
            moved = new_index[i, hit]
            moved = moved[moved >= 0]
            seq[n, moved] = 1.0
        self.queries = (rows, new_cols)
        self.seq_targets = seq
        self.valid = seq.sum(-1) > 0

    def attention(self) -> torch.Tensor:
        """(n_queries, seq) attention probabilities of the supervised head at the query positions."""
        hidden, (cos, sin) = self.inputs
        cos, sin = (t.expand(hidden.shape[0], -1, -1) for t in (cos, sin))  # rotary tables may have batch 1
        rows, cols = self.queries
        d = self.attn.head_dim
        sl = slice(self.head * d, (self.head + 1) * d)
        q = torch.nn.functional.linear(hidden[rows, cols], self.attn.q_proj.weight[sl])       # (n, d)
        k = torch.nn.functional.linear(hidden[rows], self.attn.k_proj.weight[sl])             # (n, T, d)
        q = q * cos[rows, cols] + self._rotate_half(q) * sin[rows, cols]
        k = k * cos[rows] + self._rotate_half(k) * sin[rows]
        scores = torch.einsum("nd,ntd->nt", q, k) * self.attn.scaling
        keys = torch.arange(scores.shape[1])
        scores = scores.masked_fill(keys[None, :] > cols[:, None], float("-inf"))  # causal
        return scores.softmax(-1)

    def loss(self) -> torch.Tensor:
        if self.targets is None:
            return self.inputs[0].sum() * 0.0
        rows, _cols = self.queries
        probs = self.attention()
        if self.seq_targets is not None:  # a token-dropout batch (remap)
            if not self.valid.any():
                return self.inputs[0].sum() * 0.0
            mass = (probs * self.seq_targets).sum(-1)[self.valid]
            loss = -(mass + 1e-6).log().mean()
            self.last, self.mass = float(loss.detach()), float(mass.detach().mean())
            return loss
        vis = self.visual[rows]                                                                # (n, T)
        visual_probs = probs[vis].view(len(rows), -1)                                          # (n, 144) in patch order
        mass = (visual_probs * self.targets).sum(-1)
        loss = -(mass + 1e-6).log().mean()
        self.last, self.mass = float(loss.detach()), float(mass.detach().mean())
        return loss


_THIRD = {"left": 0, "top": 0, None: 1, "right": 2, "bottom": 2}  # synthetic.side -> read-out class


class ReadoutAux:
    """Linear read-out of the referred object from the residual stream after the retrieval layer.

    :class:`RetrievalAux` makes one head look at the referent, but its value projection
    was shaped by the questions it answered before (colour-keyed ones, which read shape).
    These discarded heads ask the residual at every supervised query position, right
    after that layer, for the referent's colour, shape, horizontal and vertical third and
    (for a glyph) its character, so that what the head retrieves carries every attribute
    a later question may need.  Rows whose referent is not a single object are ignored.
    """

    def __init__(self, model, retrieval: RetrievalAux, layer: int):
        hidden = model.config.text_config.hidden_size
        glyphs = synthetic.LETTERS + synthetic.DIGITS
        self.sizes = {"color": len(synthetic.COLORS), "shape": len(synthetic.SHAPES), "hpos": 3, "vpos": 3,
                      "glyph": len(glyphs)}
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, n) for k, n in self.sizes.items()})
        self.retrieval, self.glyphs = retrieval, glyphs
        self._hook = get_adapter(model).decoder_layers[layer].register_forward_hook(self._grab)
        self.hidden = self.labels = None
        self.last = float("nan")

    def _grab(self, module, args, output):
        self.hidden = output[0] if isinstance(output, tuple) else output

    def remove(self) -> None:
        self._hook.remove()
        self.hidden = None


    def set_targets(self) -> None:
        """Labels (rows x attribute, -100 = unknown) for the query rows of the retrieval's latest batch."""
        labels = []
        colors, shapes = list(synthetic.COLORS), list(synthetic.SHAPES)
        for scene, ref in self.retrieval.referents:
            row = dict.fromkeys(self.sizes, -100)
            if ref == _GLYPH_CLASSES and scene.glyph is not None:
                row["glyph"] = self.glyphs.index(scene.glyph.char)
            else:
                objs = [o for o in scene.shapes if synthetic.LABEL_CLASSES.index(o.name) in ref]
                if len(objs) == 1:
                    o = objs[0]
                    row.update(color=colors.index(o.color), shape=shapes.index(o.kind),
                               hpos=_THIRD[synthetic.side(o, scene.size, "h")],
                               vpos=_THIRD[synthetic.side(o, scene.size, "v")])
            labels.append([row[k] for k in self.sizes])
        valid = getattr(self.retrieval, "valid", None)
        if valid is not None:  # token dropout: no label where the referent's tokens are all gone
            for n in (~valid).nonzero().squeeze(1).tolist():
                labels[n] = [-100] * len(self.sizes)
        self.labels = torch.tensor(labels, dtype=torch.long).view(-1, len(self.sizes))

    def loss(self) -> torch.Tensor:
        rows, cols = self.retrieval.queries
        h = self.hidden[rows, cols]
        total = h.sum() * 0.0  # zero with a graph when no row has a label
        for j, head in enumerate(self.heads.values()):
            target = self.labels[:, j]
            if (target >= 0).any():
                total = total + torch.nn.functional.cross_entropy(head(h), target, ignore_index=-100)
        self.last = float(total.detach())
        return total
