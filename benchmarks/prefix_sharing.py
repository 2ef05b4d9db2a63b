"""DPO step time with prefix-shared rows (prompt | chosen | rejected) vs separate rows.

A small Llama-like decoder (4 layers, hidden 256) takes a DPO forward + backward pass w.r.t. its
parameters on ``batch`` pairs whose prompt is half of ``seq`` and whose responses are the other
half. Separate rows hold ``prompt | chosen`` and ``prompt | rejected`` (2 x batch rows of ``seq``
tokens); shared rows hold the prompt once (batch rows of 1.5 x ``seq`` tokens). Reference
log-probs are fixed numbers: only the policy's step is timed. Prints the median of several timed
runs after a warm-up (alternating between the layouts), and the loss of both layouts (equal up
to float32 rounding).

    python benchmarks/prefix_sharing.py
    python benchmarks/prefix_sharing.py --skip-prompt-logits   # LM head on completion tokens only
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpref.models.decoder import Decoder, DecoderConfig
from jaxpref.models.logprobs import sequence_logps
from jaxpref.models.packing import prefix_shared_pairs
from jaxpref.objectives import pairwise_loss


def separate_rows(prompts, chosen, rejected) -> dict[str, np.ndarray]:
    """``prompt | chosen`` rows, then ``prompt | rejected`` rows (all the same length here)."""
    rows = [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)]
    masks = [[0] * len(p) + [1] * len(r) for p, r in zip(prompts * 2, chosen + rejected)]
    return dict(input_ids=np.array(rows, np.int32), completion_mask=np.array(masks, np.int32))


def time_steps(steps: dict, state, repeats: int) -> dict[str, tuple[float, float]]:
    """Median wall time and loss of each ``name: (step, batch)``; runs alternate between the steps
    so that load drifting on a shared machine biases none of them."""
    losses = {}
    for name, (step, batch) in steps.items():
        start = time.perf_counter()
        losses[name], _ = jax.block_until_ready(step(state, batch))  # compile + warm-up
        print(f"{name:>9}: first call (compile) {time.perf_counter() - start:6.1f} s")
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, (step, batch) in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step(state, batch))
            times[name].append(time.perf_counter() - start)
    results = {name: (statistics.median(times[name]), float(losses[name])) for name in steps}
    for name, (median, loss) in results.items():
        print(f"{name:>9}: loss {loss:.8f}  median {median:7.3f} s over {repeats} runs")
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4, help="preference pairs")
    parser.add_argument("--seq", type=int, default=512, help="prompt + one response")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--skip-prompt-logits", action="store_true", help="run the LM head on completion tokens only"
    )
    args = parser.parse_args(argv)

    config = DecoderConfig(
        vocab_size=args.vocab,
        hidden_size=256,
        intermediate_size=688,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=args.seq,
    )
    graphdef, state = nnx.split(Decoder(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    prompt_len = args.seq // 2
    response_len = args.seq - prompt_len
    tokens = lambda n: [rng.integers(1, args.vocab, n).tolist() for _ in range(args.batch)]  # noqa: E731
    prompts, chosen, rejected = tokens(prompt_len), tokens(response_len), tokens(response_len)
    ref_chosen = jnp.full((args.batch,), -1.01 * response_len * np.log(args.vocab))
    ref_rejected = jnp.full((args.batch,), -0.99 * response_len * np.log(args.vocab))
    # With prompts skipped, the LM head sees exactly the 2 x batch x response_len completion tokens.
    head = dict(max_completion_tokens=2 * args.batch * response_len if args.skip_prompt_logits else None)

    def dpo_loss(policy_chosen, policy_rejected):
        losses, _ = pairwise_loss(
            "sigmoid",
            policy_chosen_logps=policy_chosen,
            policy_rejected_logps=policy_rejected,
            ref_chosen_logps=ref_chosen,
            ref_rejected_logps=ref_rejected,
        )
        return losses.mean()

    def separate_loss(state, batch):
        model = nnx.merge(graphdef, state)
        _, summed = sequence_logps(model, batch["input_ids"], batch["completion_mask"], **head)
        return dpo_loss(*jnp.split(summed, 2))

    def shared_loss(state, batch):
        model = nnx.merge(graphdef, state)
        token_logps, _ = sequence_logps(
            model, batch.input_ids, batch.completion_mask, **batch.layout(), **head
        )
        return dpo_loss(*jnp.split(batch.sequence_sums(token_logps), 2))

    separate = separate_rows(prompts, chosen, rejected)
    shared = prefix_shared_pairs(prompts, chosen, rejected, row_length=prompt_len + 2 * response_len)
    print(
        f"{jax.devices()[0].device_kind}: {args.batch} pairs, prompt {prompt_len} + responses {response_len}, "
        f"vocab {args.vocab}; separate rows {separate['input_ids'].shape}, shared rows {shared.input_ids.shape}"
        f"{', LM head on completion tokens only' if args.skip_prompt_logits else ''}"
    )
    results = time_steps(
        dict(
            separate=(jax.jit(jax.value_and_grad(separate_loss)), separate),
            shared=(jax.jit(jax.value_and_grad(shared_loss)), shared),
        ),
        state,
        args.repeats,
    )
    (separate_s, separate_value), (shared_s, shared_value) = results["separate"], results["shared"]
    print(
        f"speed-up shared vs separate: {separate_s / shared_s:.2f}x "
        f"(loss difference {abs(shared_value - separate_value):.1e})"
    )
    return dict(separate_s=separate_s, shared_s=shared_s, speedup=separate_s / shared_s)


if __name__ == "__main__":
    main()
