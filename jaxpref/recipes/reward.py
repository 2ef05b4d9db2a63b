"""Reward-model training: a head on a decoder backbone, learnt from preference pairs.

:func:`run_reward` trains with ``build_step(family="reward")`` on pairwise files, by
``config.objective.name`` and ``config.reward``:

- a :class:`~jaxpref.models.heads.RewardModel` with one scalar head and a reward objective
  (``bradley_terry``, ``bradley_terry_soft`` or ``thurstone``, see :mod:`jaxpref.objectives.reward`);
- an ensemble, ``reward.ensemble_size`` > 1: that many scalar heads on one backbone, each trained
  on every pair by the objective (:func:`~jaxpref.objectives.reward.ensemble_reward_loss`), their
  rewards aggregated by ``reward.ensemble_method`` whenever pairs are scored. The heads share the
  backbone and differ by their initialisation only: a cheap ensemble, less diverse than separately
  trained models;
- a General Preference Model, ``objective.name=gpm``: a
  :class:`~jaxpref.models.heads.PreferenceEmbeddingModel` with ``reward.embedding_dim``
  dimensions (and prompt-dependent block scales unless ``reward.learn_scales=false``) trained by
  :func:`~jaxpref.objectives.reward.gpm_loss` (``objective.temperature``, ``objective.normalize``);
- multi-objective heads, ``reward.objective_weights`` non-empty: one scalar head per attribute
  (``reward.objective_names``) on one backbone, trained by Bradley-Terry on their weighted sum
  (:func:`~jaxpref.objectives.reward.multi_objective_loss`, ``objective.beta``) plus, on pairs whose
  rows carry ``chosen_ratings`` / ``rejected_ratings`` (lists in head order, ``null`` if missing),
  ``objective.rating_coefficient`` times the heads' squared error against those ratings
  (:func:`~jaxpref.objectives.reward.rating_regression_loss`): :func:`multi_objective_heads_loss`.
  Pairs are scored by the weighted sum, here and by ``jaxpref reward-eval`` (the weights and names
  are stored in ``hf/config.json``).

The model comes from ``config.model.checkpoint`` (a causal-LM folder gives the backbone and the
head starts fresh; the ``hf/`` folder of an earlier reward run with the same head gives both), or
is a fresh tiny backbone with the tokenizer's vocabulary.

``runs/<name>/`` gets what every run writes (``config.json``, ``data/``, ``checkpoints/``,
``metrics/``; see :func:`jaxpref.recipes.offline.train_run`), ``hf/`` (scalar heads and ensembles in
``transformers``' ``*ForSequenceClassification`` layout, GPMs with their embedding size in the
config; both with the preference probability's link, :func:`preference_link`), and
``results.json``: the last step's metrics plus the final model's accuracy over every training
pair. With ``reward.eval_files`` the model is then evaluated on them
(:mod:`jaxpref.recipes.reward_eval`). From the command line:
``jaxpref reward --data prefs.jsonl [--model /models/Qwen3-0.6B] [--objective gpm] [--eval bench.jsonl]``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpref.data import make_loader
from jaxpref.models import DecoderConfig, PreferenceEmbeddingModel, RewardModel
from jaxpref.objectives import REWARD, Objective, parse_objective
from jaxpref.objectives.reward import (
    ensemble_reward_loss,
    ensemble_rewards,
    gpm_loss,
    multi_objective_loss,
    rating_regression_loss,
)
from jaxpref.recipes.common import build_mesh, build_policy, build_tokenizer, print_summary, read_metrics
from jaxpref.recipes.configs import RewardConfig, RewardRunConfig
from jaxpref.recipes.objectives import GPM, family_objectives
from jaxpref.recipes.offline import prepare_train_data, train_run
from jaxpref.recipes.reward_eval import (
    LINK_KEY,
    OBJECTIVE_WEIGHTS_KEY,
    TEMPERATURE_KEY,
    evaluate_reward_model,
    preference_scores,
)
from jaxpref.train.batches import (
    ROW_FIELDS,
    SEQUENCE_FIELDS,
    packed_batch,
    packed_preference_embeddings,
    packed_rewards,
    shard_batch,
)

# gpm_loss's hyperparameters (its other arguments come from the batch).
GPM_HPARAMS = ("temperature", "normalize")
MULTI_OBJECTIVE = "multi_objective"  # the objective's name with reward.objective_weights
MULTI_OBJECTIVE_HPARAMS = ("beta", "rating_coefficient")  # multi_objective_heads_loss's
# Per-attribute ratings of pairwise rows, [B, attributes] in a batch (jaxpref.data.loader).
RATING_KEYS = ("chosen_ratings", "rejected_ratings")


def objective_names(reward: RewardConfig) -> tuple[str, ...]:
    """The multi-objective heads' names: ``reward.objective_names``, else ``objective_0``, ...; () for
    a run without ``reward.objective_weights``."""
    count = len(reward.objective_weights)
    names = tuple(reward.objective_names) or tuple(f"objective_{i}" for i in range(count))
    if len(names) != count or len(set(names)) != count or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"`reward.objective_names`={list(reward.objective_names)} must be {count} distinct non-empty "
            f"names, one per weight of `reward.objective_weights`={list(reward.objective_weights)}."
        )
    return names


def multi_objective_heads_loss(
    *,
    chosen_rewards: jax.Array,  # [batch, heads]
    rejected_rewards: jax.Array,  # [batch, heads]
    weights: Sequence[float],  # [heads]
    names: Sequence[str] = (),
    beta: float = 1.0,
    rating_coefficient: float = 1.0,
    margin: jax.Array | None = None,  # [batch]
    chosen_ratings: jax.Array | None = None,  # [batch, heads], NaN where not rated
    rejected_ratings: jax.Array | None = None,  # [batch, heads]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Per-pair loss of multi-objective heads: Bradley-Terry on their weighted sum, plus a rating regression.

    .. math:: \ell = -\log\sigma\big(\beta\,(w^\top r_w - w^\top r_l) - m\big)
              + c\,\frac{\sum_{s \in \{w, l\}} \sum_a m_{s,a}\,(r_{s,a} - t_{s,a})^2}{\max(1, \sum_{s,a} m_{s,a})}

    The first term is :func:`~jaxpref.objectives.reward.multi_objective_loss`; the second, only when
    the batch carries ``chosen_ratings`` / ``rejected_ratings`` :math:`t`, is
    :func:`~jaxpref.objectives.reward.rating_regression_loss` of head :math:`a`'s reward against
    attribute :math:`a`'s rating over the pair's rated entries :math:`m_{s,a}` (NaN ratings are
    missing; a pair without any adds 0), with :math:`c` = ``rating_coefficient``.

    Metrics: the combined rewards' (``rewards/chosen``, ``rewards/accuracies``, ...),
    ``objectives/<name>/accuracies`` per head, and with ratings ``loss/ratings`` (the regression
    term before :math:`c`) and ``regression/mean_absolute_errors``.

    Reference: Wang et al., "Interpretable Preferences via Multi-Objective Reward Modeling and
    Mixture-of-Experts", arXiv:2406.12845 (regression on attribute ratings, then a weighted sum).
    """
    weights = jnp.asarray(weights, jnp.float32)
    losses, metrics = multi_objective_loss(
        chosen_rewards, rejected_rewards, weights, beta=beta, margin=margin
    )
    metrics = dict(metrics)
    chosen, rejected = jax.lax.stop_gradient(chosen_rewards), jax.lax.stop_gradient(rejected_rewards)
    for index, name in enumerate(names):
        metrics[f"objectives/{name}/accuracies"] = (chosen[:, index] > rejected[:, index]).astype(jnp.float32)
    if chosen_ratings is None and rejected_ratings is None:
        return losses, metrics
    if not (isinstance(rating_coefficient, int | float) and 0 <= rating_coefficient < math.inf):
        raise ValueError(f"`rating_coefficient` must be a finite number >= 0, got {rating_coefficient!r}.")
    ratings = []
    for side, rewards, given in (
        ("chosen", chosen_rewards, chosen_ratings),
        ("rejected", rejected_rewards, rejected_ratings),
    ):
        given = jnp.full(rewards.shape, jnp.nan) if given is None else jnp.asarray(given, jnp.float32)
        if given.shape != rewards.shape:
            raise ValueError(
                f"`{side}_ratings` has shape {given.shape} but the model gives {rewards.shape} rewards: the "
                f"data rates {given.shape[-1]} attribute(s) for {rewards.shape[-1]} heads; give one rating "
                "per head (reward.objective_weights), null where missing."
            )
        ratings.append(given)
    predicted = jnp.concatenate([chosen_rewards, rejected_rewards], axis=1)  # [batch, 2 * heads]
    target = jnp.concatenate(ratings, axis=1)
    regression, regression_metrics = rating_regression_loss(predicted, target, mask=jnp.isfinite(target))
    metrics |= regression_metrics | {"loss/ratings": jax.lax.stop_gradient(regression)}
    return losses + rating_coefficient * regression, metrics


def _ignoring_ratings(loss: Objective) -> Objective:
    """``loss`` accepting the batches' rating arrays and not reading them, so that objectives other
    than multi-objective heads train on data with rating columns too."""

    def ignoring(term):
        def fn(**inputs):
            return term.fn(**{k: v for k, v in inputs.items() if k not in RATING_KEYS})

        inputs = None if term.inputs is None else term.inputs | frozenset(RATING_KEYS)
        return dataclasses.replace(term, fn=fn, inputs=inputs)

    return Objective(tuple(ignoring(term) for term in loss.terms))


def reward_objective(config: RewardRunConfig) -> Objective:
    """The run's objective; checks the objective and ``config.reward`` before anything is built.

    ``objective.name`` is ``gpm``, or a reward objective of ``REWARD`` or a weighted sum of them
    (:func:`~jaxpref.objectives.parse_objective`).
    """
    name, hparams, reward = config.objective.name, config.objective.hparams, config.reward
    if type(reward.ensemble_size) is not int or reward.ensemble_size < 1:
        raise ValueError(f"`reward.ensemble_size` must be a positive int, got {reward.ensemble_size!r}.")
    # A bad ensemble_method or uncertainty_coefficient fails now, not after training.
    ensemble_rewards(
        np.zeros((reward.ensemble_size, 1)),
        method=reward.ensemble_method,
        uncertainty_coefficient=reward.uncertainty_coefficient,
    )
    if reward.objective_weights:
        return _multi_objective(config)
    if name == GPM:
        if reward.ensemble_size != 1:
            raise ValueError(
                f"`reward.ensemble_size`={reward.ensemble_size}: ensembles are of scalar heads; a General "
                "Preference Model (objective.name=gpm) needs reward.ensemble_size=1."
            )
        unknown = sorted(set(hparams) - set(GPM_HPARAMS))
        if unknown:
            raise ValueError(
                f"`objective` {GPM!r} got unknown hyperparameter(s) {unknown}; it accepts {GPM_HPARAMS}."
            )
        return _ignoring_ratings(Objective.from_fn(gpm_loss, name=GPM, **hparams))
    member = parse_objective(name, family_objectives("reward"), **hparams)
    if reward.ensemble_size == 1:
        return _ignoring_ratings(member)
    ensemble = Objective.from_fn(functools.partial(ensemble_reward_loss, member), name=f"ensemble_{name}")
    return _ignoring_ratings(ensemble)


def _multi_objective(config: RewardRunConfig) -> Objective:
    """:func:`multi_objective_heads_loss` with the run's weights, names and hyperparameters, checked."""
    name, hparams, reward = config.objective.name, config.objective.hparams, config.reward
    if name != "bradley_terry":
        raise ValueError(
            f"`reward.objective_weights` trains multi-objective heads by Bradley-Terry on their weighted sum; "
            f"use objective.name=bradley_terry (the default), not {name!r}."
        )
    if reward.ensemble_size != 1:
        raise ValueError(
            f"`reward.ensemble_size`={reward.ensemble_size}: multi-objective heads (reward.objective_weights) "
            "are one head per attribute; set reward.ensemble_size=1."
        )
    weights = tuple(reward.objective_weights)
    if not all(isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ValueError(f"`reward.objective_weights`={list(weights)} must be finite numbers, one per head.")
    names = objective_names(reward)
    unknown = sorted(set(hparams) - set(MULTI_OBJECTIVE_HPARAMS))
    if unknown:
        raise ValueError(
            f"Multi-objective heads got unknown objective hyperparameter(s) {unknown}; they accept "
            f"{MULTI_OBJECTIVE_HPARAMS}."
        )
    beta, coefficient = hparams.get("beta", 1.0), hparams.get("rating_coefficient", 1.0)
    if not (isinstance(beta, int | float) and 0 < beta < math.inf):
        raise ValueError(f"`objective.beta` must be a positive number, got {beta!r}.")
    if not (isinstance(coefficient, int | float) and 0 <= coefficient < math.inf):
        raise ValueError(f"`objective.rating_coefficient` must be a finite number >= 0, got {coefficient!r}.")
    loss = functools.partial(multi_objective_heads_loss, weights=weights, names=names)
    return Objective.from_fn(loss, name=MULTI_OBJECTIVE, **hparams)


def reward_model_class(config: RewardRunConfig) -> Callable[..., RewardModel | PreferenceEmbeddingModel]:
    """``model_class(decoder_config, *, rngs)`` building the run's model (for ``build_policy``)."""
    reward = config.reward
    if config.objective.name == GPM:

        def preference_embedding_model(decoder_config: DecoderConfig, *, rngs: nnx.Rngs):
            return PreferenceEmbeddingModel(
                decoder_config,
                rngs=rngs,
                embedding_dim=reward.embedding_dim,
                learn_scales=reward.learn_scales,
            )

        return preference_embedding_model

    num_labels = len(reward.objective_weights) or reward.ensemble_size

    def reward_model(decoder_config: DecoderConfig, *, rngs: nnx.Rngs):
        return RewardModel(decoder_config, rngs=rngs, num_labels=num_labels)

    return reward_model


def preference_link(
    objective_name: str, hparams: Mapping[str, Any], reward: RewardConfig = RewardConfig()
) -> tuple[str, float]:
    """``(link, temperature)``: the model's ``P(y_w > y_l) = link(s / temperature)`` under its
    objective, for the calibration of :mod:`jaxpref.recipes.reward_eval`."""
    if reward.objective_weights:  # sigmoid(beta * (R_w - R_l))
        return "logistic", 1.0 / float(hparams.get("beta", 1.0))
    if objective_name == "thurstone":  # Phi((r_w - r_l) / (sqrt(2) sigma))
        sigma = REWARD["thurstone"].resolve_hparams("reward", hparams)["sigma"]
        return "probit", math.sqrt(2.0) * sigma
    if objective_name == GPM:  # sigmoid(s / tau)
        default = inspect.signature(gpm_loss).parameters["temperature"].default
        return "logistic", float(hparams.get("temperature", default))
    return "logistic", 1.0


def pair_scores(
    model: RewardModel | PreferenceEmbeddingModel,
    batches: Iterable[Mapping[str, np.ndarray]],
    mesh: Mesh,
    reward: RewardConfig = RewardConfig(),
) -> np.ndarray:
    """Preference score of every pair in ``batches``, in order, ``[pairs]``: the chosen minus the
    rejected reward, or the General Preference Model score (see
    :func:`jaxpref.recipes.reward_eval.preference_scores`).

    ``batches`` are pairwise loader batches (prefix-shared or not).
    """
    graphdef, state = nnx.split(model)

    # Replicated output: every host can read all scores, also with several processes.
    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, PartitionSpec()))
    def score(state, batch):
        model = nnx.merge(graphdef, state)
        packed = packed_batch(batch)
        if isinstance(model, PreferenceEmbeddingModel):
            outputs = packed_preference_embeddings(model, packed)
        else:
            outputs = packed_rewards(model, packed)
        # Sequences 0..B-1 are the chosen responses, B..2B-1 the rejected ones.
        chosen, rejected = (jax.tree.map(lambda x, i=i: jnp.split(x, 2)[i], outputs) for i in (0, 1))
        return preference_scores(chosen, rejected, reward)

    scores = []
    for batch in batches:
        fields = {k: batch[k] for k in (*ROW_FIELDS, *SEQUENCE_FIELDS) if batch.get(k) is not None}
        scores.append(np.asarray(jax.device_get(score(state, shard_batch(fields, mesh, groups=2)))))
    return np.concatenate(scores)


def _store_preference_link(
    hf_dir: pathlib.Path, link: str, temperature: float, reward: RewardConfig = RewardConfig()
) -> None:
    """Adds the link (and multi-objective heads' names and weights) to the saved config.json, where
    ``jaxpref reward-eval`` finds them."""
    path = hf_dir / "config.json"
    hf = {**json.loads(path.read_text()), LINK_KEY: link, TEMPERATURE_KEY: temperature}
    if reward.objective_weights:
        names = objective_names(reward)
        hf |= {
            OBJECTIVE_WEIGHTS_KEY: [float(w) for w in reward.objective_weights],
            "id2label": {str(i): name for i, name in enumerate(names)},
            "label2id": {name: i for i, name in enumerate(names)},
        }
    path.write_text(json.dumps(hf, indent=2))


def run_reward(config: RewardRunConfig) -> dict[str, Any]:
    """Trains a reward model on ``config.data.train_files`` and writes ``runs/<name>/``.

    Returns the last step's metrics (``loss``, ``rewards/accuracies``, ``rewards/margins``, ...,
    on that step's batch) and, over one pass of every training pair with the final weights,
    ``train_accuracy`` (share of pairs with a positive preference score: chosen reward strictly
    above rejected), ``train_margin`` (mean score) and ``train_pairs``; with
    ``reward.eval_files``, ``eval_accuracy`` and ``eval_score`` (the rest is in
    ``reward_eval.json``).
    """
    loss = reward_objective(config)
    mesh = build_mesh(config.mesh)
    tokenizer = build_tokenizer(config.model)
    model = build_policy(
        config.model, tokenizer, mesh, model_class=reward_model_class(config), lora=config.lora
    )
    source, _ = prepare_train_data(config, tokenizer)  # trained on, then scored
    train_run(config, model, tokenizer, mesh, family="reward", loss=loss, source=source)
    link, temperature = preference_link(config.objective.name, config.objective.hparams, config.reward)
    lead = jax.process_index() == 0
    if lead:
        _store_preference_link(config.run_dir / "hf", link, temperature, config.reward)

    batches = make_loader(
        source,
        config.data.batch_size,
        prefix_sharing=config.data.prefix_sharing,
        shuffle=False,
        drop_remainder=False,
    )
    scores = pair_scores(model, batches, mesh, config.reward)
    results = {
        **read_metrics(config.run_dir)[-1],
        "train_accuracy": float(np.mean(scores > 0)),
        "train_margin": float(np.mean(scores)),
        "train_pairs": len(scores),
    }
    if config.reward.eval_files:
        evaluation = evaluate_reward_model(model, tokenizer, config, link=link, temperature=temperature)
        results |= {"eval_accuracy": evaluation["accuracy"], "eval_score": evaluation["score"]}
    if lead:
        (config.run_dir / "results.json").write_text(json.dumps(results, indent=2))
    print_summary(
        config,
        f"{config.train.steps} steps of {config.objective.name!r} on {', '.join(config.data.train_files)}; "
        f"accuracy {results['train_accuracy']:.1%} on the {len(scores)} training pairs",
        results,
        ("loss", "rewards/accuracies", "train_margin", "eval_accuracy", "eval_score"),
        results=config.run_dir / "results.json",
    )
    return results
