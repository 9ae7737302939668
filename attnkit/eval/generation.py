"""Greedy answers from text-only LMs and from vision-language models, through one function.

If ``processor`` has an ``image_processor`` and an image is given, the image goes through the processor with a
chat message ``[{"type": "image"}, {"type": "text", ...}]``; otherwise the prompt is sent as text only (chat
template when the tokenizer has one). Text-only runs of image tasks (POPE, CHAIR) check the pipeline; their
numbers say nothing about vision.

Example:
    >>> from attnkit.models import load_smollm2
    >>> model, tok = load_smollm2()  # doctest: +SKIP
    >>> generate_answer(model, tok, "Is Paris in France? Answer yes or no.", max_new_tokens=3)  # doctest: +SKIP
    'Yes, Paris'
"""

from __future__ import annotations

import torch


def is_multimodal(processor) -> bool:
    return getattr(processor, "image_processor", None) is not None


def _text_inputs(tok, prompt: str):
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, return_tensors="pt", add_special_tokens=False)
    return tok(prompt, return_tensors="pt")


def _image_inputs(processor, prompt: str, image):
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(msg, add_generation_prompt=True)
    return processor(images=image, text=text, return_tensors="pt")


@torch.no_grad()
def generate_answer(model, processor, prompt: str, image=None, max_new_tokens: int = 32) -> str:
    """Greedy continuation of ``prompt`` (with ``image`` for multimodal processors), special tokens removed."""
    if image is not None and is_multimodal(processor):
        inputs = _image_inputs(processor, prompt, image)
        tok = processor.tokenizer
    else:
        tok = getattr(processor, "tokenizer", processor)
        inputs = _text_inputs(tok, prompt)
    inputs = inputs.to(next(model.parameters()).device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def load_image(path):
    """PIL image in RGB, with a clear error naming the file."""
    from PIL import Image

    try:
        return Image.open(path).convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} not found; set ATTNKIT_DATA or the task's image_dir.") from None
