"""Model loading: names and folders checked before loading, offline hub names failing at once, dtype and device."""

import socket

import pytest
import torch

from attnkit import models
from attnkit.models import ModelLoadError, resolve_model
from attnkit.testing import tiny_causal_lm, tiny_vlm

WORDS = "[PAD] <s> </s> [UNK] the a cat dog sat on mat red blue and is big small . , ?".split()


def tiny_tokenizer():
    """A fast word-level tokenizer (offsets work) over :data:`WORDS`, built offline."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>")


def save_tiny_lm(folder, family: str = "llama"):
    """A tiny random causal LM and its tokenizer written with save_pretrained into ``folder``."""
    model = tiny_causal_lm(family, vocab_size=len(WORDS))
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture
def never_load(monkeypatch):
    """Any attempt to load weights fails the test: errors must come first."""
    import diffusers
    import transformers

    def fail(*args, **kwargs):
        raise AssertionError(f"tried to load {args[:2]!r}")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText,
                transformers.AutoProcessor, transformers.AutoTokenizer, diffusers.DiffusionPipeline):
        monkeypatch.setattr(cls, "from_pretrained", fail)
    monkeypatch.setattr(models, "load_smollm2", fail)


def test_packaged_names():
    for name in ("smollm2", "SmolLM2", "SmolLM2-135M-Instruct"):
        assert resolve_model(name).packaged


@pytest.mark.parametrize("name", ["./missing", "/no/such/dir", "~/no/such/dir", "a/b/c", "weights.gguf", "bad name!"])
def test_missing_paths_say_so(name, never_load):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(name)
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.load_model(name)


def test_folders_without_config_are_refused(tmp_path, never_load):
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_model(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelLoadError, match=r"has no model_index\.json"):
        resolve_model(str(tmp_path), marker="model_index.json")


def test_uncached_hub_name_fails_at_once_offline(monkeypatch, never_load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=2.0: pytest.fail("probed the network"))
    with pytest.raises(ModelLoadError, match=r"'gpt2' is not a local folder and not in the Hugging Face cache, and "
                                             r"the hub is switched off \(HF_HUB_OFFLINE=1\)"):
        models.load_model("gpt2")


def test_uncached_hub_name_fails_at_once_without_network(monkeypatch, never_load):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=2.0: False)
    with pytest.raises(ModelLoadError, match="the hub is unreachable"):
        resolve_model("gpt2")


def test_cached_hub_name_goes_offline(tmp_path, monkeypatch):
    """A name cached by an earlier download resolves with local_files_only and puts the process offline."""
    import huggingface_hub.constants as hub_constants

    repo = tmp_path / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=2.0: False)
    source = resolve_model("org/tiny")
    assert source.local_files_only and source.path == "org/tiny"
    assert hub_constants.HF_HUB_OFFLINE is True
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_hub_reachable_probes_the_endpoint(monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert models.hub_reachable(timeout=2.0)
    finally:
        server.close()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # closed now: refused
    assert not models.hub_reachable(timeout=2.0)


def test_dtype_and_device(tiny_lm_dir):
    assert models.parse_dtype("bf16") is torch.bfloat16 and models.parse_dtype("torch.float16") is torch.float16
    with pytest.raises(ModelLoadError, match="unknown dtype 'int8'"):
        models.parse_dtype("int8")
    model, tok = models.load_model(str(tiny_lm_dir), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = tiny_causal_lm("llama", vocab_size=len(WORDS))
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight.to(torch.bfloat16))
    assert tok("the cat")["input_ids"] == [WORDS.index("the"), WORDS.index("cat")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_is_refused_without_cuda():
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        models.check_device("cuda:0")
    with pytest.raises(ModelLoadError, match="unknown device"):
        models.check_device("gpu")


def test_vision_language_detection(tmp_path):
    tiny_vlm("llava").config.save_pretrained(tmp_path / "llava")
    tiny_causal_lm("qwen2").config.save_pretrained(tmp_path / "qwen2")
    assert models.is_vision_language(resolve_model(str(tmp_path / "llava")).config())
    assert not models.is_vision_language(resolve_model(str(tmp_path / "qwen2")).config())


def test_unreadable_config_is_one_sentence(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"cannot load '.*': Unrecognized model in .* `model_type`"):
        models.load_model(str(tmp_path))
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="cannot load"):
        models.load_pipeline(str(tmp_path))
