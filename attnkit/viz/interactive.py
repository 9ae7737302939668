"""An interactive attention view for notebooks: hover (or click) a token to see its captured attention row.

:func:`attention_view` turns a :class:`~attnkit.capture.Capture` into an :class:`AttentionView`: a self-contained
HTML + JavaScript page (no external URL, no widget library) that Jupyter displays through ``_repr_html_`` and
``.save(path)`` writes as a standalone ``.html`` file. It shows only what was captured — one row per captured
query, ``[B, H_sel, R, K]`` per layer and call — and never computes full maps itself: with ``queries="last"``
only the last token can be selected, and the view says so.

Three modes, chosen from the capture and the arguments:

* ``"text"``: a token strip; the selected query's row colours the keys it attends to. Layers and heads (or their
  mean) are selectable. Rows of a ``generate`` call (prefill, then one query per decoding step) are placed at their
  positions in the growing sequence.
* ``"image"`` (``image=`` and ``image_tokens=`` given, e.g. an LVLM): the same strip with the image block collapsed
  into one chip, and the row restricted to the image tokens, reshaped to the patch ``grid`` and drawn over the image.
* ``"cross"`` (the capture holds diffusers cross-attention records): hover a prompt token to see its column over
  the latent positions, reshaped to the latent grid, for a selected layer, step (or the mean of steps) and head.

The attention values are embedded as base64 float16 (about 2.7 characters per value); causal rows are stored
without their trailing zeros. ``AttentionView.nbytes`` is the size of that embedded data.

Example:
    >>> import attnkit, torch
    >>> from attnkit.testing import tiny_causal_lm
    >>> from attnkit.viz import attention_view
    >>> model = tiny_causal_lm("llama")
    >>> with attnkit.attach(model, []) as handle, handle.capture(queries="last") as cap:
    ...     _ = model(torch.tensor([[5, 6, 7, 8]]))
    >>> view = attention_view(cap, tokens=["a", "b", "c", "d"])
    >>> view.mode, view.query_positions
    ('text', [3])
    >>> "http://" in view.html() or "https://" in view.html()
    False
"""

from __future__ import annotations

import base64
import html as html_lib
import io
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._view_assets import SCRIPT, STYLE

MODES = ("text", "image", "cross")
#: colour maps embedded in the page: token strips (light to dark) and spatial maps (drawn over pictures)
STRIP_CMAP, MAP_CMAP = "Blues", "inferno"
MAX_IMAGE_SIDE = 384  # the picture is downscaled to at most this many pixels per side before it is embedded


@dataclass
class AttentionView:
    """A built view: ``payload`` is what the page embeds (JSON-able); display it in Jupyter or ``save`` it.

    Attributes:
        payload: the embedded data (mode, labels, layers, heads, base64 float16 rows, picture, notes).
        nbytes: characters of embedded attention data (the base64 strings), the part that grows with the capture.
    """

    payload: dict
    nbytes: int = field(default=0)

    @property
    def mode(self) -> str:
        return self.payload["mode"]

    @property
    def query_positions(self) -> list[int]:
        """Token positions whose rows can be selected (text / image mode), over all embedded layers."""
        return sorted({p for lay in self.payload["layers"] for p in lay.get("positions", [])})

    def fragment(self) -> str:
        """The HTML of the view as a fragment (a ``<div>`` and its scripts) for embedding in a page or notebook."""
        uid = "attnkit-view-" + uuid.uuid4().hex[:12]
        data = json.dumps(self.payload, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")
        return (
            f'<div class="attnkit-view" id="{uid}">'
            '<p class="akv-fallback">attnkit attention view: this output needs JavaScript '
            "(in Jupyter: trust the notebook, or run the cell again).</p></div>\n"
            f"<style>{STYLE}</style>\n"
            f'<script type="application/json" id="{uid}-data">{data}</script>\n'
            f"<script>{SCRIPT}\n"
            f'attnkitView.mount(document.getElementById("{uid}"), '
            f'JSON.parse(document.getElementById("{uid}-data").textContent));</script>'
        )

    def html(self) -> str:
        """A standalone HTML document (works offline: everything, the picture included, is inline)."""
        title = html_lib.escape(self.payload.get("title") or "attention view")
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>\n'
                f"<body>\n{self.fragment()}\n</body></html>\n")

    def _repr_html_(self) -> str:
        return self.fragment()

    def save(self, path: str | Path) -> Path:
        """Write the standalone page to ``path`` (parent folders created) and return the path.

        Example:
            >>> import tempfile
            >>> view = AttentionView({"mode": "text", "title": "demo", "layers": []})
            >>> view.save(tempfile.mkdtemp() + "/views/demo.html").read_text().startswith("<!DOCTYPE html>")
            True
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.html(), encoding="utf-8")
        return path

    def __repr__(self) -> str:
        n_layers = len(self.payload.get("layers", []))
        return (f"AttentionView(mode={self.mode!r}, layers={n_layers}, heads={len(self.payload.get('heads', []))}, "
                f"embedded={self.nbytes / 1024:.1f} KiB)")


def attention_view(
    capture: Any,
    tokens: Sequence[Any] | None = None,
    *,
    image: Any = None,
    image_tokens: Any = None,
    grid: tuple[int, int] | dict[int, tuple[int, int]] | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    sample: int = 0,
    forward: int = -1,
    calls: Sequence[int] | None = None,
    token_indices: Sequence[int] | None = None,
    title: str | None = None,
    max_mb: float = 20.0,
) -> AttentionView:
    """Build an interactive view of the rows in ``capture`` (a Capture, or a list of its records).

    Args:
        capture: what ``handle.capture(...)`` returned (or ``capture.records``).
        tokens: labels of the key sequence (e.g. ``viz.token_labels(tokenizer, ids)``); in ``"cross"`` mode the
            prompt tokens (keys). Default: positions as numbers.
        image: the picture (PIL image, array, tensor) under the patch grid (LVLM) or latent grid (diffusion).
        image_tokens: where the image tokens are among the keys: ``(start, end)``, a bool mask ``[N]`` or ``[B, N]``
            (e.g. ``input_ids == config.image_token_id``), or a list of positions. Selects the ``"image"`` mode.
        grid: ``(h, w)`` of the patch grid (image mode) or of the full-resolution latent (cross mode; layers at a
            lower resolution use it divided by 2, 4, …), or ``{layer: (h, w)}``. Inferred when square.
        layers, heads: which captured layers and (model) heads to embed (default all captured).
        sample: the batch row to show. With classifier-free guidance the conditional rows come second: ``sample=1``.
        forward: which forward pass of the capture to show when it holds several (a prefill and the decoding
            steps after it, or one pipeline call; see :func:`forward_passes`): default the last one.
        calls: which calls of that pass (``record.call``: forward index, or denoising step) to embed (default all).
        token_indices: cross mode: which prompt tokens get a chip (e.g. skip the padding after ``<|endoftext|>``).
        title: shown above the view.
        max_mb: refuse to embed more than this many megabytes of attention data (choose layers, heads or calls).

    Example:
        >>> import attnkit, torch
        >>> from attnkit.testing import tiny_causal_lm
        >>> model = tiny_causal_lm("llama")
        >>> with attnkit.attach(model, []) as handle, handle.capture(queries="all", heads=[0, 2]) as cap:
        ...     _ = model(torch.tensor([[5, 6, 7]]))
        >>> view = attention_view(cap, tokens=["x", "y", "z"], layers=[1])
        >>> view.query_positions, view.payload["heads"]
        ([0, 1, 2], [0, 2])
    """
    records = list(getattr(capture, "records", capture))
    spec = getattr(capture, "queries", None)
    head_ids = list(getattr(capture, "heads", None) or [])
    if not records:
        raise ValueError("the capture holds no records: run the model inside `with handle.capture(...)` first")
    mode = _mode({r.kind for r in records}, image, image_tokens)
    records = [r for r in records if r.kind == ("cross" if mode == "cross" else "self")]
    n_heads = int(records[0].probs.shape[1])
    head_ids = head_ids or list(range(n_heads))
    head_pick = _pick_heads(head_ids, heads)
    records = _pick_layers(records, layers)
    _check_sample(records, sample)
    records, note = _pick_pass(records, forward, calls, growing_keys=mode != "cross")
    _check_size(records, len(head_pick), max_mb)

    if mode == "cross":
        payload = _cross_payload(records, spec, tokens, grid, head_pick, sample, token_indices)
    else:
        payload = _self_payload(records, spec, tokens, head_pick, sample)
        if mode == "image":
            payload["image"] = _image_block(image, image_tokens, grid, sample, payload["n_keys"])
    payload.update(mode=mode, note=note, title=title or _default_title(mode), heads=[head_ids[i] for i in head_pick],
                   strip_lut=_lut(STRIP_CMAP), map_lut=_lut(MAP_CMAP), queries=_spec_text(spec))
    if image is not None and mode == "cross":
        payload["image"] = _picture(image)
    nbytes = sum(len(d) for lay in payload["layers"] for d in _blobs(lay))
    _refuse_size(nbytes, max_mb)
    return AttentionView(payload, nbytes)


def _mode(kinds: set, image: Any, image_tokens: Any) -> str:
    """"cross" for diffusers cross-attention, "image" when the image tokens are given, else "text"."""
    if "cross" in kinds:
        if image_tokens is not None:
            raise ValueError("image_tokens= is for self-attention captures (LVLMs); a cross-attention view draws each "
                             "prompt token's map on the latent grid: pass grid= (and image= to draw it over the image)")
        return "cross"
    if not kinds <= {"self"}:
        raise ValueError(f"attention_view shows self- and cross-attention records; this capture holds {sorted(kinds)} "
                         "(joint attention of SD3 / Flux is not supported yet)")
    if image_tokens is not None and image is None:
        raise ValueError("image_tokens= was given without image=: pass the picture the image tokens come from")
    if image is not None and image_tokens is None:
        raise ValueError("image= needs image_tokens= (the image tokens' (start, end), mask or positions) for a "
                         "self-attention capture")
    return "image" if image_tokens is not None else "text"


def _check_size(records: list, n_heads: int, max_mb: float) -> None:
    """Refuse before encoding when the rows cannot fit ``max_mb`` (2 bytes a value, x 4/3 in base64; dropping the
    trailing zeros of causal rows at most halves them)."""
    values = sum(n_heads * rec.probs.shape[2] * rec.probs.shape[3] for rec in records)
    _refuse_size(values * 2 * 4 / 3 / 2, max_mb, "at least ")


def _refuse_size(nbytes: float, max_mb: float, bound: str = "") -> None:
    if nbytes > max_mb * 1e6:
        raise ValueError(f"the view would embed {bound}{nbytes / 1e6:.2f} MB of attention data (max_mb={max_mb:g}): "
                         "choose fewer layers=, heads= or calls=, or capture fewer query rows")


# ---- encoding ---------------------------------------------------------------------------------------------------
def encode_f16(values: Any) -> str:
    """Base64 of ``values`` as little-endian float16 (C order), the format the page decodes.

    Example:
        >>> import numpy as np
        >>> encode_f16(np.array([1.0, 0.5]))
        'ADwAOA=='
    """
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f2").tobytes()).decode("ascii")


def _blobs(layer_entry: dict) -> list[str]:
    data = layer_entry.get("data", [])
    return [data] if isinstance(data, str) else list(data)


def _lut(name: str, n: int = 64) -> list[str]:
    """``n`` hex colours sampled from a matplotlib colour map (embedded so the page needs nothing external)."""
    import matplotlib
    from matplotlib.colors import to_hex

    cmap = matplotlib.colormaps[name]
    return [to_hex(cmap(i / (n - 1))) for i in range(n)]


def _picture(image: Any) -> dict:
    """The picture as an inline PNG ``{"src": data URL, "size": [width, height]}``, downscaled to MAX_IMAGE_SIDE."""
    from PIL import Image

    from .overlay import as_image

    arr = (as_image(image) * 255).round().astype(np.uint8)
    picture = Image.fromarray(arr)
    scale = MAX_IMAGE_SIDE / max(picture.size)
    if scale < 1:
        picture = picture.resize((max(1, round(picture.size[0] * scale)), max(1, round(picture.size[1] * scale))),
                                 Image.BICUBIC)
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=True)
    return {"src": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"),
            "size": list(picture.size)}


# ---- selection --------------------------------------------------------------------------------------------------
def _pick_heads(head_ids: list[int], heads: Sequence[int] | None) -> list[int]:
    """Indices (into the captured head axis) of the requested model heads."""
    if heads is None:
        return list(range(len(head_ids)))
    heads = [heads] if isinstance(heads, int) else list(heads)
    missing = [h for h in heads if h not in head_ids]
    if missing:
        raise ValueError(f"heads {missing} were not captured (captured heads: {head_ids}); capture them with "
                         "handle.capture(heads=...)")
    return [head_ids.index(h) for h in heads]


def _pick_layers(records: list, layers: Sequence[int] | None) -> list:
    if layers is None:
        return records
    layers = [layers] if isinstance(layers, int) else list(layers)
    captured = sorted({r.layer for r in records})
    missing = [layer for layer in layers if layer not in captured]
    if missing:
        raise ValueError(f"layers {missing} were not captured (captured layers: {captured})")
    return [r for r in records if r.layer in layers]


def _pick_pass(records: list, forward: int, calls: Sequence[int] | None, growing_keys: bool) -> tuple[list, str]:
    """The records of one forward pass (and of the chosen calls in it), and a note for the view."""
    passes = forward_passes(records, growing_keys)
    if not -len(passes) <= forward < len(passes):
        raise ValueError(f"forward={forward} is out of range: the capture holds {len(passes)} forward passes")
    chosen = passes[forward]
    note = (f"showing forward pass {forward % len(passes)} of the {len(passes)} in this capture (choose with forward=)"
            if len(passes) > 1 else "")
    if calls is not None:
        have = sorted({r.call for r in chosen})
        missing = [c for c in calls if c not in have]
        if missing:
            raise ValueError(f"calls {missing} are not in the chosen forward pass (its calls: {have})")
        chosen = [r for r in chosen if r.call in calls]
    return chosen, note


def _check_sample(records: list, sample: int) -> None:
    batch = int(records[0].probs.shape[0])
    if not -batch <= sample < batch:
        raise ValueError(f"sample={sample} is out of range: the captured batch has {batch} rows")


def _spec_text(spec: Any) -> str:
    return spec if isinstance(spec, str) else "a selection" if spec is not None else "unknown"


def _default_title(mode: str) -> str:
    return {"text": "attention: hover a token to see its row",
            "image": "attention over the image: hover a token to see its row",
            "cross": "cross-attention: hover a prompt token to see its map"}[mode]


def _labels(tokens: Sequence[Any] | None, n: int, what: str) -> list[str]:
    if tokens is None:
        return [str(i) for i in range(n)]
    labels = [str(t) for t in (tokens.tolist() if hasattr(tokens, "tolist") else tokens)]
    if len(labels) < n:
        raise ValueError(f"tokens has {len(labels)} labels but {what} has {n}: pass one label per key")
    return labels


# ---- text and image mode: rows placed at their positions -------------------------------------------------------
def forward_passes(records: list, growing_keys: bool = True) -> list[list]:
    """Split records (in the order they were captured) into forward passes: a prefill and the decoding steps after
    it, or one pipeline call. A record starts a new pass when its layer was already seen at a later call (the call
    counter restarts at every prefill and pipeline call) or, with ``growing_keys`` (language models: a decoding
    step adds keys to the cache and increments the call), at the same call or with no more keys than before.

    Example:
        >>> from attnkit.capture import CaptureRecord
        >>> import torch
        >>> recs = [CaptureRecord(0, c, torch.zeros(1, 1, 1, k)) for c, k in [(1, 6), (2, 7), (3, 8), (1, 5)]]
        >>> [[r.call for r in p] for p in forward_passes(recs)]
        [[1, 2, 3], [1]]
    """
    passes: list[list] = []
    seen: dict[int, tuple[int, int]] = {}  # layer -> (call, keys) of its latest record in the current pass
    for rec in records:
        keys = int(rec.probs.shape[-1])
        previous = seen.get(rec.layer)
        restart = previous is not None and (rec.call < previous[0] or (
            growing_keys and (rec.call == previous[0] or keys <= previous[1])))
        if not passes or restart:
            passes.append([])
            seen = {}
        passes[-1].append(rec)
        seen[rec.layer] = (rec.call, keys)
    return passes


def _query_count(rec, spec: Any, previous_keys: int | None) -> int:
    """How many queries the call had: exact for "last" and "all", else inferred from the growth of the keys."""
    rows = rec.query_positions
    n_keys = int(rec.probs.shape[-1])
    if spec == "last" and rows is not None:
        return int(rows[-1]) + 1
    if spec == "all":
        return int(rec.probs.shape[2])
    return n_keys if previous_keys is None else n_keys - previous_keys


def _absolute_rows(rec, spec: Any, previous_keys: int | None) -> list[int]:
    """Positions in the token sequence of a record's query rows (queries are the last ``q_len`` positions)."""
    n_keys = int(rec.probs.shape[-1])
    rows = rec.query_positions if rec.query_positions is not None else range(rec.probs.shape[2])
    offset = n_keys - _query_count(rec, spec, previous_keys)
    return [offset + int(r) for r in rows]


def _self_payload(records, spec, tokens, head_pick, sample) -> dict:
    by_layer: dict[int, dict[int, tuple[int, np.ndarray]]] = {}
    for layer in sorted({r.layer for r in records}):
        previous = None
        rows: dict[int, tuple[int, np.ndarray]] = {}
        for rec in (r for r in records if r.layer == layer):  # in capture order: prefill, then decoding steps
            probs = rec.probs[sample][head_pick].float().numpy()  # [H, R, K]
            for i, pos in enumerate(_absolute_rows(rec, spec, previous)):
                rows[pos] = (rec.call, probs[:, i])  # [H, K]
            previous = int(rec.probs.shape[-1])
        if rows:
            by_layer[layer] = rows
    n_keys = max(row.shape[-1] for rows in by_layer.values() for _, row in rows.values())
    entries = [_layer_entry(layer, rows) for layer, rows in by_layer.items()]
    return {"tokens": _labels(tokens, n_keys, "the captured key axis"), "n_keys": n_keys, "layers": entries,
            "calls": sorted({r.call for r in records})}


def _layer_entry(layer: int, rows: dict[int, tuple[int, np.ndarray]]) -> dict:
    """One layer's rows: positions, stored lengths (trailing zeros dropped) and one float16 blob of [H, L] blocks."""
    positions = sorted(rows)
    blocks, lengths = [], []
    for pos in positions:
        row = rows[pos][1]  # [H, K]
        nonzero = np.flatnonzero(np.any(row != 0, axis=0))
        length = int(nonzero[-1]) + 1 if nonzero.size else 1
        blocks.append(row[:, :length].ravel())
        lengths.append(length)
    return {"layer": layer, "positions": positions, "lengths": lengths, "calls": [rows[p][0] for p in positions],
            "data": encode_f16(np.concatenate(blocks))}


def _image_positions(image_tokens: Any, sample: int, n_keys: int) -> list[int]:
    """Key positions of the image tokens, from ``(start, end)``, a bool mask ``[N]`` / ``[B, N]`` or positions."""
    if isinstance(image_tokens, tuple) and len(image_tokens) == 2 and all(isinstance(v, (int, np.integer))
                                                                        for v in image_tokens):
        start, end = (int(v) for v in image_tokens)
        positions = list(range(start, end))
    else:
        arr = np.asarray(image_tokens.detach().cpu() if hasattr(image_tokens, "detach") else image_tokens)
        if arr.dtype == bool:
            arr = arr[sample] if arr.ndim == 2 else arr
            positions = np.flatnonzero(arr).tolist()
        else:
            positions = [int(v) for v in arr.ravel()]
    if not positions or min(positions) < 0 or max(positions) >= n_keys:
        raise ValueError(f"image_tokens must select positions within the {n_keys} captured keys (got "
                         f"{len(positions)} positions" + (f", {min(positions)}..{max(positions)})" if positions else ")"))
    return positions


def _image_block(image, image_tokens, grid, sample, n_keys) -> dict:
    positions = _image_positions(image_tokens, sample, n_keys)
    if isinstance(grid, dict):
        raise ValueError("grid for an image is one (h, w) for the patch grid, not a dict per layer")
    h, w = _grid_for(len(positions), grid, "image_tokens")
    return {**_picture(image), "grid": [h, w], "positions": positions}


def _grid_for(n: int, grid, name: str) -> tuple[int, int]:
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{name} selects {n} tokens, not a square number: pass grid=(h, w) with h*w == {n}")
        return side, side
    h, w = (int(g) for g in grid)
    if h * w != n:
        raise ValueError(f"grid=({h}, {w}) has {h * w} cells but {name} selects {n} tokens")
    return h, w


# ---- cross mode: per prompt token, the map over the latent positions ------------------------------------------
def _cross_payload(records, spec, tokens, grid, head_pick, sample, token_indices) -> dict:
    steps = sorted({r.call for r in records})
    n_tokens = int(records[0].probs.shape[-1])
    labels = _labels(tokens, n_tokens, "the cross-attention key axis (prompt tokens)")[:n_tokens]
    keys = list(range(n_tokens)) if token_indices is None else [int(i) % n_tokens for i in token_indices]
    entries = []
    for layer in sorted({r.layer for r in records}):
        recs = {r.call: r for r in records if r.layer == layer and r.call in steps}  # the last record of each step
        if not recs:
            continue
        first = recs[min(recs)]
        rows = [int(v) for v in (first.query_positions if first.query_positions is not None
                                 else range(first.probs.shape[2]))]
        q_len = _query_count(first, spec, None) if spec in ("last", "all") else None
        h, w = _latent_grid(layer, q_len, max(rows) + 1, grid)
        data = [encode_f16(recs[s].probs[sample][head_pick][..., keys].float().numpy()) if s in recs else ""
                for s in steps]  # [H, R, T] per step
        entries.append({"layer": layer, "grid": [h, w], "rows": rows, "data": data})
    return {"tokens": [labels[k] for k in keys], "key_index": keys, "steps": steps, "layers": entries}


def _latent_grid(layer: int, q_len: int | None, at_least: int, grid) -> tuple[int, int]:
    """The latent grid of one layer: exact from the number of queries, the full-resolution grid halved as needed."""
    if isinstance(grid, dict):
        if layer not in grid:
            raise ValueError(f"grid has no entry for layer {layer} (layers in it: {sorted(grid)})")
        h, w = (int(g) for g in grid[layer])
        if h * w < at_least:
            raise ValueError(f"grid[{layer}]=({h}, {w}) has fewer cells than the captured latent positions")
        return h, w
    if grid is None:
        if q_len is None:
            raise ValueError("pass grid=(h, w) (the latent grid): with a selection of query rows the number of latent "
                             "positions cannot be read from the capture")
        return _grid_for(q_len, None, f"layer {layer}'s query axis")
    h, w = (int(g) for g in grid)
    candidates = []
    while h >= 1 and w >= 1:
        candidates.append((h, w))
        if h % 2 or w % 2:
            break
        h, w = h // 2, w // 2
    for ch, cw in candidates:
        if (q_len is not None and ch * cw == q_len) or (q_len is None and ch * cw >= at_least
                                                        and (ch // 2) * (cw // 2) < at_least):
            return ch, cw
    raise ValueError(f"layer {layer} has {q_len or at_least} latent positions, which is none of the grid={tuple(grid)} "
                     f"resolutions {candidates}: pass grid={{layer: (h, w)}}")


__all__ = ["AttentionView", "attention_view", "encode_f16", "forward_passes"]
