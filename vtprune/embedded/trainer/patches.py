"""Dense per-patch targets of the synthetic scenes and the stage-1 auxiliary heads that learn them.

``patch_classes`` says what covers each patch; ``referent_classes`` says which patch classes a question is about
(used by :mod:`.retrieval`); :class:`PatchAux` trains the from-scratch vision tower on them.
"""

from __future__ import annotations

import numpy as np
import torch

from ...adapters import get_adapter
from .. import synthetic


class PatchAux:
    """Dense per-patch targets on the vision features at ``vision_feature_layer`` (the projector's input).

    Linear heads, discarded after training, give the from-scratch vision tower a signal
    that the sparse answer-token loss cannot (:meth:`loss` is their unweighted sum):

    * class: what covers most of the patch (:func:`synthetic.label_map`: background,
      colour+shape or glyph; background when fewer than ``min_pixels`` object pixels),
      cross-entropy with background down-weighted to ``background_weight`` (most of the
      144 patches are background, so an unweighted loss is satisfied without shapes);
    * colour and shape of shape patches as two more heads (ignored elsewhere), so that
      shape has a colour-independent direction in the features: without it the language
      model finds objects by colour but not by shape ("What color is the triangle?" got
      the colour of the most salient object);
    * centre: whether an object's centre falls in the patch (one token per object, which
      makes counting a matter of counting tokens), binary cross-entropy;
    * row and column of the patch (12-way each), so that position stays linearly
      readable from every visual token.
    """

    def __init__(self, model, min_pixels: int = 6, background_weight: float = 0.1):
        vc = model.config.vision_config
        self.grid, self.patch = vc.image_size // vc.patch_size, vc.patch_size
        self.min_pixels = min_pixels
        n_cls = len(synthetic.LABEL_CLASSES)
        self.head = torch.nn.ModuleDict({
            "cls": torch.nn.Linear(vc.hidden_size, n_cls),
            "color": torch.nn.Linear(vc.hidden_size, len(synthetic.COLORS)),
            "shape": torch.nn.Linear(vc.hidden_size, len(synthetic.SHAPES)),
            "centre": torch.nn.Linear(vc.hidden_size, 1),
            "row": torch.nn.Linear(vc.hidden_size, self.grid),
            "col": torch.nn.Linear(vc.hidden_size, self.grid),
        })
        self.class_weight = torch.ones(n_cls)
        self.class_weight[0] = background_weight
        idx = torch.arange(self.grid * self.grid)
        self.rows, self.cols = idx // self.grid, idx % self.grid
        adapter = get_adapter(model)
        self._hook = adapter.vision_layers[adapter.vision_feature_layer].register_forward_hook(self._grab)
        self.features = self.targets = self.centres = None
        self.last = float("nan")  # unweighted auxiliary loss of the latest step, for the log
        self.metrics: dict[str, float] = {}

    def _grab(self, module, args, output):  # noqa: ARG002
        self.features = output[0] if isinstance(output, tuple) else output

    def remove(self) -> None:
        """Detach the feature hook (the model no longer feeds this object)."""
        self._hook.remove()
        self.features = None

    def set_targets(self, scenes) -> None:
        g, p = self.grid, self.patch
        rows, centres = [], []
        for scene in scenes:
            rows.append(patch_classes(scene, g, p, self.min_pixels))
            c = np.zeros(g * g, dtype=np.float32)
            points = [(s.x, s.y) for s in scene.shapes]
            if scene.glyph is not None:
                left, top, right, bottom = scene.glyph.box
                points.append(((left + right) // 2, (top + bottom) // 2))
            for x, y in points:
                c[min(g - 1, y // p) * g + min(g - 1, x // p)] = 1.0
            centres.append(c)
        self.targets = torch.from_numpy(np.stack(rows))
        self.centres = torch.from_numpy(np.stack(centres))

    def loss(self) -> torch.Tensor:
        F = torch.nn.functional
        feats = self.features[:, 1:]  # drop CLS: (batch, grid*grid, hidden)
        b = feats.shape[0]
        cls_logits = self.head["cls"](feats)
        cls = F.cross_entropy(cls_logits.flatten(0, 1), self.targets.flatten(), weight=self.class_weight)
        is_shape, color_t, shape_t = _color_shape_factors(self.targets.flatten())
        color_t = torch.where(is_shape, color_t, torch.full_like(color_t, -100))
        shape_t = torch.where(is_shape, shape_t, torch.full_like(shape_t, -100))
        factors = torch.zeros(())
        if is_shape.any():
            factors = (F.cross_entropy(self.head["color"](feats).flatten(0, 1), color_t)
                       + F.cross_entropy(self.head["shape"](feats).flatten(0, 1), shape_t))
        centre_logits = self.head["centre"](feats).squeeze(-1)
        centre = F.binary_cross_entropy_with_logits(centre_logits, self.centres, pos_weight=torch.tensor(10.0))
        pos = 0.5 * (F.cross_entropy(self.head["row"](feats).flatten(0, 1), self.rows.repeat(b))
                     + F.cross_entropy(self.head["col"](feats).flatten(0, 1), self.cols.repeat(b)))
        loss = cls + factors + centre + 0.2 * pos
        self.last = float(loss.detach())
        with torch.no_grad():
            obj = self.targets > 0
            pred = cls_logits.argmax(-1)
            self.metrics = {
                "obj_acc": float((pred[obj] == self.targets[obj]).float().mean()) if obj.any() else float("nan"),
                "bg_acc": float((pred[~obj] == 0).float().mean()),
                "shape_acc": _shape_accuracy(pred, self.targets),
                "centre_f1": _f1(centre_logits > 0, self.centres > 0.5),
            }
        return loss


def patch_classes(scene, grid: int, patch: int, min_pixels: int):
    """(grid*grid,) int64 array: the ``LABEL_CLASSES`` id covering most of each patch (0 under ``min_pixels``)."""
    n_cls = len(synthetic.LABEL_CLASSES)
    lm = np.asarray(synthetic.label_map(scene), dtype=np.int64)
    patches = lm.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, patch * patch)
    counts = np.zeros((grid * grid, n_cls), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(grid * grid), patch * patch), patches.ravel()), 1)
    counts[:, 0] = 0
    best = counts.argmax(1)
    best[counts.max(1) < min_pixels] = 0
    return best


_GLYPH_CLASSES = frozenset(range(1 + len(synthetic.COLORS) * len(synthetic.SHAPES), len(synthetic.LABEL_CLASSES)))


def referent_classes(question: str, family: str) -> frozenset[int]:
    """``LABEL_CLASSES`` ids of what a question refers to: the patches its answer has to be read from.

    Colour and shape words narrow the referent ("the red circle", "How many circles",
    "the red object"); an OCR question refers to the glyph.  In the colour family the
    colour word is the claim being checked ("Is the square blue?"), not part of the
    referent.  The list-the-objects turn refers to everything and is left out (empty set).
    """
    fam = synthetic.family_key(family)
    if fam == "ocr":
        return _GLYPH_CLASSES
    if fam not in synthetic.GQA_FAMILIES:
        return frozenset()
    words = question.lower().replace("?", " ").replace(".", " ").split()
    colors = [] if fam == "color" else [w for w in synthetic.COLORS if w in words]
    singular = {w.removesuffix("s") for w in words}
    shapes = [k for k in synthetic.SHAPES if k in singular]
    return frozenset(synthetic.LABEL_CLASSES.index(f"{c} {k}")
                     for c in (colors or synthetic.COLORS) for k in (shapes or synthetic.SHAPES))


def _color_shape_factors(class_ids: torch.Tensor):
    """(is_shape, colour index, shape index) of ``LABEL_CLASSES`` ids, laid out as 1 + colour * n_shapes + shape.

    The indices are meaningful only where ``is_shape`` (background and glyph ids are not colour+shape classes).
    """
    n_shapes = len(synthetic.SHAPES)
    t = class_ids - 1
    return (t >= 0) & (t < len(synthetic.COLORS) * n_shapes), t // n_shapes, t % n_shapes


def _shape_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Share of colour+shape patches whose predicted class has the right shape (colour ignored)."""
    sel, _, true_shape = _color_shape_factors(target)
    if not sel.any():
        return float("nan")
    pred_is_shape, _, pred_shape = _color_shape_factors(pred)
    return float((pred_is_shape[sel] & (pred_shape[sel] == true_shape[sel])).float().mean())


def _f1(pred: torch.Tensor, true: torch.Tensor) -> float:
    tp = float((pred & true).sum())
    return 2 * tp / max(1.0, float(pred.sum()) + float(true.sum()))
