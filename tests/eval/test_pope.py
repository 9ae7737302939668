"""POPE: parsers, metrics (hand-computed), question files, question generation (METHODS.md numbers)."""

import math

import pytest

from attnkit.data import data_path
from attnkit.eval.metrics import pope


@pytest.mark.parametrize("text,expected", [
    ("No, there is not.", "no"), ("no", "no"), ("There is not a dog", "no"), ("No,", "no"),
    ("Not at all", "yes"), ("NO", "yes"), ("No!", "yes"), ("I don't see one", "yes"), ("", "yes"),
    ("Yes. No", "yes"), ("There is one. not", "yes"), ("Yes, there is a dog.", "yes"),
])
def test_official_parser_quirks(text, expected):
    assert pope.parse_answer(text, "official") == expected


@pytest.mark.parametrize("text,expected", [
    ("NO!", "no"), ("Yes.", "yes"), ("yes, there is", "yes"), ("No, there isn't.", "no"),
    ("Yes and no", "unknown"), ("Maybe", "unknown"), ("not at all", "unknown"), ("", "unknown"),
])
def test_robust_parser(text, expected):
    assert pope.parse_answer(text, "robust") == expected


def test_unknown_parser_name():
    with pytest.raises(ValueError, match="official"):
        pope.parse_answer("yes", "vlm")


def test_metrics_hand_computed():
    preds = ["yes", "yes", "no", "no", "unknown", "yes"]
    labels = ["yes", "no", "no", "yes", "yes", "yes"]
    m = pope.pope_metrics(preds, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 2)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["yes_ratio"] == pytest.approx(0.5)
    assert m["unknown_ratio"] == pytest.approx(1 / 6)


def test_metrics_zero_division_guard():
    m = pope.pope_metrics(["no", "no"], ["yes", "no"])
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["recall"] == 0.0
    m = pope.pope_metrics(["no", "no"], ["yes", "no"], zero_division=math.nan)
    assert math.isnan(m["precision"]) and m["recall"] == 0.0
    assert pope.pope_metrics([], [])["accuracy"] == 0.0


def test_metrics_reject_misaligned_or_bad_labels():
    with pytest.raises(ValueError, match="align"):
        pope.pope_metrics(["yes"], ["yes", "no"])
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope.pope_metrics(["yes"], ["Yes"])


def test_shipped_files_share_images_and_positives():
    splits = {s: pope.load_questions(data_path("pope", f"coco_pope_{s}.json")) for s in pope.SPLITS}
    assert all(len(v) == 3000 for v in splits.values())
    pos = {s: [(q["image"], q["text"]) for q in v if q["label"] == "yes"] for s, v in splits.items()}
    assert pos["random"] == pos["popular"] == pos["adversarial"]
    assert [q["label"] for q in splits["random"][:4]] == ["yes", "no", "yes", "no"]


def test_article_rule_and_no_imange():
    assert pope.question_text("apple") == "Is there an apple in the image?"
    assert pope.question_text("umbrella") == "Is there an umbrella in the image?"
    assert pope.question_text("dog") == "Is there a dog in the image?"


def test_coco_tiny_generation_numbers():
    import json

    with open(data_path("coco_tiny", "annotations", "instances_val2017.json")) as fh:
        objs = pope.objects_from_coco(json.load(fh))
    assert objs[5001] == ["scissors", "person", "handbag", "bicycle"]
    selected = {i: v for i, v in objs.items() if len(v) >= 3}
    assert len(selected) == 51
    freq, _ = pope.object_statistics(selected)
    assert len(freq) == 63
    assert [freq[o] for o in ("person", "cup", "dining table", "bottle", "spoon", "chair")] == [37, 17, 16, 12, 11, 9]
    for split in pope.SPLITS:
        qs = pope.coco_questions(split)
        assert len(qs) == 306
        assert [q["question_id"] for q in qs] == list(range(1, 307))
        for q in qs:
            in_image = q["object"] in objs[q["image_id"]]
            assert in_image == (q["label"] == "yes")
        per_image = {}
        for q in qs:
            per_image.setdefault(q["image_id"], []).append(q)
        for rows in per_image.values():
            assert [r["label"] for r in rows] == ["yes", "no"] * 3
            assert [r["object"] for r in rows[::2]] == objs[rows[0]["image_id"]][:3]
            negs = [r["object"] for r in rows[1::2]]
            assert len(set(negs)) == 3


def test_popular_negatives_follow_frequency():
    qs = pope.coco_questions("popular")
    first = [q["object"] for q in qs if q["image_id"] == 5001 and q["label"] == "no"]
    assert first == ["cup", "dining table", "bottle"]  # person (most frequent) is in the image


def test_adversarial_by_hand():
    objs = {1: ["a", "b", "c"], 2: ["a", "d", "e"], 3: ["a", "d", "f"], 4: ["b", "e", "g"]}
    qs = pope.generate_questions(objs, "adversarial", seed=3)
    img1 = [q for q in qs if q["image_id"] == 1 and q["label"] == "no"]
    # co-occurrence with a: d=2 (max); with b: a,c banned/positive, d used, e=1 -> e; with c: a,b banned -> random
    assert [q["object"] for q in img1[:2]] == ["d", "e"]
    assert [q["source"] for q in img1] == ["adversarial", "adversarial", "adversarial_fallback_random"]
    assert img1[2]["object"] in {"f", "g"}


def test_random_split_seeded_and_exclusion():
    a = pope.coco_questions("random", seed=1)
    assert a == pope.coco_questions("random", seed=1)
    assert a != pope.coco_questions("random", seed=2)
    objs = {1: ["a", "b", "c"], 2: ["d", "e", "f"], 3: ["g", "h", "i", "j", "k"]}
    qs = pope.generate_questions(objs, "random", seed=0, exclude={1: ["d", "e", "f", "g", "h"]})
    assert {q["object"] for q in qs if q["image_id"] == 1 and q["label"] == "no"} == {"i", "j", "k"}


def test_exhausted_negatives_raise():
    with pytest.raises(ValueError, match="no negative object left"):
        pope.generate_questions({1: ["a", "b", "c"], 2: ["a", "b", "d"]}, "popular")
