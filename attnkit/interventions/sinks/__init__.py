"""Sink redistribution: sink detection, VAR, ACT and the StreamingLLM sink + window KV cache."""
