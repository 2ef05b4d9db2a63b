"""build_diffusion_step: one update of every method on a tiny denoiser (finite loss, parameters move,
the frozen reference does not), the preference losses' known values at policy = reference, reward
backpropagation's loss and reward, a checkpointed and resumed run, and the checks on settings."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpref.data.images import ArrayBatches
from jaxpref.models.diffusion import Denoiser, DenoiserConfig, SamplerConfig
from jaxpref.sharding import make_mesh
from jaxpref.train import make_checkpoint_manager, train
from jaxpref.train.diffusion import (
    DiffusionDPO,
    DiffusionKTO,
    Denoising,
    FlowDPO,
    RewardBackprop,
    build_diffusion_step,
)

from .helpers import single_device_mesh

# One resolution and four channels: the step's compilation, not the model, dominates these tests.
TINY = DenoiserConfig(image_size=8, base_channels=4, channel_mults=(1,), vocab_size=5, num_train_timesteps=50)
BATCH = 4
OPTIMIZER = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)


@pytest.fixture(scope="module", autouse=True)
def fast_random_compiles():
    # XLA:CPU compiles the partitionable threefry's draws several times slower (a model's
    # initialisation is a draw per parameter shape); these tests compare no random stream.
    with jax.threefry_partitionable(False):
        yield


def brightness(images, prompt_ids):  # a differentiable reward: [B, 8, 8, 3] -> [B]
    return jnp.mean(images, axis=(1, 2, 3))


METHODS = {
    "denoising": ("velocity", Denoising()),
    "dpo": ("epsilon", DiffusionDPO(beta=500.0)),
    "flow_dpo": ("velocity", FlowDPO(beta=500.0, time_scaled_beta=True)),
    "kto": ("epsilon", DiffusionKTO(beta=100.0)),
    "draft": ("velocity", RewardBackprop(brightness, sampler=SamplerConfig("euler", 2), grad_steps=1)),
}


def make_batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = lambda: rng.uniform(-1, 1, (BATCH, 8, 8, 3)).astype(np.float32)  # noqa: E731
    return {
        "images": images(),
        "chosen_images": images(),
        "rejected_images": images(),
        "prompt_ids": rng.integers(1, TINY.vocab_size, (BATCH, 2)).astype(np.int32),
        "labels": np.arange(BATCH) % 2 == 0,
    }


def model(prediction: str) -> Denoiser:
    return Denoiser(dataclasses.replace(TINY, prediction=prediction), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def steps():
    return {
        name: build_diffusion_step(model(prediction), method, OPTIMIZER, single_device_mesh())
        for name, (prediction, method) in METHODS.items()
    }


@pytest.fixture(scope="module")
def first_steps(steps):
    """name -> (params before, state after one step, metrics) for every method."""
    results = {}
    for name, step in steps.items():
        state = step.init()
        before = jax.device_get(state.params)
        state, metrics = step(state, make_batch(0))
        results[name] = (before, state, jax.device_get(metrics))
    return results


@pytest.mark.parametrize("name", list(METHODS))
def test_one_step_moves_the_policy_and_not_the_reference(first_steps, name):
    before, state, metrics = first_steps[name]
    assert np.isfinite(metrics["loss"]) and metrics["nonfinite_skipped"] == 0.0
    assert metrics["grad_norm"] > 0 and metrics["num_images"] == BATCH
    after = jax.device_get(state.params)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    assert any(moved)
    if METHODS[name][1].uses_reference:
        for ref, initial in zip(jax.tree.leaves(jax.device_get(state.ref_params)), jax.tree.leaves(before)):
            np.testing.assert_array_equal(ref, initial)
    else:
        assert state.ref_params is None
    assert int(state.step) == 1


def test_preference_losses_at_policy_equal_reference(first_steps):
    # The first step's policy is the reference: DPO's loss is log 2, KTO's lambda / 2.
    for name in ("dpo", "flow_dpo"):
        metrics = first_steps[name][2]
        assert metrics["loss"] == pytest.approx(np.log(2.0), rel=1e-6)
        assert metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    metrics = first_steps["kto"][2]
    assert metrics["loss"] == pytest.approx(0.5, rel=1e-6) and metrics["kl"] == pytest.approx(0.0, abs=1e-6)


def test_reward_backprop_minimises_minus_the_reward(first_steps):
    metrics = first_steps["draft"][2]
    assert metrics["loss"] == pytest.approx(-metrics["reward"], rel=1e-6)


def test_denoising_loss_is_the_mean_squared_error_of_a_fresh_model(first_steps):
    # A fresh model predicts 0 (zero-initialised output conv), so its error is the target's mean
    # square: E[(eps - x_0)^2] = 1 + 1/3 for images uniform in [-1, 1].
    assert first_steps["denoising"][2]["loss"] == pytest.approx(4 / 3, abs=0.15)


def test_sharded_step_matches_the_single_device_step(first_steps):
    # Rows split over a (2, 2, 2) mesh's batch axes, parameters replicated: the same loss and
    # gradient. (Not the same params: Adam's first step moves each by +-lr along its gradient's
    # sign, which rounding flips for the gradients that are ~0.)
    prediction, method = METHODS["dpo"]
    step = build_diffusion_step(model(prediction), method, OPTIMIZER, make_mesh(2, 2, 2))
    _, metrics = step(step.init(), make_batch(0))
    single_metrics = first_steps["dpo"][2]
    for key in ("loss", "grad_norm", "rewards/margins"):
        assert float(metrics[key]) == pytest.approx(float(single_metrics[key]), rel=1e-4, abs=1e-6)


def test_resumed_run_matches_an_uninterrupted_one(steps, tmp_path):
    data = {key: np.concatenate([make_batch(s)[key] for s in range(2)]) for key in ("images", "prompt_ids")}
    step = steps["denoising"]

    def run(num_steps, directory):
        manager = make_checkpoint_manager(directory, save_interval_steps=2)
        state = train(
            step.init(),
            step,
            ArrayBatches(data, BATCH),
            num_steps=num_steps,
            checkpoint_manager=manager,
            progress=False,
        )
        manager.close()
        return jax.device_get(state.params)

    straight = run(3, tmp_path / "straight")
    run(2, tmp_path / "resumed")
    resumed = run(3, tmp_path / "resumed")
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)


def test_bad_settings_raise_naming_the_field():
    mesh = single_device_mesh()
    with pytest.raises(ValueError, match="prediction='epsilon'"):
        build_diffusion_step(model("velocity"), DiffusionDPO(), OPTIMIZER, mesh)
    with pytest.raises(ValueError, match="prediction='velocity'"):
        build_diffusion_step(model("epsilon"), FlowDPO(), OPTIMIZER, mesh)
    with pytest.raises(ValueError, match="beta"):
        build_diffusion_step(model("epsilon"), DiffusionKTO(beta=0.0), OPTIMIZER, mesh)
    with pytest.raises(ValueError, match="grad_steps"):
        build_diffusion_step(
            model("velocity"), RewardBackprop(brightness, SamplerConfig("euler", 2), 3), OPTIMIZER, mesh
        )
    with pytest.raises(ValueError, match="deterministic"):
        build_diffusion_step(
            model("epsilon"), RewardBackprop(brightness, SamplerConfig("ddpm", 2)), OPTIMIZER, mesh
        )
    with pytest.raises(ValueError, match="Denoiser"):
        build_diffusion_step(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), Denoising(), OPTIMIZER, mesh)
    step = build_diffusion_step(model("epsilon"), DiffusionDPO(), OPTIMIZER, mesh)
    with pytest.raises(ValueError, match="rejected_images"):
        step.shard_batch({"chosen_images": np.zeros((2, 8, 8, 3)), "prompt_ids": np.ones((2, 2), np.int32)})
    with pytest.raises(ValueError, match="first dimension"):
        step.shard_batch(
            {
                "chosen_images": np.zeros((2, 8, 8, 3)),
                "rejected_images": np.zeros((3, 8, 8, 3)),
                "prompt_ids": np.ones((2, 2), np.int32),
            }
        )
