"""Fixtures for the eval tests (builders live in eval_fixtures.py so test modules can import them)."""

import pytest

from eval_fixtures import make_byte_tokenizer, make_tiny_llama


@pytest.fixture(scope="session")
def byte_tok():
    return make_byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny_llama()
