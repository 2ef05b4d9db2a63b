"""The logical-axis table and the helpers that turn logical axes into ``NamedSharding``s."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes it is split over (None = replicated). Read top to bottom; override by
# passing your own mapping.
LOGICAL_AXIS_RULES: Mapping[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "norm": None,
    "seq": None,
}


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (all devices of all hosts by default).

    One size may be -1: it takes the devices the others leave.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"At most one mesh axis size may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}."
        )
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"{len(devices)} devices cannot be split into data={data}, fsdp={fsdp}, tensor={tensor}."
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"Mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {len(devices)}."
        )
    # jax.make_mesh orders devices by the physical topology (TPU rings, GPU NVLink domains), so the
    # innermost axes (fsdp, tensor) land on the fastest links.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def logical_sharding(
    mesh: Mesh,
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    rules: Mapping[str, tuple[str, ...] | None] = LOGICAL_AXIS_RULES,
) -> NamedSharding:
    """``NamedSharding`` for an array of ``shape`` whose dimensions have ``logical_axes``.

    A dimension the mesh axes do not divide evenly is replicated instead (a 2-head model on a
    4-way tensor axis still loads), and a mesh axis is used at most once per array.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(
            f"`logical_axes` {tuple(logical_axes)} does not match the array rank of shape {tuple(shape)}."
        )
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        mesh_axes = (
            tuple(a for a in (rules.get(name) or ()) if a not in used and mesh.shape[a] > 1) if name else ()
        )
        split = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or size % split:
            if mesh_axes and name == "batch":
                # Every device would then compute the whole batch: correct, but no data parallelism.
                logger.warning(
                    "batch dimension %d is not divisible by mesh axes %s (%d); replicating it",
                    size,
                    mesh_axes,
                    split,
                )
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes if len(mesh_axes) > 1 else mesh_axes[0])
    return NamedSharding(mesh, PartitionSpec(*spec))
