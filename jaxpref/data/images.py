r"""A bundled image task with a hidden reward: coloured shapes drawn from prompts like "red circle".

Images are ``16 x 16`` RGB, one shape on a black background, rendered procedurally with NumPy from
signed distance functions (no downloads). A prompt is a colour and a shape, tokenised as two ids
(:func:`prompt_ids`): colour ``c`` is token ``1 + c``, shape ``s`` token ``1 + len(COLOURS) + s``,
and 0 is kept for padding, so a denoiser embeds them like a two-word text prompt.

:meth:`ShapesTask.sample` draws the *training distribution* of a generator: the shape's centre and
size vary uniformly, and the captions are noisy (a share of the images shows another colour or
another shape than the prompt says), so a model trained to imitate it leaves room for preference
optimisation. The **hidden reward** (:func:`hidden_reward`, in [0, 1]) averages four scores of an
image against its prompt:

- ``colour``: :math:`\exp(-(d/0.3)^2)`, :math:`d` the distance from the mean foreground colour
  to the prompt's colour (RGB in [0, 1]; anti-aliased edges darken the mean a little);
- ``shape``: 1 when, among the three shapes rendered at the foreground's centroid and area, the
  prompt's overlaps the foreground best (intersection over union), else 0;
- ``centred``: :math:`\exp(-(d/3)^2)`, :math:`d` the centroid's distance in pixels from the image
  centre;
- ``size``: :math:`\exp(-(\Delta r/1.5)^2)`, :math:`\Delta r` the gap between the shape's radius
  (from the foreground area) and ``target_radius``.

The foreground is the pixels whose brightest channel exceeds ``FOREGROUND_THRESHOLD``; an image
with (almost) none scores 0. :func:`surrogate_reward` is the same computation with the threshold
and the shape's arg-max relaxed into sigmoids and a softmax: a differentiable reward model for
reward-gradient fine-tuning (DRaFT, AlignProp), which the hidden reward then judges.

Images are ``[N, 16, 16, 3]`` float32: in [0, 1] for rendering and rewards, in [-1, 1]
(:func:`to_model_space`) for the denoisers.

>>> import numpy as np
>>> task = ShapesTask()
>>> ideal = task.render(np.array([0]), np.array([0]), np.array([[7.5, 7.5]]), np.array([4.0]))
>>> ideal.shape
(1, 16, 16, 3)
>>> components = reward_components(ideal, prompt_ids(np.array([0]), np.array([0])), task)
>>> {name: round(float(value[0]), 2) for name, value in sorted(components.items())}  # the ideal image
{'centred': 1.0, 'colour': 0.97, 'shape': 1.0, 'size': 1.0}
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.85, 0.1),
}
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 16
VOCAB_SIZE = 1 + len(COLOURS) + len(SHAPES)  # padding, colours, shapes
FOREGROUND_THRESHOLD = 0.4
# Area of each shape at radius 1 (square: half-side 0.85 r; triangle: apex 1.2 r above the centre,
# base 2r wide 0.6 r below it, so that the centre is its centroid), so a foreground's area gives
# its radius.
SHAPE_AREAS = np.array([np.pi, 4 * 0.85**2, 1.8])
_TRIANGLE_SLOPE = 1.8  # height / half-base of the triangle
REWARD_COMPONENTS = ("colour", "shape", "centred", "size")
# Prompts left out of preference fine-tuning (pretraining sees every prompt): evaluation prompts.
HELD_OUT_PROMPTS = (("green", "triangle"), ("blue", "square"), ("yellow", "circle"))


def all_prompts() -> list[tuple[str, str]]:
    return [(colour, shape) for colour in COLOURS for shape in SHAPES]


def train_prompts() -> list[tuple[str, str]]:
    return [prompt for prompt in all_prompts() if prompt not in HELD_OUT_PROMPTS]


def prompt_ids(colour_ids: np.ndarray, shape_ids: np.ndarray) -> np.ndarray:  # [N], [N] -> [N, 2] int32
    """Token ids of prompts given as colour and shape indices (into ``COLOURS`` and ``SHAPES``)."""
    return np.stack([1 + np.asarray(colour_ids), 1 + len(COLOURS) + np.asarray(shape_ids)], -1).astype(
        np.int32
    )


def encode_prompts(prompts: Sequence[tuple[str, str]]) -> np.ndarray:  # -> [N, 2] int32
    """Token ids of ``(colour, shape)`` name pairs, e.g. ``[("red", "circle")]``."""
    unknown = [p for p in prompts if p[0] not in COLOURS or p[1] not in SHAPES]
    if unknown:
        raise ValueError(
            f"`prompts` {unknown[:3]} name unknown colours or shapes; colours: {list(COLOURS)}, "
            f"shapes: {list(SHAPES)}."
        )
    colours, shapes = list(COLOURS), list(SHAPES)
    return prompt_ids(
        np.array([colours.index(c) for c, _ in prompts]), np.array([shapes.index(s) for _, s in prompts])
    )


def decode_prompt(ids: Sequence[int]) -> str:
    """``"red circle"`` from its two token ids."""
    return f"{list(COLOURS)[int(ids[0]) - 1]} {SHAPES[int(ids[1]) - 1 - len(COLOURS)]}"


def to_model_space(images: Any) -> Any:
    """[0, 1] pixels to the denoisers' [-1, 1]."""
    return 2.0 * images - 1.0


def to_pixel_space(images: Any) -> Any:
    """The denoisers' [-1, 1] back to [0, 1] pixels (clipped)."""
    return (images.clip(-1.0, 1.0) + 1.0) / 2.0


def _pixel_grid(xp) -> tuple[Any, Any]:  # ([16, 16] x, [16, 16] y): pixel centres, y pointing down
    coordinates = xp.arange(IMAGE_SIZE, dtype=xp.float32)
    return coordinates[None, :], coordinates[:, None]


def shape_distances(xp, centres: Any, radii: Any) -> Any:  # [N, 2], [N] -> [N, shapes, 16, 16]
    """Signed distance (pixels, negative inside) of every pixel to each shape at each centre and radius.

    ``xp`` is ``numpy`` (rendering) or ``jax.numpy`` (rewards): one definition serves both.
    """
    x, y = _pixel_grid(xp)
    dx = x[None] - centres[:, 0, None, None]  # [N, 16, 16]
    dy = y[None] - centres[:, 1, None, None]
    r = radii[:, None, None]
    circle = xp.sqrt(dx**2 + dy**2) - r
    square = xp.maximum(xp.abs(dx), xp.abs(dy)) - 0.85 * r
    # Upward triangle: below the base line or outside either slanted side (Lipschitz-normalised).
    slant = (_TRIANGLE_SLOPE * xp.abs(dx) - (dy + 1.2 * r)) / np.hypot(_TRIANGLE_SLOPE, 1.0)
    triangle = xp.maximum(dy - 0.6 * r, slant)
    return xp.stack([circle, square, triangle], axis=1)


@dataclasses.dataclass(frozen=True)
class ShapesTask:
    """The training distribution of the shapes task and the hidden reward's aesthetic targets.

    Attributes:
      radius_range: shape radii are uniform in it (pixels).
      centre_range: each centre coordinate is uniform in it (the image centre is 7.5).
      colour_noise: share of training images whose colour is another one than the prompt's.
      shape_noise: share of training images whose shape is another one than the prompt's.
      shade_jitter: each colour channel moves by up to this much, uniformly.
      target_radius: the radius the hidden reward's ``size`` score prefers.
    """

    radius_range: tuple[float, float] = (2.0, 6.0)
    centre_range: tuple[float, float] = (3.5, 11.5)
    colour_noise: float = 0.25
    shape_noise: float = 0.15
    shade_jitter: float = 0.05
    target_radius: float = 4.0

    def render(
        self,
        colour_ids: np.ndarray,  # [N] int, indices into COLOURS
        shape_ids: np.ndarray,  # [N] int, indices into SHAPES
        centres: np.ndarray,  # [N, 2] float (x, y) pixels
        radii: np.ndarray,  # [N] float pixels
        shades: np.ndarray | None = None,  # [N, 3] RGB in [0, 1]; default the palette's colours
    ) -> np.ndarray:  # [N, 16, 16, 3] float32 in [0, 1]
        """Anti-aliased shapes: a pixel's coverage ramps linearly over one pixel across the edge."""
        distances = shape_distances(np, np.asarray(centres, np.float32), np.asarray(radii, np.float32))
        own = np.take_along_axis(distances, np.asarray(shape_ids)[:, None, None, None], axis=1)[:, 0]
        coverage = np.clip(0.5 - own, 0.0, 1.0)  # [N, 16, 16]
        if shades is None:
            shades = np.array(list(COLOURS.values()))[np.asarray(colour_ids)]
        return (coverage[..., None] * np.asarray(shades)[:, None, None, :]).astype(np.float32)

    def sample(
        self, prompts: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:  # [N, 2] ids -> [N, 16, 16, 3] in [0, 1]
        """Training images for the prompts (token ids, :func:`prompt_ids`), noisy captions included."""
        count = len(prompts)
        colours = prompts[:, 0] - 1
        shapes = prompts[:, 1] - 1 - len(COLOURS)
        # A noisy caption shows another colour (shape): an offset of 1..n-1 never lands on the prompt's.
        recolour = rng.random(count) < self.colour_noise
        colours = np.where(recolour, (colours + rng.integers(1, len(COLOURS), count)) % len(COLOURS), colours)
        reshape = rng.random(count) < self.shape_noise
        shapes = np.where(reshape, (shapes + rng.integers(1, len(SHAPES), count)) % len(SHAPES), shapes)
        palette = np.array(list(COLOURS.values()))
        shades = np.clip(palette[colours] + rng.uniform(-1, 1, (count, 3)) * self.shade_jitter, 0.0, 1.0)
        centres = rng.uniform(*self.centre_range, (count, 2))
        radii = rng.uniform(*self.radius_range, count)
        return self.render(colours, shapes, centres, radii, shades)

    def dataset(
        self, prompts: Sequence[tuple[str, str]], count: int, seed: int
    ) -> dict[str, np.ndarray]:  # {"images": [count, 16, 16, 3] in [-1, 1], "prompt_ids": [count, 2]}
        """``count`` training examples, the prompts drawn uniformly from ``prompts``."""
        rng = np.random.default_rng(seed)
        ids = encode_prompts(prompts)[rng.integers(0, len(prompts), count)]
        return {"images": to_model_space(self.sample(ids, rng)), "prompt_ids": ids}


def reward_components(
    images: Any,  # [N, 16, 16, 3] in [0, 1]
    prompts: Any,  # [N, 2] token ids
    task: ShapesTask = ShapesTask(),
    *,
    temperature: float | None = None,
) -> dict[str, Array]:  # name -> [N] in [0, 1]
    r"""The hidden reward's four scores (see the module docstring), each ``[N]`` in [0, 1].

    ``temperature=None`` is the hidden reward: a hard foreground threshold and the best-overlapping
    shape. A positive ``temperature`` relaxes both (foreground weight
    :math:`\sigma((b - 0.4)/\tau)` of the brightness :math:`b`, shape templates
    :math:`\sigma(-\mathrm{sdf}/(10\tau))`, a softmax over the shapes' overlaps at temperature
    :math:`\tau`) into a differentiable surrogate.
    """
    images = jnp.asarray(images, jnp.float32)
    prompts = jnp.asarray(prompts)
    if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"`images` must be [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], got shape {images.shape}.")
    if prompts.shape != (images.shape[0], 2):
        raise ValueError(f"`prompts` must be [N, 2] = [{images.shape[0]}, 2] token ids, got {prompts.shape}.")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"`temperature`={temperature!r} must be positive (or None: the hidden reward).")
    return _components(images, prompts, float(task.target_radius), temperature)


@functools.partial(jax.jit, static_argnames=("target_radius", "temperature"))
def _components(
    images: Array, prompts: Array, target_radius: float, temperature: float | None
) -> dict[str, Array]:
    """:func:`reward_components` after its checks, compiled once per shape and setting."""
    colour_ids, shape_ids = prompts[:, 0] - 1, prompts[:, 1] - 1 - len(COLOURS)
    brightness = images.max(axis=-1)  # [N, 16, 16]
    if temperature is None:
        weights = (brightness > FOREGROUND_THRESHOLD).astype(jnp.float32)
    else:
        weights = jax.nn.sigmoid((brightness - FOREGROUND_THRESHOLD) / temperature)
    area = weights.sum(axis=(1, 2))  # [N]
    safe_area = jnp.maximum(area, 1e-6)
    mean_colour = jnp.einsum("nhw,nhwc->nc", weights, images) / safe_area[:, None]
    palette = jnp.asarray(list(COLOURS.values()), jnp.float32)
    colour = jnp.exp(-jnp.sum((mean_colour - palette[colour_ids]) ** 2, -1) / 0.3**2)

    x, y = _pixel_grid(jnp)
    centroid = (
        jnp.stack(
            [jnp.einsum("nhw,hw->n", weights, jnp.broadcast_to(c, weights.shape[1:])) for c in (x, y)], -1
        )
        / safe_area[:, None]
    )  # [N, 2]
    offset = jnp.sqrt(jnp.sum((centroid - (IMAGE_SIZE - 1) / 2) ** 2, -1) + 1e-12)
    centred = jnp.exp(-((offset / 3.0) ** 2))

    # Every shape at the foreground's centroid, with the radius that gives it the foreground's area.
    radii = jnp.sqrt(safe_area[:, None] / jnp.asarray(SHAPE_AREAS, jnp.float32))  # [N, shapes]
    own_radius = jnp.take_along_axis(radii, shape_ids[:, None], axis=1)[:, 0]
    size = jnp.exp(-(((own_radius - target_radius) / 1.5) ** 2))
    distances = jnp.stack(  # [N, shapes, 16, 16]: shape k at its own radius
        [shape_distances(jnp, centroid, radii[:, k])[:, k] for k in range(len(SHAPES))], axis=1
    )
    if temperature is None:
        templates = (distances < 0).astype(jnp.float32)  # [N, shapes, 16, 16]
    else:
        templates = jax.nn.sigmoid(-distances / (10 * temperature))
    overlap = jnp.sum(templates * weights[:, None], axis=(2, 3))
    iou = overlap / jnp.maximum(templates.sum(axis=(2, 3)) + area[:, None] - overlap, 1e-6)  # [N, shapes]
    if temperature is None:
        shape = (jnp.argmax(iou, axis=1) == shape_ids).astype(jnp.float32)
    else:
        shape = jnp.take_along_axis(jax.nn.softmax(iou / temperature, axis=1), shape_ids[:, None], 1)[:, 0]

    # An image without foreground (less than one pixel's worth) shows nothing: every score is 0.
    visible = area >= 1.0
    scores = dict(colour=colour, shape=shape, centred=centred, size=size)
    return {name: jnp.where(visible, score, 0.0) for name, score in scores.items()}


def hidden_reward(
    images: np.ndarray,  # [N, 16, 16, 3] in [0, 1]
    prompts: np.ndarray,  # [N, 2] token ids
    task: ShapesTask = ShapesTask(),
) -> np.ndarray:  # [N] float32 in [0, 1]
    """The mean of the four :func:`reward_components` of each image (as host floats)."""
    components = reward_components(images, prompts, task)
    return np.asarray(sum(components.values()) / len(components))


def surrogate_reward(
    images: Array,  # [N, 16, 16, 3] in [-1, 1] (model space)
    prompts: Array,  # [N, 2] token ids
    task: ShapesTask = ShapesTask(),
    *,
    temperature: float = 0.05,
) -> Array:  # [N]
    """The differentiable relaxation of :func:`hidden_reward`, on model-space images (see
    :func:`reward_components`); what reward-gradient fine-tuning maximises."""
    components = reward_components(to_pixel_space(images), prompts, task, temperature=temperature)
    return sum(components.values()) / len(components)


def mean_pairwise_distance(images: np.ndarray) -> float:  # [N, ...] -> scalar
    """Diversity: the mean over pairs of the root-mean-square pixel difference of two images."""
    flat = np.asarray(images, np.float64).reshape(len(images), -1)
    if len(flat) < 2:
        raise ValueError(f"`images` needs at least 2 images to compare, got {len(flat)}.")
    squared = np.sum(flat**2, 1)
    distances = np.sqrt(
        np.maximum(squared[:, None] + squared[None, :] - 2 * flat @ flat.T, 0.0) / flat.shape[1]
    )
    return float(distances[np.triu_indices(len(flat), 1)].mean())


class ArrayBatches:
    """An endless, checkpointable iterator of row batches from equal-length arrays.

    Every epoch is a permutation drawn from ``(seed, epoch)``; an epoch's last rows that do not
    fill a batch are skipped. The position (batches served) is saved and restored with
    ``get_state`` / ``set_state``, as grain's iterators, so :func:`jaxpref.train.loop.train`
    checkpoints and resumes it.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0):
        lengths = {key: len(value) for key, value in arrays.items()}
        if not lengths or len(set(lengths.values())) != 1:
            raise ValueError(f"`arrays` must hold at least one array, all of the same length; got {lengths}.")
        rows = next(iter(lengths.values()))
        if not isinstance(batch_size, int) or not 1 <= batch_size <= rows:
            raise ValueError(f"`batch_size`={batch_size!r} must be an int in [1, {rows}] (the rows).")
        self.arrays = {key: np.asarray(value) for key, value in arrays.items()}
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.position = 0

    def __iter__(self) -> ArrayBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, index = divmod(self.position, self.rows // self.batch_size)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.rows)
        rows = order[index * self.batch_size : (index + 1) * self.batch_size]
        self.position += 1
        return {key: value[rows] for key, value in self.arrays.items()}

    def get_state(self) -> dict[str, int]:
        return {"position": self.position}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.position = int(state["position"])
