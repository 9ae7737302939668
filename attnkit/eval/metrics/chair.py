"""CHAIR object hallucination metric, exact to the LisaAnne/Maxlinn reference rules (METHODS.md section 5).

Pipeline for one caption (``caption_to_objects``):

1. lowercase and tokenize (``tokenize``: our Treebank-like tokenizer, see *Deviation* below);
2. singularize every token with ``singularize`` (pattern.en's rules, including its quirks:
   "bus"→"bu", "glass"→"glas", "tennis"→"tenni", "ties"→"ty");
3. merge two-word objects left to right with the vocabulary's ``double_words`` table (after singularization,
   so "hot dogs" → "hot dog"; "wine glas" → "wine glass"; "toilet seat" → "toilet"; "baby dog" → "dog");
4. if both "toilet" and "seat" remain, drop every "seat";
5. keep tokens listed in ``mscoco_objects`` and map each to its canonical node word. Every occurrence is kept.

The vocabulary's odd entries are kept as they are, as in the reference: ``""``, ``" motor bike"`` and
``" cheesecake"`` (leading space: never matched) and ``"iPhone"`` (capital: never matches lowercased text).

Ground truth per image comes from ``coco2014_imid_to_objects.json`` (instances + reference captions). Image ids
are ints; a string id like ``"5001"`` is converted, a non-numeric or unknown id raises instead of silently counting
every mention as hallucinated (the reference's failure mode).

*Deviation.* nltk and pattern are not dependencies. ``tokenize`` splits on whitespace, peels leading/trailing
punctuation, splits ``, ; : ! ?`` inside words (not between digits) and the clitics ``'s 're 've 'll 'd 'm n't``,
and keeps hyphenated words, slashes and inner periods together, like Treebank; it has no Punkt abbreviation list.
``singularize`` implements pattern's suffix rules, its uninflected list and its irregular plurals; words outside
those rules behave like pattern for every case in the METHODS.md table (tested), but rare irregular nouns may differ.

Example:
    >>> vocab = ChairVocab.load()
    >>> [n for _, n in caption_to_objects("Two men sit on a toilet seat near wine glasses.", vocab)]
    ['person', 'toilet', 'wine glass']
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

# ------------------------------------------------------------------------------------------ tokenizer
_CLITICS = re.compile(r"^(.+?)('s|'re|'ve|'ll|'d|'m|n't)$")
_LEAD = "\"'([{`"
_TRAIL = "\"'.,;:!?)]}`"


def tokenize(text: str) -> list[str]:
    """Treebank-like word tokenizer (lowercases nothing; callers lowercase first).

    Example:
        >>> tokenize("a dog's bowl, (two cats) and hot-dogs.")
        ['a', 'dog', "'s", 'bowl', ',', '(', 'two', 'cats', ')', 'and', 'hot-dogs', '.']
    """
    out: list[str] = []
    for chunk in text.split():
        for piece in re.split(r"(?<!\d)([,;:!?])|([,;:!?])(?!\d)", chunk):
            if piece:
                out.extend(_split_chunk(piece))
    return out


def _split_chunk(chunk: str) -> list[str]:
    lead, trail = [], []
    while chunk and chunk[0] in _LEAD:
        lead.append(chunk[0])
        chunk = chunk[1:]
    while chunk and chunk[-1] in _TRAIL:
        trail.insert(0, chunk[-1])
        chunk = chunk[:-1]
    core: list[str] = []
    if chunk:
        m = _CLITICS.match(chunk)
        core = [m.group(1), m.group(2)] if m else [chunk]
    return lead + core + trail


# ------------------------------------------------------------------------------------------ singularize
_UNINFLECTED = {
    "bison", "bream", "breeches", "britches", "carp", "chassis", "christmas", "clippers", "cod", "contretemps",
    "corps", "debris", "diabetes", "djinn", "eland", "elk", "flounder", "gallows", "graffiti", "headquarters",
    "herpes", "high-jinks", "homework", "innings", "jackanapes", "mackerel", "measles", "mews", "moose", "mumps",
    "news", "offspring", "pincers", "pliers", "proceedings", "rabies", "salmon", "scissors", "series", "shears",
    "species", "swine", "swiss", "trout", "tuna", "whiting", "wildebeest", "sheep", "deer", "cattle", "luggage",
    "advice", "bread", "butter", "cheese", "equipment", "fruit", "furniture", "garbage", "gravel", "information",
    "knowledge", "mathematics", "meat", "rice", "sand", "software", "water",
}
_IRREGULAR_SUFFIX = {  # checked with endswith, as pattern does ("policemen" -> "policeman")
    "men": "man", "people": "person", "children": "child", "geese": "goose", "teeth": "tooth", "feet": "foot",
    "sexes": "sex", "axes": "axe", "moves": "move",
}
_RETURNED_AS_IS = {"doggies", "cookies"}  # pattern returns these plurals unchanged (METHODS.md table)
_RULES = [(re.compile(p), r) for p, r in [
    (r"(quiz)zes$", r"\1"), (r"(matr)ices$", r"\1ix"), (r"(vert|ind)ices$", r"\1ex"), (r"^(ox)en$", r"\1"),
    (r"(alias|status)$", r"\1"), (r"(alias|status)es$", r"\1"), (r"(octop|vir)us$", r"\1us"),
    (r"(octop|vir)i$", r"\1us"), (r"(cris|ax|test)es$", r"\1is"), (r"(cris|ax|test)is$", r"\1is"),
    (r"(shoe)s$", r"\1"), (r"(o)es$", r"\1"), (r"(bus)es$", r"\1"), (r"([ml])ice$", r"\1ouse"),
    (r"(x|ch|ss|sh)es$", r"\1"), (r"(m)ovies$", r"\1ovie"), (r"(.)ombies$", r"\1ombie"),
    (r"(s)eries$", r"\1eries"), (r"([^aeiouy]|qu)ies$", r"\1y"),
    (r"([aeo]l)ves$", r"\1f"), (r"([^d]ea)ves$", r"\1f"), (r"arves$", "arf"), (r"erves$", "erve"),
    (r"([nlw]i)ves$", r"\1fe"), (r"([lr])ves$", r"\1f"), (r"([aeo])ves$", r"\1ve"), (r"(sive)s$", r"\1"),
    (r"(tive)s$", r"\1"), (r"(hive)s$", r"\1"), (r"([^f])ves$", r"\1fe"),
    (r"(^analy)ses$", r"\1sis"), (r"(.)opses$", r"\1opsis"), (r"(.)yses$", r"\1ysis"),
    (r"(h|d|r|o|n|b|cl|p)oses$", r"\1ose"), (r"(.)oses$", r"\1osis"), (r"s$", ""),
]]


def singularize(word: str) -> str:
    """pattern.en-style singularization, quirks included.

    Example:
        >>> [singularize(w) for w in ["buses", "bus", "glass", "knives", "people", "women", "skis", "scissors"]]
        ['bus', 'bu', 'glas', 'knife', 'person', 'woman', 'ski', 'scissors']
    """
    w = word.lower()
    if w in _UNINFLECTED or w in _RETURNED_AS_IS:
        return word
    for suffix, repl in _IRREGULAR_SUFFIX.items():
        if w.endswith(suffix):
            return w[: len(w) - len(suffix)] + repl
    for pattern, repl in _RULES:
        if pattern.search(w):
            return pattern.sub(repl, w, count=1)
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
        """Load ``chair_vocab.json`` (default: ``data_path("chair", "chair_vocab.json")``)."""
        from attnkit.data import data_path

        path = Path(path) if path else data_path("chair", "chair_vocab.json", must_exist=True)
        with open(path) as fh:
            raw = json.load(fh)
        missing = {"mscoco_objects", "inverse_synonym_dict", "double_words"} - raw.keys()
        if missing:
            raise ValueError(f"CHAIR vocabulary {path} lacks fields {sorted(missing)}.")
        return cls(set(raw["mscoco_objects"]), dict(raw["inverse_synonym_dict"]),
                   {a: b for a, b in raw["double_words"]})


def caption_to_objects(caption: str, vocab: ChairVocab) -> list[tuple[str, str]]:
    """Object mentions of one caption as ``(surface word, node word)`` in order, repeats kept."""
    words = [singularize(w) for w in tokenize(caption.lower())]
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
from attnkit.eval.task import Task  # noqa: E402


class ChairTask(Task):
    """Caption the coco_tiny images and score CHAIR. Params: ``prompt``, ``max_new_tokens``, ``instances``,
    ``image_dir``, ``batch_size`` (captions per ``generate`` call)."""

    metrics = ("chair_s", "chair_i", "recall", "mean_length")
    higher_is_better = {"chair_s": False, "chair_i": False, "recall": True, "mean_length": True}

    def __init__(self, name, **params):
        super().__init__(name, **params)
        self._gt = self._vocab = None

    def examples(self, tokenizer=None) -> list[dict]:
        from attnkit.data import data_path

        path = self.params.get("instances") or data_path("coco_tiny", "annotations", "instances_val2017.json",
                                                         must_exist=True)
        with open(path) as fh:
            images = json.load(fh)["images"]
        image_dir = Path(self.params.get("image_dir") or data_path("coco_tiny", "val2017"))
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
