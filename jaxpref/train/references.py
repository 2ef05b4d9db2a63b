"""Where a step's reference model comes from: one object per source, shared by every step builder.

* :class:`Frozen`: a copy of the initial trained parameters, kept in ``TrainState.ref_params`` and
  run under ``stop_gradient``.
* :class:`AdaptersOff`: a LoRA model's base weights with the adapters off, in the same step: no
  copy at all (``Frozen`` on a LoRA model resolves to it).
* :class:`Cached`: sequence log-probs computed once over the data
  (:func:`jaxpref.train.reference.cached_reference_logps`) and read from the batch; the step runs
  no reference model.
* :class:`NoReference`: reference-free objectives, SFT and reward models.

Builders take an object or its shorthand (``"frozen"``, ``"adapters_off"``, ``"cached"``,
``"none"``) and call :func:`as_reference`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import jax
from flax import nnx

from jaxpref.models.lora import base_view, has_lora

# (params, frozen variables) -> the model over them, as the step builders merge it.
ModuleFn = Callable[[nnx.State, nnx.State], nnx.Module]


@dataclasses.dataclass(frozen=True)
class Reference:
    """A reference source. Subclasses set the flags and override :meth:`model`."""

    name: ClassVar[str]
    keeps_copy: ClassVar[bool] = False  # TrainState.ref_params holds a copy of the initial params
    from_batch: ClassVar[bool] = False  # reference log-probs arrive in the batch

    def resolve(self, model: nnx.Module) -> Reference:
        """The source to use for ``model`` (a LoRA model's frozen reference is its base)."""
        return self

    def model(
        self, module: ModuleFn, params: nnx.State, ref_params: nnx.State | None, frozen: nnx.State
    ) -> nnx.Module | None:
        """The reference model inside a step, or None when the step runs none."""
        return None


@dataclasses.dataclass(frozen=True)
class Frozen(Reference):
    """A frozen copy of the initial policy (TRL's default ``ref_model``)."""

    name: ClassVar[str] = "frozen"
    keeps_copy: ClassVar[bool] = True

    def resolve(self, model: nnx.Module) -> Reference:
        return AdaptersOff() if has_lora(model) else self

    def model(self, module, params, ref_params, frozen):
        return module(jax.lax.stop_gradient(ref_params), frozen)


@dataclasses.dataclass(frozen=True)
class AdaptersOff(Reference):
    """A LoRA model's base: the same weights with the adapters off, so no second copy exists."""

    name: ClassVar[str] = "adapters_off"

    def resolve(self, model: nnx.Module) -> Reference:
        if not has_lora(model):
            raise ValueError("`reference`='adapters_off' needs a LoRA model (jaxpref.models.lora.apply_lora).")
        return self

    def model(self, module, params, ref_params, frozen):
        # The base view does not read the adapters, so no gradient reaches them through it.
        return base_view(module(params, frozen))


@dataclasses.dataclass(frozen=True)
class Cached(Reference):
    """Reference log-probs precomputed over the data and attached to every batch."""

    name: ClassVar[str] = "cached"
    from_batch: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class NoReference(Reference):
    """No reference: reference-free objectives, SFT, reward models."""

    name: ClassVar[str] = "none"


SHORTHANDS: dict[str, type[Reference]] = {
    cls.name: cls for cls in (Frozen, AdaptersOff, Cached, NoReference)
}


def as_reference(reference: str | Reference, model: nnx.Module) -> Reference:
    """The :class:`Reference` for a shorthand or an object, resolved for ``model``."""
    if isinstance(reference, str):
        if reference not in SHORTHANDS:
            raise ValueError(
                f"`reference`={reference!r} must be one of {sorted(SHORTHANDS)} or a "
                "jaxpref.train.references.Reference."
            )
        reference = SHORTHANDS[reference]()
    if not isinstance(reference, Reference):
        raise ValueError(f"`reference` must be a string or a Reference, got {reference!r}.")
    return reference.resolve(model)
