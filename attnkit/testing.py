"""Tiny randomly initialised models for tests, examples and notebooks (no download, seconds to build).

Example:
    >>> model = tiny_causal_lm("llama")
    >>> model.config.num_hidden_layers, model.config.num_attention_heads
    (2, 4)
"""

from __future__ import annotations

import torch

from attnkit.hooks.compat import model_from_config

#: text families that are tested, and the config overrides that make them tiny
TEXT_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 4}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 4}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
}
#: ``gemma3`` attends bidirectionally inside each image block (``token_type_ids``) and has a sliding-window layer,
#: so its masks are not "causal + padding": the family that keeps the fused paths honest about the model's mask
VISION_FAMILIES = ("llava", "llava_next", "qwen2_vl", "idefics3", "gemma3")
TINY_VLM_FAMILIES = VISION_FAMILIES

_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
_GPT2 = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)


def tiny_text_config(family: str, **overrides):
    """Config of a 2-layer, 4-head (2 KV heads where the family allows GQA) model of ``family``."""
    import transformers

    if family not in TEXT_FAMILIES:
        raise KeyError(f"unknown tiny family {family!r}; choose from {sorted(TEXT_FAMILIES)}")
    config_name, _, extra = TEXT_FAMILIES[family]
    base = dict(_GPT2) if family == "gpt2" else dict(_COMMON)
    if family == "gpt_neox":
        base.pop("num_key_value_heads")
    base.update(extra)
    base.update(overrides)
    return getattr(transformers, config_name)(**base)


def tiny_causal_lm(family: str = "llama", seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """A tiny random causal LM of ``family`` in eval mode (fp32)."""
    import transformers

    config = tiny_text_config(family, **overrides)
    torch.manual_seed(seed)
    impl = "eager" if family == "gemma2" else attn_implementation
    model = model_from_config(getattr(transformers, TEXT_FAMILIES[family][1]), config, attn_implementation=impl)
    return model.eval()


def _tiny_vlm_config(family: str):
    import transformers

    text = dict(_COMMON, model_type="llama")
    vision_clip = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
    if family == "llava":
        return transformers.LlavaConfig(text_config=text, vision_config=vision_clip, image_token_id=120,
                                        vision_feature_layer=-1, projector_hidden_act="gelu")
    if family == "llava_next":
        return transformers.LlavaNextConfig(text_config=text, vision_config=vision_clip, image_token_id=120,
                                            vision_feature_layer=-1, image_grid_pinpoints=[[32, 32], [32, 64]])
    if family == "qwen2_vl":
        text_qwen = dict(_COMMON, model_type="qwen2_vl_text", rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]})
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        return transformers.Qwen2VLConfig(text_config=text_qwen, vision_config=vision, image_token_id=120,
                                          video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "idefics3":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=32, patch_size=8)
        return transformers.Idefics3Config(text_config=text, vision_config=vision, image_token_id=120, scale_factor=2)
    if family == "gemma3":  # one sliding-window and one full-attention layer; 16 image tokens (8x8 patches pooled 2x2)
        text_gemma = dict(_COMMON, model_type="gemma3_text", head_dim=16, sliding_window=8,
                          layer_types=["sliding_attention", "full_attention"])
        vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, image_size=32, patch_size=4)
        return transformers.Gemma3Config(text_config=text_gemma, vision_config=vision, mm_tokens_per_image=16,
                                         image_token_index=120, boi_token_index=121, eoi_token_index=122)
    raise KeyError(f"unknown tiny VLM family {family!r}; choose from {TINY_VLM_FAMILIES}")


def tiny_vlm(family: str = "llava", seed: int = 0, attn_implementation: str = "sdpa"):
    """A tiny random vision-language model of ``family`` (eval mode, fp32)."""
    import transformers

    config = _tiny_vlm_config(family)
    cls = {
        "llava": transformers.LlavaForConditionalGeneration,
        "llava_next": transformers.LlavaNextForConditionalGeneration,
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "idefics3": transformers.Idefics3ForConditionalGeneration,
        "gemma3": transformers.Gemma3ForConditionalGeneration,
    }[family]
    torch.manual_seed(seed)
    return model_from_config(cls, config, attn_implementation=attn_implementation).eval()


def vlm_inputs(family: str, model, batch: int = 2, text_len: int = 6, seed: int = 0, left_pad: int = 0) -> dict:
    """Inputs with image placeholders expanded as the family's processor would do (random pixels).

    ``left_pad``: sample ``b`` gets ``max(left_pad - b, 0)`` padding tokens on the left and a text that much
    shorter, so every sample is padded differently (the first the most) and the batch stays rectangular.

    Example:
        >>> inputs = vlm_inputs("llava", tiny_vlm("llava"), batch=3, left_pad=2)
        >>> (inputs["attention_mask"] == 0).sum(1).tolist()
        [2, 1, 0]
    """
    g = torch.Generator().manual_seed(seed)
    config = model.config
    image_id = config.image_token_id
    inputs: dict = {}
    if family == "llava":
        n_img = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        pixel = torch.randn(batch, 3, 32, 32, generator=g)
        inputs["pixel_values"] = pixel
    elif family == "llava_next":
        n_img, pixel, sizes = _llava_next_pixels(model, batch, g)
        inputs.update(pixel_values=pixel, image_sizes=sizes)
    elif family == "qwen2_vl":
        grid = torch.tensor([[1, 4, 4]] * batch)  # t, h, w patches
        n_img = int(grid[0].prod()) // 4
        patch_dim = 3 * 2 * 4 * 4
        inputs.update(pixel_values=torch.randn(batch * 16, patch_dim, generator=g), image_grid_thw=grid)
    elif family == "idefics3":
        n_img = int(((config.vision_config.image_size // config.vision_config.patch_size) ** 2) / (config.scale_factor**2))
        inputs["pixel_values"] = torch.randn(batch, 1, 3, 32, 32, generator=g)
        inputs["pixel_attention_mask"] = torch.ones(batch, 1, 32, 32, dtype=torch.bool)
    elif family == "gemma3":
        n_img = config.mm_tokens_per_image
        inputs["pixel_values"] = torch.randn(batch, 3, 32, 32, generator=g)
    else:
        raise KeyError(family)
    rows, masks = [], []
    for b in range(batch):
        pads = max(left_pad - b, 0)
        text = torch.randint(3, 100, (2 + text_len + left_pad - pads,), generator=g)  # [2 + suffix]
        row = torch.cat([torch.zeros(pads, dtype=torch.long), text[:2], torch.full((n_img,), image_id), text[2:]])
        rows.append(row)
        masks.append((torch.arange(row.numel()) >= pads).long())
    ids, mask = torch.stack(rows), torch.stack(masks)  # [B, N]
    inputs.update(input_ids=ids, attention_mask=mask)
    if family == "qwen2_vl":
        inputs["mm_token_type_ids"] = (ids == image_id).long()
    if family == "gemma3":  # image tokens attend to each other bidirectionally
        inputs["token_type_ids"] = (ids == image_id).long()
    return inputs


#: inputs that are padded on the left with the tokens; every other tensor input is concatenated along the batch
_TOKEN_ALIGNED = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def stack_left_padded(samples: list[dict], fully_padded: bool = False) -> dict:
    """Stack single-sample inputs into one batch, padding token-aligned tensors on the left with 0 (mask 0).

    ``fully_padded`` appends a copy of the first sample whose attention mask is all 0 (a row with no real token).

    Example:
        >>> a = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
        >>> b = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
        >>> batch = stack_left_padded([a, b], fully_padded=True)
        >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
        ([[5, 6, 7], [0, 0, 8], [5, 6, 7]], [[1, 1, 1], [0, 0, 1], [0, 0, 0]])
    """
    rows = list(samples)
    if fully_padded:
        rows.append({**samples[0], "attention_mask": torch.zeros_like(samples[0]["attention_mask"])})
    width = max(x["input_ids"].shape[1] for x in rows)
    batch = {}
    for key in rows[0]:
        values = [x[key] for x in rows]
        if key in _TOKEN_ALIGNED:  # [1, N] -> [1, width], zeros on the left
            batch[key] = torch.cat([torch.cat([torch.zeros(1, width - v.shape[1], dtype=v.dtype), v], 1)
                                    for v in values])
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.cat(values)
        else:
            batch[key] = values[0]
    return batch


def padded_batch(family: str, model, lengths=(7, 5, 3), seed: int = 0,
                 fully_padded: bool = True) -> tuple[dict, list[dict]]:
    """A left-padded batch of ``family`` inputs whose samples are all padded differently (text lengths
    ``lengths``), plus one fully padded row, and the samples alone (unpadded) to compare with.

    Text families get random token ids; vision-language families one random image per sample
    (:func:`vlm_inputs`). The fully padded row, when asked for, is the last row of the batch.

    Example:
        >>> batch, samples = padded_batch("llama", tiny_causal_lm("llama"))
        >>> (batch["attention_mask"] == 0).sum(1).tolist(), [s["input_ids"].shape[1] for s in samples]
        ([0, 2, 4, 7], [7, 5, 3])
    """
    g = torch.Generator().manual_seed(seed)
    if family in VISION_FAMILIES:
        samples = [vlm_inputs(family, model, batch=1, text_len=n, seed=seed + b) for b, n in enumerate(lengths)]
    else:
        vocab = model.config.get_text_config().vocab_size
        samples = []
        for n in lengths:
            ids = torch.randint(3, min(vocab, 100), (1, n), generator=g)
            samples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return stack_left_padded(samples, fully_padded=fully_padded), samples


def left_padded_llava_batch(model, text_lens=(6, 3), seeds=(0, 1)) -> tuple[dict, list[dict]]:
    """Single-image LLaVA samples of different lengths stacked into one left-padded batch.

    Returns ``(batch, samples)`` so tests can compare batched results with each sample run alone.

    Example:
        >>> batch, samples = left_padded_llava_batch(tiny_vlm("llava"))
        >>> batch["input_ids"].shape[0], int(batch["attention_mask"][1].sum()) == samples[1]["input_ids"].shape[1]
        (2, True)
    """
    samples = [vlm_inputs("llava", model, batch=1, text_len=n, seed=s) for n, s in zip(text_lens, seeds)]
    width = max(x["input_ids"].shape[1] for x in samples)

    def pad(t):  # [1, N] -> [1, width], zeros on the left
        return torch.cat([torch.zeros(1, width - t.shape[1], dtype=t.dtype), t], dim=1)

    batch = dict(input_ids=torch.cat([pad(x["input_ids"]) for x in samples]),
                 attention_mask=torch.cat([pad(x["attention_mask"]) for x in samples]),
                 pixel_values=torch.cat([x["pixel_values"] for x in samples]))
    return batch, samples


def _llava_next_pixels(model, batch, g):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    sizes = torch.tensor([[32, 32]] * batch)
    n_patches = image_size_to_num_patches((32, 32), model.config.image_grid_pinpoints, 32)
    pixel = torch.randn(batch, n_patches, 3, 32, 32, generator=g)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel, sizes)
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    n_img = feats[0].shape[0] if isinstance(feats, (list, tuple)) else feats.shape[1]
    return n_img, pixel, sizes


# ---- diffusers -------------------------------------------------------------------------------------------------
IMAGE_DENOISERS = ("unet", "sd3", "flux", "pixart", "dit")
#: video denoisers: the AnimateDiff motion UNet (spatial attention per frame, temporal attention per location) and
#: CogVideoX (one joint [text; video] attention over every frame)
VIDEO_DENOISERS = ("animatediff", "cogvideox")
DIFFUSION_FAMILIES = IMAGE_DENOISERS + VIDEO_DENOISERS
#: frames of the tiny video inputs (AnimateDiff: latent frames; CogVideoX: latent frames after 4x compression)
TINY_FRAMES = {"animatediff": 4, "cogvideox": 3}


def tiny_denoiser(family: str = "unet", seed: int = 0):
    """A tiny random diffusers denoiser: UNet2DConditionModel, SD3, Flux, PixArt or DiT transformer."""
    import diffusers

    torch.manual_seed(seed)
    if family == "unet":
        model = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    elif family == "sd3":
        model = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
            joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4)
    elif family == "flux":
        model = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    elif family == "pixart":
        model = diffusers.PixArtTransformer2DModel(
            sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
            cross_attention_dim=16, caption_channels=32, patch_size=2, norm_type="ada_norm_single")
    elif family == "dit":
        model = diffusers.DiTTransformer2DModel(
            sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
            patch_size=2, num_embeds_ada_norm=10)
    elif family == "animatediff":
        model = diffusers.UNetMotionModel.from_unet2d(_tiny_unet2d_for_motion(), _tiny_motion_adapter())
    elif family == "cogvideox":
        model = diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
            text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True)
    else:
        raise KeyError(f"unknown tiny diffusion family {family!r}; choose from {DIFFUSION_FAMILIES}")
    return model.eval()


def _tiny_unet2d_for_motion():
    """The image UNet an AnimateDiff motion UNet is inflated from: three blocks, so that ``up_blocks.1`` and
    ``up_blocks.2`` both hold spatial and temporal (motion) attention."""
    import diffusers

    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=32)


def _tiny_motion_adapter():
    import diffusers

    return diffusers.MotionAdapter(block_out_channels=(32, 32, 32), motion_layers_per_block=1,
                                   motion_norm_num_groups=32, motion_num_attention_heads=2, motion_max_seq_length=16,
                                   use_motion_mid_block=False)


def denoiser_inputs(family: str, batch: int = 2, seed: int = 0) -> dict:
    """Random inputs for :func:`tiny_denoiser` (text length 5; video families :data:`TINY_FRAMES` frames).

    AnimateDiff's motion UNet takes the text per frame (``encoder_hidden_states [B·F, T, C]``), as its pipeline
    passes it."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    t = torch.tensor([10] * batch)
    if family == "unet":
        return dict(sample=rand(batch, 4, 8, 8), timestep=t, encoder_hidden_states=rand(batch, 5, 32))
    if family == "sd3":
        return dict(hidden_states=rand(batch, 4, 8, 8), timestep=t, encoder_hidden_states=rand(batch, 5, 32),
                    pooled_projections=rand(batch, 16))
    if family == "flux":
        return dict(hidden_states=rand(batch, 16, 16), timestep=t.float() / 1000, encoder_hidden_states=rand(batch, 5, 32),
                    pooled_projections=rand(batch, 16), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3))
    if family == "pixart":
        return dict(hidden_states=rand(batch, 4, 8, 8), timestep=t, encoder_hidden_states=rand(batch, 5, 32),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if family == "dit":
        return dict(hidden_states=rand(batch, 4, 8, 8), timestep=t, class_labels=torch.tensor([1] * batch))
    if family == "animatediff":
        frames = TINY_FRAMES[family]
        text = rand(batch, 5, 32)
        return dict(sample=rand(batch, 4, frames, 8, 8), timestep=t,
                    encoder_hidden_states=text.repeat_interleave(frames, dim=0))  # [B·F, T, C]
    if family == "cogvideox":
        return dict(hidden_states=rand(batch, TINY_FRAMES[family], 4, 8, 8), timestep=t,
                    encoder_hidden_states=rand(batch, 5, 32))
    raise KeyError(family)


def sample_inputs(family: str, inputs: dict, b: int, batch: int) -> dict:
    """The inputs of sample ``b`` alone, cut from a batch of ``batch`` made by :func:`denoiser_inputs` (batched
    tensors are sliced; AnimateDiff's per-frame text takes that sample's frames).

    Example:
        >>> one = sample_inputs("animatediff", denoiser_inputs("animatediff"), 1, 2)
        >>> one["sample"].shape[0], one["encoder_hidden_states"].shape[0]
        (1, 4)
    """
    frames = TINY_FRAMES.get(family, 1) if family == "animatediff" else 1
    one = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
            one[key] = value[b:b + 1]
        elif isinstance(value, torch.Tensor) and value.dim() and frames > 1 and value.shape[0] == batch * frames:
            one[key] = value[b * frames:(b + 1) * frames]
        else:
            one[key] = value
    return one


#: the words the tiny tokenizer knows as whole tokens (anything else falls back to characters or <unk>)
TINY_WORDS = ["a", "cat", "dog", "photo", "of", "red", "blue", "car", "on", "the", "grass", "sky"]


def tiny_clip_tokenizer(max_length: int = 8):
    """An in-memory CLIP tokenizer whose vocabulary holds :data:`TINY_WORDS` as single tokens (BPE merges build each
    word left to right). The T5-based tiny pipelines use it too: they only call it like a tokenizer.

    Example:
        >>> tiny_clip_tokenizer()("a red cat")["input_ids"][:5]
        [0, 3, 28, 8, 1]
    """
    import json
    import tempfile

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<unk>": 2}
    merges = []
    for w in TINY_WORDS:  # BPE merges that build each word left to right, so whole words become single tokens
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        current = pieces[0]
        for piece in pieces[1:]:
            if f"{current} {piece}" not in merges:
                merges.append(f"{current} {piece}")
            current += piece
            vocab.setdefault(current, len(vocab))
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = f"{tmp}/vocab.json", f"{tmp}/merges.txt"
        with open(vocab_file, "w") as f:
            json.dump(vocab, f)
        with open(merges_file, "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=max_length, pad_token="<|endoftext|>")


def _clip_text_encoder(vocab_size: int, hidden: int = 32, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=8, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1, projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)).eval()


def _t5_text_encoder(vocab_size: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=2 * d_model, d_kv=8, num_layers=2,
                                   num_heads=2, relative_attention_num_buckets=8, pad_token_id=1,
                                   decoder_start_token_id=0)).eval()


def _tiny_vae(latent_channels: int = 4, **config):
    import diffusers

    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                                   block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                                   up_block_types=("UpDecoderBlock2D",), norm_num_groups=32, sample_size=8,
                                   **config).eval()


def tiny_sd_pipeline(seed: int = 0):
    """A tiny StableDiffusionPipeline assembled offline (random weights, in-memory CLIP tokenizer)."""
    import diffusers

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _clip_text_encoder(len(tokenizer))
    unet = tiny_denoiser("unet", seed=seed)
    vae = _tiny_vae()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=100, steps_offset=1, clip_sample=False)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: tiny pipelines by family; every one is built offline with random weights (pictures show mechanics, not quality)
PIPELINE_FAMILIES = ("sd", "sd3", "flux", "pixart", "animatediff", "cogvideox")


def tiny_pipeline(family: str = "sd", seed: int = 0):
    """A tiny diffusers pipeline of ``family`` (see :data:`PIPELINE_FAMILIES`), random weights, built offline:

    * ``sd``: StableDiffusionPipeline (UNet, DDIM, 100 training steps), 8×8 images ↔ 8×8 latents (the tiny VAEs
      do not downsample);
    * ``sd3``: StableDiffusion3Pipeline (joint attention, flow matching; two CLIP encoders, no T5);
    * ``flux``: FluxPipeline (joint + single-stream attention, flow matching; CLIP + T5);
    * ``pixart``: PixArtAlphaPipeline (DiT with cross-attention, T5, DDIM);
    * ``animatediff``: AnimateDiffPipeline (motion UNet, DDIM), 8×8 frames;
    * ``cogvideox``: CogVideoXPipeline (joint [text; video] attention, v-prediction DDIM, 2x spatial and 4x temporal
      VAE compression), 16×16 frames.

    Example:
        >>> pipe = tiny_pipeline("animatediff")
        >>> type(pipe).__name__, type(pipe.unet).__name__
        ('AnimateDiffPipeline', 'UNetMotionModel')
    """
    import diffusers

    if family == "sd":
        return tiny_sd_pipeline(seed)
    tokenizer = tiny_clip_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if family == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=tiny_denoiser("sd3", seed=seed), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            vae=_tiny_vae(shift_factor=0.0, scaling_factor=1.0), text_encoder=_clip_text_encoder(vocab, 16, 8),
            tokenizer=tokenizer, text_encoder_2=_clip_text_encoder(vocab, 16, 8), tokenizer_2=tiny_clip_tokenizer(),
            text_encoder_3=None, tokenizer_3=None)
    elif family == "flux":
        pipe = diffusers.FluxPipeline(
            transformer=tiny_denoiser("flux", seed=seed), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            vae=_tiny_vae(shift_factor=0.0, scaling_factor=1.0), text_encoder=_clip_text_encoder(vocab, 16),
            tokenizer=tokenizer, text_encoder_2=_t5_text_encoder(vocab), tokenizer_2=tiny_clip_tokenizer())
    elif family == "pixart":
        pipe = diffusers.PixArtAlphaPipeline(
            tokenizer=tokenizer, text_encoder=_t5_text_encoder(vocab), vae=_tiny_vae(),
            transformer=tiny_denoiser("pixart", seed=seed),
            scheduler=diffusers.DDIMScheduler(num_train_timesteps=100, steps_offset=1, clip_sample=False))
    elif family == "animatediff":
        unet2d = _tiny_unet2d_for_motion()
        pipe = diffusers.AnimateDiffPipeline(
            vae=_tiny_vae(), text_encoder=_clip_text_encoder(vocab), tokenizer=tokenizer, unet=unet2d,
            motion_adapter=_tiny_motion_adapter(),
            scheduler=diffusers.DDIMScheduler(num_train_timesteps=100, steps_offset=1, clip_sample=False,
                                              beta_schedule="linear"))
    elif family == "cogvideox":
        vae = diffusers.AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
            down_block_types=("CogVideoXDownBlock3D",) * 2, up_block_types=("CogVideoXUpBlock3D",) * 2,
            norm_num_groups=2, temporal_compression_ratio=4).eval()
        pipe = diffusers.CogVideoXPipeline(
            tokenizer=tokenizer, text_encoder=_t5_text_encoder(vocab), vae=vae,
            transformer=tiny_denoiser("cogvideox", seed=seed),
            scheduler=diffusers.CogVideoXDDIMScheduler(num_train_timesteps=100, prediction_type="v_prediction",
                                                       timestep_spacing="trailing", clip_sample=False,
                                                       set_alpha_to_one=True, rescale_betas_zero_snr=True))
    else:
        raise KeyError(f"unknown tiny pipeline family {family!r}; choose from {PIPELINE_FAMILIES}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latent_blind(pipe):
    """Make ``pipe``'s denoiser ignore its latent input (replaced by a fixed random pattern of the same shape), so its
    output depends on the timestep and the text only. Under this hook DDIM inversion is the exact inverse of the
    sampler, which is how attnkit tests reconstruction without real weights. Returns the hook (``.remove()`` it).

    Example:
        >>> pipe = tiny_pipeline("sd")
        >>> hook = latent_blind(pipe)
        >>> t, text = torch.tensor(5), torch.zeros(1, 8, 32)
        >>> a = pipe.unet(torch.zeros(1, 4, 8, 8), t, text).sample
        >>> torch.equal(a, pipe.unet(torch.ones(1, 4, 8, 8), t, text).sample)
        True
        >>> hook.remove()
    """
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None) or pipe

    def fixed(x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(1234)
        return torch.randn(tuple(x.shape[1:]), generator=g).to(x)[None].expand_as(x).contiguous()

    def pre(module, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return (fixed(args[0]),) + tuple(args[1:]), kwargs
        key = "sample" if "sample" in kwargs else "hidden_states"
        return args, {**kwargs, key: fixed(kwargs[key])}

    return denoiser.register_forward_pre_hook(pre, with_kwargs=True)
