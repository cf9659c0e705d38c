"""``vtprune.training.dyvte.train`` (spec §2.6) on the embedded tiny LLaVA (and an untrained copy): what it writes, that the routers load
and run, and that a resume continues from the saved step and trains the routers only (the model stays frozen)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import vtprune
from vtprune.eval.tasks.prompts import build_prompt
from vtprune.benchmarks.synthetic import training_samples
from vtprune.benchmarks.tiny_llava import build_untrained_tiny_llava, load_tiny_llava
from vtprune.methods.dyvte import load_routers
from vtprune.training.dyvte import TrainSettings, train

pytestmark = pytest.mark.usefixtures("one_thread")

OUTPUTS = ("dyvte_routers.safetensors", "dyvte_routers.json", "exit_curve.csv", "exit_curve.png", "state.pt")


def _forwards(model):
    """A counter of the model's top-level forward calls (one full teacher-forced pass per training step)."""
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def test_train_writes_routers_that_load_and_resume_continues(tmp_path):
    model, processor = load_tiny_llava()  # the embedded model itself
    d, L = model.config.text_config.hidden_size, model.config.text_config.num_hidden_layers
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "dyvte"

    calls, handle = _forwards(model)
    meta = train(TrainSettings(steps=3, batch_size=2, out=str(out), progress=False, save_every=1),
                 model=model, processor=processor)
    handle.remove()
    assert len(calls) == 3
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    card = json.loads((out / "dyvte_routers.json").read_text())
    assert card["steps"] == meta["steps"] == 3
    assert (card["hidden_size"], card["layers"], card["width"]) == (d, L, d // 2)
    state = torch.load(out / "state.pt", weights_only=False)
    assert state["step"] == 3 and sum(state["counts"]["labels"]) == 3 * 2
    with open(out / "exit_curve.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["layer"]) for r in rows] == list(range(L - 1))  # decisions after layers 0..L-2
    assert sum(int(r["samples"]) for r in rows) == 6
    for r in rows:
        assert r["safe_to_exit"] == "" if r["samples"] == "0" else 0.0 <= float(r["safe_to_exit"]) <= 1.0

    routers, loaded_card = load_routers(out, d, L)
    assert loaded_card["steps"] == 3
    assert all(not p.requires_grad for p in routers.parameters())
    with pytest.raises(vtprune.PruneError):
        load_routers(out, d // 2, L)
    first = {k: v.clone() for k, v in routers.state_dict().items()}

    # the routers run on this model
    sample = next(training_samples(seed=1))
    inputs = processor(images=[sample.image], text=[build_prompt(sample.question, benchmark=sample.style,
                                                                 processor=processor)], return_tensors="pt")
    with vtprune.pruned(model, "dyvte", routers=str(out)), torch.no_grad():
        logits = model(**inputs).logits
        stats = model.vtprune.stats
    assert torch.isfinite(logits).all() and len(stats.images) == 1
    assert all(st.method == "dyvte" and st.tokens_out == 0 for st in stats.images[0].stages)

    # resume: 2 more steps (not 5 from scratch), the card says 5, only the routers changed
    calls, handle = _forwards(model)
    meta = train(TrainSettings(steps=5, batch_size=2, out=str(out), progress=False, save_every=1),
                 model=model, processor=processor)
    handle.remove()
    assert len(calls) == 2
    assert json.loads((out / "dyvte_routers.json").read_text())["steps"] == meta["steps"] == 5
    state = torch.load(out / "state.pt", weights_only=False)
    assert state["step"] == 5 and sum(state["counts"]["labels"]) == 5 * 2
    resumed, _ = load_routers(out, d, L)
    assert any(not torch.equal(first[k], v) for k, v in resumed.state_dict().items())
    after = model.state_dict()
    assert after.keys() == frozen.keys()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert all(not p.requires_grad for p in model.parameters())


def test_a_run_extended_on_resume_continues_the_longer_schedule(tmp_path):
    """3 steps, then resumed with --steps 5: steps 4 and 5 use the learning rates of a 5-step cosine schedule
    (a resumed scheduler of the 3-step run would give 0 at step 4)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    model, processor = build_untrained_tiny_llava(seed=0)
    common = dict(batch_size=2, progress=False, save_every=1, lr=1e-3)
    lrs: list[float] = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    try:
        train(TrainSettings(steps=3, out=str(tmp_path / "a"), **common), model=model, processor=processor)
        resumed = len(lrs)
        train(TrainSettings(steps=5, out=str(tmp_path / "a"), **common), model=model, processor=processor)
        extended = lrs[resumed:]
        del lrs[:]
        train(TrainSettings(steps=5, out=str(tmp_path / "b"), **common), model=model, processor=processor)
    finally:
        handle.remove()
    assert len(extended) == 2 and extended == pytest.approx(lrs[3:], rel=1e-9) and min(extended) > 0


def _one_cli_error(capsys, argv: list[str]) -> str:
    from vtprune.cli import main

    status = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("vtprune train-dyvte: error: "), lines
    return lines[0]


def test_resume_with_another_width_or_model_is_one_line(tmp_path, monkeypatch, capsys):
    """state.pt from a run of one model and width: a resume with another --width or another model is one line
    naming the file, both values and the fix, before any step; the state is left as it was."""
    from vtprune import loading

    model, processor = build_untrained_tiny_llava(seed=0)
    d, L = model.config.text_config.hidden_size, model.config.text_config.num_hidden_layers
    out = tmp_path / "run"
    train(TrainSettings(steps=1, batch_size=1, out=str(out), progress=False), model=model, processor=processor)
    saved = (out / "state.pt").read_bytes()
    argv = ["train-dyvte", "--out", str(out), "--steps", "2", "--batch-size", "1", "--no-progress"]

    calls, handle = _forwards(model)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (model, processor, {}))
    line = _one_cli_error(capsys, [*argv, "--width", str(d // 2 + 1)])
    assert f"--width {d // 2 + 1}" in line and f"width {d // 2}" in line and "state.pt" in line and "--out" in line

    other, _ = build_untrained_tiny_llava(seed=0, text_layers=L + 1)  # same width, one more layer
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (other, processor, {}))
    line = _one_cli_error(capsys, argv)
    assert f"{d} x {L} layers" in line and f"{d} x {L + 1} layers" in line and "state.pt" in line and "--out" in line
    handle.remove()
    assert not calls and (out / "state.pt").read_bytes() == saved


def test_a_kill_during_a_save_leaves_the_last_state_whole(tmp_path, monkeypatch):
    """state.pt goes to a temporary file renamed over it: a save cut short (here half written, then Ctrl-C)
    leaves the previous state loadable, and no temporary file behind."""
    model, processor = build_untrained_tiny_llava(seed=0)
    out = tmp_path / "run"
    common = dict(batch_size=1, out=str(out), progress=False, save_every=1)
    train(TrainSettings(steps=1, **common), model=model, processor=processor)
    real_save = torch.save

    def killed_halfway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        train(TrainSettings(steps=2, **common), model=model, processor=processor)
    monkeypatch.undo()
    assert torch.load(out / "state.pt", weights_only=False)["step"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS[:-1] + ("exit_curve.json", "state.pt"))


def test_no_progress_bar_when_no_one_watches(tmp_path, capfd):
    """Output captured (a CI log): no tqdm bar on stderr even with progress on."""
    model, processor = build_untrained_tiny_llava(seed=0)
    train(TrainSettings(steps=1, batch_size=1, out=str(tmp_path / "run"), progress=True), model=model,
          processor=processor)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("field, value, why", [
    ("step", "x", "'x', expected a whole number >= 0"),
    ("step", -1, "-1, expected a whole number >= 0"),
    ("optimizer", {"bad": 1}, "KeyError"),
    ("counts", {"labels": []}, "expected 'labels'"),
    ("rng", "x", "Random.setstate()"),
])
def test_resume_from_a_state_with_a_malformed_field_is_one_line(tmp_path, monkeypatch, capsys, field, value, why):
    """A state.pt that loads but holds a malformed field: one line naming the file, the field and the fix, before
    any step; the state is left as it was."""
    from vtprune import loading

    model, processor = build_untrained_tiny_llava(seed=0)
    out = tmp_path / "run"
    train(TrainSettings(steps=1, batch_size=1, out=str(out), progress=False), model=model, processor=processor)
    state = torch.load(out / "state.pt", weights_only=False)
    torch.save({**state, field: value}, out / "state.pt")
    saved = (out / "state.pt").read_bytes()
    calls, handle = _forwards(model)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (model, processor, {}))
    line = _one_cli_error(capsys, ["train-dyvte", "--out", str(out), "--steps", "2", "--batch-size", "1",
                                   "--no-progress"])
    handle.remove()
    assert f"cannot resume from {out / 'state.pt'}: its {field!r} is malformed" in line and why in line
    assert "delete it" in line and "--out" in line
    assert not calls and (out / "state.pt").read_bytes() == saved


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_exit_logits_on_qwen_use_the_models_3d_positions(models, family):
    """With the image keys masked, a text token's exit logits equal the language model run on the text tokens
    alone at their M-RoPE positions (images never reach text rows; DeepStack only touches image rows)."""
    from vtprune.adapters import get_adapter
    from vtprune.training.dyvte import exit_logits

    from ..conftest import collate, make_prompt
    from ..helpers import merged_embeds

    model = models(family)
    batch = collate([make_prompt(model, family, 5, seed=2, n_images=2)])
    adapter = get_adapter(model)
    with torch.no_grad():
        embeds = merged_embeds(model, batch)
        got = exit_logits(model, adapter, embeds, batch, layer=-1)[0]
        text = batch["input_ids"][0] != model.config.image_token_id
        pos, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                            image_grid_thw=batch["image_grid_thw"])
        out = model.model.language_model(inputs_embeds=embeds[:, text], position_ids=pos[:, :, text],
                                         attention_mask=torch.ones(1, int(text.sum()), dtype=torch.long))
        expected = model.lm_head(out.last_hidden_state)[0]
    torch.testing.assert_close(got[text], expected, atol=1e-5, rtol=0)


def test_training_batches_carry_qwen_grids_and_token_types():
    """A Qwen-VL processor's output (patch rows of different lengths, image_grid_thw, mm_token_type_ids) becomes one
    right-padded batch the model takes: rows concatenated, grids kept, token types padded like the ids."""
    from vtprune.embedded.tiny_llava import encode_training_batch

    class Tok:
        eos_token_id, pad_token_id = 2, 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [7] * len(text.split())}

    class Proc:
        tokenizer = Tok()

        def __call__(self, images, text, return_tensors=None):
            return {"input_ids": [[5, 100, 100, 6], [5, 100, 100, 100, 100, 6]],
                    "mm_token_type_ids": [[0, 1, 1, 0], [0, 1, 1, 1, 1, 0]],
                    "pixel_values": [torch.ones(8, 12), torch.zeros(16, 12)],
                    "image_grid_thw": [[1, 2, 4], [1, 4, 4]]}

    batch = encode_training_batch(Proc(), [None, None], ["a", "b"], ["yes", "no no"])
    assert batch["pixel_values"].shape == (24, 12) and batch["image_grid_thw"].tolist() == [[1, 2, 4], [1, 4, 4]]
    assert batch["mm_token_type_ids"].tolist() == [[0, 1, 1, 0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0, 0, 0, 0]]
    assert batch["input_ids"].shape == batch["mm_token_type_ids"].shape
