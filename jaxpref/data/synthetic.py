"""A bundled task with a hidden ground-truth reward: sorting digit strings.

The prompt is a string of digits followed by ``>``; the ideal response is the same digits sorted.
:func:`hidden_reward` scores any response in [0, 1] (1 exactly when it is the sorted string), so
preference pairs can be labelled, and policies evaluated, without human data. Demonstrations
for SFT are deliberately imperfect (a fraction carry a few swapped neighbours), so the SFT policy
leaves room for preference optimisation to improve on.

Everything is generated from a seed; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

PROMPT_END = ">"


@dataclasses.dataclass(frozen=True)
class SortingTask:
    min_digits: int = 3
    max_digits: int = 6
    # Probability that an SFT demonstration is corrupted, and how many neighbour swaps it gets.
    corruption_rate: float = 0.6
    max_swaps: int = 2

    def prompt(self, rng: np.random.Generator) -> str:
        length = int(rng.integers(self.min_digits, self.max_digits + 1))
        return "".join(str(d) for d in rng.integers(0, 10, length)) + PROMPT_END

    def demonstration(self, prompt: str, rng: np.random.Generator) -> str:
        """The sorted digits, with up to ``max_swaps`` adjacent swaps in a ``corruption_rate`` share."""
        response = sorted(digits(prompt))
        if rng.random() < self.corruption_rate:
            for _ in range(int(rng.integers(1, self.max_swaps + 1))):
                i = int(rng.integers(0, len(response) - 1))
                response[i], response[i + 1] = response[i + 1], response[i]
        return "".join(response)


def digits(prompt: str) -> str:
    return prompt[: -len(PROMPT_END)] if prompt.endswith(PROMPT_END) else prompt


def hidden_reward(prompt: str, response: str) -> float:
    """Share of positions holding the right digit of the sorted prompt, over the longer length.

    1.0 only for the exact sorted string; missing, extra or misplaced digits each cost a share.
    """
    target = sorted(digits(prompt))
    hits = sum(a == b for a, b in zip(response, target))
    return hits / max(len(target), len(response), 1)


def write_jsonl(path: str | pathlib.Path, rows) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def sft_rows(task: SortingTask, count: int, seed: int) -> list[dict[str, str]]:
    """``{prompt, completion}`` demonstrations (imperfect by design)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        prompt = task.prompt(rng)
        rows.append({"prompt": prompt, "completion": task.demonstration(prompt, rng)})
    return rows


def prompts(task: SortingTask, count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [task.prompt(rng) for _ in range(count)]
