"""Building blocks every recipe shares: mesh, tokenizer, policy, optimizer, the training loop with
its run folder, and batched sampling. Each is a small function of a config, so notebooks and
studies can use them piecemeal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxpref.data import load_tokenizer
from jaxpref.models import Decoder, DecoderConfig, from_pretrained, save_pretrained
from jaxpref.models.lora import apply_lora, has_lora, save_adapters
from jaxpref.models.sampling import SamplingConfig, generate
from jaxpref.recipes.configs import (
    CHAR_TOKENIZER,
    LoRAConfig,
    MeshConfig,
    ModelConfig,
    OnlineRunConfig,
    OptimizerConfig,
    RunConfig,
)
from jaxpref.overrides import to_dict
from jaxpref.sharding import make_mesh
from jaxpref.train.checkpoint import make_checkpoint_manager
from jaxpref.train.loop import train
from jaxpref.train.metrics import DEFAULT_PLOT_KEYS, MetricsWriter
from jaxpref.train.step import TrainState

logger = logging.getLogger(__name__)


def build_mesh(config: MeshConfig) -> Mesh:
    return make_mesh(config.data, config.fsdp, config.tensor)


def describe_topology(config: Any) -> str:
    """What ``--dry-run`` prints: the run's mesh, the mesh positions of each host's devices, and the
    per-host and global batch (each host loads ``data.batch_size`` examples; their batches are merged).

    Builds the mesh only (no model, no data, no compilation); the main job's stages share ``sft.mesh``.
    """
    run = config if hasattr(config, "data") else getattr(config, "sft", None)
    if not hasattr(run, "mesh"):
        raise ValueError(f"--dry-run shows a run's mesh and data batches; {type(config).__name__} has no such pair.")
    mesh_config, data = run.mesh, run.data
    mesh = build_mesh(mesh_config)
    sizes = " x ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
    processes = jax.process_count()
    lines = [f"mesh: {sizes} ({mesh.devices.size} devices, {processes} process(es))"]
    for process in range(processes):
        places = [
            f"{device.platform}:{device.id} at ({', '.join(str(int(i)) for i in index)})"
            for index, device in np.ndenumerate(mesh.devices)
            if device.process_index == process
        ]
        lines.append(f"process {process}: " + "; ".join(places))
    lines.append(
        f"batch: {data.batch_size} examples per host (data.batch_size) -> {data.batch_size * processes} global, "
        f"split over data x fsdp = {mesh.shape['data'] * mesh.shape['fsdp']} ways"
    )
    return "\n".join(lines)


def build_tokenizer(config: ModelConfig):
    """The configured tokenizer, else the checkpoint's, else the bundled character tokenizer."""
    return load_tokenizer(config.tokenizer or config.checkpoint or CHAR_TOKENIZER)


def build_policy(
    config: ModelConfig,
    tokenizer,
    mesh: Mesh | None = None,
    *,
    model_class: type[nnx.Module] = Decoder,
    lora: LoRAConfig | None = None,
) -> nnx.Module:
    """The policy from a local Hugging Face checkpoint, or a fresh tiny decoder for the tokenizer.

    ``model_class`` builds another model on the same backbone, e.g. a
    :class:`~jaxpref.models.heads.RewardModel` (a causal-LM checkpoint gives it its backbone, and its
    head starts fresh). ``lora`` with a rank > 0 adds LoRA adapters (QLoRA with ``lora.quantize``:
    :func:`~jaxpref.models.lora.apply_lora`), so a training step trains only them (and the heads).
    """
    model = _build_model(config, tokenizer, mesh, model_class)
    if lora is not None and lora.rank:
        apply_lora(
            model,
            rank=lora.rank,
            alpha=lora.alpha,
            dropout=lora.dropout,
            targets=lora.targets,
            quantize=lora.quantize,
            adapter_dtype=jnp.dtype(lora.adapter_dtype),
            seed=config.seed,
        )
    return model


def _build_model(
    config: ModelConfig, tokenizer, mesh: Mesh | None, model_class: type[nnx.Module]
) -> nnx.Module:
    dtype = jnp.dtype(config.dtype)
    compute_dtype = jnp.dtype(config.compute_dtype or config.dtype)
    if config.checkpoint is not None:
        return from_pretrained(
            config.checkpoint,
            dtype=dtype,
            compute_dtype=compute_dtype,
            mesh=mesh,
            model_class=model_class,
            remat=config.remat,
        )
    decoder_config = DecoderConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        param_dtype=dtype,
        dtype=compute_dtype,
        remat=config.remat,
    )
    return model_class(decoder_config, rngs=nnx.Rngs(config.seed))


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay to 10% over ``total_steps`` (a run's
    ``train.schedule_length``; the rate stays at 10% after it), after global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(total_steps, config.warmup_steps + 1),
        end_value=0.1 * config.learning_rate,
    )
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, weight_decay=config.weight_decay),
    )


def train_and_export(
    config: RunConfig | OnlineRunConfig,
    step: Callable[[TrainState, Any], tuple[TrainState, Mapping[str, jax.Array]]],
    data,
    model: nnx.Module,
    tokenizer,
    *,
    plot_keys: Sequence[str] = DEFAULT_PLOT_KEYS,
) -> TrainState:
    """Runs ``step`` (a :class:`~jaxpref.train.step.TrainStep` or an online step) on ``data`` up to
    ``config.train.steps``, then writes the trained ``model`` (updated in place) and the tokenizer.

    Checkpoints go to ``runs/<name>/checkpoints`` (a rerun resumes from the latest), metrics to
    ``metrics/`` (``plot_keys`` drawn in ``curves.png``), the weights in Hugging Face layout to
    ``hf/``. A LoRA model's adapters go to ``adapter/`` (:func:`~jaxpref.models.lora.save_adapters`)
    and its merged weights to ``hf/`` unless ``config.lora.merge`` is false. A run that stops
    learning is flagged (:class:`DeadRunWatch`). In a multi-host run every process calls it: the
    save is collective and process 0 writes the files.
    """
    run_dir = config.run_dir
    lead = jax.process_index() == 0
    manager = make_checkpoint_manager(
        run_dir / "checkpoints",
        max_to_keep=config.train.keep_checkpoints,
        save_interval_steps=config.train.checkpoint_every,
    )
    with contextlib.ExitStack() as stack:
        writer = (
            stack.enter_context(
                MetricsWriter(
                    run_dir / "metrics",
                    plot_keys=plot_keys,
                    report_to=tuple(config.train.report_to.split(",")),
                    wandb_options={"name": config.name, "config": to_dict(config)},
                )
            )
            if lead
            else None
        )
        if writer is not None and config.train.dead_run_steps:
            writer = DeadRunWatch(writer, config.train.dead_run_steps, config.optimizer.learning_rate)
        state = train(
            step.init(),
            step,
            data,
            num_steps=config.train.steps,
            checkpoint_manager=manager,
            metrics_writer=writer,
            max_consecutive_nonfinite=config.train.max_consecutive_nonfinite,
            progress=config.train.progress and lead,
        )
    manager.wait_until_finished()
    manager.close()
    nnx.update(model, state.params)
    lora = has_lora(model)
    if lora:
        save_adapters(model, run_dir / "adapter")  # collective; writes on process 0
        if lead:
            tokenizer.save_pretrained(run_dir / "adapter")
    if not lora or config.lora.merge:
        save_pretrained(model, run_dir / "hf")  # collective; writes on process 0
        if lead:
            tokenizer.save_pretrained(run_dir / "hf")
    return state


class DeadRunWatch:
    """A metrics writer that also warns, once, when the run looks dead: ``patience`` steps in a row
    with a gradient norm of exactly 0 or exactly the same loss. Updates then change nothing, and the
    run would otherwise end normally with an untrained model."""

    def __init__(self, writer: MetricsWriter, patience: int, learning_rate: float):
        self.writer, self.patience, self.learning_rate = writer, patience, learning_rate
        self.zero_grads = self.same_loss = 0  # lengths of the current streaks
        self.last_loss: float | None = None
        self.warned = False

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        self.writer.write(step, metrics)
        loss = metrics.get("loss")
        self.zero_grads = self.zero_grads + 1 if metrics.get("grad_norm") == 0.0 else 0
        self.same_loss = self.same_loss + 1 if loss is not None and loss == self.last_loss else 1
        self.last_loss = loss
        if self.warned or max(self.zero_grads, self.same_loss) < self.patience:
            return
        self.warned = True
        what = (
            f"the gradient norm was exactly 0 for {self.zero_grads} steps in a row"
            if self.zero_grads >= self.patience
            else f"the loss stayed at {loss:.6g} for {self.same_loss} steps in a row"
        )
        logger.warning(
            "DEAD RUN? At step %d %s: the model is not learning. Usual causes: a learning rate far too "
            "large for the model (optimizer.learning_rate=%g) or too small to move it; a saturated "
            "loss; online, rewards equal within every group. `train.dead_run_steps` sets this check.",
            step, what, self.learning_rate,
        )  # fmt: skip

    def __getattr__(self, name: str) -> Any:  # flush, plot, close...: the writer's
        return getattr(self.writer, name)


def print_summary(
    config: RunConfig | OnlineRunConfig,
    what: str,
    metrics: Mapping[str, float],
    shown: Sequence[str],
    **files,
) -> None:
    """The end of a run on one screen: what ran, its final metrics and where its files are
    (``files``: label -> path, beside the weights, metrics and config every run writes). Printed
    by process 0 alone, which writes those files."""
    if jax.process_index() != 0:
        return
    run_dir = config.run_dir
    final = ", ".join(f"{key}={metrics[key]:.4g}" for key in shown if key in metrics)
    weights = run_dir / "hf" if (run_dir / "hf").exists() else run_dir / "adapter"
    rows = {
        "final": f"step {int(metrics.get('step', 0))}: {final}",
        "weights": weights,
        "metrics": f"{run_dir / 'metrics'} (metrics.jsonl, curves.png; tensorboard --logdir {run_dir / 'metrics'})",
        "config": run_dir / "config.json",
        **files,
    }
    print(f"{config.name} finished: {what}")
    for label, value in rows.items():
        print(f"  {label:<9}{value}")


def sample_completions(
    model: nnx.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    rng: jax.Array,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 256,
) -> list[str]:
    """One sampled completion per prompt (decoded, special tokens removed), in fixed-shape batches
    so the sampler compiles once."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    prompt_length = max(map(len, encoded))
    # Llama-style tokenizers have no pad token: pad with EOS (padding is masked out anyway).
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
    )
    completions = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids = np.full((batch_size, prompt_length), pad_id, np.int32)
        mask = np.zeros((batch_size, prompt_length), np.int32)
        for i, tokens in enumerate(chunk + [chunk[-1]] * (batch_size - len(chunk))):  # pad the batch
            ids[i, prompt_length - len(tokens) :] = tokens  # left padding
            mask[i, prompt_length - len(tokens) :] = 1
        out = generate(model, ids, mask, jax.random.fold_in(rng, start), config)
        tokens = np.asarray(out["tokens"])
        lengths = np.asarray(out["lengths"])
        completions += [
            tokenizer.decode(tokens[i, : lengths[i]], skip_special_tokens=True) for i in range(len(chunk))
        ]
    return completions


def read_metrics(run_dir: pathlib.Path) -> list[Mapping[str, float]]:
    lines = (run_dir / "metrics" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def replace_run(config: RunConfig, **changes) -> RunConfig:
    """``dataclasses.replace`` that also reaches into ``data`` and ``train`` (``data__train_files=...``)."""
    nested: dict[str, dict[str, Any]] = {}
    flat = {}
    for key, value in changes.items():
        section, sep, field = key.partition("__")
        if sep:
            nested.setdefault(section, {})[field] = value
        else:
            flat[key] = value
    for section, fields in nested.items():
        flat[section] = dataclasses.replace(getattr(config, section), **fields)
    return dataclasses.replace(config, **flat)
