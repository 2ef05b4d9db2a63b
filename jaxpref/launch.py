"""``jaxpref launch --processes N -- <subcommand> ...``: N local JAX processes of one run.

For trying a multi-host run on one machine (and for tests): each process runs ``jaxpref
<subcommand> ... --distributed`` on CPU with ``--devices-per-process`` host devices, told its place
through ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (what ``--distributed``
reads where JAX cannot detect the cluster itself), and they exchange data through gloo. When one
process fails, the others are stopped at once and the launcher exits with the failed one's status,
naming it, instead of leaving them waiting in a collective.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

GRACE_S = 10.0  # how long a stopped peer may take to exit before it is killed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command_line: Sequence[str], processes: int, devices_per_process: int) -> int:
    """Runs ``jaxpref <command_line> --distributed`` in ``processes`` local processes; their status."""
    if processes < 1 or devices_per_process < 1:
        raise ValueError(
            f"`--processes`={processes} and `--devices-per-process`={devices_per_process} must be >= 1."
        )
    if not command_line:
        raise ValueError("Give the run after `--`, e.g. `jaxpref launch --processes 2 -- dpo --data prefs.jsonl`.")
    address = f"127.0.0.1:{_free_port()}"
    workers = []
    for index in range(processes):
        env = {
            **os.environ,
            "JAX_COORDINATOR_ADDRESS": address,
            "JAX_NUM_PROCESSES": str(processes),
            "JAX_PROCESS_ID": str(index),
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices_per_process}",
        }
        command = [sys.executable, "-m", "jaxpref.cli", *command_line, "--distributed"]
        workers.append(subprocess.Popen(command, env=env))
    try:
        while True:
            codes = [w.poll() for w in workers]
            failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                index, code = failed[0]
                print(f"jaxpref launch: process {index} exited with status {code}; stopping the others", file=sys.stderr)
                return code if code > 0 else 128 - code  # -9 (killed) -> 137, as a shell reports it
            if all(code == 0 for code in codes):
                return 0
            time.sleep(0.2)
    finally:
        _stop(workers)


def _stop(workers: list[subprocess.Popen]) -> None:
    running = [w for w in workers if w.poll() is None]
    for w in running:
        w.terminate()
    deadline = time.monotonic() + GRACE_S
    for w in running:
        try:
            w.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()
