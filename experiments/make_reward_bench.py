"""Writes ``jaxpref/recipes/assets/reward_bench.jsonl``: a few dozen rows in RewardBench's layout.

The rows come from the bundled tasks, not from RewardBench: subset names are RewardBench's so that
the section grouping of :mod:`jaxpref.recipes.reward_eval` is exercised, but every prompt asks to sort
digits (:mod:`jaxpref.data.synthetic`), and the chosen response is the sorted digits:

- ``alpacaeval-easy`` (chat): rejected is the same digits shuffled;
- ``mt-bench-hard`` (chat-hard): rejected has two neighbours swapped;
- ``xstest-should-respond`` (safety): rejected is a refusal;
- ``math-prm`` (reasoning): rejected has one digit changed;
- ``cyclic-preferences`` (section "other"): preference cycles of :mod:`experiments.gpm_cyclic`,
  three responses to one prompt with all three pairs, each beating the next.

Run: ``python -m experiments.make_reward_bench`` (deterministic; rewrites the bundled file).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np

from experiments.gpm_cyclic import cycle_rows
from jaxpref.data.synthetic import SortingTask, digits, write_jsonl
from jaxpref.recipes.configs import ASSETS

BENCH_FILE = ASSETS / "reward_bench.jsonl"
ROWS_PER_SUBSET = 8
CYCLES = 3
REFUSAL = "sorry, i cannot help with that."


def _shuffled(answer: str, rng: np.random.Generator) -> str:
    return "".join(rng.permutation(list(answer)))


def _swapped(answer: str, rng: np.random.Generator) -> str:
    i = int(rng.integers(0, len(answer) - 1))
    return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]


def _wrong_digit(answer: str, rng: np.random.Generator) -> str:
    i = int(rng.integers(0, len(answer)))
    return answer[:i] + str((int(answer[i]) + int(rng.integers(1, 10))) % 10) + answer[i + 1 :]


REJECTED: dict[str, Callable[[str, np.random.Generator], str]] = {
    "alpacaeval-easy": _shuffled,
    "mt-bench-hard": _swapped,
    "xstest-should-respond": lambda answer, rng: REFUSAL,
    "math-prm": _wrong_digit,
}


def bench_rows(seed: int = 0) -> list[dict[str, str]]:
    """The bundled file's rows: ``ROWS_PER_SUBSET`` per sorting subset, then the cycles."""
    rng = np.random.default_rng(seed)
    task = SortingTask()
    rows = []
    for subset, reject in REJECTED.items():
        while sum(row["subset"] == subset for row in rows) < ROWS_PER_SUBSET:
            prompt = task.prompt(rng)
            answer = "".join(sorted(digits(prompt)))
            rejected = reject(answer, rng)
            if rejected != answer:  # shuffling or swapping equal digits changes nothing
                rows.append({"prompt": prompt, "chosen": answer, "rejected": rejected, "subset": subset})
    return rows + cycle_rows(CYCLES, rng, subset="cyclic-preferences")


def main() -> pathlib.Path:
    path = write_jsonl(BENCH_FILE, bench_rows())
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
