"""Test-session setup that must happen before JAX initialises its backends."""

import os

# Eight host CPU devices, so sharding tests can build (2, 2, 2) meshes on any machine (tests that do
# not ask for a mesh run on device 0 as usual). Deterministic GPU kernels (a no-op on CPU): tests
# compare resumed runs bit for bit and expect exact zeros from equal policy and reference weights,
# which XLA's GPU reductions and scatters with atomics do not give. Both are added to any XLA_FLAGS.
_xla_flags = os.environ.get("XLA_FLAGS", "").split()
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_gpu_deterministic_ops=true"):
    if not any(flag.startswith(_flag.split("=")[0] + "=") for flag in _xla_flags):
        _xla_flags.append(_flag)
os.environ["XLA_FLAGS"] = " ".join(_xla_flags)
# Full float32 matmuls: on GPUs JAX's default precision may use TF32, and the tests compare against
# float32/float64 references at tolerances meant for float32 arithmetic.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
