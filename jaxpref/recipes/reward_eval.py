"""RewardBench-style evaluation of a reward model on local files.

Files are JSONL or Parquet in RewardBench's layout: ``prompt``, ``chosen``, ``rejected`` (strings or
chat messages, as for training) and ``subset`` (``alpacaeval-easy``, ``mt-bench-hard``, ...; rows
without one count as subset ``"unlabelled"``). Rows are tokenised as training rows are
(:mod:`jaxpref.data.tokenize`; unusable ones are skipped and counted by reason), and each distinct
prompt + response is scored once (:mod:`jaxpref.inference.reward`). A pair's preference score
:math:`s` is the chosen response's reward minus the rejected one's (an ensemble's rewards
aggregated first, :func:`~jaxpref.objectives.reward.ensemble_rewards`; multi-objective heads'
combined by their weights, :func:`~jaxpref.objectives.reward.multi_objective_rewards`), or the
General Preference Model score :math:`s(y_w \\succ y_l)`.

The run folder gets ``reward_eval.json`` and the bar chart ``reward_eval.png``:

- ``subsets``: per subset, its section, its pairs and its accuracy (share with :math:`s > 0`).
- ``sections``: RewardBench's grouping (:data:`SECTIONS`: chat, chat-hard, safety, reasoning);
  other subsets go to ``"other"``. A section's accuracy is RewardBench's: its subsets' accuracies
  weighted by their sizes in RewardBench (:data:`EXAMPLE_COUNTS`, with math-prm upweighted to
  balance the code subsets), so a local copy of RewardBench gives its section scores; ``"other"``
  weighs its subsets by their pairs here. ``score`` is the mean over the RewardBench sections
  present (RewardBench's headline number when all four are), ``accuracy`` the share over all pairs.
- ``calibration``: expected calibration error (10 bins) of the model's preference probability
  :math:`p = P(y_w \\succ y_l)`, the link of its objective at :math:`s / T` (logistic for
  Bradley-Terry and GPM, probit for Thurstone), top-label as in Guo et al. (arXiv:1706.04599):
  confidence :math:`\\max(p, 1 - p)` against whether the more probable response was the chosen one.
- ``cyclic_triples``: triples of responses to one prompt whose pairs in the file form a cycle
  :math:`a \\succ b \\succ c \\succ a`; the share of their pairs ranked right (at most 2/3 for any
  scalar reward) and of triples with all three right (0 for any scalar reward, up to 1 for a
  General Preference Model).

From the command line: ``jaxpref reward-eval --model runs/reward/hf --data bench.jsonl``, or
``jaxpref reward --data prefs.jsonl --eval bench.jsonl`` to evaluate right after training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from jaxpref.data.report import BadRow, PreparationReport
from jaxpref.data.rows import parse_row, read_records
from jaxpref.data.tokenize import TokenizeOptions, tokenize_rows
from jaxpref.inference.reward import load_reward_model, preference_embeddings, score_responses
from jaxpref.metrics import expected_calibration_error
from jaxpref.models import PreferenceEmbeddingModel, RewardModel
from jaxpref.objectives.reward import ensemble_rewards, gpm_preference_score, multi_objective_rewards
from jaxpref.recipes.common import build_tokenizer
from jaxpref.recipes.configs import RewardConfig, RewardRunConfig

OTHER = "other"
UNLABELLED = "unlabelled"
RESULTS_FILE, PLOT_FILE = "reward_eval.json", "reward_eval.png"
# The preference probability P(y_w > y_l) = link(s / temperature) of a model, stored by reward runs
# in their hf/config.json (see jaxpref.recipes.reward.preference_link).
LINK_KEY, TEMPERATURE_KEY = "preference_link", "preference_temperature"
# Multi-objective heads' weights, also stored there (with the heads' names as `id2label`).
OBJECTIVE_WEIGHTS_KEY = "reward_objective_weights"
LINKS = ("logistic", "probit")
CALIBRATION_BINS = 10
# RewardBench's sections and their subsets (allenai/reward-bench, rewardbench/constants.py).
SECTIONS = {
    "chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "chat-hard": (
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ),
    "safety": (
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ),
    "reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
# Subset weights within a section: RewardBench's subset sizes (math-prm: 447 pairs, counted as 984).
EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "xstest-should-refuse": 154,
    "xstest-should-respond": 250,
    "donotanswer": 136,
    "math-prm": 984,
    "hep-cpp": 164,
    "hep-go": 164,
    "hep-java": 164,
    "hep-js": 164,
    "hep-python": 164,
    "hep-rust": 164,
}
_SECTION_OF = {subset: section for section, subsets in SECTIONS.items() for subset in subsets}


def section_of(subset: str) -> str:
    """The RewardBench section of ``subset``, or ``"other"``."""
    return _SECTION_OF.get(subset, OTHER)


@dataclasses.dataclass(frozen=True)
class BenchPairs:
    """The usable rows of RewardBench-layout files, tokenised, in file order."""

    prompt_ids: list[np.ndarray]  # [pairs] of [prompt_len] int32
    chosen_ids: list[np.ndarray]  # [pairs] of [response_len] int32
    rejected_ids: list[np.ndarray]
    subsets: list[str]  # [pairs]
    report: PreparationReport


def read_bench(
    files: Sequence[str | os.PathLike], tokenizer, options: TokenizeOptions = TokenizeOptions()
) -> BenchPairs:
    """Parses and tokenises RewardBench-layout ``files``; unusable rows are counted in the report."""
    paths = [pathlib.Path(path) for path in files]
    if not paths:
        raise ValueError("`files` is empty; pass JSONL or Parquet files in RewardBench's layout.")
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise ValueError(f"`files` names {missing}, which are not files.")
    report = PreparationReport(layout="pairwise", files=tuple(map(str, paths)))
    subsets: dict[str, str] = {}  # row source ("file:line") -> subset

    def rows():
        for path in paths:
            for number, record in read_records(path):
                source = f"{path}:{number}"
                report.rows_read += 1
                try:
                    row = parse_row(record, "pairwise", source=source)
                except BadRow as bad:
                    report.skip(bad.reason, source, bad.detail)
                    continue
                subsets[source] = str(record.get("subset") or UNLABELLED)
                yield row

    tokenized = list(tokenize_rows(rows(), tokenizer, report, options))
    report.log()
    if not tokenized:
        raise ValueError(f"No usable rows in `files`; fix them (RewardBench layout).\n{report}")
    return BenchPairs(
        prompt_ids=[row.prompt_ids for row in tokenized],
        chosen_ids=[row.response_ids[0] for row in tokenized],
        rejected_ids=[row.response_ids[1] for row in tokenized],
        subsets=[subsets[row.source] for row in tokenized],
        report=report,
    )


def preference_scores(chosen: Any, rejected: Any, reward: RewardConfig = RewardConfig()) -> jax.Array:
    """Preference scores ``s`` ``[pairs]`` from a model's outputs for the chosen and the rejected
    responses: rewards ``[pairs]``, ``[pairs, heads]`` (multi-objective heads' combined with
    ``reward.objective_weights`` when set, else an ensemble's aggregated with
    ``reward.ensemble_method``), or General Preference Model ``(embeddings, scales)``."""
    if isinstance(chosen, tuple):  # (embeddings [pairs, 2k], scales [pairs, k])
        # Both responses answer one prompt, so they have the same scales: take the chosen's.
        return gpm_preference_score(chosen[0], rejected[0], eigenvalue_scales=chosen[1])
    if reward.objective_weights:
        weights = np.asarray(reward.objective_weights, np.float32)
        return multi_objective_rewards(chosen, weights) - multi_objective_rewards(rejected, weights)
    if chosen.ndim == 2:
        chosen, rejected = (
            ensemble_rewards(
                rewards.T,
                method=reward.ensemble_method,
                uncertainty_coefficient=reward.uncertainty_coefficient,
            )
            for rewards in (chosen, rejected)
        )
    return chosen - rejected


def bench_scores(
    model: RewardModel | PreferenceEmbeddingModel,
    pairs: BenchPairs,
    *,
    batch_size: int = 32,
    reward: RewardConfig = RewardConfig(),
) -> np.ndarray:  # [pairs]
    """Each pair's preference score (:func:`preference_scores`); every distinct prompt + response
    is scored once."""
    keys: dict[bytes, int] = {}  # prompt + response -> index among the distinct ones
    prompts, responses, chosen, rejected = [], [], [], []
    for prompt, *sides in zip(pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids):
        for side, indices in zip(sides, (chosen, rejected)):
            key = _response_key(prompt, side)
            if key not in keys:
                keys[key] = len(keys)
                prompts.append(prompt)
                responses.append(side)
            indices.append(keys[key])
    score = preference_embeddings if isinstance(model, PreferenceEmbeddingModel) else score_responses
    outputs = score(model, prompts, responses, batch_size=batch_size)
    chosen_outputs, rejected_outputs = (
        jax.tree.map(lambda x, i=np.array(i): x[i], outputs) for i in (chosen, rejected)
    )
    return np.asarray(preference_scores(chosen_outputs, rejected_outputs, reward))


def _response_key(prompt: np.ndarray, response: np.ndarray) -> bytes:
    return np.asarray(prompt, np.int64).tobytes() + b"|" + np.asarray(response, np.int64).tobytes()


def cyclic_triples(pairs: BenchPairs) -> list[tuple[int, int, int]]:
    """Row indices ``(i, j, k)`` of the pairs ``a > b``, ``b > c``, ``c > a`` of each preference
    cycle among three responses to one prompt, each cycle once."""
    beats: dict[tuple[bytes, bytes], int] = {}  # (winner, loser) -> row
    for row, (prompt, chosen, rejected) in enumerate(
        zip(pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids)
    ):
        beats[_response_key(prompt, chosen), _response_key(prompt, rejected)] = row
    losers: dict[bytes, list[bytes]] = {}
    for winner, loser in beats:
        losers.setdefault(winner, []).append(loser)
    triples = set()
    for (a, b), first in beats.items():
        for c in losers.get(b, ()):
            if (c, a) in beats:
                rows = (first, beats[b, c], beats[c, a])
                start = rows.index(min(rows))  # the same cycle from any of its pairs
                triples.add(rows[start:] + rows[:start])
    return sorted(triples)


def preference_probabilities(
    scores: np.ndarray, link: str = "logistic", temperature: float = 1.0
) -> np.ndarray:
    """``P(y_w > y_l) = link(s / temperature)`` per pair."""
    if link not in LINKS:
        raise ValueError(f"`link`={link!r} must be one of {LINKS}.")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be positive, got {temperature!r}.")
    z = np.asarray(scores, np.float64) / temperature
    return np.asarray(jax.nn.sigmoid(z) if link == "logistic" else jax.scipy.special.ndtr(z), np.float64)


def bench_results(
    scores: np.ndarray,  # [pairs]
    subsets: Sequence[str],  # [pairs]
    triples: Sequence[tuple[int, int, int]] = (),
    *,
    link: str = "logistic",
    temperature: float = 1.0,
) -> dict[str, Any]:
    """Accuracy per subset, per section and overall, calibration and cyclic-triple accuracy (see the
    module docstring) from each pair's preference score and subset."""
    scores = np.asarray(scores, np.float64)
    if scores.shape != (len(subsets),):
        raise ValueError(f"`scores` has shape {scores.shape} but there are {len(subsets)} `subsets`.")
    correct = scores > 0
    subset_array = np.asarray(subsets)
    per_subset = {}
    for subset in sorted(set(subsets)):
        rows = subset_array == subset
        per_subset[subset] = {
            "section": section_of(subset),
            "pairs": int(rows.sum()),
            "accuracy": float(correct[rows].mean()),
        }
    sections = {}
    for section in [*SECTIONS, OTHER]:
        members = {name: stats for name, stats in per_subset.items() if stats["section"] == section}
        if not members:
            continue
        weights = {name: EXAMPLE_COUNTS.get(name, stats["pairs"]) for name, stats in members.items()}
        accuracy = sum(weights[name] * stats["accuracy"] for name, stats in members.items())
        sections[section] = {
            "accuracy": accuracy / sum(weights.values()),
            "pairs": sum(stats["pairs"] for stats in members.values()),
            "subsets": sorted(members),
        }
    benchmark_sections = [sections[name]["accuracy"] for name in SECTIONS if name in sections]
    probabilities = preference_probabilities(scores, link, temperature)
    confidence = np.maximum(probabilities, 1.0 - probabilities)
    ece = expected_calibration_error(confidence, correct.astype(np.float64), num_bins=CALIBRATION_BINS)
    triple_rows = np.asarray(triples, np.int64).reshape(-1, 3)
    return {
        "pairs": len(scores),
        "accuracy": float(correct.mean()),
        "score": float(np.mean(benchmark_sections)) if benchmark_sections else None,
        "sections": sections,
        "subsets": per_subset,
        "calibration": {
            "ece": float(ece),
            "mean_confidence": float(confidence.mean()),
            "bins": CALIBRATION_BINS,
            "link": link,
            "temperature": float(temperature),
        },
        "cyclic_triples": {
            "triples": len(triple_rows),
            "pair_accuracy": float(correct[triple_rows].mean()) if len(triple_rows) else None,
            "triple_accuracy": float(correct[triple_rows].all(axis=1).mean()) if len(triple_rows) else None,
        },
    }


def plot_results(results: Mapping[str, Any], path: str | os.PathLike) -> pathlib.Path:
    """Bar charts of the accuracy per subset (coloured by section) and per section, chance dashed."""
    sections = list(results["sections"])
    colours = {section: f"C{i}" for i, section in enumerate([*SECTIONS, OTHER])}
    subsets = sorted(
        results["subsets"], key=lambda name: (sections.index(results["subsets"][name]["section"]), name)
    )
    summary = {name: results["sections"][name]["accuracy"] for name in sections}
    cyclic = results["cyclic_triples"]
    if cyclic["triples"]:
        summary |= {"cyclic pairs": cyclic["pair_accuracy"], "cyclic triples": cyclic["triple_accuracy"]}
    figure = Figure(figsize=(4 + 0.45 * (len(subsets) + len(summary)), 4.5), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=[max(len(subsets), 1), max(len(summary), 1)])
    left.bar(
        subsets,
        [results["subsets"][name]["accuracy"] for name in subsets],
        color=[colours[results["subsets"][name]["section"]] for name in subsets],
    )
    left.set_title("accuracy per subset (colour: section)")
    right.bar(list(summary), list(summary.values()), color=[colours.get(name, "C7") for name in summary])
    score = results["score"]
    right.set_title("per section" + ("" if score is None else f" (score {score:.3f})"))
    for axes in (left, right):
        axes.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        axes.set_ylim(0, 1)
        axes.tick_params(axis="x", labelrotation=60)
        axes.grid(axis="y", alpha=0.3)
    path = pathlib.Path(path)
    figure.savefig(path, dpi=100)
    return path


def evaluate_reward_model(
    model: RewardModel | PreferenceEmbeddingModel,
    tokenizer,
    config: RewardRunConfig,
    *,
    link: str = "logistic",
    temperature: float = 1.0,
) -> dict[str, Any]:
    """Evaluates ``model`` on ``config.reward.eval_files`` and writes ``reward_eval.json`` and
    ``reward_eval.png`` to ``config.run_dir``; returns the results (module docstring).

    Rows are tokenised with ``config.data.max_length`` / ``max_prompt_length`` and scored
    ``config.data.batch_size`` at a time; ``link`` and ``temperature`` give the preference
    probability for calibration (:func:`jaxpref.recipes.reward.preference_link`).
    """
    options = TokenizeOptions(
        max_length=config.data.max_length, max_prompt_length=config.data.max_prompt_length
    )
    pairs = read_bench(config.reward.eval_files, tokenizer, options)
    scores = bench_scores(model, pairs, batch_size=config.data.batch_size, reward=config.reward)
    results = {
        "files": list(config.reward.eval_files),
        **bench_results(scores, pairs.subsets, cyclic_triples(pairs), link=link, temperature=temperature),
        "report": pairs.report.to_dict(),
    }
    if jax.process_index() == 0:
        config.run_dir.mkdir(parents=True, exist_ok=True)
        (config.run_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        plot_results(results, config.run_dir / PLOT_FILE)
    print(summary_table(results))
    return results


def summary_table(results: Mapping[str, Any]) -> str:
    """A few lines: accuracy per section, score, calibration and cyclic triples."""
    lines = [f"reward eval on {results['pairs']} pairs: accuracy {results['accuracy']:.3f}"]
    for name, section in results["sections"].items():
        lines.append(f"  {name:<10} {section['accuracy']:.3f}  ({section['pairs']} pairs)")
    if results["score"] is not None:
        lines.append(f"  score      {results['score']:.3f}  (mean of the RewardBench sections present)")
    calibration = results["calibration"]
    lines.append(
        f"  ECE        {calibration['ece']:.3f}  (mean confidence {calibration['mean_confidence']:.3f})"
    )
    cyclic = results["cyclic_triples"]
    if cyclic["triples"]:
        lines.append(
            f"  cyclic triples: {cyclic['triples']}, pairs right {cyclic['pair_accuracy']:.3f}, "
            f"all three right {cyclic['triple_accuracy']:.3f}"
        )
    return "\n".join(lines)


def run_reward_eval(config: RewardRunConfig) -> dict[str, Any]:
    """``jaxpref reward-eval``: evaluates the reward model in ``config.model.checkpoint`` (a
    ``runs/<name>/hf`` folder or any ``*ForSequenceClassification`` checkpoint) on
    ``config.reward.eval_files``, writing to ``runs/<config.name>/``.

    The preference link is the one the reward run stored in the checkpoint's config.json
    (``preference_link``, ``preference_temperature``), else logistic at temperature 1; so are
    multi-objective heads' weights (``reward_objective_weights``), unless
    ``config.reward.objective_weights`` sets others.
    """
    if config.model.checkpoint is None:
        raise ValueError(
            "`model.checkpoint` is not set: pass the reward model's folder (--model runs/reward/hf)."
        )
    if not config.reward.eval_files:
        raise ValueError("`reward.eval_files` is empty: pass RewardBench-layout files (--data bench.jsonl).")
    model = load_reward_model(
        config.model.checkpoint,
        dtype=jnp.dtype(config.model.dtype),
        compute_dtype=jnp.dtype(config.model.compute_dtype or config.model.dtype),
    )
    hf = json.loads((pathlib.Path(config.model.checkpoint) / "config.json").read_text())
    if not config.reward.objective_weights and hf.get(OBJECTIVE_WEIGHTS_KEY):
        weights = tuple(hf[OBJECTIVE_WEIGHTS_KEY])
        config = dataclasses.replace(
            config, reward=dataclasses.replace(config.reward, objective_weights=weights)
        )
    tokenizer = build_tokenizer(config.model)
    return evaluate_reward_model(
        model, tokenizer, config, link=hf.get(LINK_KEY, "logistic"), temperature=hf.get(TEMPERATURE_KEY, 1.0)
    )
