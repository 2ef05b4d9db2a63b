"""The shapes task: prompt tokens, the training distribution, the hidden reward on hand-made images
(scores recomputed from their definitions), its differentiable surrogate, diversity and the
checkpointable batch iterator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.data.images import (
    COLOURS,
    HELD_OUT_PROMPTS,
    SHAPES,
    ArrayBatches,
    ShapesTask,
    all_prompts,
    decode_prompt,
    encode_prompts,
    hidden_reward,
    mean_pairwise_distance,
    reward_components,
    surrogate_reward,
    to_model_space,
    train_prompts,
)

RED = np.array(COLOURS["red"])
RED_SQUARE = encode_prompts([("red", "square")])


def canvas(top: int, left: int, height: int, width: int, colour=RED) -> np.ndarray:  # [1, 16, 16, 3]
    """A hand-made image: one axis-aligned rectangle of ``colour`` on black."""
    image = np.zeros((1, 16, 16, 3), np.float32)
    image[0, top : top + height, left : left + width] = colour
    return image


def scores(images, prompts, **kwargs) -> dict[str, float]:
    return {k: float(v[0]) for k, v in reward_components(images, prompts, **kwargs).items()}


def test_prompt_tokens_round_trip():
    ids = encode_prompts(all_prompts())
    assert ids.shape == (len(COLOURS) * len(SHAPES), 2) and ids.min() == 1
    assert [decode_prompt(row) for row in ids] == [f"{c} {s}" for c, s in all_prompts()]
    assert set(train_prompts()) | set(HELD_OUT_PROMPTS) == set(all_prompts())
    assert not set(train_prompts()) & set(HELD_OUT_PROMPTS)
    with pytest.raises(ValueError, match="prompts"):
        encode_prompts([("purple", "circle")])


def test_centred_square_scores_by_the_definitions():
    image = canvas(4, 4, 8, 8)  # 8x8 pixels around the centre (7.5, 7.5): a square of half-side 4
    radius = np.sqrt(64 / (4 * 0.85**2))  # the radius whose square has 64 pixels
    expected = {"colour": 1.0, "shape": 1.0, "centred": 1.0, "size": np.exp(-(((radius - 4.0) / 1.5) ** 2))}
    assert scores(image, RED_SQUARE) == pytest.approx(expected, rel=1e-5)
    assert hidden_reward(image, RED_SQUARE)[0] == pytest.approx(np.mean(list(expected.values())), rel=1e-5)


def test_wrong_colour_shape_and_placement_lower_their_scores():
    image = canvas(4, 4, 8, 8)
    blue_square, red_triangle = encode_prompts([("blue", "square"), ("red", "triangle")])[
        :, None
    ]  # [1, 2] each
    distance = np.linalg.norm(RED - np.array(COLOURS["blue"]))
    assert scores(image, blue_square)["colour"] == pytest.approx(np.exp(-((distance / 0.3) ** 2)), rel=1e-4)
    assert scores(image, red_triangle)["shape"] == 0.0
    shifted = canvas(4, 7, 8, 8)  # three pixels right of the centre
    assert scores(shifted, RED_SQUARE)["centred"] == pytest.approx(np.exp(-1.0), rel=1e-5)


def test_rendered_shapes_are_recognised_and_an_empty_image_scores_zero():
    task = ShapesTask()
    prompts = encode_prompts(all_prompts())
    count = len(prompts)
    ideal = task.render(prompts[:, 0] - 1, prompts[:, 1] - 5, np.full((count, 2), 7.5), np.full(count, 4.0))
    components = reward_components(ideal, prompts)
    np.testing.assert_array_equal(components["shape"], 1.0)
    assert np.all(hidden_reward(ideal, prompts) > 0.9)
    empty = np.zeros((1, 16, 16, 3), np.float32)
    assert scores(empty, RED_SQUARE) == {"colour": 0.0, "shape": 0.0, "centred": 0.0, "size": 0.0}


def test_training_distribution_has_noisy_captions_and_room_to_improve():
    task = ShapesTask()
    data = task.dataset(train_prompts(), 2048, seed=0)
    assert data["images"].shape == (2048, 16, 16, 3) and data["images"].min() >= -1.0
    assert {decode_prompt(p) for p in data["prompt_ids"]} == {f"{c} {s}" for c, s in train_prompts()}
    rewards = hidden_reward((data["images"] + 1) / 2, data["prompt_ids"])
    assert 0.4 < rewards.mean() < 0.8 and rewards.max() > 0.9
    colour = reward_components((data["images"] + 1) / 2, data["prompt_ids"])["colour"]
    assert np.mean(colour < 0.1) == pytest.approx(task.colour_noise, abs=0.04)  # the recoloured share
    again = task.dataset(train_prompts(), 2048, seed=0)
    np.testing.assert_array_equal(again["images"], data["images"])


def test_surrogate_is_close_to_the_hidden_reward_and_differentiable():
    task = ShapesTask()
    data = task.dataset(train_prompts(), 256, seed=1)
    hidden = hidden_reward((data["images"] + 1) / 2, data["prompt_ids"])
    surrogate = np.asarray(surrogate_reward(data["images"], data["prompt_ids"], temperature=0.02))
    assert np.corrcoef(hidden, surrogate)[0, 1] > 0.9
    grads = jax.grad(lambda x: surrogate_reward(x, data["prompt_ids"][:4]).sum())(
        jnp.asarray(data["images"][:4])
    )
    assert bool(jnp.all(jnp.isfinite(grads))) and float(jnp.abs(grads).sum()) > 0


def test_bad_inputs_raise_naming_the_argument():
    with pytest.raises(ValueError, match="images"):
        reward_components(np.zeros((1, 8, 8, 3)), RED_SQUARE)
    with pytest.raises(ValueError, match="prompts"):
        reward_components(np.zeros((2, 16, 16, 3)), RED_SQUARE)
    with pytest.raises(ValueError, match="temperature"):
        reward_components(np.zeros((1, 16, 16, 3)), RED_SQUARE, temperature=0.0)
    with pytest.raises(ValueError, match="images"):
        mean_pairwise_distance(np.zeros((1, 4)))


def test_mean_pairwise_distance_is_the_rms_difference():
    images = np.array([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    pairs = [np.sqrt(np.mean((a - b) ** 2)) for i, a in enumerate(images) for b in images[i + 1 :]]
    assert mean_pairwise_distance(images) == pytest.approx(np.mean(pairs))
    assert mean_pairwise_distance(np.ones((3, 2, 2))) == 0.0


def test_array_batches_reshuffle_every_epoch_and_resume():
    arrays = {"x": np.arange(10), "y": -np.arange(10)}
    batches = ArrayBatches(arrays, 4, seed=0)
    served = [next(batches) for _ in range(5)]  # two whole batches per epoch
    assert all(np.array_equal(b["y"], -b["x"]) for b in served)
    assert len(set(np.concatenate([b["x"] for b in served[:2]]))) == 8
    assert not np.array_equal(served[0]["x"], served[2]["x"])
    resumed = ArrayBatches(arrays, 4, seed=0)
    resumed.set_state({"position": 3})
    np.testing.assert_array_equal(next(resumed)["x"], served[3]["x"])
    with pytest.raises(ValueError, match="batch_size"):
        ArrayBatches(arrays, 11)
    with pytest.raises(ValueError, match="same length"):
        ArrayBatches({"x": np.arange(3), "y": np.arange(4)}, 2)


def test_images_in_model_space():
    assert to_model_space(np.array([0.0, 0.5, 1.0])).tolist() == [-1.0, 0.0, 1.0]
