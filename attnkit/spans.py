"""Per-sample token spans that follow a sequence through padding, batching and KV-cache decoding.

A :class:`SequenceTracker` watches the inputs of every top-level forward call and keeps, for each sample of the
current batch, one row per token seen so far (the tokens behind the KV cache plus the new ones):

* ``pad``: left/right padding (from the 2D ``attention_mask``);
* ``first``: the first real token of each sample (the classic attention sink);
* ``image``: positions whose id is the model's image token (``config.image_token_id``);
* ``text``: real tokens that are not image tokens;
* ``prompt`` / ``response``: tokens given at prefill / appended by later decode calls;
* any user span set with :meth:`SequenceTracker.set_span` (e.g. a PASTA instruction).

Keys of an attention call are the last ``K`` tracked positions and queries the last ``Q`` ones, which is exact for
growing caches and for sliding-window caches that keep a contiguous suffix.

Example:
    >>> import torch
    >>> tr = SequenceTracker(image_token_id=9)
    >>> tr.observe(torch.tensor([[0, 5, 9, 9, 7]]), torch.tensor([[0, 1, 1, 1, 1]]), past_length=0)
    >>> tr.mask("image").int().tolist(), tr.mask("first").int().tolist()
    ([[0, 0, 1, 1, 0]], [[0, 1, 0, 0, 0]])
"""

from __future__ import annotations

from typing import Sequence

import torch

BUILTIN_SPANS = ("pad", "real", "first", "image", "text", "prompt", "response")


class SpanError(ValueError):
    """A user span whose shape or ranges do not fit the batch."""


def ranges_to_mask(ranges: Sequence[Sequence[tuple[int, int]]], batch: int, length: int) -> torch.Tensor:
    """Per-sample ``[(start, end), ...]`` token ranges (end excluded) → bool mask ``[batch, length]``.

    Example:
        >>> ranges_to_mask([[(1, 3)], []], batch=2, length=4).int().tolist()
        [[0, 1, 1, 0], [0, 0, 0, 0]]
    """
    if len(ranges) != batch:
        raise SpanError(f"span ranges given for {len(ranges)} samples but the batch has {batch}")
    mask = torch.zeros(batch, length, dtype=torch.bool)  # [B, N]
    for b, sample_ranges in enumerate(ranges):
        for start, end in sample_ranges:
            if not (0 <= start < end <= length):
                raise SpanError(f"span ({start}, {end}) of sample {b} lies outside the input of length {length}")
            mask[b, start:end] = True
    return mask


class SequenceTracker:
    """Tracks token spans for the sequences currently in a model's KV cache (one tracker per attached model)."""

    def __init__(self, image_token_id: int | None = None):
        self.image_token_id = image_token_id
        self.user_spans: dict[str, torch.Tensor | list] = {}
        #: layer -> callable returning the original position of every key slot ``[B, K]`` (or None) for layers
        #: whose cache no longer holds a contiguous suffix of the sequence (token pruning)
        self.key_position_providers: dict[int, object] = {}
        self.sequence_id = 0  # bumps at every new sequence (prefill), so interventions can reset their state
        self.last_was_prefill = True
        self.reset()

    def reset(self) -> None:
        self.ids: torch.Tensor | None = None  # [B, T] long (-1 = unknown, e.g. inputs_embeds)
        self.real: torch.Tensor | None = None  # [B, T] bool
        self.prompt: torch.Tensor | None = None  # [B, T] bool
        self.user: dict[str, torch.Tensor] = {}  # name -> [B, T] bool
        self._cache: dict = {}
        self.forward_index = 0

    @property
    def length(self) -> int:
        return 0 if self.ids is None else self.ids.shape[1]

    @property
    def batch(self) -> int:
        return 0 if self.ids is None else self.ids.shape[0]

    # ---- user spans ---------------------------------------------------------------------------------------
    def set_span(self, name: str, spans) -> None:
        """Mark a span for the next prefill: a bool tensor ``[B, N]`` over the padded ``input_ids``, or
        per-sample lists of ``(start, end)`` ranges in those coordinates. Stays until :meth:`clear_spans`."""
        if name in BUILTIN_SPANS:
            raise SpanError(f"span name {name!r} is reserved (built-in spans: {', '.join(BUILTIN_SPANS)})")
        if isinstance(spans, torch.Tensor) and (spans.dtype != torch.bool or spans.dim() != 2):
            raise SpanError(f"span {name!r} must be a bool tensor [batch, seq_len], got {spans.dtype} {tuple(spans.shape)}")
        self.user_spans[name] = spans

    def clear_spans(self) -> None:
        self.user_spans.clear()

    # ---- observing inputs ------------------------------------------------------------------------------------
    def observe(self, input_ids, attention_mask, past_length: int, batch: int | None = None, new_len: int | None = None):
        """Record a forward call: ``input_ids`` [B, N] (or None with ``batch``/``new_len``), the 2D mask over
        all ``past_length + N`` tokens (or None), and how many tokens the cache held before the call."""
        if input_ids is not None:
            batch, new_len = input_ids.shape
            new_ids = input_ids.detach().to("cpu", torch.long)  # [B, N]
        else:
            new_ids = torch.full((batch, new_len), -1, dtype=torch.long)
        joined_mid_sequence = past_length > 0 and (self.ids is None or self.batch != batch)
        self.last_was_prefill = past_length == 0
        if past_length == 0 or joined_mid_sequence:
            self.reset()
            self.sequence_id += 1
            self.ids = new_ids
            self.prompt = torch.ones(batch, new_len, dtype=torch.bool)
            self.user = {name: self._user_mask(name, spec, batch, new_len) for name, spec in self.user_spans.items()}
            if joined_mid_sequence:  # attached after the prefill ran: earlier tokens are unknown prompt tokens
                self.ids = torch.cat([torch.full((batch, past_length), -1, dtype=torch.long), new_ids], dim=1)
                self.prompt = torch.cat([torch.ones(batch, past_length, dtype=torch.bool),
                                         torch.zeros(batch, new_len, dtype=torch.bool)], dim=1)
                self.user = {}
        else:
            self._align_to(past_length)
            self.ids = torch.cat([self.ids, new_ids], dim=1)
            self.prompt = torch.cat([self.prompt, torch.zeros(batch, new_len, dtype=torch.bool)], dim=1)
            self.user = {k: torch.cat([v, torch.zeros(batch, new_len, dtype=torch.bool)], 1) for k, v in self.user.items()}
        total = self.length
        if attention_mask is not None and attention_mask.dim() == 2:
            real = attention_mask.detach().to("cpu").bool()  # [B, T'] where T' should be total
            if real.shape[1] >= total:
                real = real[:, -total:]
            else:  # mask shorter than what we track: older tokens count as real
                real = torch.cat([torch.ones(batch, total - real.shape[1], dtype=torch.bool), real], dim=1)
            self.real = real
        elif self.real is None or self.real.shape[1] != total:
            prev = self.real if self.real is not None else torch.zeros(batch, 0, dtype=torch.bool)
            self.real = torch.cat([prev, torch.ones(batch, total - prev.shape[1], dtype=torch.bool)], dim=1)
        self._cache = {}
        self.forward_index += 1

    def _align_to(self, past_length: int) -> None:
        """Make the tracked length equal the cache length (e.g. after the user cropped the cache)."""
        have = self.length
        if have > past_length:
            keep = slice(have - past_length, have)
            self.ids, self.prompt = self.ids[:, keep], self.prompt[:, keep]
            self.real = self.real[:, keep] if self.real is not None else None
            self.user = {k: v[:, keep] for k, v in self.user.items()}
        elif have < past_length:
            extra = past_length - have
            b = self.batch
            self.ids = torch.cat([torch.full((b, extra), -1, dtype=torch.long), self.ids], 1)
            self.prompt = torch.cat([torch.ones(b, extra, dtype=torch.bool), self.prompt], 1)
            if self.real is not None:
                self.real = torch.cat([torch.ones(b, extra, dtype=torch.bool), self.real], 1)
            self.user = {k: torch.cat([torch.zeros(b, extra, dtype=torch.bool), v], 1) for k, v in self.user.items()}

    def _user_mask(self, name: str, spec, batch: int, length: int) -> torch.Tensor:
        if isinstance(spec, torch.Tensor):
            if tuple(spec.shape) != (batch, length):
                raise SpanError(
                    f"span {name!r} has shape {tuple(spec.shape)} but the input_ids of this call are {(batch, length)}; "
                    "set spans for the batch you pass (after padding)"
                )
            return spec.detach().to("cpu")
        return ranges_to_mask(spec, batch, length)

    def provide_key_positions(self, layers, provider) -> "_ProviderRegistration":
        """Register ``provider() -> [B, K] | None`` giving the original positions of the key slots of ``layers``;
        returns an object whose ``remove()`` unregisters it (hand it back from ``Intervention.install``)."""
        for layer in layers:
            self.key_position_providers[layer] = provider
        return _ProviderRegistration(self, list(layers), provider)

    def positions_for(self, layer: int, n: int) -> torch.Tensor | slice:
        """Tracked positions of the last ``n`` keys of ``layer``: a slice, or ``[B, n]`` indices after pruning."""
        provider = self.key_position_providers.get(layer)
        positions = provider() if provider is not None else None
        if positions is not None and positions.shape[-1] >= n:
            return positions[:, positions.shape[-1] - n :].to("cpu")
        return slice(self.length - n, self.length)

    def gather(self, name: str, layer: int, n: int) -> torch.Tensor:
        """Span ``name`` at the last ``n`` key slots of ``layer`` → bool ``[B, n]``."""
        mask = self.mask(name)  # [B, T]
        where = self.positions_for(layer, n)
        if isinstance(where, slice):
            return mask[:, where]
        return torch.gather(mask, 1, where.clamp(0, mask.shape[1] - 1))

    def memo(self, key, compute):
        """``compute()``, kept under ``key`` until the next forward call is observed (what every layer of one forward
        would otherwise recompute; see :meth:`attnkit.interventions.base.AttentionContext.per_forward`).

        Example:
            >>> tr = SequenceTracker(); tr.observe(torch.tensor([[4, 5]]), None, past_length=0)
            >>> tr.memo("k", lambda: 1), tr.memo("k", lambda: 2)          # kept within the forward
            (1, 1)
            >>> tr.observe(torch.tensor([[6]]), None, past_length=2); tr.memo("k", lambda: 3)  # the next one
            3
        """
        key = ("memo", key)
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    # ---- queries -------------------------------------------------------------------------------------------
    def mask(self, name: str) -> torch.Tensor:
        """Bool mask ``[B, T]`` over all tracked positions for a built-in or user span."""
        if name in self._cache:
            return self._cache[name]
        if self.ids is None:
            raise SpanError("no forward call has been observed yet")
        real = self.real
        if name == "real":
            out = real
        elif name == "pad":
            out = ~real
        elif name == "first":
            first_idx = real.int().argmax(dim=1)  # [B]
            out = torch.zeros_like(real)
            out[torch.arange(real.shape[0]), first_idx] = real.any(dim=1)
        elif name == "image":
            out = (self.ids == self.image_token_id) & real if self.image_token_id is not None else torch.zeros_like(real)
        elif name == "text":
            out = real & ~self.mask("image")
        elif name == "prompt":
            out = self.prompt & real
        elif name == "response":
            out = ~self.prompt & real
        elif name in self.user:
            out = self.user[name]
        else:
            known = list(BUILTIN_SPANS) + sorted(self.user)
            raise SpanError(f"unknown span {name!r}; known spans: {', '.join(known)}")
        self._cache[name] = out
        return out

    def image_index(self) -> torch.Tensor:
        """``[B, T]`` long: 0, 1, … for the tokens of the first, second, … image of each sample, -1 elsewhere."""
        img = self.mask("image")  # [B, T]
        starts = img & ~torch.cat([torch.zeros_like(img[:, :1]), img[:, :-1]], dim=1)  # [B, T]
        index = starts.long().cumsum(dim=1) - 1  # [B, T]
        return torch.where(img, index, torch.full_like(index, -1))


class _ProviderRegistration:
    def __init__(self, tracker, layers, provider):
        self.tracker, self.layers, self.provider = tracker, layers, provider

    def remove(self) -> None:
        for layer in self.layers:
            if self.tracker.key_position_providers.get(layer) is self.provider:
                del self.tracker.key_position_providers[layer]


# ---- building user spans from text ---------------------------------------------------------------------------
def substring_spans(tokenizer, texts: Sequence[str], substrings: Sequence[str | None], *,
                    start_chars: Sequence[int] | None = None, **encode_kwargs):
    """Token ranges covering ``substrings[b]`` inside ``texts[b]``, in the coordinates of
    ``tokenizer(texts, padding=True, **encode_kwargs)`` (so left padding is accounted for). Needs a fast tokenizer.
    The first occurrence at or after character ``start_chars[b]`` (default 0) is taken, e.g. the user's message
    rather than an identical phrase in a chat template's system prompt.

    Returns ``(batch_encoding, ranges)`` with ``ranges[b] = [(start, end)]`` (empty when ``substrings[b]`` is None).

    Example:
        >>> enc, ranges = substring_spans(tok, ["Answer in French: hi"], ["in French"])  # doctest: +SKIP
        >>> handle.set_span("instruction", ranges)                                   # doctest: +SKIP
    """
    enc = tokenizer(list(texts), padding=True, return_offsets_mapping=True, return_tensors="pt", **encode_kwargs)
    ranges = []
    for b, (text, sub) in enumerate(zip(texts, substrings)):
        if sub is None:
            ranges.append([])
            continue
        start_char = text.find(sub, start_chars[b] if start_chars is not None else 0)
        if start_char < 0:
            raise SpanError(f"substring {sub!r} not found in text {b}: {text[:80]!r}")
        end_char = start_char + len(sub)
        offsets = enc["offset_mapping"][b]  # [N, 2]
        real = enc["attention_mask"][b].bool()
        hits = [i for i, (s, e) in enumerate(offsets.tolist()) if real[i] and e > start_char and s < end_char and e > s]
        if not hits:
            raise SpanError(f"substring {sub!r} of text {b} maps to no token")
        ranges.append([(hits[0], hits[-1] + 1)])
    enc.pop("offset_mapping")
    return enc, ranges


def chat_role_spans(tokenizer, messages: Sequence[dict]) -> dict[str, list[tuple[int, int]]]:
    """Token ranges of each role (``system``, ``user``, ``assistant``, …) in ``apply_chat_template(messages)``,
    found by rendering growing prefixes of the conversation. Indices are for the unpadded sequence; add the pad
    count when the sample is left-padded in a batch.

    Example:
        >>> spans = chat_role_spans(tok, [{"role": "system", "content": "Be brief."},
        ...                               {"role": "user", "content": "Hi"}])               # doctest: +SKIP
        >>> spans["system"]                                                                    # doctest: +SKIP
        [(0, 7)]
    """
    spans: dict[str, list[tuple[int, int]]] = {}
    previous = 0
    for i, message in enumerate(messages):
        ids = tokenizer.apply_chat_template(list(messages[: i + 1]), tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        spans.setdefault(message["role"], []).append((previous, len(ids)))
        previous = len(ids)
    return spans
