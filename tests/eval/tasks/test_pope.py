"""POPE: the loader on both layouts, format errors, the two scoring conventions, the synthetic split and
``vtprune bench --task pope`` end to end on the tiny model."""

import csv
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from PIL import Image

from vtprune import cli as top_cli
from vtprune.benchmarks import cli as bench_cli
from vtprune.benchmarks import runner
from vtprune.embedded import synthetic
from vtprune.eval.tasks import pope
from vtprune.eval.tasks.pope import POPEFormatError, load_pope, parse_llava, parse_lmms_eval, score_pope
from vtprune.eval.tasks.prompts import SHORT_ANSWER, build_prompt

FAST = ["--max-new-tokens", "2", "--timing-samples", "1", "--timing-repeats", "1", "--decode-tokens", "0",
        "--threads", "1", "--no-progress"]


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    return path


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _lmms_folder(root, records=None):
    """lmms-eval style: one records file + images/."""
    for name in ("a.png", "b.jpg"):
        _image(root / "images" / name)
    records = records if records is not None else [
        {"question_id": "q1", "question": "Is there a dog in the image?", "answer": "yes", "image": "a.png",
         "category": "adversarial"},
        {"question_id": "q2", "question": "Is there a cat in the image?", "answer": "No", "image": "a.png",
         "category": "random"},
        {"question_id": "q3", "question": "Is there a car in the image?", "answer": "yes", "image": "b",
         "category": "popular"},
        {"question_id": "q4", "question": "Is there a bus in the image?", "answer": "no", "image": "b.jpg",
         "category": "random"},
    ]
    _jsonl(root / "pope_test.jsonl", records)
    return root


def _official_folder(root, dataset="coco"):
    """Official POPE: <dataset>_pope_<category>.json (JSONL) with question_id/image/text/label, images in val2014/."""
    names = ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"]
    for n in names:
        _image(root / "val2014" / n)
    for category in ("random", "popular", "adversarial"):
        _jsonl(root / f"{dataset}_pope_{category}.json", [
            {"question_id": 1, "image": names[0], "text": "Is there a person in the image?", "label": "yes"},
            {"question_id": 2, "image": names[0], "text": f"Is there a {category} thing in the image?",
             "label": "no"},
            {"question_id": 3, "image": names[1], "text": "Is there a chair in the image?", "label": "yes"},
        ])
    return root


# --------------------------------------------------------------------------- loading

def test_load_lmms_eval_layout(tmp_path):
    root = _lmms_folder(tmp_path / "pope")
    qs = load_pope(root)
    assert [q.category for q in qs] == ["random", "random", "popular", "adversarial"]  # grouped, POPE order
    assert [q.question_id for q in qs] == ["q2", "q4", "q3", "q1"]  # file order within a category
    assert [q.answer for q in qs] == ["no", "no", "yes", "yes"]  # "No" normalised
    assert qs[2].image_path == root / "images" / "b.jpg"  # a name without extension is found
    assert qs[0].question == "Is there a cat in the image?" and qs[0].key == "random/q2"
    assert qs[0].source == root / "pope_test.jsonl" and qs[0].line == 2
    assert load_pope(root / "pope_test.jsonl") == qs  # one file works too
    assert [q.question_id for q in load_pope(root, categories=["popular"])] == ["q3"]
    assert runner.detect_task(root) == "pope"


def test_load_json_array_and_hf_style_fields(tmp_path):
    root = tmp_path / "pope"
    _image(root / "images" / "COCO_1.jpg")
    recs = [{"id": 7, "question": "Is there a dog in the image?", "answer": "yes", "category": "random",
             "image_source": "COCO_1"},
            {"question": "Is there a cat in the image?", "answer": "no", "category": "random",
             "image": {"bytes": None, "path": "COCO_1.jpg"}}]
    (root / "pope.json").write_text(json.dumps(recs, indent=2))
    qs = load_pope(root)
    assert [q.question_id for q in qs] == ["7", "pope-9"]  # no id: file stem + line of the record
    assert qs[1].line == 9 and all(q.image_path.name == "COCO_1.jpg" for q in qs)


def test_load_official_layout(tmp_path):
    root = _official_folder(tmp_path / "coco")
    qs = load_pope(root)
    assert len(qs) == 9
    assert [q.category for q in qs] == ["random"] * 3 + ["popular"] * 3 + ["adversarial"] * 3
    assert [q.question_id for q in qs[:3]] == ["1", "2", "3"]  # ids restart per file ...
    assert len({q.key for q in qs}) == 9                       # ... the key is unique
    assert qs[1].answer == "no" and qs[1].question == "Is there a random thing in the image?"
    assert qs[0].image_path == root / "val2014" / "COCO_val2014_000000000001.jpg"
    assert runner.detect_task(root) == "pope"
    assert pope.limit_pope(qs, 4) == [qs[0], qs[1], qs[3], qs[6]]  # round-robin over categories


def _bad(tmp_path, text, name="pope.jsonl"):
    root = tmp_path / "bad"
    _image(root / "images" / "a.png")
    (root / name).write_text(text)
    return root, root / name


GOOD = {"question": "Is there a dog in the image?", "answer": "yes", "image": "a.png", "category": "random"}


@pytest.mark.parametrize("lines,where,match", [
    ([json.dumps(GOOD), "{not json"], 2, "invalid JSON"),
    ([json.dumps(GOOD), "", json.dumps({**GOOD, "answer": "maybe"})], 3, "must be 'yes' or 'no', got 'maybe'"),
    ([json.dumps({k: v for k, v in GOOD.items() if k != "question"})], 1, "no 'question' / 'text' field"),
    ([json.dumps({k: v for k, v in GOOD.items() if k != "answer"})], 1, "no 'answer' / 'label' field"),
    ([json.dumps({**GOOD, "image": "missing.png"})], 1, "image 'missing.png' not found"),
    ([json.dumps({k: v for k, v in GOOD.items() if k != "category"})], 1, "no 'category' field"),
    ([json.dumps({**GOOD, "question_id": 1}), json.dumps({**GOOD, "question_id": 1})], 2, "repeats"),
    ([json.dumps(GOOD), json.dumps([GOOD])], 2, "expected a JSON object, got list"),
    ([json.dumps({**GOOD, "question": ""})], 1, "must be a non-empty string"),
])
def test_format_errors_name_file_and_line(tmp_path, lines, where, match):
    root, path = _bad(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(POPEFormatError, match=match) as exc:
        load_pope(root)
    assert str(exc.value).startswith(f"{path}:{where}: ")


def test_a_key_given_twice_in_a_record_names_file_line_and_key(tmp_path):
    """json keeps the last of two equal keys silently; both record layouts refuse it."""
    record = json.dumps(GOOD)[:-1] + ', "answer": "no"}'
    root, path = _bad(tmp_path, json.dumps(GOOD) + "\n" + record + "\n")
    with pytest.raises(POPEFormatError, match=f"^{path}:2: the record gives the key 'answer' twice"):
        load_pope(root)
    root, path = _bad(tmp_path / "array", "[\n" + json.dumps(GOOD) + ",\n" + record + "\n]\n", name="pope.json")
    with pytest.raises(POPEFormatError, match=f"^{path}:3: the record gives the key 'answer' twice"):
        load_pope(root)


def test_an_image_name_matching_two_files_names_both(tmp_path):
    root, path = _bad(tmp_path, json.dumps({**GOOD, "image": "a"}) + "\n")
    _image(root / "images" / "a.jpg")  # beside a.png: the name "a" could mean either
    with pytest.raises(POPEFormatError) as exc:
        load_pope(root)
    message = str(exc.value)
    assert message.startswith(f"{path}:1: image 'a': 2 image files match")
    assert str(root / "images" / "a.jpg") in message and str(root / "images" / "a.png") in message
    (root / "pope.jsonl").write_text(json.dumps(GOOD) + "\n")  # "a.png" names one of them
    assert load_pope(root)[0].image_path == root / "images" / "a.png"


def test_json_array_errors_give_the_record_line(tmp_path):
    text = "[\n  " + json.dumps(GOOD) + ",\n  " + json.dumps({**GOOD, "answer": "perhaps"}) + "\n]\n"
    root, path = _bad(tmp_path, text, name="pope.json")
    with pytest.raises(POPEFormatError, match=f"^{path}:3: the answer must be"):
        load_pope(root)
    root, path = _bad(tmp_path, "[\n" + json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "]", name="pope.json")
    with pytest.raises(POPEFormatError, match=f"^{path}:3: expected ','"):
        load_pope(root)


def test_folder_level_errors(tmp_path):
    with pytest.raises(POPEFormatError, match="not found"):
        load_pope(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(POPEFormatError, match="no POPE question file"):
        load_pope(tmp_path / "empty")
    two = _official_folder(tmp_path / "two")
    _official_folder(two, dataset="aokvqa")
    with pytest.raises(POPEFormatError, match="several POPE datasets \\(aokvqa, coco\\)"):
        load_pope(two)
    mixed = _official_folder(tmp_path / "mixed")
    _jsonl(mixed / "pope.jsonl", [GOOD])
    with pytest.raises(POPEFormatError, match="both per-category files"):
        load_pope(mixed)
    root, path = _bad(tmp_path, "")
    with pytest.raises(POPEFormatError, match=f"^{path}:1: no questions"):
        load_pope(root)


# --------------------------------------------------------------------------- scoring

@pytest.mark.parametrize("pred,llava,lmms", [
    ("No, there is not.", "no", "other"),
    ("There is no dog.", "no", "other"),
    ("Yes.", "yes", "other"),          # lmms-eval does not drop the period
    ("yes", "yes", "yes"),
    ("I think so", "yes", "other"),    # LLaVA: no negative word -> yes
    ("  NO ", "yes", "no"),            # LLaVA's words are case-sensitive; lmms-eval lower-cases
    ("No", "no", "no"),
    ("Not sure", "yes", "other"),      # "Not" is not one of LLaVA's words
    ("Yes, there is. No doubt", "yes", "other"),  # LLaVA reads the first sentence only
    ("nothing", "yes", "other"),       # whole words only
    ("no!", "yes", "other"),
    ("", "yes", "other"),
])
def test_the_two_answer_conventions(pred, llava, lmms):
    assert parse_llava(pred) == llava
    assert parse_lmms_eval(pred) == lmms


def test_metrics_hand_computed():
    qs = [{"answer": a, "category": c} for a, c in [
        ("yes", "random"), ("yes", "random"), ("yes", "random"), ("no", "random"), ("no", "random"),
        ("no", "random"), ("yes", "popular"), ("no", "popular")]]
    preds = ["Yes.", "yes", "I think so", "No, there is not.", "There is no dog.", "yes", "no", "No"]
    rep = score_pope(qs, preds)
    assert rep.categories == ["random", "popular"]
    # LLaVA: yes yes yes | no no yes  -> TP 3, FN 0, TN 2, FP 1
    r = rep.conventions["llava"]["random"]
    assert (r.tp, r.fp, r.tn, r.fn, r.other) == (3, 1, 2, 0, 0)
    assert r.accuracy == pytest.approx(500 / 6) and r.precision == pytest.approx(75.0)
    assert r.recall == pytest.approx(100.0) and r.f1 == pytest.approx(600 / 7)
    assert r.yes_ratio == pytest.approx(400 / 6)
    # lmms-eval: other yes other | other other yes -> TP 1, FP 1, 4 other; recall ignores the "other" on a yes
    m = rep.conventions["lmms_eval"]["random"]
    assert (m.tp, m.fp, m.tn, m.fn, m.other) == (1, 1, 0, 0, 4)
    assert m.accuracy == pytest.approx(100 / 6) and m.precision == pytest.approx(50.0)
    assert m.recall == pytest.approx(100.0) and m.f1 == pytest.approx(200 / 3)
    assert m.yes_ratio == pytest.approx(100 / 3)  # predicted yes, not lmms-eval's ground-truth 50%
    # popular: "no" / "No" -> FN 1, TN 1 in both; no positive predictions -> precision, recall, F1 = 0
    for conv in pope.CONVENTIONS:
        p = rep.conventions[conv]["popular"]
        assert (p.tp, p.fp, p.tn, p.fn) == (0, 0, 1, 1)
        assert (p.accuracy, p.precision, p.recall, p.f1, p.yes_ratio) == (50.0, 0.0, 0.0, 0.0, 0.0)
    # pooled and category means
    a = rep.all("llava")
    assert (a.tp, a.fp, a.tn, a.fn) == (3, 1, 3, 1) and a.accuracy == a.precision == a.recall == a.f1 == 75.0
    b = rep.all("lmms_eval")
    assert (b.tp, b.fp, b.tn, b.fn, b.other) == (1, 1, 1, 1, 4) and b.accuracy == 25.0 and b.f1 == 50.0
    assert rep.mean("llava")["f1"] == pytest.approx(300 / 7) == rep.f1
    assert rep.mean("lmms_eval")["accuracy"] == pytest.approx((100 / 6 + 50) / 2)
    d = rep.to_dict()
    assert d["n"] == 8 and d["llava"]["all"]["f1"] == 75.0 and d["lmms_eval"]["categories"]["random"]["other"] == 4
    assert runner.task_score("pope", rep) == pytest.approx(300 / 7)
    assert "lmms_eval" in rep.format()
    with pytest.raises(ValueError, match="2 questions but 1 predictions"):
        score_pope(qs[:2], preds[:1])


def test_pope_prompt_is_the_short_answer_prompt():
    q = "Is there a red circle in the image?"
    expected = build_prompt(q, benchmark=runner.prompt_benchmark("pope"))
    assert expected.endswith(f"USER: <image>\n{q}\n{SHORT_ANSWER} ASSISTANT:")
    assert build_prompt(q + " Please answer yes or no.", benchmark="mme") == expected


# --------------------------------------------------------------------------- synthetic split

def test_synthetic_pope_split(tmp_path):
    root = synthetic.write_pope(tmp_path / "pope")
    qs = load_pope(root)
    records = [json.loads(x) for x in (root / synthetic.POPE_QUESTIONS_FILE).read_text().splitlines()]
    scenes = synthetic.pope_scenes()
    assert len(qs) == 240 and len(scenes) == 20
    objects = {r["image"]: r["objects"] for r in records}
    assert [objects[f"pope{i:05d}.png"] for i in range(20)] == [list(synthetic.pope_objects(s)) for s in scenes]
    frequency, co = synthetic.pope_statistics(objects.values())
    by = {}
    for q, r in zip(qs, records):  # one category after another, in file order
        assert (q.category, q.answer, q.image) == (r["category"], r["answer"], r["image"])
        obj = q.question.removeprefix("Is there a ").removesuffix(" in the image?")
        assert obj in synthetic.POPE_OBJECTS
        assert (obj in r["objects"]) == (q.answer == "yes")  # positives present, negatives absent
        by.setdefault((q.category, q.image), {"yes": [], "no": []})[q.answer].append(obj)
    for i, scene in enumerate(scenes):  # absent means not drawn: no pixel of that class in the label map
        hist = synthetic.label_map(scene).histogram()
        drawn = {synthetic.LABEL_CLASSES[v] for v, n in enumerate(hist) if n} - {"background"}
        assert drawn == set(synthetic.pope_objects(scene))
        with Image.open(root / "images" / f"pope{i:05d}.png") as img:
            assert img.convert("RGB").tobytes() == synthetic.render_scene(scene).tobytes()
    for category in synthetic.POPE_CATEGORIES:
        cat = [q for q in qs if q.category == category]
        assert len(cat) == 80 and sum(q.answer == "yes" for q in cat) == 40  # balanced
    for image, present in objects.items():
        pos = {c: by[(c, image)]["yes"] for c in synthetic.POPE_CATEGORIES}
        assert pos["random"] == pos["popular"] == pos["adversarial"]  # the same positives in every category
        assert len(pos["random"]) == 2 and len(set(pos["random"])) == 2
        absent = [o for o in synthetic.POPE_OBJECTS if o not in present]
        for category in synthetic.POPE_CATEGORIES:
            neg = by[(category, image)]["no"]
            assert len(neg) == 2 and len(set(neg)) == 2 and not set(neg) & set(present)
            rest = [o for o in absent if o not in neg]
            if category == "popular":  # the most frequent absent objects
                assert min(frequency[o] for o in neg) >= max(frequency[o] for o in rest)
            if category == "adversarial":  # the absent objects co-occurring most with this image's objects
                score = {o: sum(co.get((p, o), 0) for p in present) for o in absent}
                assert min(score[o] for o in neg) >= max(score[o] for o in rest)
                for n in neg:
                    assert all(frequency[n] >= frequency[o] for o in rest if score[o] == score[n])
    pop = [tuple(by[("popular", im)]["no"]) for im in objects]
    rnd = [tuple(by[("random", im)]["no"]) for im in objects]
    assert pop != rnd and len(set(rnd)) > len(set(pop))  # random is spread out, popular concentrates
    again = synthetic.write_pope(tmp_path / "again")
    assert (again / "pope.jsonl").read_text() == (root / "pope.jsonl").read_text()
    assert runner.detect_task(root) == "pope"


def test_pope_negatives_rules_on_a_toy_set():
    images = [("red circle", "blue square"), ("red circle", "green triangle"), ("red circle", "blue square"),
              ("yellow circle",)]
    freq, co = synthetic.pope_statistics(images)
    assert freq["red circle"] == 3 and co[("red circle", "blue square")] == 2
    rng = random.Random(0)
    # for the image with only a yellow circle: popular = red circle (3), then blue square (2)
    assert synthetic.pope_negatives(images[3], "popular", 2, rng, freq, co) == ["red circle", "blue square"]
    # for an image with a green triangle: adversarial = what co-occurs with it (red circle), then frequency
    assert synthetic.pope_negatives(("green triangle",), "adversarial", 2, rng, freq, co) == \
        ["red circle", "blue square"]
    assert synthetic.pope_negatives(("blue square",), "adversarial", 1, rng, freq, co) == ["red circle"]
    neg = synthetic.pope_negatives(images[0], "random", 5, rng, freq, co)
    assert len(set(neg)) == 5 and not set(neg) & set(images[0])
    with pytest.raises(ValueError, match="unknown POPE category"):
        synthetic.pope_negatives(images[0], "hard", 1, rng, freq, co)


# --------------------------------------------------------------------------- command line

def test_task_lists_and_data_resolution(tmp_path):
    root = _lmms_folder(tmp_path / "p")
    parser = bench_cli.build_parser()
    assert parser.parse_args(["--task", "pope"]).task == "pope"
    assert parser.parse_args(["--task", "MME, pope,mme"]).task == "mme,pope"
    assert parser.parse_args([]).task == "all"
    with pytest.raises(SystemExit):
        parser.parse_args(["--task", "pope,vqa"])
    assert bench_cli.parse_data("all", []) == (["mme", "gqa"], {})  # POPE only when asked for
    assert bench_cli.parse_data("pope", []) == (["pope"], {})
    assert bench_cli.parse_data("mme,gqa,pope", []) == (["mme", "gqa", "pope"], {})
    assert bench_cli.parse_data("all", [str(root)]) == (["pope"], {"pope": root})
    assert bench_cli.parse_data("pope", [f"pope={root}"]) == (["pope"], {"pope": root})
    with pytest.raises(ValueError, match="--task gqa but --data points to a pope folder"):
        bench_cli.parse_data("gqa", [str(root)])


def test_bench_task_pope_end_to_end(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VTPRUNE_CACHE_DIR", str(tmp_path / "cache"))  # the synthetic POPE set is generated here
    out = tmp_path / "out"
    status = top_cli.main(["bench", "--model", str(tiny[0]), "--task", "pope", "--limit", "8", "--methods",
                           "random", "--keep", "16", "--out", str(out), *FAST])
    assert status == 0
    printed = capsys.readouterr().out
    for column in runner.POPE_COLUMNS:
        assert column in printed
    assert "POPE per category" in printed and "MME-P" not in printed and "GQA %" not in printed
    results = json.loads((out / "results.json").read_text())
    assert list(results["tasks"]) == ["pope"] and results["tasks"]["pope"]["questions"] == 8
    data = results["tasks"]["pope"]["data"]
    assert data == str(tmp_path / "cache" / "synthetic_pope")
    questions = runner.load_task("pope", data, limit=8).questions
    assert [q.category for q in questions] == ["random"] * 3 + ["popular"] * 3 + ["adversarial"] * 2
    assert [r["label"] for r in results["runs"]] == ["vanilla", "random@keep16"]
    for run in results["runs"]:
        entries = run["predictions"]["pope"]
        assert [e["id"] for e in entries] == [q.key for q in questions]
        expected = score_pope(questions, [e["prediction"] for e in entries])
        assert run["scores"]["pope"] == {**expected.to_dict(), "score": expected.f1}
        assert set(run["scores"]["pope"]) >= {"llava", "lmms_eval", "categories", "n", "score"}
        answers = (out / "predictions" / runner._safe(run["label"]) / "pope_answers.jsonl").read_text().splitlines()
        assert [json.loads(a)["text"] for a in answers] == [e["prediction"] for e in entries]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"pope_f1_llava", "pope_accuracy_lmms_eval", "pope_yes_ratio_llava", "pope_random_f1_lmms_eval",
            "pope_adversarial_accuracy_llava"} <= set(rows[0])
    assert float(rows[0]["pope_f1_llava"]) == pytest.approx(results["runs"][0]["scores"]["pope"]["score"])
    assert (out / "results.png").is_file()
