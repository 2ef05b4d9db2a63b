"""Run configs: plain frozen dataclasses, every default in one place.

Override any field from the command line with ``--set section.field=value`` (see
:mod:`jaxpref.overrides`); objective hyperparameters go straight under ``objective``
(``--set objective.beta=0.2``). The online algorithms' sections are the algorithms of
:mod:`jaxpref.train.online` themselves, so their defaults and checks live there.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

from jaxpref.models.logprobs import DEFAULT_CHUNK_SIZE
from jaxpref.objectives.common import check_range
from jaxpref.train.online import GRPO, PPO, OnlineDPO

# Package data: the character tokenizer of the bundled tasks and an example RewardBench-layout file.
ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
CHAR_TOKENIZER = str(ASSETS / "char_tokenizer")


# The checks below run as a config is built, so `--set train.steps=0` fails when it is parsed, before
# anything is built; the CLI prefixes the section ("`train.steps`=0 must be ...").
def check_integers(config, minimum: int, *names: str, optional: bool = False) -> None:
    """A ValueError naming the first of ``names`` that is not an integer >= ``minimum`` (or None,
    with ``optional``)."""
    for name in names:
        value = getattr(config, name)
        if optional and value is None:
            continue
        if type(value) is not int or value < minimum:
            raise ValueError(f"`{name}`={value!r} must be an integer >= {minimum}.")


def check_numbers(config, *names: str, positive: bool = True) -> None:
    """A ValueError naming the first of ``names`` that is not a finite number > 0 (>= 0 unless
    ``positive``)."""
    for name in names:
        value = getattr(config, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and (value > 0 if positive else value >= 0)):
            raise ValueError(f"`{name}`={value!r} must be a finite number {'> 0' if positive else '>= 0'}.")


def check_choice(config, name: str, choices) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(f"`{name}`={value!r} must be one of {list(choices)}.")


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

    def __post_init__(self):
        check_integers(self, 1, "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")
        check_integers(self, 0, "seed")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train_files: tuple[str, ...] = ()  # local JSONL or Parquet files
    layout: str = "pairwise"  # pairwise | unpaired | sft | ranked
    max_length: int = 1024
    max_prompt_length: int | None = None  # default max_length // 2
    batch_size: int = 32
    prefix_sharing: bool = True  # pairwise: prompt computed once per pair
    seed: int = 0

    def __post_init__(self):
        check_integers(self, 1, "max_length", "batch_size")
        check_integers(self, 1, "max_prompt_length", optional=True)
        check_integers(self, 0, "seed")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    __extra_field__ = "hparams"  # unknown `objective.<key>=...` overrides land in `hparams`

    # A registered name of the run's kind or a weighted sum of them, e.g. "sigmoid + 0.2*sft"
    # (jaxpref.objectives.parse_objective); each hyperparameter goes to the terms that accept it.
    name: str = "sigmoid"
    hparams: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self):
        check_numbers(self, "learning_rate", "max_grad_norm")
        check_numbers(self, "weight_decay", positive=False)
        check_integers(self, 0, "warmup_steps")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: the devices the other axes leave
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        if type(self.data) is not int or (self.data < 1 and self.data != -1):
            raise ValueError(f"`data`={self.data!r} must be -1 (the devices left) or an integer >= 1.")
        check_integers(self, 1, "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """What every training loop needs: length, learning-rate schedule, checkpoints, the non-finite
    stop, the dead-run warning, LM-head chunks."""

    steps: int = 200
    # Length of the learning-rate schedule (warm-up, then cosine decay; after it the rate stays at its
    # final 10%); None: `steps`. A resumed run with more `steps` keeps its first run's schedule.
    schedule_steps: int | None = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_consecutive_nonfinite: int = 10
    # Warn when this many steps in a row have a gradient norm of exactly 0 or an unchanged loss
    # (a dead run: a learning rate far too large, say); 0: never.
    dead_run_steps: int = 20
    chunk_size: int = DEFAULT_CHUNK_SIZE  # LM-head tokens per chunk
    progress: bool = True
    # Where metrics go besides metrics.jsonl and curves.png: "tensorboard", "wandb" (pip install
    # wandb; WANDB_MODE=offline needs no account), both comma-separated, or "none".
    report_to: str = "tensorboard"

    def __post_init__(self):
        targets = set(self.report_to.split(","))
        if not (targets <= {"tensorboard", "wandb"} or targets == {"none"}):
            raise ValueError(
                f"`train.report_to`={self.report_to!r} must be 'tensorboard', 'wandb', 'tensorboard,wandb' "
                "or 'none'."
            )
        check_integers(self, 1, "steps", "checkpoint_every", "keep_checkpoints", "max_consecutive_nonfinite")
        check_integers(self, 1, "chunk_size")
        check_integers(self, 1, "schedule_steps", optional=True)
        check_integers(self, 0, "dead_run_steps")
        if self.dead_run_steps == 1:
            raise ValueError("`dead_run_steps`=1 would flag every step; use 0 (no check) or >= 2.")

    @property
    def schedule_length(self) -> int:
        return self.steps if self.schedule_steps is None else self.schedule_steps


@dataclasses.dataclass(frozen=True)
class TrainConfig(LoopConfig):
    grad_accum_steps: int = 1
    reference: str = "frozen"  # frozen | cached | none
    # The kind of training (jaxpref.train.families: sft, pairwise, unpaired, reward, listwise,
    # token_level); "auto" is the data layout's own (ranked rows: listwise).
    family: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        check_integers(self, 1, "grad_accum_steps")
        check_choice(self, "reference", ("frozen", "cached", "none"))


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA / QLoRA adapters on the policy (jaxpref.models.lora.apply_lora): only they are trained, and
    the reference is the base model with them off (no copy). ``rank`` 0 trains every weight."""

    rank: int = 0  # 0: no adapters (full fine-tuning)
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input, in training steps (offline runs only)
    targets: str = r"(q|k|v|o|gate|up|down)_proj"  # regex searched in paths like layers/0/self_attn/q_proj
    quantize: str | None = None  # "int8": QLoRA, the decoder layers' linears stored int8
    adapter_dtype: str = "float32"
    merge: bool = True  # also write the merged weights to hf/ (the adapters always go to adapter/)

    def __post_init__(self):
        check_integers(self, 0, "rank")
        check_numbers(self, "alpha")
        check_numbers(self, "dropout", positive=False)
        check_range("dropout", self.dropout, 0.0, 1.0, high_inclusive=False)


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
    lora: LoRAConfig = LoRAConfig()

    @property
    def run_dir(self) -> pathlib.Path:
        return pathlib.Path(self.runs_dir) / self.name


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """What a reward model has beyond its backbone, and how it is evaluated."""

    # Scalar heads on one backbone, each trained on every pair by the objective (an ensemble of
    # linear heads); evaluation aggregates their rewards with `ensemble_method`.
    ensemble_size: int = 1
    ensemble_method: str = "mean"  # mean | min | uwo (jaxpref.objectives.reward.ensemble_rewards)
    uncertainty_coefficient: float = 1.0  # uwo: mean minus this times the members' variance
    embedding_dim: int = 8  # objective "gpm": preference embeddings of 2k dimensions
    learn_scales: bool = True  # objective "gpm": prompt-dependent block scales
    # Multi-objective heads: one scalar head per attribute, trained by Bradley-Terry on their weighted
    # sum (plus a rating regression where rows carry chosen_ratings / rejected_ratings); pairs are
    # scored by the weighted sum. One weight per head; () = not multi-objective.
    objective_weights: tuple[float, ...] = ()
    objective_names: tuple[str, ...] = ()  # the heads' attribute names; () = objective_0, objective_1, ...
    # RewardBench-layout files ({prompt, chosen, rejected, subset}) to evaluate on: after training
    # (`jaxpref reward --eval`), or the files of `jaxpref reward-eval`.
    eval_files: tuple[str, ...] = ()

    def __post_init__(self):
        check_integers(self, 1, "ensemble_size", "embedding_dim")
        check_numbers(self, "uncertainty_coefficient", positive=False)


@dataclasses.dataclass(frozen=True)
class RewardRunConfig(RunConfig):
    """``jaxpref reward`` (a training run) and ``jaxpref reward-eval`` (model, data sizes and
    ``reward`` only)."""

    reward: RewardConfig = RewardConfig()


# The starting configs of the CLI's subcommands (`jaxpref sft|dpo|kto|listwise|tdpo|reward|reward-eval`).
SUBCOMMAND_CONFIGS = {
    "sft": RunConfig(name="sft", data=DataConfig(layout="sft"), train=TrainConfig(reference="none")),
    "dpo": RunConfig(name="dpo"),
    "kto": RunConfig(name="kto", data=DataConfig(layout="unpaired"), objective=ObjectiveConfig("kto")),
    "listwise": RunConfig(
        name="listwise", data=DataConfig(layout="ranked"), objective=ObjectiveConfig("lipo_lambda")
    ),
    "tdpo": RunConfig(
        name="tdpo", objective=ObjectiveConfig("tdpo2"), train=TrainConfig(family="token_level")
    ),
    "reward": RewardRunConfig(
        name="reward", objective=ObjectiveConfig("bradley_terry"), train=TrainConfig(reference="none")
    ),
    "reward-eval": RewardRunConfig(name="reward_eval"),
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

    def __post_init__(self):
        check_integers(self, 1, "sft_examples", "pair_prompts", "eval_prompts", "samples_per_eval_prompt")

    @property
    def run_dir(self) -> pathlib.Path:
        return pathlib.Path(self.runs_dir) / self.name


@dataclasses.dataclass(frozen=True)
class PromptDataConfig:
    """Prompts of an online run (``jaxpref grpo|rloo|online-dpo|ppo``); completions are sampled."""

    # Local JSONL or Parquet files with a "prompt" string column; the other columns go to the reward
    # functions (an "answer" for a checker, say).
    train_files: tuple[str, ...] = ()
    batch_size: int = 16  # prompts per step, each sampled rollout.num_generations times
    max_prompt_length: int = 512  # longer prompts keep their last tokens
    bucket: int = 16  # padded prompt lengths are multiples of this: one compilation per bucket
    seed: int = 0

    def __post_init__(self):
        check_integers(self, 1, "batch_size", "max_prompt_length", "bucket")
        check_integers(self, 0, "seed")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling and scoring, shared by every online algorithm (jaxpref.train.online.build_online_step)."""

    num_generations: int = 8  # completions per prompt: 2 for online DPO, 1 is fine for PPO
    num_iterations: int = 1  # optimizer updates per generation batch
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    mask_truncated_completions: bool = False
    # Bundled names (jaxpref.train.rewards.BUNDLED) or "package.module:function".
    reward_funcs: tuple[str, ...] = ("sorting_exact",)
    # One per reward function, then the reward model, then the preference model; () = 1 each.
    reward_weights: tuple[float, ...] = ()
    # A RewardModel checkpoint folder (the policy's tokenizer), scored as "reward_model".
    reward_model: str | None = None
    # A reward model with several heads (an ensemble): mean | min | uwo of their rewards
    # (jaxpref.objectives.reward.ensemble_rewards); uwo subtracts this coefficient times their variance.
    reward_ensemble_method: str = "mean"
    reward_uncertainty_coefficient: float = 1.0
    # A pairwise judge's checkpoint folder (a General Preference Model or a scalar reward model, the
    # policy's tokenizer): each completion's win rate against the other completions of its prompt
    # (Pref-GRPO, jaxpref.train.preference_rewards), scored as "preference_win_rate".
    preference_model: str | None = None

    def __post_init__(self):
        check_integers(self, 1, "num_generations", "num_iterations", "max_new_tokens")
        check_integers(self, 0, "top_k")
        check_numbers(self, "temperature", positive=False)
        check_numbers(self, "top_p")
        check_range("top_p", self.top_p, 0.0, 1.0)
        check_numbers(self, "reward_uncertainty_coefficient", positive=False)


# The algorithms are the config sections (subclassed where free-form overrides need a home), so
# `--set grpo.beta=0.04` is checked as GRPO checks it, when the config is parsed.
@dataclasses.dataclass(frozen=True)
class GRPOConfig(GRPO):
    __extra_field__ = "loss_hparams"  # unknown `grpo.<key>=...` overrides (epsilon_high=0.28, ...) land here


@dataclasses.dataclass(frozen=True)
class OnlineDPOConfig(OnlineDPO):
    __extra_field__ = "hparams"


@dataclasses.dataclass(frozen=True)
class OnlineTrainConfig(LoopConfig):
    """``steps`` counts generation batches."""


@dataclasses.dataclass(frozen=True)
class OnlineRunConfig:
    """One online run: ``jaxpref grpo|rloo|online-dpo|ppo --set ...`` builds one of these."""

    name: str = "grpo"
    runs_dir: str = "runs"
    algorithm: str = "grpo"  # grpo | online_dpo | ppo: which of the sections below is used
    model: ModelConfig = ModelConfig()
    data: PromptDataConfig = PromptDataConfig()
    rollout: RolloutConfig = RolloutConfig()
    grpo: GRPOConfig = GRPOConfig()
    online_dpo: OnlineDPOConfig = OnlineDPOConfig()
    ppo: PPO = PPO()
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-6)
    mesh: MeshConfig = MeshConfig()
    train: OnlineTrainConfig = OnlineTrainConfig()
    lora: LoRAConfig = LoRAConfig()

    @property
    def run_dir(self) -> pathlib.Path:
        return pathlib.Path(self.runs_dir) / self.name


# The starting configs of the CLI's online subcommands; rloo is GRPO with leave-one-out advantages.
ONLINE_SUBCOMMAND_CONFIGS = {
    "grpo": OnlineRunConfig(),
    "rloo": OnlineRunConfig(name="rloo", grpo=GRPOConfig(advantage="rloo")),
    "online-dpo": OnlineRunConfig(
        name="online_dpo", algorithm="online_dpo", rollout=RolloutConfig(num_generations=2)
    ),
    "ppo": OnlineRunConfig(
        name="ppo", algorithm="ppo", rollout=RolloutConfig(num_generations=1, num_iterations=4)
    ),
}
