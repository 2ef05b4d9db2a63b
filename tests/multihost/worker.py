"""One JAX process of a multi-process training run on CPU, for tests/multihost.

``python -m tests.multihost.worker OUT PROCESSES PROCESS_ID PORT`` trains every family in
``RUNS`` for ``STEPS`` steps on each mesh of ``MESHES`` (4 devices in all: 2 per process with 2
processes, 4 in one) and process 0 writes ``OUT`` (``.npz``: each run's losses and final
parameters). The global batch of step ``s`` is the same for any process count: with 2 processes
each host feeds its half (examples ``h * B/2 ..``), as the loaders shard data by host, and the
one-process run feeds the merged batch (:func:`~jaxpref.train.batches.merge_host_batches`).
"""

from __future__ import annotations

import os
import sys

DEVICES = 4


def _start(processes: int, process_id: int, port: int) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES // processes}"
    import jax

    if processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=processes,
            process_id=process_id,
            initialization_timeout=60,
        )


def main(out: str, processes: int, process_id: int, port: int) -> None:
    _start(processes, process_id, port)
    import jax
    import numpy as np
    import optax
    from flax import nnx
    from jax.experimental import multihost_utils

    from jaxpref.models import Decoder, RewardModel
    from jaxpref.models.packing import pack_sequences, prefix_shared_groups, prefix_shared_pairs
    from jaxpref.objectives import objective
    from jaxpref.sharding import make_mesh
    from jaxpref.train import build_step
    from jaxpref.train.batches import merge_host_batches
    from jaxpref.train.families import as_family
    from tests.train.helpers import CONFIG, ROW_LENGTH

    examples, steps = 8, 3

    def tokens(rng, low, high):
        return rng.integers(1, CONFIG.vocab_size, int(rng.integers(low, high + 1))).tolist()

    def host_batch(kind: str, step: int, host: int) -> dict:
        """Host ``host``'s half of step ``step``'s global batch of ``examples`` examples."""
        rng = np.random.default_rng(1000 * step + 7)
        prompts = [tokens(rng, 2, 5) for _ in range(examples)]
        responses = [[tokens(rng, 1, 4) for _ in range(3)] for _ in range(examples)]
        half = slice(host * examples // 2, (host + 1) * examples // 2)
        prompts, responses = prompts[half], responses[half]
        if kind == "sft":
            masks = [[0] * len(p) + [1] * len(r[0]) for p, r in zip(prompts, responses)]
            sequences = [p + r[0] for p, r in zip(prompts, responses)]
            return dict(pack_sequences(sequences, masks, ROW_LENGTH, num_rows=len(prompts))._asdict())
        if kind == "listwise":
            batch = prefix_shared_groups(prompts, responses, ROW_LENGTH, num_responses=3)._asdict()
            scores = rng.normal(size=(examples, 3)).astype(np.float32)[half]
            return {**batch, "scores": scores, "response_mask": np.ones_like(scores, bool)}
        chosen, rejected = [r[0] for r in responses], [r[1] for r in responses]
        return dict(prefix_shared_pairs(prompts, chosen, rejected, ROW_LENGTH)._asdict())

    runs = {
        "sft": (Decoder, None, "sft", "none"),
        "dpo": (Decoder, objective("sigmoid", beta=0.5), "pairwise", "frozen"),
        "reward": (RewardModel, objective("bradley_terry"), "reward", "none"),
        "listwise": (Decoder, objective("lipo_lambda", beta=0.5), "listwise", "frozen"),
    }
    results = {}
    for mesh_name, shape in (("data2_fsdp2", (2, 2)), ("fsdp4", (1, 4))):
        mesh = make_mesh(data=shape[0], fsdp=shape[1])
        for name, (model_class, loss, family, reference) in runs.items():
            step = build_step(
                model_class(CONFIG, rngs=nnx.Rngs(0)),
                loss,
                optax.sgd(0.1),  # Adam would magnify rounding-level gradient differences
                mesh,
                family=family,
                reference=reference,
            )
            state, losses = step.init(), []
            kind = name if name in ("sft", "listwise") else "pairs"
            for s in range(steps):
                hosts = [host_batch(kind, s, h) for h in range(2)]
                groups = as_family(family).sequences_per_example(hosts[0])
                batch = hosts[process_id] if processes > 1 else merge_host_batches(hosts, groups)
                state, metrics = step(state, batch)
                losses.append(float(metrics["loss"]))
            params = multihost_utils.process_allgather(state.params, tiled=True)
            results[f"{mesh_name}/{name}/losses"] = np.array(losses)
            for i, leaf in enumerate(jax.tree.leaves(params)):
                results[f"{mesh_name}/{name}/param{i}"] = np.asarray(leaf)
    if process_id == 0:
        np.savez(out, **results)
    if processes > 1:
        multihost_utils.sync_global_devices("done")  # nobody exits while a peer still needs it


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
