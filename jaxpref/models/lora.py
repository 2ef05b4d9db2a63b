r"""LoRA and QLoRA: low-rank adapters on the decoder's linear layers, over a frozen (optionally int8) base.

:func:`apply_lora` replaces the ``nnx.Linear`` layers of the decoder layers whose path matches a
regular expression (``targets``, searched in paths like ``layers/3/self_attn/q_proj``) by
:class:`LoRALinear` layers computing

.. math:: y = x W + b + \frac{\alpha}{r}\,\mathrm{dropout}(x)\,A\,B,
          \qquad A \in \mathbb{R}^{d_{in} \times r},\; B \in \mathbb{R}^{r \times d_{out}},

with the base kernel :math:`W` and bias :math:`b` kept (frozen), :math:`A` drawn as PEFT draws it
(uniform in :math:`\pm 1/\sqrt{d_{in}}`) and :math:`B = 0`: the adapted model starts exactly as the
base, so a DPO loss against the base is exactly :math:`\ln 2` at step 0. Only the adapters
(:class:`LoRAParam`, a subclass of ``nnx.Param``) and the heads a head model adds on its backbone (a
reward model's ``score``, a value head) are trained: :func:`trainable_filter` says which, and
:func:`jaxpref.train.step.build_step` and :func:`jaxpref.train.online.build_online_step` apply it,
so the optimizer state holds only them.

The reference every objective needs is the base model itself: :func:`base_view` turns the
adapters off on a view of the model (no weight copy, and no gradient: the adapters are not read),
which the train step runs for ``reference="frozen"`` and
:func:`jaxpref.train.reference.compute_reference_logps` runs for ``reference="cached"``.

QLoRA (``quantize="int8"``): every linear of the decoder layers (targeted or not) stores its kernel
as int8 with one float32 scale per output channel (absmax: :math:`s_o = \max_i |W_{io}| / 127`,
:math:`Q = \mathrm{round}(W / s)`), and computes :math:`x W \approx (x\,Q)\,\mathrm{diag}(s)`: a
quarter of the float32 weights' resident memory (half of bfloat16's). Embeddings, norms and the LM
head stay in their dtype, as in QLoRA. Adapters are ``adapter_dtype`` (float32 by default). XLA:CPU
keeps a float copy of each dequantised kernel for the backward pass, so there the step's peak
memory is close to LoRA's (``benchmarks/lora_memory.py``).

Adapters are saved alone by :func:`save_adapters` (``adapter_config.json`` and
``adapter_model.safetensors``, PEFT's file names and tensor names) and read back by
:func:`load_adapters`; :func:`merge_lora` gives a plain model with :math:`W + \frac{\alpha}{r} A B`
(dequantised) in each adapted layer, and :func:`~jaxpref.models.hf_io.save_pretrained` writes a
LoRA model's merged weights, which ``transformers`` loads.

>>> from jaxpref.models.decoder import Decoder, DecoderConfig
>>> model = apply_lora(Decoder(DecoderConfig(), rngs=nnx.Rngs(0)), rank=4, targets="q_proj|v_proj")
>>> sorted({type(v).__name__ for _, v in nnx.to_flat_state(nnx.state(model, trainable_filter(model)))})
['LoRAParam']
>>> adapter_parameter_count(model)
1792

References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685;
Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxpref.models.decoder import Decoder
from jaxpref.models.hf_io import hf_name, host_array

Array = jax.Array
M = TypeVar("M", bound=nnx.Module)

DEFAULT_TARGETS = r"(q|k|v|o|gate|up|down)_proj"  # every linear of the decoder layers
QUANTIZATIONS = (None, "int8")
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class LoRAParam(nnx.Param):
    """A LoRA adapter weight (``lora_a``, ``lora_b``): with LoRA, the parameters a step trains."""


class LoRALinear(nnx.Module):
    """A linear layer over a frozen base kernel (float, or int8 with per-channel scales), plus a
    low-rank adapter when ``rank > 0`` (rank 0: a quantised linear that ``targets`` left out).

    Built from an ``nnx.Linear`` by :func:`apply_lora`: the base kernel and bias keep their
    variables (and so their paths, ``.../q_proj/kernel``, and shardings); the adapters are
    ``lora_a`` ``[in, rank]`` and ``lora_b`` ``[rank, out]``. ``adapters_enabled`` is a static
    switch: :func:`base_view` turns it off on a view of the model.
    """

    def __init__(
        self,
        base: nnx.Linear,
        *,
        rank: int,
        alpha: float,
        dropout: float,
        quantize: str | None,
        adapter_dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features = base.in_features, base.out_features
        self.dtype, self.param_dtype = base.dtype, base.param_dtype
        self.precision, self.dot_general, self.promote_dtype = (
            base.precision,
            base.dot_general,
            base.promote_dtype,
        )
        self.bias = base.bias
        if quantize == "int8":
            quantized, scale = quantize_int8(base.kernel[...])
            self.kernel = nnx.Param(quantized)  # [in, out] int8
            self.kernel_scale = nnx.Param(scale)  # [out] float32
        else:
            self.kernel = base.kernel  # [in, out], the base's own variable
            self.kernel_scale = nnx.data(None)
        self.rank, self.alpha = rank, alpha
        self.adapters_enabled = True
        self.lora_a = self.lora_b = self.dropout = nnx.data(None)
        if rank:
            bound = 1.0 / math.sqrt(self.in_features)  # PEFT: kaiming_uniform(a=sqrt(5)) on A
            self.lora_a = LoRAParam(
                jax.random.uniform(rngs.params(), (self.in_features, rank), adapter_dtype, -bound, bound)
            )
            self.lora_b = LoRAParam(jnp.zeros((rank, self.out_features), adapter_dtype))
            # Deterministic unless a training step turns it on (train_view), so sampling, scoring and
            # reference passes never drop anything.
            self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs) if dropout else nnx.data(None)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def set_view(self, adapters_enabled: bool | None = None):
        """Used by ``nnx.view`` (:func:`base_view`)."""
        if adapters_enabled is not None:
            self.adapters_enabled = adapters_enabled

    def _dot(self, x: Array, kernel: Array) -> Array:  # [..., a] @ [a, b] -> [..., b]
        return self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)

    def __call__(self, inputs: Array) -> Array:  # [..., in] -> [..., out]
        bias = self.bias[...] if self.bias is not None else None
        if self.kernel_scale is None:
            # nnx.Linear's computation, so a float base with adapters off is bit-identical to it.
            inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
            y = self._dot(inputs, kernel)
        else:  # x W = (x Q) diag(s): the scales multiply the output columns
            inputs, bias = self.promote_dtype((inputs, bias), dtype=self.dtype)
            y = self._dot(inputs, self.kernel[...].astype(inputs.dtype))
            y = y * self.kernel_scale[...].astype(y.dtype)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        if self.rank and self.adapters_enabled:
            adapter_input = inputs if self.dropout is None else self.dropout(inputs)
            lora_a, lora_b = (w[...].astype(inputs.dtype) for w in (self.lora_a, self.lora_b))
            y = y + self._dot(self._dot(adapter_input, lora_a), lora_b) * jnp.asarray(self.scaling, y.dtype)
        return y

    def merged_kernel(self) -> Array:  # [in, out], param_dtype
        """The base kernel (dequantised) plus the scaled adapter product ``alpha / rank * A B``."""
        kernel = self.kernel[...].astype(jnp.float32)
        if self.kernel_scale is not None:
            kernel = kernel * self.kernel_scale[...]
        if self.rank:
            lora_a, lora_b = (w[...].astype(jnp.float32) for w in (self.lora_a, self.lora_b))
            kernel = kernel + self.scaling * (lora_a @ lora_b)
        return kernel.astype(self.param_dtype)


def quantize_int8(kernel: Array) -> tuple[Array, Array]:  # [in, out] -> [in, out] int8, [out] float32
    r"""Symmetric per-output-channel absmax quantisation: :math:`s_o = \max_i |W_{io}| / 127`,
    :math:`Q_{io} = \mathrm{round}(W_{io} / s_o)`; an all-zero column gets scale 0 (and zeros)."""
    kernel = kernel.astype(jnp.float32)
    scale = jnp.max(jnp.abs(kernel), axis=0) / 127.0
    quantized = jnp.round(kernel / jnp.where(scale > 0, scale, 1.0))
    return jnp.clip(quantized, -127, 127).astype(jnp.int8), scale


def _module_path(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _replace(model: nnx.Module, path: tuple, layer: nnx.Module) -> None:
    """Puts ``layer`` at module ``path`` of ``model`` (an attribute of a module in a list or not)."""
    parent = model
    for part in path[:-1]:
        parent = parent[part] if isinstance(part, int) else getattr(parent, part)
    setattr(parent, str(path[-1]), layer)


def _decoder_linears(model: nnx.Module) -> list[tuple[tuple, nnx.Linear]]:
    """(path, layer) of every ``nnx.Linear`` inside the decoder layers."""
    return [
        (path, module)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, nnx.Linear) and "layers" in (str(p) for p in path)
    ]


def lora_layers(model: nnx.Module) -> list[tuple[tuple, LoRALinear]]:
    """(path, layer) of every :class:`LoRALinear` of ``model``, in path order."""
    return [(path, module) for path, module in nnx.iter_modules(model) if isinstance(module, LoRALinear)]


def has_lora(model: nnx.Module) -> bool:
    """Whether :func:`apply_lora` was applied to ``model``."""
    return bool(lora_layers(model))


def apply_lora(
    model: M,
    *,
    rank: int,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: str = DEFAULT_TARGETS,
    quantize: str | None = None,
    adapter_dtype: Any = jnp.float32,
    seed: int = 0,
) -> M:
    """Adds LoRA adapters to ``model`` in place (and returns it); with ``quantize``, QLoRA.

    Args:
      model: a :class:`~jaxpref.models.decoder.Decoder` or a head model on one
        (:class:`~jaxpref.models.heads.RewardModel`, ...).
      rank: the adapters' rank :math:`r` (a positive int).
      alpha: the adapters' output is scaled by ``alpha / rank``.
      dropout: dropout rate on the adapters' input during training steps (``[0, 1)``).
      targets: a regular expression searched (``re.search``) in the path of each linear of the
        decoder layers, e.g. ``layers/0/self_attn/q_proj``: ``"q_proj|v_proj"``, or the default,
        every projection. The LM head and heads on the backbone are never adapted.
      quantize: None (float base) or ``"int8"`` (every linear of the decoder layers stored int8).
      adapter_dtype: dtype of ``lora_a`` / ``lora_b``; they compute in the model's compute dtype.
      seed: draws ``lora_a`` (and seeds the dropout streams).
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"`rank`={rank!r} must be a positive int (e.g. 8 or 16).")
    if not alpha > 0:
        raise ValueError(f"`alpha`={alpha!r} must be > 0 (the adapters are scaled by alpha / rank).")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout`={dropout!r} must be in [0, 1).")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"`quantize`={quantize!r} must be one of {QUANTIZATIONS}; 4-bit is not supported.")
    if has_lora(model):
        raise ValueError(
            "`model` already has LoRA layers; apply_lora it once (merge_lora gives a plain model)."
        )
    try:
        pattern = re.compile(targets)
    except re.error as error:
        raise ValueError(f"`targets`={targets!r} is not a valid regular expression: {error}.") from error
    linears = _decoder_linears(model)
    targeted = {path for path, _ in linears if pattern.search(_module_path(path))}
    if not targeted:
        names = sorted({str(path[-1]) for path, _ in linears})
        raise ValueError(
            f"`targets`={targets!r} matches none of the decoder layers' linears (paths like "
            f"'layers/0/self_attn/q_proj'; their names: {names})."
        )
    rngs = nnx.Rngs(params=seed, dropout=seed)
    for path, linear in linears:
        if path in targeted or quantize:
            layer = LoRALinear(
                linear,
                rank=rank if path in targeted else 0,
                alpha=float(alpha),
                dropout=float(dropout),
                quantize=quantize,
                adapter_dtype=adapter_dtype,
                rngs=rngs,
            )
            _replace(model, path, layer)
    return model


def trainable_filter(model: nnx.Module) -> nnx.filterlib.Filter:
    """What a training step trains: every ``nnx.Param``, or for a LoRA model the adapters
    (:class:`LoRAParam`) and the parameters outside the backbone of a head model (the attribute
    ``model``: a reward model's ``score``, a value head), which start untrained."""
    if not has_lora(model):
        return nnx.Param
    head_model = isinstance(getattr(model, "model", None), Decoder)

    def trained(path: tuple, value: Any) -> bool:
        return isinstance(value, LoRAParam) or (
            head_model and isinstance(value, nnx.Param) and str(path[0]) != "model"
        )

    return trained


def base_view(model: M) -> M:
    """A view of ``model`` with every adapter off: the base model, sharing the arrays (no copy).

    For a model without LoRA layers, ``model`` itself.
    """
    if not has_lora(model):
        return model
    return nnx.view(model, only=LoRALinear, adapters_enabled=False)


def train_view(model: M, key: Array) -> M:
    """``model`` as a training step runs it: LoRA dropout on, its masks drawn from ``key``.

    For a model without LoRA dropout, ``model`` itself.
    """
    if not any(layer.dropout is not None for _, layer in lora_layers(model)):
        return model
    view = nnx.view(model, only=nnx.Dropout, deterministic=False)
    # A new stream rather than nnx.reseed: the model's own RNG variables may come from an outer
    # trace (the step's frozen state), which a reseed inside the gradient trace may not mutate.
    stream = nnx.Rngs(dropout=key).dropout
    for _, layer in lora_layers(view):
        if layer.dropout is not None:
            layer.dropout.rngs = stream
    return view


def adapter_parameter_count(model: nnx.Module) -> int:
    """How many adapter weights (``lora_a`` and ``lora_b`` entries) ``model`` has."""
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, LoRAParam)))


def merge_lora(model: M) -> M:
    """A copy of ``model`` without LoRA layers: each one an ``nnx.Linear`` with the merged kernel
    :meth:`LoRALinear.merged_kernel` in the base's dtype. Other weights are shared, not copied.

    ``model`` is unchanged. A quantised base is dequantised (``Q diag(s)``).
    """
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)  # new modules over the same arrays
    for path, layer in lora_layers(merged):
        linear = nnx.eval_shape(
            lambda layer=layer: nnx.Linear(
                layer.in_features,
                layer.out_features,
                use_bias=layer.bias is not None,
                dtype=layer.dtype,
                param_dtype=layer.param_dtype,
                precision=layer.precision,
                dot_general=layer.dot_general,
                rngs=nnx.Rngs(0),
            )
        )
        linear.kernel = nnx.Param(layer.merged_kernel())
        linear.bias = layer.bias
        _replace(merged, path, linear)
    return merged


# ------------------------------------------------------------------------------------------------
# Adapter files.
# ------------------------------------------------------------------------------------------------


def _adapter_settings(model: nnx.Module) -> dict[str, Any]:
    """rank, alpha, dropout and the adapted module names of ``model`` (one rank and alpha for all)."""
    adapted = [(path, layer) for path, layer in lora_layers(model) if layer.rank]
    if not adapted:
        raise ValueError("`model` has no LoRA adapters: call apply_lora first.")
    settings = {(layer.rank, layer.alpha) for _, layer in adapted}
    if len(settings) > 1:
        raise ValueError(
            f"`model` mixes adapter ranks and alphas {sorted(settings)}; save_adapters needs one."
        )
    (rank, alpha), (_, first) = settings.pop(), adapted[0]
    return {
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": first.dropout.rate if first.dropout is not None else 0.0,
        "target_modules": sorted({str(path[-1]) for path, _ in adapted}),
    }


def _adapter_tensor_name(path: tuple) -> str:
    """PEFT's name of the trained parameter at nnx ``path`` (adapters in torch's ``[out, in]``)."""
    if str(path[-1]) in ("lora_a", "lora_b"):
        module = hf_name((*path[:-1], "kernel")).removesuffix(".weight")
        return f"{_PEFT_PREFIX}{module}.lora_{str(path[-1])[-1].upper()}.weight"
    return _PEFT_PREFIX + hf_name(path)


def save_adapters(model: nnx.Module, path: str | os.PathLike) -> None:
    """Writes the trained parameters of a LoRA model (:func:`trainable_filter`: adapters, and a
    head model's heads) to ``path``: ``adapter_config.json`` and ``adapter_model.safetensors``,
    with PEFT's tensor names (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``,
    ``[rank, in]``). In a multi-host run every process must call it (arrays sharded across hosts
    are gathered collectively); only process 0 writes.
    """
    settings = _adapter_settings(model)
    tensors = {}
    for param_path, variable in nnx.to_flat_state(nnx.state(model, trainable_filter(model))):
        value = host_array(variable[...])
        tensors[_adapter_tensor_name(param_path)] = np.ascontiguousarray(
            value.T if value.ndim == 2 else value
        )
    if jax.process_index() != 0:
        return
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    config = {"peft_type": "LORA", "bias": "none", **settings}
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2))


def load_adapters(model: M, path: str | os.PathLike) -> M:
    """Reads adapters written by :func:`save_adapters` into ``model`` (in place; returns it).

    ``model`` must have the same LoRA layers (:func:`apply_lora` with the same ``rank``,
    ``alpha`` and ``targets``); each array keeps the sharding of the one it replaces.
    """
    folder = pathlib.Path(path)
    config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
    settings = _adapter_settings(model)
    for key in ("r", "lora_alpha", "target_modules"):
        value = config[key]
        if isinstance(value, list):  # PEFT writes target_modules (a set) in no fixed order
            value = sorted(value)
        if value != settings[key]:
            raise ValueError(
                f"{folder / ADAPTER_CONFIG_FILE} has {key}={value!r} but `model` has {settings[key]!r}; "
                "apply_lora with the settings the adapters were trained with."
            )
    tensors = load_file(folder / ADAPTER_WEIGHTS_FILE)
    state = nnx.state(model, trainable_filter(model))
    leaves = []
    for param_path, variable in nnx.to_flat_state(state):
        name = _adapter_tensor_name(param_path)
        if name not in tensors:
            raise ValueError(f"{folder / ADAPTER_WEIGHTS_FILE} lacks tensor {name!r}.")
        value = tensors[name].T if tensors[name].ndim == 2 else tensors[name]
        current = variable[...]
        if value.shape != current.shape:
            raise ValueError(
                f"Adapter tensor {name!r} has shape {list(tensors[name].shape)}; `model` needs "
                f"{list(current.shape[::-1] if current.ndim == 2 else current.shape)}."
            )
        leaves.append(
            (param_path, variable.replace(jax.device_put(value.astype(current.dtype), current.sharding)))
        )
    nnx.update(model, nnx.from_flat_state(leaves))
    return model
