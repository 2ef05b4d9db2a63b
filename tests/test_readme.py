"""The README's objective example runs as printed."""

import pathlib
import re

import jax.numpy as jnp

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make demo", "make test"]


def test_readme_composition_example_runs():
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len(block.strip().splitlines()) == 3
    namespace = {
        "pc": jnp.array([-4.0, -7.0]),
        "pr": jnp.array([-6.0, -5.0]),
        "rc": jnp.array([-5.0, -6.0]),
        "rr": jnp.array([-5.0, -6.0]),
        "lc": jnp.array([3, 4]),
    }
    exec(block, namespace)
    losses, metrics = namespace["losses"], namespace["metrics"]
    assert losses.shape == (2,)
    assert jnp.allclose(losses, metrics["loss/sigmoid"] + 0.2 * metrics["loss/sft"])


def test_readme_notebook_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    notebook = next(b for b in blocks if b.startswith("# notebook example"))
    namespace = {}
    exec(notebook, namespace)
    assert jnp.isfinite(namespace["metrics"]["loss"])
