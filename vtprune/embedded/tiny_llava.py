"""The embedded tiny LLaVA-1.5-style model (CLIP vision tower + Llama LM) and its processor.

* :func:`build_tokenizer` -- a word-level ``tokenizers`` tokenizer over the synthetic
  vocabulary plus the LLaVA-1.5 prompt words, wrapped in ``PreTrainedTokenizerFast``
  (``tok.image_token`` / ``tok.image_token_id`` work).
* :func:`build_processor` -- ``LlavaProcessor`` = that tokenizer + ``CLIPImageProcessorPil``
  (96 px, patch 8 -> 12 x 12 = 144 visual tokens) + a USER/ASSISTANT chat template.
* :func:`build_untrained_tiny_llava` -- random-init ``LlavaForConditionalGeneration``.
* :func:`load_tiny_llava` -- the trained checkpoint shipped in ``vtprune/assets/tiny-llava``.
* :func:`encode_training_batch` / :func:`training_step` -- used by
  ``scripts/train_tiny_llava.py`` (loss on answer tokens only).
* :func:`greedy_answers` -- batched greedy decoding (left padding) returning strings.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..eval.tasks.prompts import MME_SUFFIX, SHORT_ANSWER, VICUNA_SYSTEM, build_prompt
from . import synthetic

__all__ = [
    "SPECIAL_TOKENS",
    "IMAGE_SIZE",
    "PATCH_SIZE",
    "NUM_IMAGE_TOKENS",
    "CHAT_TEMPLATE",
    "DEFAULT_ASSET_DIR",
    "vocabulary",
    "build_tokenizer",
    "build_image_processor",
    "build_processor",
    "build_config",
    "build_untrained_tiny_llava",
    "deepen_language_model",
    "load_tiny_llava",
    "encode_training_batch",
    "training_step",
    "greedy_answers",
    "evaluate",
]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_ID = range(5)
IMAGE_SIZE = synthetic.IMAGE_SIZE      # 96
PATCH_SIZE = 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2   # 144 (CLS dropped by the "default" strategy)
DEFAULT_ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-llava"

# Renders "USER: <image>\n{text} ASSISTANT:" (llava-hf style, no system prompt unless one is given).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %} "
    "{% else %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %} "
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_EXTRA_TEXTS = (VICUNA_SYSTEM, SHORT_ANSWER, MME_SUFFIX, "USER: ASSISTANT: SYSTEM:",
                "the a an is are what which how many there yes no image shown")


# --------------------------------------------------------------------------- tokenizer / processor

def _normalizer_and_pretokenizer():
    from tokenizers import normalizers, pre_tokenizers

    return (normalizers.Lowercase(),
            pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]))


def vocabulary() -> list[str]:
    """Special tokens first (fixed ids 0..4), then every word of the synthetic data and prompts, sorted."""
    norm, pre = _normalizer_and_pretokenizer()
    words: set[str] = set()
    for text in list(synthetic.vocabulary_texts()) + list(_EXTRA_TEXTS):
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    words -= set(SPECIAL_TOKENS)
    return list(SPECIAL_TOKENS) + sorted(words)


def build_tokenizer():
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = _normalizer_and_pretokenizer()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, model_max_length=512,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_image_processor():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                 crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def build_processor():
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=build_image_processor(), tokenizer=build_tokenizer(),
                          patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


# --------------------------------------------------------------------------- model

def build_config(vocab_size: int, *, vision_layers: int = 4, vision_hidden: int = 128,
                 text_layers: int = 4, text_hidden: int = 256, heads: int = 4):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vc = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                          num_hidden_layers=vision_layers, num_attention_heads=heads,
                          image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    tc = LlamaConfig(vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=int(text_hidden * 2.6875),
                     num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=heads,
                     max_position_embeddings=512, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                     pad_token_id=PAD_ID, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_ID,
                       image_seq_length=NUM_IMAGE_TOKENS, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


def build_untrained_tiny_llava(seed: int = 0, **config_overrides):
    """Random-init (model, processor); ``config_overrides`` go to :func:`build_config` (layers, widths)."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    processor = build_processor()
    cfg = build_config(len(processor.tokenizer), **config_overrides)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(copy.deepcopy(cfg))
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                                               do_sample=False, num_beams=1, max_new_tokens=16)
    return model.eval(), processor


def load_tiny_llava(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                    attn_implementation: str | None = None):
    """(model, processor) from ``path`` (default: the shipped ``vtprune/assets/tiny-llava``), offline."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path) if path is not None else DEFAULT_ASSET_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no tiny-llava checkpoint at {path} (expected {path / 'config.json'}); "
                                "train one with scripts/train_tiny_llava.py")
    kw = {"dtype": dtype, "local_files_only": True}
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    model = LlavaForConditionalGeneration.from_pretrained(path, **kw).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


def deepen_language_model(model, after: Sequence[int]):
    """A copy of ``model`` whose Llama stack has one more layer after each index in ``after``.

    Block expansion as in LLaMA Pro (Wu et al., 2024, Sec. 3): each new layer is a copy of
    the layer before it with ``o_proj`` and ``down_proj`` zeroed, so both residual branches
    add nothing and the grown model computes exactly what ``model`` did; training then
    uses the extra depth.  ``after`` holds indices of the current layers (repeats allowed).
    Returns a new model; ``model`` is left untouched.
    """
    from transformers import LlavaForConditionalGeneration

    n_old = model.config.text_config.num_hidden_layers
    bad = [i for i in after if not 0 <= i < n_old]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for a {n_old}-layer language model")
    sources: list[tuple[int, bool]] = []  # (old layer index, is a new identity copy) per new layer
    for i in range(n_old):
        sources.append((i, False))
        sources += [(i, True)] * list(after).count(i)
    cfg = copy.deepcopy(model.config)
    cfg.text_config.num_hidden_layers = len(sources)
    if getattr(cfg.text_config, "layer_types", None):
        cfg.text_config.layer_types = [cfg.text_config.layer_types[i] for i, _ in sources]
    grown = LlavaForConditionalGeneration(cfg).to(next(model.parameters()).dtype)
    grown.generation_config = copy.deepcopy(model.generation_config)
    old_layers = model.get_decoder().layers
    new_layers = grown.get_decoder().layers
    old_state = {k: v for k, v in model.state_dict().items() if ".layers." not in k or "language_model" not in k}
    missing, unexpected = grown.load_state_dict(old_state, strict=False)
    if unexpected or any("language_model.layers." not in k for k in missing):
        raise RuntimeError(f"state mismatch while deepening: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for new, (i, is_copy) in zip(new_layers, sources):
            new.load_state_dict(old_layers[i].state_dict())
            if is_copy:
                new.self_attn.o_proj.weight.zero_()
                new.mlp.down_proj.weight.zero_()
    return grown.eval()


# --------------------------------------------------------------------------- training helpers

def encode_training_batch(processor, images: Sequence, prompts: Sequence[str], answers: Sequence[str],
                          followups: Sequence[Sequence[tuple[str, str]]] | None = None) -> dict:
    """Right-padded batch: prompt ids (image placeholders expanded) + answer ids + ``</s>``.

    ``followups[i]`` optionally adds more turns to sample ``i``: ``(user_text, answer)``
    pairs rendered as ``USER: {user_text} ASSISTANT: {answer}</s>`` after the first
    answer (the Vicuna v1 multi-turn layout, which the chat template renders too).
    ``labels`` are -100 everywhere except the answer tokens and their closing ``</s>``.
    """
    tok = processor.tokenizer
    enc = processor(images=list(images), text=list(prompts), return_tensors=None)
    rows, labels = [], []
    for i, (ids, ans) in enumerate(zip(enc["input_ids"], answers)):
        a = tok(ans, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        row, lab = list(ids) + a, [-100] * len(ids) + a
        for user_text, answer in (followups[i] if followups else ()):
            q = tok(f"USER: {user_text} ASSISTANT:", add_special_tokens=False)["input_ids"]
            a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            row += q + a
            lab += [-100] * len(q) + a
        rows.append(row)
        labels.append(lab)
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    label_t = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(r)] = torch.tensor(r)
        label_t[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(r)] = 1
    pv = enc["pixel_values"]
    if "image_grid_thw" in enc:  # Qwen-VL: patch rows of every image, concatenated, with their grids
        return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t,
                "pixel_values": torch.cat([torch.as_tensor(p, dtype=torch.float32).reshape(-1, torch.as_tensor(p).shape[-1])
                                           for p in (pv if isinstance(pv, list) else [pv])]),
                "image_grid_thw": torch.as_tensor(enc["image_grid_thw"]).reshape(-1, 3),
                "mm_token_type_ids": _padded_types(enc.get("mm_token_type_ids"), input_ids)}
    pixel_values = torch.as_tensor(pv if not isinstance(pv, list) else torch.stack([torch.as_tensor(p) for p in pv]),
                                   dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixel_values, "labels": label_t}


def _padded_types(types, input_ids: torch.Tensor) -> torch.Tensor:
    """The processor's per-prompt mm_token_type_ids laid out like ``input_ids`` (answer and padding: text, 0)."""
    out = torch.zeros_like(input_ids)
    for i, row in enumerate(types or ()):
        out[i, : len(row)] = torch.as_tensor(row)
    return out


def training_step(model, batch: dict, optimizer, scheduler=None, max_grad_norm: float | None = 1.0,
                  return_accuracy: bool = False, extra_loss: Callable[[], torch.Tensor] | None = None):
    """One AdamW step on a batch from :func:`encode_training_batch`; returns the loss.

    With ``return_accuracy`` returns ``(loss, acc)`` where ``acc`` is the teacher-forced
    argmax accuracy on the labelled non-``</s>`` tokens (the answers).  ``extra_loss``
    (called after the forward pass, e.g. an auxiliary head on hooked features) is added
    to the language-model loss before the backward pass; the returned loss excludes it.
    """
    model.train()
    out = model(**batch)
    loss = out.loss
    total = loss if extra_loss is None else loss + extra_loss()
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if not return_accuracy:
        return float(loss.detach())
    with torch.no_grad():
        labels = batch["labels"][:, 1:]
        pred = out.logits[:, :-1].argmax(-1)
        sel = (labels != -100) & (labels != EOS_ID)
        acc = float((pred[sel] == labels[sel]).float().mean()) if sel.any() else float("nan")
    return float(loss.detach()), acc


# --------------------------------------------------------------------------- inference helpers

def _as_rgb(image):
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    return image


@torch.inference_mode()
def greedy_answers(model, processor, images: Sequence, prompts: Sequence[str], *, max_new_tokens: int = 16,
                   batch_size: int = 16) -> list[str]:
    """Greedy answers (special tokens removed, stripped) for image/prompt pairs, batched with left padding.

    ``images`` are PIL images or paths (opened batch by batch, converted to RGB).
    """
    model.eval()
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            imgs, texts = [_as_rgb(im) for im in images[i:i + batch_size]], list(prompts[i:i + batch_size])
            enc = processor(images=imgs, text=texts, return_tensors="pt", padding=True)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            out += [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = old_side
    return out


def evaluate(model, processor, *, mme_questions=None, gqa_questions=None, style: str = "llava_v1",
             max_new_tokens: int = 16, batch_size: int = 16) -> dict:
    """Run greedy decoding on loaded MME / GQA questions and score them.

    Returns ``{"mme": MMEReport, "mme_predictions": [...], "gqa": GQAReport, "gqa_predictions": [...]}``
    for whichever inputs were given.
    """
    from ..eval.tasks.gqa import score_gqa
    from ..eval.tasks.mme import score_mme

    res = {}
    if mme_questions:
        images = [q.image_path for q in mme_questions]
        prompts = [build_prompt(q.question, benchmark="mme", style=style, processor=processor) for q in mme_questions]
        preds = greedy_answers(model, processor, images, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        res["mme"], res["mme_predictions"] = score_mme(mme_questions, preds), preds
    if gqa_questions:
        images = [q.image_path for q in gqa_questions]
        prompts = [build_prompt(q.question, benchmark="gqa", style=style, processor=processor) for q in gqa_questions]
        preds = greedy_answers(model, processor, images, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        res["gqa"], res["gqa_predictions"] = score_gqa(gqa_questions, preds), preds
    return res
