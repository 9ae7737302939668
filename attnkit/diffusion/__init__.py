"""Diffusion editing infrastructure: DDIM inversion, attention stores and injection primitives (issue 15)."""
