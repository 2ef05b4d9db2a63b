"""Per-host batches merge into the batch one host would have loaded (multi-host data feeding)."""

import numpy as np

from jaxpref.models.packing import prefix_shared_pairs
from jaxpref.train.batches import merge_host_batches


def _pairs(rng, count):
    def tokens(low, high):
        return [list(rng.integers(3, 50, rng.integers(low, high))) for _ in range(count)]

    return tokens(2, 6), tokens(1, 5), tokens(1, 5)


def test_merged_host_batches_equal_one_host_batch():
    rng = np.random.default_rng(0)
    prompts, chosen, rejected = _pairs(rng, 6)
    whole = prefix_shared_pairs(prompts, chosen, rejected, row_length=20)._asdict()
    hosts = [
        prefix_shared_pairs(
            prompts[i : i + 3], chosen[i : i + 3], rejected[i : i + 3], row_length=20
        )._asdict()
        for i in (0, 3)
    ]
    merged = merge_host_batches(hosts, groups=2)
    assert merged.keys() == whole.keys()
    for key, value in whole.items():
        np.testing.assert_array_equal(merged[key], value, err_msg=key)
