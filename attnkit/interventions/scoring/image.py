"""Image-centric score per head: how much of a head's image attention lands on non-sink image tokens (VAR's row
criterion ``r = Σ_{I_vis∖S} A / Σ_{I_vis} A``), averaged over text query rows whose image mass is at least
``min_image_mass``; rows below the floor count as 0. Sinks: VAR's massive-activation sinks when ``sink_dims`` is
given, else none (then the score is the fraction of rows that attend to the image enough).

Example:
    >>> import torch
    >>> probs = torch.tensor([[[[0.5, 0.1, 0.3, 0.1]]]])           # one row: BOS, v-sink, v, text
    >>> image, sinks = torch.tensor([[0, 1, 1, 0]]).bool(), torch.tensor([[1, 1, 0, 0]]).bool()
    >>> round(image_centric_rows(probs, image, sinks, 0.2).item(), 4)
    0.75
"""

from __future__ import annotations

import torch

from attnkit.interventions.scoring._common import model_name, row_mean
from attnkit.scores import HeadScores


def image_centric_rows(probs, image, sinks, min_image_mass: float = 0.2) -> torch.Tensor:
    """probs [B, H, Q, K]; image, sinks [B, K] bool → per-row score [B, H, Q]."""
    img = (probs * image[:, None, None, :]).sum(-1)  # [B, H, Q]
    non_sink = (probs * (image & ~sinks)[:, None, None, :]).sum(-1)
    ratio = non_sink / img.clamp_min(1e-30)
    return torch.where(img >= min_image_mass, ratio, torch.zeros_like(ratio))


def image_centric_scores(model, inputs: dict, sink_dims=None, tau: float = 20.0, min_image_mass: float = 0.2,
                         data: str = "") -> HeadScores:
    """HeadScores of the image-centric score on a VLM batch (image tokens = ``config.image_token_id``)."""
    import attnkit
    from attnkit.interventions.sinks.var import VAR

    ids = inputs["input_ids"]
    real = inputs.get("attention_mask", torch.ones_like(ids)).bool()
    image = (ids == model.config.image_token_id) & real  # [B, N]
    probe = VAR(p=0.0, tau=tau, sink_dims=sink_dims or [0], first_layer=0, except_last_layer=False)
    with attnkit.attach(model, [probe], backend="eager") as h, h.capture(queries="all") as cap, torch.no_grad():
        model(**inputs)  # p = 0: VAR changes nothing, it only detects sinks per layer
    per_layer = []
    for layer in sorted(cap.maps):
        sinks = probe._sinks[layer][1] if (sink_dims and layer in probe._sinks) else torch.zeros_like(image)
        per_layer.append(row_mean(image_centric_rows(cap.last(layer), image, sinks, min_image_mass), real & ~image))
    return HeadScores(torch.stack(per_layer), method="image-centric", model=model_name(model), data=data,
                      params={"sink_dims": sink_dims, "tau": tau, "min_image_mass": min_image_mass})
