"""A processor for the tiny random LLaVA of ``attnkit.testing.tiny_vlm("llava")``, so POPE and CHAIR run end to end
on real COCO images through the same code path as a real ``llava-hf`` checkpoint (``LlavaProcessor``).

The processor is a stock ``transformers.LlavaProcessor`` built offline from

* a ``CLIPImageProcessor`` that resizes the shortest edge to the vision tower's ``image_size`` (32), centre-crops a
  square and normalises with the CLIP mean/std;
* a word-level tokenizer (``word_tokenizer``) over the COCO category words and the prompt words, lower-cased, that
  fits the tiny model's 128-token vocabulary: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, words from 4 on,
  ``<image>`` at ``config.image_token_id`` and ``<unused_i>`` fillers (special, dropped when decoding);
* the LLaVA-1.5 chat format ``"USER: <image>\\n{prompt} ASSISTANT:"``.

``<image>`` is expanded to ``(image_size // patch_size)**2`` placeholders (16 for the tiny tower: CLS dropped by the
``"default"`` feature-select strategy), exactly as the model's ``get_placeholder_mask`` expects.

**The weights are random: POPE/CHAIR numbers from this model are meaningless.** It exists to prove the pipeline —
image loading, preprocessing, placeholder expansion, batched left-padded generation, parsing, metrics, arms.

Example:
    >>> model, proc = tiny_llava()
    >>> from PIL import Image
    >>> batch = proc(images=[Image.new("RGB", (64, 48))] * 2, text=["USER: <image>\\nis there a dog ? ASSISTANT:"] * 2,
    ...              return_tensors="pt")
    >>> batch["pixel_values"].shape, int((batch["input_ids"] == model.config.image_token_id).sum(1)[0])
    (torch.Size([2, 3, 32, 32]), 16)
    >>> proc.tokenizer.decode(proc.tokenizer("Is there a Dog?")["input_ids"], skip_special_tokens=True)
    'is there a dog ?'
"""

from __future__ import annotations

import json
import re

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
PROMPT_WORDS = ("user assistant : is there a an the in image ? answer yes or no . , please describe this "
                "detail picture photo of and with on").split()
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
RANDOM_WEIGHTS_NOTE = ("tiny random LLaVA (attnkit.testing.tiny_vlm): the weights are random, so these numbers are "
                       "meaningless; only the pipeline (images, placeholders, batching, parsing, metrics) is real.")


def coco_words(instances_path=None) -> list[str]:
    """Prompt words, then every word of the COCO category names (coco_tiny by default), first-seen order.

    Example:
        >>> words = coco_words()
        >>> len(words) < 128 - 4 and "traffic" in words and "yes" in words
        True
    """
    from attnkit.data import data_path

    path = instances_path or data_path("coco_tiny", "annotations", "instances_val2017.json", must_exist=True)
    with open(path) as fh:
        names = [c["name"] for c in json.load(fh)["categories"]]
    words = list(PROMPT_WORDS) + [w for n in names for w in re.findall(r"\w+", n.lower())]
    return list(dict.fromkeys(words))


def word_tokenizer(words, vocab_size: int = 128, image_token_id: int = 120):
    """A lower-casing word-level ``PreTrainedTokenizerFast`` of exactly ``vocab_size`` ids (see module docstring).

    Example:
        >>> tok = word_tokenizer(["is", "there", "a", "cat", "?"], vocab_size=16, image_token_id=12)
        >>> tok("Is there a cat?")["input_ids"], tok.convert_tokens_to_ids("<image>")
        ([4, 5, 6, 7, 8], 12)
        >>> tok.decode([4, 5, 6, 9, 13, 2], skip_special_tokens=True)  # fillers and </s> are dropped
        'is there a'
    """
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [w for w in dict.fromkeys(words) if w not in SPECIALS]
    n_free = vocab_size - len(SPECIALS) - 1
    if len(words) > n_free:
        raise ValueError(f"word_tokenizer: {len(words)} words do not fit a {vocab_size}-token vocabulary "
                         f"({n_free} free ids); pass fewer words.")
    vocab, fillers = {s: i for i, s in enumerate(SPECIALS)}, []
    free = (i for i in range(len(SPECIALS), vocab_size) if i != image_token_id)
    for w in words:
        vocab[w] = next(free)
    vocab["<image>"] = image_token_id
    for i in free:
        fillers.append(f"<unused_{i}>")
        vocab[fillers[-1]] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": [AddedToken("<image>", normalized=False)] + fillers})
    return tok


def tiny_llava_processor(model, words=None):
    """``LlavaProcessor`` matching ``model`` (a tiny LLaVA): image size/patch size/strategy from its config."""
    import transformers
    from transformers import LlavaProcessor

    # the PIL backend needs no torchvision (the default CLIPImageProcessor warns and falls back to it without one)
    CLIPImageProcessor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    cfg = model.config
    side = cfg.vision_config.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    tok = word_tokenizer(words or coco_words(), cfg.text_config.vocab_size, cfg.image_token_id)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=cfg.vision_config.patch_size,
                          vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def tiny_llava(seed: int = 0, attn_implementation: str = "sdpa"):
    """``(model, processor)``: the random tiny LLaVA of ``attnkit.testing`` and its processor."""
    from attnkit.testing import tiny_vlm

    model = tiny_vlm("llava", seed=seed, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = 0
    return model, tiny_llava_processor(model)
