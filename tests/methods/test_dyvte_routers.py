"""DyVTE's router files (spec §2.3): files for another model, missing files and corrupt ones are refused at
prune() with an error naming the file and what is wrong, and the model stays unpruned; the default routers come from
the model's own folder."""

from __future__ import annotations

import json

import pytest
import torch

import vtprune
from vtprune.errors import ConfigError, PruneError
from vtprune.methods import DyVTE
from vtprune.methods.dyvte import Routers, save_routers

from ..conftest import build_model, collate, make_prompt
from ..test_api import hook_snapshot
from .test_dyvte import D, L, write, zero_routers

pytestmark = pytest.mark.usefixtures("one_thread")


def _refused(model, error, *args, match=(), **kwargs):
    with pytest.raises(error) as info:
        vtprune.prune(model, *args, **kwargs)
    for text in match:
        assert text in str(info.value), str(info.value)
    assert not hasattr(model, "vtprune")
    return str(info.value)


def test_router_files_for_another_model_or_missing_are_refused(models, tmp_path):
    model = models("llava")
    # trained for hidden 32 x 4 layers / 64 x 6 layers: both shapes named
    small = write(Routers(32, 4), tmp_path / "small", model_id="other-32")
    _refused(model, PruneError, "dyvte", routers=small,
             match=("hidden size 32 x 4 layers", "hidden size 64 x 4 layers", "other-32"))
    deep = write(Routers(64, 6), tmp_path / "deep")
    _refused(model, PruneError, "dyvte", routers=deep, match=("64 x 6 layers", "64 x 4 layers"))
    # a folder of the right routers works, the same folder read as routers= works too
    good = write(zero_routers(), tmp_path / "good")
    with vtprune.pruned(model, "dyvte", routers=str(tmp_path / "good")), torch.no_grad():
        model(**collate([make_prompt(model, "llava", 3, 0)]))
    with vtprune.pruned(model, "dyvte", routers=good):
        pass
    # missing: a path that does not exist, a folder without the file, a file without its card, no default file
    _refused(model, ConfigError, "dyvte", routers=str(tmp_path / "nope.safetensors"), match=("does not exist",))
    (tmp_path / "empty").mkdir()
    _refused(model, PruneError, "dyvte", routers=str(tmp_path / "empty"), match=("not found", "train-dyvte"))
    (tmp_path / "good" / "dyvte_routers.json").unlink()
    _refused(model, PruneError, "dyvte", routers=good, match=("dyvte_routers.json", "not found"))
    _refused(model, PruneError, "dyvte", match=("routers",))  # a model built from a config: no folder to look in
    # no budget
    _refused(model, ConfigError, "dyvte", ratio=0.5, routers=small)
    _refused(model, ConfigError, "dyvte", keep=10, routers=small)
    # still the vanilla model
    batch = collate([make_prompt(model, "llava", 3, 0)])
    with torch.no_grad():
        a = model(**batch).logits
        b = build_model("llava")(**batch).logits
    assert torch.equal(a, b)


def _rewrite_card(path, **changes):
    card = path.with_suffix(".json")
    card.write_text(json.dumps({**json.loads(card.read_text()), **changes}))


def _drop_tensor(path):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path))
    weights.pop("layers.2.2.weight")
    save_file(weights, str(path))


def _nan_tensor(path):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path))
    weights["layers.1.0.weight"][3, 5] = float("nan")
    save_file(weights, str(path))


def _int_tensor(path):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path))
    weights["layers.2.2.weight"] = weights["layers.2.2.weight"].round().to(torch.int32)  # finite, but not weights
    save_file(weights, str(path))


NOISE = bytes(torch.randint(0, 256, (512,), generator=torch.Generator().manual_seed(0)).tolist())
CORRUPT = [  # (what, damage to the files of good routers, the file named, what the message says is wrong)
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:100]), ".safetensors", "not a readable safetensors file"),
    ("random bytes", lambda p: p.write_bytes(NOISE), ".safetensors", "not a readable safetensors file"),
    ("empty", lambda p: p.write_bytes(b""), ".safetensors", "not a readable safetensors file"),
    ("card not JSON", lambda p: p.with_suffix(".json").write_text('{"hidden_size": 64,'), ".json",
     "is not valid JSON (line 1"),
    ("card a list", lambda p: p.with_suffix(".json").write_text("[64, 4]"), ".json", "holds a JSON list, not an object"),
    ("card misses layers", lambda p: p.with_suffix(".json").write_text('{"hidden_size": 64}'), ".json", "misses layers"),
    ("card width a string", lambda p: _rewrite_card(p, width="wide"), ".json", "width='wide' is not a positive integer"),
    ("card hidden size a float", lambda p: _rewrite_card(p, hidden_size=64.0), ".json",
     "hidden_size=64.0 is not a positive integer"),
    ("card width not the weights'", lambda p: _rewrite_card(p, width=16), ".safetensors",
     "layers.0.0.weight has shape [32, 128], expected [16, 128] from dyvte_routers.json"),
    ("a router missing", _drop_tensor, ".safetensors", "missing layers.2.2.weight"),
    ("NaN weights", _nan_tensor, ".safetensors", "layers.1.0.weight holds NaN or inf"),
    ("int32 weights", _int_tensor, ".safetensors", "layers.2.2.weight has dtype int32, expected a floating-point"),
]


@pytest.mark.parametrize("what, damage, named, problem", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_router_files_are_a_config_error_naming_the_file(models, tmp_path, what, damage, named, problem):
    """A router file or card that cannot be read (truncated, random bytes, bad JSON) or does not describe the
    routers it holds: a ConfigError from prune() naming the file and what is wrong, the model untouched (it used to
    be a SafetensorError, JSONDecodeError, AttributeError or a load_state_dict RuntimeError)."""
    model = models("llava")
    path = tmp_path / "dyvte_routers.safetensors"
    save_routers(Routers(D, L), path, {"model_id": "tiny"})
    damage(path)
    batch = collate([make_prompt(model, "llava", 3, 0)])
    with torch.no_grad():
        ref = model(**batch).logits
    before = hook_snapshot(model)
    message = _refused(model, ConfigError, "dyvte", routers=str(path), match=(problem,))
    assert str(path.with_suffix(named)) in message and "vtprune train-dyvte" in message
    assert hook_snapshot(model) == before
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)


def test_default_routers_come_from_the_model_folder(tmp_path):
    """routers=None: ``dyvte_routers.safetensors`` in the model's own folder (config._name_or_path);
    ``available_for`` says whether a folder has one."""
    model = build_model("llava")
    folder = tmp_path / "tiny-llava"
    write(zero_routers(), folder, model_id="tiny-llava-here")
    assert DyVTE.available_for(str(folder))
    assert not DyVTE.available_for(str(tmp_path)) and not DyVTE.available_for(None)
    model.config._name_or_path = str(folder)
    with vtprune.pruned(model, "dyvte"):
        assert model.vtprune.method.card["model_id"] == "tiny-llava-here"
    model.config._name_or_path = str(tmp_path)  # a folder without routers
    _refused(model, PruneError, "dyvte", match=("not found", "train-dyvte"))
