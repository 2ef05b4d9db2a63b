"""Cached reference log-probs: computed once, equal to the live reference, invalidated by changes."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref.models.decoder import Decoder
from jaxpref.train import ReferenceLogps, cached_reference_logps, compute_reference_logps
from jaxpref.train.batches import KL_PREFIX, packed_batch, packed_logps, sub_batch

from .helpers import CONFIG, NUM_EXAMPLES, pair_batch, single_device_mesh, unpaired_batch


@pytest.fixture(scope="module")
def model():
    return Decoder(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batches():
    return [pair_batch(seed, first_index=NUM_EXAMPLES * seed) for seed in range(3)]


@nnx.jit
def _live_logps(model, batch):
    return packed_logps(model, packed_batch(batch))[0]


def live_logps(model, batch) -> np.ndarray:  # [sequences]
    """Sequence log-probs of the model run directly on one device."""
    return np.asarray(_live_logps(model, {k: jnp.asarray(v) for k, v in batch.items() if v is not None}))


def test_cached_logps_equal_live_reference_logps(model, batches):
    # Computed data-parallel over all 8 devices, compared with one device.
    reference = compute_reference_logps(model, batches)
    assert reference.example_index.tolist() == list(range(3 * NUM_EXAMPLES))
    for batch in reversed(batches):  # attach looks up by example index, in any order
        attached = reference.attach(batch)
        chosen, rejected = np.split(live_logps(model, batch), 2)
        np.testing.assert_allclose(attached["ref_chosen_logps"], chosen, atol=1e-5)
        np.testing.assert_allclose(attached["ref_rejected_logps"], rejected, atol=1e-5)


def test_unpaired_cache_holds_kl_reference_logps(model):
    batch = unpaired_batch(seed=0)
    attached = compute_reference_logps(model, [batch], family="unpaired").attach(batch)
    np.testing.assert_allclose(attached["ref_logps"], live_logps(model, sub_batch(batch, "")), atol=1e-5)
    kl_batch = sub_batch(batch, KL_PREFIX)
    np.testing.assert_allclose(attached["kl_ref_logps"], live_logps(model, kl_batch), atol=1e-5)


def test_cache_hit_miss_and_invalidation(model, batches, tmp_path):
    mesh = single_device_mesh()
    first, from_cache = cached_reference_logps(tmp_path, model, batches, mesh=mesh)
    assert not from_cache
    again, from_cache = cached_reference_logps(tmp_path, model, lambda: iter(batches), mesh=mesh)
    assert from_cache
    np.testing.assert_array_equal(again.example_index, first.example_index)
    for key, values in first.values.items():
        np.testing.assert_array_equal(again.values[key], values)

    changed_data = [dict(batches[0], input_ids=batches[0]["input_ids"] + 1), *batches[1:]]
    changed, from_cache = cached_reference_logps(tmp_path, model, changed_data, mesh=mesh)
    assert not from_cache
    assert not np.allclose(changed.values["ref_chosen_logps"], first.values["ref_chosen_logps"])

    other_weights = Decoder(CONFIG, rngs=nnx.Rngs(1))
    _, from_cache = cached_reference_logps(tmp_path, other_weights, batches, mesh=mesh)
    assert not from_cache

    _, from_cache = cached_reference_logps(tmp_path, model, batches, mesh=mesh, dataset_fingerprint="v1")
    assert not from_cache  # a named fingerprint is another key
    _, from_cache = cached_reference_logps(tmp_path, model, iter(batches), dataset_fingerprint="v1")
    assert from_cache  # and with it a one-shot iterator is fine: nothing is read on a hit
    assert len(list(tmp_path.glob("reference_logps-*.npz"))) == 4


def test_cache_errors_are_explicit(model, batches, tmp_path):
    with pytest.raises(ValueError, match="one-shot iterator"):
        cached_reference_logps(tmp_path, model, iter(batches))
    reference = ReferenceLogps(np.arange(4), {"ref_chosen_logps": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="without cached reference"):
        reference.attach(batches[1])
    with pytest.raises(ValueError, match="example_index"):
        reference.attach({k: v for k, v in batches[0].items() if k != "example_index"})
