"""Prompt-to-Prompt (Hertz et al., 2022): edit an image by editing its prompt while keeping the source prompt's
cross-attention maps.

The pipeline is called with the prompts ``[source, target_1, …, target_K]`` and **one shared initial latent**
(pass ``latents=x_T.expand(K+1, …)``). In every cross-attention layer the conditional rows' probabilities
``[K+1, H, Q, T]`` (T = text tokens) are split into ``base`` (source) and ``rep`` (targets) and each target gets::

    replace   E = base · M_k           M_k[i, j]: source token i → target token j (1-to-1 for equal token counts,
                                       else 1/len(target tokens)); words must pair up one by one
    refine    E = base[:, :, map_k] · a_k + rep · (1 − a_k)   (Needleman–Wunsch alignment of the token ids;
                                       inserted target tokens, a_k = 0, keep their own attention)
    reweight  E = base · eq_k          (token columns scaled, no renormalisation; ``equalizer={word: scale}``,
                                       also applied on top of replace / refine when given with them)
    new rep = α · E + (1 − α) · rep    α[step, k, token] from ``cross_replace_steps``

``cross_replace_steps``: a float ``f`` (window (0, f)), a pair ``[a, b]``, or ``{"default_": …, word: …}`` with
per-word windows; rows ``int(a·(N+1)) ≤ step < int(b·(N+1))`` are active. ``self_replace_steps`` (window over
``int(a·N) ≤ step < int(b·N)``; default 0.4, the official notebooks' value) also copies the source's
**self**-attention probabilities into every target in layers with at most ``self_max_queries`` queries (16² in the
paper's SD-1.x setup). The unconditional rows are never edited; the step index comes from the pipeline's scheduler (a
bare denoiser counts calls, ``num_steps`` required).

LocalBlend (``blend_words``: one word or list of words per prompt, the notebook's ``LocalBlend(prompts, words)``;
``blend_threshold`` 0.3; ``blend_start`` 0 — the null-text notebook's variant starts at 0.2): after every scheduler
step the targets' latents are blended with the source's outside the region their words attend to (see
:mod:`attnkit.interventions.steering.local_blend`). With a pipeline it runs by itself (attnkit wraps
``pipe.scheduler.step`` while attached); with a bare denoiser call :meth:`PromptToPrompt.blend_latents` on the
latents after each step (e.g. from ``callback_on_step_end``).

Joint attention (SD3, Flux; METHODS.md has no reference for it — attnkit's mapping): one softmax covers the image and
text keys, so the UNet's two layers become two blocks of one row. For every image query row of a target, the
image→text block is edited exactly as a cross-attention map (``α·Edit(base, rep) + (1−α)·rep``, from the source's
image→text block), the image→image block is the source's inside the self-replace window (else the target's own), and
the image→image block is rescaled so the row sums to 1 again (its shape kept; factor clamped at 0 when a reweight
pushes the text mass above 1). Text query rows are not edited. The text columns must be the tokenizer's ``T`` tokens
(``set_prompts(prompts, tokenizer)`` with the tokenizer of the text stream; a pipeline with several text encoders,
e.g. SD3's CLIP + T5 sequence, is left unedited with a warning). Every joint block sees the same image-token grid,
so self-replace applies to all of them or none (``self_max_queries`` against the image-token count).

Deliberate differences from the reference code (see METHODS.md, "Discrepancies"): the replace mapper keeps
``M[i, j]`` after the last changed word (the reference switches to ``M[j, j]`` and misaligns later tokens when that
word changed its token count), and an equalizer with several words and different strengths works (one scale per
word, expanded to its tokens). The edit needs the probabilities, so the edited layers run on the eager backend
(``[B, H, Q, T]`` is small for cross-attention; self-replace and joint attention materialise Q×K).

Example:
    >>> import torch, attnkit
    >>> from attnkit.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> p2p = PromptToPrompt(edit="reweight", prompts=["a b", "a b"], equalizer={"b": 2.0})
    >>> x_t = torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1)
    >>> with attnkit.attach(pipe, p2p):
    ...     images = pipe(["a b", "a b"], latents=x_t, num_inference_steps=2, output_type="pt").images
    >>> images.shape
    torch.Size([2, 3, 8, 8])
"""

from __future__ import annotations

import torch

from attnkit.interventions.base import Intervention, register_intervention
from attnkit.interventions.steering._denoiser_calls import (
    WarnOnce,
    denoisers_of,
    pipeline_of,
    scheduler_step,
    timestep_of,
)
from attnkit.interventions.steering.local_blend import (
    SchedulerStepHook,
    blend_mask,
    grid_of,
    latent_grid,
    local_blend,
)
from attnkit.targets import Target, parse_layers

EDITS = ("replace", "refine", "reweight")


# ---- tokens and words ----------------------------------------------------------------------------------------------
def token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with BOS/EOS and no padding."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def word_token_spans(tokenizer, text: str) -> list[list[int]]:
    """For each space-separated word of ``text`` the positions (BOS = 0) of its tokens.

    Tokens are assigned to words by accumulating the lengths of their decoded strings.

    Example:
        >>> tok = char_tokenizer()
        >>> word_token_spans(tok, "a red cat")
        [[1], [2, 3, 4], [5, 6, 7]]
    """
    words = text.split(" ")
    ids = token_ids(tokenizer, text)[1:-1]  # without BOS/EOS
    spans: list[list[int]] = [[] for _ in words]
    word, filled = 0, 0
    for pos, tid in enumerate(ids, start=1):
        piece = tokenizer.decode([tid]).strip().strip("#")
        if word >= len(words):
            break
        spans[word].append(pos)
        filled += len(piece)
        if filled >= len(words[word]):
            word, filled = word + 1, 0
    return spans


def word_token_indices(tokenizer, text: str, word: str | int) -> list[int]:
    """Token positions of every occurrence of ``word`` (exact, case-sensitive) or of word number ``word``.

    Example:
        >>> word_token_indices(char_tokenizer(), "a cat and a cat", "cat")
        [2, 3, 4, 9, 10, 11]
    """
    spans = word_token_spans(tokenizer, text)
    if isinstance(word, int):
        return list(spans[word])
    return [p for w, span in zip(text.split(" "), spans) if w == word for p in span]


# ---- the three mappers ---------------------------------------------------------------------------------------------
def replace_mapper(tokenizer, source: str, target: str, max_len: int) -> torch.Tensor:
    """``M [T, T]`` with ``E = base @ M`` mapping source token columns onto target token columns (see module doc).

    Example:
        >>> M = replace_mapper(char_tokenizer(), "a cat eats", "a dogs eats", 12)
        >>> M[2:5, 2:6].tolist()                      # "cat" (3 tokens) → "dogs" (4 tokens): averaged
        [[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]]
        >>> int(M[5:9].argmax(1)[0]), int(M[5:9].argmax(1)[-1])   # "eats" stays aligned after it
        (6, 9)
    """
    src_words, tgt_words = source.split(" "), target.split(" ")
    if len(src_words) != len(tgt_words):
        raise ValueError(f"prompt-to-prompt replace: prompts need the same number of words ({source!r} has "
                         f"{len(src_words)}, {target!r} has {len(tgt_words)}); use edit='refine' instead")
    M = torch.zeros(max_len, max_len)  # [T_src, T_tgt]
    M[0, 0] = 1.0  # BOS
    for s_span, t_span in zip(word_token_spans(tokenizer, source), word_token_spans(tokenizer, target)):
        if len(s_span) == len(t_span):
            for i, j in zip(s_span, t_span):
                if i < max_len and j < max_len:
                    M[i, j] = 1.0
        else:
            for i in (i for i in s_span if i < max_len):
                for j in (j for j in t_span if j < max_len):
                    M[i, j] = 1.0 / len(t_span)
    s_end, t_end = len(token_ids(tokenizer, source)) - 1, len(token_ids(tokenizer, target)) - 1  # EOS positions
    for r in range(max_len - max(s_end, t_end)):  # EOS and padding keep their order
        M[s_end + r, t_end + r] = 1.0
    unmapped = M.sum(0) == 0
    M[unmapped, unmapped] = 1.0  # target columns with no source: their own index
    return M


def global_alignment(x: list[int], y: list[int]) -> list[tuple[int, int]]:
    """Needleman–Wunsch alignment (gap 0, match +1, mismatch −1; ties: left, up, diagonal).

    Returns ``(i, j)`` pairs for every position of ``y``: ``i`` the aligned index into ``x`` or −1 (inserted).

    Example:
        >>> global_alignment([0, 5, 6, 1], [0, 5, 9, 6, 1])
        [(0, 0), (1, 1), (-1, 2), (2, 3), (3, 4)]
    """
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    move = [[0] * (m + 1) for _ in range(n + 1)]  # 1 left, 2 up, 3 diagonal
    for j in range(1, m + 1):
        move[0][j] = 1
    for i in range(1, n + 1):
        move[i][0] = 2
        for j in range(1, m + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            move[i][j] = 1 if best == left else (2 if best == up else 3)
    pairs: list[tuple[int, int]] = []
    i, j = n, m
    while i > 0 or j > 0:
        if move[i][j] == 1:
            pairs.append((-1, j - 1))
            j -= 1
        elif move[i][j] == 2:
            i -= 1
        else:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
    return pairs[::-1]


def refine_mapper(tokenizer, source: str, target: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mapper [T] long, alphas [T])``: target token j reads source column ``mapper[j]`` where ``alphas[j] = 1``.

    Example:
        >>> mapper, alphas = refine_mapper(char_tokenizer(), "a cat", "a big cat", 10)
        >>> mapper.tolist(), alphas.int().tolist()
        ([0, 1, -1, -1, -1, 2, 3, 4, 5, 9], [1, 1, 0, 0, 0, 1, 1, 1, 1, 1])
    """
    x, y = token_ids(tokenizer, source), token_ids(tokenizer, target)
    mapper = torch.arange(max_len)  # positions past the target prompt map to themselves
    alphas = torch.ones(max_len)
    for i, j in global_alignment(x, y):
        if j < max_len:
            mapper[j] = i
            alphas[j] = float(i >= 0)
    return mapper, alphas


def equalizer_row(tokenizer, text: str, scales: dict, max_len: int) -> torch.Tensor:
    """``[T]`` column factors: 1 everywhere, ``scales[word]`` on every token of that word.

    Example:
        >>> equalizer_row(char_tokenizer(), "a cat on a mat", {"cat": 2.0, "mat": 0.5}, 16)[1:14].tolist()
        [1.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0]
    """
    row = torch.ones(max_len)
    for word, scale in scales.items():
        inds = [p for p in word_token_indices(tokenizer, text, word) if p < max_len]
        if not inds:
            raise ValueError(f"prompt-to-prompt: equalizer word {word!r} does not occur in {text!r}")
        row[inds] = float(scale)
    return row


# ---- schedules -------------------------------------------------------------------------------------------------
def _window(spec) -> tuple[float, float]:
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return 0.0, float(spec)
    if isinstance(spec, (list, tuple)) and len(spec) == 2:
        return float(spec[0]), float(spec[1])
    raise ValueError(f"prompt-to-prompt: a step window is a fraction f or a pair [a, b], got {spec!r}")


def cross_alpha(tokenizer, targets: list[str], spec, num_steps: int, max_len: int) -> torch.Tensor:
    """``α [N+1, K, T]``: 1 where target k's token column is replaced at step s (see module doc).

    Example:
        >>> a = cross_alpha(char_tokenizer(), ["a cat"], {"default_": 1.0, "cat": 0.4}, 10, 8)
        >>> a[:, 0, 1].sum().item(), a[:, 0, 2].sum().item()     # "a": all 11 rows; "cat": rows 0..3
        (11.0, 4.0)
    """
    spec = dict(spec) if isinstance(spec, dict) else {"default_": spec}
    rows = num_steps + 1

    def fill(window) -> torch.Tensor:
        a, b = _window(window)
        col = torch.zeros(rows)
        col[int(a * rows): int(b * rows)] = 1.0
        return col  # [N+1]

    alpha = fill(spec.pop("default_", (0.0, 1.0)))[:, None, None].repeat(1, len(targets), max_len)  # [N+1, K, T]
    for word, window in spec.items():
        for k, text in enumerate(targets):
            inds = [p for p in word_token_indices(tokenizer, text, word) if p < max_len]
            alpha[:, k, inds] = fill(window)[:, None]
    return alpha


def in_self_window(spec, step: int, num_steps: int) -> bool:
    """``int(a·N) ≤ step < int(b·N)``. Example: ``in_self_window(0.4, 19, 50)`` → True, step 20 → False."""
    a, b = _window(spec)
    return int(a * num_steps) <= step < int(b * num_steps)


def blend_word_alphas(tokenizer, prompts: list[str], words: list, max_len: int) -> torch.Tensor:
    """``[P, T]`` 0/1: the token columns of each prompt's own blend words (a word or a list per prompt).

    Example:
        >>> blend_word_alphas(char_tokenizer(), ["a cat", "a dog"], ["cat", ["dog"]], 8).int().tolist()
        [[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0]]
    """
    if len(words) != len(prompts):
        raise ValueError(f"prompt-to-prompt: blend_words needs one entry per prompt ({len(prompts)}), got {len(words)}")
    alphas = torch.zeros(len(prompts), max_len)
    for k, (text, entry) in enumerate(zip(prompts, words)):
        for word in [entry] if isinstance(entry, str) else list(entry):
            inds = [p for p in word_token_indices(tokenizer, text, word) if p < max_len]
            if not inds:
                raise ValueError(f"prompt-to-prompt: blend word {word!r} does not occur in {text!r}")
            alphas[k, inds] = 1.0
    return alphas


def char_tokenizer(max_len: int = 32):
    """A CLIP tokenizer built in memory whose tokens are single characters (``c``, ``a``, ``t</w>``): every word is
    several tokens, which is what the word/token bookkeeping needs to be tested on. Lower-case letters only.

    Example:
        >>> char_tokenizer()("a cat")["input_ids"]
        [0, 29, 5, 3, 48, 1]
    """
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<unk>": 2}
    for ch in letters:
        vocab[ch] = len(vocab)
    for ch in letters:
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_len, pad_token="<|endoftext|>",
                         unk_token="<unk>")


# ---- the intervention ------------------------------------------------------------------------------------------
@register_intervention
class PromptToPrompt(Intervention):
    name = "prompt-to-prompt"
    conformance = {
        "neutral": {"prompts": ["a photo of a cat", "a dog on the grass"], "cross_replace_steps": 0.0,
                    "self_replace_steps": 0.0},
        "active": {"prompts": ["a photo of a cat", "a dog on the grass"], "blend_words": ["cat", "dog"]},
        "families": ("sd-pipeline",), "families_reason": "needs the pipeline's tokenizer for its prompts"}
    requires = frozenset({"denoiser"})
    description = "Prompt-to-Prompt: inject the source prompt's cross-attention maps into target prompts"

    def __init__(self, edit: str = "replace", prompts: list | None = None,
                 cross_replace_steps: float | list | dict = 0.8,
                 self_replace_steps: float | list = 0.4, equalizer: dict | None = None, self_max_queries: int = 256,
                 num_steps: int | None = None, blend_words: list | None = None, blend_threshold: float = 0.3,
                 blend_start: float = 0.0, **target):
        if edit not in EDITS:
            raise ValueError(f"prompt-to-prompt: edit must be one of {EDITS}, got {edit!r}")
        if edit == "reweight" and not equalizer:
            raise ValueError("prompt-to-prompt: edit='reweight' needs equalizer={word: scale}")
        if prompts is not None and len(prompts) < 2:
            raise ValueError("prompt-to-prompt: prompts are [source, target, …]: give at least two")
        _window(self_replace_steps)
        if not isinstance(cross_replace_steps, dict):
            _window(cross_replace_steps)
        super().__init__(**target)
        self.edit, self.prompts, self.equalizer = edit, list(prompts) if prompts else None, dict(equalizer or {})
        self.cross_replace_steps, self.self_replace_steps = cross_replace_steps, self_replace_steps
        self.self_max_queries, self.num_steps = self_max_queries, num_steps
        if blend_words is not None and prompts is not None and len(blend_words) != len(prompts):
            raise ValueError(f"prompt-to-prompt: blend_words needs one entry per prompt ({len(prompts)}), "
                             f"got {len(blend_words)}")
        self.blend_words = list(blend_words) if blend_words is not None else None
        self.blend_threshold, self.blend_start = float(blend_threshold), float(blend_start)
        self._maps: dict[int, torch.Tensor] = {}  # LocalBlend: query count -> summed word maps [P, Q]
        self.last_blend_mask: torch.Tensor | None = None  # [P, 1, H, W] of the last blend
        self._tokenizer = None
        self._tables: dict = {}
        self._step: tuple[int, int] | None = None
        self._calls = 0
        self._pipe = None
        self._warn = WarnOnce()

    # ---- planning -------------------------------------------------------------------------------------------------
    def setup(self, model) -> None:
        """Target cross-attention layers, plus self-attention layers when a self-replace window is set."""
        component = model.component(self.component)
        kinds = list(component.kinds)
        self._kinds, self._names = kinds, list(component.names)
        start, stop = _window(self.self_replace_steps)
        wanted = ("cross", "joint", "self") if stop > start else ("cross", "joint")
        layers = [i for i, k in enumerate(kinds) if k in wanted]
        if self.target.layers is not None:
            explicit = set(parse_layers(self.target.layers, len(kinds)))
            layers = [i for i in layers if i in explicit]
        self.target = Target(layers=layers or [], heads=self.target.heads, modules=self.target.modules)

    def install(self, handle) -> list:
        self._pipe = pipeline_of(handle.model)
        self._calls, self._step, self._maps = 0, None, {}
        if self._tokenizer is None and self._pipe is not None:
            self._tokenizer = getattr(self._pipe, "tokenizer", None)
        if self.prompts is not None and self._tokenizer is not None:
            self.set_prompts(self.prompts)  # a bare denoiser: call set_prompts(prompts, tokenizer) after attaching
        denoisers = denoisers_of(handle.model)
        hooks = [handle.hook(d, self._locate_step, pre=True, with_kwargs=True) for d in denoisers]
        scheduler = getattr(self._pipe, "scheduler", None)
        if self.blend_words is not None and scheduler is not None:
            hooks.append(SchedulerStepHook(scheduler, self._after_step, handle))
        return hooks

    def set_prompts(self, prompts: list[str], tokenizer=None) -> None:
        """Set (or change) ``[source, target, …]`` and build the token tables; call before running the pipeline."""
        if len(prompts) < 2:
            raise ValueError("prompt-to-prompt: prompts are [source, target, …]: give at least two")
        tokenizer = tokenizer or self._tokenizer
        if tokenizer is None:
            raise ValueError("prompt-to-prompt: no tokenizer (attach to a pipeline or pass tokenizer=)")
        self._tokenizer, self.prompts = tokenizer, list(prompts)
        T = int(tokenizer.model_max_length)
        source, targets = prompts[0], list(prompts[1:])
        tables: dict = {"T": T}
        if self.edit == "replace":
            tables["M"] = torch.stack([replace_mapper(tokenizer, source, t, T) for t in targets])  # [K, T, T]
        elif self.edit == "refine":
            maps = [refine_mapper(tokenizer, source, t, T) for t in targets]
            tables["mapper"] = torch.stack([m for m, _ in maps])  # [K, T] long
            tables["a_tok"] = torch.stack([a for _, a in maps])  # [K, T]
        if self.equalizer:
            tables["eq"] = torch.stack([equalizer_row(tokenizer, t, self.equalizer, T) for t in targets])  # [K, T]
        if self.blend_words is not None:
            tables["blend"] = blend_word_alphas(tokenizer, self.prompts, self.blend_words, T)  # [P, T]
        self._tables = tables
        self._alpha_cache: dict[int, torch.Tensor] = {}

    # ---- step bookkeeping -------------------------------------------------------------------------------------------
    def _locate_step(self, module, args, kwargs):
        located = scheduler_step(self._pipe, timestep_of(args, kwargs)) if self._pipe is not None else None
        if located is None:
            if self.num_steps is None:
                self._warn("steps", "prompt-to-prompt: cannot locate the sampling step (no pipeline scheduler); "
                                    "pass num_steps= to count denoiser calls")
                located = (0, 1)
            else:
                located = (self._calls % self.num_steps, self.num_steps)
        self._calls += 1
        if located[0] == 0 and (self._step is None or self._step[0] != 0):
            self._maps = {}  # a new sampling run: LocalBlend's maps start again
        self._step = located

    def _alpha(self, num_steps: int) -> torch.Tensor:
        if num_steps not in self._alpha_cache:
            self._alpha_cache[num_steps] = cross_alpha(self._tokenizer, self.prompts[1:], self.cross_replace_steps,
                                                       num_steps, self._tables["T"])
        return self._alpha_cache[num_steps]  # [N+1, K, T]

    # ---- the edit -------------------------------------------------------------------------------------------------
    def edit_cross(self, base: torch.Tensor, rep: torch.Tensor, step: int, num_steps: int) -> torch.Tensor:
        """New target maps ``[K, H, Q, T]`` from source ``base [H, Q, T]`` and targets ``rep [K, H, Q, T]``."""
        tables = self._tables
        if self.edit == "replace":
            edited = torch.einsum("hqw,kwn->khqn", base, tables["M"].to(base))  # [K, H, Q, T]
        elif self.edit == "refine":
            gathered = base[:, :, tables["mapper"].clamp_min(0)].permute(2, 0, 1, 3)  # [K, H, Q, T]
            a_tok = tables["a_tok"].to(base)[:, None, None, :]  # [K, 1, 1, T]
            edited = gathered * a_tok + rep * (1 - a_tok)
        else:
            edited = base[None].expand_as(rep)
        if "eq" in tables:
            edited = edited * tables["eq"].to(base)[:, None, None, :]
        alpha = self._alpha(num_steps)[min(step, num_steps)].to(base)[:, None, None, :]  # [K, 1, 1, T]
        return edited * alpha + rep * (1 - alpha)

    def _cond_rows(self, batch: int) -> slice | None:
        P = len(self.prompts)
        if batch == P:
            return slice(0, P)
        if batch in (2 * P, 3 * P):  # [uncond, cond] or [uncond, cond, perturbed] (PAG)
            return slice(P, 2 * P)
        return None

    def edit_probs(self, probs, ctx):
        """probs ``[B, H, Q, K]``: edit the conditional rows of the targets; everything else untouched."""
        if not self.prompts or self._step is None:
            return probs
        if not self._tables:
            self._warn("tables", "prompt-to-prompt: no tokenizer for the prompts yet; call set_prompts(prompts, "
                                 "tokenizer) after attaching (left unedited)")
            return probs
        rows = self._cond_rows(ctx.batch)
        if rows is None:
            self._warn(("batch", ctx.batch), f"prompt-to-prompt: batch {ctx.batch} does not fit {len(self.prompts)} "
                                             "prompts ([uncond ×P, cond ×P]); left unedited (num_images_per_prompt "
                                             "must be 1)")
            return probs
        kind = self._kinds[ctx.layer]
        if kind == "joint":
            return self._edit_joint(probs, ctx, rows)
        step, num_steps = self._step
        block = probs[rows]  # [P, H, Q, K]
        if kind == "cross":
            if ctx.k_len != self._tables["T"]:
                self._warn(("T", ctx.layer), f"prompt-to-prompt: layer {ctx.layer} has {ctx.k_len} text keys, the "
                                             f"tokenizer pads to {self._tables['T']}; left unedited")
                return probs
            new = self.edit_cross(block[0], block[1:], step, num_steps)  # [K, H, Q, T]
            self._collect(torch.cat([block[:1], new]), ctx)
        elif ctx.q_len <= self.self_max_queries and in_self_window(self.self_replace_steps, step, num_steps):
            new = block[:1].expand_as(block[1:])  # [K, H, Q, Q]: the source's self-attention
        else:
            return probs
        out = probs.clone()
        out[rows.start + 1: rows.stop] = new
        return out

    def _edit_joint(self, probs, ctx, rows: slice) -> torch.Tensor:
        """Joint attention (SD3/Flux): edit the image rows' image→text block as a cross-attention map and copy the
        source's image→image block in the self-replace window; the image block is rescaled to keep rows at 1."""
        text = ctx.key_mask("text")[0]  # [K] (the same labels for every sample of a call)
        if ctx.q_len != ctx.k_len or int(text.sum()) != self._tables["T"]:
            self._warn(("T", ctx.layer), f"prompt-to-prompt: joint layer {ctx.layer} has {int(text.sum())} text keys, "
                                         f"the tokenizer gives {self._tables['T']}; left unedited")
            return probs
        step, num_steps = self._step
        tt, ii = text.nonzero().flatten(), (~text).nonzero().flatten()  # text / image key (and query) indices
        block = probs[rows][:, :, ii]  # [P, H, Qi, N]: image query rows
        base_t, rep_t = block[0][..., tt], block[1:][..., tt]  # [H, Qi, T], [K, H, Qi, T]
        new_t = self.edit_cross(base_t, rep_t, step, num_steps)  # [K, H, Qi, T]
        self._collect(torch.cat([base_t[None], new_t]), ctx)
        if len(ii) <= self.self_max_queries and in_self_window(self.self_replace_steps, step, num_steps):
            img = block[:1][..., ii].expand(rows.stop - rows.start - 1, -1, -1, -1)  # [K, H, Qi, Qi] the source's
        else:
            img = block[1:][..., ii]  # the targets' own
        room = (1.0 - new_t.sum(-1, keepdim=True)).clamp_min(0.0)  # [K, H, Qi, 1] what the text block leaves
        img = img * room / img.sum(-1, keepdim=True).clamp_min(1e-30)
        new_rows = block[1:].clone()  # [K, H, Qi, N]
        new_rows[..., ii] = img
        new_rows[..., tt] = new_t
        out = probs.clone()
        target = out[rows.start + 1: rows.stop]  # [K, H, N, N] (a view)
        target[:, :, ii] = new_rows
        return out

    # ---- LocalBlend ------------------------------------------------------------------------------------------------
    def _collect(self, cond: torch.Tensor, ctx) -> None:
        """Add this layer's word maps (cond cross maps ``[P, H, Q, T]`` after the edit) to LocalBlend's store."""
        if "blend" not in self._tables or "mid_block" in self._names[ctx.layer]:
            return
        alphas = self._tables["blend"].to(cond)  # [P, T]
        maps = (cond.float() * alphas[:, None, None, :]).sum(-1).sum(1)  # [P, Q]: words, then heads
        q = maps.shape[-1]
        self._maps[q] = maps.detach().cpu() + self._maps.get(q, 0)

    def blend_latents(self, latents: torch.Tensor, step: int | None = None, num_steps: int | None = None):
        """LocalBlend on the latents after a scheduler step (``[P, C, H, W]``, or packed ``[P, H·W, C]``): targets
        keep their own content only inside their blend mask. Runs by itself with a pipeline; call it yourself with
        a bare denoiser. Returns the latents unchanged before ``blend_start`` or without maps."""
        if "blend" not in self._tables or not self._maps:
            return latents
        step, num_steps = (step, num_steps) if step is not None else (self._step or (0, 1))
        if step < int(self.blend_start * num_steps) or latents.shape[0] != len(self.prompts):
            return latents
        hw = latent_grid(latents)
        if hw is None:
            self._warn("grid", "prompt-to-prompt: LocalBlend cannot tell the latents' grid (packed, not square); "
                               "left unblended")
            return latents
        queries, grid = self._blend_layers(hw)
        if grid is None:
            self._warn("grid", f"prompt-to-prompt: no cross-attention map matches the {hw} latent; left unblended")
            return latents
        self.last_blend_mask = blend_mask(self._maps[queries], grid, hw, self.blend_threshold)  # [P, 1, H, W]
        return local_blend(latents, self.last_blend_mask.to(latents.device))

    def _blend_layers(self, hw: tuple[int, int]) -> tuple[int | None, tuple[int, int] | None]:
        """The query count whose maps LocalBlend uses: the latent/4 grid when stored, else the coarsest one."""
        fits = {q: grid_of(q, hw) for q in self._maps}
        fits = {q: g for q, g in fits.items() if g is not None}
        if not fits:
            return None, None
        wanted = (hw[0] // 4) * (hw[1] // 4)
        q = wanted if wanted in fits else min(fits)
        return q, fits[q]

    def _after_step(self, latents: torch.Tensor, timestep) -> torch.Tensor:
        return self.blend_latents(latents)
