"""Print the job name and the versions it resolved (the first thing every CI job prints)."""

import importlib.metadata as metadata
import platform
import sys

PACKAGES = ("torch", "transformers", "diffusers", "accelerate", "huggingface-hub", "tokenizers", "safetensors",
            "numpy", "triton", "datasets", "lm_eval", "gguf", "matplotlib", "hypothesis", "pytest", "attnkit")


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


print(f"== {sys.argv[1] if len(sys.argv) > 1 else 'versions'}: python {platform.python_version()}, "
      + ", ".join(f"{name} {version(name)}" for name in PACKAGES), flush=True)
