"""Retrieval-head score (Wu et al., 2024; METHODS.md §7 and NIAH): greedy-decode an answer to a needle-in-a-haystack
prompt; at each step, a head scores ``1/|needle|`` when its most-attended key (last row, top-1) lies inside the
needle span **and** the token there equals the token being generated (copy-paste). A head's score is the mean over
successful trials (``success_fn``; the paper: ROUGE-1 recall > 50); failed trials are left out, not counted as 0.
Heads above 0.1 are retrieval heads.

Example (METHODS.md worked example: span [10, 14), j* = 11, 12, 20, copies at the first two steps):
    >>> import torch
    >>> prompt = torch.arange(100, 125)
    >>> steps = [(torch.tensor([[11]]), 111), (torch.tensor([[12]]), 112), (torch.tensor([[20]]), 999)]
    >>> sum(copy_paste_hits(j, prompt, tok, (10, 14)).float() for j, tok in steps) / 4
    tensor([[0.5000]])
"""

from __future__ import annotations

from typing import Callable

import torch

from attnkit.hooks.compat import cache_kwargs, output_cache
from attnkit.interventions.scoring._common import model_name
from attnkit.scores import HeadScores


def copy_paste_hits(argmax_pos: torch.Tensor, prompt_ids: torch.Tensor, token: int, span: tuple[int, int]):
    """argmax_pos long [L, H] (key index of each head's top-1 attention); prompt_ids [N] → bool [L, H]."""
    start, end = span
    inside = (argmax_pos >= start) & (argmax_pos < end)
    safe = argmax_pos.clamp(0, prompt_ids.numel() - 1)
    return inside & (prompt_ids[safe] == token)


def retrieval_trial(model, input_ids: torch.Tensor, needle_span: tuple[int, int], max_new_tokens: int = 50,
                    stop_ids=(), backend: str = "eager") -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt ``[1, N]``: returns (per-head score ``[L, H]`` for this trial, generated ids ``[T]``)."""
    import attnkit

    if input_ids.shape[0] != 1:
        raise ValueError("retrieval_trial scores one prompt at a time (batch 1), as in the paper")
    start, end = needle_span
    if not 0 <= start < end <= input_ids.shape[1]:
        raise ValueError(f"needle span {needle_span} lies outside the prompt of {input_ids.shape[1]} tokens")
    prompt = input_ids[0]
    total, generated = None, []
    with attnkit.attach(model, [], backend=backend) as handle, handle.capture(queries="last") as cap, torch.no_grad():
        out = model(input_ids, use_cache=True)
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            rows = torch.stack([cap.last(layer)[0, :, -1] for layer in sorted(cap.maps)])  # [L, H, K]
            hits = copy_paste_hits(rows.argmax(-1), prompt, token, needle_span).float()
            total = hits if total is None else total + hits
            generated.append(token)
            if token in stop_ids:
                break
            out = model(torch.tensor([[token]]), **cache_kwargs(model, output_cache(out)))
    return total / (end - start), torch.tensor(generated)


def retrieval_scores(model, trials: list[dict], success_fn: Callable | None = None, max_new_tokens: int = 50,
                     stop_ids=(), data: str = "") -> HeadScores:
    """Mean retrieval score over successful trials. Each trial: ``{"input_ids": [1, N], "needle_span": (s, e)}``;
    ``success_fn(generated_ids, trial) -> bool`` decides which trials count (default: all)."""
    kept = []
    for trial in trials:
        score, generated = retrieval_trial(model, trial["input_ids"], tuple(trial["needle_span"]), max_new_tokens,
                                           stop_ids)
        if success_fn is None or success_fn(generated, trial):
            kept.append(score)
    if not kept:
        raise ValueError("no successful retrieval trial: nothing to score (the paper drops failed trials)")
    return HeadScores(torch.stack(kept).mean(0), method="retrieval", model=model_name(model), data=data,
                      params={"trials": len(trials), "successful": len(kept), "max_new_tokens": max_new_tokens})
