"""The denoiser and its samplers: schedules against their formulas, noising, the network's shapes and
conditioning, and the samplers' shapes, determinism and exactness on a point mass (whose ideal
noise and velocity predictions are known in closed form)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref.models.diffusion import (
    Denoiser,
    DenoiserConfig,
    SamplerConfig,
    cosine_alpha_bars,
    generate,
    linear_alpha_bars,
    noised_inputs,
    sample,
    sample_jit,
)

TINY = DenoiserConfig(
    image_size=8, base_channels=8, channel_mults=(1, 2), vocab_size=5, num_train_timesteps=50
)
PROMPTS = jnp.array([[1, 3], [2, 4], [1, 0]], jnp.int32)  # the last one has a padding token


@pytest.fixture(scope="module", autouse=True)
def fast_random_compiles():
    # XLA:CPU compiles the partitionable threefry's draws several times slower, and a model's
    # initialisation is a draw per parameter shape; these tests check no random stream.
    with jax.threefry_partitionable(False):
        yield


@pytest.fixture(scope="module")
def models():
    return {
        prediction: Denoiser(dataclasses.replace(TINY, prediction=prediction), rngs=nnx.Rngs(0))
        for prediction in ("epsilon", "velocity")
    }


@jax.jit
def forward(graphdef, state, images, times, prompt_ids):
    return nnx.merge(graphdef, state)(images, times, prompt_ids)


def test_cosine_schedule_matches_its_formula():
    steps = 50
    f = lambda s: np.cos((s / steps + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    betas = np.minimum([1 - f(t + 1) / f(t) for t in range(steps)], 0.999)
    np.testing.assert_allclose(cosine_alpha_bars(steps), np.cumprod(1 - betas), rtol=1e-5)


def test_linear_schedule_is_ddpms_at_1000_steps_and_spans_it_at_fewer():
    alpha_bars = linear_alpha_bars(1000)
    np.testing.assert_allclose(alpha_bars, np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-5)
    assert alpha_bars[-1] < 1e-4 and linear_alpha_bars(100)[-1] < 1e-4  # both end at (almost) pure noise


def test_noised_inputs_follow_each_parameterisation():
    rng = np.random.default_rng(0)
    images, noise = rng.normal(size=(2, 3, 8, 8, 3)).astype(np.float32)
    uniforms = np.array([0.0, 0.37, 0.999], np.float32)
    noised, times, targets = noised_inputs(TINY, images, noise, uniforms)
    steps = np.floor(uniforms * TINY.num_train_timesteps).astype(int)
    alpha_bars = TINY.alpha_bars()[steps][:, None, None, None]
    np.testing.assert_allclose(
        noised, np.sqrt(alpha_bars) * images + np.sqrt(1 - alpha_bars) * noise, rtol=1e-5
    )
    np.testing.assert_allclose(times, steps / TINY.num_train_timesteps)
    np.testing.assert_array_equal(targets, noise)

    v_model = dataclasses.replace(TINY, prediction="v_prediction")
    v_noised, _, targets = noised_inputs(v_model, images, noise, uniforms)
    np.testing.assert_array_equal(v_noised, noised)
    v = np.sqrt(alpha_bars) * noise - np.sqrt(1 - alpha_bars) * images
    np.testing.assert_allclose(targets, v, rtol=1e-5, atol=1e-6)

    flow = dataclasses.replace(TINY, prediction="velocity")
    noised, times, targets = noised_inputs(flow, images, noise, uniforms)
    t = uniforms[:, None, None, None]
    np.testing.assert_allclose(noised, (1 - t) * images + t * noise, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(times, uniforms)
    np.testing.assert_allclose(targets, noise - images)


def test_denoiser_output_shape_and_prompt_conditioning(models):
    graphdef, state = nnx.split(models["epsilon"])
    # Every parameter redrawn: a fresh model's zero-initialised convolutions ignore the conditioning.
    rng = np.random.default_rng(1)
    state = jax.tree.map(lambda leaf: jnp.asarray(0.2 * rng.normal(size=leaf.shape), jnp.float32), state)
    x = jnp.asarray(rng.normal(size=(3, 8, 8, 3)), jnp.float32)
    times = jnp.array([0.1, 0.5, 0.9])
    out = forward(graphdef, state, x, times, PROMPTS)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    other_prompt = forward(graphdef, state, x, times, PROMPTS.at[0, 0].set(2))
    assert not np.allclose(out[0], other_prompt[0]) and np.allclose(out[1:], other_prompt[1:], atol=1e-6)
    # Padding (id 0) adds nothing: whatever its embedding, the third prompt is token 1 alone.
    table = state["prompt_embed"]["embedding"]
    table[...] = table[...].at[0].set(100.0)
    np.testing.assert_allclose(forward(graphdef, state, x, times, PROMPTS)[2], out[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "prediction,sampler",
    [
        ("epsilon", SamplerConfig("ddim", 4)),
        ("epsilon", SamplerConfig("ddpm", 4)),
        ("velocity", SamplerConfig("euler", 4)),
    ],
)
def test_samplers_are_deterministic_given_the_key(models, prediction, sampler):
    model = models[prediction]
    first = generate(model, PROMPTS, jax.random.key(0), sampler)
    assert first.shape == (3, 8, 8, 3) and first.dtype == jnp.float32
    np.testing.assert_array_equal(first, generate(model, PROMPTS, jax.random.key(0), sampler))
    assert not np.allclose(first, generate(model, PROMPTS, jax.random.key(1), sampler))


def test_new_weights_reuse_the_compiled_sampler(models):
    graphdef, state = nnx.split(models["velocity"])
    sampler = SamplerConfig("euler", 3)
    sample_jit(graphdef, state, PROMPTS, jax.random.key(0), sampler)
    before = sample_jit._cache_size()
    shifted = jax.tree.map(lambda x: x + 0.01, state)
    sample_jit(graphdef, shifted, PROMPTS, jax.random.key(0), sampler)
    assert sample_jit._cache_size() == before


class PointMass:
    """The ideal denoiser of data that is always the image ``target``: its prediction in closed form."""

    def __init__(self, config: DenoiserConfig, target: jax.Array):
        self.config, self.target = config, target
        self.alpha_bars = jnp.asarray(config.alpha_bars())

    def __call__(self, x, times, prompt_ids):
        t = times[:, None, None, None]
        if self.config.prediction == "velocity":  # x_t = (1 - t) c + t eps, v = eps - c = (x_t - c) / t
            return (x - self.target) / t
        alpha_bar = self.alpha_bars[jnp.round(times * self.config.num_train_timesteps).astype(jnp.int32)]
        signal, sigma = jnp.sqrt(alpha_bar[:, None, None, None]), jnp.sqrt(1 - alpha_bar[:, None, None, None])
        noise = (x - signal * self.target) / sigma
        return noise if self.config.prediction == "epsilon" else signal * noise - sigma * self.target


@pytest.mark.parametrize(
    "prediction,sampler",
    [
        ("epsilon", SamplerConfig("ddim", 5)),
        ("epsilon", SamplerConfig("ddim", 5, eta=0.5)),
        ("epsilon", SamplerConfig("ddpm", 50)),
        ("v_prediction", SamplerConfig("ddim", 5)),
        ("v_prediction", SamplerConfig("ddpm", 5)),
        ("velocity", SamplerConfig("euler", 3)),
    ],
)
def test_samplers_recover_a_point_mass_exactly(prediction, sampler):
    target = jnp.linspace(-0.9, 0.9, 8 * 8 * 3).reshape(1, 8, 8, 3)
    denoiser = PointMass(dataclasses.replace(TINY, prediction=prediction), target)
    images = sample(denoiser, PROMPTS, jax.random.key(3), sampler)
    np.testing.assert_allclose(images, jnp.broadcast_to(target, images.shape), atol=1e-4)


def test_grad_steps_change_gradients_not_values(models):
    model = models["velocity"]
    graphdef, params = nnx.split(model)
    sampler = SamplerConfig("euler", 4)

    @functools.partial(jax.jit, static_argnums=1)
    @functools.partial(jax.value_and_grad)
    def total(params, grad_steps):
        images = sample(
            nnx.merge(graphdef, params), PROMPTS, jax.random.key(0), sampler, grad_steps=grad_steps
        )
        return images.sum()

    (last_value, last_grads), (all_value, all_grads) = total(params, 1), total(params, 4)
    # The images are those of the compiled sampler, whatever the steps gradients flow through.
    compiled = generate(model, PROMPTS, jax.random.key(0), sampler).sum()
    np.testing.assert_allclose([last_value, all_value], compiled, rtol=1e-5)
    last, every = (g["conv_out"]["kernel"][...] for g in (last_grads, all_grads))
    assert np.any(last != 0) and not np.allclose(last, every)


def test_bad_settings_raise_naming_the_field(models):
    with pytest.raises(ValueError, match="prediction"):
        DenoiserConfig(prediction="x0")
    with pytest.raises(ValueError, match="image_size"):
        DenoiserConfig(image_size=10, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="method"):
        SamplerConfig(method="heun")
    with pytest.raises(ValueError, match="eta"):
        SamplerConfig(eta=2.0)
    with pytest.raises(ValueError, match="use \\['ddim', 'ddpm'\\]"):
        sample(models["epsilon"], PROMPTS, jax.random.key(0), SamplerConfig("euler", 2))
    with pytest.raises(ValueError, match="num_train_timesteps"):
        sample(models["epsilon"], PROMPTS, jax.random.key(0), SamplerConfig("ddim", 51))
    with pytest.raises(ValueError, match="grad_steps"):
        sample(models["velocity"], PROMPTS, jax.random.key(0), SamplerConfig("euler", 2), grad_steps=3)
