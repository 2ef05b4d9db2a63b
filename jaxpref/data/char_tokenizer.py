"""A tiny character-level Hugging Face tokenizer for the bundled tasks.

It is an ordinary ``PreTrainedTokenizerFast`` saved as ``tokenizer.json`` and loads with
``AutoTokenizer.from_pretrained(folder)`` like any local tokenizer. The copy bundled in
``jaxpref/recipes/assets/char_tokenizer`` was written by :func:`save_char_tokenizer`.
"""

from __future__ import annotations

import pathlib

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
CHARACTERS = "0123456789>abcdefghijklmnopqrstuvwxyz +-=*/.,:;?!'\"()[]"


def save_char_tokenizer(folder: str | pathlib.Path, characters: str = CHARACTERS) -> PreTrainedTokenizerFast:
    """Builds the tokenizer (specials first: pad=0, bos=1, eos=2, unk=3) and saves it to ``folder``."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    for character in characters:
        vocab.setdefault(character, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.save_pretrained(folder)
    return tokenizer
