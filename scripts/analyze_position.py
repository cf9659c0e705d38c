#!/usr/bin/env python
"""Why do MME-style *position* questions collapse under visual-token pruning on the tiny LLaVA?

Runs the 60 questions of ``vtprune/assets/synthetic_mme/position`` (30 images, one Yes and one No
question each) under hand-built controls that separate the candidate mechanisms, plus the real
pruners through ``vtprune.prune``.  Every condition is one prefill; the answer is read from the
next-token logits at the last prompt position (the first greedy token decides the official MME parse:
``yes``/``no``, anything else is "other" and always wrong).

For each condition it prints

* ``MME``: official score (acc + acc+, max 200) from the first greedy token, and ``other``: how many of
  the 60 answers are neither yes nor no (e.g. "top", "left": the open GQA-style answer);
* ``forced``: the same score when the answer is forced to the larger of the yes/no logits (content only,
  no format failure), and the forced-choice accuracy of horizontal (left/right) and vertical
  (top/bottom) questions separately;
* ``belief``: under the forced choice, the share of questions answered as if the object were at the
  *top* (vertical questions) and on the *left* (horizontal questions); the truth is in the ``full`` row's
  ``truth`` column.

Conditions (keep k of the 144 visual tokens; random subsets are seeded per image, the same for the
image's two questions; "ref" = the patches that the referred object's pixels touch):

    full            nothing changed
    drop-renum      random k kept, removed from the sequence, positions renumbered (what `random` does)
    drop-orig       random k kept, removed, original position ids kept (gaps)
    zero-fill       random k kept, the other 144-k replaced by zero vectors in place (count, order and
                    position ids unchanged; only the features are gone)
    mean-fill       as zero-fill, with the mean of the image's 144 visual embeddings
    ref-renum/orig/zero   all ref patches kept plus random others up to k (oracle: the object's own tokens
                    are always present), then removed+renumbered / removed+original ids / zero-filled
    perm-pos        all 144 tokens in place, their position ids randomly permuted among them
    perm-seq        all 144 tokens, sequence order randomly permuted, each token keeps its own position id
    rev-pos         all tokens in place, visual position ids reversed
    rev-seq         sequence order reversed, each token keeps its own position id
    gap-before-k    all 144 tokens, the image and the text after it moved k positions later (a gap after
                    the system prompt); gap-after-k: only the text after the image moved k positions later
    squeeze-k       all 144 tokens in place, their position ids squeezed into k slots (floor(i*k/144)) and
                    the text after them renumbered from there (renumber's position change without a drop)
    api:<m>:<pos>   vtprune.prune(model, m, keep=k, positions=pos) (pos "default": the method's own)

    OMP_NUM_THREADS=1 .venv/bin/python scripts/analyze_position.py --keep 16,48 --out /work/runs/pos.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import vtprune  # noqa: E402
from vtprune.embedded import synthetic  # noqa: E402
from vtprune.embedded import tiny_llava as TL  # noqa: E402
from vtprune.benchmarks.prompts import build_prompt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MME_DIR = REPO / "vtprune" / "assets" / "synthetic_mme" / "position"
OPP = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def load_items(mme_dir: Path = MME_DIR):
    """[(image path, scene, referred object, [(question, gt, side word), (.., .., ..)])] for the 30 images.

    The scenes are regenerated from the generator's own random stream (as ``write_mme`` drew them) and
    checked against the shipped question files, so the referred object's patches are known exactly.
    """
    rng = random.Random(f"mme-{synthetic.MME_SEED}-position")
    items = []
    for i in range(30):
        scene, (yes, no) = synthetic._scene_for(rng, "position", synthetic.DEFAULT_MAX_OBJECTS, mme=True)
        lines = (mme_dir / f"{i:04d}.txt").read_text().strip().split("\n")
        qs = [tuple(line.split("\t")) for line in lines]
        assert qs[0][0] == synthetic.with_mme_suffix(yes.question) and qs[1][0] == synthetic.with_mme_suffix(no.question), i
        name = next(n for s, n in synthetic._referable(scene) if f"the {n} " in yes.question)
        obj = next(s for s, n in synthetic._referable(scene) if n == name)
        pairs = []
        for q, gt in qs:
            side = next(w for w in ("left", "right", "top", "bottom") if f" {w} " in q)
            pairs.append((q, gt.lower(), side))
        items.append((mme_dir / f"{i:04d}.png", scene, obj, pairs))
    return items


def ref_patches(scene, obj, grid: int = 12, patch: int = 8) -> torch.Tensor:
    """Indices (row-major) of the patches that any pixel of ``obj`` falls in."""
    lm = np.asarray(synthetic.label_map(scene), dtype=np.int64)
    cls = synthetic.LABEL_CLASSES.index(obj.name)
    hit = (lm == cls).reshape(grid, patch, grid, patch).any(axis=(1, 3)).reshape(-1)
    return torch.from_numpy(np.nonzero(hit)[0])


class Runner:
    def __init__(self, model, processor, style: str = "llava_v1"):
        self.model, self.processor, self.style = model, processor, style
        tok = processor.tokenizer
        self.yes, self.no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
        self.image_token_id = model.config.image_token_id
        self.tok = tok

    def encode(self, image_path, question):
        prompt = build_prompt(question, benchmark="mme", style=self.style, processor=self.processor)
        with Image.open(image_path) as im:
            enc = self.processor(images=[im.convert("RGB")], text=[prompt], return_tensors="pt")
        return enc

    @torch.inference_mode()
    def visual(self, enc):
        m = self.model.model
        feats = m.get_image_features(pixel_values=enc["pixel_values"], vision_feature_layer=self.model.config.vision_feature_layer,
                                     vision_feature_select_strategy=self.model.config.vision_feature_select_strategy,
                                     return_dict=True).pooler_output
        return torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])

    @torch.inference_mode()
    def logits(self, embeds: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Next-token logits after the last row of ``embeds`` [T, D] with position ids ``pos`` [T]."""
        lm = self.model.model.language_model
        out = lm(inputs_embeds=embeds[None], position_ids=pos[None].long(),
                 attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long))
        return self.model.lm_head(out.last_hidden_state[:, -1])[0]

    @torch.inference_mode()
    def api_logits(self, enc) -> torch.Tensor:
        out = self.model(**enc)
        return out.logits[0, -1]

    def build(self, enc, vis, cond: str, k: int, gen: torch.Generator, ref: torch.Tensor):
        """(embeds [T, D], position ids [T]) of one hand-built condition."""
        ids = enc["input_ids"][0]
        emb = self.model.model.get_input_embeddings()(ids).clone()
        where = (ids == self.image_token_id).nonzero().squeeze(1)
        s, n = int(where[0]), where.numel()
        emb[where] = vis.to(emb.dtype)
        T = ids.numel()
        pos = torch.arange(T)
        pre, img, post = emb[:s], emb[s:s + n], emb[s + n:]
        ppre, pimg, ppost = pos[:s], pos[s:s + n], pos[s + n:]
        if cond == "full":
            return emb, pos
        perm = torch.randperm(n, generator=gen)
        if cond.startswith("ref-"):
            others = perm[~torch.isin(perm, ref)]
            chosen = torch.cat([ref, others])[:max(k, 0)]
            keep = torch.sort(chosen).values
        else:
            keep = torch.sort(perm[:k]).values
        if cond in ("drop-renum", "ref-renum"):
            e = torch.cat([pre, img[keep], post])
            return e, torch.arange(e.shape[0])
        if cond in ("drop-orig", "ref-orig"):
            return torch.cat([pre, img[keep], post]), torch.cat([ppre, pimg[keep], ppost])
        if cond in ("zero-fill", "mean-fill", "ref-zero"):
            fill = torch.zeros_like(img) if cond != "mean-fill" else img.mean(0, keepdim=True).expand_as(img).clone()
            fill[keep] = img[keep]
            return torch.cat([pre, fill, post]), pos
        if cond == "perm-pos":
            return emb, torch.cat([ppre, pimg[perm], ppost])
        if cond == "perm-seq":
            return torch.cat([pre, img[perm], post]), torch.cat([ppre, pimg[perm], ppost])
        if cond == "rev-pos":
            return emb, torch.cat([ppre, pimg.flip(0), ppost])
        if cond == "rev-seq":
            return torch.cat([pre, img.flip(0), post]), torch.cat([ppre, pimg.flip(0), ppost])
        if cond.startswith("gap-before"):  # the image and everything after it k positions later (prefix unchanged)
            return emb, torch.cat([ppre, pimg + k, ppost + k])
        if cond.startswith("gap-after"):   # the text after the image k positions later (image unchanged)
            return emb, torch.cat([ppre, pimg, ppost + k])
        if cond == "squeeze":
            sq = s + torch.div(torch.arange(n) * k, n, rounding_mode="floor")
            return emb, torch.cat([ppre, sq, s + k + torch.arange(post.shape[0])])
        raise ValueError(cond)


def score(records):
    """MME acc/acc+ score from per-question correctness grouped by image (two questions each)."""
    by_img: dict[int, list[bool]] = {}
    for r in records:
        by_img.setdefault(r["img"], []).append(r["ok"])
    acc = 100 * sum(sum(v) for v in by_img.values()) / sum(len(v) for v in by_img.values())
    accp = 100 * sum(all(v) for v in by_img.values()) / len(by_img)
    return acc + accp


def summarise(rows):
    """Metrics of one condition's 60 rows."""
    mme = score([{"img": r["img"], "ok": r["pred"] == r["gt"]} for r in rows])
    forced = score([{"img": r["img"], "ok": r["forced"] == r["gt"]} for r in rows])
    other = sum(r["pred"] not in ("yes", "no") for r in rows)
    out = {"mme": mme, "other": other, "forced": forced}
    for axis, sides in (("h", ("left", "right")), ("v", ("top", "bottom"))):
        ax = [r for r in rows if r["side"] in sides]
        out[f"forced_acc_{axis}"] = 100 * sum(r["forced"] == r["gt"] for r in ax) / len(ax)
        # belief: the side the forced answer implies for the object
        first = sides[0]
        belief = [(r["side"] if r["forced"] == "yes" else OPP[r["side"]]) == first for r in ax]
        truth = [(r["side"] if r["gt"] == "yes" else OPP[r["side"]]) == first for r in ax]
        out[f"belief_{first}"] = 100 * sum(belief) / len(belief)
        out[f"truth_{first}"] = 100 * sum(truth) / len(truth)
    words: dict[str, int] = {}
    for r in rows:
        if r["pred"] not in ("yes", "no"):
            words[r["pred"]] = words.get(r["pred"], 0) + 1
    out["other_words"] = words
    return out


@torch.inference_mode()
def probe_positions(model, processor, n_images: int = 80, seed: int = 5):
    """Linear (ridge least-squares on one-hot targets) probes of each visual token's row and column (12-way) from
    the LM-input visual embeddings and from the vision features the projector reads, on fresh random scenes (3/4
    to fit, 1/4 to test), fitted on all tokens or on object tokens only; accuracy on all test tokens and on the
    object tokens (chance 8.3%). Position ids play no part here."""
    rng = random.Random(f"probe-{seed}")
    scenes = [synthetic.random_scene(rng, text=rng.random() < 0.25) for _ in range(n_images)]
    pv = processor.image_processor([synthetic.render_scene(sc) for sc in scenes], return_tensors="pt")["pixel_values"]
    cfg = model.config
    vt = model.model.vision_tower(pixel_values=pv, output_hidden_states=True)
    vis_feats = vt.hidden_states[cfg.vision_feature_layer][:, 1:]          # (B, 144, 128)
    lm_feats = model.model.multi_modal_projector(vis_feats)                # (B, 144, 256)
    obj = torch.stack([torch.from_numpy(
        (np.asarray(synthetic.label_map(sc)) > 0).reshape(12, 8, 12, 8).any(axis=(1, 3)).reshape(-1)) for sc in scenes])
    idx = torch.arange(144)
    rows, cols = (idx // 12).repeat(n_images, 1), (idx % 12).repeat(n_images, 1)
    n_fit = n_images * 3 // 4
    out = {}
    for name, F in (("vision_features", vis_feats), ("lm_input_embeddings", lm_feats)):
        X = torch.cat([F, torch.ones(*F.shape[:2], 1)], -1).double()
        for tname, t in (("row", rows), ("col", cols)):
            Y = torch.nn.functional.one_hot(t, 12).double()
            m = obj[n_fit:]
            res = {}
            for fit in ("all", "object"):  # fitted on every token / on object tokens only
                sel = torch.ones_like(obj[:n_fit]) if fit == "all" else obj[:n_fit]
                Xf, Yf = X[:n_fit][sel], Y[:n_fit][sel]
                W = torch.linalg.solve(Xf.T @ Xf + 1e-2 * torch.eye(X.shape[-1], dtype=X.dtype), Xf.T @ Yf)
                pred = (X[n_fit:] @ W).argmax(-1)
                ok = pred == t[n_fit:]
                if fit == "all":
                    res["all"] = 100 * float(ok.float().mean())
                res[f"{fit}_fit_on_object_tokens"] = 100 * float(ok[m].float().mean())
            out[f"{name}/{tname}"] = res
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder (default: the shipped tiny LLaVA)")
    p.add_argument("--keep", default="16,48", help="comma-separated keep budgets")
    p.add_argument("--conds", default="drop-renum,drop-orig,zero-fill,mean-fill,ref-renum,ref-orig,ref-zero,squeeze",
                   help="hand-built conditions that take a budget")
    p.add_argument("--full-conds", default="full,perm-pos,perm-seq,rev-pos,rev-seq",
                   help="hand-built conditions on all 144 tokens")
    p.add_argument("--api", default="random:renumber,random:original,visionzip:renumber,visionzip:original,"
                                    "fastv:original,fastv:renumber",
                   help="method:positions pairs run through vtprune.prune ('' = none)")
    p.add_argument("--style", default="llava_v1")
    p.add_argument("--seeds", type=int, default=1, help="random subsets/permutations per image (averaged)")
    p.add_argument("--out", default=None, help="JSON file for all metrics")
    p.add_argument("--probe", action="store_true", help="also fit linear row/column probes on the visual tokens")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, processor = TL.load_tiny_llava(args.model)
    model.eval()
    R = Runner(model, processor, args.style)
    results = {}
    if args.probe:
        results["probe"] = probe_positions(model, processor)
        for k, v in results["probe"].items():
            print(f"probe {k:26s} all tokens {v['all']:5.1f}%; object tokens: {v['all_fit_on_object_tokens']:5.1f}% "
                  f"(fit on all), {v['object_fit_on_object_tokens']:5.1f}% (fit on object tokens only)", flush=True)
    items = load_items()
    keeps = [int(x) for x in args.keep.split(",") if x]
    encs = [[R.encode(path, q) for q, _gt, _side in pairs] for path, _s, _o, pairs in items]
    vis = [R.visual(e[0]) for e in encs]
    refs = [ref_patches(scene, obj) for _p, scene, obj, _q in items]
    print(f"referred-object patches per image: mean {np.mean([r.numel() for r in refs]):.1f}, "
          f"max {max(r.numel() for r in refs)}", flush=True)

    def rowset(fn):
        rows = []
        for i, (path, _scene, _obj, pairs) in enumerate(items):
            for j, (q, gt, side) in enumerate(pairs):
                lg = fn(i, j)
                top = int(lg.argmax())
                pred = "yes" if top == R.yes else "no" if top == R.no else R.tok.convert_ids_to_tokens(top)
                forced = "yes" if lg[R.yes] > lg[R.no] else "no"
                rows.append({"img": i, "q": j, "gt": gt, "side": side, "pred": pred, "forced": forced})
        return rows


    def run(label, fn, seeds=1):
        t0 = time.time()
        sums = [summarise(rowset(lambda i, j, s=s: fn(i, j, s))) for s in range(seeds)]
        res = {k: (float(np.mean([x[k] for x in sums])) if not isinstance(sums[0][k], dict) else sums[0][k])
               for k in sums[0]}
        results[label] = res
        print(f"{label:22s} MME {res['mme']:6.1f}  other {res['other']:4.1f}  forced {res['forced']:6.1f}  "
              f"acc h {res['forced_acc_h']:5.1f} v {res['forced_acc_v']:5.1f}  belief left {res['belief_left']:5.1f} "
              f"top {res['belief_top']:5.1f}  (truth left {res['truth_left']:.0f} top {res['truth_top']:.0f})  "
              f"{res['other_words']}  [{time.time() - t0:.1f}s]", flush=True)

    def hand(cond, k):
        def fn(i, j, s):
            gen = torch.Generator().manual_seed(1000 * s + i)
            e, pos = R.build(encs[i][j], vis[i], cond, k, gen, refs[i])
            return R.logits(e, pos)
        return fn

    for cond in [c for c in args.full_conds.split(",") if c]:
        run(cond, hand(cond, 144), 1 if cond in ("full", "rev-pos", "rev-seq") else args.seeds)
    for k in keeps:
        for cond in [c for c in args.conds.split(",") if c]:
            run(f"{cond}-{k}", hand(cond, k), 1 if cond in ("squeeze", "gap-before", "gap-after") else args.seeds)
        for spec in [c for c in args.api.split(",") if c]:
            method, positions = spec.split(":")
            vtprune.prune(model, method, keep=k, **({} if positions == "default" else {"positions": positions}))
            try:
                run(f"api:{method}:{positions[:4]}-{k}", lambda i, j, s: R.api_logits(encs[i][j]))
            finally:
                vtprune.unprune(model)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
