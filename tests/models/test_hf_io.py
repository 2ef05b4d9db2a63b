"""Hugging Face checkpoint parity: tiny random models built with `transformers` (PyTorch CPU)."""

import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jaxpref.models.decoder import DecoderConfig
from jaxpref.models.hf_io import INDEX_FILE, SINGLE_FILE, from_pretrained, save_pretrained
from jaxpref.sharding import make_mesh

VOCAB = 101
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(
        **COMMON,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=5),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=8),
    "gemma": lambda: transformers.GemmaConfig(**COMMON, head_dim=8),
}


def _torch_model(family: str):
    torch.manual_seed(0)
    config = FAMILIES[family]()
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms and biases start at constants: perturb them so offsets and biases matter
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def batch():
    """Random ids, the second row right-padded after 9 tokens."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (2, 12))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask


def _torch_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def _our_logits(model, ids, mask) -> np.ndarray:
    hidden = model(jnp.asarray(ids), segment_ids=jnp.asarray(mask))
    return np.asarray(model.logits(hidden))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers_and_round_trip(family, batch, tmp_path):
    ids, mask = batch
    valid = mask.astype(bool)
    torch_model = _torch_model(family)
    torch_model.save_pretrained(tmp_path / "hf")
    expected = _torch_logits(torch_model, ids, mask)

    ours = from_pretrained(tmp_path / "hf")
    assert ours.config.model_type == family
    np.testing.assert_allclose(_our_logits(ours, ids, mask)[valid], expected[valid], atol=1e-4, rtol=0)

    save_pretrained(ours, tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    np.testing.assert_allclose(_torch_logits(reloaded, ids, mask)[valid], expected[valid], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    _torch_model("llama").save_pretrained(folder)
    return folder


def test_sharded_checkpoint_with_index_and_mesh(llama_folder, batch, tmp_path):
    ids, mask = batch
    model = from_pretrained(llama_folder)
    save_pretrained(model, tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / INDEX_FILE).exists() and not (tmp_path / SINGLE_FILE).exists()
    assert len(set(json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"].values())) > 1

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = from_pretrained(tmp_path, mesh=mesh)
    q_kernel = sharded.layers[0].self_attn.q_proj.kernel[...]
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(q_kernel.addressable_shards) == 8
    np.testing.assert_allclose(_our_logits(sharded, ids, mask), _our_logits(model, ids, mask), atol=1e-5)


def test_bf16_parameters(llama_folder, batch):
    ids, mask = batch
    model = from_pretrained(llama_folder, dtype=jnp.bfloat16)
    assert model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    expected = _our_logits(from_pretrained(llama_folder), ids, mask)
    # bf16 keeps 8 significant bits: every weight, activation and logit is rounded with relative error
    # <= 2^-8, and the rounded stages (embedding, 2 layers, norm, head) add a few such errors of the
    # logits' scale. Allowed: 4 * 2^-8 * max|logit| (7e-3 here); measured 1.24 * 2^-8 * max|logit|.
    tolerance = 4 * 2.0**-8 * np.abs(expected).max()
    assert np.abs(_our_logits(model, ids, mask).astype(np.float32) - expected).max() <= tolerance
    # Tight enough to see a wrong load: a transposed (square) o_proj moves the logits by 0.22, 30x it.
    # (q/k barely matter in this random model, whose attention is near uniform: the float32 test has them.)
    o_proj = model.layers[1].self_attn.o_proj
    o_proj.kernel[...] = o_proj.kernel[...].T
    assert np.abs(_our_logits(model, ids, mask).astype(np.float32) - expected).max() > 10 * tolerance


def _rewrite_checkpoint(src, dst, edit):
    tensors = load_file(src / SINGLE_FILE)
    edit(tensors)
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, dst / SINGLE_FILE, metadata={"format": "pt"})


def test_missing_tensor_is_named(llama_folder, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite_checkpoint(llama_folder, tmp_path / "ckpt", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=re.escape(name)):
        from_pretrained(tmp_path / "ckpt")


def test_misshaped_tensor_is_named(llama_folder, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"

    def truncate(tensors):
        tensors[name] = tensors[name][:-1]

    _rewrite_checkpoint(llama_folder, tmp_path / "ckpt", truncate)
    with pytest.raises(ValueError, match=re.escape(name) + ".*shape"):
        from_pretrained(tmp_path / "ckpt")


def test_unused_tensors_are_reported(llama_folder, tmp_path, caplog):
    _rewrite_checkpoint(llama_folder, tmp_path / "ckpt", lambda t: t.update(extra=np.zeros(3, np.float32)))
    with caplog.at_level(logging.WARNING):
        from_pretrained(tmp_path / "ckpt")
    assert "extra" in caplog.text


def test_config_round_trip():
    config = DecoderConfig.from_hf(FAMILIES["qwen3"]().to_dict())
    assert config.qk_norm and config.num_kv_heads == 2 and config.resolved_head_dim == 8
    assert DecoderConfig.from_hf(config.to_hf()) == config
