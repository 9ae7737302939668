"""Long-context KV methods: which keys each decode step attends (exact simulations) and which KV a cache keeps.

* decode-time sparse attention: TidalDecode, Recycled Attention / RefreshKV, TokenSelect, LongHeads, MoA-style
  per-head windows — each chooses a key set per step and is simulated exactly (masked or recomputed attention
  over the chosen keys), with a :class:`~attnkit.interventions.kvcache._sparse.KeyAccount` of the keys each step
  attends;
* compressed caches: RazorAttention (head scoring + sinks/window/compensation token), DuoAttention (deployment +
  gate calibration).

They simulate the methods' outputs, not their speed: the full cache stays in memory and timings measure the
simulation.
"""
