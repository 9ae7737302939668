"""An independent, fully materialised fp64 reference for the kernel tests (plain softmax on [B,H,Q,K])."""

import torch


def allowed(B, Q, K, *, causal=True, key_padding=None, window=None, num_sinks=0):
    """[B,Q,K] bool mask built with explicit loops over the definition (slow, obviously right)."""
    ok = torch.ones(B, Q, K, dtype=torch.bool)
    for b in range(B):
        real = [j for j in range(K) if key_padding is None or bool(key_padding[b, j])]
        sinks = set(real[:num_sinks])
        for i in range(Q):
            pos = K - Q + i
            for j in range(K):
                good = j in real
                if causal and j > pos:
                    good = False
                if window is not None and not (pos - j < window or j in sinks):
                    good = False
                ok[b, i, j] = good
    return ok


def scores(q, k, scale, bias_per_key=None):
    """fp64 scores [B,H,Q,K]; k repeated for GQA here only."""
    H, Hkv = q.shape[1], k.shape[1]
    kk = k.double().repeat_interleave(H // Hkv, dim=1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    if bias_per_key is not None:
        s = s + bias_per_key.double()[:, :, None, :]
    return s


def softmax_masked(s, ok):
    """Row softmax with rows that have no allowed key set to 0; also returns the row lse (-inf when empty)."""
    s = s.masked_fill(~ok[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.nan_to_num(p, nan=0.0), lse


def group_partials(q, k, v, key_group, G, scale, **mask_kw):
    B, H, Q, D = q.shape
    K = k.shape[2]
    ok = allowed(B, Q, K, **mask_kw)
    s = scores(q, k, scale)
    vv = v.double().repeat_interleave(H // k.shape[1], dim=1)
    outs, lses = [], []
    for g in range(G):
        p, lse = softmax_masked(s, ok & (key_group == g)[:, None, :])
        outs.append(p @ vv)
        lses.append(lse)
    return torch.stack(outs, 3), torch.stack(lses, 3)


def attention(q, k, v, scale, bias_per_key=None, **mask_kw):
    B, H, Q, D = q.shape
    K = k.shape[2]
    p, _ = softmax_masked(scores(q, k, scale, bias_per_key), allowed(B, Q, K, **mask_kw))
    return p @ v.double().repeat_interleave(H // k.shape[1], dim=1)


def probs(q, k, scale, **mask_kw):
    B, H, Q, D = q.shape
    p, _ = softmax_masked(scores(q, k, scale), allowed(B, Q, k.shape[2], **mask_kw))
    return p


def rel_err(a, b):
    """max |a - b| / max |b| over finite entries (both must be finite in the same places)."""
    a, b = a.double(), b.double()
    assert torch.equal(torch.isfinite(a), torch.isfinite(b)), "finite/-inf pattern differs"
    fin = torch.isfinite(b)
    if not fin.any():
        return 0.0
    return float((a[fin] - b[fin]).abs().max() / b[fin].abs().max().clamp_min(1e-12))
