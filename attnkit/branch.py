"""A second model pass over a transformed input, run alongside the main sequence and combined with it in the logits.

Contrastive and ensemble decoding methods (DAMRO's outlier-only branch, AGLA's augmented view, VCD's noised image)
all need the same machinery, which :class:`BranchedLogits` provides once:

* hooks on the outer model record each call (its ids, mask, cache, every keyword argument) and, on the text
  decoder, the ``inputs_embeds`` the decoder received (a VLM's image placeholders already hold the projected
  patches there);
* after the main forward, the subclass says what the branch sees at a prefill (:meth:`BranchedLogits.branch_inputs`
  returns a :class:`BranchInputs`: the keyword arguments of the branch's own prefill — ``inputs_embeds`` for the
  text decoder, or any inputs of the whole model such as a changed ``pixel_values`` — and which of its positions
  get combined);
* the branch runs on the **stock** model (inside ``handle.detached()``: attnkit's other edits are off and the span
  tracker stays on the main sequence) with its **own KV cache**; every later decode step of the main sequence is fed
  to it (the new tokens, with the main call's new mask columns), and beam-search reorders of the main cache are
  followed;
* the subclass combines the two (:meth:`BranchedLogits.combine`) on the positions both sequences share (aligned from
  the right under left padding); earlier positions keep the main logits.

A call with an empty main cache starts a new branch sequence (so ``use_cache=False`` generation recomputes both
branches from scratch at every step); a call on a non-empty cache is a decode step of the current branch.

``runner = "decoder"``: the branch calls the text decoder (``inputs_embeds`` or ``input_ids``) and the output
embedding; decode steps are embedded with the model's input embedding. ``runner = "model"``: the branch calls the
whole model (e.g. with other ``pixel_values``), prefill and decode alike. Positions come from the branch's own mask
(``cumsum − 1``, as ``generate`` numbers them), except on multi-axis RoPE models (Qwen2-VL), which compute theirs.
``mirror = True`` says the branch keeps the main sequence's tokens and positions (only other inputs differ): its decode
steps then reuse the main call's inputs (ids, mask, positions, token types) with the branch's own cache.

Example (a branch that sees the prompt without its first real token, combined as ``ℓ + ℓ_branch``):
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_causal_lm
    >>> class DropFirst(BranchedLogits):
    ...     name = "doc-drop-first"
    ...     runner = "model"
    ...     def branch_inputs(self, call):
    ...         ids = call["ids"][:, 1:]
    ...         return BranchInputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
    ...                             valid=torch.ones_like(ids, dtype=torch.bool))
    ...     def combine(self, main, branch):
    ...         return main + branch
    >>> model = tiny_causal_lm("llama")
    >>> ids = torch.tensor([[1, 5, 7, 9]])
    >>> with torch.no_grad():
    ...     with attnkit.attach(model, [DropFirst()]):
    ...         got = model.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True,
    ...                              return_dict_in_generate=True, pad_token_id=0).logits
    ...     step0 = model(ids).logits[:, -1] + model(ids[:, 1:]).logits[:, -1]
    >>> torch.allclose(got[0], step0, atol=1e-5)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.hooks.compat import cache_from_kwargs, cache_kwargs, cache_length, output_cache
from attnkit.interventions.base import Intervention

RUNNERS = ("decoder", "model")
_CALL_KEYS = {"input_ids", "attention_mask", "inputs_embeds", "position_ids", "use_cache", "return_dict",
              "cache_position", "logits_to_keep", "output_attentions", "output_hidden_states"}


@dataclass
class BranchInputs:
    """What a branch prefill sees: ``kwargs`` of its own forward (``attention_mask`` required: ``[B, N']``, 1 = real)
    and ``valid`` bool ``[B, N']``: the branch positions whose logits are combined with the main ones (right-aligned
    with the main call's positions)."""

    kwargs: dict
    valid: torch.Tensor


def read_call(args: tuple, kwargs: dict) -> dict:
    """What a whole-model forward pre-hook needs of the call: ``ids`` (``[B, N]`` or None), ``mask`` (2-D or None),
    ``cache`` (any spelling, :mod:`attnkit.hooks.compat`) and ``prefill`` (no cached tokens before this call).

    Example:
        >>> call = read_call((torch.tensor([[1, 2, 3]]),), {"attention_mask": None})
        >>> call["ids"].shape, call["prefill"], call["cache"] is None
        (torch.Size([1, 3]), True, True)
    """
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    cache = cache_from_kwargs(kwargs)
    return {"ids": ids, "mask": kwargs.get("attention_mask"), "prefill": (cache_length(cache) or 0) == 0,
            "cache": cache}


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a 2-D mask as ``generate`` makes them: ``cumsum − 1``, pads at 0. ``[B, T]`` → ``[B, T]``.

    Example:
        >>> positions_from_mask(torch.tensor([[0, 1, 1]])).tolist()
        [[0, 0, 1]]
    """
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


class BranchedLogits(Intervention):
    """Base class of the logit-combining two-pass methods (see the module docstring). Subclasses set ``name``,
    ``runner`` and implement :meth:`branch_inputs` and :meth:`combine`; they may override :meth:`on_prefill`
    (e.g. to start a capture before the main pass)."""

    runner: str = "decoder"
    #: the branch has the main sequence's tokens and positions (only other inputs differ, e.g. the pixels): decode
    #: steps then reuse the main call's own inputs (ids, mask, positions, token types) with the branch's cache
    mirror: bool = False

    def __init__(self, **target):
        super().__init__(**target)
        self._handle = None
        self._call: dict | None = None  # the current outer call
        self._state: dict | None = None  # the branch's sequence: cache, mask, tokens seen
        self._busy = False
        #: the last branch prefill's inputs (for inspection)
        self.last_branch: dict | None = None

    # ---- what subclasses implement ----------------------------------------------------------------------------------
    def branch_inputs(self, call: dict) -> BranchInputs | None:
        """The branch prefill for this main prefill call (``call``: ``ids``, ``mask``, ``embeds`` the decoder's
        inputs_embeds, ``kwargs`` every keyword of the call), or None to leave this sequence alone."""
        raise NotImplementedError

    def combine(self, main: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """Combined logits ``[B, m, V]`` from the main and branch logits of the shared positions."""
        raise NotImplementedError

    def on_prefill(self, call: dict) -> None:
        """Called before the main prefill runs (the call's inputs are known, nothing has run yet)."""

    def on_main_done(self, call: dict) -> None:
        """Called after the main forward, before the branch runs."""

    # ---- attach ------------------------------------------------------------------------------------------------------
    def install(self, handle) -> list:
        from attnkit.hooks.transformers import text_model_of

        if self.runner not in RUNNERS:
            raise ValueError(f"{self.name}: runner must be one of {RUNNERS}, got {self.runner!r}")
        model = handle.model
        self._handle = handle
        self._text = text_model_of(model)
        self._embed = model.get_input_embeddings()
        self._head = model.get_output_embeddings()
        if self._head is None or (self.runner == "decoder" and self._text is None):
            raise ValueError(f"{self.name}: {type(model).__name__} lacks a text decoder or an output embedding")
        from attnkit.rope import _rope_kind

        # multi-axis RoPE (Qwen2-VL) computes its own positions from the inputs; other models take them from the mask
        self._own_positions = "mrope" in _rope_kind(model.config.get_text_config(decoder=True))
        self._call, self._state = None, None
        hooks = [handle.hook(model, self._pre_outer, pre=True, with_kwargs=True, always=True),
                 handle.hook(model, self._post_outer, with_kwargs=True, always=True)]
        if self._text is not None:
            hooks.append(handle.hook(self._text, self._pre_text, pre=True, with_kwargs=True, always=True))
        return hooks

    # ---- hooks -------------------------------------------------------------------------------------------------------
    def _pre_outer(self, module, args, kwargs):
        if self._busy:
            return
        extra = {k: v for k, v in kwargs.items() if k not in _CALL_KEYS and cache_from_kwargs({k: v}) is None}
        self._call = {**read_call(args, kwargs), "use_cache": kwargs.get("use_cache", True) is not False,
                      "embeds": None, "kwargs": extra,
                      "all": {k: v for k, v in kwargs.items() if cache_from_kwargs({k: v}) is None}}
        if self._call["prefill"] and self._handle.active:
            self.on_prefill(self._call)

    def _pre_text(self, module, args, kwargs):
        if self._busy or self._call is None:
            return
        self._call["embeds"] = kwargs.get("inputs_embeds")

    def _post_outer(self, module, args, kwargs, output):
        call, self._call = self._call, None
        if self._busy or call is None:
            return None
        if not self._handle.active:
            if call["prefill"]:
                self._state = None  # a sequence run without the method: its decode steps are left alone too
            return None
        logits = getattr(output, "logits", None)
        if logits is None:
            return None
        self.on_main_done(call)
        branch, valid = self._prefill(call, logits.shape[1]) if call["prefill"] else self._decode(call, logits.shape[1])
        if branch is None:
            return None
        m = branch.shape[1]
        tail = logits[:, -m:]  # [B, m, V]
        combined = torch.where(valid.to(logits.device)[:, :, None], self.combine(tail, branch.to(tail.device)), tail)
        output.logits = torch.cat([logits[:, :-m], combined], dim=1) if m < logits.shape[1] else combined
        return output

    # ---- the branch sequence ----------------------------------------------------------------------------------------
    def _prefill(self, call: dict, q_out: int):
        self._state = None
        spec = self.branch_inputs(call)
        if spec is None:
            return None, None
        kwargs = dict(spec.kwargs)
        mask = kwargs.pop("attention_mask")
        first = kwargs.get("inputs_embeds", kwargs.get("input_ids"))
        m = min(q_out, first.shape[1])
        logits, cache = self._run(kwargs, mask, None, m, call["use_cache"])  # [B, m, V]
        if call["use_cache"]:
            self._state = {"cache": cache, "mask": mask, "seen": call["ids"].shape[1] if call["ids"] is not None
                           else call["embeds"].shape[1]}
            self._follow_reorders(call["cache"])
        return logits, spec.valid[:, -m:]

    def _follow_reorders(self, main_cache) -> None:
        """Beam search reorders the main cache in place (``cache.reorder_cache(beam_idx)``): wrap that method of
        this sequence's cache object so the branch cache and mask follow the same beams."""
        if main_cache is None or not hasattr(main_cache, "reorder_cache"):
            return
        state, original = self._state, main_cache.reorder_cache

        def reorder_cache(beam_idx, *args, **kwargs):
            result = original(beam_idx, *args, **kwargs)
            if self._state is state:  # still this sequence
                if state["cache"] is not None:
                    state["cache"].reorder_cache(beam_idx)
                state["mask"] = state["mask"].index_select(0, beam_idx.to(state["mask"].device))  # [B, T]
            return result

        main_cache.reorder_cache = reorder_cache

    def _decode(self, call: dict, q_out: int):
        state, ids = self._state, call["ids"]
        if state is None:
            return None, None  # a sequence the method left alone
        if ids is None or (call["mask"] is not None and call["mask"].shape[1] != state["seen"] + ids.shape[1]):
            raise RuntimeError(f"{self.name}: this decode step does not continue the sequence of the last prefill")
        new_mask = call["mask"][:, -ids.shape[1]:] if call["mask"] is not None else torch.ones_like(ids)  # [B, q]
        mask = torch.cat([state["mask"], new_mask.to(state["mask"])], dim=1)  # [B, T+q]
        m = min(q_out, ids.shape[1])
        if self.mirror:
            logits, state["cache"] = self._mirror_step(call, state["cache"], m)
        else:
            inputs = {"inputs_embeds": self._embed(ids)} if self.runner == "decoder" else {"input_ids": ids}
            logits, state["cache"] = self._run(inputs, mask, state["cache"], m, True)
        state["mask"], state["seen"] = mask, state["seen"] + ids.shape[1]
        return logits, torch.ones(ids.shape[0], m, dtype=torch.bool)

    def _mirror_step(self, call: dict, cache, last: int):
        """A decode step of a mirrored branch: the main call's inputs, the branch's cache."""
        model = self._handle.model
        self._busy = True
        try:
            with self._handle.detached():
                inputs = {k: v for k, v in call["all"].items() if k != "use_cache"}
                out = model(**inputs, **cache_kwargs(model, cache, True))
        finally:
            self._busy = False
        return out.logits[:, -last:], output_cache(out)

    def _run(self, inputs: dict, mask: torch.Tensor, cache, last: int, use_cache: bool):
        """One stock pass of the branch: new inputs (``inputs_embeds``/``input_ids`` ``[B, q, ·]`` + any model kwargs),
        mask ``[B, past+q]`` → (logits of the last ``last`` positions ``[B, last, V]``, cache)."""
        first = inputs.get("inputs_embeds", inputs.get("input_ids"))
        if cache is None:  # a prefill: keep its inputs for inspection
            self.last_branch = {**inputs, "attention_mask": mask}
        self._busy = True
        try:
            with self._handle.detached():  # the stock model, untracked: the span tracker stays on the main sequence
                if self.runner == "decoder":
                    positions = positions_from_mask(mask)[:, -first.shape[1]:]  # [B, q]
                    out = self._text(attention_mask=mask, position_ids=positions, **inputs,
                                     **cache_kwargs(self._text, cache, use_cache))
                    logits = self._head(out.last_hidden_state[:, -last:])  # [B, last, V]
                else:
                    model = self._handle.model
                    if not self._own_positions and "position_ids" not in inputs:
                        inputs = {**inputs, "position_ids": positions_from_mask(mask)[:, -first.shape[1]:]}
                    out = model(attention_mask=mask, **inputs, **cache_kwargs(model, cache, use_cache))
                    logits = out.logits[:, -last:]
        finally:
            self._busy = False
        return logits, output_cache(out) if use_cache else None
