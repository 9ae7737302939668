"""Toy arms for runner tests (importable as ``eval_arms:factory`` by the CLI in subprocesses)."""

import contextlib
import time

import torch


@contextlib.contextmanager
def logit_hook(model, fn):
    """While active, replace the lm_head output ``[B, T, V]`` by ``fn(output)``."""
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: fn(out))
    try:
        yield model
    finally:
        handle.remove()


def bias_arm(model):
    """Adds a fixed, token-dependent bias to the logits (a perturbation that changes every log-likelihood)."""
    bias = torch.linspace(-2.0, 2.0, model.config.vocab_size)  # [V]
    return logit_hook(model, lambda out: out + bias)


def zero_arm(model):
    """A hook that changes nothing (exercises the hook path)."""
    return logit_hook(model, lambda out: out + 0.0)


def slow_arm(model):
    """Baseline numbers, but every forward sleeps 0.2 s so a test can kill the process mid-run."""
    def fn(out):
        time.sleep(0.2)
        return out
    return logit_hook(model, fn)
