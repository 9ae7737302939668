"""Builders for the eval tests: a byte-level tokenizer and a tiny random Llama (fast, offline)."""

from __future__ import annotations

import torch


def make_byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <s> (BOS) and </s> (EOS/PAD)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<s>"], vocab["</s>"] = len(vocab), len(vocab) + 1
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def make_tiny_llama(vocab_size: int = 258, layers: int = 2, seed: int = 0, max_pos: int = 4096):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      bos_token_id=min(256, vocab_size - 2), eos_token_id=vocab_size - 1,
                      pad_token_id=vocab_size - 1)
    return LlamaForCausalLM(cfg).eval()
