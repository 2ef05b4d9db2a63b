"""Objective demo: the same preference data, many objectives, one table.

A synthetic task small enough to run in seconds on a CPU, where the truth is known:

- ``num_prompts`` prompts, each with ``num_responses`` candidate responses. Every response has a
  hidden reward and a length; longer responses get a small hidden bonus so length-aware objectives
  have something to push against.
- The reference policy (the "SFT model") is a softmax over random logits per prompt; the policy is
  initialised to it and trained. A response's sequence log-prob is its log-softmax entry.
- Preference pairs are two responses sampled from the reference, labelled by a Bradley-Terry
  draw on the hidden rewards (so some labels are noisy).

Each objective trains the policy with Adam on the same pairs; the table reports the expected
hidden reward under the trained policy, its KL to the reference, and the accuracy of the implicit
reward on held-out pairs. Results are written to ``runs/objective_demo/results.json``.

Run: ``python experiments/objective_demo.py [--steps 200] [--out runs/objective_demo]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import optax

from jaxpref.objectives import Objective, objective


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    num_prompts: int = 32
    num_responses: int = 8
    num_train_pairs: int = 512
    num_eval_pairs: int = 512
    steps: int = 200
    learning_rate: float = 0.05
    length_bonus: float = 0.02  # hidden reward per token: the verbosity bias the labels carry
    seed: int = 0


# name -> (objective, family). Unpaired objectives see each pair as two labelled responses; KTO
# also reads log-probs of mismatched (prompt, response) pairs for its KL reference point.
OBJECTIVES: dict[str, tuple[Objective, str]] = {
    "DPO (sigmoid)": (objective("sigmoid", beta=0.1), "pairwise"),
    "IPO": (objective("ipo", beta=0.1), "pairwise"),
    "hinge": (objective("hinge", beta=0.1), "pairwise"),
    "robust (eps=0.1)": (objective("robust", beta=0.1, label_smoothing=0.1), "pairwise"),
    "cDPO (eps=0.1)": (objective("cdpo", beta=0.1, label_smoothing=0.1), "pairwise"),
    "R-DPO": (objective("rdpo", beta=0.1, alpha=0.05), "pairwise"),
    "DPOP": (objective("dpop", beta=0.1), "pairwise"),
    "APO-zero": (objective("apo_zero", beta=0.1), "pairwise"),
    "SimPO": (objective("simpo", beta=2.0, gamma=0.5), "pairwise"),
    "ORPO": (objective("orpo", beta=0.5), "pairwise"),
    "DPO + 0.2 SFT (RPO)": (objective("sigmoid", beta=0.1) + 0.2 * objective("sft"), "pairwise"),
    "KTO": (objective("kto", beta=0.1), "unpaired+kl"),
    "BCO": (objective("bco", beta=0.1), "unpaired"),
}


def make_task(config: DemoConfig):
    """Hidden rewards, lengths, reference logits and train/eval preference pairs."""
    keys = jax.random.split(jax.random.key(config.seed), 6)
    shape = (config.num_prompts, config.num_responses)
    quality = jax.random.normal(keys[0], shape)
    lengths = jax.random.randint(keys[1], shape, 4, 40).astype(jnp.float32)
    hidden_reward = quality + config.length_bonus * lengths
    ref_logits = 1.5 * jax.random.normal(keys[2], shape)

    def sample_pairs(key, count):
        prompt_key, response_key, label_key = jax.random.split(key, 3)
        prompts = jax.random.randint(prompt_key, (count,), 0, config.num_prompts)
        responses = jax.random.categorical(response_key, ref_logits[prompts], shape=(2, count))
        first, second = responses
        first_wins = jax.random.bernoulli(
            label_key,
            jax.nn.sigmoid(hidden_reward[prompts, first] - hidden_reward[prompts, second]),
        )
        chosen = jnp.where(first_wins, first, second)
        rejected = jnp.where(first_wins, second, first)
        keep = first != second  # a response compared with itself carries no preference
        return prompts[keep], chosen[keep], rejected[keep]

    train = sample_pairs(keys[3], config.num_train_pairs)
    evaluation = sample_pairs(keys[4], config.num_eval_pairs)
    return hidden_reward, lengths, ref_logits, train, evaluation


def pair_inputs(logits, ref_logits, lengths, pairs) -> dict[str, jax.Array]:
    prompts, chosen, rejected = pairs
    logps = jax.nn.log_softmax(logits, axis=-1)
    ref_logps = jax.lax.stop_gradient(jax.nn.log_softmax(ref_logits, axis=-1))
    return {
        "policy_chosen_logps": logps[prompts, chosen],
        "policy_rejected_logps": logps[prompts, rejected],
        "ref_chosen_logps": ref_logps[prompts, chosen],
        "ref_rejected_logps": ref_logps[prompts, rejected],
        "chosen_lengths": lengths[prompts, chosen],
        "rejected_lengths": lengths[prompts, rejected],
    }


def unpaired_inputs(logits, ref_logits, lengths, pairs, with_kl: bool) -> dict[str, jax.Array]:
    """Each pair becomes a desirable and an undesirable example; KL pairs are mismatched (TRL)."""
    prompts, chosen, rejected = pairs
    logps = jax.nn.log_softmax(logits, axis=-1)
    ref_logps = jax.lax.stop_gradient(jax.nn.log_softmax(ref_logits, axis=-1))
    all_prompts = jnp.concatenate([prompts, prompts])
    responses = jnp.concatenate([chosen, rejected])
    # Prompt i with the response of example i - 1: an unrelated completion for the KL estimate.
    kl_responses = jnp.roll(responses, 1)
    inputs = {
        "policy_logps": logps[all_prompts, responses],
        "ref_logps": ref_logps[all_prompts, responses],
        "labels": jnp.concatenate([jnp.ones_like(chosen), jnp.zeros_like(rejected)]).astype(bool),
    }
    if with_kl:
        inputs["policy_kl_logps"] = jax.lax.stop_gradient(logps[all_prompts, kl_responses])
        inputs["ref_kl_logps"] = ref_logps[all_prompts, kl_responses]
    return inputs


def train(config: DemoConfig, loss_fn: Objective, family: str, task) -> jax.Array:
    """Full-batch Adam on the policy logits; returns the trained logits."""
    _, lengths, ref_logits, train_pairs, _ = task
    if family == "pairwise":
        make_inputs = pair_inputs
    else:
        make_inputs = functools.partial(unpaired_inputs, with_kl=family == "unpaired+kl")
    optimizer = optax.adam(config.learning_rate)

    def loss(logits):
        losses, _ = loss_fn(**make_inputs(logits, ref_logits, lengths, train_pairs))
        return losses.mean()

    def step(carry, _):
        logits, opt_state = carry
        value, grads = jax.value_and_grad(loss)(logits)
        updates, opt_state = optimizer.update(grads, opt_state)
        return (optax.apply_updates(logits, updates), opt_state), value

    @jax.jit
    def run(logits):
        (logits, _), values = jax.lax.scan(step, (logits, optimizer.init(logits)), length=config.steps)
        return logits, values

    logits, values = run(ref_logits)
    if not bool(jnp.all(jnp.isfinite(values))):
        raise FloatingPointError(f"non-finite training loss for {loss_fn!r}")
    return logits


def evaluate(logits, task) -> dict[str, float]:
    hidden_reward, _, ref_logits, _, (prompts, chosen, rejected) = task
    probs = jax.nn.softmax(logits, axis=-1)
    logps, ref_logps = jax.nn.log_softmax(logits, -1), jax.nn.log_softmax(ref_logits, -1)
    implicit_reward = logps - ref_logps
    truly_better = hidden_reward[prompts, chosen] > hidden_reward[prompts, rejected]
    margin = implicit_reward[prompts, chosen] - implicit_reward[prompts, rejected]
    # A tie (the untrained policy ranks nothing) scores 1/2, as a coin flip would.
    correct = jnp.where(margin == 0, 0.5, (margin > 0) == truly_better)
    return {
        "hidden_reward": float(jnp.mean(jnp.sum(probs * hidden_reward, -1))),
        "kl_to_ref": float(jnp.mean(jnp.sum(probs * (logps - ref_logps), -1))),
        "heldout_pair_accuracy": float(jnp.mean(correct)),
    }


def main(argv=None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=DemoConfig.steps)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/objective_demo"))
    args = parser.parse_args(argv)
    config = DemoConfig(steps=args.steps)
    task = make_task(config)
    hidden_reward, _, ref_logits, train_pairs, _ = task
    best_possible = float(jnp.mean(jnp.max(hidden_reward, -1)))
    results = {"reference policy": evaluate(ref_logits, task)}
    print(f"{len(train_pairs[0])} training pairs, {config.steps} Adam steps per objective")
    for name, (loss_fn, family) in OBJECTIVES.items():
        start = time.perf_counter()
        results[name] = evaluate(train(config, loss_fn, family, task), task)
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
    header = f"{'objective':<22} {'hidden reward':>13} {'KL to ref':>10} {'held-out acc':>12}"
    print(header + f"\n{'-' * len(header)}")
    for name, row in results.items():
        print(
            f"{name:<22} {row['hidden_reward']:>13.3f} {row['kl_to_ref']:>10.3f} "
            f"{row['heldout_pair_accuracy']:>12.3f}"
        )
    print(f"{'(best response)':<22} {best_possible:>13.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"config": dataclasses.asdict(config), **results}, indent=2)
    )
    print(f"wrote {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
