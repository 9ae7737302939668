"""CHAIR object hallucination metric, caption by caption the logic of the reference (LisaAnne/Hallucination
``utils/chair.py`` as made standalone by Maxlinn/CHAIR-metric-standalone 640c507; METHODS.md section 5).

Pipeline for one caption (``caption_to_objects``), each step as the reference does it:

1. lowercase, then ``word_tokenize``: the reference calls ``nltk.word_tokenize`` (Punkt sentence split, then
   NLTK's improved Treebank word tokenizer). Ours applies the same Treebank rules in the same order; the Punkt
   step is reduced to what changes tokens: a sentence-final period is split off a word, except after a known
   abbreviation, a single letter or a number. So curly quotes are punctuation (``“hot dog”`` → ``“ hot dog ”``),
   ``& ; @ # $ %`` split words (``cats&dogs`` → ``cats & dogs``), ``dog's`` → ``dog 's`` and a detached ``'s``
   stays whole;
2. ``singularize`` every token with pattern.en's rules (clips/pattern d25511f ``inflect.py``), quirks included:
   "bus"→"bu", "glass"→"glas", "tennis"→"tenni", "ties"→"ty", "doggies"/"cookies" unchanged, and a word that is
   the *ending* of one of pattern's uninflected/uncountable words is returned unchanged ("s", "es", "ers");
   nothing beyond those rules ("taxis" → "taxi", a synonym of car, exactly as pattern does);
3. merge two-word objects left to right with the vocabulary's ``double_words`` table (after singularisation, so
   "hot dogs" → "hot dog"; "wine glas" → "wine glass"; "toilet seat" → "toilet"; "baby dog" → "dog");
4. if both "toilet" and "seat" remain, drop every "seat";
5. keep tokens listed in ``mscoco_objects`` and map each to its canonical node word. Every occurrence is kept.

The vocabulary is the reference's: its empty entry ``""`` (the first line of the synonym text is blank) is dropped
at load time, which changes nothing for the reference (pattern never returns an empty word) but guarantees no
object named ``""``; ``" motor bike"`` and ``" cheesecake"`` (leading space) and ``"iPhone"`` (capital) are kept and,
as in the reference, can never match.

Ground truth per image comes from ``coco2014_imid_to_objects.json`` (instances + reference captions). Image ids
are ints; a string id like ``"5001"`` is converted, a non-numeric or unknown id raises instead of silently counting
every mention as hallucinated (the reference's failure mode).

Checked against the reference: the two captions of the reference repository's ``outputs.json`` give the same word
lists, and ``tests/eval/test_chair.py`` compares the tokenizer with ``nltk`` where it is installed.

Example:
    >>> vocab = ChairVocab.load()
    >>> [n for _, n in caption_to_objects("Two men sit on a toilet seat near wine glasses.", vocab)]
    ['person', 'toilet', 'wine glass']
    >>> [n for _, n in caption_to_objects("A “hot dog” sits on a plate while a dog watches.", vocab)]
    ['hot dog', 'dog']
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

# ------------------------------------------------------------------------------------------ tokenizer
# NLTK's improved Treebank word tokenizer (nltk.tokenize.destructive), rule for rule, applied to one sentence.
# Each rule pads what it finds with spaces; the result is split on whitespace.
_OPENING_QUOTES = [
    (re.compile(r"([«“‘„]|`+)"), r" \1 "),                       # typographic / backtick opening quotes
    (re.compile(r'^"'), "``"),                                    # straight quote opening the sentence
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ (\[{<])(\"|'{2})"), r"\1 `` "),              # straight quote after a space or bracket
    (re.compile(r"(?i)(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),  # 'word, but not a clitic ('s)
]
_CLOSERS = "\\])}>\"'»”’"
_PUNCTUATION = [
    (re.compile(rf"([^.])(\.)([{_CLOSERS} ]*)\s*$"), r"\1 \2 \3 "),  # the sentence's final period
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),                    # comma / colon, not inside a number
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),                          # ellipsis
    (re.compile(r"[;@#$%&]"), r" \g<0> "),                        # cats&dogs -> cats & dogs
    (re.compile("[\u2012-\u2015]"), r" \g<0> "),                  # figure / en / em dashes
    (re.compile(r"([^.])(\.)([\])}>\"']*)\s*$"), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),                          # closing single quote
    (re.compile(r"[*]"), r" \g<0> "),
    (re.compile(r"[\][(){}<>]"), r" \g<0> "),                     # brackets
    (re.compile(r"--"), r" -- "),
]
_ENDING_QUOTES = [
    (re.compile("([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),   # clitics: dog's -> dog 's
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
_CONTRACTIONS = [re.compile(p) for p in (
    r"(?i)\b(can)(not)\b", r"(?i)\b(d)('ye)\b", r"(?i)\b(gim)(me)\b", r"(?i)\b(gon)(na)\b", r"(?i)\b(got)(ta)\b",
    r"(?i)\b(lem)(me)\b", r"(?i)\b(more)('n)\b", r"(?i)\b(wan)(na)(?=\s)", r"(?i) ('t)(is)\b", r"(?i) ('t)(was)\b",
)]


def treebank_tokenize(sentence: str) -> list[str]:
    """NLTK's improved Treebank word tokenizer on one sentence (only its final period is split off).

    Example:
        >>> treebank_tokenize("a “hot dog”, cats&dogs and the dog's bowl (mr. smith's).")
        ['a', '“', 'hot', 'dog', '”', ',', 'cats', '&', 'dogs', 'and', 'the', 'dog', "'s", 'bowl', '(', 'mr.', 'smith', "'s", ')', '.']
    """
    text = sentence
    for pattern, repl in _OPENING_QUOTES + _PUNCTUATION:
        text = pattern.sub(repl, text)
    text = f" {text} "
    for pattern, repl in _ENDING_QUOTES:
        text = pattern.sub(repl, text)
    for pattern in _CONTRACTIONS:
        text = pattern.sub(r" \1 \2 ", text)
    return text.split()


# Punkt (nltk.tokenize.punkt with its English model), reduced to what changes Treebank tokens of lowercased text:
# where a period ends a sentence. Only then is the period split off its word ("dog." -> "dog", "."), so an object
# word followed by a period mid-caption is found only through this step.
_ABBREVIATIONS = frozenset((  # the English Punkt model's abbreviation types (a period after them ends no sentence)
    "a.a a.c a.d a.g a.h a.m a.m.e a.s a.t adm ala ariz aug ave b.f b.v bros c c.i.t c.o.m.b c.v calif chg cie co "
    "col colo conn corp cos ct d d.c d.h d.w dec dr e e.f e.h e.l e.m f f.g f.j feb fla fri ft g g.d g.f g.k ga gen "
    "h h.c h.f h.m i.m.s ill inc j.b j.c j.j j.k j.p j.r jan jr k kan ky l l.a l.f l.p lt ltd m m.b.a m.d.c m.j maj "
    "messrs mg mich minn mr mrs ms n n.c n.d n.h n.j n.m n.v n.y nev nov oct ok okla ore p p.a.m p.m pa ph.d prof r "
    "r.a r.h r.i r.j r.k r.t rep reps s s.a s.a.y s.c s.g s.p.a s.s sen sep sept sr st sw t t.j tenn tues u.k u.n "
    "u.s u.s.a u.s.s.r v va vs vt w w.c w.r w.va w.w wash wed wis yr").split())
_NON_WORD = re.escape(")\";}]*:@'({[\u2018\u2019\u201c\u201d\xab\xbb?!")  # characters that end a Punkt word
_MULTI = r"(?:-{2,}|\.{2,}|(?:\.\s){2,}\.)"
_PUNKT_WORD = re.compile(  # Punkt's word tokens: periods stay attached, other punctuation is split off
    rf"{_MULTI}|(?=[^(\"`{{\[:;&#*@)}}\]\-,])\S+?(?=\s|$|[{_NON_WORD}]|{_MULTI}|,(?=$|\s|[{_NON_WORD}]|{_MULTI}))|\S")
_CANDIDATE = re.compile(rf"[.?!](?=([{_NON_WORD}])|\s+(\S+))")  # a possible sentence end and what follows it
_NUMBER = re.compile(r"^-?[.,]?\d[\d,.-]*\.?$")
_INITIAL = re.compile(r"[^\W\d]\.$")
_REALIGN = re.compile("[\"')\\]}\u2018\u2019\u201c\u201d\xab\xbb]+?(?:\\s+|(?=--)|$)")


def _ends_sentence(token: str, following: str) -> bool:
    """Punkt's first and second pass for one word token before the next token (lowercased text, so the
    orthographic heuristic reduces to: a lowercase word or ``;:,.!?`` after an initial or a number continues)."""
    if token in (".", "?", "!"):
        return True
    if not token.endswith(".") or token.endswith(".."):
        return False  # no period, or an ellipsis
    word = token[:-1].lower()
    if word in _ABBREVIATIONS or word.split("-")[-1] in _ABBREVIATIONS:
        return False
    if _INITIAL.match(token) or _NUMBER.match(token):
        return not (following[:1].islower() or following in tuple(";:,.!?"))
    return True


def _contains_break(context: str) -> bool:
    """Whether a token of ``context`` other than its last ends a sentence (Punkt's ``text_contains_sentbreak``)."""
    tokens = _PUNKT_WORD.findall(context)
    return any(_ends_sentence(tok, nxt) for tok, nxt in zip(tokens, tokens[1:]))


def _candidates(text: str):
    """``(match, context)`` per possible sentence end; ends with no whitespace between them form one context,
    decided at the last of them (as Punkt does: "room.)1. next" is one candidate, after "1.")."""
    pending, word_start, last_stop = None, 0, 0
    for match in _CANDIDATE.finditer(text):
        space = max(text.rfind(" ", last_stop, match.start()), *(text.rfind(c, last_stop, match.start())
                                                                 for c in "\n\t\r\f\v"))
        start = space + 1 if space >= 0 else word_start
        if pending is not None and last_stop <= start:
            yield pending
        after = match.group(1) or match.group(2)
        pending = (match, text[start:match.end()] + (" " + after if match.group(2) else after))
        word_start, last_stop = start, match.start()
    if pending is not None:
        yield pending


def split_sentences(text: str) -> list[str]:
    """Sentences of lowercased text as Punkt's English model splits them (what ``nltk.sent_tokenize`` does).

    Example:
        >>> split_sentences("a dog. mr. smith has a cat (and a tv.) see fig. 2 on p. 3. it's a cat's.")
        ['a dog.', 'mr. smith has a cat (and a tv.)', 'see fig.', "2 on p. 3. it's a cat's."]
    """
    sentences, start = [], 0
    for match, context in _candidates(text):
        if match.start() < start or not _contains_break(context):
            continue
        stop = match.end()
        rest = match.start(2) if match.group(2) else stop
        closers = _REALIGN.match(text, rest)
        if closers:  # a closing quote or bracket after the period belongs to the sentence it closes
            stop, rest = rest + len(closers.group().rstrip()), closers.end()
        sentences.append(text[start:stop])
        start = rest
    sentences.append(text[start:len(text.rstrip())])
    return [s for s in sentences if s]


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize`` as the CHAIR reference calls it: sentences, then Treebank tokens of each.

    Example:
        >>> word_tokenize("a dog's bowl. two cats&dogs on a “couch”.")
        ['a', 'dog', "'s", 'bowl', '.', 'two', 'cats', '&', 'dogs', 'on', 'a', '“', 'couch', '”', '.']
    """
    return [tok for sentence in split_sentences(text) for tok in treebank_tokenize(sentence)]


def tokenize(text: str) -> list[str]:
    """Alias of :func:`word_tokenize` (the name earlier versions used)."""
    return word_tokenize(text)


# ------------------------------------------------------------------------------------------ singularize
# pattern.en (clips/pattern d25511f, pattern/text/en/inflect.py): tables and rules, in pattern's order.
_PLURAL_PREPOSITIONS = frozenset(
    "about above across after among around at athwart before behind below beneath beside besides between betwixt "
    "beyond but by during except for from in into near of off on onto out over since till to under until unto upon "
    "with".split())
_UNINFLECTED = frozenset((  # pattern: a word that is the ENDING of one of these is returned unchanged
    "bison", "debris", "headquarters", "pincers", "trout", "bream", "diabetes", "herpes", "pliers", "tuna",
    "breeches", "djinn", "high-jinks", "proceedings", "whiting", "britches", "eland", "homework", "rabies",
    "wildebeest", "carp", "elk", "innings", "salmon", "chassis", "flounder", "jackanapes", "scissors", "christmas",
    "gallows", "mackerel", "series", "clippers", "georgia", "measles", "shears", "cod", "graffiti", "mews",
    "species", "contretemps", "mumps", "swine", "corps", "news", "swiss",
    # singular_uncountable (same test)
    "advice", "equipment", "happiness", "luggage", "software", "bread", "fruit", "information", "mathematics",
    "progress", "understanding", "butter", "furniture", "ketchup", "mayonnaise", "research", "water", "cheese",
    "garbage", "knowledge", "meat", "rice", "electricity", "gravel", "love", "mustard", "sand",
))
_IE = (  # "<x>s" -> returned unchanged (pattern returns the lowercased plural itself, not "<x>")
    "alergie", "cutie", "hoagie", "newbie", "softie", "veggie", "auntie", "doggie", "hottie", "nightie", "sortie",
    "weenie", "beanie", "eyrie", "indie", "oldie", "stoolie", "yuppie", "birdie", "freebie", "junkie", "^pie",
    "sweetie", "zombie", "bogie", "goonie", "laddie", "pixie", "techie", "bombie", "groupie", "laramie", "quickie",
    "^tie", "collie", "hankie", "lingerie", "reverie", "toughie", "cookie", "hippie", "meanie", "rookie", "valkyrie",
)  # "^pie" and "^tie" are literal in pattern, so "pies"/"ties" fall through to the rules ("py", "ty")
_IRREGULAR = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef", "brethren": "brother",
    "children": "child", "corpora": "corpus", "corpuses": "corpus", "ephemerides": "ephemeris", "feet": "foot",
    "ganglia": "ganglion", "geese": "goose", "genera": "genus", "genii": "genie", "graffiti": "graffito",
    "helves": "helve", "kine": "cow", "leaves": "leaf", "loaves": "loaf", "men": "man", "mongooses": "mongoose",
    "monies": "money", "moves": "move", "mythoi": "mythos", "numena": "numen", "occipita": "occiput",
    "octopodes": "octopus", "opera": "opus", "opuses": "opus", "our": "my", "oxen": "ox", "penes": "penis",
    "penises": "penis", "people": "person", "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth",
    "testes": "testis", "trilbys": "trilby", "turves": "turf", "zoa": "zoon",
}
_RULES = [(re.compile(p), r) for p, r in (  # first match wins; character classes such as [m|l] are pattern's
    (r"(?i)(.)ae$", r"\1a"), (r"(?i)(.)itis$", r"\1itis"), (r"(?i)(.)eaux$", r"\1eau"),
    (r"(?i)(quiz)zes$", r"\1"), (r"(?i)(matr)ices$", r"\1ix"), (r"(?i)(ap|vert|ind)ices$", r"\1ex"),
    (r"(?i)^(ox)en", r"\1"), (r"(?i)(alias|status)es$", r"\1"), (r"(?i)([octop|vir])i$", r"\1us"),
    (r"(?i)(cris|ax|test)es$", r"\1is"), (r"(?i)(shoe)s$", r"\1"), (r"(?i)(o)es$", r"\1"), (r"(?i)(bus)es$", r"\1"),
    (r"(?i)([m|l])ice$", r"\1ouse"), (r"(?i)(x|ch|ss|sh)es$", r"\1"), (r"(?i)(m)ovies$", r"\1ovie"),
    (r"(?i)(.)ombies$", r"\1ombie"), (r"(?i)(s)eries$", r"\1eries"), (r"(?i)([^aeiouy]|qu)ies$", r"\1y"),
    (r"([aeo]l)ves$", r"\1f"), (r"([^d]ea)ves$", r"\1f"), (r"arves$", "arf"), (r"erves$", "erve"),
    (r"([nlw]i)ves$", r"\1fe"), (r"(?i)([lr])ves$", r"\1f"), (r"([aeo])ves$", r"\1ve"), (r"(?i)(sive)s$", r"\1"),
    (r"(?i)(tive)s$", r"\1"), (r"(?i)(hive)s$", r"\1"), (r"(?i)([^f])ves$", r"\1fe"),
    (r"(?i)(^analy)ses$", r"\1sis"),
    (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
    (r"(?i)(.)opses$", r"\1opsis"), (r"(?i)(.)yses$", r"\1ysis"), (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"), (r"(?i)(.)oses$", r"\1osis"),
    (r"(?i)([ti])a$", r"\1um"), (r"(?i)(n)ews$", r"\1ews"), (r"(?i)s$", ""),
)]


def _apply_rule(pattern: re.Pattern, repl: str, word: str) -> str:
    """pattern's substitution: a backreference to a group that did not take part becomes empty."""
    match = pattern.search(word)
    for k, group in enumerate(match.groups(), 1):
        if group is None:
            repl = repl.replace(f"\\{k}", "")
    return pattern.sub(repl, word)


def singularize(word: str) -> str:
    """pattern.en's ``singularize`` (clips/pattern d25511f), quirks included.

    Example:
        >>> [singularize(w) for w in ["buses", "bus", "glass", "knives", "people", "women", "skis", "taxis", "s"]]
        ['bus', 'bu', 'glas', 'knife', 'person', 'woman', 'ski', 'taxi', 's']
    """
    if "-" in word:
        head, *rest = word.split("-")
        if rest and rest[0] in _PLURAL_PREPOSITIONS:  # mothers-in-law -> mother-in-law
            return singularize(head) + "-" + "-".join(rest)
    if word.endswith("'"):  # dogs' -> dog's
        return singularize(word[:-1]) + "'s"
    w = word.lower()
    if any(x.endswith(w) for x in _UNINFLECTED):
        return word
    if any(w.endswith(x + "s") for x in _IE):
        return w
    for plural, singular in _IRREGULAR.items():
        if w.endswith(plural):
            return re.sub(f"(?i){plural}$", singular, word)
    for pattern, repl in _RULES:
        if pattern.search(word):
            return _apply_rule(pattern, repl, word)
    return word


# ------------------------------------------------------------------------------------------ vocabulary
@dataclass
class ChairVocab:
    """The CHAIR vocabulary: surface forms, synonym → node map and the two-word table."""

    mscoco_objects: set
    inverse_synonym: dict
    double_words: dict

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ChairVocab":
        """Load ``chair_vocab.json`` (default: ``data_path("chair", "chair_vocab.json")``), without its empty entry.

        Example:
            >>> v = ChairVocab.load()
            >>> "" in v.mscoco_objects, v.inverse_synonym["taxi"], v.double_words["hot dog"]
            (False, 'car', 'hot dog')
        """
        from attnkit.data import data_path

        path = Path(path) if path else data_path("chair", "chair_vocab.json", must_exist=True)
        with open(path) as fh:
            raw = json.load(fh)
        missing = {"mscoco_objects", "inverse_synonym_dict", "double_words"} - raw.keys()
        if missing:
            raise ValueError(f"CHAIR vocabulary {path} lacks fields {sorted(missing)}.")
        objects = set(raw["mscoco_objects"]) - {""}  # the reference's blank first line: never an object
        synonyms = {k: v for k, v in raw["inverse_synonym_dict"].items() if k}
        return cls(objects, synonyms, {a: b for a, b in raw["double_words"]})


def caption_to_objects(caption: str, vocab: ChairVocab) -> list[tuple[str, str]]:
    """Object mentions of one caption as ``(surface word, node word)`` in order, repeats kept."""
    words = [singularize(w) for w in word_tokenize(caption.lower())]
    merged: list[str] = []
    i = 0
    while i < len(words):
        pair = " ".join(words[i:i + 2])
        if pair in vocab.double_words:
            merged.append(vocab.double_words[pair])
            i += 2
        else:
            merged.append(words[i])
            i += 1
    if "toilet" in merged and "seat" in merged:
        merged = [w for w in merged if w != "seat"]
    return [(w, vocab.inverse_synonym[w]) for w in merged if w in vocab.mscoco_objects]


def load_ground_truth(path: str | Path | None = None) -> dict[int, set]:
    """``coco2014_imid_to_objects.json`` as ``{int image id: set of node words}``."""
    from attnkit.data import data_path

    path = Path(path) if path else data_path("chair", "coco2014_imid_to_objects.json", must_exist=True)
    with open(path) as fh:
        raw = json.load(fh)
    return {int(k): set(v) for k, v in raw.items()}


def _int_id(image_id, gt: Mapping) -> int:
    try:
        key = int(image_id)
    except (TypeError, ValueError):
        raise TypeError(f"CHAIR image id {image_id!r} is not an integer COCO id.") from None
    if key not in gt:
        raise KeyError(f"CHAIR: image id {key} has no ground truth in the CHAIR file; check the id "
                       f"(COCO-2014/val2017 ids are valid) or pass ground truth for it.")
    return key


def score_caption(caption: str, image_id, gt: Mapping, vocab: ChairVocab) -> dict:
    """Per-caption record: mentions, hallucinated mentions, GT objects recalled, caption length.

    Example:
        >>> v = ChairVocab.load()
        >>> r = score_caption("A dog and a cat.", 1, {1: {"dog"}}, v)
        >>> r["mentions"], r["hallucinated"], r["recalled"], r["n_gt"]
        (['dog', 'cat'], ['cat'], ['dog'], 1)
    """
    truth = gt[_int_id(image_id, gt)]
    nodes = [n for _, n in caption_to_objects(caption, vocab)]
    return {
        "mentions": nodes,
        "hallucinated": [n for n in nodes if n not in truth],
        "recalled": sorted(set(nodes) & truth),
        "n_gt": len(truth),
        "length": len(caption.split()),
    }


def chair_metrics(records: Iterable[dict]) -> dict:
    """CHAIR_s, CHAIR_i (repeats counted), micro recall and mean caption length (words) from ``score_caption``.

    Zero denominators give 0.0.
    """
    records = list(records)
    n = len(records)
    mentions = sum(len(r["mentions"]) for r in records)
    hall = sum(len(r["hallucinated"]) for r in records)
    n_gt = sum(r["n_gt"] for r in records)
    return {
        "chair_s": sum(bool(r["hallucinated"]) for r in records) / n if n else 0.0,
        "chair_i": hall / mentions if mentions else 0.0,
        "recall": sum(len(r["recalled"]) for r in records) / n_gt if n_gt else 0.0,
        "mean_length": sum(r["length"] for r in records) / n if n else 0.0,
        "n": n,
        "mentions": mentions,
    }


def evaluate_captions(captions: Sequence[tuple], gt: Mapping | None = None,
                      vocab: ChairVocab | None = None) -> dict:
    """CHAIR over ``[(image_id, caption), ...]`` with the shipped vocabulary and ground truth by default."""
    vocab = vocab or ChairVocab.load()
    gt = gt if gt is not None else load_ground_truth()
    return chair_metrics(score_caption(c, i, gt, vocab) for i, c in captions)


# ------------------------------------------------------------------------------------------ task
from attnkit.eval.params import Param  # noqa: E402
from attnkit.eval.task import Task  # noqa: E402


class ChairTask(Task):
    """Caption the coco_tiny images and score CHAIR (parameters: ``params_spec``)."""

    metrics = ("chair_s", "chair_i", "recall", "mean_length")
    higher_is_better = {"chair_s": False, "chair_i": False, "recall": True, "mean_length": True}
    params_spec = {
        "prompt": Param(str, "Please describe this image in detail.", "the captioning instruction"),
        "max_new_tokens": Param(int, 64, "caption length limit (tokens)"),
        "batch_size": Param(int, 8, "captions per generate() call (left padded)"),
        "instances": Param(str | None, None, "COCO instances JSON (default: coco_tiny val2017)"),
        "image_dir": Param(str | None, None, "folder of the images (default: coco_tiny/val2017)"),
    }

    def _instances(self) -> Path:
        from attnkit.data import data_path

        return Path(self.params.get("instances") or data_path("coco_tiny", "annotations", "instances_val2017.json"))

    def _image_dir(self) -> Path:
        from attnkit.data import data_path

        return Path(self.params.get("image_dir") or data_path("coco_tiny", "val2017"))

    def required_files(self) -> list[Path]:
        from attnkit.data import data_path

        return [data_path("chair", "chair_vocab.json"), data_path("chair", "coco2014_imid_to_objects.json"),
                self._instances(), self._image_dir()]

    def __init__(self, name, **params):
        super().__init__(name, **params)
        self._gt = self._vocab = None

    def examples(self, tokenizer=None) -> list[dict]:
        self.check_data()
        with open(self._instances()) as fh:
            images = json.load(fh)["images"]
        image_dir = self._image_dir()
        return [{"id": str(im["id"]), "image_id": int(im["id"]), "image": str(image_dir / im["file_name"])}
                for im in sorted(images, key=lambda im: im["id"])]

    @property
    def example_batch_size(self) -> int:
        return int(self.params.get("batch_size", 1))

    def run_batch(self, model, tokenizer, examples) -> list[dict]:
        from attnkit.eval.generation import generate_answers, is_multimodal, load_image

        if self._gt is None:
            self._gt, self._vocab = load_ground_truth(), ChairVocab.load()
        images = [load_image(ex["image"]) for ex in examples] if is_multimodal(tokenizer) else None
        prompt = self.params.get("prompt", "Please describe this image in detail.")
        captions = generate_answers(model, tokenizer, [prompt] * len(examples), images,
                                    self.params.get("max_new_tokens", 64))
        out = []
        for ex, caption in zip(examples, captions):
            rec = score_caption(caption, ex["image_id"], self._gt, self._vocab)
            rec.update(caption=caption, image_used=images is not None)
            out.append(rec)
        return out

    def run_example(self, model, tokenizer, example: dict) -> dict:
        return self.run_batch(model, tokenizer, [example])[0]

    def aggregate(self, records) -> dict:
        m = chair_metrics(records)
        return {k: float(m[k]) for k in self.metrics}
