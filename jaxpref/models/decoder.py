"""One decoder-only transformer for the Llama family and its relatives, as Flax NNX modules.

Family differences are configuration, not subclasses:

============  ==========================================================================
Llama 2/3     RMSNorm, SwiGLU, RoPE (llama3 frequency scaling), GQA
Mistral       Llama + optional sliding-window attention
Qwen2         Llama + bias on the q/k/v projections
Qwen3         Llama + RMSNorm on queries and keys per head (before RoPE)
Gemma         embeddings scaled by sqrt(hidden), RMSNorm with (1 + w), GeGLU (tanh), tied head
============  ==========================================================================

Module attribute names follow the Hugging Face checkpoints (``embed_tokens``, ``layers[i].self_attn.q_proj``,
...), so :mod:`jaxpref.models.hf_io` maps names mechanically. Linear kernels are ``[in, out]``.

Inputs are token ids ``[batch, seq]`` with optional ``positions`` (RoPE positions), ``segment_ids``
(0 = padding; tokens attend only within their segment, which is how several sequences are packed in
one row) and ``prefix_segment_ids`` (a segment a token may also attend to: how the chosen and the
rejected response of a pair share one computed prompt). Attention is causal by position.
The forward pass returns final hidden states; the LM head is applied by :meth:`Decoder.logits`, or
chunk by chunk by :func:`jaxpref.models.logprobs.sequence_logps`, so full logits are optional.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn", "blocked")
# "blocked" splits the queries into at most this many blocks of at least this many tokens.
MAX_ATTENTION_BLOCKS, MIN_ATTENTION_BLOCK = 8, 64


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture hyperparameters; :meth:`from_hf` reads a Hugging Face ``config.json``."""

    model_type: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # default hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or {"rope_type": "linear" | "llama3", "factor": ..., ...} as in Hugging Face configs;
    # stored as sorted (key, value) pairs so the config stays hashable (usable as a jit static arg).
    rope_scaling: Mapping[str, Any] | tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    scale_embeddings: bool = False  # Gemma: multiply embeddings by sqrt(hidden_size)
    norm_weight_offset: float = 0.0  # Gemma: RMSNorm scales by (1 + weight)
    hidden_act: str = "silu"  # or "gelu_pytorch_tanh" (Gemma)
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32  # compute dtype; bf16 on GPU/TPU
    remat: bool = False  # recompute each layer in the backward pass to save activation memory
    # "xla" (jax.nn.dot_product_attention), "cudnn" (flash attention, GPU, bf16/fp16), "blocked"
    # (causal query blocks, XLA einsums) or None: cuDNN where it applies, blocked on CPU, else XLA.
    attention_implementation: str | None = None

    def __post_init__(self):
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if self.model_type not in _MODEL_TYPES:
            raise ValueError(f"`model_type`={self.model_type!r} is not supported; supported: {_MODEL_TYPES}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"`num_heads`={self.num_heads} must be a multiple of `num_kv_heads`={self.num_kv_heads}."
            )
        if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"`attention_implementation`={self.attention_implementation!r} must be one of "
                f"{ATTENTION_IMPLEMENTATIONS}."
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"`hidden_act`={self.hidden_act!r} must be one of {sorted(_ACTIVATIONS)}.")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> DecoderConfig:
        """Builds a config from a Hugging Face ``config.json`` dict (``overrides`` win)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in _MODEL_TYPES:
            raise ValueError(
                f"config.json `model_type`={model_type!r} is not supported; supported: {_MODEL_TYPES}."
            )
        # transformers 5 nests RoPE settings in `rope_parameters`; older configs use rope_theta/rope_scaling.
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
        rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        is_gemma = model_type == "gemma"
        windowed = hf.get("sliding_window") is not None and hf.get("use_sliding_window", True)
        if windowed and hf.get("max_window_layers", hf["num_hidden_layers"]) < hf["num_hidden_layers"]:
            raise ValueError(
                "config.json sets `max_window_layers` below `num_hidden_layers` (sliding window on some "
                "layers only), which this decoder does not support; set `use_sliding_window` to false."
            )
        fields = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            rope_scaling=None if rope_type == "default" else {**scaling, "rope_type": rope_type},
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", True) else None,
            tie_word_embeddings=hf.get("tie_word_embeddings", is_gemma),
            scale_embeddings=is_gemma,
            norm_weight_offset=1.0 if is_gemma else 0.0,
            hidden_act=hf.get("hidden_activation") or hf.get("hidden_act", "silu"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(hf["eos_token_id"])
            if isinstance(hf.get("eos_token_id"), list)
            else hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        if is_gemma and fields["hidden_act"] == "gelu":
            fields["hidden_act"] = "gelu_pytorch_tanh"  # Gemma checkpoints say "gelu" but mean the tanh form
        return cls(**{**fields, **overrides})

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict ``transformers`` reads for this architecture."""
        architectures = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
            "gemma": "GemmaForCausalLM",
        }
        hf = {
            "architectures": [architectures[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.resolved_head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id)
            if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": jnp.dtype(self.param_dtype).name,
        }
        if self.model_type == "gemma":
            hf["hidden_activation"] = self.hidden_act
        else:
            hf["hidden_act"] = self.hidden_act
        if self.model_type in ("llama", "qwen3"):
            hf["attention_bias"] = self.o_bias
        if self.model_type == "llama":
            hf["mlp_bias"] = self.mlp_bias
        if self.model_type in ("mistral", "qwen2", "qwen3"):
            hf["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            hf["use_sliding_window"] = self.sliding_window is not None
        return hf


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


# --------------------------------------------------------------------------------------------
# Rotary position embeddings.
# --------------------------------------------------------------------------------------------


def rope_inverse_frequencies(config: DecoderConfig) -> Array:  # [head_dim // 2]
    """RoPE frequencies, with "linear" or "llama3" scaling when the config asks for it."""
    dim = config.resolved_head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if not config.rope_scaling:
        return inv_freq
    scaling = dict(config.rope_scaling)
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling["rope_type"] != "llama3":
        raise ValueError(
            f"`rope_scaling.rope_type`={scaling['rope_type']!r} is not supported (linear, llama3)."
        )
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original_context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelength > original_context / low, inv_freq / factor, inv_freq)
    smooth = (original_context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelength >= original_context / high) & (wavelength <= original_context / low)
    return jnp.where(is_medium, smoothed, scaled)


class RotaryTables(NamedTuple):
    """cos and sin of every token's rotation angles, ``[batch, seq, 1, head_dim // 2]`` float32.

    Computed once per forward (:func:`rotary_tables`) and shared by every layer's queries and keys:
    XLA:CPU's accurate cos and sin cost ~15x the rotation itself.
    """

    cos: Array
    sin: Array


def rotary_tables(positions: Array, inv_freq: Array) -> RotaryTables:  # positions [batch, seq]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, seq, head_dim // 2]

    def tables(angles):
        return jnp.cos(angles), jnp.sin(angles)

    if jax.default_backend() != "cpu":
        cos, sin = tables(angles)
    else:
        # XLA:CPU fuses cos and sin into every rotation that reads them (each head, each layer,
        # forward and backward) and so recomputes them per element: ~7% of a small model's DPO
        # step. A conditional's result is materialised once (both branches agree; an
        # optimization_barrier does not survive XLA:CPU's pipeline).
        cos, sin = jax.lax.cond(jnp.all(jnp.isfinite(angles)), tables, tables, angles)
    return RotaryTables(cos[:, :, None, :], sin[:, :, None, :])


def apply_rope(x: Array, rope: RotaryTables) -> Array:
    """Rotates ``x`` ``[batch, seq, heads, head_dim]`` by its tokens' angles (half-split layout)."""
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate(
        [first * rope.cos - second * rope.sin, second * rope.cos + first * rope.sin], axis=-1
    )
    return rotated.astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Attention masks: segments, shared prefixes, causality by position, sliding window.
# --------------------------------------------------------------------------------------------


def attention_mask(
    q_segment_ids: Array,  # [batch, q]
    q_positions: Array,  # [batch, q]
    kv_segment_ids: Array,  # [batch, kv]
    kv_positions: Array,  # [batch, kv]
    q_prefix_segment_ids: Array | None = None,  # [batch, q]
    sliding_window: int | None = None,
) -> Array:  # [batch, 1, q, kv] bool
    """Query token i sees key j when j is a real token (segment != 0) of i's segment or of i's
    prefix segment, and j's position is not after i's (and within the sliding window)."""
    kv_segment = kv_segment_ids[:, None, :]
    visible = kv_segment == q_segment_ids[:, :, None]
    if q_prefix_segment_ids is not None:
        visible |= kv_segment == q_prefix_segment_ids[:, :, None]
    distance = q_positions[:, :, None] - kv_positions[:, None, :]
    visible &= (kv_segment != 0) & (distance >= 0)
    if sliding_window is not None:
        visible &= distance < sliding_window
    return visible[:, None, :, :]


class AttentionMask(NamedTuple):
    """What each query may attend to: the dense mask, and, for cuDNN, per-row lengths that make
    the dense mask unnecessary when every row is one causal sequence followed by padding."""

    visible: Array  # [batch, 1, q, kv] bool
    lengths: Array | None = None  # [batch] real tokens per row
    single_sequence_rows: Array | None = None  # [] bool: each row is positions 0..length-1, then padding


def _single_sequence_rows(
    segment_ids: Array,  # [batch, seq]
    positions: Array,  # [batch, seq]
) -> tuple[Array, Array]:  # [batch] lengths, [] bool
    """Whether every row holds one segment at positions 0.. from its first token, then padding
    (the layout of one-sequence-per-row batches), and the rows' lengths."""
    lengths = jnp.sum(segment_ids != 0, axis=-1)
    index = jnp.arange(segment_ids.shape[-1])
    real = index < lengths[:, None]
    layout = (segment_ids == jnp.where(real, segment_ids[:, :1], 0)) & (~real | (positions == index))
    return lengths.astype(jnp.int32), jnp.all(layout) & jnp.all(lengths > 0)


# --------------------------------------------------------------------------------------------
# Modules.
# --------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """RMS normalisation in float32, scaled by ``offset + weight`` (offset 1 for Gemma)."""

    def __init__(self, dim: int, *, eps: float, weight_offset: float, param_dtype):
        init = nnx.initializers.zeros if weight_offset else nnx.initializers.ones
        self.weight = nnx.Param(init(jax.random.key(0), (dim,), param_dtype))
        self.eps = eps
        self.weight_offset = weight_offset

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.weight_offset:  # Gemma scales in float32, then rounds
            return (normed * (self.weight_offset + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        # Llama / Qwen round to the input dtype first, then scale (matters in bf16 only)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def _rms_norm(config: DecoderConfig, dim: int) -> RMSNorm:
    return RMSNorm(
        dim, eps=config.rms_norm_eps, weight_offset=config.norm_weight_offset, param_dtype=config.param_dtype
    )


def _flat_dot_general(lhs, rhs, dimension_numbers, **kwargs):
    """``nnx.Linear``'s dot_general with the leading ``[batch, seq]`` axes flattened into one.

    Same products, same results. With a 3-D ``[batch, seq, in] @ [in, out]`` the kernel gradient
    contracts two axes (batch and seq), which XLA:CPU runs on a slow generic kernel behind transposed
    copies of the activations; over one token axis forward + backward is ~20% faster on CPU.
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if lhs.ndim > 2 and tuple(lhs_contract) == (lhs.ndim - 1,) and not lhs_batch and not rhs_batch:
        flat = jax.lax.dot_general(
            lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), tuple(rhs_contract)), ((), ())), **kwargs
        )
        return flat.reshape(*lhs.shape[:-1], *flat.shape[1:])
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, **kwargs)


def _linear(config: DecoderConfig, rngs: nnx.Rngs, d_in: int, d_out: int, bias: bool) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        dot_general=_flat_dot_general,
        rngs=rngs,
    )


class KVCache(NamedTuple):
    """Keys and values of every layer for incremental decoding, plus their segments and positions."""

    keys: tuple[Array, ...]  # per layer [batch, max_len, kv_heads, head_dim]
    values: tuple[Array, ...]  # per layer [batch, max_len, kv_heads, head_dim]
    segment_ids: Array  # [batch, max_len], 0 for empty slots and padding
    positions: Array  # [batch, max_len]
    index: Array  # [] next slot to write

    @classmethod
    def init(cls, config: DecoderConfig, batch: int, max_len: int) -> KVCache:
        shape = (batch, max_len, config.num_kv_heads, config.resolved_head_dim)
        zeros = tuple(jnp.zeros(shape, config.dtype) for _ in range(config.num_layers))
        return cls(
            zeros,
            zeros,
            jnp.zeros((batch, max_len), jnp.int32),
            jnp.zeros((batch, max_len), jnp.int32),
            jnp.zeros((), jnp.int32),
        )


def attention_implementation(config: DecoderConfig, dtype, seq: int, kv: int) -> str:
    """The attention kernel a layer uses: the config's choice, or by default for training-shaped
    calls (``seq == kv``) cuDNN's flash attention in half precision on a GPU and causal query blocks
    on CPU, else XLA's ``jax.nn.dot_product_attention``."""
    if config.attention_implementation is not None:
        return config.attention_implementation
    head_dim = config.resolved_head_dim
    cudnn_shape = seq == kv and head_dim % 8 == 0 and head_dim <= 128
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if cudnn_shape and half and jax.default_backend() == "gpu":
        return "cudnn"
    return "blocked" if seq == kv and jax.default_backend() == "cpu" else "xla"


def _cpu_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def blocked_causal_attention(
    q: Array,  # [batch, seq, heads, head_dim]
    k: Array,  # [batch, seq, kv_heads, head_dim]
    v: Array,  # [batch, seq, kv_heads, head_dim]
    visible: Array,  # [batch, 1, seq, seq] bool, False above the diagonal
    num_blocks: int,
) -> Array:  # [batch, seq, heads, head_dim]
    """Softmax attention over ``num_blocks`` query blocks, block i reading only the keys up to its end.

    Exact when no query sees a later key (the decoder's training masks), and it skips the blocks
    above the diagonal: (n + 1) / 2n of the dense score FLOPs. Heads sit before the tokens, so each
    product is one batched matmul over contiguous ``[tokens, head_dim]`` tiles; a query group of a
    key head is folded into the token axis. On XLA:CPU this runs the decoder's attention ~2x faster
    than ``jax.nn.dot_product_attention``, whose scores are laid out around the head axes.
    """
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    # [batch, kv_heads, groups, seq, head_dim]: queries of one key head side by side.
    q = jnp.transpose(q.reshape(batch, seq, kv_heads, groups, head_dim), (0, 2, 3, 1, 4))
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [batch, kv_heads, seq, head_dim]
    out = _head_major_attention(q, k, v, visible, num_blocks)  # [batch, kv_heads, groups, seq, head_dim]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, seq, heads, head_dim)


def _query_blocks(seq: int, num_blocks: int) -> list[tuple[int, int]]:
    ends = [round(seq * (i + 1) / num_blocks) for i in range(num_blocks)]
    return list(zip([0, *ends[:-1]], ends))


def _attention_forward(q, k, v, visible, num_blocks):
    """:func:`_head_major_attention` and each block's probabilities ``[batch, kv_heads, rows, end]``."""
    batch, kv_heads, groups, seq, head_dim = q.shape
    outputs, block_probs = [], []
    for start, end in _query_blocks(seq, num_blocks):
        block = q[:, :, :, start:end].reshape(batch, kv_heads, groups * (end - start), head_dim)
        scores = jnp.einsum("bkqd,bksd->bkqs", block, k[:, :, :end], preferred_element_type=jnp.float32)
        scores = scores.reshape(batch, kv_heads, groups, end - start, end)
        scores = jnp.where(visible[:, :, None, start:end, :end], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        probs = probs.reshape(batch, kv_heads, groups * (end - start), end)
        out = jnp.einsum("bkqs,bksd->bkqd", probs, v[:, :, :end])
        outputs.append(out.reshape(batch, kv_heads, groups, end - start, head_dim))
        block_probs.append(probs)
    return jnp.concatenate(outputs, axis=3), block_probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _head_major_attention(
    q: Array,  # [batch, kv_heads, groups, seq, head_dim], scaled
    k: Array,  # [batch, kv_heads, seq, head_dim]
    v: Array,  # [batch, kv_heads, seq, head_dim]
    visible: Array,  # [batch, 1, seq, seq] bool
    num_blocks: int,
) -> Array:  # [batch, kv_heads, groups, seq, head_dim]
    """The blocked attention, with its backward pass written out: plain autodiff pads every block's
    key and value gradients to full length before adding them up; here they go into the keys and
    values in place (fewer operations, which XLA:CPU pays for one by one)."""
    return _attention_forward(q, k, v, visible, num_blocks)[0]


def _head_major_attention_fwd(q, k, v, visible, num_blocks):
    out, block_probs = _attention_forward(q, k, v, visible, num_blocks)
    return out, (q, k, v, visible, block_probs)


def _head_major_attention_bwd(num_blocks, residuals, d_out):
    q, k, v, visible, block_probs = residuals
    batch, kv_heads, groups, seq, head_dim = q.shape
    # Key and value gradients contract a block's rows: [rows, keys]^T [rows, head_dim].
    contract_rows = functools.partial(jnp.einsum, "bkqs,bkqd->bksd", preferred_element_type=jnp.float32)
    d_q_blocks = []
    d_k = jnp.zeros(k.shape, jnp.float32)
    d_v = jnp.zeros(v.shape, jnp.float32)
    for (start, end), probs in zip(_query_blocks(seq, num_blocks), block_probs):
        rows = groups * (end - start)
        d_block = d_out[:, :, :, start:end].reshape(batch, kv_heads, rows, head_dim)
        q_block = q[:, :, :, start:end].reshape(batch, kv_heads, rows, head_dim)
        d_probs = jnp.einsum("bkqd,bksd->bkqs", d_block, v[:, :, :end], preferred_element_type=jnp.float32)
        d_probs = d_probs.reshape(batch, kv_heads, groups, end - start, end)
        probs_5d = probs.reshape(d_probs.shape)
        d_scores = probs_5d * (d_probs - jnp.sum(probs_5d * d_probs, axis=-1, keepdims=True))
        d_scores = jnp.where(visible[:, :, None, start:end, :end], d_scores, 0.0)
        d_scores = d_scores.reshape(batch, kv_heads, rows, end).astype(q.dtype)
        d_q = jnp.einsum("bkqs,bksd->bkqd", d_scores, k[:, :, :end], preferred_element_type=jnp.float32)
        d_q_blocks.append(d_q.reshape(batch, kv_heads, groups, end - start, head_dim))
        d_k = d_k.at[:, :, :end].add(contract_rows(d_scores, q_block))
        d_v = d_v.at[:, :, :end].add(contract_rows(probs, d_block))
    d_q = jnp.concatenate(d_q_blocks, axis=3).astype(q.dtype)
    return d_q, d_k.astype(k.dtype), d_v.astype(v.dtype), None


_head_major_attention.defvjp(_head_major_attention_fwd, _head_major_attention_bwd)


def _attention(
    config: DecoderConfig,
    q: Array,  # [batch, seq, heads, head_dim]
    k: Array,  # [batch, kv, kv_heads, head_dim]
    v: Array,  # [batch, kv, kv_heads, head_dim]
    mask: AttentionMask,
) -> Array:  # [batch, seq, heads, head_dim]
    seq, kv = q.shape[1], k.shape[1]
    implementation = attention_implementation(config, q.dtype, seq, kv)
    if implementation == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask.visible)
    if implementation == "blocked":
        if seq != kv:
            raise ValueError(f"'blocked' attention needs as many keys as queries, got {kv} and {seq}.")
        num_blocks = max(1, min(MAX_ATTENTION_BLOCKS, seq // MIN_ATTENTION_BLOCK))
        # XLA:CPU runs a block's small batched matmuls and softmax on about one thread; groups of
        # rows computed independently run side by side, one per core (~15% faster on 2 cores).
        batch = q.shape[0]
        groups = min(batch, _cpu_cores()) if jax.default_backend() == "cpu" else 1
        ends = [round(batch * (i + 1) / groups) for i in range(groups)]
        return jnp.concatenate(
            [
                blocked_causal_attention(q[s:e], k[s:e], v[s:e], mask.visible[s:e], num_blocks)
                for s, e in zip([0, *ends[:-1]], ends)
            ]
        )

    # cuDNN turns a dense mask into an additive bias, which every head reads again. Every row
    # layout here (padding, packed segments, shared prefixes) only attends to keys at or before the
    # query's index, so the causal flag is exact too and lets the kernel skip the tiles above the
    # diagonal: half the attention FLOPs.
    def dense() -> Array:
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask.visible, is_causal=seq == kv, implementation="cudnn"
        )

    def by_lengths() -> Array:  # causal + padding from the lengths alone: no bias to read
        lengths = mask.lengths
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            query_seq_lengths=lengths,
            key_value_seq_lengths=lengths,
            implementation="cudnn",
        )

    if mask.lengths is None:
        return dense()
    return jax.lax.cond(mask.single_sequence_rows, by_lengths, dense)


class Attention(nnx.Module):
    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        head_dim = config.resolved_head_dim
        self.config = config
        self.q_proj = _linear(config, rngs, config.hidden_size, config.num_heads * head_dim, config.qkv_bias)
        self.k_proj = _linear(
            config, rngs, config.hidden_size, config.num_kv_heads * head_dim, config.qkv_bias
        )
        self.v_proj = _linear(
            config, rngs, config.hidden_size, config.num_kv_heads * head_dim, config.qkv_bias
        )
        self.o_proj = _linear(config, rngs, config.num_heads * head_dim, config.hidden_size, config.o_bias)
        if config.qk_norm:
            self.q_norm = _rms_norm(config, head_dim)
            self.k_norm = _rms_norm(config, head_dim)

    def __call__(
        self,
        x: Array,  # [batch, seq, hidden]
        rope: RotaryTables,
        mask: AttentionMask,
        cache: tuple[Array, Array, Array] | None = None,  # (keys, values, write index)
        output_rows: Array | None = None,  # [rows] flat token indices whose outputs are wanted
    ) -> tuple[Array, tuple[Array, Array] | None]:  # [batch, seq, hidden] or [rows, hidden]
        batch, seq, _ = x.shape
        head_dim = self.config.resolved_head_dim
        q = self.q_proj(x).reshape(batch, seq, self.config.num_heads, head_dim)
        k = self.k_proj(x).reshape(batch, seq, self.config.num_kv_heads, head_dim)
        v = self.v_proj(x).reshape(batch, seq, self.config.num_kv_heads, head_dim)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        new_cache = None
        if cache is not None:
            cached_k, cached_v, index = cache
            k = jax.lax.dynamic_update_slice_in_dim(cached_k, k.astype(cached_k.dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cached_v, v.astype(cached_v.dtype), index, axis=1)
            new_cache = (k, v)
        out = _attention(self.config, q, k.astype(q.dtype), v.astype(q.dtype), mask)
        # Padding queries see no key; zero them so no kernel's NaN for an empty row can leak onward.
        out = jnp.where(jnp.any(mask.visible, axis=-1)[:, 0, :, None, None], out, 0.0)
        out = out.reshape(batch, seq, -1)
        if output_rows is not None:
            out = out.reshape(batch * seq, -1)[output_rows]
        return self.o_proj(out), new_cache


class MLP(nnx.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))`` (SwiGLU, or GeGLU for Gemma)."""

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = _linear(config, rngs, hidden, inner, config.mlp_bias)
        self.up_proj = _linear(config, rngs, hidden, inner, config.mlp_bias)
        self.down_proj = _linear(config, rngs, inner, hidden, config.mlp_bias)
        self.act = _ACTIVATIONS[config.hidden_act]

    def __call__(self, x: Array) -> Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        self.input_layernorm = _rms_norm(config, config.hidden_size)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = _rms_norm(config, config.hidden_size)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, rope, mask, cache=None, output_rows=None):
        attended, new_cache = self.self_attn(self.input_layernorm(x), rope, mask, cache, output_rows)
        if output_rows is not None:  # the tokens' keys and values are in; the rest runs on the rows
            x = x.reshape(-1, x.shape[-1])[output_rows]
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), new_cache


class Decoder(nnx.Module):
    """Decoder-only transformer with a language-model head (tied or separate)."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
        """``lm_head=False`` builds the backbone alone (reward and embedding models)."""
        self.config = config
        self.embed_tokens = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        self.layers = nnx.List([DecoderLayer(config, rngs) for _ in range(config.num_layers)])
        self.norm = _rms_norm(config, config.hidden_size)
        if lm_head and not config.tie_word_embeddings:
            self.lm_head = _linear(config, rngs, config.hidden_size, config.vocab_size, bias=False)

    def _embed(self, input_ids: Array) -> Array:
        x = self.embed_tokens(input_ids)
        if self.config.scale_embeddings:
            # Gemma rounds the scale to the compute dtype before multiplying.
            x = x * jnp.asarray(self.config.hidden_size**0.5, x.dtype)
        return x

    def _run_layers(self, x, positions, mask, caches=None, output_rows=None):
        rope = rotary_tables(positions, rope_inverse_frequencies(self.config))
        new_caches = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            call = nnx.remat(DecoderLayer.__call__) if self.config.remat else DecoderLayer.__call__
            rows = output_rows if i == last else None
            x, new_cache = call(layer, x, rope, mask, None if caches is None else caches[i], rows)
            new_caches.append(new_cache)
        return self.norm(x), new_caches

    def __call__(
        self,
        input_ids: Array,  # [batch, seq]
        *,
        positions: Array | None = None,  # [batch, seq]
        segment_ids: Array | None = None,  # [batch, seq], 0 = padding
        prefix_segment_ids: Array | None = None,  # [batch, seq]
        output_rows: Array | None = None,  # [rows] int indices into the flattened batch * seq tokens
    ) -> Array:  # [batch, seq, hidden], or [rows, hidden] with output_rows
        """Final hidden states (after the last norm). Defaults: positions 0..seq-1, one segment.

        ``output_rows`` returns the states of those tokens only (``hidden.reshape(-1, hidden_size)
        [output_rows]``, the same values): the last layer computes every token's keys and values but
        its output projection and MLP only for these rows. When the LM head reads the completion
        tokens alone, a prompt's share of the last layer is dead work.
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must be [batch, seq], got shape {input_ids.shape}.")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        if segment_ids is None:
            segment_ids = jnp.ones(input_ids.shape, jnp.int32)
        seq = input_ids.shape[1]
        visible = attention_mask(
            segment_ids, positions, segment_ids, positions, prefix_segment_ids, self.config.sliding_window
        )
        # No token sees a later index of its row. The layouts here (padding, packed segments, shared
        # prefixes) all satisfy this already; stating it makes cuDNN's causal flag and the blocked
        # attention's skipped upper blocks exact for any segment ids and positions.
        mask = AttentionMask(visible & jnp.tril(jnp.ones((seq, seq), bool)))
        simple_layout = prefix_segment_ids is None and self.config.sliding_window is None
        if simple_layout and attention_implementation(self.config, self.config.dtype, seq, seq) == "cudnn":
            lengths, single_sequence_rows = _single_sequence_rows(segment_ids, positions)
            mask = mask._replace(lengths=lengths, single_sequence_rows=single_sequence_rows)
        hidden, _ = self._run_layers(self._embed(input_ids), positions, mask, output_rows=output_rows)
        return hidden

    def decode(
        self,
        input_ids: Array,  # [batch, seq]
        positions: Array,  # [batch, seq]
        segment_ids: Array,  # [batch, seq], 0 = padding
        cache: KVCache,
    ) -> tuple[Array, KVCache]:
        """Runs ``seq`` new tokens against the cache (prefill or one decoding step)."""
        seq = input_ids.shape[1]
        kv_segments = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids, cache.index, axis=1)
        kv_positions = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, cache.index, axis=1)
        mask = AttentionMask(
            attention_mask(
                segment_ids, positions, kv_segments, kv_positions, None, self.config.sliding_window
            )
        )
        layer_caches = [(k, v, cache.index) for k, v in zip(cache.keys, cache.values)]
        hidden, new_caches = self._run_layers(self._embed(input_ids), positions, mask, layer_caches)
        keys = tuple(k for k, _ in new_caches)
        values = tuple(v for _, v in new_caches)
        return hidden, KVCache(keys, values, kv_segments, kv_positions, cache.index + seq)

    def unembedding(self) -> Array:  # [hidden, vocab]
        """The LM head kernel (the transposed embedding when tied), in the compute dtype."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.embedding[...].T.astype(self.config.dtype)
        return self.lm_head.kernel[...].astype(self.config.dtype)

    def logits(self, hidden: Array) -> Array:  # [..., hidden] -> [..., vocab] float32
        """Full logits in float32. For training log-probs use ``sequence_logps``, which never
        materialises them."""
        return jnp.einsum("...e,ev->...v", hidden, self.unembedding(), preferred_element_type=jnp.float32)


# Logical axes of each parameter, matched on the end of its path (see jaxpref.sharding for the
# mapping to mesh axes). First match wins.
PARAM_LOGICAL_AXES: tuple[tuple[tuple[str, ...], tuple[str | None, ...]], ...] = (
    (("embed_tokens", "embedding"), ("vocab", "embed")),
    (("lm_head", "kernel"), ("embed", "vocab")),
    (("q_proj", "kernel"), ("embed", "heads")),
    (("k_proj", "kernel"), ("embed", "kv_heads")),
    (("v_proj", "kernel"), ("embed", "kv_heads")),
    (("o_proj", "kernel"), ("heads", "embed")),
    (("q_proj", "bias"), ("heads",)),
    (("k_proj", "bias"), ("kv_heads",)),
    (("v_proj", "bias"), ("kv_heads",)),
    (("gate_proj", "kernel"), ("embed", "mlp")),
    (("up_proj", "kernel"), ("embed", "mlp")),
    (("down_proj", "kernel"), ("mlp", "embed")),
    (("gate_proj", "bias"), ("mlp",)),
    (("up_proj", "bias"), ("mlp",)),
)


def param_logical_axes(path: tuple, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the parameter at ``path`` (an nnx state path); unlisted ones are replicated."""
    names = tuple(str(p) for p in path)
    if names[-1] in ("lora_a", "lora_b", "kernel_scale"):
        # A LoRA layer (jaxpref.models.lora): its adapters [in, rank] and [rank, out] and its int8
        # kernel's per-output scales [out] follow the axes of the base kernel; the rank is replicated.
        kernel_in, kernel_out = param_logical_axes((*path[:-1], "kernel"), 2)
        axes = {"lora_a": (kernel_in, None), "lora_b": (None, kernel_out), "kernel_scale": (kernel_out,)}
        if len(axes[names[-1]]) == ndim:
            return axes[names[-1]]
    for suffix, axes in PARAM_LOGICAL_AXES:
        if names[-len(suffix) :] == suffix and len(axes) == ndim:
            return axes
    if names[-1] == "kernel" and ndim == 2:  # heads: [embed, outputs]
        return ("embed", None)
    return (None,) * ndim
