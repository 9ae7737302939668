"""Retrieval-head score (Wu et al., 2024; METHODS.md §7 and NIAH): greedy-decode an answer to a needle-in-a-haystack
prompt; at each step, a head scores ``1/|needle|`` when its most-attended key (last row, top-1) lies inside the
needle span **and** the token there equals the token being generated (copy-paste). Heads above 0.1 are retrieval
heads.

Defaults follow the released ``retrieval_head_detection.py``:

* decoding is greedy, at most 50 tokens, and **stops at a newline** (the step that emits it still counts; EOS
  stops it too, where the released loop would decode past it) — ``stop_ids="newline"`` reads the newline token from
  the tokenizer;
* a trial counts only when the answer's **ROUGE-1 recall exceeds 50** (``rouge_score``, stemmed) against the
  reference answer — the trial's ``"reference"`` or, by default, the decoded needle span; failed trials are left
  out, not counted as 0 (``success_fn="rouge"``; ``None`` counts every trial; or any callable);
* the score of a head is the **mean over the successful trials**.

Counting (``counting=``): ``"positions"`` (default) credits each needle position at most once per head and trial,
the paper's ``|g_h ∩ k| / |k|`` (the share of the needle the head copied), so a score never exceeds 1. The released
code adds ``1/|k|`` at every copying step (``counting="steps"``): identical whenever no needle token is copied twice,
which the newline stop makes the usual case, but a head that copies the same needle position twice (a repeated
answer before the newline) scores above its share and can exceed 1. "positions" is the default because the score
must stay a fraction (the brief of issue 13); "steps" reproduces the released numbers exactly.

Example (METHODS.md worked example: span [10, 14), j* = 11, 12, 20, copies at the first two steps):
    >>> import torch
    >>> prompt = torch.arange(100, 125)
    >>> j = torch.tensor([[[11]], [[12]], [[20]]])         # [steps, L, H]
    >>> copy_paste_score(j, prompt, [111, 112, 999], (10, 14))
    tensor([[0.5000]])
    >>> j = torch.tensor([[[11]], [[11]], [[12]]])          # the answer repeats needle token 11
    >>> copy_paste_score(j, prompt, [111, 111, 112], (10, 14)), copy_paste_score(j, prompt, [111, 111, 112],
    ...                                                                              (10, 14), counting="steps")
    (tensor([[0.5000]]), tensor([[0.7500]]))
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from attnkit.hooks.compat import cache_kwargs, output_cache
from attnkit.interventions.scoring._common import model_name
from attnkit.scores import HeadScores

COUNTINGS = ("positions", "steps")


def copy_paste_hits(argmax_pos: torch.Tensor, prompt_ids: torch.Tensor, token: int, span: tuple[int, int]):
    """argmax_pos long [L, H] (key index of each head's top-1 attention); prompt_ids [N] → bool [L, H]."""
    start, end = span
    inside = (argmax_pos >= start) & (argmax_pos < end)
    safe = argmax_pos.clamp(0, prompt_ids.numel() - 1)
    return inside & (prompt_ids[safe] == token)


def copy_paste_score(argmax_steps: torch.Tensor, prompt_ids: torch.Tensor, tokens: Sequence[int],
                     span: tuple[int, int], counting: str = "positions") -> torch.Tensor:
    """One trial's score per head ``[L, H]`` from each step's top-1 key ``argmax_steps`` long ``[T, L, H]`` and the
    ``T`` emitted tokens: ``"positions"`` = distinct needle positions copied / ``|span|`` (≤ 1), ``"steps"`` = copying
    steps / ``|span|`` (the released code).

    Example (a two-token needle at [0, 2) copied twice by one head):
        >>> j, prompt, tokens = torch.tensor([0, 1, 0, 1]).view(4, 1, 1), torch.tensor([7, 8, 9]), [7, 8, 7, 8]
        >>> [copy_paste_score(j, prompt, tokens, (0, 2), c).item() for c in ("positions", "steps")]
        [1.0, 2.0]
    """
    if counting not in COUNTINGS:
        raise ValueError(f"retrieval: counting must be one of {COUNTINGS}, got {counting!r}")
    start, end = span
    steps, layers, heads = argmax_steps.shape
    credited = torch.zeros(layers, heads, end - start, dtype=torch.bool)  # [L, H, |span|]
    total = torch.zeros(layers, heads)  # [L, H]
    for t in range(steps):
        hits = copy_paste_hits(argmax_steps[t], prompt_ids, int(tokens[t]), span)  # [L, H]
        total += hits.float()
        where = (argmax_steps[t] - start).clamp(0, end - start - 1)  # [L, H]
        credited.scatter_(2, where[..., None], credited.gather(2, where[..., None]) | hits[..., None])
    copied = credited.sum(-1).float() if counting == "positions" else total  # [L, H]
    return copied / (end - start)


def newline_stop_ids(tokenizer) -> list[int]:
    """The ids that end a NIAH answer: the newline token (``tokenizer("\\n")``'s last id) and EOS."""
    ids = list(tokenizer("\n", add_special_tokens=False)["input_ids"][-1:])
    eos = getattr(tokenizer, "eos_token_id", None)
    return ids + ([eos] if eos is not None and eos not in ids else [])


def retrieval_trial(model, input_ids: torch.Tensor, needle_span: tuple[int, int], max_new_tokens: int = 50,
                    stop_ids=(), backend: str = "eager", counting: str = "positions"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt ``[1, N]``: returns (per-head score ``[L, H]`` for this trial, generated ids ``[T]``)."""
    import attnkit

    if input_ids.shape[0] != 1:
        raise ValueError("retrieval_trial scores one prompt at a time (batch 1), as in the paper")
    start, end = needle_span
    if not 0 <= start < end <= input_ids.shape[1]:
        raise ValueError(f"needle span {needle_span} lies outside the prompt of {input_ids.shape[1]} tokens")
    argmax_steps, generated = [], []
    with attnkit.attach(model, [], backend=backend) as handle, handle.capture(queries="last") as cap, torch.no_grad():
        out = model(input_ids, use_cache=True)
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            rows = torch.stack([cap.last(layer)[0, :, -1] for layer in sorted(cap.maps)])  # [L, H, K]
            argmax_steps.append(rows.argmax(-1))  # [L, H]
            generated.append(token)
            if token in stop_ids:
                break
            out = model(torch.tensor([[token]]), **cache_kwargs(model, output_cache(out)))
    score = copy_paste_score(torch.stack(argmax_steps), input_ids[0], generated, needle_span, counting)
    return score, torch.tensor(generated)


def rouge_success(tokenizer, min_recall: float = 50.0) -> Callable:
    """The paper's success test: ROUGE-1 recall × 100 of the reference answer against the decoded answer must
    exceed ``min_recall``. The reference is the trial's ``"reference"``, else the decoded needle span; the trial dict
    gets ``"answer"`` and ``"rouge"``."""
    from attnkit.eval.metrics.rouge import rouge1_recall

    def success(generated: torch.Tensor, trial: dict) -> bool:
        start, end = trial["needle_span"]
        reference = trial.get("reference") or tokenizer.decode(trial["input_ids"][0, start:end],
                                                               skip_special_tokens=True)
        trial["answer"] = tokenizer.decode(generated, skip_special_tokens=True).strip()
        trial["rouge"] = 100.0 * rouge1_recall(reference, trial["answer"])
        return trial["rouge"] > min_recall

    return success


def retrieval_scores(model, trials: list[dict], success_fn: Callable | str | None = "rouge",
                     max_new_tokens: int = 50, stop_ids: Sequence[int] | str = "newline", data: str = "", *,
                     tokenizer=None, min_recall: float = 50.0, counting: str = "positions") -> HeadScores:
    """Mean retrieval score over successful trials. Each trial: ``{"input_ids": [1, N], "needle_span": (s, e)}``
    and optionally ``"reference"`` (the answer text).

    ``success_fn``: ``"rouge"`` (ROUGE-1 recall > ``min_recall``, needs ``tokenizer``), ``None`` (every trial counts)
    or ``fn(generated_ids, trial) -> bool``. ``stop_ids``: ``"newline"`` (needs ``tokenizer``) or explicit ids."""
    if counting not in COUNTINGS:
        raise ValueError(f"retrieval: counting must be one of {COUNTINGS}, got {counting!r}")
    needs = [what for what, value in (("success_fn='rouge'", success_fn), ("stop_ids='newline'", stop_ids))
             if isinstance(value, str)]
    if needs and tokenizer is None:
        raise ValueError(f"retrieval_scores: {' and '.join(needs)} need tokenizer= (to decode answers and find the "
                         "newline token); pass it, or explicit success_fn / stop_ids")
    if isinstance(success_fn, str):
        if success_fn != "rouge":
            raise ValueError(f"retrieval_scores: success_fn must be 'rouge', None or a callable, got {success_fn!r}")
        success_fn = rouge_success(tokenizer, min_recall)
    if isinstance(stop_ids, str):
        if stop_ids != "newline":
            raise ValueError(f"retrieval_scores: stop_ids must be 'newline' or a list of ids, got {stop_ids!r}")
        stop_ids = newline_stop_ids(tokenizer)
    kept = []
    for trial in trials:
        score, generated = retrieval_trial(model, trial["input_ids"], tuple(trial["needle_span"]), max_new_tokens,
                                           stop_ids, counting=counting)
        if success_fn is None or success_fn(generated, trial):
            kept.append(score)
    if not kept:
        raise ValueError("no successful retrieval trial: nothing to score (the paper drops failed trials)")
    return HeadScores(torch.stack(kept).mean(0), method="retrieval", model=model_name(model), data=data,
                      params={"trials": len(trials), "successful": len(kept), "max_new_tokens": max_new_tokens,
                              "counting": counting, "stop_ids": list(stop_ids)})
