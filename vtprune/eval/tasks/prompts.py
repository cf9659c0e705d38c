"""Prompt construction for MME / GQA evaluation.

Two styles:

* ``llava_v1`` -- the LLaVA-1.5 ``vicuna_v1`` conversation used for the paper numbers::

      <system> USER: <image>\\n<question>\\nAnswer the question using a single word or phrase. ASSISTANT:

  where ``<system>`` is the Vicuna system prompt.  For MME the stored question's
  " Please answer yes or no." sentence is removed first (also with a double space
  before it); GQA questions are used as they are.
* ``chat_template`` -- the processor's (or tokenizer's) own chat template applied to a
  single user turn holding the image and the same question text, with the generation
  prompt added (what lmms-eval's ``llava_hf`` does).  Without a template it falls back
  to the Vicuna-with-system conversation, like lmms-eval.
"""

from __future__ import annotations

import re

__all__ = [
    "VICUNA_SYSTEM",
    "SHORT_ANSWER",
    "MME_SUFFIX",
    "PROMPT_STYLES",
    "strip_mme_suffix",
    "question_text",
    "llava_v1_prompt",
    "chat_template_prompt",
    "build_prompt",
]

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SHORT_ANSWER = "Answer the question using a single word or phrase."
MME_SUFFIX = "Please answer yes or no."
PROMPT_STYLES = ("llava_v1", "chat_template")

_SUFFIX_RE = re.compile(r"\s*" + re.escape(MME_SUFFIX) + r"\s*$")


def strip_mme_suffix(question: str) -> str:
    """Remove the trailing " Please answer yes or no." (one or more spaces before it)."""
    return _SUFFIX_RE.sub("", question)


def question_text(question: str, benchmark: str = "gqa") -> str:
    """The user text: question (MME suffix removed) + newline + the short-answer instruction."""
    if benchmark.lower() == "mme":
        question = strip_mme_suffix(question)
    elif benchmark.lower() != "gqa":
        raise ValueError(f"unknown benchmark {benchmark!r}; expected 'mme' or 'gqa'")
    return f"{question}\n{SHORT_ANSWER}"


def llava_v1_prompt(text: str, image_token: str = "<image>", system: str = VICUNA_SYSTEM) -> str:
    """Vicuna v1 (SeparatorStyle.TWO) single-turn prompt with the image placeholder first."""
    return f"{system} USER: {image_token}\n{text} ASSISTANT:"


def _template_owner(processor):
    for obj in (processor, getattr(processor, "tokenizer", None)):
        if obj is not None and getattr(obj, "chat_template", None):
            return obj
    return None


def chat_template_prompt(processor, text: str, image_token: str | None = None) -> str:
    """Render ``text`` with one image through the processor's/tokenizer's chat template.

    Falls back to :func:`llava_v1_prompt` (Vicuna with system prompt) when neither has a template.
    """
    owner = _template_owner(processor) if processor is not None else None
    if image_token is None:
        image_token = getattr(processor, "image_token", None) or "<image>"
    if owner is None:
        return llava_v1_prompt(text, image_token=image_token)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def build_prompt(question: str, *, benchmark: str = "gqa", style: str = "llava_v1", processor=None) -> str:
    """Full prompt text for one benchmark question (the image placeholder included)."""
    text = question_text(question, benchmark)
    image_token = getattr(processor, "image_token", None) or "<image>"
    if style == "llava_v1":
        return llava_v1_prompt(text, image_token=image_token)
    if style == "chat_template":
        return chat_template_prompt(processor, text, image_token=image_token)
    raise ValueError(f"unknown prompt style {style!r}; expected one of {PROMPT_STYLES}")
