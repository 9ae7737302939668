"""Shared tiny pipelines for the diffusion steering tests (built once per session: building is the slow part)."""

import pytest
import torch

from attnkit.testing import tiny_sd_pipeline


@pytest.fixture(scope="session")
def sd_pipe():
    """The core's tiny StableDiffusionPipeline (word-level tokenizer: most words become <|endoftext|>)."""
    return tiny_sd_pipeline()


@pytest.fixture(scope="session")
def char_pipe(sd_pipe):
    """The same UNet/VAE/scheduler with a character-level CLIP tokenizer (every word is several tokens) and a
    matching tiny text encoder, so that prompt-to-prompt's word → token bookkeeping is exercised."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from attnkit.interventions.steering.prompt_to_prompt import char_tokenizer

    tokenizer = char_tokenizer(max_len=24)
    torch.manual_seed(1)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=24,
                                           bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    pipe = diffusers.StableDiffusionPipeline(**{**sd_pipe.components, "tokenizer": tokenizer, "text_encoder": encoder})
    pipe.set_progress_bar_config(disable=True)
    return pipe
