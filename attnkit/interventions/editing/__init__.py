"""Diffusion editing methods built on the attention store and ``edit_kv`` injection (issue 15): StyleID, MasaCtrl,
FreeCustom, FateZero, BroadWay, DiTCtrl, DesignEdit, A-STAR — one file per method, each self-registering.

The store itself (:class:`attnkit.diffusion.store.AttentionStore`, registered as ``attention-store``) is imported here
so that its registration runs with the other built-ins.
"""

from attnkit.diffusion.store import AttentionStore  # noqa: F401  (registers "attention-store")
