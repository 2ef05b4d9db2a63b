"""Reward-model training: a scalar score head on a decoder backbone, learnt from preference pairs.

:func:`run_reward` trains a :class:`~jaxpref.models.heads.RewardModel` on pairwise files with a
reward objective (``config.objective.name``: ``bradley_terry``, ``bradley_terry_soft`` or
``thurstone``, see :mod:`jaxpref.objectives.reward`) and ``build_step(family="reward")``. The model
comes from ``config.model.checkpoint`` (a causal-LM folder gives the backbone and the head starts
fresh; the ``hf/`` folder of an earlier reward run gives both), or is a fresh tiny backbone with the
tokenizer's vocabulary.

``runs/<name>/`` gets what every run writes (``config.json``, ``data/``, ``checkpoints/``,
``metrics/``; see :func:`experiments.pipeline.train_run`), ``hf/`` in ``transformers``'
``*ForSequenceClassification`` layout, and ``results.json``: the last step's metrics plus the
final model's accuracy over every training pair. From the command line:
``jaxpref reward --data prefs.jsonl [--model /models/Qwen3-0.6B]``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments.configs import RunConfig
from experiments.pipeline import (
    build_mesh,
    build_policy,
    build_tokenizer,
    prepare_train_data,
    read_metrics,
    train_run,
)
from jaxpref.data import make_loader
from jaxpref.models import RewardModel
from jaxpref.objectives import REWARD
from jaxpref.train.batches import ROW_FIELDS, SEQUENCE_FIELDS, packed_batch, packed_rewards, shard_batch


def pair_rewards(
    model: RewardModel, batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh
) -> tuple[np.ndarray, np.ndarray]:
    """Rewards of the chosen and of the rejected response of every pair in ``batches``, in order.

    ``batches`` are pairwise loader batches (prefix-shared or not); returns ``[pairs]`` arrays.
    """
    graphdef, state = nnx.split(model)

    # Replicated output: every host can read all rewards, also with several processes.
    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, PartitionSpec()))
    def score(state, batch):
        return packed_rewards(nnx.merge(graphdef, state), packed_batch(batch))

    chosen, rejected = [], []
    for batch in batches:
        fields = {k: batch[k] for k in (*ROW_FIELDS, *SEQUENCE_FIELDS) if batch.get(k) is not None}
        rewards = np.asarray(jax.device_get(score(state, shard_batch(fields, mesh, family="reward"))))
        chosen_part, rejected_part = np.split(rewards, 2)  # sequences 0..B-1 chosen, B..2B-1 rejected
        chosen.append(chosen_part)
        rejected.append(rejected_part)
    return np.concatenate(chosen), np.concatenate(rejected)


def run_reward(config: RunConfig) -> dict[str, float]:
    """Trains a reward model on ``config.data.train_files`` and writes ``runs/<name>/``.

    Returns the last step's metrics (``loss``, ``rewards/accuracies``, ``rewards/margins``, ...,
    on that step's batch) and, over one pass of every training pair with the final weights,
    ``train_accuracy`` (share of pairs with chosen reward strictly above rejected),
    ``train_margin`` (mean chosen minus rejected reward) and ``train_pairs``.
    """
    if config.objective.name not in REWARD:
        raise ValueError(
            f"`objective.name`={config.objective.name!r} is not a reward objective; use one of {sorted(REWARD)}."
        )
    mesh = build_mesh(config.mesh)
    tokenizer = build_tokenizer(config.model)
    model = build_policy(config.model, tokenizer, mesh, model_class=RewardModel)
    train_run(config, model, tokenizer, mesh, family="reward")

    source, _ = prepare_train_data(config, tokenizer)  # the dataset train_run stored, reused
    batches = make_loader(
        source,
        config.data.batch_size,
        prefix_sharing=config.data.prefix_sharing,
        shuffle=False,
        drop_remainder=False,
    )
    chosen, rejected = pair_rewards(model, batches, mesh)
    results = {
        **read_metrics(config.run_dir)[-1],
        "train_accuracy": float(np.mean(chosen > rejected)),
        "train_margin": float(np.mean(chosen - rejected)),
        "train_pairs": len(chosen),
    }
    (config.run_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(
        f"reward model: accuracy {results['train_accuracy']:.1%} on {len(chosen)} training pairs, mean margin "
        f"{results['train_margin']:.3f}; run written to {config.run_dir}"
    )
    return results
