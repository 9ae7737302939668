"""ROUGE-1 recall as the Retrieval-Head NIAH protocol scores it: ``rouge_score`` when installed, else a fallback.

``rouge1_recall`` calls ``rouge_score.rouge_scorer.RougeScorer(["rouge1"], use_stemmer=...)`` (installed with the
``lm-eval`` extra) and returns the ``recall`` of ``score(target=reference, prediction=prediction)``. Without
``rouge_score`` it computes the same quantity itself: lowercase, every character outside ``[a-z0-9]`` becomes a
space, split on whitespace; with ``use_stemmer`` tokens longer than 3 characters are stemmed with
``porter_stem``; recall = clipped unigram overlap / reference length. ``rouge_backend()`` says which one is used
(the eval harness records it).

``porter_stem`` is Porter's algorithm with the NLTK extensions (nltk's ``PorterStemmer`` default mode, which is what
``rouge_score`` uses): irregular forms (sky, dying, news, …), "ies"/"ied" on four-letter words, y→i only after a
consonant, "alli"/"bli"/"fulli"/"logi" in step 2, and two-letter cvc. ``tests/eval/test_niah_rouge.py`` compares it
with nltk's stemmer on every word of the NIAH essays and TruthfulQA.

Example:
    >>> rouge1_recall("eat a sandwich and sit in Dolores Park", "You should eat sandwiches in Dolores park.")
    0.625
    >>> rouge_backend() in ("rouge-score", "fallback")
    True
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from typing import Callable

# ------------------------------------------------------------------------------------------ Porter (NLTK mode)
_VOWELS = frozenset("aeiou")
_IRREGULAR = {"skies": "sky", "sky": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
              "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
              "cannings": "canning", "canning": "canning", "howe": "howe", "proceed": "proceed",
              "exceed": "exceed", "succeed": "succeed"}


def _consonants(word: str) -> list[bool]:
    """Per letter: is it a consonant (y is one at the start or after a vowel)."""
    flags: list[bool] = []
    for i, ch in enumerate(word):
        flags.append(ch not in _VOWELS and (ch != "y" or i == 0 or not flags[i - 1]))
    return flags


def _measure(stem: str) -> int:
    """Porter's m: the number of vowel→consonant transitions in the stem."""
    pattern = "".join("c" if c else "v" for c in _consonants(stem))
    return pattern.count("vc")


def _m_pos(stem: str) -> bool:
    return _measure(stem) > 0


def _m_gt1(stem: str) -> bool:
    return _measure(stem) > 1


def _has_vowel(stem: str) -> bool:
    return not all(_consonants(stem))


def _ends_cvc(w: str) -> bool:
    c = _consonants(w)
    if len(w) == 2:  # NLTK extension: a two-letter vc word
        return not c[0] and c[1]
    return len(w) >= 3 and c[-3] and not c[-2] and c[-1] and w[-1] not in "wxy"


Rule = tuple[str, str, "Callable[[str], bool] | None"]


def _first_rule(word: str, rules: list[Rule]) -> str:
    """Apply the first rule whose suffix ends ``word`` (the word is left as is when its condition fails)."""
    for suffix, repl, cond in rules:
        if word.endswith(suffix):
            stem = word[: len(word) - len(suffix)]
            return stem + repl if cond is None or cond(stem) else word
    return word


def _step1a(w: str) -> str:
    if w.endswith("ies") and len(w) == 4:
        return w[:-3] + "ie"
    return _first_rule(w, [("sses", "ss", None), ("ies", "i", None), ("ss", "ss", None), ("s", "", None)])


def _step1b(w: str) -> str:
    if w.endswith("ied"):
        return w[:-3] + ("ie" if len(w) == 4 else "i")
    if w.endswith("eed"):
        return w[:-1] if _m_pos(w[:-3]) else w
    for suffix in ("ed", "ing"):
        if w.endswith(suffix) and _has_vowel(w[: -len(suffix)]):
            stem = w[: -len(suffix)]
            break
    else:
        return w
    if stem.endswith(("at", "bl", "iz")):
        return stem + "e"
    if len(stem) >= 2 and stem[-1] == stem[-2] and _consonants(stem)[-1]:
        return stem[:-1] if stem[-1] not in "lsz" else stem
    return stem + "e" if _measure(stem) == 1 and _ends_cvc(stem) else stem


def _step1c(w: str) -> str:
    if w.endswith("y") and len(w) > 2 and _consonants(w[:-1])[-1]:
        return w[:-1] + "i"
    return w


_STEP2: list[Rule] = [(s, r, _m_pos) for s, r in (
    ("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"), ("bli", "ble"),
    ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"), ("ization", "ize"), ("ation", "ate"),
    ("ator", "ate"), ("alism", "al"), ("iveness", "ive"), ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"),
    ("iviti", "ive"), ("biliti", "ble"), ("fulli", "ful"))]
_STEP3: list[Rule] = [(s, r, _m_pos) for s, r in (
    ("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""), ("ness", ""))]
_STEP4: list[Rule] = [(s, "", _m_gt1) for s in (
    "al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent")] + [
    ("ion", "", lambda stem: _m_gt1(stem) and stem[-1:] in ("s", "t"))] + [(s, "", _m_gt1) for s in (
        "ou", "ism", "ate", "iti", "ous", "ive", "ize")]


def _step2(w: str) -> str:
    if w.endswith("alli") and _m_pos(w[:-4]):
        return _step2(w[:-4] + "al")
    return _first_rule(w, _STEP2 + [("logi", "log", lambda stem: _m_pos(w[:-3]))])


def _step5(w: str) -> str:
    if w.endswith("e"):
        m = _measure(w[:-1])
        if m > 1 or (m == 1 and not _ends_cvc(w[:-1])):
            w = w[:-1]
    if w.endswith("ll") and _measure(w[:-1]) > 1:
        w = w[:-1]
    return w


def porter_stem(word: str) -> str:
    """Porter's stemmer with the NLTK extensions (what ``rouge_score`` stems with).

    Example:
        >>> [porter_stem(w) for w in ["caresses", "ponies", "dies", "cats", "agreed", "sitting", "hopping", "happy",
        ...                           "annoying", "always", "sandwiches", "relational", "generously", "skies"]]
        ['caress', 'poni', 'die', 'cat', 'agre', 'sit', 'hop', 'happi', 'annoy', 'alway', 'sandwich', 'relat', 'gener', 'sky']
    """
    w = word.lower()
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if len(w) <= 2:
        return w
    w = _step1c(_step1b(_step1a(w)))
    w = _first_rule(_step2(w), _STEP3)
    return _step5(_first_rule(w, _STEP4))


# ------------------------------------------------------------------------------------------ ROUGE-1
def rouge_tokens(text: str, use_stemmer: bool = True) -> list[str]:
    """The fallback's tokens: rouge_score's tokenization (lowercase, non-alphanumerics to spaces, stem tokens
    longer than 3 characters) with ``porter_stem``.

    Example:
        >>> rouge_tokens("Dolores-Park, SUNNY!")
        ['dolor', 'park', 'sunni']
    """
    toks = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return [porter_stem(t) if use_stemmer and len(t) > 3 else t for t in toks]


def rouge1_recall_fallback(reference: str, prediction: str, use_stemmer: bool = True) -> float:
    """ROUGE-1 recall without ``rouge_score``: clipped unigram overlap / reference unigrams (0.0 if empty).

    Example:
        >>> rouge1_recall_fallback("a a b", "a")
        0.3333333333333333
    """
    ref = Counter(rouge_tokens(reference, use_stemmer))
    pred = Counter(rouge_tokens(prediction, use_stemmer))
    total = sum(ref.values())
    return sum((ref & pred).values()) / total if total else 0.0


@functools.lru_cache(maxsize=2)
def _scorer(use_stemmer: bool):
    """A cached ``rouge_score`` scorer, or None when the package is missing."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        return None
    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=use_stemmer)


def rouge_backend() -> str:
    """``"rouge-score"`` when the ``rouge_score`` package scores ROUGE, else ``"fallback"``."""
    return "rouge-score" if _scorer(True) is not None else "fallback"


def rouge1_recall(reference: str, prediction: str, use_stemmer: bool = True) -> float:
    """ROUGE-1 recall of ``prediction`` against ``reference`` (``rouge_score`` if installed, else the fallback).

    Example:
        >>> rouge1_recall("eating sandwiches", "eat a sandwich"), rouge1_recall("eating sandwiches", "eat", False)
        (1.0, 0.0)
    """
    scorer = _scorer(bool(use_stemmer))
    if scorer is None:
        return rouge1_recall_fallback(reference, prediction, use_stemmer)
    return float(scorer.score(reference, prediction)["rouge1"].recall)
