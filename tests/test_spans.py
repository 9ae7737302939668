"""Building user spans from text on the real SmolLM2 tokenizer: substrings under left padding, chat roles."""

import torch

from attnkit.spans import chat_role_spans, substring_spans


def test_substring_spans_survive_left_padding(smollm2):
    _, tok = smollm2
    texts = ["Answer in French: what is the capital of Italy?", "Be brief. Where is Rome?"]
    enc, ranges = substring_spans(tok, texts, ["in French", "Be brief"])
    assert enc["attention_mask"][1, 0] == 0  # the shorter text is left-padded
    for b, sub in enumerate(["in French", "Be brief"]):
        (start, end), = ranges[b]
        decoded = tok.decode(enc["input_ids"][b, start:end]).strip()
        assert decoded == sub


def test_chat_role_spans_cover_the_template(smollm2):
    _, tok = smollm2
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    spans = chat_role_spans(tok, messages)
    full = tok.apply_chat_template(messages, tokenize=True)
    full = full["input_ids"] if hasattr(full, "keys") else full
    (s0, e0), = spans["system"]
    (s1, e1), = spans["user"]
    assert s0 == 0 and e0 == s1 and e1 == len(full)
    assert "You are terse." in tok.decode(torch.tensor(full[s0:e0]))
    assert "Name a colour." in tok.decode(torch.tensor(full[s1:e1]))
