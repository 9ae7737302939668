"""Batched log-likelihood of continuations given contexts, for any causal LM.

``loglikelihood(model, tokenizer, [(context, continuation), ...])`` returns, per pair, the **sum** of the
continuation tokens' log-probabilities (lm-eval-harness convention):

* trailing whitespace of the context is moved to the front of the continuation;
* ``context + continuation`` is tokenized as a whole and split at ``len(tokenize(context))`` so the continuation
  tokens are those a model would actually see;
* an empty context is replaced by the BOS token (or EOS when there is no BOS);
* batches are padded on ``padding_side`` ("right" or "left"); with left padding explicit ``position_ids``
  are passed so every sample sees positions 0..n-1 — a batch gives the same numbers as one sample at a time.

Example:
    >>> from attnkit.models import load_smollm2
    >>> model, tok = load_smollm2()  # doctest: +SKIP
    >>> ll = loglikelihood(model, tok, [("The capital of France is", " Paris"),
    ...                                 ("The capital of France is", " Banana")])  # doctest: +SKIP
    >>> ll[0] > ll[1]  # doctest: +SKIP
    True
"""

from __future__ import annotations

from typing import Sequence

import torch


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids ``(context_ids, continuation_ids)`` split as lm-eval does (see module docstring).

    Example:
        >>> class T:  # a character-level toy tokenizer
        ...     bos_token_id = None; eos_token_id = 0
        ...     def __call__(self, s, add_special_tokens=False): return {"input_ids": [ord(c) for c in s]}
        >>> encode_pair(T(), "Q: A ", "B")
        ([81, 58, 32, 65], [32, 66])
    """
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context = stripped
    prefix: list[int] = []
    if _adds_bos(tokenizer):
        prefix = [tokenizer.bos_token_id]
    whole = prefix + tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(prefix) + len(tokenizer(context, add_special_tokens=False)["input_ids"]) if context else len(prefix)
    ctx, cont = whole[:n_ctx], whole[n_ctx:]
    if not ctx:
        start = tokenizer.bos_token_id if getattr(tokenizer, "bos_token_id", None) is not None \
            else tokenizer.eos_token_id
        ctx = [start]
    if not cont:
        raise ValueError(f"loglikelihood: continuation {continuation!r} encodes to no tokens after context "
                         f"{context[-40:]!r}; pass a non-empty continuation.")
    return ctx, cont


def _max_length(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


@torch.no_grad()
def score_token_batches(model, seqs: Sequence[tuple[list[int], list[int]]], batch_size: int = 8,
                        padding_side: str = "right", pad_id: int = 0) -> list[tuple[float, bool]]:
    """Per ``(ctx_ids, cont_ids)``: (sum of continuation log-probs, whether every continuation token is greedy)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    limit = _max_length(model)
    inputs = []
    for ctx, cont in seqs:
        full = (ctx + cont)[:-1]  # the last continuation token is only a target
        if limit and len(full) > limit:
            full = full[-limit:]  # truncate the context from the left, keep the continuation
        inputs.append((full, cont))
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))  # longest first: stable peak memory
    results: list = [None] * len(inputs)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        for i, val in zip(idx, _score_batch(model, [inputs[i] for i in idx], padding_side, pad_id, device)):
            results[i] = val
    return results


def _score_batch(model, batch, padding_side, pad_id, device):
    width = max(len(x) for x, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
    for b, (x, _) in enumerate(batch):
        sl = slice(0, len(x)) if padding_side == "right" else slice(width - len(x), width)
        ids[b, sl] = torch.tensor(x)
        mask[b, sl] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]: 0..n-1 over real tokens
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                   position_ids=position_ids.to(device)).logits.float()  # [B, T, V]
    logp = torch.log_softmax(logits, dim=-1)
    out = []
    for b, (x, cont) in enumerate(batch):
        end = len(x) if padding_side == "right" else width  # one past the last real position
        rows = logp[b, end - len(cont):end]  # [C, V]: predictions of the continuation tokens
        target = torch.tensor(cont, device=rows.device)
        out.append((rows.gather(-1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())))
    return out


def loglikelihood(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 8,
                  padding_side: str = "right", return_greedy: bool = False) -> list:
    """Sum of log p(continuation | context) per pair (see module docstring); optionally with is-greedy flags."""
    seqs = [encode_pair(tokenizer, c, x) for c, x in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    res = score_token_batches(model, seqs, batch_size, padding_side, pad)
    return res if return_greedy else [ll for ll, _ in res]
