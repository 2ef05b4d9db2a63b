"""Meshes and logical-axis sharding rules.

Parameters and activations are annotated with *logical* axis names (``"embed"``, ``"heads"``, ...);
one table maps them to the mesh axes ``data``, ``fsdp`` and ``tensor``. Users override the table,
never the model code.
"""

from jaxpref.sharding.rules import LOGICAL_AXIS_RULES, logical_sharding, make_mesh

__all__ = ["LOGICAL_AXIS_RULES", "logical_sharding", "make_mesh"]
