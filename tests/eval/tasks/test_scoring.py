"""MME / GQA loaders and scorers against hand-computed values, plus the prompt builders."""

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from vtprune.embedded import synthetic
from vtprune.eval.tasks import gqa, mme, prompts
from vtprune.eval.tasks.gqa import GQAFormatError, exact_match, load_gqa, normalize_answer, score_gqa
from vtprune.eval.tasks.mme import MMEFormatError, load_mme, parse_yes_no, score_mme

# --------------------------------------------------------------------------- MME parsing


@pytest.mark.parametrize("pred,label", [
    ("yes", "yes"), ("No", "no"), ("Yes.", "yes"), ("  NO.  ", "no"), ("y", "yes"), ("N", "no"),
    ("Y.", "yes"), ("yes, there is a red circle", "yes"), ("No, it is blue.", "no"),
    ("nope", "no"),               # "no" within the first 4 characters
    ("none", "no"),
    ("not sure", "no"),           # "not " contains "no"
    ("I think yes", "other"),     # yes is not in the first 4 characters
    ("maybe", "other"), ("x", "other"), ("", "other"), ("3", "other"),
    ("the answer is no", "other"),
    ("y e s", "other"),
    ("ayes", "yes"),              # substring of the first 4 characters
])
def test_parse_yes_no(pred, label):
    assert parse_yes_no(pred) == label


def _q(subtask, image, answer):
    return {"subtask": subtask, "image_name": image, "answer": answer}


def test_mme_acc_and_acc_plus_hand_computed():
    qs = [
        _q("existence", "a.png", "Yes"), _q("existence", "a.png", "No"),   # both right
        _q("existence", "b.png", "Yes"), _q("existence", "b.png", "No"),   # one right
        _q("existence", "c.png", "Yes"), _q("existence", "c.png", "No"),   # "other" + right
        _q("count", "d.png", "Yes"), _q("count", "d.png", "No"),           # both wrong
    ]
    preds = ["Yes", "no.", "yes", "yes", "I am not sure", "No", "no", "yes"]
    rep = score_mme(qs, preds)
    ex = rep.subtasks["existence"]
    # 4 of 6 questions right; only image a has both right
    assert ex.acc == pytest.approx(400 / 6)
    assert ex.acc_plus == pytest.approx(100 / 3)
    assert ex.score == pytest.approx(400 / 6 + 100 / 3)
    assert ex.n_other == 1 and ex.n_images == 3 and ex.n_questions == 6
    assert rep.subtasks["count"].score == 0.0
    assert rep.perception == pytest.approx(100.0)
    assert rep.perception_max == 400
    assert rep.cognition is None and rep.cognition_max == 0
    assert rep.total == pytest.approx(100.0)
    assert rep.total_percent == pytest.approx(25.0)
    assert list(rep.subtasks) == ["existence", "count"]


def test_mme_perception_and_cognition_totals_labelled():
    qs = [_q("OCR", "1.jpg", "Yes"), _q("OCR", "1.jpg", "No"),
          _q("code_reasoning", "0020.png", "No"), _q("code_reasoning", "0020.png", "Yes"),
          _q("numerical_calculation", "7.png", "Yes"), _q("numerical_calculation", "7.png", "No")]
    preds = ["yes", "no", "no", "no", "Yes", "No"]
    rep = score_mme(qs, preds)
    assert rep.subtasks["OCR"].score == 200
    assert rep.subtasks["code_reasoning"].acc == 50 and rep.subtasks["code_reasoning"].acc_plus == 0
    assert rep.perception == 200 and rep.perception_max == 200
    assert rep.cognition == 250 and rep.cognition_max == 400
    assert rep.total == 450
    text = rep.format()
    assert "MME Perception" in text and "MME Cognition" in text and "Perception+Cognition" in text
    d = rep.to_dict()
    assert d["perception"] == 200 and d["cognition"] == 250 and "commonsense_reasoning" not in d["subtasks"]


def test_mme_question_objects_and_pairing_errors(tmp_path):
    root = synthetic.write_mme(tmp_path / "mme", per_subtask=2, subtasks=("existence", "color"))
    qs = load_mme(root)
    perfect = score_mme(qs, [q.answer for q in qs])
    assert perfect.perception == 400 and perfect.total_percent == 100
    flipped = score_mme(qs, ["No" if q.answer == "Yes" else "Yes" for q in qs])
    assert flipped.total == 0
    with pytest.raises(ValueError, match="expected 2 questions per image"):
        score_mme(qs[:3], ["yes"] * 3)
    with pytest.raises(ValueError, match="predictions"):
        score_mme(qs, ["yes"])


def test_mme_results_dir_roundtrip(tmp_path):
    root = synthetic.write_mme(tmp_path / "mme", per_subtask=3, subtasks=("count", "OCR"))
    qs = load_mme(root)
    preds = ["yes", "no", "no", "no", "Yes.", "maybe"] * 2
    out = mme.write_results_dir(tmp_path / "results", qs, preds)
    assert sorted(p.name for p in out.iterdir()) == ["OCR.txt", "count.txt"]
    q2, p2 = mme.read_results_dir(out)
    assert score_mme(q2, p2).to_dict() == score_mme(qs, preds).to_dict()
    bad = out / "count.txt"
    bad.write_text("\n".join(bad.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(MMEFormatError, match="count.txt.*odd number of lines"):
        mme.read_results_dir(out)


# --------------------------------------------------------------------------- MME loader


def test_load_mme_generated_folder(tmp_path):
    root = synthetic.write_mme(tmp_path / "mme", per_subtask=3)
    qs = load_mme(root)
    assert len(qs) == 3 * 2 * len(synthetic.MME_SUBTASKS)
    assert {q.subtask for q in qs} == set(synthetic.MME_SUBTASKS)
    for q in qs:
        assert q.image_path.is_file() and q.answer in ("Yes", "No")
        assert q.question.endswith(" Please answer yes or no.")
        assert q.question_id == f"{q.subtask}/{q.image_name}"
        assert q.category == "perception"
    assert [q.answer for q in qs[:2]] == ["Yes", "No"]
    assert len(load_mme(root, subtasks=["OCR"])) == 6
    with pytest.raises(MMEFormatError, match="no subtask folder"):
        load_mme(root, subtasks=["celebrity"])


def test_load_mme_images_subfolder_layout(tmp_path):
    src = synthetic.write_mme(tmp_path / "src", per_subtask=2, subtasks=("color",))
    scene = tmp_path / "mme" / "scene"
    (scene / "images").mkdir(parents=True)
    (scene / "questions_answers_YN").mkdir()
    for f in (src / "color").iterdir():
        shutil.copy(f, scene / ("images" if f.suffix == ".png" else "questions_answers_YN") / f.name)
    qs = load_mme(tmp_path / "mme")
    assert len(qs) == 4 and all(q.subtask == "scene" for q in qs)
    assert qs[0].image_path.parent.name == "images"


def _one_subtask(tmp_path):
    root = synthetic.write_mme(tmp_path / "mme", per_subtask=2, subtasks=("existence",))
    return root, root / "existence"


def test_mme_missing_txt_names_image(tmp_path):
    root, d = _one_subtask(tmp_path)
    (d / "0001.txt").unlink()
    with pytest.raises(MMEFormatError, match=r"0001\.png.*no question file"):
        load_mme(root)


def test_mme_missing_image_names_txt(tmp_path):
    root, d = _one_subtask(tmp_path)
    (d / "0000.png").unlink()
    with pytest.raises(MMEFormatError, match=r"0000\.txt.*no image"):
        load_mme(root)


@pytest.mark.parametrize("content,msg", [
    ("Is there a red circle? Please answer yes or no.\tYes\n", "expected 2 lines.*found 1"),
    ("q1\tYes\nq2\tNo\nq3\tYes\n", "expected 2 lines.*found 3"),
    ("q1\tYes\nq2 No\n", "line 2 has no TAB"),
    ("q1\tYes\nq2\tMaybe\n", "line 2: answer must be 'Yes' or 'No'"),
    ("q1\tyes\nq2\tNo\n", "line 1: answer must be 'Yes' or 'No'"),
    ("\tYes\nq2\tNo\n", "line 1: empty question"),
])
def test_mme_malformed_txt_names_file(tmp_path, content, msg):
    root, d = _one_subtask(tmp_path)
    (d / "0001.txt").write_text(content)
    with pytest.raises(MMEFormatError, match=r"0001\.txt.*" + msg):
        load_mme(root)


@pytest.mark.parametrize("other", ["0001.jpg", "0001.PNG", "0001.webp"])
def test_mme_two_images_of_one_stem_name_both(tmp_path, other):
    """0001.png and another image named 0001 beside one 0001.txt: which one the questions mean is ambiguous."""
    root, d = _one_subtask(tmp_path)
    shutil.copy(d / "0001.png", d / other)
    with pytest.raises(MMEFormatError) as exc:
        load_mme(root)
    message = str(exc.value)
    assert "\n" not in message
    assert str(d / "0001.png") in message and str(d / other) in message and "2 image files" in message


def test_mme_crlf_and_missing_final_newline_are_fine(tmp_path):
    root, d = _one_subtask(tmp_path)
    (d / "0001.txt").write_bytes(b"Is there a square? Please answer yes or no.\tYes\r\nIs there a star?\tNo")
    qs = load_mme(root)
    assert [q.answer for q in qs if q.image_name == "0001.png"] == ["Yes", "No"]


def test_mme_empty_or_missing_root(tmp_path):
    with pytest.raises(MMEFormatError, match="not found"):
        load_mme(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MMEFormatError, match="no MME subtask"):
        load_mme(tmp_path / "empty")


# --------------------------------------------------------------------------- GQA normalisation / scoring


@pytest.mark.parametrize("pred,ref,ok", [
    ("yes", "yes", True), ("Yes.", "yes", True), ("  Left \n", "left", True), ("RED!", "red", True),
    ("T-shirt.", "t-shirt", True),          # punctuation removed on both sides
    ("tshirt", "t-shirt", True),
    ("red circle", "red", False), ("the red", "red", False),
    ("yes .", "yes", False),                # inner space survives punctuation removal
    ("", "no", False), ("3", "3", True), ("three", "3", False),
])
def test_gqa_exact_match_lmms_eval(pred, ref, ok):
    assert exact_match(pred, ref) is ok


@pytest.mark.parametrize("pred,ref,ok", [
    ("Yes.", "yes", True), (" Left", "left", True), ("yes!", "yes", False),
    ("Yes..", "yes", True), ("yes...", "yes", True),  # LLaVA's conversion: answer.rstrip('.'), every trailing dot
    ("yes. .", "yes", False),                           # rstrip('.') stops at the space
    ("U.S.", "u.s", True),
])
def test_gqa_exact_match_llava(pred, ref, ok):
    assert exact_match(pred, ref, normalization="llava") is ok


def test_normalize_answer():
    assert normalize_answer(" Hello, World! ") == "hello world"
    assert normalize_answer(" x ", is_prediction=False) == " x "
    with pytest.raises(ValueError):
        normalize_answer("x", "bogus")


def test_score_gqa_hand_computed():
    qs = [{"answer": "yes", "types": {"detailed": "existence"}}, {"answer": "no", "types": {"detailed": "existence"}},
          {"answer": "red", "types": {"detailed": "color"}}, {"answer": "3", "types": {"detailed": "count"}},
          {"answer": "left"}]
    preds = ["Yes", "yes", "Red.", "4", "left"]
    rep = score_gqa(qs, preds)
    assert rep.correct == 3 and rep.n == 5
    assert rep.accuracy == pytest.approx(60.0)
    assert rep.binary == pytest.approx(50.0) and rep.open == pytest.approx(200 / 3)
    assert rep.by_family["existence"] == (50.0, 2) and rep.by_family["count"] == (0.0, 1)
    assert "GQA accuracy 60.00%" in rep.format()
    with pytest.raises(ValueError):
        score_gqa(qs, preds[:2])


# --------------------------------------------------------------------------- GQA loader


def test_load_gqa_generated_folder(tmp_path):
    root = synthetic.write_gqa(tmp_path / "gqa", n_questions=20)
    qs = load_gqa(root)
    assert len(qs) == 20
    assert [q.question_id for q in qs] == sorted(q.question_id for q in qs)
    for q in qs:
        assert q.image_path == root / "images" / f"{q.image_id}.png" and q.image_path.is_file()
        assert q.answer and " " not in q.answer
        assert q.family in synthetic.GQA_FAMILIES
    assert score_gqa(qs, [q.answer for q in qs]).accuracy == 100
    assert len(load_gqa(root, limit=5)) == 5


def test_gqa_jpg_images_and_explicit_questions_file(tmp_path):
    root = synthetic.write_gqa(tmp_path / "gqa", n_questions=4)
    for p in (root / "images").iterdir():
        p.rename(p.with_suffix(".jpg"))
    (root / gqa.QUESTIONS_FILE).rename(root / "val_questions.json")
    qs = load_gqa(root)  # the single *questions*.json is found
    assert all(q.image_path.suffix == ".jpg" for q in qs)
    assert len(load_gqa(root, questions_file="val_questions.json")) == 4


def _gqa(tmp_path):
    root = synthetic.write_gqa(tmp_path / "gqa", n_questions=6)
    f = root / gqa.QUESTIONS_FILE
    return root, f, json.loads(f.read_text())


def test_gqa_unknown_image_id_names_file(tmp_path):
    root, f, data = _gqa(tmp_path)
    qid = sorted(data)[2]
    data[qid]["imageId"] = "n999999"
    f.write_text(json.dumps(data))
    with pytest.raises(GQAFormatError, match=rf"testdev_balanced_questions\.json.*{qid}.*unknown imageId 'n999999'"):
        load_gqa(root)


def test_gqa_missing_image_file(tmp_path):
    root, f, data = _gqa(tmp_path)
    image_id = data[sorted(data)[0]]["imageId"]
    (root / "images" / f"{image_id}.png").unlink()
    with pytest.raises(GQAFormatError, match=f"unknown imageId '{image_id}'"):
        load_gqa(root)


def _pairs_json(pairs) -> str:
    """A JSON object written from (key, value) pairs, so a key can be given twice (``json.dumps`` cannot)."""
    return "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}"


def test_gqa_question_id_given_twice_names_the_id_and_file(tmp_path):
    root, f, data = _gqa(tmp_path)
    qid = sorted(data)[3]
    pairs = list(data.items()) + [(qid, {**data[qid], "answer": "other"})]  # json.loads would keep the last
    f.write_text(_pairs_json(pairs))
    with pytest.raises(GQAFormatError) as exc:
        load_gqa(root)
    message = str(exc.value)
    assert message == f"{f}: question id {qid!r} is given twice; keep one of the two entries"
    entries = [(q, _pairs_json([*e.items(), ("answer", "x")]) if q == qid else json.dumps(e))
               for q, e in data.items()]  # one question gives its answer twice
    f.write_text("{" + ", ".join(f"{json.dumps(q)}: {text}" for q, text in entries) + "}")
    with pytest.raises(GQAFormatError, match=rf"^{f}: question '{qid}' gives the field 'answer' twice"):
        load_gqa(root)


def test_gqa_image_id_matching_two_files_names_both(tmp_path):
    root, f, data = _gqa(tmp_path)
    qid = sorted(data)[0]
    png = root / "images" / f"{data[qid]['imageId']}.png"
    shutil.copy(png, png.with_suffix(".jpg"))
    with pytest.raises(GQAFormatError) as exc:
        load_gqa(root)
    assert str(png) in str(exc.value) and str(png.with_suffix(".jpg")) in str(exc.value)
    assert f"question {qid!r}" in str(exc.value) and str(f) in str(exc.value)


@pytest.mark.parametrize("field,value,msg", [
    ("answer", None, "has no 'answer' field"),
    ("question", None, "has no 'question' field"),
    ("imageId", None, "has no 'imageId' field"),
    ("answer", 3, "field 'answer' must be a non-empty string"),
    ("question", "  ", "field 'question' must be a non-empty string"),
])
def test_gqa_bad_fields_name_file(tmp_path, field, value, msg):
    root, f, data = _gqa(tmp_path)
    qid = sorted(data)[1]
    if value is None:
        del data[qid][field]
    else:
        data[qid][field] = value
    f.write_text(json.dumps(data))
    with pytest.raises(GQAFormatError, match=rf"testdev_balanced_questions\.json: question '{qid}'.*{msg}"):
        load_gqa(root)


def test_gqa_bad_json_and_layout(tmp_path):
    root, f, data = _gqa(tmp_path)
    f.write_text("{not json")
    with pytest.raises(GQAFormatError, match=r"testdev_balanced_questions\.json: invalid JSON"):
        load_gqa(root)
    f.write_text(json.dumps(list(data.values())))
    with pytest.raises(GQAFormatError, match="keyed by question id"):
        load_gqa(root)
    f.write_text(json.dumps(data))
    shutil.rmtree(root / "images")
    with pytest.raises(GQAFormatError, match="images folder not found"):
        load_gqa(root)
    with pytest.raises(GQAFormatError, match="no testdev_balanced_questions.json"):
        load_gqa(tmp_path)


def test_gqa_write_predictions(tmp_path):
    root = synthetic.write_gqa(tmp_path / "gqa", n_questions=3)
    qs = load_gqa(root)
    out = gqa.write_predictions(tmp_path / "pred.json", qs, ["Yes..", " Red", "3..."])
    rows = json.loads(out.read_text())
    assert rows == [{"questionId": qs[0].question_id, "prediction": "yes"},  # every trailing "." stripped
                    {"questionId": qs[1].question_id, "prediction": "red"},
                    {"questionId": qs[2].question_id, "prediction": "3"}]


# --------------------------------------------------------------------------- prompts


def test_llava_v1_prompt_exact():
    p = prompts.build_prompt("Is there a red circle in the image? Please answer yes or no.", benchmark="mme")
    assert p == ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions. USER: <image>\n"
                 "Is there a red circle in the image?\nAnswer the question using a single word or phrase. ASSISTANT:")
    g = prompts.build_prompt("What color is it? Please answer yes or no.", benchmark="gqa")
    assert "What color is it? Please answer yes or no.\nAnswer the question" in g  # GQA: raw question


@pytest.mark.parametrize("q,stripped", [
    ("Is it red? Please answer yes or no.", "Is it red?"),
    ("Is it red?  Please answer yes or no.", "Is it red?"),   # double space, as in some MME files
    ("Is it red?", "Is it red?"),
    ("Please answer yes or no. Is it red?", "Please answer yes or no. Is it red?"),
])
def test_strip_mme_suffix(q, stripped):
    assert prompts.strip_mme_suffix(q) == stripped


def test_chat_template_style_and_fallback():
    class WithTemplate:
        image_token = "<image>"
        chat_template = "{% for m in messages %}U:{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} A:{% endif %}"

        def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
            import jinja2
            return jinja2.Template(self.chat_template).render(messages=messages,
                                                               add_generation_prompt=add_generation_prompt)

    p = prompts.build_prompt("How many squares?", benchmark="gqa", style="chat_template", processor=WithTemplate())
    assert p == "U:<image>How many squares?\nAnswer the question using a single word or phrase. A:"

    class NoTemplate:
        chat_template = None
        tokenizer = None

    fb = prompts.build_prompt("How many squares?", style="chat_template", processor=NoTemplate())
    assert fb == prompts.build_prompt("How many squares?", style="llava_v1")
    with pytest.raises(ValueError):
        prompts.build_prompt("x", style="nope")
    with pytest.raises(ValueError):
        prompts.build_prompt("x", benchmark="vqav2")


def test_score_mme_accepts_lmms_eval_field_names():
    qs = [{"category": "artwork", "question_id": "artwork/1.jpg", "answer": "Yes"},
          {"category": "artwork", "question_id": "artwork/1.jpg", "answer": "No"}]
    assert score_mme(qs, ["Yes", "No"]).subtasks["artwork"].score == 200
    with pytest.raises(KeyError):
        score_mme([{"answer": "Yes"}, {"answer": "No"}], ["yes", "no"])
