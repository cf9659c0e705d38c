"""The embedded tiny LLaVA: tokenizer/processor, offline save -> from_pretrained, training step, shipped checkpoint."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch

from vtprune.embedded import synthetic as S
from vtprune.embedded import tiny_llava as TL
from vtprune.benchmarks.prompts import build_prompt

ASSETS = Path(TL.__file__).resolve().parent.parent / "assets"
SHIPPED = TL.DEFAULT_ASSET_DIR
HAS_CKPT = (SHIPPED / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    return TL.build_untrained_tiny_llava(seed=0)


def test_tokenizer_special_tokens_and_vocabulary(untrained):
    _, proc = untrained
    tok = proc.tokenizer
    assert tok.image_token == "<image>" and tok.image_token_id == TL.IMAGE_ID == 4
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    ids = tok("Is there a RED circle?")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + 6
    assert tok.decode(ids, skip_special_tokens=True) == "is there a red circle ?"
    # every word the generator and the prompts can produce is in the vocabulary
    for s in S.validation_samples(300):
        for style in ("llava_v1", "chat_template"):
            text = build_prompt(s.question, benchmark=s.style, style=style, processor=proc)
            assert tok.unk_token_id not in tok(text + " " + s.answer)["input_ids"], text


def test_processor_expands_image_tokens(untrained):
    _, proc = untrained
    img = S.validation_samples(1)[0].image
    prompt = build_prompt("How many squares are there?", processor=proc)
    enc = proc(images=img, text=prompt, return_tensors="pt")
    assert enc["pixel_values"].shape == (1, 3, S.IMAGE_SIZE, S.IMAGE_SIZE)
    ids = enc["input_ids"][0].tolist()
    assert ids.count(TL.IMAGE_ID) == TL.NUM_IMAGE_TOKENS == 144
    first = ids.index(TL.IMAGE_ID)
    assert ids[first:first + 144] == [TL.IMAGE_ID] * 144   # contiguous block
    chat = build_prompt("How many squares are there?", style="chat_template", processor=proc)
    assert chat == "USER: <image>\nHow many squares are there?\nAnswer the question using a single word or phrase. ASSISTANT:"


def test_model_config(untrained):
    model, _ = untrained
    cfg = model.config
    assert cfg.image_seq_length == 144 and cfg.vision_feature_layer == -2
    assert cfg.vision_feature_select_strategy == "default"
    assert (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 == 144
    assert sum(p.numel() for p in model.parameters()) * 4 < 30e6


def test_save_and_from_pretrained_roundtrip_offline(untrained, tmp_path):
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    model, proc = untrained
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    m2 = LlavaForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True).eval()
    p2 = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert type(p2).__name__ == "LlavaProcessor"
    assert type(p2.image_processor).__name__ == "CLIPImageProcessorPil"
    assert p2.tokenizer.image_token_id == TL.IMAGE_ID
    assert AutoTokenizer.from_pretrained(tmp_path, local_files_only=True).image_token_id == TL.IMAGE_ID
    s = S.validation_samples(2)
    prompts = [build_prompt(x.question, benchmark=x.style, processor=proc) for x in s]
    e1 = proc(images=[x.image for x in s], text=prompts, return_tensors="pt", padding=True)
    e2 = p2(images=[x.image for x in s], text=prompts, return_tensors="pt", padding=True)
    assert torch.equal(e1["input_ids"], e2["input_ids"])
    assert torch.allclose(e1["pixel_values"], e2["pixel_values"])
    assert build_prompt("q", style="chat_template", processor=p2) == build_prompt("q", style="chat_template",
                                                                                     processor=proc)
    with torch.inference_mode():
        assert torch.allclose(model(**e1).logits, m2(**e2).logits, atol=1e-5)
    m3, p3 = TL.load_tiny_llava(tmp_path)
    assert m3.config.image_seq_length == 144 and p3.tokenizer.image_token_id == TL.IMAGE_ID


def test_load_tiny_llava_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tiny-llava checkpoint"):
        TL.load_tiny_llava(tmp_path / "nothing")


def test_training_batch_masks_prompt(untrained):
    _, proc = untrained
    s = S.validation_samples(3)
    prompts = [build_prompt(x.question, benchmark=x.style, processor=proc) for x in s]
    b = TL.encode_training_batch(proc, [x.image for x in s], prompts, [x.answer for x in s])
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    for i, x in enumerate(s):
        lab = b["labels"][i][b["labels"][i] != -100].tolist()
        assert lab == proc.tokenizer(x.answer, add_special_tokens=False)["input_ids"] + [TL.EOS_ID]
        n = int(b["attention_mask"][i].sum())
        assert b["input_ids"][i, n - 1] == TL.EOS_ID and (b["input_ids"][i, n:] == TL.PAD_ID).all()


def test_training_step_smoke():
    """Three optimiser steps on a small untrained model: finite loss, weights move, loss goes down."""
    model, proc = TL.build_untrained_tiny_llava(seed=1, vision_layers=2, text_layers=2)
    torch.manual_seed(0)
    s = S.validation_samples(4)
    prompts = [build_prompt(x.question, benchmark=x.style, processor=proc) for x in s]
    batch = TL.encode_training_batch(proc, [x.image for x in s], prompts, [x.answer for x in s])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.lm_head.weight.detach().clone()
    losses = [TL.training_step(model, batch, opt) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert not torch.equal(before, model.lm_head.weight)


def test_greedy_answers_batched_equals_single(untrained):
    model, proc = untrained
    s = S.validation_samples(4)
    prompts = [build_prompt(x.question, benchmark=x.style, style=st, processor=proc)
               for x, st in zip(s, ["llava_v1", "chat_template"] * 2)]  # different lengths -> left padding
    imgs = [x.image for x in s]
    batched = TL.greedy_answers(model, proc, imgs, prompts, max_new_tokens=3)
    single = [TL.greedy_answers(model, proc, [i], [p], max_new_tokens=3)[0] for i, p in zip(imgs, prompts)]
    assert batched == single
    assert proc.tokenizer.padding_side == "right"   # restored


def test_deepen_language_model_keeps_outputs_and_cache():
    """Block expansion: the grown model decodes exactly like the original (prefill and cached steps)."""
    model, proc = TL.build_untrained_tiny_llava(seed=4, vision_layers=2, text_layers=3)
    torch.manual_seed(3)
    for p in model.parameters():  # non-trivial weights, so that a misplaced layer would show
        p.data.add_(0.02 * torch.randn_like(p))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grown = TL.deepen_language_model(model, [0, 2, 2])
    n = model.config.text_config.num_hidden_layers
    layers = grown.get_decoder().layers
    assert grown.config.text_config.num_hidden_layers == len(layers) == n + 3
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(n + 3))  # one KV-cache slot per layer
    copies = [1, 4, 5]  # new layers sit after old layers 0 and 2 (twice)
    for i in copies:
        assert not layers[i].self_attn.o_proj.weight.any() and not layers[i].mlp.down_proj.weight.any()
        assert layers[i].self_attn.q_proj.weight.any()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched
    s = S.validation_samples(2)
    prompts = [build_prompt(x.question, benchmark=x.style, processor=proc) for x in s]
    proc.tokenizer.padding_side = "left"
    inputs = proc(images=[x.image for x in s], text=prompts, return_tensors="pt", padding=True)
    kw = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        ref, out = model.generate(**inputs, **kw), grown.generate(**inputs, **kw)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.scores, out.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        TL.deepen_language_model(model, [n])


# --------------------------------------------------------------------------- shipped checkpoint

needs_ckpt = pytest.mark.skipif(not HAS_CKPT, reason="tiny-llava checkpoint not shipped yet")
# Floors for the shipped checkpoint, set below its measured numbers with a margin (GQA subset of 40: 87.5%;
# subset of 80: 91.25% with the images, 23.75% with black images).
SHIPPED_GQA_FLOOR = 75.0
SHIPPED_IMAGE_GAIN = 50.0


@needs_ckpt
def test_shipped_checkpoint_files():
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "processor_config.json", "MODEL_CARD.md"):
        assert (SHIPPED / name).is_file(), name
    assert (SHIPPED / "model.safetensors").stat().st_size <= 30e6
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total < 35e6
    card = (SHIPPED / "MODEL_CARD.md").read_text()
    assert "GQA-style exact match" in card and "MME-style total" in card


@needs_ckpt
def test_shipped_checkpoint_answers_heldout_questions():
    """Loads offline and answers held-out questions with vocabulary words, in both prompt styles.

    The floor leaves a margin below the measured numbers (MODEL_CARD.md: 92.0% GQA-style / 88.0% MME-style
    on the full held-out sets, 87.5% on this subset).
    """
    from vtprune.benchmarks.gqa import load_gqa
    from vtprune.benchmarks.mme import load_mme, parse_yes_no

    model, proc = TL.load_tiny_llava()
    assert model.config.image_seq_length == 144
    gqa_q = load_gqa(ASSETS / "synthetic_gqa", limit=40)
    mme_q = load_mme(ASSETS / "synthetic_mme", subtasks=["color"])[:20]
    vocab = set(proc.tokenizer.get_vocab())
    for style in ("llava_v1", "chat_template"):
        res = TL.evaluate(model, proc, mme_questions=mme_q, gqa_questions=gqa_q, style=style, max_new_tokens=4)
        assert all(a and " " not in a and a in vocab for a in res["gqa_predictions"]), res["gqa_predictions"]
        assert all(parse_yes_no(a) in ("yes", "no") for a in res["mme_predictions"]), res["mme_predictions"]
        assert res["gqa"].accuracy >= SHIPPED_GQA_FLOOR, res["gqa"].format()
        assert res["mme"].subtasks["color"].n_questions == 20


@needs_ckpt
def test_shipped_checkpoint_uses_the_image(tmp_path):
    """The same questions on black images must score clearly lower: the answers depend on the visual tokens."""
    import dataclasses

    from PIL import Image

    from vtprune.benchmarks.gqa import load_gqa

    model, proc = TL.load_tiny_llava()
    questions = load_gqa(ASSETS / "synthetic_gqa", limit=80)
    black = tmp_path / "black.png"
    Image.new("RGB", (S.IMAGE_SIZE, S.IMAGE_SIZE)).save(black)
    blind = [dataclasses.replace(q, image_path=black) for q in questions]
    seen = TL.evaluate(model, proc, gqa_questions=questions, max_new_tokens=4)["gqa"].accuracy
    unseen = TL.evaluate(model, proc, gqa_questions=blind, max_new_tokens=4)["gqa"].accuracy
    assert seen >= unseen + SHIPPED_IMAGE_GAIN, (seen, unseen)


def test_multi_turn_batch_and_training_accuracy():
    model, proc = TL.build_untrained_tiny_llava(seed=2, vision_layers=2, text_layers=2)
    convs = [next(S.training_conversations(0)) for _ in range(1)] + \
        [c for c, _ in zip(S.training_conversations(1), range(2))]
    prompts = [build_prompt(c.turns[0][0], benchmark=c.turns[0][3], processor=proc) for c in convs]
    from vtprune.benchmarks.prompts import question_text

    follow = [[(question_text(q, k), a) for q, a, _f, k in c.turns[1:]] for c in convs]
    b = TL.encode_training_batch(proc, [c.image for c in convs], prompts, [c.turns[0][1] for c in convs], follow)
    tok = proc.tokenizer
    for i, c in enumerate(convs):
        lab = b["labels"][i][b["labels"][i] != -100].tolist()
        want = []
        for _q, a, _f, _k in c.turns:
            want += tok(a, add_special_tokens=False)["input_ids"] + [TL.EOS_ID]
        assert lab == want
        ids = b["input_ids"][i][b["attention_mask"][i].bool()].tolist()
        assert ids.count(tok.convert_tokens_to_ids(":")) == 2 * len(c.turns)   # "user :" ... "assistant :"
        assert ids.count(TL.IMAGE_ID) == 144
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, acc = TL.training_step(model, b, opt, return_accuracy=True)
    assert loss > 0 and 0.0 <= acc <= 1.0
