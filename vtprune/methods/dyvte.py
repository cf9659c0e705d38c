"""DyVTE (Dynamic Visual-Token Exit), spec §2.3-2.5: learned routers decide per prompt after which LLM layer
*all* visual tokens leave the sequence.

One router per LLM layer, ``Linear(2d -> h, no bias) -> GELU -> Linear(h -> 2, no bias)`` (index 0 = keep,
1 = exit). After layer l, for every sample that has not exited: f = concat(mean of the instruction tokens
(every prompt token after the sample's last image) without the last prompt token, the last prompt token),
both from layer l's output; exit when logit[1] - logit[0] > ``threshold`` (0 = the paper's argmax). From layer
l + 1 on that sample's visual tokens are gone from the sequence and from the KV cache of the later layers;
kept tokens keep their original positions. Samples of a batch exit at different layers; decode steps never
re-evaluate the routers; a layer where nobody exits costs one router call per sample and builds nothing.
No ratio / keep budget. Stats: an exiting image has one stage (before layer l + 1, 0 tokens out, note
"exit after layer l"); an image that never exits has none, unless no prompt token follows its sample's last image
(one stage before layer 1, every token kept, a note saying the routers had no text to read).

``routers``: a router file (``*.safetensors`` with a ``*.json`` beside it: model id, hidden size, layers,
router width, prompt style) or a folder holding ``dyvte_routers.safetensors``; default: that file in the
model's own folder (the shipped tiny LLaVA has one). Files for another model are refused, naming both shapes;
files that cannot be read or do not match their card are a ConfigError naming the file.
Where we differ from the code: h = d // 2 by default (the official 2048 is for d = 4096 / 5120); an empty
instruction mean (only the last prompt token after the image) uses the last token (the code gives NaN and
never exits); a sample with no prompt token after its last image never exits (nothing for the routers to read;
the code's NaN feature never exits either); batches and several images per sample work (the code is batch 1,
one image, offset 35).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..core.probes import LayerOutput
from ..errors import ConfigError, PruneError
from ..core.registration import register
from ..space import Float, tuned
from .base import Cut, ImageView, Method, Selection

ROUTER_FILE = "dyvte_routers.safetensors"


class Routers(nn.Module):
    """One router per LLM layer: [*, 2d] -> [*, 2] logits (keep, exit)."""

    def __init__(self, hidden_size: int, layers: int, width: int | None = None):
        super().__init__()
        self.hidden_size, self.width = hidden_size, width or hidden_size // 2
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * hidden_size, self.width, bias=False), nn.GELU(),
                          nn.Linear(self.width, 2, bias=False)) for _ in range(layers))
        for router in self.layers:
            for linear in (router[0], router[2]):
                nn.init.xavier_uniform_(linear.weight)

    def forward(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return self.layers[layer](features)


def router_features(instruction: torch.Tensor) -> torch.Tensor:
    """[q, D] instruction rows (last prompt token last) -> [2D]: concat(mean of all but the last, the last)."""
    if instruction.shape[0] == 0:
        raise ValueError("vtprune: dyvte router features need at least one prompt token after the last image")
    body = instruction[:-1] if instruction.shape[0] > 1 else instruction
    return torch.cat([body.float().mean(0), instruction[-1].float()])


def save_routers(routers: Routers, path, meta: dict) -> None:
    """Write ``path`` (safetensors) and its JSON card (``meta`` plus the shapes)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in routers.state_dict().items()}, str(path))
    card = {**meta, "hidden_size": routers.hidden_size, "layers": len(routers.layers), "width": routers.width}
    path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")


def load_routers(path, hidden_size: int, layers: int, model_name: str = "") -> tuple[Routers, dict]:
    """(routers, card) from ``path``, after checking they were trained for a model of this shape. A card or weight
    file that cannot be read, or that does not describe the routers it holds, is a ConfigError naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / ROUTER_FILE
    card_path = path.with_suffix(".json")
    if not path.is_file() or not card_path.is_file():
        raise PruneError(f"vtprune: dyvte routers {path} (and its {card_path.name}) not found; train them with "
                         "`vtprune train-dyvte --model ...` or pass routers=<file>")
    card = read_card(card_path)
    if (card["hidden_size"], card["layers"]) != (hidden_size, layers):
        raise PruneError(
            f"vtprune: dyvte routers {path} were trained for {card.get('model_id', 'another model')!r} with hidden "
            f"size {card['hidden_size']} x {card['layers']} layers; this model{f' ({model_name})' if model_name else ''} "
            f"has hidden size {hidden_size} x {layers} layers. Train routers for it with `vtprune train-dyvte`"
        )
    routers = Routers(hidden_size, layers, card.get("width"))
    routers.load_state_dict(read_weights(path, routers.state_dict(), card_path.name))
    return routers.eval().requires_grad_(False), card


def read_card(card_path: Path) -> dict:
    """The router card: a JSON object with positive integers ``hidden_size``, ``layers`` (and ``width`` if given)."""
    redo = "write it again with `vtprune train-dyvte` (or restore it)"
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"vtprune: dyvte router card {card_path} is not valid JSON (line {err.lineno}, column "
                          f"{err.colno}: {err.msg}); {redo}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"vtprune: dyvte router card {card_path} cannot be read ({err}); {redo}") from None
    if not isinstance(card, dict):
        raise ConfigError(f"vtprune: dyvte router card {card_path} holds a JSON {type(card).__name__}, not an object "
                          f"with hidden_size, layers and width; {redo}")
    missing = [k for k in ("hidden_size", "layers") if k not in card]
    if missing:
        raise ConfigError(f"vtprune: dyvte router card {card_path} misses {', '.join(missing)} (the LLM shape the "
                          f"routers were trained for); {redo}")
    for key in ("hidden_size", "layers", "width"):
        value = card.get(key)
        if (key != "width" or value is not None) and (type(value) is not int or value < 1):
            raise ConfigError(f"vtprune: dyvte router card {card_path}: {key}={value!r} is not a positive integer; "
                              f"{redo}")
    return card


def read_weights(path: Path, expected: dict, card_name: str) -> dict:
    """The router tensors of ``path``, checked against ``expected`` (names and shapes of the card's routers)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    redo = "train them again with `vtprune train-dyvte` (or restore the file)"
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ConfigError(f"vtprune: dyvte routers {path} are not a readable safetensors file ({err}); "
                          f"{redo}") from None
    problems = [f"missing {k}" for k in expected if k not in weights]
    problems += [f"unexpected {k}" for k in weights if k not in expected]
    problems += [f"{k} has shape {list(v.shape)}, expected {list(expected[k].shape)} from {card_name}"
                 for k, v in weights.items() if k in expected and v.shape != expected[k].shape]
    problems += [f"{k} has dtype {str(v.dtype).removeprefix('torch.')}, expected a floating-point dtype (float32)"
                 for k, v in weights.items() if k in expected and not v.is_floating_point()]
    problems += [f"{k} holds NaN or inf" for k, v in weights.items()
                 if k in expected and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ConfigError(f"vtprune: dyvte routers {path} do not hold the routers {card_name} describes: {shown}; "
                          f"{redo}")
    return weights


@register
@dataclass
class DyVTE(Method):
    routers: str | None = None
    threshold: float = tuned(0.0, Float(-4.0, 4.0))  # search: margin on logit[exit] - logit[keep]
    positions: str = "original"

    name: ClassVar[str] = "dyvte"
    description: ClassVar[str] = "Learned per-layer routers drop all visual tokens once the text no longer needs them."
    has_budget: ClassVar[bool] = False
    records_unchanged: ClassVar[bool] = False

    def check_fields(self) -> None:
        if not math.isfinite(self.threshold):
            raise self.field_error("threshold", "a finite margin on logit[exit] - logit[keep] (0 = argmax)")
        if self.routers is not None and not Path(self.routers).exists():
            raise ConfigError(f"vtprune: dyvte routers={self.routers!r} does not exist; pass a router file or folder")

    @classmethod
    def available_for(cls, model_path: str | None) -> bool:
        return model_path is not None and (Path(model_path) / ROUTER_FILE).is_file()

    def setup(self, model) -> None:
        source = self.routers or (Path(model.name_or_path) / ROUTER_FILE if model.name_or_path else None)
        if source is None:
            raise PruneError("vtprune: dyvte needs routers trained for this model: pass routers=<file>")
        self._routers, self.card = load_routers(source, model.hidden_size, model.llm_layers, model.name_or_path)

    def cuts(self, model):
        return tuple(Cut("llm", k) for k in range(1, model.llm_layers))  # decisions after layers 0..L-2

    def probes(self, model):
        return tuple(LayerOutput(k - 1) for k in range(1, model.llm_layers))

    def select_batch(self, images: list[ImageView]) -> list[Selection]:
        out, exits = [], {}  # sample -> decision: the images of a sample share one router call
        for image in images:
            layer = image.layer - 1
            if image.sample not in exits:
                instruction = image[LayerOutput(layer)]
                # no prompt token after the image: nothing for the routers to read, so nothing exits (the official
                # feature is a mean of nothing, NaN, which never exits)
                exits[image.sample] = instruction.shape[0] > 0 and self.exits(layer, instruction)
            if exits[image.sample]:
                out.append(Selection(keep=image.index[:0], note=f"exit after layer {layer}"))
            else:
                out.append(Selection(keep=torch.arange(image.n, device=image.index.device), note=self.unrouted(image)))
        return out

    def exits(self, layer: int, instruction: torch.Tensor) -> bool:
        """Router ``layer``'s decision for one sample's [q, D] instruction rows (q >= 1): logit[exit] - logit[keep]
        above ``threshold``."""
        logits = self.router_logits(layer, router_features(instruction))
        return float(logits[1] - logits[0]) > self.threshold

    @staticmethod
    def unrouted(image: ImageView) -> str | None:
        """The stats note, once per image and forward, of an image whose sample has no prompt token after its
        last image: its visual tokens stay in every layer."""
        if image[LayerOutput(image.layer - 1)].shape[0] or image.state.get("unrouted"):
            return None
        image.state["unrouted"] = True
        return "no prompt token after the image: the routers have no text to read, every visual token stays"

    def router_logits(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        router = self._routers.layers[layer]
        if router[0].weight.device != features.device:
            self._routers.to(features.device)
        with torch.no_grad():
            return router(features.to(router[0].weight.dtype))
