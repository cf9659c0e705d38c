"""scripts/train_tiny_llava.py: the dense patch targets of the vision stage and a few-step smoke run (no real training)."""

import importlib.util
import os
import random
from argparse import Namespace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from vtprune.embedded import synthetic as S
from vtprune.embedded import tiny_llava as TL

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_tiny_llava.py"


@pytest.fixture(scope="module")
def trainer():
    spec = importlib.util.spec_from_file_location("train_tiny_llava", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_patch_targets_name_class_and_centre_of_each_object(trainer):
    model, _ = TL.build_untrained_tiny_llava(seed=0)
    aux = trainer.PatchAux(model)
    # a large red circle centred in patch (row 2, col 3) and a green square centred in patch (row 8, col 9)
    scene = S.Scene((S.ShapeObj("circle", "red", 28, 20, 10), S.ShapeObj("square", "green", 76, 68, 8)))
    aux.set_targets([scene])
    grid = 96 // 8
    cls, centre = aux.targets[0].view(grid, grid), aux.centres[0].view(grid, grid)
    assert cls[2, 3] == S.LABEL_CLASSES.index("red circle")
    assert cls[8, 9] == S.LABEL_CLASSES.index("green square")
    assert cls[0, 11] == 0 and cls[11, 0] == 0  # empty corners are background
    assert set(torch.unique(cls).tolist()) == {0, S.LABEL_CLASSES.index("red circle"),
                                               S.LABEL_CLASSES.index("green square")}
    assert centre.sum() == 2 and centre[2, 3] == 1 and centre[8, 9] == 1
    # the colour and shape heads factor the class id as 1 + colour * n_shapes + shape
    for ci, color in enumerate(S.COLORS):
        for ki, kind in enumerate(S.SHAPES):
            assert S.LABEL_CLASSES[1 + ci * len(S.SHAPES) + ki] == f"{color} {kind}"


def test_glyph_patches_and_centre(trainer):
    model, _ = TL.build_untrained_tiny_llava(seed=0)
    aux = trainer.PatchAux(model)
    scene = S.random_scene(random.Random(3), text=True, max_objects=1)
    assert scene.glyph is not None and not scene.shapes
    aux.set_targets([scene])
    glyph_id = S.LABEL_CLASSES.index(scene.glyph.char)
    assert set(torch.unique(aux.targets).tolist()) == {0, glyph_id}
    assert aux.centres.sum() == 1
    assert aux.targets[0, aux.centres[0].argmax()] == glyph_id  # the glyph's centre patch shows the glyph


def test_vision_stage_smoke_trains_only_the_vision_tower(trainer):
    model, processor = TL.build_untrained_tiny_llava(seed=0)
    aux = trainer.PatchAux(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = Namespace(seed=0, vision_lr=1e-3, vision_minutes=0.02, vision_batch_size=2, text_fraction=0.5,
                     max_objects=2, warmup=1, min_lr_ratio=0.05, log_every=1)
    metrics = trainer.pretrain_vision(model, processor, aux, args)
    assert metrics["steps"] >= 1 and metrics["loss"] == metrics["loss"]  # ran and the loss is finite
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.vision_tower.") for n in changed)
    last = model.config.vision_config.num_hidden_layers - 1
    # the layer above vision_feature_layer=-2 never feeds the projector and is skipped
    assert not any(f"layers.{last}." in n for n in changed)
    # the early-exit hook is gone: a full forward works again
    model.model.vision_tower(pixel_values=torch.zeros(1, 3, 96, 96))


def test_referent_classes_name_what_the_answer_is_read_from(trainer):
    cls = S.LABEL_CLASSES.index
    ref = trainer.referent_classes
    assert ref("What color is the circle?", "color") == {cls(f"{c} circle") for c in S.COLORS}
    # in the colour family the colour word is the claim, not the referent
    assert ref(S.with_mme_suffix("Is the square blue?"), "color") == {cls(f"{c} square") for c in S.COLORS}
    assert ref(S.with_mme_suffix("Is the red circle on the left side of the image?"), "position") == {cls("red circle")}
    assert ref("What shape is the red object?", "shape") == {cls(f"red {k}") for k in S.SHAPES}
    assert ref("How many triangles are there?", "count") == {cls(f"{c} triangle") for c in S.COLORS}
    assert ref(S.with_mme_suffix("Are there exactly 3 objects in the image?"), "count") == set(range(1, 16))
    assert ref("Which letter is written in the image?", "ocr") == set(range(16, len(S.LABEL_CLASSES)))
    assert ref("Which objects are in the image?", "describe") == set()


def _training_batch(processor, seed: int, turns: int, text_fraction: float):
    """Three conversations of the training stream encoded as the trainer does: (conversations, batch)."""
    from vtprune.benchmarks.prompts import build_prompt, question_text

    stream = S.training_conversations(seed, max_objects=4, turns=turns, text_fraction=text_fraction)
    convs = [next(stream) for _ in range(3)]
    prompts = [build_prompt(c.turns[0][0], benchmark=c.turns[0][3], processor=processor) for c in convs]
    followups = [[(question_text(q, kind), a) for q, a, _f, kind in c.turns[1:]] for c in convs]
    batch = TL.encode_training_batch(processor, [c.image for c in convs], prompts, [c.turns[0][1] for c in convs],
                                     followups)
    return convs, batch


def test_retrieval_aux_recomputes_the_heads_attention(trainer):
    """The supervised head's attention, rebuilt from the hooked layer input, equals eager attention's weights."""
    model, processor = TL.build_untrained_tiny_llava(seed=5, vision_layers=2, text_layers=2)
    model.set_attn_implementation("eager")
    torch.manual_seed(0)
    for p in model.parameters():  # spread the untrained attention so that the comparison means something
        p.data.add_(0.05 * torch.randn_like(p))
    convs, batch = _training_batch(processor, seed=3, turns=4, text_fraction=0.3)
    ret = trainer.RetrievalAux(model, layer=1, head=2, tokenizer=processor.tokenizer)
    ret.set_targets(convs, batch)
    rows, cols = ret.queries
    n_turns = sum(bool(trainer.referent_classes(q, f)) for c in convs for q, _a, f, _k in c.turns)
    answer = (batch["labels"][rows, cols] == -100) & (batch["labels"][rows, cols + 1] != -100)
    words = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][rows, cols].tolist())
    assert 0 < int(answer.sum()) <= n_turns
    # every other query is the last noun of a question, never an answer word
    assert all(w in trainer.RetrievalAux.NOUNS for w, a in zip(words, answer) if not a)
    assert (batch["labels"][rows, cols][~answer] == -100).all() and int((~answer).sum()) > 0
    out = model(**batch, output_attentions=True)
    eager = out.attentions[1][rows, 2, cols]                     # (n, seq)
    torch.testing.assert_close(ret.attention(), eager, rtol=1e-4, atol=1e-6)
    visual = batch["input_ids"][rows] == model.config.image_token_id
    mass = (eager[visual].view(len(rows), -1) * ret.targets).sum(-1)
    loss = ret.loss()
    torch.testing.assert_close(loss, -(mass + 1e-6).log().mean(), rtol=1e-4, atol=1e-6)
    loss.backward()
    attn = model.model.language_model.layers[1].self_attn
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad[2 * 64:3 * 64].any()
    assert not attn.q_proj.weight.grad[:2 * 64].any()   # only the supervised head's rows
    ret.remove()
    assert ret.inputs is None
    model(**batch)
    assert ret.inputs is None                            # the hook is gone


def test_readout_labels_name_the_single_referent(trainer):
    """ReadoutAux asks, at each supervised position, for the referred object's attributes (unique referents only)."""
    from vtprune.benchmarks.prompts import build_prompt, question_text

    model, processor = TL.build_untrained_tiny_llava(seed=6, vision_layers=1, text_layers=2)
    scene = S.Scene((S.ShapeObj("circle", "red", 20, 70, 10), S.ShapeObj("square", "blue", 76, 20, 9),
                     S.ShapeObj("square", "green", 50, 50, 8)))
    turns = [("What color is the circle?", "red", "color", "gqa"),
             ("Is the blue square on the right or the left?", "right", "position", "gqa"),
             ("How many squares are there?", "2", "count", "gqa")]
    conv = S.Conversation(S.render_scene(scene), turns, scene)
    prompt = build_prompt(turns[0][0], benchmark="gqa", processor=processor)
    batch = TL.encode_training_batch(processor, [conv.image], [prompt], [turns[0][1]],
                                     [[(question_text(q, k), a) for q, a, _f, k in turns[1:]]])
    ret = trainer.RetrievalAux(model, layer=1, head=0, tokenizer=processor.tokenizer)
    readout = trainer.ReadoutAux(model, ret, layer=1)
    ret.set_targets([conv], batch)
    readout.set_targets()
    assert len(ret.queries[0]) == 6  # answer position + last noun, for each of the three turns
    names = list(readout.sizes)
    rows = [dict(zip(names, r)) for r in readout.labels.tolist()]
    red_circle = {"color": 0, "shape": 0, "hpos": 0, "vpos": 2, "glyph": -100}   # left third, bottom third
    blue_square = {"color": 2, "shape": 1, "hpos": 2, "vpos": 0, "glyph": -100}  # right third, top third
    assert rows == [red_circle, red_circle, blue_square, blue_square] + [dict.fromkeys(names, -100)] * 2
    model(**batch)
    loss = readout.loss()
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    layers = model.model.language_model.layers
    assert layers[1].mlp.down_proj.weight.grad.any() and layers[0].self_attn.q_proj.weight.grad.any()
    readout.remove()
    ret.remove()


def test_token_dropout_removes_visual_rows_and_renumbers(trainer):
    """--token-dropout: a random subset of each image's visual tokens leaves the sequence (labels kept aligned);
    the compacted batch equals the model run on exactly the kept tokens with contiguous positions."""
    from vtprune.benchmarks.prompts import build_prompt

    model, processor = TL.build_untrained_tiny_llava(seed=7, vision_layers=1, text_layers=2)
    scenes = [S.Scene((S.ShapeObj("circle", "red", 20, 70, 10),)), S.Scene((S.ShapeObj("square", "blue", 76, 20, 9),))]
    prompts = [build_prompt("What color is the circle?", processor=processor),
               build_prompt("What shape is the blue object? It is", processor=processor)]
    batch = TL.encode_training_batch(processor, [S.render_scene(s) for s in scenes], prompts, ["red", "square"])
    n = model.config.image_seq_length
    assert trainer.parse_dropout("") is None and trainer.parse_dropout("0.1:1") == (0.1, 1.0)
    with pytest.raises(SystemExit):
        trainer.parse_dropout("0:0.5")
    rng = random.Random(0)
    out = trainer.drop_visual_tokens(model, batch, rng, (0.1, 0.3), scenes, object_bias=2.0)
    kept = out["kept"]
    assert all(round(0.1 * n) <= k <= round(0.3 * n) for k in kept)
    lengths = out["attention_mask"].sum(1)
    assert lengths.tolist() == [int(batch["attention_mask"][i].sum()) - (n - kept[i]) for i in range(2)]
    # the answer labels survive, in order, and nothing else is labelled
    for i in range(2):
        assert out["labels"][i][out["labels"][i] != -100].tolist() == batch["labels"][i][batch["labels"][i] != -100].tolist()
    # with a large object bias every object patch is kept (both objects cover fewer patches than the budget)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=batch["pixel_values"], vision_feature_layer=-2,
                                               vision_feature_select_strategy="default", return_dict=True).pooler_output
    feats = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
    for i, scene in enumerate(scenes):
        obj = torch.from_numpy(trainer.patch_classes(scene, 12, 8, 1) > 0)
        image_rows = out["inputs_embeds"][i, : int(lengths[i])].detach()
        vis = feats[i * n:(i + 1) * n]
        present = torch.tensor([bool((image_rows == vis[j]).all(-1).any()) for j in range(n)])
        assert present.sum() == kept[i] and present[obj].all()
        assert torch.equal(image_rows[0], embeds[i, 0].detach())  # the text rows are unchanged
    # one forward on the compacted batch = the same tokens encoded without the dropped rows, positions contiguous
    model.eval()
    with torch.no_grad():
        loss = model(inputs_embeds=out["inputs_embeds"], attention_mask=out["attention_mask"], labels=out["labels"]).loss
        L = int(lengths[0])
        ref = model(inputs_embeds=out["inputs_embeds"][:1, :L], position_ids=torch.arange(L)[None]).logits
        got = model(inputs_embeds=out["inputs_embeds"], attention_mask=out["attention_mask"]).logits[:1, :L]
    assert torch.isfinite(loss)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # gradients reach the vision tower through the kept tokens
    model.train()
    out = trainer.drop_visual_tokens(model, batch, random.Random(1), (0.5, 0.5))
    out.pop("kept")
    model(**out).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("model.vision_tower.") and "patch_embedding" in n]
    assert grads and all(g is not None and g.any() for g in grads)


def test_retrieval_targets_follow_the_kept_tokens(trainer):
    """--token-dropout-aux: RetrievalAux.remap moves queries and referent masks onto the compacted batch."""
    model, processor = TL.build_untrained_tiny_llava(seed=8, vision_layers=1, text_layers=2)
    model.set_attn_implementation("eager")
    convs, batch = _training_batch(processor, seed=4, turns=3, text_fraction=0.0)
    ret = trainer.RetrievalAux(model, layer=1, head=1, tokenizer=processor.tokenizer)
    readout = trainer.ReadoutAux(model, ret, layer=1)
    ret.set_targets(convs, batch)
    rows, cols = (t.clone() for t in ret.queries)
    words = batch["input_ids"][rows, cols]
    full_targets = ret.targets.clone()
    out = trainer.drop_visual_tokens(model, batch, random.Random(2), (0.2, 0.4), [c.scene for c in convs])
    out.pop("kept")
    kept_rows = out.pop("kept_rows")
    ret.remap(kept_rows)
    new_rows, new_cols = ret.queries
    assert torch.equal(new_rows, rows)
    # the queries are the same tokens, now at their compacted index
    for n, (i, c) in enumerate(zip(rows.tolist(), new_cols.tolist())):
        assert int(kept_rows[i][c]) == int(cols[n])
    assert torch.equal(batch["input_ids"][rows, torch.stack([kept_rows[i][c] for i, c in zip(rows, new_cols)])], words)
    # each query's sequence mask marks exactly the referent patches that survived
    visual = batch["input_ids"] == model.config.image_token_id
    for n, i in enumerate(rows.tolist()):
        patches = visual[i].nonzero().squeeze(1)[full_targets[n]]
        survived = int(torch.isin(kept_rows[i], patches).sum())
        assert int(ret.seq_targets[n].sum()) == survived
        assert bool(ret.valid[n]) == (survived > 0)
    assert ret.valid.any() and not ret.valid.all()  # 20-40% kept uniformly: some referents vanish
    res = model(**out, output_attentions=True)
    eager = res.attentions[1][new_rows, 1, new_cols]
    torch.testing.assert_close(ret.attention(), eager, rtol=1e-4, atol=1e-6)
    mass = (eager * ret.seq_targets).sum(-1)[ret.valid]
    torch.testing.assert_close(ret.loss(), -(mass + 1e-6).log().mean(), rtol=1e-4, atol=1e-6)
    readout.set_targets()
    assert (readout.labels[~ret.valid] == -100).all()
    assert torch.isfinite(readout.loss())
    readout.remove()
    ret.remove()
