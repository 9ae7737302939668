"""CHAIR on hand-checked captions (rules of METHODS.md section 5, worked out by hand)."""

import pytest

from attnkit.eval.metrics import chair


@pytest.fixture(scope="module")
def vocab():
    return chair.ChairVocab.load()


def nodes(caption, vocab):
    return [n for _, n in chair.caption_to_objects(caption, vocab)]


@pytest.mark.parametrize("word,expected", [
    ("bus", "bu"), ("buses", "bus"), ("glass", "glas"), ("glasses", "glass"), ("tennis", "tenni"), ("ties", "ty"),
    ("doggies", "doggies"), ("cookies", "cookies"), ("people", "person"), ("men", "man"), ("women", "woman"),
    ("children", "child"), ("knives", "knife"), ("mice", "mouse"), ("geese", "goose"), ("oxen", "ox"),
    ("calves", "calf"), ("stoves", "stove"), ("skis", "ski"), ("scissors", "scissors"), ("sheep", "sheep"),
    ("cattle", "cattle"), ("luggage", "luggage"), ("dogs", "dog"), ("benches", "bench"), ("boxes", "box"),
    ("puppies", "puppy"), ("leaves", "leaf"), ("tomatoes", "tomato"), ("horses", "horse"), ("dog", "dog"),
])
def test_singularize_table(word, expected):
    assert chair.singularize(word) == expected


def test_vocab_odd_entries_kept(vocab):
    assert {"", " motor bike", " cheesecake", "iPhone"} <= vocab.mscoco_objects
    assert "motor bike" not in vocab.mscoco_objects and "cheesecake" not in vocab.mscoco_objects
    assert vocab.double_words["wine glas"] == "wine glass" and vocab.double_words["toilet seat"] == "toilet"
    assert len(vocab.double_words) == 55


def test_synonyms_plurals_and_singular_bus(vocab):
    # man->person, women->woman->person, bikes->bike->bicycle; singular "bus" -> "bu" is never counted
    assert nodes("A man and two women are riding bikes next to a bus.", vocab) == ["person", "person", "bicycle"]
    assert nodes("Two buses.", vocab) == ["bus"]


def test_two_word_objects_after_singularization(vocab):
    assert nodes("Hot dogs and a wine glass on the dining table.", vocab) == ["hot dog", "wine glass", "dining table"]
    assert nodes("Two people with skis and knives near a baby elephant.", vocab) == \
        ["person", "skis", "knife", "elephant"]


def test_toilet_seat_rule(vocab):
    assert nodes("A cat sits on the seat of the toilet.", vocab) == ["cat", "toilet"]
    assert nodes("A cat sits on the seat.", vocab) == ["cat", "chair"]
    assert nodes("A toilet seat and a chair.", vocab) == ["toilet", "chair"]


def test_repeats_and_synonyms_counted_separately(vocab):
    assert nodes("A dog, a puppy and another dog.", vocab) == ["dog", "dog", "dog"]


def test_quirks_never_counted(vocab):
    # bus->bu, ties->ty, "motor bike" merges into a form the vocabulary lacks, iPhone is never lowercase-matched
    assert nodes("A bus, some ties, a motor bike and an iPhone.", vocab) == []
    assert nodes("An orange on the table.", vocab) == ["orange", "dining table"]


def test_metrics_hand_computed(vocab):
    gt = {1: {"person", "bicycle", "car"}, 2: {"dining table", "hot dog"}, 3: {"cat", "toilet"}}
    caps = [(1, "A man and two women are riding bikes next to a bus."),
            (2, "Hot dogs and a wine glass on the dining table."),
            (3, "A dog, a puppy and a cat on a toilet seat.")]
    recs = [chair.score_caption(c, i, gt, vocab) for i, c in caps]
    assert recs[2]["mentions"] == ["dog", "dog", "cat", "toilet"]
    assert recs[2]["hallucinated"] == ["dog", "dog"]
    m = chair.chair_metrics(recs)
    assert m["chair_s"] == pytest.approx(2 / 3)
    assert m["chair_i"] == pytest.approx(3 / 10)
    assert m["recall"] == pytest.approx(6 / 7)
    assert m["mean_length"] == pytest.approx((12 + 10 + 11) / 3)  # words split on spaces


def test_image_ids_must_be_integers(vocab):
    gt = {5001: {"person"}}
    assert chair.score_caption("A person.", "5001", gt, vocab)["hallucinated"] == []
    with pytest.raises(TypeError, match="not an integer"):
        chair.score_caption("A person.", "COCO_5001", gt, vocab)
    with pytest.raises(KeyError, match="no ground truth"):
        chair.score_caption("A person.", 7, gt, vocab)


def test_shipped_ground_truth_int_keys():
    gt = chair.load_ground_truth()
    assert len(gt) == 123287 and all(isinstance(k, int) for k in list(gt)[:10])
    assert {"dog", "person", "toilet"} <= gt[16164]
