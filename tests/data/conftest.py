"""Fixtures of the data tests: the bundled char tokenizer, with and without a chat template."""

import pytest
from transformers import AutoTokenizer

from .helpers import CHAR_TOKENIZER, CHAT_TEMPLATE


@pytest.fixture(scope="session")
def char_tokenizer():
    return AutoTokenizer.from_pretrained(CHAR_TOKENIZER)


@pytest.fixture(scope="session")
def chat_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(CHAR_TOKENIZER)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
