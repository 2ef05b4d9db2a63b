"""Tiny model, batches and iterators shared by the training tests."""

from __future__ import annotations

import jax
import numpy as np

from jaxpref.models.decoder import DecoderConfig
from jaxpref.models.packing import pack_sequences, prefix_shared_pairs
from jaxpref.sharding import make_mesh
from jaxpref.train.batches import ROW_FIELDS

CONFIG = DecoderConfig(
    vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)
NUM_EXAMPLES = 8
ROW_LENGTH = 16
MARKER = CONFIG.vocab_size - 1  # the token that makes a response preferred in the learning tests


def single_device_mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _tokens(rng: np.random.Generator, low: int, high: int) -> list[int]:
    return rng.integers(1, CONFIG.vocab_size, int(rng.integers(low, high + 1))).tolist()


def pair_batch(seed: int, first_index: int = 0) -> dict[str, np.ndarray]:
    """A pairwise batch of NUM_EXAMPLES prompt-shared pairs (one row each), with example indices."""
    rng = np.random.default_rng(seed)
    prompts = [_tokens(rng, 2, 6) for _ in range(NUM_EXAMPLES)]
    chosen = [_tokens(rng, 1, 5) for _ in range(NUM_EXAMPLES)]
    rejected = [_tokens(rng, 1, 5) for _ in range(NUM_EXAMPLES)]
    batch = dict(prefix_shared_pairs(prompts, chosen, rejected, ROW_LENGTH)._asdict())
    batch["example_index"] = np.arange(first_index, first_index + NUM_EXAMPLES)
    return batch


def marker_pairs(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    """Random prompts and responses; only the chosen responses contain MARKER (at a random place)."""
    prompts, chosen, rejected = [], [], []
    for _ in range(count):
        prompts.append(rng.integers(1, MARKER, int(rng.integers(2, 6))))
        rejected.append(rng.integers(1, MARKER, int(rng.integers(1, 5))))
        good = rng.integers(1, MARKER, int(rng.integers(1, 5)))
        good[rng.integers(len(good))] = MARKER
        chosen.append(good)
    return dict(prefix_shared_pairs(prompts, chosen, rejected, ROW_LENGTH)._asdict())


def _one_per_row(sequences: list[list[int]], masks: list[list[int]]) -> dict[str, np.ndarray]:
    """Sequence i alone in row i (so any number of strided microbatches holds whole examples)."""
    rows = [pack_sequences([s], [m], ROW_LENGTH) for s, m in zip(sequences, masks)]
    fields = {
        f: np.concatenate([getattr(r, f) for r in rows]) for f in ROW_FIELDS if f != "prefix_segment_ids"
    }
    count = len(sequences)
    return {
        **fields,
        "sequence_rows": np.arange(count, dtype=np.int32),
        "sequence_segments": np.ones(count, np.int32),
    }


def unpaired_batch(seed: int) -> dict[str, np.ndarray]:
    """A KTO batch: prompt + completion per example, alternating labels, and a KL batch pairing
    example i's prompt with example i-1's completion."""
    rng = np.random.default_rng(seed)
    prompts = [_tokens(rng, 2, 6) for _ in range(NUM_EXAMPLES)]
    completions = [_tokens(rng, 1, 6) for _ in range(NUM_EXAMPLES)]
    masks = lambda ps, cs: [[0] * len(p) + [1] * len(c) for p, c in zip(ps, cs)]  # noqa: E731
    shifted = completions[-1:] + completions[:-1]
    batch = _one_per_row([p + c for p, c in zip(prompts, completions)], masks(prompts, completions))
    kl = _one_per_row([p + c for p, c in zip(prompts, shifted)], masks(prompts, shifted))
    batch.update({f"kl_{k}": v for k, v in kl.items()})
    batch["labels"] = np.arange(NUM_EXAMPLES) % 2 == 0
    batch["example_index"] = np.arange(NUM_EXAMPLES)
    return batch


def sft_batch(seed: int) -> dict[str, np.ndarray]:
    """Prompt + completion sequences packed several to a row."""
    rng = np.random.default_rng(seed)
    prompts = [_tokens(rng, 1, 4) for _ in range(2 * NUM_EXAMPLES)]
    completions = [_tokens(rng, 1, 5) for _ in range(2 * NUM_EXAMPLES)]
    sequences = [p + c for p, c in zip(prompts, completions)]
    masks = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)]
    return dict(pack_sequences(sequences, masks, ROW_LENGTH, num_rows=NUM_EXAMPLES)._asdict())


class ListIterator:
    """A deterministic batch iterator with grain-style ``get_state`` / ``set_state``."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.position >= len(self.batches):
            raise StopIteration
        self.position += 1
        return self.batches[self.position - 1]

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])
