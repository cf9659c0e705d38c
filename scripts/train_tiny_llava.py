#!/usr/bin/env python
"""Train the embedded tiny LLaVA from scratch on synthetic visual QA (CPU, one thread by default).

Two stages.  Stage 1 (``--vision-minutes``, optional) trains the CLIP vision tower alone
on dense per-patch targets (:class:`PatchAux`: what covers each 8x8 patch, whether an
object's centre lies in it, its row and column); the answer-token loss alone is too
sparse a signal for a from-scratch vision tower to learn shapes.  Stage 2 trains the
whole model on the questions: AdamW (lr 3e-4, weight decay 0.01), linear warm-up over
100 steps then cosine decay to 5% of the peak, batch 8 images, loss on the answer tokens
(and the closing ``</s>``) only, optionally plus ``--aux-weight`` x the stage-1 loss and
with the vision tower at ``--vision-lr-mult`` x the learning rate, and optionally plus
``--retrieval-weight`` x an attention-supervision loss that teaches one LM head
(``--retrieval-head``) to look at the object each question refers to.  Each image carries
``--turns`` questions as a multi-turn conversation (the first turn is exactly the
evaluation prompt; later turns reuse the image at ~20 extra tokens each).  Two
curricula: question families join one at a time in ``--family-order`` (after
``--family-min-steps`` once the training answer accuracy reaches ``--advance-acc``, at
the latest after ``--family-max-steps``), and the object limit per image starts at
``--start-objects`` and rises on the same accuracy rule, at the latest linearly up to
``--max-objects`` by ``--curriculum-frac`` of the run.  ``--init-from`` continues a
checkpoint.  Prompts in both the ``llava_v1`` (Vicuna system prompt) and the
``chat_template`` style.

Progress (for the schedule and the curriculum) is the larger of step/--max-steps and
elapsed/--minutes, so a time budget gives a complete schedule.  Every --eval-every
seconds the model is scored on a small held-out validation set (its own seed; MME-style
and GQA-style folders written under <out>/val) and the best checkpoint (by the mean of
GQA accuracy and MME total as % of max) is saved to <out>/best with save_pretrained.
At the end the best checkpoint is evaluated on the shipped held-out sets
(vtprune/assets/synthetic_mme and synthetic_gqa, regenerated into <out>/test if absent)
in both prompt styles and <out>/best/MODEL_CARD.md is written.  SIGINT/SIGTERM stop
training early but still run the final evaluation.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python scripts/train_tiny_llava.py --out runs/tiny-llava --threads 2 \\
        --vision-minutes 8 --vision-lr 1e-3 --aux-weight 0.3 --vision-lr-mult 0.3 --minutes 95
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from vtprune.adapters import get_adapter  # noqa: E402
from vtprune.embedded import synthetic  # noqa: E402
from vtprune.embedded import tiny_llava as TL  # noqa: E402
from vtprune.embedded.trainer import (PatchAux, ReadoutAux, RetrievalAux, Stop, drop_visual_tokens,  # noqa: E402
                                      lr_factor, patch_classes, pretrain_vision, referent_classes)  # noqa: F401
from vtprune.benchmarks.gqa import load_gqa  # noqa: E402
from vtprune.benchmarks.mme import load_mme  # noqa: E402
from vtprune.benchmarks.prompts import build_prompt, question_text  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "vtprune" / "assets"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "runs" / "tiny-llava"))
    p.add_argument("--minutes", type=float, default=75.0, help="training time budget (0 = none; needs --max-steps)")
    p.add_argument("--max-steps", type=int, default=0, help="step budget (0 = none)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--max-objects", type=int, default=synthetic.DEFAULT_MAX_OBJECTS)
    p.add_argument("--init-from", default=None,
                   help="checkpoint folder to continue from (fresh optimizer; pair with --family-order and "
                        "--start-objects to skip the curriculum)")
    p.add_argument("--deepen-after", default="",
                   help="with --init-from: comma-separated LM layer indices after which an identity copy of that "
                        "layer is inserted (LLaMA Pro block expansion; the grown model starts with the same outputs)")
    p.add_argument("--start-families", type=int, default=1, help="families enabled at the start of the curriculum")
    p.add_argument("--start-objects", type=int, default=1, help="object limit at the start of the curriculum")
    p.add_argument("--curriculum-frac", type=float, default=0.6,
                   help="fraction of the run by which images have up to --max-objects objects at the latest")
    p.add_argument("--advance-acc", type=float, default=0.85,
                   help="raise the object limit early once the training answer accuracy (last 50 steps) reaches this")
    p.add_argument("--family-order", default="color,shape,existence,ocr,position,count",
                   help="family curriculum: training starts with the first family and adds the next ones in order")
    p.add_argument("--family-min-steps", type=int, default=150,
                   help="steps a family set is trained before the next family may join on --advance-acc")
    p.add_argument("--family-max-steps", type=int, default=400,
                   help="steps after which the next family joins regardless of accuracy")
    p.add_argument("--describe-prob", type=float, default=0.0,
                   help="share of images with an extra 'list the objects' turn (dense auxiliary target)")
    p.add_argument("--aux-weight", type=float, default=0.0,
                   help="stage 2: weight of the stage-1 dense patch loss (PatchAux) on the vision features fed "
                        "to the projector; 0 = off")
    p.add_argument("--retrieval-head", default="",
                   help="stage 2: LAYER:HEAD of the LM head whose attention is supervised to fall on the object each "
                        "question refers to (RetrievalAux); empty = off")
    p.add_argument("--retrieval-weight", type=float, default=0.3, help="weight of the --retrieval-head loss")
    p.add_argument("--readout-weight", type=float, default=0.0,
                   help="with --retrieval-head: weight of ReadoutAux, linear heads that read the referred object's "
                        "attributes from the residual after that layer; 0 = off")
    p.add_argument("--vision-minutes", type=float, default=0.0,
                   help="stage 1: minutes of vision-tower pre-training on the dense patch targets (0 = none)")
    p.add_argument("--vision-lr", type=float, default=5e-4, help="stage-1 learning rate")
    p.add_argument("--vision-batch-size", type=int, default=32, help="stage-1 images per step")
    p.add_argument("--vision-lr-mult", type=float, default=1.0,
                   help="stage 2: learning-rate multiplier of the vision tower (e.g. 0.3 after stage 1)")
    p.add_argument("--turns", type=int, default=4, help="questions per image (multi-turn training examples)")
    p.add_argument("--mme-fraction", type=float, default=0.5, help="share of yes/no (MME-style) questions")
    p.add_argument("--text-fraction", type=float, default=0.25, help="share of OCR (glyph) images")
    p.add_argument("--chat-template-frac", type=float, default=0.4, help="share of chat_template-style prompts")
    p.add_argument("--keep-suffix-frac", type=float, default=0.1,
                   help="share of MME-style questions that keep ' Please answer yes or no.'")
    p.add_argument("--token-dropout", default="",
                   help="visual-token dropout, LO:HI: in a --token-dropout-prob share of the batches every image keeps "
                        "a random LO..HI fraction of its visual tokens (uniform), the others removed from the "
                        "sequence and the positions renumbered, as the pre-LLM pruners do (empty = off)")
    p.add_argument("--token-dropout-prob", type=float, default=0.5,
                   help="with --token-dropout: share of batches with dropout (those batches skip the retrieval and "
                        "read-out losses unless --token-dropout-aux)")
    p.add_argument("--token-dropout-object-bias", type=float, default=0.0,
                   help="with --token-dropout: added to the uniform [0, 1) keep score of patches that show an "
                        "object, so that object tokens are preferred (0 = uniformly random subsets)")
    p.add_argument("--token-dropout-aux", action="store_true",
                   help="with --token-dropout: keep the retrieval and read-out losses in dropout batches too (targets "
                        "moved onto the kept tokens; read-outs of a referent whose tokens are all gone are skipped), "
                        "so that the referent's position must be read from what survives")
    p.add_argument("--keep-snapshots", action="store_true",
                   help="also save the model at every validation run to <out>/snap-<step> (for selection by other "
                        "criteria than the validation score)")
    p.add_argument("--eval-every", type=float, default=150.0, help="seconds between validation runs")
    p.add_argument("--val-per-subtask", type=int, default=12, help="validation MME images per subtask")
    p.add_argument("--val-gqa", type=int, default=120, help="validation GQA questions")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--card-only", action="store_true", help="skip training; evaluate <out>/best and write its card")
    p.add_argument("--card-notes", default=None, help="markdown file appended to MODEL_CARD.md (e.g. known limitations)")
    p.add_argument("--target-gqa", type=float, default=90.0, help="GQA-style accuracy target (%%) stated in the card")
    p.add_argument("--target-mme", type=float, default=80.0, help="MME-style total target (%% of max) stated in the card")
    return p.parse_args(argv)


def parse_dropout(spec: str) -> tuple[float, float] | None:
    """``"LO:HI"`` (or one number) -> (lo, hi) keep fractions in (0, 1]; empty -> None."""
    if not spec:
        return None
    parts = [float(x) for x in spec.split(":")]
    lo, hi = (parts[0], parts[0]) if len(parts) == 1 else parts
    if not 0.0 < lo <= hi <= 1.0:
        raise SystemExit(f"--token-dropout: need 0 < LO <= HI <= 1, got {spec!r}")
    return lo, hi


def _on_signal(signum, frame):  # noqa: ARG001
    Stop.flag = True
    print(f"signal {signum}: stopping after this step", flush=True)


def val_sets(out: Path, per_subtask: int, n_gqa: int):
    vdir = out / "val"
    synthetic.write_mme(vdir / "mme", seed=synthetic.VALIDATION_SEED, per_subtask=per_subtask)
    synthetic.write_gqa(vdir / "gqa", seed=synthetic.VALIDATION_SEED, n_questions=n_gqa)
    return load_mme(vdir / "mme"), load_gqa(vdir / "gqa")


def test_sets(out: Path):
    mme_dir, gqa_dir = ASSETS / "synthetic_mme", ASSETS / "synthetic_gqa"
    if not (mme_dir.is_dir() and gqa_dir.is_dir()):
        mme_dir, gqa_dir = synthetic.write_heldout_assets(out / "test")
    return mme_dir, gqa_dir, load_mme(mme_dir), load_gqa(gqa_dir)


def combined(res: dict) -> float:
    return 0.5 * (res["gqa"].accuracy + res["mme"].total_percent)


def evaluate_ckpt(model, processor, mme_q, gqa_q, style="llava_v1", max_new_tokens=4):
    return TL.evaluate(model, processor, mme_questions=mme_q, gqa_questions=gqa_q, style=style,
                       max_new_tokens=max_new_tokens, batch_size=16)


def write_card(path: Path, state: dict, results: dict, mme_dir: Path, gqa_dir: Path, model,
               targets: tuple[float, float] = (90.0, 80.0), notes: str | None = None) -> None:
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        "# tiny-llava (vtprune test model)",
        "",
        "A ~{:.1f}M-parameter LLaVA-1.5-style model (`LlavaForConditionalGeneration`: CLIP vision tower + "
        "2-layer MLP projector + Llama LM) trained from scratch on CPU on vtprune's synthetic visual-QA data "
        "(`vtprune/benchmarks/synthetic.py`). It exists so that token-pruning methods can be tested and "
        "benchmarked offline; how much this checkpoint actually relies on its visual tokens is stated in the "
        "accuracy section below. It knows nothing about real images."
        .format(n_params / 1e6),
        "",
        "## Architecture",
        "",
        f"- vision: CLIP {cfg.vision_config.num_hidden_layers} layers x {cfg.vision_config.hidden_size}, "
        f"image {cfg.vision_config.image_size} px, patch {cfg.vision_config.patch_size} -> "
        f"**{cfg.image_seq_length} visual tokens** per image (`vision_feature_layer={cfg.vision_feature_layer}`, "
        f"strategy `{cfg.vision_feature_select_strategy}`)",
        f"- LM: Llama {cfg.text_config.num_hidden_layers} layers x {cfg.text_config.hidden_size}, "
        f"{cfg.text_config.num_attention_heads} heads, word-level vocabulary of {cfg.text_config.vocab_size} tokens "
        "(lower-cased, punctuation split; `<pad> <s> </s> <unk> <image>` = ids 0-4)",
        "- processor: `LlavaProcessor` = `CLIPImageProcessorPil` + `PreTrainedTokenizerFast`, with a "
        "`USER: <image>\\n... ASSISTANT:` chat template; loads offline with `AutoProcessor.from_pretrained`",
        f"- parameters: {n_params:,} (fp32 safetensors)",
        "",
        "## Training",
        "",
        f"- command: `{state['command']}`",
        *([f"- stage 1 (vision tower alone): {state['vision_stage'].get('minutes', 0):.1f} min, "
           f"{state['vision_stage'].get('images', 0):,} images, AdamW lr {state['vision_lr']} with the same "
           "warm-up and cosine decay, on dense per-patch targets from linear heads that are discarded afterwards: "
           "the class covering the patch (background down-weighted, colour+shape or glyph), the colour and the shape "
           "of shape patches separately, whether an object's "
           "centre lies in it, its row and column. At the end: object-patch class accuracy "
           f"{100 * state['vision_stage'].get('obj_acc', float('nan')):.1f}%, shape "
           f"{100 * state['vision_stage'].get('shape_acc', float('nan')):.1f}%, centre F1 "
           f"{state['vision_stage'].get('centre_f1', float('nan')):.2f} (training batches)"]
          if state.get("vision_stage") else []),
        *([f"- continued from `{state['init_from']}`"
           + (f", its language model first deepened by identity copies of layers {state['deepen_after']} (LLaMA Pro "
              "block expansion: `o_proj` and `down_proj` of each copy start at zero, so training starts from the same "
              "outputs)" if state.get("deepen_after") else "")]
          if state.get("init_from") else []),
        f"- {'stage 2 (whole model): ' if state.get('vision_stage') else ''}"
        f"seed {state['seed']}, {state['threads']} CPU thread(s), batch {state['batch_size']}, "
        f"AdamW lr {state['lr']} (warm-up {state['warmup']} steps, cosine decay to {state['min_lr_ratio']} x), "
        "loss on answer tokens only" + (f" plus {state['aux_weight']} x the dense patch loss of stage 1"
                                        if state.get("aux_weight") else "")
        + (f"; vision tower at {state['vision_lr_mult']} x the learning rate"
           if state.get("vision_lr_mult", 1.0) != 1.0 else "")
        + (f"; plus {state['retrieval_weight']} x an attention-supervision loss on LM head "
           f"{state['retrieval_head']} (layer:head): at the position that predicts each answer and at the question's last noun, -log of that head's "
           "attention mass on the patches of the object(s) the question refers to"
           if state.get("retrieval_head") else "")
        + (f"; plus {state['readout_weight']} x linear read-outs (discarded afterwards) of the referred object's "
           "colour, shape, horizontal and vertical third and glyph from the residual stream after that layer"
           if state.get("retrieval_head") and state.get("readout_weight") else ""),
        *([f"- visual-token dropout: in {int(100 * state.get('token_dropout_prob', 0.5))}% of the batches every image "
           f"kept a uniformly random {state['token_dropout'].replace(':', '-')} fraction of its visual tokens"
           + (f" (object patches preferred by +{state['token_dropout_object_bias']} on a uniform score)"
              if state.get("token_dropout_object_bias") else "")
           + ", the others removed from the sequence with positions renumbered (as the pre-LLM pruners do); "
           + ("the retrieval / read-out losses moved onto the kept tokens (skipped where the referent was gone)"
              if state.get("token_dropout_aux") else "those batches had no retrieval / read-out loss")]
          if state.get("token_dropout") else []),
        f"- data: fresh synthetic images generated on the fly (never repeated), {state.get('turns', 1)} questions per "
        f"image as a multi-turn conversation (the first turn is exactly the evaluation prompt), "
        f"{int(100 * state.get('mme_fraction', 0.5))}% yes/no (MME-style) and the rest one-word (GQA-style) questions",
        ("- all question families from the start; " if state.get("start_families", 1) >= len(synthetic.GQA_FAMILIES)
         else f"- family curriculum: questions of `{state.get('family_order', 'all families')}` join one family at "
              f"a time (after at least {state.get('family_min_steps', '-')} steps once the training answer accuracy "
              f"reaches {state.get('advance_acc', 0.85)}, at the latest after {state.get('family_max_steps', '-')} "
              "steps); ")
        + f"{int(100 * state.get('describe_prob', 0.0))}% of images add a last turn listing the objects left to right",
        f"- object curriculum: {state.get('start_objects', 1)} object(s) per image at most at the start; the limit rises by one when the training answer accuracy "
        f"reaches {state.get('advance_acc', 0.85)} and at the latest linearly to {state['max_objects']} objects by "
        f"{int(100 * state['curriculum_frac'])}% of the run; prompts {int(100 * (1 - state['chat_template_frac']))}% "
        f"`llava_v1`, {int(100 * state['chat_template_frac'])}% `chat_template`",
        f"- wall time: {state['elapsed_s'] / 60:.1f} min of training (evaluation excluded), {state['steps']} steps, "
        f"{state['samples']:,} images / {state.get('questions', state['samples']):,} questions seen",
        f"- selected checkpoint: step {state['best_step']} ({state['best_samples']:,} images / "
        f"{state.get('best_questions', state['best_samples']):,} questions, "
        f"{state['best_elapsed_s'] / 60:.1f} min) by validation score {state['best_val']:.2f} "
        "(mean of GQA accuracy and MME total % of max; validation seed "
        f"{synthetic.VALIDATION_SEED}, distinct from the test sets below)",
        "",
        "## Held-out accuracy (full 144 visual tokens, greedy decoding)",
        "",
        "Targets: GQA-style exact match >= {:.0f}% and MME-style total >= {:.0f}% of max. Status (`llava_v1`): {}."
        .format(targets[0], targets[1],
                "**met**" if (results["llava_v1"]["gqa"].accuracy >= targets[0]
                              and results["llava_v1"]["mme"].total_percent >= targets[1]) else "**NOT met**"),
        "",
        f"Test sets: `{mme_dir.name}` (MME release layout, seed {synthetic.MME_SEED}) and `{gqa_dir.name}` "
        f"(GQA layout, seed {synthetic.GQA_SEED}), shipped in `vtprune/assets/`; training used a different random "
        "stream. MME scoring = official rule (acc + acc+ per subtask); GQA = lmms-eval exact match.",
        "",
    ]
    for style, res in results.items():
        mme, gqa = res["mme"], res["gqa"]
        lines += [
            f"### prompt style `{style}`",
            "",
            f"- **GQA-style exact match: {gqa.accuracy:.1f}%** ({gqa.correct}/{gqa.n}; binary "
            f"{gqa.binary:.1f}%, open {gqa.open:.1f}%)",
            f"- **MME-style total (Perception, 5 subtasks): {mme.total:.1f} / {mme.total_max:.0f} = "
            f"{mme.total_percent:.1f}% of max**",
            "",
            "| MME subtask | acc | acc+ | score |",
            "|---|---|---|---|",
        ]
        for k, v in mme.subtasks.items():
            lines.append(f"| {k} | {v.acc:.1f} | {v.acc_plus:.1f} | {v.score:.1f} |")
        lines += ["", "| GQA family | accuracy | n |", "|---|---|---|"]
        for k, (a, n) in gqa.by_family.items():
            lines.append(f"| {k} | {a:.1f} | {n} |")
        lines.append("")
    if notes:
        lines += [notes.rstrip(), ""]
    lines += [
        "## Use",
        "",
        "```python",
        "from vtprune.embedded.tiny_llava import load_tiny_llava",
        "model, processor = load_tiny_llava()   # this folder, offline",
        "```",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def final_eval(out: Path, state: dict, targets=(90.0, 80.0), notes: str | None = None) -> dict:
    best = out / "best"
    model, processor = TL.load_tiny_llava(best)
    mme_dir, gqa_dir, mme_q, gqa_q = test_sets(out)
    results = {}
    for style in ("llava_v1", "chat_template"):
        t0 = time.time()
        results[style] = evaluate_ckpt(model, processor, mme_q, gqa_q, style=style, max_new_tokens=16)
        r = results[style]
        print(f"[test {style}] GQA {r['gqa'].accuracy:.2f}%  MME total {r['mme'].total:.1f}/"
              f"{r['mme'].total_max:.0f} ({r['mme'].total_percent:.1f}%)  ({time.time() - t0:.1f}s)", flush=True)
        print(r["mme"].format(), flush=True)
        print(r["gqa"].format(), flush=True)
    write_card(best / "MODEL_CARD.md", state, results, mme_dir, gqa_dir, model, targets, notes)
    (out / "test_results.json").write_text(json.dumps(
        {s: {"mme": r["mme"].to_dict(), "gqa": r["gqa"].to_dict()} for s, r in results.items()}, indent=1))
    print(f"wrote {best / 'MODEL_CARD.md'}", flush=True)
    return results


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "train_state.json"
    if args.card_only:
        notes = Path(args.card_notes).read_text() if args.card_notes else None
        final_eval(out, json.loads(state_file.read_text()), (args.target_gqa, args.target_mme), notes)
        return 0
    if not args.minutes and not args.max_steps:
        raise SystemExit("give --minutes and/or --max-steps")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    random.seed(args.seed)
    if args.init_from:
        # continue training a saved checkpoint (e.g. the shipped one) with a fresh optimizer and schedule
        model, processor = TL.load_tiny_llava(args.init_from)
        print(f"initialised from {args.init_from}", flush=True)
        if args.deepen_after:
            after = [int(i) for i in args.deepen_after.split(",") if i.strip()]
            model = TL.deepen_language_model(model, after)
            print(f"language model deepened to {model.config.text_config.num_hidden_layers} layers "
                  f"(identity copies after layers {after})", flush=True)
    elif args.deepen_after:
        raise SystemExit("--deepen-after grows a trained checkpoint: give --init-from too")
    else:
        model, processor = TL.build_untrained_tiny_llava(seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params:,}; visual tokens {model.config.image_seq_length}; threads {torch.get_num_threads()}",
          flush=True)
    aux = PatchAux(model) if (args.aux_weight > 0 or args.vision_minutes > 0) else None
    vision_stage = {}
    if args.vision_minutes > 0:
        vision_stage = pretrain_vision(model, processor, aux, args)
    if aux is not None and args.aux_weight <= 0:
        aux.remove()  # stage 1 only: stop the hook from holding on to every forward's features
        aux = None
    retrieval = readout = None
    if args.retrieval_head:
        layer, head = (int(x) for x in args.retrieval_head.split(":"))
        retrieval = RetrievalAux(model, layer, head, tokenizer=processor.tokenizer)
        if args.readout_weight > 0:
            readout = ReadoutAux(model, retrieval, layer)
    vision_ids = {id(p) for p in get_adapter(model).vision_tower.parameters()}
    params = (list(model.parameters()) + (list(aux.head.parameters()) if aux else [])
              + (list(readout.heads.parameters()) if readout else []))
    groups = []
    for is_vision in (False, True):
        for decay in (True, False):
            ps = [p for p in params if (id(p) in vision_ids) == is_vision and (p.ndim >= 2) == decay]
            groups.append({"params": ps, "weight_decay": args.weight_decay if decay else 0.0,
                           "lr_mult": args.vision_lr_mult if is_vision else 1.0})
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))
    val_mme, val_gqa = val_sets(out, args.val_per_subtask, args.val_gqa)

    cur_max = [args.start_objects]
    level, level_since = args.start_objects, 0
    accs: list[float] = []
    order = [f.strip() for f in args.family_order.split(",") if f.strip()]
    if sorted(order) != sorted(synthetic.GQA_FAMILIES):
        raise SystemExit(f"--family-order must list each of {synthetic.GQA_FAMILIES} once (got {order})")
    n_families, families_since = max(1, min(args.start_families, len(order))), 0
    stream = synthetic.training_conversations(args.seed, max_objects=lambda: cur_max[0],
                                              mme_fraction=args.mme_fraction, turns=args.turns,
                                              text_fraction=args.text_fraction,
                                              families=lambda: order[:n_families],
                                              describe_prob=args.describe_prob)
    style_rng = random.Random(f"styles-{args.seed}")
    dropout = parse_dropout(args.token_dropout)
    dropout_rng = random.Random(f"dropout-{args.seed}")
    kept_log: list[float] = []
    budget_s = args.minutes * 60.0
    state = {k: getattr(args, k) for k in ("seed", "threads", "batch_size", "lr", "warmup", "min_lr_ratio",
                                           "max_objects", "start_objects", "curriculum_frac", "chat_template_frac", "turns",
                                           "advance_acc", "mme_fraction", "family_order", "family_min_steps",
                                           "family_max_steps", "describe_prob", "aux_weight", "init_from",
                                           "start_families", "deepen_after", "retrieval_head", "retrieval_weight", "readout_weight",
                                           "token_dropout", "token_dropout_prob", "token_dropout_object_bias",
                                           "token_dropout_aux")}
    state["command"] = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv or sys.argv[1:]))
    state.update(vision_stage=vision_stage, vision_minutes=args.vision_minutes, vision_lr=args.vision_lr,
                 vision_lr_mult=args.vision_lr_mult)
    state.update(best_val=-1.0, best_step=0, best_samples=0, best_elapsed_s=0.0)
    t0 = time.time()
    last_eval = t0
    step = samples = questions = 0
    losses: list[float] = []
    history = []
    while True:
        elapsed = time.time() - t0
        progress = max(step / args.max_steps if args.max_steps else 0.0, elapsed / budget_s if budget_s else 0.0)
        done = progress >= 1.0 or Stop.flag
        if done or time.time() - last_eval >= args.eval_every:
            ev_t = time.time()
            res = evaluate_ckpt(model, processor, val_mme, val_gqa, max_new_tokens=3)
            score = combined(res)
            eval_s = time.time() - ev_t
            t0 += eval_s  # evaluation time does not count against the training budget
            elapsed = time.time() - t0
            fam = " ".join(f"{k}={a:.0f}" for k, (a, _) in res["gqa"].by_family.items())
            sub = " ".join(f"{k}={v.score:.0f}" for k, v in res["mme"].subtasks.items())
            print(f"[{elapsed:7.1f}s] EVAL step {step} samples {samples}: GQA {res['gqa'].accuracy:.1f}% "
                  f"MME {res['mme'].total_percent:.1f}% combined {score:.2f} | gqa {fam} | mme {sub} "
                  f"(eval {eval_s:.1f}s)", flush=True)
            history.append({"step": step, "samples": samples, "elapsed_s": elapsed, "gqa": res["gqa"].accuracy,
                            "mme_pct": res["mme"].total_percent, "combined": score})
            if score > state["best_val"]:
                state.update(best_val=score, best_step=step, best_samples=samples, best_questions=questions,
                             best_elapsed_s=elapsed)
                model.save_pretrained(out / "best")
                processor.save_pretrained(out / "best")
                print(f"           saved best -> {out / 'best'}", flush=True)
            if args.keep_snapshots:
                model.save_pretrained(out / f"snap-{step}")
                processor.save_pretrained(out / f"snap-{step}")
            state.update(steps=step, samples=samples, questions=questions, elapsed_s=elapsed, history=history)
            state_file.write_text(json.dumps(state, indent=1))
            last_eval = time.time()
            if done:
                break
        # family curriculum: one family at a time joins once the current mix is learnt (or after a while);
        # all families at once leave the yes/no questions at chance on this model size
        recent = sum(accs[-50:]) / 50 if len(accs) >= 50 else 0.0
        since = step - families_since
        if n_families < len(order) and (since >= args.family_max_steps
                                        or (since >= args.family_min_steps and recent >= args.advance_acc)):
            n_families, families_since = n_families + 1, step
            level, level_since = max(args.start_objects, level - 1), step
            print(f"[{time.time() - t0:7.1f}s] curriculum: families -> {order[:n_families]} (train acc "
                  f"{recent:.3f})", flush=True)
        # curriculum: object limit rises when the model masters the current level, and on a schedule
        if (level < args.max_objects and step - level_since >= 100 and len(accs) >= 50
                and sum(accs[-50:]) / 50 >= args.advance_acc):
            level, level_since = level + 1, step
            print(f"[{time.time() - t0:7.1f}s] curriculum: max objects -> {level} (train acc "
                  f"{sum(accs[-50:]) / 50:.3f})", flush=True)
        forced = args.start_objects + int((args.max_objects - args.start_objects) * min(1.0, progress / max(1e-9, args.curriculum_frac)))
        if forced > level:
            level, level_since = forced, step
        cur_max[0] = level
        batch = [next(stream) for _ in range(args.batch_size)]
        prompts, answers, followups = [], [], []
        for conv in batch:
            style = "chat_template" if style_rng.random() < args.chat_template_frac else "llava_v1"
            extra = []
            for j, (question, answer, _family, kind) in enumerate(conv.turns):
                bench = "gqa" if kind == "gqa" or style_rng.random() < args.keep_suffix_frac else "mme"
                if j == 0:
                    prompts.append(build_prompt(question, benchmark=bench, style=style, processor=processor))
                    answers.append(answer)
                else:
                    extra.append((question_text(question, bench), answer))
            followups.append(extra)
        enc = TL.encode_training_batch(processor, [c.image for c in batch], prompts, answers, followups)
        lr = args.lr * lr_factor(step, progress, args.warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        extra = []
        dropped = dropout is not None and dropout_rng.random() < args.token_dropout_prob
        if retrieval is not None and (not dropped or args.token_dropout_aux):
            retrieval.set_targets(batch, enc)  # on the full layout; remapped below for a dropout batch
        if dropped:
            model.train()
            enc = drop_visual_tokens(model, enc, dropout_rng, dropout, [c.scene for c in batch],
                                     args.token_dropout_object_bias)
            kept_log.append(sum(enc.pop("kept")) / len(batch))
            kept_rows = enc.pop("kept_rows")
            if retrieval is not None and args.token_dropout_aux:
                retrieval.remap(kept_rows)
        if aux is not None:
            aux.set_targets([c.scene for c in batch])
            extra.append(lambda: args.aux_weight * aux.loss())
        use_ret = retrieval is not None and (not dropped or args.token_dropout_aux)
        if use_ret:
            extra.append(lambda: args.retrieval_weight * retrieval.loss())
        if readout is not None and use_ret:
            readout.set_targets()
            extra.append(lambda: args.readout_weight * readout.loss())
        loss, acc = TL.training_step(model, enc, opt, return_accuracy=True,
                                     extra_loss=(lambda fs=tuple(extra): sum(f() for f in fs)) if extra else None)
        losses.append(loss)
        accs.append(acc)
        step += 1
        samples += len(batch)
        questions += sum(len(c.turns) for c in batch)
        if step % args.log_every == 0:
            aux_log = f" aux {aux.last:.3f} obj-acc {aux.metrics['obj_acc']:.3f}" if aux is not None else ""
            if retrieval is not None:
                aux_log += f" retrieval {retrieval.last:.3f} mass {retrieval.mass:.2f}"
            if readout is not None:
                aux_log += f" readout {readout.last:.3f}"
            if kept_log:
                aux_log += f" dropout {len(kept_log)}/{args.log_every} batches, kept {sum(kept_log) / len(kept_log):.0f}"
                kept_log.clear()
            print(f"[{time.time() - t0:7.1f}s] step {step} images {samples} loss {sum(losses) / len(losses):.4f} "
                  f"train-acc {sum(accs[-args.log_every:]) / args.log_every:.3f} lr {lr:.2e} max_objects "
                  f"{cur_max[0]}{aux_log} "
                  f"({samples / (time.time() - t0):.1f} images/s)", flush=True)
            losses.clear()
            del accs[:-200]
    print(f"training done: {step} steps, {samples} samples, {state['elapsed_s'] / 60:.1f} min; best step "
          f"{state['best_step']} (val {state['best_val']:.2f})", flush=True)
    final_eval(out, state, (args.target_gqa, args.target_mme),
               Path(args.card_notes).read_text() if args.card_notes else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
