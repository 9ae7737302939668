"""Literal reference implementations of the decode-time KV methods, independent of attnkit's hooks and backends.

Each ``*_ref(...)`` returns an attention function for transformers' ``AttentionInterface`` that applies one method's
rule straight from METHODS-2.md, on one sample without padding (a call is a prefill when it has as many queries as
keys). :func:`reference_run` runs ``generate`` on a copy of a model through that function; with ``raw_rope=True`` the
model's own RoPE is switched off, the function receives **un-rotated** q/k and rotates them itself at the positions
the method wants (compacted positions), using the model's rotary-embedding module — not :mod:`attnkit.rope`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from unittest import mock

import torch
import transformers
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as _hf_apply_rope  # before any patch

_COUNTER = itertools.count()
NEG = float("-inf")


def expand(x, heads):
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def reference_run(model, ids, fn, new_tokens: int, raw_rope: bool = False):
    """``(logits [steps, B, V], sequences)`` of greedy generation through the attention function ``fn``."""
    ref = copy.deepcopy(model)
    name = f"attnkit_test_ref_{next(_COUNTER)}"
    transformers.AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    ref.set_attn_implementation(name)
    module = type(ref.model.layers[0].self_attn).__module__
    patcher = mock.patch(f"{module}.apply_rotary_pos_emb", lambda q, k, cos, sin, *a, **kw: (q, k)) if raw_rope \
        else contextlib.nullcontext()
    with patcher, torch.no_grad():
        out = ref.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    return torch.stack(out.logits), out.sequences


def attnkit_run(model, ids, intervention, new_tokens: int, backend: str = "auto", attention_mask=None):
    import attnkit

    with attnkit.attach(model, [intervention], backend=backend), torch.no_grad():
        out = model.generate(ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    return torch.stack(out.logits), out.sequences


def _attend(q, k, v, allowed, scaling):
    """q [1,H,Q,D], k/v [1,H,K,D], allowed [.., Q, K] → [1, Q, H, D] (transformers' layout)."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scaling
    p = torch.softmax(s.masked_fill(~allowed, NEG), -1)
    return (p @ v.float()).to(q.dtype).transpose(1, 2)


def _causal(Q, K):
    return torch.arange(K)[None] <= torch.arange(K - Q, K)[:, None]  # [Q, K]


def rope(model_rotary, x, positions):
    """Rotate raw ``x [1, H, N, D]`` at ``positions [N]`` with the model's own rotary module and formula."""
    cos, sin = model_rotary(x, positions.view(1, -1))
    return _hf_apply_rope(x, x, cos, sin)[0]


# ---- TidalDecode --------------------------------------------------------------------------------------------------
def tidal_ref(top_k, start, correction):
    state = {}

    def fn(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        H, Q, K = q.shape[1], q.shape[2], k.shape[2]
        k, v = expand(k, H), expand(v, H)
        allowed = _causal(Q, K).expand(1, H, Q, K).clone()
        layer = module.layer_idx
        if Q < K and layer >= start:
            s = (q @ k.transpose(-1, -2)) * scaling
            if layer in (start, correction):
                state["sel"] = s.masked_fill(~allowed, NEG).topk(min(top_k, K), -1).indices
            else:
                keep = torch.zeros_like(allowed).scatter_(-1, state["sel"], True)
                allowed &= keep
        return _attend(q, k, v, allowed, scaling), None

    return fn


# ---- Recycled -----------------------------------------------------------------------------------------------------
def recycled_ref(budget, stride, similarity, kernel, group):
    state = {}

    def rebuild(st, q_row, k, scaling, K):
        attn = torch.softmax((q_row @ k.transpose(-1, -2))[0, :, 0] * scaling, -1)  # [H, K]
        if kernel > 1:
            attn = torch.nn.functional.max_pool1d(attn[:, None], kernel, 1, kernel // 2)[:, 0]
        per_kv = attn.view(-1, group, K).amax(1)  # [Hkv, K]
        st["cache"] = [list(reversed(row.topk(min(budget, K)).indices.tolist())) for row in per_kv]
        st["qbar"] = q_row[0, :, 0].mean(0)

    def fn(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        H, Q, K = q.shape[1], q.shape[2], k.shape[2]
        kx, vx = expand(k, H), expand(v, H)
        st = state.setdefault(module.layer_idx, {})
        allowed = _causal(Q, K).expand(1, H, Q, K).clone()
        if Q == K:
            st["t"] = 0
            rebuild(st, q[:, :, -1:], kx, scaling, K)
            return _attend(q, kx, vx, allowed, scaling), None
        st["t"] += 1
        full = st["t"] % stride == 0 and float(torch.nn.functional.cosine_similarity(
            q[0, :, 0].mean(0), st["qbar"], dim=0)) < similarity
        if full:
            out = _attend(q, kx, vx, allowed, scaling)
            rebuild(st, q, kx, scaling, K)
            return out, None
        keep = torch.zeros(1, H, 1, K, dtype=torch.bool)
        for h in range(H):
            keep[0, h, 0, st["cache"][h // group] + [K - 1]] = True
        st["cache"] = [c[1:] + [K - 1] for c in st["cache"]]
        return _attend(q, kx, vx, keep, scaling), None

    return fn


# ---- TokenSelect (raw RoPE) ----------------------------------------------------------------------------------------
def token_select_ref(rotary, n_init, n_local, top_k, chunk):
    def fn(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        H, Q, K = q.shape[1], q.shape[2], k.shape[2]
        kx, vx = expand(k, H), expand(v, H)
        outs = []
        for c0 in range(K - Q, K, chunk):
            c1 = min(K, c0 + chunk)
            rows = torch.arange(c0, c1)
            qc = q[:, :, c0 - (K - Q): c1 - (K - Q)]
            n = c1
            if n_init + top_k + n_local >= n:
                qr, kr = rope(rotary, qc, rows), rope(rotary, kx[:, :, :n], torch.arange(n))
                outs.append(_attend(qr, kr, vx[:, :, :n], _causal(len(rows), n), scaling))
                continue
            fp = rope(rotary, qc, torch.arange(n_local, n_local + len(rows))).mean(2)[0]  # [H, D]
            cand = torch.arange(n_init, n - n_local)
            scores = torch.stack([fp[h] @ kx[0, h, cand].T for h in range(H)])  # [H, C]
            votes = torch.softmax(scores, -1).sum(0)
            chosen = cand[votes.topk(top_k).indices.sort().values]
            kept = torch.cat([torch.arange(n_init), chosen, torch.arange(n - n_local, n)])
            S = len(kept)
            kr = rope(rotary, kx[:, :, kept], torch.arange(S))
            qr = rope(rotary, qc, torch.arange(S - len(rows), S))
            outs.append(_attend(qr, kr, vx[:, :, kept], _causal(len(rows), S), scaling))
        return torch.cat(outs, 1), None

    return fn


# ---- LongHeads (raw RoPE) -------------------------------------------------------------------------------------------
def long_heads_ref(rotary, w, k_c):
    state = {}

    def summary(qc, kc, vc, scaling):  # raw [H, w, D]
        local = torch.arange(w)
        ql, kl = rope(rotary, qc[None], local)[0], rope(rotary, kc[None], local)[0]
        p = torch.softmax(ql @ kl.transpose(-1, -2) * scaling, -1)
        vbar = (p @ vc).mean(1)  # [H, D]
        a = torch.softmax(torch.einsum("hd,hjd->hj", vbar, kl) * scaling, -1)
        return torch.einsum("hj,hjd->hd", a, kl)

    def fn(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        H, Q, K = q.shape[1], q.shape[2], k.shape[2]
        kx, vx = expand(k, H), expand(v, H)
        st = state.setdefault(module.layer_idx, {})
        if Q == K:
            st["queries"] = q[0]  # raw [H, K, D]
            out = _attend(rope(rotary, q, torch.arange(K)), rope(rotary, kx, torch.arange(K)), vx, _causal(K, K),
                          scaling)
            return out, None
        st["queries"] = torch.cat([st["queries"], q[0]], 1)
        n = K
        g, rest = divmod(n, w)
        if g <= k_c - 1:
            return _attend(rope(rotary, q, torch.tensor([K - 1])), rope(rotary, kx, torch.arange(K)), vx,
                           torch.ones(1, K, dtype=torch.bool), scaling), None
        outs = []
        for h in range(H):
            summ = torch.stack([summary(st["queries"][h:h + 1, c * w:(c + 1) * w], kx[0, h:h + 1, c * w:(c + 1) * w],
                                        vx[0, h:h + 1, c * w:(c + 1) * w], scaling)[0] for c in range(1, g - 1)])
            middle = (summ @ q[0, h, 0]).topk(k_c - 3).indices + 1
            chunks = sorted(middle.tolist() + [0, g - 1] + ([g] if rest else []))
            kept = torch.cat([torch.arange(c * w, min((c + 1) * w, n)) for c in chunks])
            S = len(kept)
            kr = rope(rotary, kx[:, h:h + 1, kept], torch.arange(S))
            qr = rope(rotary, q[:, h:h + 1], torch.tensor([S - 1]))
            outs.append(_attend(qr, kr, vx[:, h:h + 1, kept], torch.ones(1, S, dtype=torch.bool), scaling))
        return torch.cat(outs, 2), None

    return fn


# ---- RazorAttention -----------------------------------------------------------------------------------------------
def razor_ref(retrieval_kv, group, sinks, capacity, count=False):
    state = {}

    def fn(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        H, Q, K = q.shape[1], q.shape[2], k.shape[2]
        kx, vx = expand(k, H), expand(v, H)
        layer = module.layer_idx
        if Q == K:
            state[layer] = K
            return _attend(q, kx, vx, _causal(Q, K), scaling), None
        n0 = state[layer]
        outs = []
        for h in range(H):
            if h // group in retrieval_kv.get(layer, ()) or n0 <= capacity:
                outs.append(_attend(q[:, h:h + 1], kx[:, h:h + 1], vx[:, h:h + 1], torch.ones(1, K, dtype=torch.bool),
                                    scaling))
                continue
            recent = capacity - sinks - 1
            folded = list(range(sinks, n0 - recent))
            kept = list(range(sinks)) + list(range(n0 - recent, K))
            keys = torch.cat([kx[0, h, kept], kx[0, h, folded].mean(0, keepdim=True)])
            vals = torch.cat([vx[0, h, kept], vx[0, h, folded].mean(0, keepdim=True)])
            s = keys @ q[0, h, 0] * scaling
            if count:
                s[-1] += torch.log(torch.tensor(float(len(folded))))
            outs.append((torch.softmax(s, 0) @ vals).view(1, 1, 1, -1))
        return torch.cat(outs, 2), None

    return fn


# ---- DuoAttention (deployment) --------------------------------------------------------------------------------------
def duo_ref(full_kv, group, sinks, recent):
    def fn(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        H, Q, K = q.shape[1], q.shape[2], k.shape[2]
        kx, vx = expand(k, H), expand(v, H)
        allowed = _causal(Q, K).expand(1, H, Q, K).clone()
        if Q < K:  # decode: streaming heads see sinks + the `recent` tokens before this one + itself
            for h in range(H):
                if h // group not in full_kv.get(module.layer_idx, ()):
                    keep = torch.zeros(K, dtype=torch.bool)
                    keep[:sinks] = True
                    keep[max(0, K - 1 - recent):] = True
                    allowed[0, h] &= keep
        return _attend(q, kx, vx, allowed, scaling), None

    return fn
