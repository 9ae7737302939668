"""The model families of the conformance matrix: how to build each one, its inputs, and how to read its output.

A :class:`Family` is built once per test worker (``family(name)`` caches it) and holds the stock model, a second
instance, half-precision copies, a left-padded batch whose samples are padded differently plus a fully padded row
(when the stock model can run one), each sample alone, and the stock outputs they are compared with.
"""

from __future__ import annotations

import copy
import functools

import torch

from attnkit.hooks.diffusers import DiffusersAdapter
from attnkit.hooks.transformers import TESTED_FAMILIES, TransformersAdapter
from attnkit.testing import (
    DIFFUSION_FAMILIES,
    VISION_FAMILIES,
    denoiser_inputs,
    padded_batch,
    stack_left_padded,
    tiny_causal_lm,
    tiny_denoiser,
    tiny_sd_pipeline,
    tiny_vlm,
)

TEXT = tuple(f for f in TESTED_FAMILIES if f not in VISION_FAMILIES)
VLM = tuple(VISION_FAMILIES)
REAL = ("smollm2", "gemma3-270m")
DIFFUSION = tuple(DIFFUSION_FAMILIES) + ("sd-pipeline",)
FAMILIES = TEXT + VLM + REAL + DIFFUSION
#: sentences of different lengths for the real models (left padded by their tokenizers)
PROMPTS = ("The capital of France is", "Water boils at a temperature of one hundred", "Cats are")


class Family:
    """One family of the matrix (see the module docstring)."""

    def __init__(self, name: str):
        self.name = name
        self.kind = ("text" if name in TEXT else "vlm" if name in VLM else "real" if name in REAL else
                     "pipeline" if name == "sd-pipeline" else "denoiser")
        self.model = self._build(seed=0)
        self.description = (DiffusersAdapter(self.model) if self.diffusion else TransformersAdapter(self.model)).description
        self.note = ""
        if self.diffusion:
            self.inputs = self._diffusion_inputs()
            self.samples = None
        else:
            self.batch, self.samples = self._token_batch()
            self.real_batch = self._with_positions(stack_left_padded(self.samples))  # no fully padded row

    @property
    def diffusion(self) -> bool:
        return self.kind in ("pipeline", "denoiser")

    @property
    def tokens(self) -> bool:
        return not self.diffusion

    # ---- models -----------------------------------------------------------------------------------------------
    def _build(self, seed: int):
        if self.kind == "text":
            return tiny_causal_lm(self.name, seed=seed)
        if self.kind == "vlm":
            return tiny_vlm(self.name, seed=seed)
        if self.kind == "real":
            return _real_model(self.name)[0]
        if self.kind == "pipeline":
            return tiny_sd_pipeline(seed=seed)
        return tiny_denoiser(self.name, seed=seed)

    def second_model(self):
        """Another model of the family (a copy for the real models, a new seed for tiny ones)."""
        if self.kind == "real":
            return copy.deepcopy(self.model)
        return self._build(seed=1)

    @functools.lru_cache(maxsize=None)
    def half_model(self, dtype: torch.dtype):
        model = copy.deepcopy(self.model)
        if self.kind == "pipeline":
            return model.to(dtype=dtype)
        return model.to(dtype)

    def inner(self):
        """A part of the model that can be attached on its own (the decoder, a pipeline's denoiser), or None."""
        if self.kind == "pipeline":
            return self.model.unet
        if self.tokens:
            from attnkit.hooks.transformers import text_model_of

            return text_model_of(self.model)
        return None

    # ---- inputs -------------------------------------------------------------------------------------------------
    def _token_batch(self):
        if self.kind == "real":
            tokenizer = _real_model(self.name)[1]
            samples = [dict(tokenizer([p], return_tensors="pt")) for p in PROMPTS]
            samples = [{k: v for k, v in s.items() if k in ("input_ids", "attention_mask")} for s in samples]
            batch = stack_left_padded(samples, fully_padded=True)
        else:
            batch, samples = padded_batch(self.name, self.model, fully_padded=True)
        batch = self._with_positions(batch)
        try:
            with torch.no_grad():
                self.model(**batch)
        except Exception as err:  # noqa: BLE001 - some stock models cannot run a row with no real token
            self.note = f"the stock model cannot run a fully padded row ({type(err).__name__}), tested without it"
            batch = self._with_positions(stack_left_padded(samples, fully_padded=False))
        return batch, samples

    def _with_positions(self, batch: dict) -> dict:
        """Position ids from the mask, as ``generate`` computes them (absolute-position models such as GPT-2 need
        them to give a left-padded sample the positions it has alone); VLMs compute their own."""
        if self.kind in ("text", "real"):
            batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        return batch

    def _diffusion_inputs(self):
        if self.kind == "pipeline":
            return dict(prompt=["a photo of a cat", "a dog on the grass"], num_inference_steps=2, output_type="pt")
        return denoiser_inputs(self.name, batch=2)

    @property
    def has_padded_row(self) -> bool:
        return self.tokens and not bool(self.batch["attention_mask"][-1].any())

    def real_rows(self) -> list[int]:
        """Rows of the batch holding a real sample (not the fully padded one)."""
        return list(range(len(self.samples)))

    def bad_input(self):
        """Inputs that make the stock forward raise (a token id outside the vocabulary, a wrongly shaped latent)."""
        if self.tokens:
            bad = {k: v for k, v in self.samples[0].items()}
            ids = bad["input_ids"].clone()
            ids[0, -1] = self.model.config.get_text_config().vocab_size + 10
            bad["input_ids"] = ids
            return bad
        if self.kind == "pipeline":
            return dict(prompt=["a cat"], num_inference_steps=2, output_type="pt", height=3, width=3)
        bad = dict(self.inputs)
        key = "sample" if "sample" in bad else "hidden_states"
        if self.name == "cogvideox":  # [B, F, C, h, w]: channels are dim 2
            bad[key] = bad[key][:, :, :1]
        else:
            bad[key] = bad[key][:, :1]  # one input channel instead of the model's
        return bad

    # ---- outputs -----------------------------------------------------------------------------------------------
    def run(self, model, inputs=None, **extra):
        """The output compared by the matrix: logits, the denoiser's sample, or the pipeline's images."""
        with torch.no_grad():
            if self.kind == "pipeline":
                kwargs = dict(inputs or self.inputs)
                kwargs.update(extra)
                return model(generator=torch.Generator().manual_seed(0), **kwargs).images
            if self.kind == "denoiser":
                out = model(**(inputs or self.inputs))
                return out[0] if isinstance(out, tuple) else out.sample
            return model(**(inputs if inputs is not None else self.batch), **extra).logits

    @functools.cached_property
    def stock(self):
        return self.run(self.model)

    @functools.cached_property
    def stock_batching_gap(self) -> float:
        """How far the stock model's batched outputs are from each sample run alone, relative to the logit scale
        (SDPA kernels differ slightly with and without padding masks, more so on older torch)."""
        gap = 0.0
        for b, sample in enumerate(self.samples):
            alone = self.run(self.model, sample)[0]  # [N, V]
            batched = self.stock[b, -alone.shape[0]:]
            gap = max(gap, float((batched - alone).abs().max()) / max(1.0, float(alone.abs().max())))
        return gap


@functools.lru_cache(maxsize=None)
def family(name: str) -> Family:
    return Family(name)


@functools.lru_cache(maxsize=None)
def _real_model(name: str):
    from attnkit.models import load_gemma3, load_smollm2

    model, tokenizer = load_smollm2() if name == "smollm2" else load_gemma3()
    tokenizer.padding_side = "left"
    return model, tokenizer
