"""The README's objective example runs as printed."""

import math
import pathlib
import re

import jax.numpy as jnp
import numpy as np

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
    # By hand: DPO logits beta * ((pc - rc) - (pr - rr)) = 0.1 * (1 + 1) and 0.1 * (-1 - 1); loss
    # log(1 + e^-z). TRL's sft term is the batch's token-mean NLL of chosen, (4 + 7) / (3 + 4), per pair.
    sft = 11.0 / 7.0
    expected = [math.log1p(math.exp(-0.2)) + 0.2 * sft, math.log1p(math.exp(0.2)) + 0.2 * sft]
    np.testing.assert_allclose(losses, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss/sft"], [sft, sft], rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/margins"], [0.2, -0.2], rtol=1e-6)


def test_readme_notebook_example_runs_and_learns():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    notebook = next(b for b in blocks if b.startswith("# notebook example"))
    namespace = {}
    exec(notebook, namespace)
    train_step, batch = namespace["train_step"], namespace["pairs"]._asdict()
    _, first = train_step(train_step.init(), batch)
    # The first step's policy is its own reference: DPO's term is exactly ln 2. Three Adam steps on the
    # same two pairs lower the loss and rank both chosen responses first.
    np.testing.assert_allclose(first["loss/sigmoid"], math.log(2.0), atol=1e-6)
    assert float(namespace["metrics"]["loss"]) < float(first["loss"]) - 1e-3
    assert float(namespace["metrics"]["rewards/accuracies"]) == 1.0
