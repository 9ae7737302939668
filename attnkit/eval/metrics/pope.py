"""POPE: yes/no answer parsing, metrics, question files (JSON lines or ``datasets``) and POPE-style question
generation (METHODS.md section 4).

Two parsers are offered and every report names the one used:

* ``"official"`` — the POPE ``evaluate.py`` rule: keep the text before the first ".", delete commas, split on
  single spaces; a token equal to ``"No"``, ``"not"`` or ``"no"`` means *no*, anything else (even "" or "NO!")
  means *yes*.
* ``"robust"`` (default) — VLMEvalKit's rule: lowercase, replace punctuation by spaces, split on whitespace;
  "yes" present and "no" absent → yes, the reverse → no, otherwise ``"unknown"``. "not" is not a cue.
  Unknown answers count as wrong for accuracy and as not-yes for precision/recall/yes-ratio.

Example:
    >>> parse_answer("No, there is no dog.", "official"), parse_answer("NO!", "official")
    ('no', 'yes')
    >>> parse_answer("NO!", "robust"), parse_answer("Yes and no", "robust")
    ('no', 'unknown')
    >>> m = pope_metrics(["yes", "no", "yes"], ["yes", "no", "no"])
    >>> round(m["accuracy"], 4), m["precision"], m["recall"]
    (0.6667, 0.5, 1.0)
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Literal, Sequence

PARSERS = ("official", "robust")
SPLITS = ("random", "popular", "adversarial")
TEMPLATE = "Is there {article} {obj} in the image?"


# ----------------------------------------------------------------------------------------------- parsing
def parse_official(text: str) -> str:
    """POPE ``evaluate.py`` parser: ``'no'`` iff a space-separated token of the first sentence is No/not/no."""
    first = text.split(".")[0].replace(",", "")
    return "no" if any(tok in ("No", "not", "no") for tok in first.split(" ")) else "yes"


def parse_robust(text: str) -> str:
    """VLMEvalKit-style parser: ``'yes'``, ``'no'`` or ``'unknown'`` (both or neither word present)."""
    words = set(re.sub(r"[^\w\s]", " ", text.lower()).split())
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes and not has_no:
        return "yes"
    if has_no and not has_yes:
        return "no"
    return "unknown"


def parse_answer(text: str, parser: str = "robust") -> str:
    """Parse a free-form answer with the named parser (``"official"`` or ``"robust"``)."""
    if parser == "official":
        return parse_official(text)
    if parser == "robust":
        return parse_robust(text)
    raise ValueError(f"POPE parser {parser!r} is unknown; choose one of {PARSERS}.")


# ----------------------------------------------------------------------------------------------- metrics
def _ratio(num: float, den: float, zero_division: float) -> float:
    return num / den if den else zero_division


def pope_metrics(preds: Sequence[str], labels: Sequence[str], zero_division: float = 0.0) -> dict:
    """Accuracy, precision, recall, F1, yes-ratio (positive class = "yes"), plus counts.

    ``preds`` items are ``"yes"``, ``"no"`` or ``"unknown"``; ``labels`` are ``"yes"``/``"no"``. Ratios with a
    zero denominator return ``zero_division`` (0.0 like VLMEvalKit; the official script would divide by zero).

    Example:
        >>> pope_metrics(["no", "no"], ["yes", "no"])["precision"]  # no predicted yes: guarded
        0.0
    """
    if len(preds) != len(labels):
        raise ValueError(f"POPE: {len(preds)} predictions but {len(labels)} labels; they must align one to one.")
    bad = {lab for lab in labels if lab not in ("yes", "no")}
    if bad:
        raise ValueError(f"POPE labels must be 'yes' or 'no'; found {sorted(bad)}.")
    tp = sum(p == "yes" and y == "yes" for p, y in zip(preds, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(preds, labels))
    tn = sum(p == "no" and y == "no" for p, y in zip(preds, labels))
    fn = sum(p != "yes" and y == "yes" for p, y in zip(preds, labels))
    n = len(labels)
    precision = _ratio(tp, tp + fp, zero_division)
    recall = _ratio(tp, tp + fn, zero_division)
    return {
        "accuracy": _ratio(tp + tn, n, zero_division),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall, zero_division),
        "yes_ratio": _ratio(sum(p == "yes" for p in preds), n, zero_division),
        "unknown_ratio": _ratio(sum(p == "unknown" for p in preds), n, zero_division),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n,
    }


# ----------------------------------------------------------------------------------------------- files
def load_questions(path: str | Path) -> list[dict]:
    """Read a POPE JSON-lines question file (``{question_id, image, text, label}`` per line).

    Example:
        >>> from attnkit.data import data_path
        >>> qs = load_questions(data_path("pope", "coco_pope_random.json"))
        >>> len(qs), qs[0]["label"]
        (3000, 'yes')
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"POPE question file {path} not found (set ATTNKIT_DATA or pass a valid path).")
    out = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = {"question_id", "image", "text", "label"} - row.keys()
            if missing:
                raise ValueError(f"{path}:{lineno}: POPE row lacks fields {sorted(missing)}.")
            out.append(row)
    return out


def _first(row: dict, keys, what: str, where: str):
    for k in keys:
        if k in row and row[k] is not None:
            return row[k]
    raise ValueError(f"{where}: POPE row lacks a {what} column (one of {list(keys)}); columns: {sorted(row)}.")


def _is_saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` was written by ``Dataset(Dict).save_to_disk`` (else: plain data files / hub snapshot)."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def open_dataset(name: str | Path, split: str | None = None, config: str | None = None, data_files=None):
    """One split of a ``datasets`` dataset from what users have on disk or on the hub, without network for
    local paths: a ``save_to_disk`` folder, a folder of data files (a hub snapshot such as ``lmms-lab/POPE``'s
    ``data/test-*.parquet``), a single ``.parquet``/``.json(l)``/``.csv`` file, or a hub name / builder name
    (``parquet``, ``json``) with ``data_files`` passed through to ``datasets.load_dataset``. Without ``split``,
    ``test`` is taken, or the only split there is.

    Example:
        >>> import datasets, tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> _ = datasets.Dataset.from_list([{"question": "Is there a cat?", "answer": "yes"}]).to_parquet(
        ...     os.path.join(folder, "test.parquet"))
        >>> open_dataset(os.path.join(folder, "test.parquet"))[0]["answer"]
        'yes'
    """
    import datasets

    path = Path(str(name)).expanduser()
    if path.is_dir() and _is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
    elif path.is_file():
        builder = _BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"POPE dataset {path}: cannot read {path.suffix!r} files; give a .parquet, .json(l) "
                             f"or .csv file, a folder, or a dataset name.")
        ds = datasets.load_dataset(builder, data_files=data_files or str(path))
    elif path.is_dir():  # plain data files, e.g. a hub snapshot folder: every split, then pick one
        ds = datasets.load_dataset(str(path), config, data_files=data_files)
    else:  # a hub name (or a builder name such as "parquet" with data_files): only the split asked for
        ds = datasets.load_dataset(str(name), config, split=split or "test",
                                   **({"data_files": data_files} if data_files else {}))
    if isinstance(ds, datasets.DatasetDict):
        want = split or ("test" if "test" in ds or len(ds) != 1 else next(iter(ds)))
        if want not in ds:
            raise KeyError(f"POPE dataset {name}: no split {want!r}; splits: {list(ds)} (set dataset_split).")
        ds = ds[want]
    return ds


def load_questions_dataset(name: str | Path, split: str | None = None, category: str | None = None,
                           config: str | None = None, data_files=None):
    """POPE questions from a Hugging Face ``datasets`` dataset (see ``open_dataset``: a ``save_to_disk`` folder,
    a folder of parquet files such as a hub snapshot, a single data file, or a hub name with ``data_files``).

    Columns: ``question``/``text``, ``answer``/``label`` (yes/no, any case), ``question_id``/``id`` (else the row
    index), and ``image`` (a file name, or an embedded image as in ``lmms-lab/POPE``) or ``image_source``.
    When the dataset has a ``category`` column and ``category`` is given (POPE's random/popular/adversarial),
    only those rows are kept. Returns ``(rows, dataset)``: rows are ``{question_id, text, label, image, index}``
    with ``image`` a file name or ``None`` when the image is embedded (fetch it with ``dataset[index]["image"]``).

    Example:
        >>> import datasets, tempfile
        >>> ds = datasets.Dataset.from_list([{"question": "Is there a cat in the image?", "answer": "Yes",
        ...                                   "image": "a.jpg", "category": "random"},
        ...                                  {"question": "Is there a dog in the image?", "answer": "no",
        ...                                   "image": "a.jpg", "category": "popular"}])
        >>> folder = tempfile.mkdtemp()
        >>> ds.save_to_disk(folder)
        >>> rows, _ = load_questions_dataset(folder, category="popular")
        >>> rows
        [{'question_id': '1', 'text': 'Is there a dog in the image?', 'label': 'no', 'image': 'a.jpg', 'index': 1}]
    """
    import datasets

    where = f"POPE dataset {name}"
    ds = open_dataset(name, split, config, data_files)
    meta = ds.remove_columns([c for c in ("image",) if c in ds.column_names
                              and not isinstance(ds.features[c], datasets.Value)])
    rows = []
    for i, row in enumerate(meta):
        if category is not None and row.get("category") not in (None, category):
            continue
        label = str(_first(row, ("answer", "label"), "answer", where)).strip().lower()
        image = row.get("image") if "image" in meta.column_names else None
        if image is None and row.get("image_source") and "image" not in ds.column_names:
            image = f"{row['image_source']}.jpg"
        qid = next((row[k] for k in ("question_id", "id") if row.get(k) is not None), i)
        rows.append({"question_id": str(qid),
                     "text": _first(row, ("question", "text"), "question", where), "label": label,
                     "image": image, "index": i})
    return rows, ds


# ----------------------------------------------------------------------------------------------- generation
def article(word: str) -> str:
    """``'an'`` before a vowel letter (a, e, i, o, u), else ``'a'`` — the article rule POPE's files use."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def question_text(obj: str) -> str:
    """``'Is there a dog in the image?'`` / ``'Is there an apple in the image?'``."""
    return TEMPLATE.format(article=article(obj), obj=obj)


def objects_from_coco(instances: dict) -> dict[int, list[str]]:
    """Per image id, its category names deduplicated in annotation-id order (images without objects omitted)."""
    names = {c["id"]: c["name"] for c in instances["categories"]}
    out: dict[int, list[str]] = {}
    for ann in sorted(instances["annotations"], key=lambda a: a["id"]):
        objs = out.setdefault(int(ann["image_id"]), [])
        name = names[ann["category_id"]]
        if name not in objs:
            objs.append(name)
    return out


def _stable_desc(counts: Counter) -> list[str]:
    # Counter preserves first-insertion order; sorted() is stable, so ties keep first-seen order.
    return [k for k, _ in sorted(counts.items(), key=lambda kv: -kv[1])]


def object_statistics(image_objects: dict) -> tuple[Counter, dict[str, Counter]]:
    """Frequency (images containing each object) and co-occurrence counts, in first-seen order."""
    freq: Counter = Counter()
    co: dict[str, Counter] = {}
    for objs in image_objects.values():
        for o in objs:
            freq[o] += 1
            row = co.setdefault(o, Counter())
            for other in objs:
                if other != o:
                    row[other] += 1
    return freq, co


def generate_questions(image_objects: dict, split: str, seed: int = 0, num_pos: int = 3,
                       min_objects: int = 3, img_num: int | None = None,
                       exclude: dict | None = None, file_name=None) -> list[dict]:
    """POPE-style questions: per image, ``num_pos`` × (yes on ``objects[i]``, one negative by ``split``).

    ``image_objects`` maps image id → object names in order. Images with fewer than ``min_objects`` objects are
    dropped; if ``img_num`` is set, that many are drawn with ``random.Random(seed)`` (the official code draws 500
    unseeded). Negatives never lie in the image's objects, in ``exclude[image_id]`` (e.g. the CHAIR set, to mirror
    the shipped files), nor among this image's earlier negatives. Every row records how its object was chosen.

    Example:
        >>> objs = {1: ["cat", "dog", "bed"], 2: ["cat", "sofa", "tv", "bed"], 3: ["car", "bus", "cat"]}
        >>> [q["text"] for q in generate_questions(objs, "popular")][:2]
        ['Is there a cat in the image?', 'Is there a sofa in the image?']
    """
    if split not in SPLITS:
        raise ValueError(f"POPE split {split!r} is unknown; choose one of {SPLITS}.")
    rng = random.Random(seed)
    ids = [i for i in image_objects if len(image_objects[i]) >= min_objects]
    if img_num is not None and img_num < len(ids):
        ids = rng.sample(ids, img_num)
    selected = {i: image_objects[i] for i in ids}
    freq, co = object_statistics(selected)
    universe = list(freq)  # first-seen order
    by_freq = _stable_desc(freq)
    file_name = file_name or (lambda i: f"{int(i):012d}.jpg")
    rows: list[dict] = []
    for image_id in ids:
        objs = selected[image_id]
        banned = set(objs) | set((exclude or {}).get(image_id, ()))
        for pos in objs[:num_pos]:
            neg, how = _pick_negative(split, pos, banned, universe, by_freq, co, rng)
            banned.add(neg)
            for obj, label, source in ((pos, "yes", "positive"), (neg, "no", how)):
                rows.append({"question_id": len(rows) + 1, "image": file_name(image_id), "image_id": image_id,
                             "text": question_text(obj), "label": label, "object": obj, "source": source})
    return rows


def _pick_negative(split, pos, banned, universe, by_freq, co, rng) -> tuple[str, str]:
    eligible = [o for o in universe if o not in banned]
    if not eligible:
        raise ValueError(f"POPE generation: no negative object left for positive {pos!r}; use fewer positives.")
    if split == "popular":
        return next(o for o in by_freq if o not in banned), "popular"
    if split == "adversarial":
        for o in _stable_desc(co.get(pos, Counter())):
            if o not in banned and co[pos][o] > 0:
                return o, "adversarial"
    while True:  # rejection sampling, as the official code does
        o = rng.choice(universe)
        if o not in banned:
            return o, "random" if split == "random" else "adversarial_fallback_random"


def coco_questions(split: str, instances_path: str | Path | None = None, seed: int = 0, **kw) -> list[dict]:
    """POPE-style questions for a local COCO image set from its instance annotations (default: coco_tiny val2017).

    Example:
        >>> len(coco_questions("random"))  # 51 images with >= 3 categories, 6 questions each
        306
    """
    from attnkit.data import data_path

    path = Path(instances_path) if instances_path else data_path("coco_tiny", "annotations",
                                                                  "instances_val2017.json", must_exist=True)
    with open(path) as fh:
        instances = json.load(fh)
    files = {int(im["id"]): im["file_name"] for im in instances["images"]}
    objs = objects_from_coco(instances)
    ordered = {i: objs[i] for i in sorted(objs)}
    return generate_questions(ordered, split, seed=seed, file_name=lambda i: files[i], **kw)


def metrics_from_records(records: Iterable[dict], zero_division: float = 0.0) -> dict:
    """Aggregate per-example runner records (fields ``pred``, ``label``) into POPE metrics."""
    records = list(records)
    return pope_metrics([r["pred"] for r in records], [r["label"] for r in records], zero_division)


# ----------------------------------------------------------------------------------------------- task
from attnkit.eval.errors import EvalError  # noqa: E402
from attnkit.eval.params import Param  # noqa: E402
from attnkit.eval.task import Task  # noqa: E402  (tasks sit below the model-free metric code)


class PopeTask(Task):
    """POPE on generated coco_tiny questions (``source: coco_tiny``), a shipped/own question file
    (``source: pope_file`` → ``pope/coco_pope_<split>.json``, or ``question_file: path``) or a ``datasets``
    dataset (``source: datasets``, ``dataset``: a ``save_to_disk`` folder, a folder of parquet files such as a hub
    snapshot, a data file, or a hub name; ``data_files`` and ``dataset_split`` are passed through; rows are
    filtered on ``category == split`` when that column exists; see ``load_questions_dataset``).
    Parameters: ``params_spec``. The yes-ratio is best at 0.5 (a model that answers yes half the time on a
    balanced split); ``describe()`` names the actual question source.
    """

    metrics = ("f1", "accuracy", "precision", "recall", "yes_ratio", "unknown_ratio")
    higher_is_better = {"unknown_ratio": False}
    metric_targets = {"yes_ratio": 0.5}
    params_spec = {
        "split": Param(Literal["random", "popular", "adversarial"], "random", "how negatives are chosen"),
        "source": Param(Literal["coco_tiny", "pope_file", "datasets"], "coco_tiny", "where the questions come from"),
        "question_file": Param(str | None, None, "a POPE JSON-lines question file (overrides source)"),
        "dataset": Param(str | None, None, "source=datasets: folder, data file, hub name or builder name"),
        "dataset_split": Param(str | None, None, "source=datasets: split (default test, or the only one)"),
        "dataset_config": Param(str | None, None, "source=datasets: configuration name"),
        "data_files": Param(str | list[str] | dict | None, None, "source=datasets: passed to load_dataset"),
        "image_dir": Param(str | None, None, "folder the image file names are relative to"),
        "parser": Param(Literal["robust", "official"], "robust", "answer parser (reported in report.json)"),
        "seed": Param(int, 0, "source=coco_tiny: seed of the negative sampling"),
        "max_new_tokens": Param(int, 8, "answer length limit (tokens)"),
        "batch_size": Param(int, 8, "questions per generate() call (left padded)"),
        "prompt_suffix": Param(str, " Answer yes or no.", "appended to every question"),
        "zero_division": Param(float, 0.0, "value of a ratio with a zero denominator"),
    }

    def _question_file(self):
        from attnkit.data import data_path

        p = self.params
        if p.get("question_file") or p.get("source") == "pope_file":
            return Path(p.get("question_file") or data_path("pope", f"coco_pope_{p.get('split', 'random')}.json"))
        return None

    def describe(self) -> str:
        """The question source as configured (overrides included), then the parser."""
        p = self.params
        head = f"POPE ({p['split']} negatives)"
        if self._question_file() is not None:
            body = f"questions from the file {self._question_file()}"
        elif p["source"] == "datasets":
            extra = "".join(f", {k} {p[k]}" for k in ("dataset_split", "dataset_config", "data_files") if p.get(k))
            body = f"questions from the dataset {p['dataset']}{extra}"
        else:
            body = (f"POPE-style questions generated (seed {p['seed']}) from the coco_tiny val2017 instance "
                    f"annotations (51 images, 306 questions)")
        images = f"; images from {p['image_dir']}" if p.get("image_dir") else ""
        return f"{head}: {body}{images}. Answers parsed with the {p['parser']!r} parser; yes_ratio is best at 0.5."

    def required_files(self) -> list[Path]:
        from attnkit.data import data_path

        p = self.params
        if self._question_file() is not None:
            files = [self._question_file()]
        elif p.get("source") == "datasets":
            name = str(p["dataset"])
            local = name.startswith(("/", ".", "~")) or Path(name).suffix in _BUILDERS
            files = [Path(name).expanduser()] if local else []  # a hub name cannot be checked offline
        else:
            files = [data_path("coco_tiny", "annotations", "instances_val2017.json")]
            files.append(Path(p.get("image_dir") or data_path("coco_tiny", "val2017")))
        return files + ([Path(p["image_dir"])] if p.get("image_dir") else [])

    def __init__(self, name, **params):
        super().__init__(name, **params)
        self._dataset = None
        if self.params["source"] == "datasets" and not self.params.get("dataset"):
            raise EvalError(f"task {name!r}: source=datasets needs the `dataset` parameter (a folder, a data file or "
                            f"a hub name), e.g. --set dataset=/path/to/POPE.")

    @property
    def example_batch_size(self) -> int:
        return int(self.params.get("batch_size", 1))

    def examples(self, tokenizer=None) -> list[dict]:
        from attnkit.data import data_path

        p = self.params
        split = p.get("split", "random")
        image_dir = p.get("image_dir")
        if self._question_file() is not None:
            rows = load_questions(self._question_file())
        elif p.get("source") == "datasets":
            try:
                rows, self._dataset = load_questions_dataset(p["dataset"], p.get("dataset_split"), split,
                                                             p.get("dataset_config"), p.get("data_files"))
            except (KeyError, ValueError, FileNotFoundError) as err:
                message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
                raise EvalError(f"task {self.name!r}: {message}") from None
        else:
            rows = coco_questions(split, seed=p.get("seed", 0))
            image_dir = image_dir or data_path("coco_tiny", "val2017")
        return [{"id": str(r["question_id"]), "text": r["text"], "label": r["label"],
                 "image": str(Path(image_dir) / r["image"]) if image_dir and r["image"] else r["image"],
                 "index": r.get("index")} for r in rows]

    def _image(self, example: dict):
        from attnkit.eval.generation import load_image

        if example.get("image"):
            return load_image(example["image"])
        if self._dataset is not None and example.get("index") is not None:
            return self._dataset[example["index"]]["image"].convert("RGB")
        return None

    def run_batch(self, model, tokenizer, examples) -> list[dict]:
        from attnkit.eval.generation import generate_answers, is_multimodal

        images = [self._image(ex) for ex in examples] if is_multimodal(tokenizer) else None
        if images is not None and any(im is None for im in images):
            images = None
        suffix = self.params.get("prompt_suffix", " Answer yes or no.")
        answers = generate_answers(model, tokenizer, [ex["text"] + suffix for ex in examples], images,
                                   self.params.get("max_new_tokens", 8))
        parser = self.params.get("parser", "robust")
        return [{"answer": a, "pred": parse_answer(a, parser), "label": ex["label"], "image_used": images is not None}
                for a, ex in zip(answers, examples)]

    def run_example(self, model, tokenizer, example: dict) -> dict:
        return self.run_batch(model, tokenizer, [example])[0]

    def aggregate(self, records) -> dict:
        m = metrics_from_records(records, self.params.get("zero_division", 0.0))
        return {k: float(m[k]) for k in self.metrics}
