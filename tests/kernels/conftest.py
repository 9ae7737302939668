"""Kernel tests: switch the Triton interpreter on (CPU machines) before any kernel module is imported."""

import os

import torch

if not torch.cuda.is_available():
    # triton reads this at @triton.jit time, i.e. when attnkit.kernels.triton._flash is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
