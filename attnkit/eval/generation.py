"""Greedy answers from text-only LMs and from vision-language models, batched, through one function.

If ``processor`` has an ``image_processor`` and an image is given, the image goes through the processor with a
chat message ``[{"type": "image"}, {"type": "text", ...}]``; otherwise the prompt is sent as text only (chat
template when the tokenizer has one). Text-only runs of image tasks (POPE, CHAIR) check the pipeline; their
numbers say nothing about vision. Batches are left padded (``generate_answers``).

Example:
    >>> from attnkit.models import load_smollm2
    >>> model, tok = load_smollm2()  # doctest: +SKIP
    >>> generate_answer(model, tok, "Is Paris in France? Answer yes or no.", max_new_tokens=3)  # doctest: +SKIP
    'Yes, Paris'
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch


def is_multimodal(processor) -> bool:
    return getattr(processor, "image_processor", None) is not None


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _text_inputs(tok, prompts: list[str]):
    """Left-padded batch of chat-formatted prompts (plain prompts when the tokenizer has no chat template)."""
    if getattr(tok, "chat_template", None):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        kw = {"add_special_tokens": False}
    else:
        texts, kw = list(prompts), {}
    with _left_padding(tok):
        return tok(texts, return_tensors="pt", padding=True, **kw)


def _image_inputs(processor, prompts: list[str], images: list):
    """Left-padded processor batch, one image per prompt, image placeholder first in the user turn."""
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": p}]}],
                                           add_generation_prompt=True) for p in prompts]
    with _left_padding(processor.tokenizer):
        return processor(images=images, text=texts, return_tensors="pt", padding=True)


@contextlib.contextmanager
def _left_padding(tok):
    """Temporarily pad on the left (generation continues from the last column), with a pad token set."""
    side, pad = tok.padding_side, tok.pad_token
    tok.padding_side = "left"
    if pad is None:
        tok.pad_token = tok.eos_token
    try:
        yield tok
    finally:
        tok.padding_side = side
        if pad is None:
            tok.pad_token = None


@torch.no_grad()
def generate_answers(model, processor, prompts: Sequence[str], images: Sequence | None = None,
                     max_new_tokens: int = 32) -> list[str]:
    """Greedy continuations of a batch of prompts (left padded), one image per prompt for multimodal processors.

    ``images`` is ignored (text only) when ``processor`` is a plain tokenizer or any image is ``None``. Batching
    does not change the maths (each row attends to its own tokens), but float reductions over a different
    padded width can flip a near-tie greedy token, so keep one batch size within a comparison.

    Example:
        >>> from attnkit.eval.lvlm import tiny_llava
        >>> from PIL import Image
        >>> model, proc = tiny_llava()
        >>> outs = generate_answers(model, proc, ["Is there a dog in the image?", "Describe this image."],
        ...                         [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (30, 40), "blue")], 4)
        >>> len(outs), all(isinstance(o, str) for o in outs)
        (2, True)
    """
    prompts = list(prompts)
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"generate_answers: {len(prompts)} prompts but {len(images)} images.")
    use_images = images is not None and is_multimodal(processor) and all(im is not None for im in images)
    if use_images:
        inputs, tok = _image_inputs(processor, prompts, list(images)), processor.tokenizer
    else:
        tok = getattr(processor, "tokenizer", processor)
        inputs = _text_inputs(tok, prompts)
    inputs = inputs.to(next(model.parameters()).device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=_pad_id(tok))
    new = out[:, inputs["input_ids"].shape[1]:]
    return [tok.decode(row, skip_special_tokens=True).strip() for row in new]


def generate_answer(model, processor, prompt: str, image=None, max_new_tokens: int = 32) -> str:
    """Greedy continuation of one ``prompt`` (with ``image`` for multimodal processors), special tokens removed."""
    return generate_answers(model, processor, [prompt], None if image is None else [image], max_new_tokens)[0]


def load_image(path):
    """PIL image in RGB, with a clear error naming the file."""
    from PIL import Image

    try:
        return Image.open(path).convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} not found; set ATTNKIT_DATA or the task's image_dir.") from None
