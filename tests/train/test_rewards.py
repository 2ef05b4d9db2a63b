"""Reward functions: the sorting checkers, lookup by name, and a reward model (one head or an
ensemble) scoring padded rollouts exactly as it scores each unpadded sequence."""

import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref.data.synthetic import hidden_reward
from jaxpref.models.decoder import Decoder
from jaxpref.models.heads import RewardModel
from jaxpref.train.rewards import (
    BUNDLED,
    resolve_reward_fn,
    reward_model_reward,
    sorting_exact,
    sorting_partial,
)

from .helpers import CONFIG


def test_sorting_checkers():
    prompts = ["3141>", "3141>", "3141>", "9>"]
    completions = ["1134", "1143", "11345", ""]
    assert sorting_exact(prompts=prompts, completions=completions) == [1.0, 0.0, 0.0, 0.0]
    assert sorting_partial(prompts=prompts, completions=completions) == [
        hidden_reward(p, c) for p, c in zip(prompts, completions)
    ]
    assert sorting_partial(prompts=prompts, completions=completions)[1] == 0.5


def test_reward_functions_are_found_by_name():
    assert resolve_reward_fn("sorting_exact") is BUNDLED["sorting_exact"]
    assert resolve_reward_fn("jaxpref.data.synthetic:hidden_reward") is hidden_reward
    with pytest.raises(ValueError, match="Unknown reward function 'exact'"):
        resolve_reward_fn("exact")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        resolve_reward_fn("jaxpref.train.rewards:nope")


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """The current folder is ``tmp_path``, and not on ``sys.path``: as for the ``jaxpref`` console
    script. Modules imported from it are forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", ".", str(tmp_path))])
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("cwd_"):
            del sys.modules[name]


def test_reward_module_in_the_current_folder_is_found(user_folder):
    (user_folder / "cwd_helpers.py").write_text("BONUS = 2.0\n")
    (user_folder / "cwd_rewards.py").write_text(
        "from cwd_helpers import BONUS\n\ndef fn(completions, **kwargs):\n    return [BONUS] * len(completions)\n"
    )
    path = list(sys.path)
    fn = resolve_reward_fn("cwd_rewards:fn")
    assert fn(completions=["a", "b"]) == [2.0, 2.0]
    assert sys.path == path  # the current folder was on it only for the import

    with pytest.raises(
        ValueError, match=rf"no module 'cwd_missing' in the current folder \({user_folder}\).*run from"
    ):
        resolve_reward_fn("cwd_missing:fn")
    (user_folder / "cwd_broken.py").write_text("import cwd_not_installed\n")
    with pytest.raises(ValueError, match="importing cwd_broken failed: No module named 'cwd_not_installed'"):
        resolve_reward_fn("cwd_broken:fn")


def test_reward_function_from_a_file_path(user_folder):
    (user_folder / "sub").mkdir()
    (user_folder / "sub" / "cwd_sibling.py").write_text("SCALE = 3.0\n")
    (user_folder / "sub" / "cwd_file_rewards.py").write_text(
        "from cwd_sibling import SCALE\n\ndef fn(completions, **kwargs):\n    return [SCALE * len(c) for c in completions]\n"
    )
    fn = resolve_reward_fn("sub/cwd_file_rewards.py:fn")
    assert fn(completions=["ab"]) == [6.0]
    assert resolve_reward_fn("sub/cwd_file_rewards.py:fn") is fn  # imported once
    with pytest.raises(ValueError, match="has no function 'nope'"):
        resolve_reward_fn("sub/cwd_file_rewards.py:nope")
    with pytest.raises(ValueError, match=r"no file .*sub/cwd_none.py"):
        resolve_reward_fn("sub/cwd_none.py:fn")


ROLLOUT = dict(  # two sequences of 6 tokens, split 3 + 3 and 1 + 5: left- and right-padding differ per row
    prompt_ids=np.array([[5, 6, 7], [0, 0, 8]], np.int32),
    prompt_mask=np.array([[1, 1, 1], [0, 0, 1]], np.int32),
    completion_ids=np.array([[9, 10, 2, 0, 0], [11, 12, 13, 14, 2]], np.int32),
    completion_mask=np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32),
    prompts=None,
)
UNPADDED = jnp.asarray([[5, 6, 7, 9, 10, 2], [8, 11, 12, 13, 14, 2]])  # [2, 6], no padding at all


def test_reward_model_scores_padded_rollouts_like_unpadded_sequences():
    model = RewardModel(CONFIG, rngs=nnx.Rngs(0))
    got = reward_model_reward(model, batch_size=2, buckets=(8,))(**ROLLOUT)
    want = nnx.jit(lambda model, ids: model(ids))(model, UNPADDED)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must be a jaxpref.models.heads.RewardModel"):
        reward_model_reward(Decoder(CONFIG, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="`method`='median'"):
        reward_model_reward(model, ensemble_method="median")


def test_an_ensemble_reward_model_gives_the_aggregate_of_its_heads():
    model = RewardModel(CONFIG, rngs=nnx.Rngs(0), num_labels=3)
    heads = np.asarray(nnx.jit(lambda model, ids: model(ids))(model, UNPADDED))  # [2, 3]
    for method, want in (("mean", heads.mean(axis=1)), ("min", heads.min(axis=1))):
        got = reward_model_reward(model, ensemble_method=method, batch_size=2, buckets=(8,))(**ROLLOUT)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    uwo = reward_model_reward(
        model, ensemble_method="uwo", uncertainty_coefficient=0.5, batch_size=2, buckets=(8,)
    )(**ROLLOUT)
    np.testing.assert_allclose(uwo, heads.mean(axis=1) - 0.5 * heads.var(axis=1), rtol=1e-5, atol=1e-6)
