"""Experiment configs: plain frozen dataclasses, every default in one place.

Override any field from the command line with ``--set section.field=value`` (see
:mod:`jaxpref.overrides`); objective hyperparameters go straight under ``objective``
(``--set objective.beta=0.2``).
"""

from __future__ import annotations

import dataclasses
import pathlib

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
CHAR_TOKENIZER = str(ASSETS / "char_tokenizer")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # A local Hugging Face folder (config.json + safetensors); None builds a fresh tiny Llama-style
    # decoder with the sizes below and the tokenizer's vocabulary.
    checkpoint: str | None = None
    # A local tokenizer folder; None: the checkpoint's folder, or the bundled character tokenizer.
    tokenizer: str | None = None
    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    dtype: str = "float32"  # parameter dtype; "bfloat16" on GPU/TPU
    compute_dtype: str | None = None  # defaults to dtype
    remat: bool = False
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train_files: tuple[str, ...] = ()  # local JSONL or Parquet files
    layout: str = "pairwise"  # pairwise | unpaired | sft | ranked
    max_length: int = 1024
    max_prompt_length: int | None = None  # default max_length // 2
    batch_size: int = 32
    prefix_sharing: bool = True  # pairwise: prompt computed once per pair
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    __extra_field__ = "hparams"  # unknown `objective.<key>=...` overrides land in `hparams`

    name: str = "sigmoid"
    hparams: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: the devices the other axes leave
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    grad_accum_steps: int = 1
    reference: str = "frozen"  # frozen | cached | none
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_consecutive_nonfinite: int = 10
    chunk_size: int = 1024  # LM-head tokens per chunk
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run: ``jaxpref sft|dpo|kto --set ...`` builds one of these."""

    name: str = "run"
    runs_dir: str = "runs"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()

    @property
    def run_dir(self) -> pathlib.Path:
        return pathlib.Path(self.runs_dir) / self.name


# The starting configs of the CLI's training subcommands (`jaxpref sft|dpo|kto|reward`).
SUBCOMMAND_CONFIGS = {
    "sft": RunConfig(name="sft", data=DataConfig(layout="sft"), train=TrainConfig(reference="none")),
    "dpo": RunConfig(name="dpo"),
    "kto": RunConfig(name="kto", data=DataConfig(layout="unpaired"), objective=ObjectiveConfig("kto")),
    "reward": RunConfig(
        name="reward", objective=ObjectiveConfig("bradley_terry"), train=TrainConfig(reference="none")
    ),
}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The default pipeline (``make demo``) on the bundled sorting task."""

    name: str = "demo"
    runs_dir: str = "runs"
    seed: int = 0
    sft_examples: int = 3000
    pair_prompts: int = 4096  # prompts sampled twice by the SFT policy and labelled by the hidden reward
    eval_prompts: int = 512
    samples_per_eval_prompt: int = 4
    model: ModelConfig = ModelConfig()
    sft: RunConfig = RunConfig(
        name="sft",
        data=DataConfig(layout="sft", max_length=32, batch_size=64),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=20),
        train=TrainConfig(steps=300, reference="none", checkpoint_every=300),
    )
    dpo: RunConfig = RunConfig(
        name="dpo",
        data=DataConfig(layout="pairwise", max_length=32, batch_size=64),
        # A large beta keeps the policy near the SFT reference: with a tiny model and a few thousand
        # pairs, beta=0.1 lowers the chosen responses' likelihood along with the rejected ones.
        objective=ObjectiveConfig("sigmoid", {"beta": 1.0}),
        optimizer=OptimizerConfig(learning_rate=3e-4, warmup_steps=10),
        train=TrainConfig(steps=300, reference="cached", checkpoint_every=300),
    )
