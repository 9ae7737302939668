"""StreamingLLM (Xiao et al., ICLR 2024), METHODS.md §3: a sink + window KV-cache policy that works with
``generate()``.

The cache keeps the first ``num_sinks`` real tokens of each sample plus the most recent tokens (``window`` excludes
the sinks, the streaming-llm convention; HF's old ``SinkCache.window_length`` included them). The released code has
two drivers, and attnkit offers both (``evict=``):

* ``"per_prompt"`` (default) — the chat demo (``run_streaming_llama.py`` with ``enable_streaming_llm``, 4 sinks,
  ``recent_size=2000``): before each new prompt (a call that brings more than one token to a non-empty cache) the
  cache is cut so that the prompt plus ``reserve`` new tokens (the demo's ``max_gen_len=1000``) fit in
  ``num_sinks + window`` (``evict_for_space``: the sinks and the last ``window − prompt − reserve`` tokens stay);
  decoding never evicts, so the cache grows within a turn. A first prompt longer than the window is not cut.
* ``"per_call"`` — the perplexity script (``eval_long_ppl.py``): after every forward call the cache is cut to
  ``num_sinks + window`` (``kv_cache(past_key_values)``). Its own defaults are 1 sink + 255 recent without position
  shifting; the paper's runs add ``--start_size 4 --enable_pos_shift`` (preset ``streaming-llm-ppl``).

Default = the chat demo because it is the released library entry point (``enable_streaming_llm``) and the one whose
``recent_size`` (2000) is attnkit's default ``window``; pairing that window with per-call eviction mixed the two.

Positions (``pos_shift=``): ``True`` (default; the demo always, the PPL script with ``--enable_pos_shift``, the paper)
makes positions *cache slots*: kept keys are re-rotated so that the real tokens in the cache sit at RoPE positions
``0..n−1``, and the next query gets position ``n`` — the worked example: sinks {t0, t1} + window {t7, t8, t9} at
positions 0..4, next query t10 at 5. Re-rotating stored (post-RoPE) keys by the position shift is exact because RoPE
rotations compose (``R(a)R(b) = R(a+b)``). ``False``: no re-indexing — kept keys keep their original positions and
every new token gets its position in the text (``SinkWindowPolicy(shift_positions=False)`` of the perplexity eval).
(The released PPL script without ``--enable_pos_shift`` gave the query the *cache length* as position under the
transformers version of its time, mixing both conventions; attnkit does not reproduce that.)

Prefill is ordinary full attention, as in the paper. Requires RoPE models with full-attention (non-sliding) cache
layers; ALiBi/absolute-position models (gpt2) are rejected. With left padding, the sinks are each sample's first
real tokens. Interventions reading token spans (VAR, PASTA, …) should not be stacked on top: after eviction the
cache is no longer a contiguous suffix of the sequence.

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> iv = StreamingLLM(num_sinks=2, window=3, evict="per_call")
    >>> with attnkit.attach(model, [iv]):
    ...     out = model.generate(torch.tensor([[1, 5, 7, 9, 11, 13]]), max_new_tokens=4, do_sample=False)
    >>> out.shape, iv.max_cache_seen
    (torch.Size([1, 10]), 5)
"""

from __future__ import annotations

import torch

from attnkit.hooks.compat import cache_from_kwargs, cache_length, output_cache
from attnkit.interventions.base import Intervention, register_intervention


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rerotate(keys: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move post-RoPE keys ``[B, Hkv, K, D]`` by ``shift`` positions ``[B, K]`` (rotary dims = 2·len(inv_freq),
    the first ones, as in HF's partial rotary)."""
    rot = inv_freq.numel() * 2
    angles = shift.float()[..., None] * inv_freq.float().to(keys.device)  # [B, K, rot/2]
    emb = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, K, rot]
    k_rot, k_pass = keys[..., :rot].float(), keys[..., rot:]
    moved = k_rot * emb.cos() + rotate_half(k_rot) * emb.sin()
    return torch.cat((moved.to(keys.dtype), k_pass), dim=-1)


def keep_slots(real: torch.Tensor, num_sinks: int, window: int) -> torch.Tensor:
    """Per sample, the ``num_sinks + window`` cache slots to keep (ascending), long ``[B, S+W]``: the first
    ``num_sinks`` real slots, then the most recent slots, then (only for short padded samples) the rest.

    Example (METHODS.md worked example: t0..t9 cached, S=2, W=3):
        >>> keep_slots(torch.ones(1, 10, dtype=torch.bool), 2, 3).tolist()
        [[0, 1, 7, 8, 9]]
    """
    batch, length = real.shape
    slots = torch.arange(length)
    first_real = (real.long().cumsum(1) <= num_sinks) & real  # [B, L]
    priority = torch.where(first_real, 2 * length + slots.flip(0), slots.expand(batch, -1))  # sinks first
    keep = priority.topk(min(num_sinks + window, length), dim=1).indices  # [B, S+W]
    return keep.sort(dim=1).values


def find_inv_freq(model) -> torch.Tensor | None:
    for module in model.modules():
        inv = getattr(module, "inv_freq", None)
        if isinstance(inv, torch.Tensor) and type(module).__name__.endswith("RotaryEmbedding"):
            return inv.detach().float().cpu()
    return None


EVICTIONS = ("per_prompt", "per_call")


def _positive_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"streaming-llm: {name} must be an int ≥ {minimum}, got {value!r}")
    return value


@register_intervention
class StreamingLLM(Intervention):
    name = "streaming-llm"
    conformance = {
        "neutral": {"window": 100_000}, "active": {"num_sinks": 1, "window": 3, "evict": "per_call"},
        "not_applicable": {"generate": "a KV-cache policy: the evicting cache is the method, recomputation has none"}}
    requires = frozenset({"text_decoder", "rope"})
    description = "StreamingLLM: keep attention-sink tokens plus a recent window in the KV cache"
    exclusive = "kv-cache"

    def __init__(self, num_sinks: int = 4, window: int = 2000, evict: str = "per_prompt", reserve: int = 1000,
                 pos_shift: bool = True, **target):
        super().__init__(**target)
        if evict not in EVICTIONS:
            raise ValueError(f"streaming-llm: evict must be one of {EVICTIONS}, got {evict!r}")
        self.num_sinks = _positive_int("num_sinks", num_sinks, 0)
        self.window = _positive_int("window", window, 1)
        self.reserve = _positive_int("reserve", reserve, 0)
        self.evict, self.pos_shift = evict, bool(pos_shift)
        self._pos: torch.Tensor | None = None  # [B, L] RoPE position of each cached key
        self._real: torch.Tensor | None = None  # [B, L] real (not padding) cached keys
        self._seen: torch.Tensor | None = None  # [B] real tokens of the sequence so far (pos_shift=False positions)
        self.max_cache_seen = 0  # largest cache length left between calls (for tests / reports)

    def setup(self, model) -> None:
        """Refuse what re-rotating an evicting cache cannot handle: multi-axis or dynamic RoPE, sliding windows."""
        config = model.text_config
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        kinds = {rope.get("rope_type"), rope.get("type")} if isinstance(rope, dict) else set()
        if isinstance(rope, dict) and "mrope_section" in rope:
            kinds.add("mrope")
        if kinds & {"dynamic", "mrope"}:
            raise ValueError(f"streaming-llm: rope type {sorted(kinds & {'dynamic', 'mrope'})[0]!r} is not "
                             "supported (positions would be re-rotated along one axis only)")
        layer_types = getattr(config, "layer_types", None) or []
        if "sliding_attention" in layer_types or (not layer_types and getattr(config, "sliding_window", None)):
            raise ValueError("streaming-llm: this model has sliding-window layers, whose cache already evicts; "
                             "the sink + window policy is not supported on them")

    def install(self, handle) -> list:
        model = handle.model
        self._inv_freq = find_inv_freq(model)
        if self._inv_freq is None:
            raise ValueError(f"streaming-llm needs a RoPE model; {type(model).__name__} has no rotary embedding "
                             "(absolute/ALiBi positions: only eviction would apply, which attnkit does not offer)")
        self._handle = handle
        return [handle.hook(model, self._pre, pre=True, with_kwargs=True),
                handle.hook(model, self._post, with_kwargs=True)]

    # ---- before each call: positions = cache slots ---------------------------------------------------------------
    def _pre(self, module, args, kwargs):
        if not self._handle.active:
            return None
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            return None
        batch, new = ref.shape[0], ref.shape[1]
        cache = cache_from_kwargs(kwargs)
        past = cache_length(cache) or 0
        mask = kwargs.get("attention_mask")
        real_new = mask[:, -new:].bool().cpu() if isinstance(mask, torch.Tensor) and mask.dim() == 2 \
            else torch.ones(batch, new, dtype=torch.bool)
        if past == 0 or self._pos is None or self._pos.shape != (batch, past):
            if past != 0:
                raise ValueError(f"streaming-llm: the cache holds {past} tokens that this policy did not see; "
                                 "start a new sequence with the intervention attached")
            self._real = torch.zeros(batch, 0, dtype=torch.bool)
            self._pos = torch.zeros(batch, 0, dtype=torch.long)
            self._seen = torch.zeros(batch, dtype=torch.long)
        if self.evict == "per_prompt" and past > 0 and new > 1:  # a new prompt: make room for it and the answer
            room = max(self.window - new - self.reserve, 0)
            if past + new + self.reserve > self.num_sinks + self.window:
                self._evict(cache, keep_slots(self._real, self.num_sinks, room))
                past = cache.get_seq_length()
        # new tokens' positions: after the real tokens in the cache (slots) or in the whole sequence (original)
        start = (self._real.sum(1) if self.pos_shift else self._seen)[:, None]  # [B, 1]
        pos_new = (start + real_new.long().cumsum(1) - 1).clamp_min(0)  # [B, N]
        self._seen = self._seen + real_new.long().sum(1)
        self._real = torch.cat([self._real, real_new], 1)
        self._pos = torch.cat([self._pos, pos_new], 1)
        device = ref.device
        kwargs["position_ids"] = pos_new.to(device)
        if past > 0:
            kwargs["attention_mask"] = self._real.long().to(device)  # [B, L + N]
        if "cache_position" in kwargs:
            kwargs["cache_position"] = torch.arange(past, past + new, device=device)
        return args, kwargs

    # ---- after each call: evict and re-rotate ----------------------------------------------------------------------
    def _post(self, module, args, kwargs, output):
        cache = output_cache(output)
        if not self._handle.active or cache is None or self._pos is None:
            return None
        length = cache.get_seq_length()
        if length != self._pos.shape[1]:
            return None
        if self.evict == "per_call" and length > self.num_sinks + self.window:
            self._evict(cache, keep_slots(self._real, self.num_sinks, self.window))
        self.max_cache_seen = max(self.max_cache_seen, cache.get_seq_length())
        return None

    def _evict(self, cache, keep: torch.Tensor) -> None:
        """Keep the cache slots ``keep`` ``[B, S+W]``; with ``pos_shift`` re-rotate them to slots ``0..n−1``."""
        real = torch.gather(self._real, 1, keep)  # [B, S+W]
        old_pos = torch.gather(self._pos, 1, keep)  # [B, S+W]
        new_pos = (real.long().cumsum(1) - 1).clamp_min(0) if self.pos_shift else old_pos  # real keys at 0..n-1
        shift = torch.where(real, new_pos - old_pos, torch.zeros_like(new_pos))
        for layer in cache.layers:
            if getattr(layer, "is_sliding", False):
                raise ValueError("streaming-llm: sliding-window cache layers are not supported")
            idx = keep.to(layer.keys.device)[:, None, :, None]  # [B, 1, S+W, 1]
            keys = torch.gather(layer.keys, 2, idx.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]))
            values = torch.gather(layer.values, 2, idx.expand(-1, layer.values.shape[1], -1, layer.values.shape[3]))
            layer.keys = rerotate(keys, shift.to(keys.device), self._inv_freq) if self.pos_shift else keys
            layer.values = values
        self._real, self._pos = real, torch.where(real, new_pos, torch.zeros_like(new_pos))
