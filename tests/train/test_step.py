"""build_step: sharded steps equal the single-device step, gradient accumulation is exact, the
reference is frozen or cached, and non-finite updates are skipped."""

import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from jaxpref.models.decoder import Decoder
from jaxpref.objectives import objective
from jaxpref.sharding import make_mesh
from jaxpref.train import build_step, compute_reference_logps

from .helpers import CONFIG, NUM_EXAMPLES, pair_batch, sft_batch, single_device_mesh, unpaired_batch

DPO = objective("sigmoid", beta=0.1)
KTO = objective("kto", beta=0.1)
# SGD with momentum and learning rate 1: the first update is exactly -gradient (the trace starts at
# the gradient), and the trace is a params-shaped optimizer state whose sharding can be checked.
OPTIMIZER = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0, momentum=0.9)


def fresh_model() -> Decoder:
    return Decoder(CONFIG, rngs=nnx.Rngs(0))


def first_step(train_step, batch):
    """(state, metrics, gradients) of one step from the model's initial weights."""
    state = train_step.init()
    before = jax.device_get(state.params)
    state, metrics = train_step(state, batch)
    grads = jax.tree.map(lambda b, a: b - a, before, jax.device_get(state.params))
    return state, jax.device_get(metrics), grads


def assert_close(actual, expected, atol, rtol=0.0):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, atol=atol, rtol=rtol), actual, expected)


@pytest.fixture(scope="module")
def dpo_batch():
    return pair_batch(seed=0)


@pytest.fixture(scope="module")
def baseline(dpo_batch):
    """The single-device DPO step with a frozen reference, and its first step."""
    train_step = build_step(fresh_model(), DPO, OPTIMIZER, single_device_mesh())
    _, metrics, grads = first_step(train_step, dpo_batch)
    return train_step, metrics, grads


@pytest.fixture(scope="module")
def cached_step():
    return build_step(fresh_model(), DPO, OPTIMIZER, single_device_mesh(), reference="cached")


def test_first_dpo_step_has_loss_ln2_and_trl_metrics(baseline, dpo_batch):
    _, metrics, _ = baseline
    np.testing.assert_allclose(metrics["loss"], math.log(2.0), atol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key] == 0.0, key  # policy == reference
    assert metrics["logps/chosen"] < 0 and metrics["logps/rejected"] < 0
    assert metrics["grad_norm"] > 0
    assert metrics["learning_rate"] == 1.0
    assert metrics["num_tokens"] == np.sum(dpo_batch["segment_ids"] != 0)
    assert metrics["nonfinite_skipped"] == 0 and metrics["nonfinite_consecutive"] == 0


def test_frozen_reference_stays_fixed_while_params_change(baseline):
    train_step, _, _ = baseline
    state = train_step.init()
    initial = jax.device_get(state.params)
    for seed in range(3):
        state, metrics = train_step(state, pair_batch(seed))
    assert int(state.step) == 3
    assert_close(jax.device_get(state.ref_params), initial, atol=0)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), jax.device_get(state.params), initial)
    assert max(jax.tree.leaves(moved)) > 1e-3
    assert abs(float(metrics["loss"]) - math.log(2.0)) > 1e-4  # the policy left the reference


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)], ids=str)
def test_sharded_step_equals_single_device(shape, baseline, dpo_batch):
    _, expected_metrics, expected_grads = baseline
    mesh = make_mesh(*shape)
    state, metrics, grads = first_step(build_step(fresh_model(), DPO, OPTIMIZER, mesh), dpo_batch)
    assert_close(metrics, expected_metrics, atol=1e-5)
    assert_close(grads, expected_grads, atol=1e-5)

    # Optimizer state is sharded like the params; scalars are replicated.
    trace = optax.tree_utils.tree_get(state.opt_state, "trace")
    for param, moment in zip(jax.tree.leaves(state.params), jax.tree.leaves(trace)):
        assert moment.sharding == param.sharding
    assert state.step.sharding.spec == PartitionSpec()
    q_kernel = state.params["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
    fsdp = "fsdp" if shape[1] > 1 else None
    tensor = "tensor" if shape[2] > 1 else None
    assert q_kernel.sharding.spec == PartitionSpec(fsdp, tensor)


def test_init_from_a_function_creates_the_state_directly_sharded():
    train_step = build_step(fresh_model(), DPO, optax.adamw(1e-3), make_mesh(data=2, fsdp=2, tensor=2))
    state = train_step.init(lambda: nnx.state(fresh_model(), nnx.Param), seed=3)
    for array, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(train_step.state_shardings)):
        assert array.sharding == sharding
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    assert [m.sharding for m in jax.tree.leaves(mu)] == [p.sharding for p in jax.tree.leaves(state.params)]
    # The same weights as the eagerly built model (up to XLA fusing the initialisers differently).
    assert_close(jax.device_get(state), jax.device_get(train_step.init(seed=3)), atol=1e-8, rtol=1e-6)


def test_gradient_accumulation_equals_full_batch(baseline, dpo_batch):
    _, expected_metrics, expected_grads = baseline
    train_step = build_step(fresh_model(), DPO, OPTIMIZER, single_device_mesh(), grad_accum_steps=4)
    _, metrics, grads = first_step(train_step, dpo_batch)
    assert_close(metrics, expected_metrics, atol=1e-6, rtol=1e-6)
    assert_close(grads, expected_grads, atol=1e-6)


@pytest.fixture(scope="module")
def kto_baseline():
    """A KTO batch (with its KL batch) and the single-step result with a frozen reference."""
    batch = unpaired_batch(seed=0)
    train_step = build_step(fresh_model(), KTO, OPTIMIZER, single_device_mesh(), family="unpaired")
    _, metrics, grads = first_step(train_step, batch)
    return batch, metrics, grads


def test_kto_gradient_accumulation_is_exact(kto_baseline):
    """KTO's KL reference point is a batch mean: accumulation must still see the whole batch's."""
    batch, expected_metrics, expected_grads = kto_baseline
    np.testing.assert_allclose(expected_metrics["loss"], 0.5, atol=1e-6)  # policy == ref: 1 - sigmoid(0)
    assert expected_metrics["kl"] == 0.0 and expected_metrics["rewards/margins"] == 0.0
    train_step = build_step(
        fresh_model(), KTO, OPTIMIZER, single_device_mesh(), family="unpaired", grad_accum_steps=2
    )
    _, metrics, grads = first_step(train_step, batch)
    assert_close(metrics, expected_metrics, atol=1e-6, rtol=1e-6)  # log-probs sum to ~-20
    assert_close(grads, expected_grads, atol=1e-6)


def test_cached_reference_is_refused_for_kto_kl_pairs(kto_baseline):
    """KL pairs depend on the batch order, so log-probs cached in another order cannot serve them."""
    batch, _, _ = kto_baseline
    reference = compute_reference_logps(fresh_model(), [batch], family="unpaired", mesh=single_device_mesh())
    train_step = build_step(
        fresh_model(), KTO, OPTIMIZER, single_device_mesh(), family="unpaired", reference="cached"
    )
    with pytest.raises(ValueError, match="KTO's KL batch"):
        train_step(train_step.init(), reference.attach(batch))


@pytest.mark.parametrize("name", ["apo_zero_unpaired", "pointwise_dpo", "ulma"])
def test_unpaired_objectives_without_kl_run_on_loader_batches(kto_baseline, name):
    """The loader's KL batch is passed only to objectives that read it."""
    batch, _, _ = kto_baseline
    train_step = build_step(
        fresh_model(), objective(name), OPTIMIZER, single_device_mesh(), family="unpaired"
    )
    _, metrics = train_step(train_step.init(), batch)
    assert np.isfinite(float(metrics["loss"]))


def test_bco_is_refused_until_the_step_carries_its_state():
    with pytest.raises(ValueError, match="running mean"):
        build_step(fresh_model(), objective("bco"), OPTIMIZER, single_device_mesh(), family="unpaired")


def test_sft_step_is_accumulated_token_mean_nll():
    """The SFT loss with 2 microbatches against full logits on the whole batch, computed directly."""
    batch = sft_batch(seed=0)
    model = fresh_model()
    graphdef, params = nnx.split(model)

    @jax.jit
    @jax.value_and_grad
    def token_mean_nll(params):
        full_model = nnx.merge(graphdef, params)
        layout = {k: batch[k] for k in ("positions", "segment_ids")}
        log_probs = jax.nn.log_softmax(full_model.logits(full_model(batch["input_ids"], **layout)))
        predictor = np.maximum(batch["predictor_index"], 0)
        rows = np.arange(len(predictor))[:, None]
        token_logps = log_probs[rows, predictor, batch["input_ids"]]  # [rows, row_length]
        counted = (batch["completion_mask"] != 0) & (batch["predictor_index"] >= 0)
        return -(token_logps * counted).sum() / counted.sum()

    expected_loss, expected_grads = token_mean_nll(params)
    train_step = build_step(
        model, None, OPTIMIZER, single_device_mesh(), family="sft", reference="none", grad_accum_steps=2
    )
    _, metrics, grads = first_step(train_step, batch)
    np.testing.assert_allclose(metrics["loss"], expected_loss, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], math.log(CONFIG.vocab_size), atol=0.1)  # a fresh model
    assert_close(grads, jax.device_get(expected_grads), atol=1e-6)


def test_cached_reference_step_equals_frozen_reference_step(baseline, cached_step, dpo_batch):
    _, expected_metrics, expected_grads = baseline
    reference = compute_reference_logps(fresh_model(), [dpo_batch], mesh=single_device_mesh())
    _, metrics, grads = first_step(cached_step, reference.attach(dpo_batch))
    # At policy == reference every margin is 0 up to rounding, which the accuracy (margin > 0) would
    # count: a separately compiled reference pass may round differently (GPUs do). Margins compare.
    accuracy = "rewards/accuracies"
    assert_close({**metrics, accuracy: 0.0}, {**expected_metrics, accuracy: 0.0}, atol=1e-6)
    assert_close(grads, expected_grads, atol=1e-6)


def test_nonfinite_update_is_skipped_and_counted(cached_step, dpo_batch):
    reference = compute_reference_logps(fresh_model(), [dpo_batch], mesh=single_device_mesh())
    good = reference.attach(dpo_batch)
    bad = {
        **good,
        "ref_chosen_logps": np.where(np.arange(NUM_EXAMPLES) == 3, np.nan, good["ref_chosen_logps"]),
    }
    state = cached_step.init()
    initial = jax.device_get((state.params, state.opt_state))

    for expected_count in (1, 2):
        state, metrics = cached_step(state, bad)
        assert float(metrics["nonfinite_skipped"]) == 1.0
        assert float(metrics["nonfinite_consecutive"]) == expected_count
        assert not np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 2  # batches consumed
    assert int(state.nonfinite_count) == 2
    assert_close(jax.device_get((state.params, state.opt_state)), initial, atol=0)

    state, metrics = cached_step(state, good)
    assert float(metrics["nonfinite_skipped"]) == 0.0 and int(state.nonfinite_count) == 0
    np.testing.assert_allclose(float(metrics["loss"]), math.log(2.0), atol=1e-6)  # first applied update
    assert int(state.step) == 3


def test_batch_contract_errors_name_the_problem(dpo_batch):
    model, mesh = fresh_model(), single_device_mesh()
    with pytest.raises(ValueError, match="grad_accum_steps"):
        build_step(model, DPO, OPTIMIZER, mesh, grad_accum_steps=3).shard_batch(dpo_batch)
    swapped = {**dpo_batch, "sequence_rows": np.roll(dpo_batch["sequence_rows"], 1)}
    with pytest.raises(ValueError, match="must lie in a row"):
        build_step(model, DPO, OPTIMIZER, mesh, grad_accum_steps=2).shard_batch(swapped)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        build_step(model, DPO, OPTIMIZER, mesh, reference="cached").shard_batch(dpo_batch)
    with pytest.raises(ValueError, match="objective"):
        build_step(model, DPO, OPTIMIZER, mesh, family="sft", reference="none")
    with pytest.raises(ValueError, match="reference"):
        build_step(model, DPO, OPTIMIZER, mesh, reference="live")


def test_quality_columns_reach_mmpo(baseline, dpo_batch):
    """MMPO's target sigma(q_w - q_l) scales DPO's gradient at policy = reference by 2 sigma(dq) - 1."""
    _, _, dpo_grads = baseline
    batch = {
        **dpo_batch,
        "chosen_quality": np.full(NUM_EXAMPLES, 1.5, np.float32),
        "rejected_quality": np.full(NUM_EXAMPLES, 0.5, np.float32),
    }
    step = build_step(fresh_model(), objective("mmpo", beta=0.1), OPTIMIZER, single_device_mesh())
    _, metrics, grads = first_step(step, batch)
    np.testing.assert_allclose(metrics["loss"], math.log(2.0), atol=1e-6)
    factor = math.tanh(0.5)  # 2 sigma(1) - 1
    assert_close(grads, jax.tree.map(lambda g: factor * g, dpo_grads), atol=1e-6)
