"""Token labels, on hand-made pieces and on the real SmolLM2 tokenizer (byte-level BPE)."""

import pytest
import torch

from attnkit.viz import attention_heatmap, readable_token, token_labels
from attnkit.viz.tokens import detect_scheme, piece_bytes


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    models = pytest.importorskip("attnkit.models")
    transformers = pytest.importorskip("transformers")
    try:
        path = models.smollm2_path()
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(str(exc))
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize(
    "piece, scheme, expected",
    [
        ("Ġcapital", "byte_level", "capital"),
        ("Ċ", "byte_level", "↵"),
        ("ĊĊ", "byte_level", "↵↵"),
        ("ĉ", "byte_level", "⇥"),
        ("ĠĠĠ", "byte_level", "␣␣␣"),
        ("ĠcafÃ©", "byte_level", "café"),
        ("ĠðŁĻĤ", "byte_level", "U+1F642"),  # emoji: DejaVu Sans has no glyph for it
        ("âĢ", "byte_level", "‹e2 80›"),  # first two bytes of a 3-byte character
        ("▁the", "sentencepiece", "the"),
        ("<0x0A>", "sentencepiece", "↵"),
        ("▁▁", "sentencepiece", "␣␣"),
        ("<|im_start|>", "byte_level", "<|im_start|>"),  # not byte-level alphabet: taken literally
    ],
)
def test_readable_token(piece, scheme, expected):
    assert readable_token(piece, scheme) == expected


def test_options_and_bad_scheme():
    assert readable_token("Ġof", space_marker="·") == "·of"
    assert readable_token("Ċ", newline="\\n") == "\\n"
    assert readable_token("ĠðŁĻĤ", drawable_only=False) == "🙂"
    assert readable_token("<s>", "sentencepiece", special={"<s>"}) == "<s>"
    with pytest.raises(ValueError, match=r"scheme must be one of .* \(got 'bpe'\)"):
        piece_bytes("x", "bpe")


@pytest.mark.slow
def test_real_smollm2_labels(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert detect_scheme(tok) == "byte_level"
    ids = tok("<|im_start|>user\nThe capital of   France is\tParis. café 🙂\n\n<|im_end|>")["input_ids"]
    labels = token_labels(tok, torch.tensor([ids]))  # [1, N] is accepted
    assert labels == ["<|im_start|>", "user", "↵", "The", "capital", "of", "␣␣", "France", "is", "⇥", "Paris",
                      ".", "café", "U+1F642", "↵↵", "<|im_end|>"]


@pytest.mark.slow
def test_real_smollm2_labels_reassemble_the_text(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "Attention sinks:\n  the first token\tgets most of the mass (0.7), élan. 🙂"
    ids = tok(text)["input_ids"]
    labels = token_labels(tok, ids, space_marker=" ", newline="\n", tab="\t", drawable_only=False)
    assert len(labels) == len(ids)
    assert "".join(labels) == tok.decode(ids) == text


@pytest.mark.slow
def test_split_character_bytes_and_heatmap_ticks(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok("龘")["input_ids"]  # a rare character: several byte tokens
    labels = token_labels(tok, ids)
    assert len(labels) == len(ids) > 1
    assert all(label.startswith("‹") and label.endswith("›") for label in labels)
    fig = attention_heatmap(torch.full((len(ids), len(ids)), 1.0 / len(ids)), tokens=labels)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == labels


def test_ids_shape_error():
    class Tok:
        def convert_ids_to_tokens(self, ids):
            return ["a"] * len(ids)

    assert token_labels(Tok(), [1, 2], scheme="plain") == ["a", "a"]
    with pytest.raises(ValueError, match=r"ids must be one sequence of token ids, \[N\] or \[1, N\] \(got 2 sequences\)"):
        token_labels(Tok(), [[1, 2], [3, 4]], scheme="plain")
