"""Diffusion editing infrastructure (issue 15): DDIM inversion through any pipeline's own loop, an attention store,
and injection primitives. The methods built on them live in :mod:`attnkit.interventions.editing`.

* :mod:`attnkit.diffusion.inversion` — :func:`ddim_invert`, :func:`reconstruct`, :func:`encode` / :func:`decode`,
  :func:`adain`;
* :mod:`attnkit.diffusion.schedulers` — the scheduler wrappers (inverse, trimmed) and :func:`swapped`;
* :mod:`attnkit.diffusion.store` — :class:`AttentionStore` (registered as the ``attention-store`` intervention);
* :mod:`attnkit.diffusion.inject` — replace / append K/V with key biases, query blends, map blends, token masks.
"""

from attnkit.diffusion.inversion import (  # noqa: F401
    Inversion,
    adain,
    ddim_invert,
    decode,
    encode,
    reconstruct,
    relative_error,
)
from attnkit.diffusion.schedulers import InverseScheduler, TrimmedScheduler, swapped  # noqa: F401
from attnkit.diffusion.store import AttentionStore  # noqa: F401
