"""Attention steering for LLMs/LVLMs: PASTA, VHR, head-specific visual modulation (PAINT), CMAI."""
