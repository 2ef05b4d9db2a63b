"""Flax NNX models: the decoder, heads on top of it, checkpoint I/O, log-probs and sampling."""

from jaxpref.models.decoder import Decoder, DecoderConfig, KVCache
from jaxpref.models.heads import CausalLMWithValueHead, PreferenceEmbeddingModel, RewardModel
from jaxpref.models.hf_io import from_pretrained, save_pretrained

__all__ = [
    "CausalLMWithValueHead",
    "Decoder",
    "DecoderConfig",
    "KVCache",
    "PreferenceEmbeddingModel",
    "RewardModel",
    "from_pretrained",
    "save_pretrained",
]
