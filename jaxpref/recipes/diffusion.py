"""Diffusion and flow-model preference optimisation on the bundled shapes task, end to end.

1. Pretraining: two small U-Nets (:mod:`jaxpref.models.diffusion`) learn the training distribution
   of :class:`~jaxpref.data.images.ShapesTask` (noisy captions, shapes anywhere, of any size): a
   DDPM (cosine schedule, v-prediction by default, ``ddpm_prediction="epsilon"`` for noise
   prediction; sampled with DDIM) and a velocity-prediction rectified flow (sampled with Euler
   steps).
2. Preference data: each generator draws four images for each of ``pair_prompts`` training
   prompts; by the hidden reward (:func:`~jaxpref.data.images.hidden_reward`: prompt adherence plus
   a centred, target-size shape) the best is chosen over the worst (prompts whose samples all tie
   are skipped). For KTO every image is desirable when its reward is above the median.
3. Fine-tuning (:mod:`jaxpref.train.diffusion`), each from its pretrained generator, against it as
   the frozen reference: Diffusion-DPO and Diffusion-KTO (DDPM), Flow-DPO (flow), and reward
   backpropagation through the last sampling steps (DRaFT-K, flow) on the differentiable
   :func:`~jaxpref.data.images.surrogate_reward`.
4. Evaluation on the held-out prompts (never in the preference data): mean hidden reward and its
   components, and diversity (mean pairwise RMS distance of a prompt's samples); every model of a
   parameterisation samples from the same noise. A PNG grid shows samples before and after.

Everything lands in ``runs/diffusion/`` (each stage's checkpoints and metrics, ``results.json``,
``samples.png``); rerunning resumes finished stages from their checkpoints.
Run: ``jaxpref diffusion [--set pretrain.steps=2000 ...]``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time

import jax
import numpy as np
from flax import nnx
from matplotlib.figure import Figure

from jaxpref.data.images import (
    HELD_OUT_PROMPTS,
    REWARD_COMPONENTS,
    VOCAB_SIZE,
    ArrayBatches,
    ShapesTask,
    all_prompts,
    decode_prompt,
    encode_prompts,
    hidden_reward,
    mean_pairwise_distance,
    reward_components,
    surrogate_reward,
    to_model_space,
    to_pixel_space,
    train_prompts,
)
from jaxpref.models.diffusion import Denoiser, DenoiserConfig, SamplerConfig
from jaxpref.overrides import to_dict
from jaxpref.recipes.common import build_mesh, make_optimizer
from jaxpref.recipes.configs import MeshConfig, OptimizerConfig
from jaxpref.train import MetricsWriter, make_checkpoint_manager, train
from jaxpref.train.diffusion import (
    Denoising,
    DiffusionDPO,
    DiffusionKTO,
    DiffusionMethod,
    DiffusionStep,
    FlowDPO,
    RewardBackprop,
    build_diffusion_step,
)

# Fine-tuning methods: (the generator they start from, the method's class).
METHODS = {
    "dpo": ("ddpm", DiffusionDPO),
    "kto": ("ddpm", DiffusionKTO),
    "flow-dpo": ("flow", FlowDPO),
    "draft": ("flow", RewardBackprop),
}
SAMPLE_CHUNK = 256  # images per sampler call: one compiled program per generator


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One training stage; unknown ``<stage>.<key>=...`` overrides are the method's hyperparameters."""

    __extra_field__ = "hparams"

    steps: int = 200
    batch_size: int = 32
    optimizer: OptimizerConfig = OptimizerConfig()
    hparams: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DiffusionExperimentConfig:
    """``jaxpref diffusion``: every default in one place."""

    name: str = "diffusion"
    runs_dir: str = "runs"
    seed: int = 0
    methods: tuple[str, ...] = tuple(METHODS)  # fine-tunings to run (the pretraining each needs runs first)
    task: ShapesTask = ShapesTask()
    # The DDPM generator's parameterisation: "v_prediction" or "epsilon" (which a model this small
    # and this briefly trained samples poorly: its image estimates at high noise divide by sqrt(alpha_bar)).
    ddpm_prediction: str = "v_prediction"
    base_channels: int = 16
    channel_mults: tuple[int, ...] = (1, 2, 2)
    train_images: int = 8192
    sampler_steps: int = 20
    pair_prompts: int = 512  # per generator, sampled samples_per_pair_prompt times and scored
    samples_per_pair_prompt: int = 4
    eval_samples_per_prompt: int = 64
    grid_samples_per_prompt: int = 4
    reward_temperature: float = 0.05  # of the surrogate reward DRaFT backpropagates
    mesh: MeshConfig = MeshConfig()
    pretrain: StageConfig = StageConfig(
        steps=1000, batch_size=64, optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=50)
    )
    # Tuned on a small grid. Diffusion-DPO's beta=5000 (for Stable Diffusion latents) with lr <= 5e-5
    # barely moved these 16x16 generators in 200 steps; KTO at lr=2e-4, beta=1000 saturated its
    # sigmoid (every image's implicit reward far below the reference point) and stopped learning.
    dpo: StageConfig = StageConfig(
        steps=200, optimizer=OptimizerConfig(learning_rate=2e-4, warmup_steps=10), hparams={"beta": 1000.0}
    )
    kto: StageConfig = StageConfig(
        steps=200, optimizer=OptimizerConfig(learning_rate=5e-5, warmup_steps=10), hparams={"beta": 500.0}
    )
    flow_dpo: StageConfig = StageConfig(
        steps=200, optimizer=OptimizerConfig(learning_rate=2e-4, warmup_steps=10), hparams={"beta": 1000.0}
    )
    draft: StageConfig = StageConfig(
        steps=60,
        batch_size=16,
        optimizer=OptimizerConfig(learning_rate=1e-4, warmup_steps=10),
        hparams={"grad_steps": 2},
    )

    @property
    def run_dir(self) -> pathlib.Path:
        return pathlib.Path(self.runs_dir) / self.name

    def stage(self, method: str) -> StageConfig:
        return getattr(self, method.replace("-", "_"))

    def prediction(self, generator: str) -> str:
        return self.ddpm_prediction if generator == "ddpm" else "velocity"

    def sampler(self, generator: str) -> SamplerConfig:
        return SamplerConfig(method="ddim" if generator == "ddpm" else "euler", num_steps=self.sampler_steps)


def pretrain(
    config: DiffusionExperimentConfig, generator: str, data: dict[str, np.ndarray], mesh
) -> tuple[Denoiser, DiffusionStep, nnx.State]:
    """A fresh ``"ddpm"`` or ``"flow"`` denoiser, its pretraining step and its trained params."""
    model_config = DenoiserConfig(
        base_channels=config.base_channels,
        channel_mults=config.channel_mults,
        vocab_size=VOCAB_SIZE,
        prediction=config.prediction(generator),
    )
    model = Denoiser(model_config, rngs=nnx.Rngs(config.seed))
    step = build_diffusion_step(
        model, Denoising(), make_optimizer(config.pretrain.optimizer, config.pretrain.steps), mesh
    )
    return model, step, run_stage(config, f"pretrain_{generator}", step, None, data, config.pretrain)


def run_stage(
    config: DiffusionExperimentConfig,
    name: str,
    step: DiffusionStep,
    params: nnx.State | None,
    data: dict[str, np.ndarray],
    stage: StageConfig,
) -> nnx.State:
    """Trains ``step`` from ``params`` on batches of ``data`` (resuming ``<run_dir>/<name>``); the final params."""
    stage_dir = config.run_dir / name
    manager = make_checkpoint_manager(
        stage_dir / "checkpoints", max_to_keep=1, save_interval_steps=stage.steps
    )
    batches = ArrayBatches(data, stage.batch_size, seed=config.seed)
    with MetricsWriter(stage_dir / "metrics", plot_keys=("loss", "rewards/margins", "reward")) as writer:
        state = train(
            step.init(params, seed=config.seed),
            step,
            batches,
            num_steps=stage.steps,
            checkpoint_manager=manager,
            metrics_writer=writer,
            progress=False,
        )
    manager.close()
    return state.params


def sample_images(
    step: DiffusionStep, params: nnx.State, prompts: np.ndarray, key: jax.Array, sampler: SamplerConfig
) -> np.ndarray:  # [N, 2] ids -> [N, 16, 16, 3] in [0, 1]
    """Samples in chunks of ``SAMPLE_CHUNK`` (the last one padded), each chunk from its own key."""
    chunks = []
    for index, start in enumerate(range(0, len(prompts), SAMPLE_CHUNK)):
        chunk = prompts[start : start + SAMPLE_CHUNK]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], SAMPLE_CHUNK - len(chunk), axis=0)])
        images = step.sample(params, padded, jax.random.fold_in(key, index), sampler)
        chunks.append(np.asarray(images)[: len(chunk)])
    return to_pixel_space(np.concatenate(chunks))


def preference_data(
    step: DiffusionStep, params: nnx.State, config: DiffusionExperimentConfig, sampler: SamplerConfig
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float]]:
    """(pairs, KTO examples, statistics) from ``samples_per_pair_prompt`` samples of each prompt.

    A pair is a prompt's best and worst sample by the hidden reward (prompts whose samples all tie
    are skipped); a KTO example is every sample, desirable when its reward is above the median.
    """
    rng = np.random.default_rng(config.seed + 1)
    pool = encode_prompts(train_prompts())
    prompts = pool[rng.integers(0, len(pool), config.pair_prompts)]  # [P, 2]
    per_prompt = config.samples_per_pair_prompt
    repeated = np.repeat(prompts, per_prompt, axis=0)  # [P * n, 2], each prompt's samples contiguous
    images = sample_images(step, params, repeated, jax.random.key(config.seed + 1), sampler)
    rewards = hidden_reward(images, repeated, config.task)
    grouped = rewards.reshape(-1, per_prompt)  # [P, n]
    offsets = np.arange(len(prompts)) * per_prompt
    best, worst = offsets + grouped.argmax(axis=1), offsets + grouped.argmin(axis=1)
    kept = grouped.max(axis=1) > grouped.min(axis=1)
    pairs = {
        "chosen_images": to_model_space(images[best[kept]]),
        "rejected_images": to_model_space(images[worst[kept]]),
        "prompt_ids": prompts[kept],
    }
    unpaired = {
        "images": to_model_space(images),
        "prompt_ids": repeated,
        "labels": rewards > np.median(rewards),
    }
    margins = grouped.max(axis=1) - grouped.min(axis=1)
    stats = {
        "pairs": int(kept.sum()),
        "ties": int((~kept).sum()),
        "sample_reward": float(rewards.mean()),
        "pair_margin": float(margins[kept].mean()),
    }
    return pairs, unpaired, stats


def evaluate(
    step: DiffusionStep, params: nnx.State, config: DiffusionExperimentConfig, sampler: SamplerConfig
) -> tuple[dict[str, float], np.ndarray]:
    """Held-out metrics and the samples ``[prompts, samples, 16, 16, 3]`` (same noise for every model)."""
    per_prompt = config.eval_samples_per_prompt
    prompts = np.repeat(encode_prompts(HELD_OUT_PROMPTS), per_prompt, axis=0)
    images = sample_images(step, params, prompts, jax.random.key(config.seed + 2), sampler)
    components = reward_components(images, prompts, config.task)
    metrics = {name: float(np.mean(components[name])) for name in REWARD_COMPONENTS}
    # The hidden reward of an image is the mean of its components, so its mean is theirs.
    metrics["hidden_reward"] = float(np.mean(list(metrics.values())))
    grouped = images.reshape(len(HELD_OUT_PROMPTS), per_prompt, *images.shape[1:])
    metrics["diversity"] = float(np.mean([mean_pairwise_distance(group) for group in grouped]))
    return metrics, grouped


def build_method(method: str, config: DiffusionExperimentConfig) -> DiffusionMethod:
    """The method's training-step object, with its stage's hyperparameters."""
    hparams = dict(config.stage(method).hparams)
    if method == "draft":
        reward_fn = functools.partial(
            surrogate_reward, task=config.task, temperature=config.reward_temperature
        )
        return RewardBackprop(reward_fn, sampler=config.sampler(METHODS[method][0]), **hparams)
    return METHODS[method][1](**hparams)


def run_diffusion(config: DiffusionExperimentConfig) -> dict[str, dict[str, float]]:
    """Pretraining, preference data, the fine-tunings of ``config.methods``, the held-out evaluation.

    Returns (and writes to ``results.json``) each model's held-out metrics (``"pretrained ddpm"``,
    ``"pretrained flow"`` and the methods'), with the ``seconds`` each took to train and
    evaluate; a pretrained model's entry also holds its preference data's statistics (``pairs``,
    ``ties``, ``sample_reward``, ``pair_seconds``).
    """
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown or not config.methods:
        raise ValueError(f"`methods` {list(config.methods)} must be a non-empty subset of {list(METHODS)}.")
    started, cpu_started = time.perf_counter(), time.process_time()
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    mesh = build_mesh(config.mesh)
    images = config.task.dataset(all_prompts(), config.train_images, seed=config.seed)
    results: dict[str, dict[str, float]] = {}
    grids: dict[str, np.ndarray] = {}
    for generator in dict.fromkeys(METHODS[m][0] for m in config.methods):
        start = time.perf_counter()
        model, step, params = pretrain(config, generator, images, mesh)
        sampler = config.sampler(generator)
        base = f"pretrained {generator}"
        results[base], grids[base] = evaluate(step, params, config, sampler)
        results[base]["seconds"] = time.perf_counter() - start
        methods = [m for m in config.methods if METHODS[m][0] == generator]
        if any(m != "draft" for m in methods):
            start = time.perf_counter()
            pairs, unpaired, stats = preference_data(step, params, config, sampler)
            results[base].update(stats, pair_seconds=time.perf_counter() - start)
        for method in methods:
            start = time.perf_counter()
            stage = config.stage(method)
            optimizer = make_optimizer(stage.optimizer, stage.steps)
            tuned_step = build_diffusion_step(model, build_method(method, config), optimizer, mesh)
            if method == "draft":  # prompts only: the images are sampled inside the step
                data = {"prompt_ids": np.tile(encode_prompts(train_prompts()), (stage.batch_size, 1))}
            else:
                data = unpaired if method == "kto" else pairs
            tuned = run_stage(config, method.replace("-", "_"), tuned_step, params, data, stage)
            results[method], grids[method] = evaluate(tuned_step, tuned, config, sampler)
            results[method]["seconds"] = time.perf_counter() - start
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    save_grid(grids, config.grid_samples_per_prompt, run_dir / "samples.png")
    print(markdown_table(results))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"\nsamples: {run_dir / 'samples.png'}; {wall:.0f} s wall, {cpu:.0f} s CPU in all")
    return results


def save_grid(grids: dict[str, np.ndarray], per_prompt: int, path: pathlib.Path) -> pathlib.Path:
    """One row per model, ``per_prompt`` samples of each held-out prompt side by side."""
    names = list(grids)
    figure = Figure(figsize=(0.6 * per_prompt * len(HELD_OUT_PROMPTS) + 1.6, 0.7 * len(names) + 0.4))
    axes = figure.subplots(len(names), per_prompt * len(HELD_OUT_PROMPTS), squeeze=False)
    for row, name in enumerate(names):
        for prompt_index, prompt in enumerate(encode_prompts(HELD_OUT_PROMPTS)):
            for sample in range(per_prompt):
                ax = axes[row, prompt_index * per_prompt + sample]
                ax.imshow(grids[name][prompt_index, sample], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0 and sample == 0:
                    ax.set_title(decode_prompt(prompt), fontsize=7, loc="left")
        axes[row, 0].set_ylabel(
            name.replace("pretrained ", "pretrained\n"), fontsize=7, rotation=0, ha="right"
        )
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    columns = ("hidden_reward", *REWARD_COMPONENTS, "diversity", "seconds")
    lines = [
        "| model | " + " | ".join(c.replace("_", " ") for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, metrics in results.items():
        cells = [f"{metrics[c]:.0f}" if c == "seconds" else f"{metrics[c]:.3f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
