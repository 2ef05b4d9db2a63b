"""``jaxpref <subcommand>``: builds a config from defaults and ``--set`` overrides, runs an experiment.

::

    jaxpref demo                                   # the bundled pipeline: SFT -> pairs -> DPO -> eval
    jaxpref sft --data sft.jsonl --model /models/Qwen3-0.6B
    jaxpref dpo --data prefs.jsonl --model runs/sft/hf --objective ipo --set objective.beta=0.5
    jaxpref dpo --data prefs.jsonl --model runs/sft/hf --objective "sigmoid + 0.2*sft"   # RPO: DPO + NLL
    jaxpref dpo --data prefs.jsonl --model runs/sft/hf --set lora.rank=16 --set lora.targets='q_proj|v_proj'
    jaxpref kto --data unpaired.jsonl --model runs/sft/hf
    jaxpref listwise --data ranked.jsonl --model runs/sft/hf --objective lipo_lambda   # K responses, scores
    jaxpref tdpo --data prefs.jsonl --model runs/sft/hf --objective tdpo2             # token-level KL
    jaxpref reward --data prefs.jsonl --model /models/Qwen3-0.6B
    jaxpref reward --data prefs.jsonl --objective gpm --eval bench.jsonl   # General Preference Model
    jaxpref reward-eval --model runs/reward/hf --data bench.jsonl         # RewardBench-style evaluation
    jaxpref grpo --data prompts.jsonl --model runs/sft/hf --set rollout.reward_funcs='["my.rewards:exact"]'
    jaxpref rloo --data prompts.jsonl --model runs/sft/hf --set rollout.reward_model=runs/reward/hf
    jaxpref online-dpo --data prompts.jsonl --model runs/sft/hf       # 2 samples, the better one chosen
    jaxpref ppo --data prompts.jsonl --model runs/sft/hf              # value head, GAE, clipped losses
    jaxpref diffusion                              # image denoisers on the bundled shapes task: every method
    jaxpref diffusion-dpo --set dpo.steps=400      # one method (diffusion-kto, flow-dpo, draft alike)

Every run writes ``runs/<name>/`` (``<name>`` defaults to the subcommand): the resolved
``config.json``, the prepared data and its bad-row report, orbax checkpoints, metrics (JSONL,
TensorBoard, ``curves.png``) and the trained weights in Hugging Face layout under ``hf/``. Rerunning
the same command resumes; a folder holding a different run, or in use by a live run, is refused
before anything is built (:mod:`jaxpref.recipes.run_folder`; ``--overwrite`` starts it afresh).
Settings come from the subcommand's defaults, then ``--config run.yaml`` (YAML or JSON, the keys of
``--set`` nested), then the flags and ``--set``; ``--print-config`` shows the result. Multi-host (TPU
pod slices, multi-node GPU): run the same command on every host with ``--distributed``. The configs
and runners are :mod:`jaxpref.recipes`; a mistake a user can make (a bad setting, a missing file, a
folder of another run) is one line ``jaxpref <cmd>: error: ...`` and exit status 2 (``--debug``: the
traceback). Libraries' INFO logs are off unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

_TRAINING = ("sft", "dpo", "kto", "listwise", "tdpo", "reward")
# Image generators on the shapes task (jaxpref/recipes/diffusion.py): subcommand -> its method there.
_DIFFUSION = {"diffusion-dpo": "dpo", "diffusion-kto": "kto", "flow-dpo": "flow-dpo", "draft": "draft"}
# The --objective subcommands -> the train-step family whose objectives they train.
_OBJECTIVE_FAMILIES = {
    "dpo": "pairwise", "kto": "unpaired", "listwise": "listwise", "tdpo": "token_level", "reward": "reward",
}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    from jaxpref.overrides import add_override_argument
    from jaxpref.recipes.configs import ONLINE_SUBCOMMAND_CONFIGS
    from jaxpref.recipes.objectives import GPM, family_objectives

    parser = argparse.ArgumentParser(prog="jaxpref", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        help="a YAML or JSON file of settings, the keys of --set nested (e.g. train: {steps: 100}); "
        "the flags and --set override it",
    )
    add_override_argument(common)
    common.add_argument(
        "--print-config", action="store_true", help="print the resolved config (JSON) and exit"
    )
    common.add_argument(
        "--dry-run",
        action="store_true",
        help="print the mesh, which devices each host holds, the per-host and global batch, and exit "
        "before building or compiling anything",
    )
    common.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run folder runs/<name> and start afresh (by default a rerun resumes it, and a "
        "different run there is refused)",
    )
    common.add_argument(
        "--verbose", action="store_true", help="show the libraries' INFO logs (orbax, absl, TFDS, jax)"
    )
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host TPU pods, multi-node GPU)",
    )
    commands.add_parser("demo", parents=[common], help="the bundled end-to-end pipeline (make demo)")
    launch = commands.add_parser(
        "launch",
        help="run a subcommand as several local JAX processes (a multi-host run on one machine)",
        description="jaxpref launch --processes 2 -- dpo --data prefs.jsonl: each process runs the "
        "subcommand with --distributed on CPU devices, exchanging data through gloo.",
    )
    launch.add_argument("--processes", type=int, default=2, help="JAX processes (default 2)")
    launch.add_argument("--devices-per-process", type=int, default=2, help="CPU devices each (default 2)")
    launch.add_argument("command_line", nargs=argparse.REMAINDER, help="-- then the subcommand and its options")
    objectives = {command: list(family_objectives(family)) for command, family in _OBJECTIVE_FAMILIES.items()}
    objectives["reward"].append(GPM)  # gpm_loss on preference embeddings (jaxpref/recipes/reward.py), alone
    for name in (*_TRAINING, *ONLINE_SUBCOMMAND_CONFIGS):
        sub = commands.add_parser(name, parents=[common], help=f"train with {name}")
        sub.add_argument("--data", nargs="+", help="local JSONL or Parquet files (data.train_files)")
        sub.add_argument("--model", help="local Hugging Face checkpoint folder (model.checkpoint)")
        sub.add_argument("--name", help="run name: the run is written to runs/<name> (name)")
        sub.add_argument("--steps", type=int, help="training steps (train.steps)")
        if name in objectives:
            sub.add_argument(
                "--objective",
                metavar="OBJECTIVE",
                help=f"one of {', '.join(objectives[name])}, or a weighted sum of them written "
                "'NAME + WEIGHT*NAME ...', e.g. dpo's 'sigmoid + 0.2*sft' (objective.name)",
            )
    commands.choices["reward"].add_argument(
        "--eval",
        nargs="+",
        help="RewardBench-layout files to evaluate the trained model on (reward.eval_files)",
    )
    evaluate = commands.add_parser(
        "reward-eval", parents=[common], help="evaluate a reward model on RewardBench-layout files"
    )
    evaluate.add_argument("--model", required=True, help="the reward model's folder, e.g. runs/reward/hf")
    evaluate.add_argument(
        "--data",
        nargs="+",
        help="JSONL or Parquet files: prompt, chosen, rejected, subset (reward.eval_files)",
    )
    evaluate.add_argument("--name", help="results go to runs/<name> (name)")
    diffusion = commands.add_parser(
        "diffusion", parents=[common], help="pretrain image denoisers, then fine-tune them on preferences"
    )
    diffusion.add_argument(
        "--method", nargs="+", help="fine-tunings to run: dpo, kto, flow-dpo, draft (methods; default all)"
    )
    for name, method in _DIFFUSION.items():
        sub = commands.add_parser(
            name, parents=[common], help=f"`jaxpref diffusion --method {method}`: its generator, then {name}"
        )
        sub.set_defaults(method=[method])
    for name in ("diffusion", *_DIFFUSION):
        commands.choices[name].add_argument(
            "--name", help="run folder runs/<name> (name); stages already trained there are resumed"
        )
    return parser


def _shortcuts(args: argparse.Namespace) -> list[str]:
    """The convenience flags as ``--set`` assignments (explicit ``--set`` ones come after and win)."""
    # `reward-eval --data` names the files to evaluate on; `reward --eval` adds them to a training run.
    eval_files = args.data if args.command == "reward-eval" else getattr(args, "eval", None)
    train_files = None if args.command == "reward-eval" else getattr(args, "data", None)
    pairs = {
        "data.train_files": json.dumps(train_files) if train_files else None,
        "reward.eval_files": json.dumps(eval_files) if eval_files else None,
        "model.checkpoint": getattr(args, "model", None),
        "name": getattr(args, "name", None),
        "train.steps": getattr(args, "steps", None),
        "objective.name": getattr(args, "objective", None),
    }
    return [f"{key}={value}" for key, value in pairs.items() if value is not None]


def _no_check(config: Any) -> None:
    """For configs whose runners check what they use as they start."""


@dataclasses.dataclass(frozen=True)
class _Command:
    start: Any  # the subcommand's starting config
    overrides: list[str]  # its flags as --set assignments, then the --set ones
    check: Callable[[Any], object]  # checks the parsed config, building nothing (ValueError)
    run: Callable[[Any], object]  # its runner (jaxpref.recipes)
    trains: bool = True  # one training run: its folder's identity is checked (run_folder)


def _command(args: argparse.Namespace) -> _Command:
    from jaxpref.recipes import configs
    from jaxpref.recipes.offline import run_objective

    if args.command == "demo":
        from jaxpref.recipes.demo import run_demo

        return _Command(
            configs.DemoConfig(), args.overrides, lambda c: run_objective(c.dpo), run_demo, trains=False
        )
    if args.command == "diffusion" or args.command in _DIFFUSION:
        from jaxpref.recipes.diffusion import DiffusionExperimentConfig, run_diffusion

        shortcuts = [f"methods={json.dumps(args.method)}"] if args.method else []
        shortcuts += [f"name={args.name}"] if args.name else []
        return _Command(
            DiffusionExperimentConfig(), [*shortcuts, *args.overrides], _no_check, run_diffusion, trains=False
        )
    overrides = [*_shortcuts(args), *args.overrides]
    if args.command in configs.ONLINE_SUBCOMMAND_CONFIGS:
        from jaxpref.recipes.online import build_algorithm, run_online_command

        return _Command(
            configs.ONLINE_SUBCOMMAND_CONFIGS[args.command], overrides, build_algorithm, run_online_command
        )
    start = configs.SUBCOMMAND_CONFIGS[args.command]
    if args.command == "reward":
        from jaxpref.recipes.reward import reward_objective, run_reward

        return _Command(start, overrides, reward_objective, run_reward)
    if args.command == "reward-eval":
        from jaxpref.recipes.reward_eval import run_reward_eval

        return _Command(start, overrides, _no_check, run_reward_eval, trains=False)
    from jaxpref.recipes.offline import run_offline

    return _Command(start, overrides, run_objective, run_offline)


# Libraries that log progress at INFO (orbax, through absl, every save and restore; TFDS every preparation).
_CHATTY_LOGGERS = ("absl", "orbax", "tensorflow_datasets", "jax", "grain")


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (tests and notebooks replace it)."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


class _NoTFDSWarnings(logging.Filter):
    """TFDS warns through absl about what local-file datasets always are (a custom builder
    config, no ``dataset_info.json`` yet); its errors still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "tensorflow_datasets" not in record.pathname


def _configure_logging(verbose: bool) -> None:
    """jaxpref's own INFO messages and every library's warnings; everything with ``verbose``."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not verbose:
        handler.addFilter(_NoTFDSWarnings())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("jaxpref").setLevel(logging.INFO)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    # Orbax's background threads log a failed save's tracebacks at ERROR through absl; the run
    # itself stops with one line naming the cause.
    logging.getLogger("absl").setLevel(logging.NOTSET if verbose else logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "launch":
        from jaxpref.launch import launch

        command_line = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
        try:
            return launch(command_line, args.processes, args.devices_per_process)
        except ValueError as error:
            parser.exit(2, f"jaxpref launch: error: {error}\n")
    _configure_logging(args.verbose)
    from jaxpref.recipes.run_folder import RunFolderError
    from jaxpref.train.loop import NonFiniteLossError, TrainingInterrupted

    def one_line(error: BaseException) -> str:
        return " ".join(str(error).split()) or type(error).__name__

    try:
        return _main(args)
    # What a user can cause and fix from the message (a setting, a file, a folder, a full disk).
    except (ValueError, OSError, RunFolderError, NonFiniteLossError) as error:
        if args.debug:
            raise
        parser.exit(2, f"jaxpref {args.command}: error: {one_line(error)}\n")
    except TrainingInterrupted as stop:  # SIGTERM / Ctrl-C: checkpointed at a step boundary
        parser.exit(
            stop.exit_code, f"jaxpref {args.command}: {one_line(stop)} Rerun the command to resume.\n"
        )
    except KeyboardInterrupt:
        if args.debug:
            raise
        parser.exit(130, f"jaxpref {args.command}: interrupted\n")


# Set by `jaxpref launch` (and settable by hand) where JAX cannot detect the cluster itself.
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _initialize_distributed() -> None:
    """``jax.distributed.initialize`` from DISTRIBUTED_ENV when all three are set, else from what JAX
    detects (TPU pod metadata, SLURM, ...). CPU processes exchange data through gloo."""
    import os

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if all(name in os.environ for name in DISTRIBUTED_ENV):
        address, count, index = (os.environ[name] for name in DISTRIBUTED_ENV)
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(count),
            process_id=int(index),
            initialization_timeout=120,
        )
    else:
        jax.distributed.initialize()


def _main(args: argparse.Namespace) -> int:
    if args.distributed:
        _initialize_distributed()
    from jaxpref.overrides import apply_overrides, apply_settings, load_settings, to_dict
    from jaxpref.recipes.run_folder import open_run_folder

    command = _command(args)
    config = command.start
    if args.config:
        config = apply_settings(config, load_settings(args.config))
    config = apply_overrides(config, command.overrides)
    command.check(config)  # a bad setting fails here, before any model is built or data prepared
    if args.print_config:
        print(json.dumps(to_dict(config), indent=2))
        return 0
    if args.dry_run:
        from jaxpref.recipes.common import describe_topology

        print(describe_topology(config))
        return 0
    lead = True
    if args.distributed:
        import jax

        lead = jax.process_index() == 0
    with open_run_folder(config, identity=command.trains, overwrite=args.overwrite, lead=lead) as folder:
        if folder.finished_step is not None:
            print(
                f"run {config.name} already finished at step {folder.finished_step}; nothing to do ({folder.path})"
            )
            return 0
        command.run(folder.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
