"""Composing objectives: weighted sums that are still pure functions.

An :class:`Objective` is a weighted sum of terms. Each term is a registered objective (by name,
with hyperparameters bound) or any function returning per-example losses (and optionally a metrics
dict). Calling the sum gives :math:`\\sum_k w_k \\ell_k` per example, so its mean is
:math:`\\sum_k w_k\\,\\mathrm{mean}(\\ell_k)`: TRL's ``loss_type`` / ``loss_weights`` rule.

Inputs are passed by keyword to every term that accepts them. An input no term accepts is an
error, never silently dropped. Metrics are the first term's, plus ``loss/<term>`` for each term.

>>> import jax.numpy as jnp
>>> from jaxpref.objectives import objective
>>> rpo = objective("sigmoid", beta=0.1) + 0.2 * objective("sft")
>>> rpo
Objective(1.0 * sigmoid(beta=0.1) + 0.2 * sft())
>>> losses, metrics = rpo(
...     policy_chosen_logps=jnp.array([-4.0]), policy_rejected_logps=jnp.array([-6.0]),
...     ref_chosen_logps=jnp.array([-5.0]), ref_rejected_logps=jnp.array([-5.0]),
...     chosen_lengths=jnp.array([2]), rejected_lengths=jnp.array([3]),
... )
>>> [round(float(x), 4) for x in (losses[0], metrics["loss/sigmoid"][0], metrics["loss/sft"][0])]
[0.9981, 0.5981, 2.0]
>>> rpo.with_(beta=0.5)
Objective(1.0 * sigmoid(beta=0.5) + 0.2 * sft())

The same sum from text (a command line's ``--objective``, a config file's ``objective.name``):

>>> parse_objective("sigmoid + 0.2*sft", beta=0.5)
Objective(1.0 * sigmoid(beta=0.5) + 0.2 * sft())
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from jaxpref.objectives.common import Array, LossSpec
from jaxpref.objectives.listwise import LISTWISE, listwise_loss, mdpo_loss, mipo_loss, pro_loss
from jaxpref.objectives.pairwise import _ARRAY_OPTIONS, PAIRWISE, pairwise_loss
from jaxpref.objectives.reward import REWARD, reward_loss
from jaxpref.objectives.token_level import tdpo1_loss, tdpo2_loss
from jaxpref.objectives.unpaired import MULTI_RESPONSE, UNPAIRED, multi_response_loss, unpaired_loss


def _keyword_names(fn: Callable) -> frozenset[str] | None:
    """Keyword arguments ``fn`` accepts, or None when it takes ``**kwargs``."""
    parameters = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL)


def _named_inputs(loss_fn: Callable) -> frozenset[str]:
    """The keyword-only array arguments of a family's entry point (``policy_chosen_logps``, ...)."""
    parameters = inspect.signature(loss_fn).parameters.values()
    return frozenset(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


# For each registry: its entry point and the array inputs that entry point reads.
_REGISTRIES = (
    (PAIRWISE, pairwise_loss, _named_inputs(pairwise_loss) | frozenset(_ARRAY_OPTIONS)),
    (UNPAIRED, unpaired_loss, _named_inputs(unpaired_loss)),
    (MULTI_RESPONSE, multi_response_loss, _named_inputs(multi_response_loss)),
    (REWARD, reward_loss, _named_inputs(reward_loss)),
    (LISTWISE, listwise_loss, _named_inputs(listwise_loss)),
)


@dataclasses.dataclass(frozen=True, eq=False)
class Term:
    """One weighted summand: ``weight * fn(**inputs, **hparams)``."""

    weight: float
    name: str
    fn: Callable[..., Any]
    hparams: Mapping[str, Any]
    inputs: frozenset[str] | None  # array inputs fn reads; None = any
    hparam_names: frozenset[str] | None  # hyperparameters fn accepts; None = any

    def accepts_input(self, key: str) -> bool:
        return self.inputs is None or key in self.inputs or key in (self.hparam_names or ())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{self.weight!r} * {self.name}({args})"


@dataclasses.dataclass(frozen=True, eq=False)
class Objective:
    """A weighted sum of objective terms; call it with the inputs to get ``(losses, metrics)``."""

    terms: tuple[Term, ...]

    @classmethod
    def from_fn(cls, fn: Callable[..., Any], name: str | None = None, **hparams) -> Objective:
        """Wraps ``fn(**inputs) -> losses | (losses, metrics)`` as a one-term objective."""
        names = _keyword_names(fn)
        term = Term(1.0, name or getattr(fn, "__name__", "objective"), fn, dict(hparams), names, names)
        return cls((term,))

    def __call__(self, **inputs) -> tuple[Array, dict[str, Array]]:
        unused = [k for k in inputs if not any(t.accepts_input(k) for t in self.terms)]
        if unused:
            raise ValueError(f"Input(s) {unused} are not read by any term of {self!r}.")
        total, metrics = None, {}
        term_names = _unique_names(self.terms)
        for term, term_name in zip(self.terms, term_names):
            kwargs = {k: v for k, v in inputs.items() if term.accepts_input(k)}
            result = term.fn(**{**term.hparams, **kwargs})
            losses, term_metrics = result if isinstance(result, tuple) else (result, {})
            for key, value in term_metrics.items():
                metrics.setdefault(key, value)
            metrics[f"loss/{term_name}"] = losses
            weighted = term.weight * jnp.asarray(losses)
            total = weighted if total is None else total + weighted
        return total, metrics

    def with_(self, **hparams) -> Objective:
        """Sets hyperparameters on every term that accepts them (e.g. ``beta`` on all DPO terms)."""
        for key in hparams:
            if not any(t.hparam_names is None or key in t.hparam_names for t in self.terms):
                raise ValueError(f"No term of {self!r} accepts hyperparameter `{key}`.")
        terms = []
        for term in self.terms:
            update = {k: v for k, v in hparams.items() if term.hparam_names is None or k in term.hparam_names}
            terms.append(dataclasses.replace(term, hparams={**term.hparams, **update}))
        return Objective(tuple(terms))

    def __add__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective(self.terms + other.terms)

    def __radd__(self, other) -> Objective:
        # Lets the builtin sum() start from 0.
        if isinstance(other, numbers.Number) and other == 0:
            return self
        return NotImplemented

    def __mul__(self, scale: float) -> Objective:
        if not isinstance(scale, numbers.Real):
            return NotImplemented
        return Objective(tuple(dataclasses.replace(t, weight=t.weight * scale) for t in self.terms))

    __rmul__ = __mul__

    def __neg__(self) -> Objective:
        return -1.0 * self

    def __sub__(self, other: Objective) -> Objective:
        return self + (-other)

    def __repr__(self) -> str:
        return f"Objective({' + '.join(map(repr, self.terms))})"


def _unique_names(terms: Sequence[Term]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for term in terms:
        count = seen.get(term.name, 0)
        names.append(term.name if count == 0 else f"{term.name}_{count}")
        seen[term.name] = count + 1
    return names


# Objectives written as one function of keyword arrays and scalar hyperparameters (no registry of
# their own), available by name like the registered ones.
NAMED_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "tdpo1": tdpo1_loss,
    "tdpo2": tdpo2_loss,
    "pro": pro_loss,
    "mdpo": mdpo_loss,
    "mipo": mipo_loss,
}


def _function_entry(name: str, fn: Callable[..., Any]) -> tuple[LossSpec, Callable, frozenset[str]]:
    """A named function as a registry entry: its scalar-defaulted keywords are the hyperparameters."""
    parameters = inspect.signature(fn).parameters.values()
    defaults = {p.name: p.default for p in parameters if _kind(p.default) is not None}
    inputs = frozenset(p.name for p in parameters if p.name not in defaults)
    return LossSpec(name, fn, defaults), lambda _name, **kwargs: fn(**kwargs), inputs


def _lookup(name: str) -> tuple[LossSpec, Callable, frozenset[str]] | None:
    """``(spec, family entry point, its array inputs)`` of a registered objective, or None."""
    for registry, loss_fn, inputs in _REGISTRIES:
        if name in registry:
            return registry[name], loss_fn, inputs
    if name in NAMED_FUNCTIONS:
        return _function_entry(name, NAMED_FUNCTIONS[name])
    return None


def _registered_names() -> list[str]:
    return sorted([name for registry, _, _ in _REGISTRIES for name in registry] + list(NAMED_FUNCTIONS))


def _kind(value: Any) -> str | None:
    """What a Python scalar is, for hyperparameter messages; None for anything else (arrays, None)."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, numbers.Real):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return None


def _check_hparam(name: str, key: str, value: Any, default: Any) -> None:
    """A scalar hyperparameter of the default's kind (a list or a string for a number is a config
    typo), finite, and a positive ``beta`` (every objective's inverse temperature). Arrays pass:
    they are for sweeps under jit."""
    expected, got = _kind(default), _kind(value)
    problem = None
    if expected and (got not in (None, expected) or isinstance(value, list | tuple | dict)):
        problem = f"must be {expected}, like its default {default!r}"
    elif got == "a number" and not math.isfinite(value):
        problem = "must be finite"
    elif key == "beta" and got == "a number" and value <= 0:
        problem = "must be > 0"
    if problem:
        raise ValueError(f"Hyperparameter `{key}`={value!r} of objective {name!r} {problem}.")


def objective(name: str, **hparams) -> Objective:
    """The registered objective ``name`` (from ``PAIRWISE``, ``UNPAIRED``, ``MULTI_RESPONSE``, ``REWARD``,
    ``LISTWISE`` or :data:`NAMED_FUNCTIONS`: ``tdpo1``, ``tdpo2``, ``pro``, ``mdpo``, ``mipo``).

    >>> objective("tdpo2", alpha=0.3)
    Objective(1.0 * tdpo2(alpha=0.3))
    """
    found = _lookup(name)
    if found is None:
        raise ValueError(f"Unknown objective `name`={name!r}; known names: {_registered_names()}.")
    spec, loss_fn, inputs = found
    spec.resolve_hparams(name, hparams)  # fail now on a misspelt hyperparameter, not at call
    for key, value in hparams.items():  # and on a bad value (a config typo), not inside jit
        _check_hparam(name, key, value, spec.defaults[key])
    term = Term(1.0, name, functools.partial(loss_fn, name), dict(hparams), inputs, frozenset(spec.defaults))
    return Objective((term,))


_SUM_FORMAT = "write terms as `name` or `weight*name` joined by `+`, e.g. 'sigmoid + 0.2*sft'"


def parse_objective(text: str, names: Collection[str] | None = None, /, **hparams) -> Objective:
    """The objective written ``text``: a registered name or a weighted sum such as ``"sigmoid + 0.2*sft"``.

    Each term is ``name`` or ``weight*name`` (a decimal weight), so ``parse_objective("sigmoid +
    0.2*sft")`` is ``objective("sigmoid") + 0.2 * objective("sft")``. ``names`` restricts the
    names allowed (those a kind of run can train, say); by default every registered one. Each
    hyperparameter goes to the terms that accept it, as :meth:`Objective.with_` does. An unknown
    name, a bad weight and a hyperparameter no term accepts raise a ValueError.

    >>> parse_objective("simpo + 0.5*sft", gamma=0.3)
    Objective(1.0 * simpo(gamma=0.3) + 0.5 * sft())
    >>> parse_objective("sigmoid + 0.2*sfft")
    Traceback (most recent call last):
    ValueError: 'sfft' in objective 'sigmoid + 0.2*sfft' is not a known objective; use one of [...
    """
    known = sorted(names) if names is not None else _registered_names()
    parts, accepted = [], set()
    for part in text.split("+"):
        weight_text, star, name = (piece.strip() for piece in part.rpartition("*"))
        found = _lookup(name) if name in known else None
        if found is None:
            raise ValueError(
                f"{name!r} in objective {text!r} is not a known objective; use one of {known} ({_SUM_FORMAT})."
            )
        try:
            weight = float(weight_text) if star else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ValueError(
                f"Weight {weight_text!r} of {name!r} in objective {text!r} is not a finite number ({_SUM_FORMAT})."
            )
        defaults = found[0].defaults
        accepted |= defaults.keys()
        parts.append(weight * objective(name, **{k: v for k, v in hparams.items() if k in defaults}))
    unused = sorted(set(hparams) - accepted)
    if unused:
        raise ValueError(
            f"No term of objective {text!r} accepts hyperparameter(s) {unused}; they accept {sorted(accepted)}."
        )
    return sum(parts, start=0)


def combine(objectives: Sequence[Objective], weights: Sequence[float] | None = None) -> Objective:
    """``sum_k weights[k] * objectives[k]``, TRL's ``loss_type=[...]``, ``loss_weights=[...]``.

    ``weights=None`` means all ones, as in TRL.
    """
    objectives = list(objectives)
    if not objectives:
        raise ValueError("`objectives` is empty; pass at least one Objective.")
    weights = [1.0] * len(objectives) if weights is None else list(weights)
    if len(weights) != len(objectives):
        raise ValueError(
            f"`weights` has {len(weights)} entries but `objectives` has {len(objectives)}; they must match."
        )
    return sum((w * o for w, o in zip(weights, objectives)), start=0)
