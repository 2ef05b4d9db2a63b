"""Orbax checkpoints: the whole TrainState and the data position, restored into a sharded layout."""

import jax
import numpy as np
import optax
from flax import nnx

from jaxpref.models.decoder import Decoder
from jaxpref.objectives import objective
from jaxpref.sharding import make_mesh
from jaxpref.train import build_step, make_checkpoint_manager, restore_checkpoint, save_checkpoint

from .helpers import CONFIG, single_device_mesh


def init_state(mesh, seed):
    model = Decoder(CONFIG, rngs=nnx.Rngs(seed))
    train_step = build_step(model, objective("sigmoid"), optax.adamw(1e-3), mesh)
    return train_step.init(seed=seed)


def test_restore_into_another_sharded_layout(tmp_path):
    saved = init_state(single_device_mesh(), seed=0)
    manager = make_checkpoint_manager(tmp_path)
    assert restore_checkpoint(manager, saved) is None  # nothing saved yet
    assert save_checkpoint(manager, 7, saved, {"position": 7, "epoch": 1}, force=True)
    manager.wait_until_finished()

    # A fresh state with other weights on a (2, 2, 2) mesh is only the target layout.
    target = init_state(make_mesh(data=2, fsdp=2, tensor=2), seed=1)
    restored, data_state = restore_checkpoint(make_checkpoint_manager(tmp_path), target)
    assert data_state == {"position": 7, "epoch": 1}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(saved))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert got.sharding == want.sharding
    q_kernel = restored.params["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_keeps_the_last_checkpoints_at_the_save_interval(tmp_path):
    state = init_state(single_device_mesh(), seed=0)
    manager = make_checkpoint_manager(tmp_path, max_to_keep=2, save_interval_steps=2)
    saved = [step for step in range(1, 8) if save_checkpoint(manager, step, state, {"position": step})]
    manager.wait_until_finished()
    assert saved == [2, 4, 6]
    assert manager.all_steps() == [4, 6]
    _, data_state = restore_checkpoint(manager, state)
    assert data_state == {"position": 6}
