r"""A small conditional image denoiser (U-Net), its noising processes and its samplers.

Three parameterisations share one network (:class:`Denoiser`), picked by
``DenoiserConfig.prediction``:

- DDPM, :math:`x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon` at integer steps
  :math:`t \in \{0, \dots, T-1\}` of a noise schedule (:func:`cosine_alpha_bars`,
  :func:`linear_alpha_bars`), with the network predicting the noise :math:`\epsilon`
  (``"epsilon"``, Ho et al.) or :math:`v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\,x_0`
  (``"v_prediction"``, Salimans & Ho, arXiv:2202.00512, as Stable Diffusion 2). The two carry the
  same information, but :math:`\hat x_0` from :math:`\hat\epsilon` divides by
  :math:`\sqrt{\bar\alpha_t}`, so at high noise a small model's noise errors become large image
  errors; v-prediction stays well conditioned and trains a small model much faster.
- ``"velocity"`` (rectified flow): :math:`x_t = (1 - t)\,x_0 + t\,\epsilon`, :math:`t \in [0, 1]`; the
  network predicts :math:`v = \epsilon - x_0` (as :func:`jaxpref.objectives.diffusion.flow_velocity_target`).

In all of them the network reads a time in [0, 1] (:math:`t/T` for DDPM), larger meaning noisier, and a
prompt of token ids ``[batch, L]`` whose embeddings are summed (id 0 is padding): class labels or a
bag-of-words text embedding. :func:`noised_inputs` draws the training input and target of either
parameterisation from uniform draws, so one training step serves them all.

Samplers (:class:`SamplerConfig`, :func:`sample`): DDIM (``eta`` from 0, deterministic, to 1) and
ancestral DDPM (``"ddpm"``: DDIM's update with :math:`\eta = 1`, the posterior variance
:math:`\tilde\beta_t`) on ``num_steps`` "trailing" steps of the training schedule, for the DDPM
parameterisations; Euler integration of the flow ODE from :math:`t = 1` to 0 for velocity
prediction. Given the same key they return the same images. :func:`sample` is a pure function
that can keep gradients through its last ``grad_steps`` steps (reward backpropagation);
:data:`sample_jit` is it compiled, with the model split outside ``jit`` (graph definition as static
metadata, parameters traced) so new weights reuse the program, and :func:`generate` the convenience
call on a module.

Images are ``[batch, height, width, channels]`` in [-1, 1].

>>> import jax
>>> from flax import nnx
>>> config = DenoiserConfig(image_size=16, base_channels=16, prediction="velocity")
>>> model = nnx.eval_shape(lambda: Denoiser(config, rngs=nnx.Rngs(0)))  # shapes only: nothing computed
>>> sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))  # parameters
169811
>>> prompts = jax.numpy.array([[1, 5], [2, 6]])  # two prompts of two tokens
>>> nnx.eval_shape(lambda m: sample(m, prompts, jax.random.key(0), SamplerConfig("euler", 20)), model).shape
(2, 16, 16, 3)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

DDPM_PREDICTIONS = ("epsilon", "v_prediction")
PREDICTIONS = (*DDPM_PREDICTIONS, "velocity")
NOISE_SCHEDULES = ("cosine", "linear")
# Sampler method -> the parameterisations it integrates.
SAMPLERS = {"ddim": DDPM_PREDICTIONS, "ddpm": DDPM_PREDICTIONS, "euler": ("velocity",)}


# ------------------------------------------------------------------------------------------------
# Noise schedules and noising.
# ------------------------------------------------------------------------------------------------


def cosine_alpha_bars(num_steps: int, offset: float = 0.008) -> np.ndarray:  # [T] float32
    r""":math:`\bar\alpha_t = f(t+1)/f(0)`, :math:`f(s) = \cos^2\big(\frac{s/T + o}{1 + o}\frac{\pi}{2}\big)`,
    with each step's :math:`\beta_t = 1 - \bar\alpha_t/\bar\alpha_{t-1}` capped at 0.999.

    Reference: Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", arXiv:2102.09672.
    """
    steps = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    f = np.cos((steps + offset) / (1 + offset) * np.pi / 2) ** 2
    betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    return np.cumprod(1.0 - betas).astype(np.float32)


def linear_alpha_bars(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:  # [T]
    r""":math:`\bar\alpha_t = \prod_{s \le t}(1 - \beta_s)` with :math:`\beta` linear from ``beta_start`` to
    ``beta_end``, both scaled by :math:`1000/T` so that any :math:`T` spans DDPM's noise range.

    Reference: Ho et al., "Denoising Diffusion Probabilistic Models", arXiv:2006.11239.
    """
    scale = 1000.0 / num_steps
    betas = np.linspace(beta_start * scale, min(beta_end * scale, 0.999), num_steps, dtype=np.float64)
    return np.cumprod(1.0 - betas).astype(np.float32)


def noised_inputs(
    config: DenoiserConfig,
    images: Array,  # [batch, H, W, C] clean x_0
    noise: Array,  # [batch, H, W, C] Gaussian epsilon
    uniforms: Array,  # [batch] in [0, 1): the draws that pick each example's noise level
) -> tuple[Array, Array, Array]:  # x_t [batch, H, W, C], model times [batch], targets [batch, H, W, C]
    r"""A training example of the config's parameterisation: the noised input, the time the network
    reads and the regression target.

    DDPM: step :math:`t = \lfloor uT \rfloor`, time :math:`t/T`, target :math:`\epsilon`
    (``"epsilon"``) or :math:`\sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\,x_0`
    (``"v_prediction"``). ``"velocity"``: time :math:`t = u`, target :math:`v = \epsilon - x_0`.
    """
    if config.prediction in DDPM_PREDICTIONS:
        steps = jnp.floor(uniforms * config.num_train_timesteps).astype(jnp.int32)
        alpha_bars = jnp.asarray(config.alpha_bars())[steps][:, None, None, None]
        signal, sigma = jnp.sqrt(alpha_bars), jnp.sqrt(1.0 - alpha_bars)
        target = noise if config.prediction == "epsilon" else signal * noise - sigma * images
        return signal * images + sigma * noise, steps / config.num_train_timesteps, target
    times = uniforms[:, None, None, None]
    return (1.0 - times) * images + times * noise, uniforms, noise - images


# ------------------------------------------------------------------------------------------------
# The network.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DenoiserConfig:
    """Architecture and noising process; frozen and hashable (a static argument of compiled samplers).

    Attributes:
      image_size: height and width (a multiple of ``2 ** (len(channel_mults) - 1)``).
      channels: image channels.
      base_channels: channels of the first resolution; resolution ``i`` has
        ``base_channels * channel_mults[i]`` and is half the size of resolution ``i - 1``.
      channel_mults: one entry per resolution.
      vocab_size: prompt token ids are in ``[0, vocab_size)``; 0 is padding.
      prediction: ``"epsilon"`` or ``"v_prediction"`` (DDPM), or ``"velocity"`` (rectified flow).
      num_train_timesteps: DDPM steps :math:`T` (DDPM only).
      noise_schedule: ``"cosine"`` or ``"linear"`` (DDPM only).
    """

    image_size: int = 16
    channels: int = 3
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    vocab_size: int = 8
    prediction: str = "epsilon"
    num_train_timesteps: int = 1000
    noise_schedule: str = "cosine"

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"`prediction`={self.prediction!r} must be one of {PREDICTIONS}.")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"`noise_schedule`={self.noise_schedule!r} must be one of {NOISE_SCHEDULES}.")
        if not self.channel_mults or self.image_size % 2 ** (len(self.channel_mults) - 1):
            raise ValueError(
                f"`image_size`={self.image_size} must be divisible by 2 ** (len(channel_mults) - 1) = "
                f"{2 ** (len(self.channel_mults) - 1)}; use fewer `channel_mults` or a larger image."
            )
        if self.num_train_timesteps < 2:
            raise ValueError(f"`num_train_timesteps`={self.num_train_timesteps} must be at least 2.")

    @property
    def cond_dim(self) -> int:
        return 4 * self.base_channels

    def alpha_bars(self) -> np.ndarray:  # [num_train_timesteps]
        if self.noise_schedule == "cosine":
            return cosine_alpha_bars(self.num_train_timesteps)
        return linear_alpha_bars(self.num_train_timesteps)


def timestep_embedding(
    times: Array, dim: int, max_period: float = 10000.0
) -> Array:  # [batch] -> [batch, dim]
    """Sinusoidal features of ``1000 * times`` (times in [0, 1]), as DDPM embeds its integer steps."""
    half = dim // 2
    frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = 1000.0 * times.astype(jnp.float32)[:, None] * frequencies[None]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _group_norm(channels: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    return nnx.GroupNorm(channels, num_groups=min(8, channels), rngs=rngs)


class ResBlock(nnx.Module):
    """Norm, SiLU, 3x3 conv, twice, with the conditioning as a FiLM scale and shift on the second norm."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, rngs: nnx.Rngs):
        self.norm1 = _group_norm(in_channels, rngs)
        self.conv1 = nnx.Conv(in_channels, out_channels, (3, 3), rngs=rngs)
        self.film = nnx.Linear(cond_dim, 2 * out_channels, rngs=rngs)
        self.norm2 = _group_norm(out_channels, rngs)
        # Zero-initialised: each block starts as the identity, which keeps deep stacks trainable.
        self.conv2 = nnx.Conv(
            out_channels, out_channels, (3, 3), kernel_init=nnx.initializers.zeros, rngs=rngs
        )
        self.skip = (
            nnx.Conv(in_channels, out_channels, (1, 1), rngs=rngs) if in_channels != out_channels else None
        )

    def __call__(self, x: Array, cond: Array) -> Array:  # [b, h, w, in], [b, cond] -> [b, h, w, out]
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        scale, shift = jnp.split(self.film(jax.nn.silu(cond))[:, None, None, :], 2, axis=-1)
        h = self.conv2(jax.nn.silu(self.norm2(h) * (1.0 + scale) + shift))
        return h + (x if self.skip is None else self.skip(x))


class Denoiser(nnx.Module):
    """A small U-Net: one conditioned residual block per resolution on the way down and up, skip
    connections between them, strided-conv downsampling and nearest-neighbour upsampling (the up
    blocks' first convolution mixes the upsampled features with the skip).

    ``model(images [b, H, W, C], times [b] in [0, 1], prompt_ids [b, L]) -> [b, H, W, C]``: the
    predicted noise, v or velocity (``config.prediction``).
    """

    def __init__(self, config: DenoiserConfig, *, rngs: nnx.Rngs):
        self.config = config
        widths = [config.base_channels * m for m in config.channel_mults]
        cond = config.cond_dim
        self.time_mlp1 = nnx.Linear(config.base_channels, cond, rngs=rngs)
        self.time_mlp2 = nnx.Linear(cond, cond, rngs=rngs)
        self.prompt_embed = nnx.Embed(config.vocab_size, cond, rngs=rngs)
        self.conv_in = nnx.Conv(config.channels, config.base_channels, (3, 3), rngs=rngs)
        inputs = [config.base_channels, *widths[:-1]]
        self.down = nnx.List([ResBlock(i, w, cond, rngs) for i, w in zip(inputs, widths)])
        self.downsample = nnx.List([nnx.Conv(w, w, (3, 3), strides=2, rngs=rngs) for w in widths[:-1]])
        self.mid = ResBlock(widths[-1], widths[-1], cond, rngs)
        # Up block i reads the (upsampled) output of the resolution below it and resolution i's skip.
        below = [*widths[1:], widths[-1]]
        self.up = nnx.List([ResBlock(b + w, w, cond, rngs) for b, w in zip(below, widths)])
        self.norm_out = _group_norm(widths[0], rngs)
        self.conv_out = nnx.Conv(
            widths[0], config.channels, (3, 3), kernel_init=nnx.initializers.zeros, rngs=rngs
        )

    def conditioning(self, times: Array, prompt_ids: Array) -> Array:  # [b], [b, L] -> [b, cond]
        time = self.time_mlp2(
            jax.nn.silu(self.time_mlp1(timestep_embedding(times, self.config.base_channels)))
        )
        tokens = self.prompt_embed(prompt_ids) * (prompt_ids != 0)[..., None]  # padding adds nothing
        return time + tokens.sum(axis=1)

    def __call__(self, images: Array, times: Array, prompt_ids: Array) -> Array:
        cond = self.conditioning(times, prompt_ids)
        h = self.conv_in(images)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, cond)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, cond)
        for i in reversed(range(len(self.up))):
            h = self.up[i](jnp.concatenate([h, skips[i]], axis=-1), cond)
            if i > 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


# ------------------------------------------------------------------------------------------------
# Samplers.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How :func:`sample` draws images; frozen and hashable (a static argument of :data:`sample_jit`).

    Attributes:
      method: ``"ddim"`` or ``"ddpm"`` for the DDPM parameterisations, ``"euler"`` for velocity
        prediction.
      num_steps: denoising steps (network calls).
      eta: DDIM's noise scale, 0 deterministic to 1 (ancestral); ``"ddpm"`` always uses 1.
      clip_denoised: clip DDIM's :math:`\\hat x_0` to [-1, 1] at every step (a common stabiliser).
    """

    method: str = "ddim"
    num_steps: int = 20
    eta: float = 0.0
    clip_denoised: bool = True

    def __post_init__(self):
        if self.method not in SAMPLERS:
            raise ValueError(f"`method`={self.method!r} must be one of {tuple(SAMPLERS)}.")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"`num_steps`={self.num_steps!r} must be a positive int.")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"`eta`={self.eta!r} must lie in [0, 1].")


def _ddim_schedule(config: DenoiserConfig, num_steps: int) -> tuple[Array, Array, Array]:
    """``(model times, alpha_bar_t, alpha_bar_prev)``, each ``[num_steps]``, noisiest first.

    "Trailing" spacing: the first step is the last training step T - 1, so sampling starts from
    the (almost) pure noise the model was trained on; after step 0 comes the clean image
    (:math:`\\bar\\alpha = 1`).
    """
    total = config.num_train_timesteps
    if num_steps > total:
        raise ValueError(f"`num_steps`={num_steps} exceeds the model's `num_train_timesteps`={total}.")
    steps = np.round(np.linspace(total, 0, num_steps, endpoint=False)).astype(np.int64) - 1
    alpha_bars = config.alpha_bars()
    previous = np.concatenate([alpha_bars[steps[1:]], [1.0]])
    return (
        jnp.asarray(steps / total, jnp.float32),
        jnp.asarray(alpha_bars[steps]),
        jnp.asarray(previous, jnp.float32),
    )


def _ddim_update(x, prediction, alpha_bar, alpha_bar_prev, noise, eta: float, clip: bool, kind: str):
    r"""One DDIM step :math:`x_t \to x_{t'}` (Song et al., arXiv:2010.02502, eq. 12),

    .. math:: x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0 + \sqrt{1 - \bar\alpha_{t'} - \sigma^2}\,\hat\epsilon
              + \sigma z, \quad \sigma = \eta\sqrt{\tfrac{1-\bar\alpha_{t'}}{1-\bar\alpha_t}
              \big(1 - \tfrac{\bar\alpha_t}{\bar\alpha_{t'}}\big)}

    with :math:`\hat x_0, \hat\epsilon` from the network's noise (``kind="epsilon"``) or v prediction.
    """
    signal, sigma = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
    if kind == "epsilon":
        eps = prediction
        denoised = (x - sigma * eps) / signal
    else:  # v = signal * eps - sigma * x_0, x = signal * x_0 + sigma * eps
        denoised = signal * x - sigma * prediction
        eps = sigma * x + signal * prediction
    if clip:  # and the noise estimate that agrees with the clipped image
        denoised = jnp.clip(denoised, -1.0, 1.0)
        eps = (x - signal * denoised) / sigma
    variance = eta**2 * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev)
    direction = jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - variance, 0.0))
    return jnp.sqrt(alpha_bar_prev) * denoised + direction * eps + jnp.sqrt(variance) * noise


def sample(
    model: Denoiser,
    prompt_ids: Array,  # [batch, L] int
    key: Array,
    config: SamplerConfig,
    *,
    grad_steps: int = 0,
) -> Array:  # [batch, H, W, C]
    """Images for the prompts, from Gaussian noise drawn from ``key`` (pure; see the module docstring).

    Gradients flow through the last ``grad_steps`` steps only (DRaFT-K); the earlier ones run under
    ``stop_gradient``, so their activations are not kept for the backward pass.
    """
    model_config = model.config
    if model_config.prediction not in SAMPLERS[config.method]:
        raise ValueError(
            f"SamplerConfig `method`={config.method!r} integrates {SAMPLERS[config.method]} models, but the "
            f"model predicts {model_config.prediction!r}; use "
            f"{[m for m, kinds in SAMPLERS.items() if model_config.prediction in kinds]}."
        )
    if not 0 <= grad_steps <= config.num_steps:
        raise ValueError(f"`grad_steps`={grad_steps} must lie in [0, num_steps={config.num_steps}].")
    batch = prompt_ids.shape[0]
    shape = (batch, model_config.image_size, model_config.image_size, model_config.channels)
    init_key, step_key = jax.random.split(key)
    if config.method == "euler":
        times = jnp.linspace(1.0, 0.0, config.num_steps + 1)
        per_step = (times[:-1], times[1:])

        def step(x, inputs):
            time, next_time = inputs
            velocity = model(x, jnp.full((batch,), time), prompt_ids)
            return x + (next_time - time) * velocity, None

    else:
        eta = 1.0 if config.method == "ddpm" else config.eta
        times, alpha_bars, previous = _ddim_schedule(model_config, config.num_steps)
        per_step = (times, alpha_bars, previous, jax.random.split(step_key, config.num_steps))

        def step(x, inputs):
            time, alpha_bar, alpha_bar_prev, noise_key = inputs
            prediction = model(x, jnp.full((batch,), time), prompt_ids)
            noise = jax.random.normal(noise_key, x.shape, x.dtype)
            return _ddim_update(
                x,
                prediction,
                alpha_bar,
                alpha_bar_prev,
                noise,
                eta,
                config.clip_denoised,
                model_config.prediction,
            ), None

    split = config.num_steps - grad_steps
    x = jax.random.normal(init_key, shape, jnp.float32)
    if split:
        x, _ = jax.lax.scan(step, x, jax.tree.map(lambda a: a[:split], per_step))
        x = jax.lax.stop_gradient(x)
    if grad_steps:
        x, _ = jax.lax.scan(step, x, jax.tree.map(lambda a: a[split:], per_step))
    return x


def _sample_from_state(
    graphdef: nnx.GraphDef, state: nnx.State, prompt_ids: Array, key: Array, config: SamplerConfig
) -> Array:
    return sample(nnx.merge(graphdef, state), prompt_ids, key, config)


# Exposed so callers can sample from parameters they hold (a train state's) without re-splitting.
sample_jit = jax.jit(_sample_from_state, static_argnames="config")


def generate(
    model: Denoiser, prompt_ids: Array, key: Array, config: SamplerConfig = SamplerConfig()
) -> Array:
    """Compiled :func:`sample` from a module: ``[batch, H, W, C]`` images in (about) [-1, 1]."""
    graphdef, state = nnx.split(model)
    return sample_jit(graphdef, state, jnp.asarray(prompt_ids, jnp.int32), key, config)
