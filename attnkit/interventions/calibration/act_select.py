"""ACT head selection (METHODS.md §2, "Head selection"): apply ACT to one (layer, head) at a time, score the model
on a calibration set, keep the heads that beat the baseline, and save the result as :class:`HeadScores`.

The score is any callable ``score_fn(model) -> float`` (higher is better), e.g. accuracy or the mean log-likelihood
of the correct answers on a few hundred calibration examples. The sweep is ``layers × heads + 1`` evaluations.

Example:
    >>> from attnkit.testing import tiny_causal_lm
    >>> import torch
    >>> model = tiny_causal_lm("llama")
    >>> ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    >>> score = lambda m: m(ids).logits[0, -1, 3].item()
    >>> hs = select_act_heads(model, score, layers=[1], heads=[0, 1])
    >>> hs.scores.shape, sorted(hs.params)
    (torch.Size([2, 4]), ['act', 'baseline', 'heads', 'layers', 'selection'])
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from attnkit.scores import HeadScores


def select_act_heads(model, score_fn: Callable, layers=None, heads=None, min_gain: float = 0.0,
                     save_to=None, data: str = "", backend: str = "auto", **act_params) -> HeadScores:
    """Sweep ACT over single heads. Returns HeadScores of gains (score with ACT on the head − baseline; NaN for
    heads not swept) with the heads whose gain is ``> min_gain`` selected; saved to ``save_to`` when given."""
    import attnkit
    from attnkit.interventions.sinks.act import ACT

    from attnkit.hooks.transformers import TransformersAdapter

    comp = TransformersAdapter(model).description.component("text")
    num_layers, num_heads = comp.num_layers, comp.num_heads
    layer_list = list(range(2, num_layers - 1)) if layers is None else list(layers)
    head_list = list(range(num_heads)) if heads is None else list(heads)
    with torch.no_grad():
        baseline = float(score_fn(model))
    gains = torch.full((num_layers, num_heads), math.nan)
    for layer in layer_list:
        for head in head_list:
            with attnkit.attach(model, [ACT(layers=[layer], heads=[head], **act_params)], backend=backend), \
                    torch.no_grad():
                gains[layer, head] = float(score_fn(model)) - baseline
    params = {"baseline": baseline, "layers": layer_list, "heads": head_list, "act": act_params}
    result = HeadScores(gains, method="act-head-selection", model=getattr(model.config, "_name_or_path", "") or
                        getattr(model.config, "model_type", ""), data=data, params=params)
    result = result.threshold(min_gain)
    result.params.update(params)
    if save_to is not None:
        result.save(save_to)
    return result
