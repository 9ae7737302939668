"""ROUGE-1 recall, scored like ``rouge_score`` (used by the Retrieval-Head NIAH protocol).

Tokenization: lowercase, every character outside ``[a-z0-9]`` becomes a space, split on whitespace; with
``use_stemmer`` tokens longer than 3 characters are stemmed. Recall = clipped unigram overlap / reference length.

*Deviation.* ``rouge_score`` uses nltk's ``PorterStemmer`` in its default ``NLTK_EXTENSIONS`` mode;
``porter_stem`` here is Porter's original 1980 algorithm (steps 1a–5b). The two differ on a few word classes
(nltk maps e.g. "dies"→"die" and has special cases such as "sky"/"news"); the needle's words stem identically.

Example:
    >>> rouge1_recall("eat a sandwich and sit in Dolores Park", "You should eat sandwiches in Dolores park.")
    0.625
"""

from __future__ import annotations

import re
from collections import Counter

_VOWELS = set("aeiou")


def _is_cons(w: str, i: int) -> bool:
    if w[i] in _VOWELS:
        return False
    if w[i] == "y":
        return i == 0 or not _is_cons(w, i - 1)
    return True


def _measure(stem: str) -> int:
    """Porter's m: the number of VC sequences in the stem."""
    pattern = "".join("c" if _is_cons(stem, i) else "v" for i in range(len(stem)))
    return len(re.findall(r"v+c+", pattern))


def _has_vowel(stem: str) -> bool:
    return any(not _is_cons(stem, i) for i in range(len(stem)))


def _cvc(w: str) -> bool:
    return (len(w) >= 3 and _is_cons(w, -3 % len(w)) and not _is_cons(w, len(w) - 2)
            and _is_cons(w, len(w) - 1) and w[-1] not in "wxy")


_STEP2 = {"ational": "ate", "tional": "tion", "enci": "ence", "anci": "ance", "izer": "ize", "abli": "able",
          "alli": "al", "entli": "ent", "eli": "e", "ousli": "ous", "ization": "ize", "ation": "ate", "ator": "ate",
          "alism": "al", "iveness": "ive", "fulness": "ful", "ousness": "ous", "aliti": "al", "iviti": "ive",
          "biliti": "ble"}
_STEP3 = {"icate": "ic", "ative": "", "alize": "al", "iciti": "ic", "ical": "ic", "ful": "", "ness": ""}
_STEP4 = ["al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion", "ou", "ism",
          "ate", "iti", "ous", "ive", "ize"]


def _replace_longest(w: str, table: dict, min_m: int) -> str:
    for suf in sorted(table, key=len, reverse=True):
        if w.endswith(suf):
            stem = w[: len(w) - len(suf)]
            return stem + table[suf] if _measure(stem) > min_m else w
    return w


def _step4(w: str) -> str:
    for suf in sorted(_STEP4, key=len, reverse=True):
        if w.endswith(suf):
            stem = w[: len(w) - len(suf)]
            if _measure(stem) > 1 and (suf != "ion" or stem.endswith(("s", "t"))):
                return stem
            return w
    return w


def _step5(w: str) -> str:
    if w.endswith("e"):
        stem = w[:-1]
        m = _measure(stem)
        if m > 1 or (m == 1 and not _cvc(stem)):
            w = stem
    if w.endswith("ll") and _measure(w) > 1:
        w = w[:-1]
    return w


def porter_stem(word: str) -> str:
    """Porter's original stemmer (1980).

    Example:
        >>> [porter_stem(w) for w in ["caresses", "ponies", "cats", "agreed", "sitting", "hopping", "happy",
        ...                           "sandwiches", "relational", "generalization", "controll"]]
        ['caress', 'poni', 'cat', 'agre', 'sit', 'hop', 'happi', 'sandwich', 'relat', 'gener', 'control']
    """
    w = _step1(word)
    if len(word) <= 2:
        return word
    w = _replace_longest(w, _STEP2, 0)
    w = _replace_longest(w, _STEP3, 0)
    return _step5(_step4(w))


def _step1(word: str) -> str:
    w = word
    if len(w) <= 2:
        return w
    # step 1a
    if w.endswith("sses"):
        w = w[:-2]
    elif w.endswith("ies"):
        w = w[:-2]
    elif w.endswith("ss"):
        pass
    elif w.endswith("s"):
        w = w[:-1]
    # step 1b
    extra = False
    if w.endswith("eed"):
        if _measure(w[:-3]) > 0:
            w = w[:-1]
    elif w.endswith("ed") and _has_vowel(w[:-2]):
        w, extra = w[:-2], True
    elif w.endswith("ing") and _has_vowel(w[:-3]):
        w, extra = w[:-3], True
    if extra:
        if w.endswith(("at", "bl", "iz")):
            w += "e"
        elif len(w) >= 2 and w[-1] == w[-2] and _is_cons(w, len(w) - 1) and w[-1] not in "lsz":
            w = w[:-1]
        elif _measure(w) == 1 and _cvc(w):
            w += "e"
    if w.endswith("y") and _has_vowel(w[:-1]):  # step 1c
        w = w[:-1] + "i"
    return w


def rouge_tokens(text: str, use_stemmer: bool = True) -> list[str]:
    """rouge_score's tokenization (lowercase, non-alphanumerics to spaces, stem tokens longer than 3)."""
    toks = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return [porter_stem(t) if use_stemmer and len(t) > 3 else t for t in toks]


def rouge1_recall(reference: str, prediction: str, use_stemmer: bool = True) -> float:
    """Clipped unigram overlap / number of reference unigrams (0.0 for an empty reference)."""
    ref = Counter(rouge_tokens(reference, use_stemmer))
    pred = Counter(rouge_tokens(prediction, use_stemmer))
    total = sum(ref.values())
    return sum((ref & pred).values()) / total if total else 0.0
