"""Offline runs (``jaxpref sft|dpo|kto``): a policy trained on a fixed file of rows.

:func:`train_run` prepares the run's files (:mod:`jaxpref.data`), builds the train step of the
rows' family (:func:`~jaxpref.train.step.build_step`) with the run's objective and reference, and
trains; :func:`run_offline` is the command: it checks the objective, then builds the mesh, the
tokenizer and the policy. The objective, ``objective.name``, is a registered name of the run's
kind (:func:`~jaxpref.recipes.objectives.family_objectives`) or a weighted sum of them such as
``"sigmoid + 0.2*sft"`` (:func:`~jaxpref.objectives.parse_objective`), with the
``objective.<hparam>`` settings on the terms that accept them; it is checked before any model is
built or data prepared.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxpref.data import TokenizeOptions, make_loader, prepare_dataset
from jaxpref.data.loader import dataset_metadata
from jaxpref.objectives import Objective, parse_objective
from jaxpref.recipes.common import (
    build_mesh,
    build_policy,
    build_tokenizer,
    make_optimizer,
    print_summary,
    read_metrics,
    train_and_export,
)
from jaxpref.recipes.configs import RunConfig
from jaxpref.recipes.objectives import family_objectives
from jaxpref.recipes.run_folder import write_config
from jaxpref.train.families import SHORTHANDS as FAMILIES
from jaxpref.train.reference import ReferenceLogps, cached_reference_logps
from jaxpref.train.step import build_step

# Row layout of the data -> the kind of training `train.family="auto"` picks.
LAYOUT_FAMILIES = {"sft": "sft", "pairwise": "pairwise", "unpaired": "unpaired", "ranked": "listwise"}


def run_objective(config: RunConfig, family: str | None = None) -> Objective | None:
    """The run's objective from ``config.objective`` (None for SFT), or a ValueError naming the bad
    setting: what to call before building anything."""
    family = run_family(config, family)
    if family == "sft":
        return None
    return parse_objective(config.objective.name, family_objectives(family), **config.objective.hparams)


class _WithReference:
    """A data iterator whose batches get their cached reference log-probs attached."""

    def __init__(self, iterator, reference: ReferenceLogps):
        self.iterator, self.reference = iterator, reference

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.reference.attach(next(self.iterator))

    def get_state(self) -> dict[str, Any]:
        return self.iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.iterator.set_state(state)


def prepare_train_data(config: RunConfig, tokenizer):
    """``(data source, report)`` of the run's training files, stored under ``runs/<name>/data``.

    Preparing the same files again reuses the stored dataset. With several processes, process 0
    prepares first and the others after it: on a shared folder they then read its dataset instead
    of writing the same one at once; on host-local folders each host prepares its own copy.
    """
    if not config.data.train_files:
        raise ValueError("`data.train_files` is empty: pass local JSONL or Parquet files.")
    options = TokenizeOptions(
        max_length=config.data.max_length, max_prompt_length=config.data.max_prompt_length
    )
    prepare = functools.partial(
        prepare_dataset,
        list(config.data.train_files), config.data.layout, config.run_dir / "data", tokenizer, options=options,
    )  # fmt: skip
    if jax.process_count() == 1:
        return prepare()
    if jax.process_index() != 0:
        multihost_utils.sync_global_devices("jaxpref data prepared")
        return prepare()
    prepared = prepare()
    multihost_utils.sync_global_devices("jaxpref data prepared")
    return prepared


def run_family(config: RunConfig, family: str | None = None) -> str:
    """The kind of training: ``family`` or ``train.family``, checked against the data layout; for
    ``"auto"`` the layout's own."""
    layout = config.data.layout
    family = family or config.train.family
    if family == "auto":
        if layout not in LAYOUT_FAMILIES:
            raise ValueError(
                f"`data.layout`={layout!r} cannot be trained here; use one of {sorted(LAYOUT_FAMILIES)}."
            )
        return LAYOUT_FAMILIES[layout]
    if family not in FAMILIES:
        raise ValueError(f"`train.family`={family!r} must be 'auto' or one of {sorted(FAMILIES)}.")
    if FAMILIES[family].layout != layout:
        raise ValueError(
            f"`train.family`={family!r} trains on {FAMILIES[family].layout!r} rows, but `data.layout`={layout!r}."
        )
    return family


def train_run(
    config: RunConfig,
    model: nnx.Module,
    tokenizer,
    mesh: Mesh,
    *,
    family: str | None = None,
    loss: Objective | None = None,
    source=None,
) -> nnx.Module:
    """Prepares the data (unless ``source``, :func:`prepare_train_data`'s, is given), trains ``model``
    in place, and writes the run folder.

    ``family`` is the train-step family (:func:`~jaxpref.train.step.build_step`); by default the
    data layout's own (``sft``, ``pairwise``, ``unpaired``). ``"reward"`` trains a
    :class:`~jaxpref.models.heads.RewardModel` (or preference-embedding model) on pairwise data.
    SFT and reward runs have no reference, whatever ``train.reference`` says. ``loss`` is the
    objective; by default :func:`run_objective`'s.

    ``runs/<name>/`` gets ``config.json`` (resolved), ``data/`` (the prepared dataset and its bad-row
    report), ``checkpoints/`` (orbax; an interrupted run resumes from the latest), ``metrics/``
    (JSONL, TensorBoard, ``curves.png``) and ``hf/`` (the trained weights in Hugging Face layout).
    """
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0  # in a multi-host run, process 0 writes the files
    if lead:
        write_config(config)
    family = run_family(config, family)
    if source is None:
        source, _ = prepare_train_data(config, tokenizer)  # its report is logged as it is prepared
    reference = config.train.reference if FAMILIES[family].has_reference else "none"
    if loss is None:
        loss = run_objective(config, family)
    step = build_step(
        model,
        loss,
        make_optimizer(config.optimizer, config.train.schedule_length),
        mesh,
        reference=reference,
        family=family,
        grad_accum_steps=config.train.grad_accum_steps,
        chunk_size=config.train.chunk_size,
    )
    loader_options = dict(prefix_sharing=config.data.prefix_sharing)
    iterator = iter(
        make_loader(source, config.data.batch_size, seed=config.data.seed, num_epochs=None, **loader_options)
    )
    if reference == "cached":
        if jax.process_count() > 1:
            raise ValueError(
                "`train.reference`='cached' is single-host for now (the cache is keyed by host-local "
                "examples); use train.reference=frozen on a multi-host run."
            )
        # One pass in dataset order, every row once (the last, partial batch included).
        batches = lambda: iter(  # noqa: E731
            make_loader(source, config.data.batch_size, shuffle=False, drop_remainder=False, **loader_options)
        )
        logps, _ = cached_reference_logps(
            run_dir / "reference_cache",
            model,
            batches,
            family=family,
            dataset_fingerprint=dataset_metadata(source)["fingerprint"],
            mesh=mesh,
            chunk_size=config.train.chunk_size,
        )
        iterator = _WithReference(iterator, logps)
    train_and_export(config, step, iterator, model, tokenizer)
    return model


def run_offline(config: RunConfig) -> Mapping[str, float]:
    """``jaxpref sft|dpo|kto|listwise|tdpo``: checks the objective, builds the policy and tokenizer,
    trains, prints a summary; returns the last step's metrics."""
    loss = run_objective(config)
    mesh = build_mesh(config.mesh)
    tokenizer = build_tokenizer(config.model)
    model = build_policy(config.model, tokenizer, mesh, lora=config.lora)
    train_run(config, model, tokenizer, mesh, loss=loss)
    last = read_metrics(config.run_dir)[-1]
    objective = "" if run_family(config) == "sft" else f" of {config.objective.name!r}"
    print_summary(
        config,
        f"{config.train.steps} steps{objective} on {', '.join(config.data.train_files)}, "
        f"from {config.model.checkpoint or 'a fresh tiny decoder'}",
        last,
        ("loss", "rewards/accuracies", "rewards/margins", "grad_norm"),
    )
    return last
