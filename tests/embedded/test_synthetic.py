"""The synthetic visual-QA generator: determinism, answer correctness, on-disk formats."""

import json
import random
import re
from pathlib import Path

import pytest

from vtprune.embedded import synthetic as S

ASSETS = Path(S.__file__).resolve().parents[2] / "assets"  # S is the package vtprune/embedded/synthetic/


def _sig(sample):
    return (sample.question, sample.answer, sample.family, sample.style, sample.image.tobytes())


def test_training_stream_is_deterministic_and_seeded():
    a = S.training_samples(3)
    b = S.training_samples(3)
    first = [_sig(next(a)) for _ in range(40)]
    assert first == [_sig(next(b)) for _ in range(40)]
    c = S.training_samples(4)
    assert first != [_sig(next(c)) for _ in range(40)]


def test_streams_are_namespaced():
    """Training and validation streams differ even for the same integer seed."""
    train = S.training_samples(S.VALIDATION_SEED)
    val = S.validation_samples(20)
    assert [_sig(next(train)) for _ in range(20)] != [_sig(s) for s in val]
    assert [_sig(s) for s in S.validation_samples(20)] == [_sig(s) for s in val]


def test_samples_cover_all_families_and_both_answer_kinds():
    samples = S.validation_samples(300)
    assert {s.family for s in samples if s.style == "mme"} == set(S.MME_SUBTASKS)
    assert {s.family for s in samples if s.style == "gqa"} == set(S.GQA_FAMILIES)
    mme = [s for s in samples if s.style == "mme"]
    assert all(s.question.endswith(" Please answer yes or no.") and s.answer in ("yes", "no") for s in mme)
    gqa = [s for s in samples if s.style == "gqa"]
    assert all(re.fullmatch(r"[a-z0-9]+", s.answer) for s in gqa)
    assert {s.answer for s in gqa} >= {"yes", "no", "left", "red", "circle"}
    assert all(s.image.size == (S.IMAGE_SIZE, S.IMAGE_SIZE) and s.image.mode == "RGB" for s in samples)


def test_curriculum_knob_limits_objects():
    it = S.training_samples(0, max_objects=1)
    for _ in range(100):
        s = next(it)
        if s.family == "count" and s.style == "mme":
            assert len(s.scene.shapes) == 2  # MME count questions need a target counted twice
            continue
        assert len(s.scene.shapes) <= 1
        if s.scene.glyph is None:
            assert len(s.scene.shapes) == 1
    level = [2]
    it = S.training_samples(0, max_objects=lambda: level[0])
    assert max(len(next(it).scene.shapes) for _ in range(100)) == 2
    level[0] = 5
    assert max(len(next(it).scene.shapes) for _ in range(200)) >= 4


def test_small_objects_exist_and_shapes_do_not_overlap():
    rng = random.Random(1)
    radii = []
    for _ in range(200):
        sc = S.random_scene(rng, max_objects=5)
        radii += [s.r for s in sc.shapes]
        for i, a in enumerate(sc.shapes):
            assert 0 <= a.box[0] and a.box[2] < sc.size and 0 <= a.box[1] and a.box[3] < sc.size
            for b in sc.shapes[i + 1:]:
                assert S._boxes_clear(a.box, b.box, 3)
    assert min(radii) <= S.SMALL_RADIUS[1] and sum(r <= S.SMALL_RADIUS[1] for r in radii) > 0.15 * len(radii)


def test_rendering_draws_the_objects():
    sc = S.Scene((S.ShapeObj("square", "red", 20, 20, 8), S.ShapeObj("circle", "blue", 70, 70, 5)),
                 S.Glyph("K", "white", 60, 10, 30), background=(0, 0, 0))
    img = S.render_scene(sc)
    assert img.getpixel((20, 20)) == S.COLORS["red"]
    assert img.getpixel((70, 70)) == S.COLORS["blue"]
    assert img.getpixel((2, 90)) == (0, 0, 0)
    ink = [img.getpixel((x, y)) for x in range(60, 96) for y in range(10, 50)]
    assert sum(p == S.GLYPH_COLORS["white"] for p in ink) > 20


# --------------------------------------------------------------------------- answer correctness (oracle)

_NUM = {str(i): i for i in range(10)}


def _check_mme(scene, subtask, qa):
    q, yes = qa.question, qa.answer == "Yes"
    if subtask == "existence":
        m = re.match(r"Is there a (?:(\w+) )?(circle|square|triangle)", q)
        color, shape = m.group(1), m.group(2)
        truth = scene.count(kind=shape, color=color) > 0
    elif subtask == "count":
        m = re.match(r"(?:Is there exactly|Are there(?: exactly)?) (\d) (?:(\w+) )?(\w+?)s? in the image", q)
        n, color, noun = int(m.group(1)), m.group(2), m.group(3)
        kind = noun if noun in S.SHAPES else None
        truth = scene.count(kind=kind, color=color) == n
    elif subtask == "position":
        m = re.match(r"Is the (?:(\w+) )?(circle|square|triangle) (?:on|at) the (\w+)", q)
        color, shape, side = m.groups()
        objs = [s for s in scene.shapes if s.kind == shape and (color is None or s.color == color)]
        assert len(objs) == 1, q
        o = objs[0]
        c = o.x if side in ("left", "right") else o.y
        truth = c < 0.4 * scene.size if side in ("left", "top") else c > 0.6 * scene.size
    elif subtask == "color":
        m = re.match(r"Is the (?:color of the )?(circle|square|triangle) (\w+)\?", q)
        shape, color = m.groups()
        objs = [s for s in scene.shapes if s.kind == shape]
        assert len(objs) == 1, q
        truth = objs[0].color == color
    else:
        m = re.search(r"(letter|number) (\w)", q)
        truth = scene.glyph.char == m.group(2)
        assert scene.glyph.kind == m.group(1)
    assert truth == yes, (subtask, q, qa.answer, scene)


@pytest.mark.parametrize("subtask", S.MME_SUBTASKS)
def test_mme_pairs_are_correct(subtask):
    rng = random.Random(f"oracle-{subtask}")
    made = 0
    for _ in range(150):
        scene = S.random_scene(rng, text=subtask == "OCR", max_objects=5)
        pair = S.mme_pair(scene, subtask, rng)
        if pair is None:
            continue
        made += 1
        yes, no = pair
        assert (yes.answer, no.answer) == ("Yes", "No")
        _check_mme(scene, subtask, yes)
        _check_mme(scene, subtask, no)
    assert made > 50


def test_gqa_answers_are_correct():
    rng = random.Random("oracle-gqa")
    for _ in range(300):
        fam = rng.choice(S.GQA_FAMILIES)
        scene = S.random_scene(rng, text=fam == "ocr", max_objects=5)
        out = S.gqa_question(scene, fam, rng)
        if out is None:
            continue
        qa, full = out
        q, a = qa.question, qa.answer
        if fam == "count":
            m = re.match(r"How many (?:(\w+) )?(\w+?)s (?:are|are in)", q)
            color, noun = m.groups()
            assert int(a) == scene.count(kind=noun if noun in S.SHAPES else None, color=color)
        elif fam == "color":
            shape = re.search(r"(circle|square|triangle)", q).group(1)
            assert [s.color for s in scene.shapes if s.kind == shape] == [a]
        elif fam == "shape":
            color = re.search(r"(red|green|blue|yellow|purple)", q).group(1)
            assert [s.kind for s in scene.shapes if s.color == color] == [a]
        elif fam == "ocr":
            assert a == scene.glyph.char.lower()
        elif fam == "position":
            assert a in ("left", "right", "top", "bottom")
        else:
            assert a in ("yes", "no")
        assert full and full[0].isupper()


# --------------------------------------------------------------------------- writers


def _question_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
            if p.suffix in (".txt", ".json")}


def test_write_mme_layout(tmp_path):
    root = S.write_mme(tmp_path / "mme", per_subtask=4)
    assert sorted(p.name for p in root.iterdir()) == sorted(S.MME_SUBTASKS)
    for sub in S.MME_SUBTASKS:
        files = sorted(p.name for p in (root / sub).iterdir())
        assert files == sorted([f"{i:04d}.png" for i in range(4)] + [f"{i:04d}.txt" for i in range(4)])
        for txt in (root / sub).glob("*.txt"):
            lines = txt.read_text().splitlines()
            assert len(lines) == 2
            (q1, a1), (q2, a2) = (ln.split("\t") for ln in lines)
            assert (a1, a2) == ("Yes", "No")
            assert q1.endswith("? Please answer yes or no.") and q2.endswith("? Please answer yes or no.")


def test_write_gqa_fields(tmp_path):
    root = S.write_gqa(tmp_path / "gqa", n_questions=30)
    data = json.loads((root / "testdev_balanced_questions.json").read_text())
    assert len(data) == 30
    for qid, e in data.items():
        assert set(e) >= {"imageId", "question", "answer", "fullAnswer", "isBalanced", "groups", "entailed",
                          "equivalent", "types", "annotations", "semantic", "semanticStr"}
        assert set(e["types"]) == {"structural", "semantic", "detailed"}
        assert set(e["groups"]) == {"global", "local"}
        assert set(e["annotations"]) == {"question", "answer", "fullAnswer"}
        assert qid in e["equivalent"] and e["isBalanced"] is True
        assert (root / "images" / f"{e['imageId']}.png").is_file()
        assert re.fullmatch(r"[a-z0-9]+", e["answer"])
        assert all({"operation", "dependencies", "argument"} == set(op) for op in e["semantic"])
    # several questions share an image, as in real GQA
    assert len({e["imageId"] for e in data.values()}) < 30


def test_regeneration_gives_identical_question_files(tmp_path):
    a = S.write_mme(tmp_path / "a", per_subtask=5)
    b = S.write_mme(tmp_path / "b", per_subtask=5)
    assert _question_files(a) == _question_files(b)
    c = S.write_gqa(tmp_path / "c", n_questions=25)
    d = S.write_gqa(tmp_path / "d", n_questions=25)
    assert _question_files(c) == _question_files(d)
    e = S.write_gqa(tmp_path / "e", n_questions=25, seed=S.GQA_SEED + 1)
    assert _question_files(c) != _question_files(e)


@pytest.mark.skipif(not (ASSETS / "synthetic_mme").is_dir(), reason="held-out assets not generated")
def test_shipped_heldout_sets_match_the_generator(tmp_path):
    mme, gqa = S.write_heldout_assets(tmp_path)
    assert _question_files(mme) == _question_files(ASSETS / "synthetic_mme")
    assert _question_files(gqa) == _question_files(ASSETS / "synthetic_gqa")
    shipped_pngs = sorted(p.relative_to(ASSETS / "synthetic_mme") for p in (ASSETS / "synthetic_mme").rglob("*.png"))
    assert shipped_pngs == sorted(p.relative_to(mme) for p in mme.rglob("*.png"))
    assert len(shipped_pngs) == 30 * len(S.MME_SUBTASKS)
    assert len(json.loads((gqa / "testdev_balanced_questions.json").read_text())) == 200


def test_training_conversations_are_deterministic_and_correct():
    a = S.training_conversations(5, max_objects=4)
    b = S.training_conversations(5, max_objects=4)
    convs = [next(a) for _ in range(150)]
    assert [c.turns for c in convs] == [next(b).turns for _ in range(150)]
    firsts = set()
    for c in convs:
        assert 1 <= len(c.turns) <= 4
        assert len({t[0] for t in c.turns}) == len(c.turns)          # distinct questions
        assert len(c.scene.shapes) <= 4
        firsts.add((c.turns[0][2], c.turns[0][3]))
        for question, answer, family, kind in c.turns:
            if kind == "mme":
                assert question.endswith(" Please answer yes or no.") and answer in ("yes", "no")
                qa = S.QA(question[: -len(" Please answer yes or no.")], answer.capitalize(), family, True)
                _check_mme(c.scene, family, qa)
            else:
                assert family in S.GQA_FAMILIES and re.fullmatch(r"[a-z0-9]+", answer)
    assert {f for f, k in firsts if k == "mme"} == set(S.MME_SUBTASKS)
    assert {f for f, k in firsts if k == "gqa"} == set(S.GQA_FAMILIES)
    only_open = S.training_conversations(5, mme_fraction=0.0)
    assert all(t[3] == "gqa" for _ in range(30) for t in next(only_open).turns)


def test_mme_count_wording_does_not_give_the_answer_away():
    """Yes and No count questions share the plural wording and the count range (>= 2)."""
    rng = random.Random("count-leak")
    counts = {"Yes": [], "No": []}
    for _ in range(300):
        scene = S.random_scene(rng, max_objects=S.DEFAULT_MAX_OBJECTS)
        pair = S.mme_pair(scene, "count", rng)
        if pair is None:
            assert all(t[2] < 2 for t in S._count_targets(scene))
            continue
        for qa in pair:
            m = re.match(r"Are there (?:exactly )?(\d) \w+(?: \w+)?s in the image\?$", qa.question)
            assert m, qa.question
            counts[qa.answer].append(int(m.group(1)))
    assert min(counts["Yes"] + counts["No"]) >= 2
    # every asked number occurs with both answers (the number alone does not decide)
    assert set(counts["Yes"]) & set(counts["No"]) >= {2, 3, 4}


def test_gqa_count_answers_are_not_dominated_by_one():
    rng = random.Random("count-balance")
    answers = []
    for _ in range(400):
        scene = S.random_scene(rng, max_objects=S.DEFAULT_MAX_OBJECTS)
        out = S.gqa_question(scene, "count", rng)
        if out:
            answers.append(out[0].answer)
    assert answers.count("1") / len(answers) < 0.5
    assert {"1", "2", "3", "4"} <= set(answers)


def test_training_conversations_family_curriculum_and_describe_turn():
    allowed = ["color", "ocr"]
    stream = S.training_conversations(3, families=lambda: allowed, describe_prob=1.0)
    seen = set()
    for _ in range(60):
        conv = next(stream)
        *questions, last = conv.turns
        assert last[2] == "describe"
        expected = sorted([(s.x, s.name) for s in conv.scene.shapes]
                          + ([(conv.scene.glyph.x + conv.scene.glyph.size // 4,
                               f"{conv.scene.glyph.kind} {conv.scene.glyph.char.lower()}")]
                             if conv.scene.glyph else []))
        assert last[1] == " ".join(name for _, name in expected)
        for _q, _a, family, _kind in questions:
            assert S.family_key(family) in allowed
            seen.add(S.family_key(family))
    assert seen == set(allowed)
    # the vocabulary covers the describe turn
    words = " ".join(S.vocabulary_texts()).lower().split()
    assert all(w in words for w in "list the objects in image from left to right which are".split())


def test_label_map_matches_the_rendered_pixels():
    import numpy as np

    rng = random.Random("labels")
    for i in range(20):
        scene = S.random_scene(rng, text=i % 2 == 0, max_objects=4)
        rgb = np.asarray(S.render_scene(scene)).astype(int)
        lab = np.asarray(S.label_map(scene))
        assert lab.shape == rgb.shape[:2]
        for s in scene.shapes:
            cls = S.LABEL_CLASSES.index(s.name)
            if scene.count(s.kind, s.color) == 1:
                assert (lab == cls).sum() > 0
            assert (rgb[lab == cls] == S.COLORS[s.color]).all()
        if scene.glyph is not None:
            ink = lab == S.LABEL_CLASSES.index(scene.glyph.char)
            assert ink.sum() > 20
            glyph_rgb = np.array(S.GLYPH_COLORS[scene.glyph.color])
            assert np.abs(rgb[ink] - glyph_rgb).max(axis=1).mean() < 64   # hard mask vs anti-aliased ink
        assert (rgb[lab == 0] == scene.background).all(axis=1).mean() > 0.97


def test_old_import_paths_are_aliases_of_the_embedded_modules():
    """vtprune.benchmarks.synthetic / tiny_llava (kept for existing scripts) hand out the embedded objects."""
    from vtprune.benchmarks import synthetic as old_synthetic
    from vtprune.benchmarks import tiny_llava as old_tiny_llava
    from vtprune.embedded import tiny_llava

    for name in S.__all__:
        assert getattr(old_synthetic, name) is getattr(S, name), name
    # names outside __all__ that scripts use (scripts/analyze_position.py) come through too
    assert old_synthetic._scene_for is S._scene_for and old_synthetic._referable is S._referable
    assert old_synthetic.PLURAL is S.PLURAL
    for name in tiny_llava.__all__:
        assert getattr(old_tiny_llava, name) is getattr(tiny_llava, name), name
    assert old_tiny_llava.EOS_ID == tiny_llava.EOS_ID
    with pytest.raises(AttributeError):
        old_synthetic.no_such_name
