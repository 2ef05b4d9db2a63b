"""Peak memory and time of chunked vs full-logits token log-probs, forward + backward.

Both compute ``sum(log_softmax(hidden @ unembedding)[targets])`` and its gradient w.r.t. ``hidden``
and ``unembedding``. Peak memory is XLA's ``temp_size_in_bytes`` of the compiled program (scratch
space beyond arguments and outputs, which both share); time is the median wall time of a few runs
after a warm-up. The full-logits run is skipped (memory still reported) when it would not fit.

    python benchmarks/logprobs_memory.py            # vocab 128256, seq 2048, batch 4, hidden 256
    python benchmarks/logprobs_memory.py --small    # a quick run
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

from jaxpref.models.logprobs import DEFAULT_CHUNK_SIZE, token_logps_from_hidden

GIB = 2.0**30


def naive_logps(hidden, unembedding, targets):  # [batch, seq]
    logits = jnp.einsum("bte,ev->btv", hidden, unembedding, preferred_element_type=jnp.float32)
    return jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]


def available_memory_bytes() -> float:
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def measure(name: str, logps_fn, args, repeats: int) -> dict:
    grad_fn = jax.jit(jax.value_and_grad(lambda h, w, t: logps_fn(h, w, t).sum(), argnums=(0, 1)))
    start = time.perf_counter()
    compiled = grad_fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    temp = compiled.memory_analysis().temp_size_in_bytes
    result = dict(name=name, temp_bytes=temp, compile_s=compile_s, median_s=None)
    if temp > 0.7 * available_memory_bytes():
        print(f"{name:>8}: temp {temp / GIB:7.2f} GiB  (not run: more than 70% of free memory)")
        return result
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    result["median_s"] = statistics.median(times)
    print(
        f"{name:>8}: temp {temp / GIB:7.2f} GiB  compile {compile_s:6.1f} s  median {result['median_s']:7.3f} s"
    )
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="vocab 32000, seq 512, batch 2, chunk 256")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=None, help=f"default {DEFAULT_CHUNK_SIZE}")
    parser.add_argument("--vocab-chunk-size", type=int, default=None)
    parser.add_argument("--dtype", default="float32", help="dtype of hidden and unembedding")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.small:
        args.batch, args.seq, args.vocab = 2, 512, 32000
        args.chunk_size = args.chunk_size or 256
    args.chunk_size = args.chunk_size or DEFAULT_CHUNK_SIZE

    keys = jax.random.split(jax.random.key(0), 3)
    dtype = jnp.dtype(args.dtype)
    hidden = jax.random.normal(keys[0], (args.batch, args.seq, args.hidden), dtype)
    unembedding = (jax.random.normal(keys[1], (args.hidden, args.vocab)) * args.hidden**-0.5).astype(dtype)
    targets = jax.random.randint(keys[2], (args.batch, args.seq), 0, args.vocab)
    inputs = (hidden, unembedding, targets)
    logits_gib = args.batch * args.seq * args.vocab * 4 / GIB
    print(
        f"{jax.devices()[0].device_kind}: batch {args.batch}, seq {args.seq}, vocab {args.vocab}, "
        f"hidden {args.hidden}, {dtype.name}; float32 logits = {logits_gib:.2f} GiB; "
        f"chunk_size {args.chunk_size}, vocab_chunk_size {args.vocab_chunk_size}"
    )

    chunked = measure(
        "chunked",
        lambda h, w, t: token_logps_from_hidden(
            h, w, t, chunk_size=args.chunk_size, vocab_chunk_size=args.vocab_chunk_size
        ),
        inputs,
        args.repeats,
    )
    naive = measure("naive", naive_logps, inputs, args.repeats)
    ratio = chunked["temp_bytes"] / naive["temp_bytes"]
    print(
        f"peak memory chunked / naive = {ratio:.3f} ({'within' if ratio <= 0.25 else 'ABOVE'} the 1/4 target)"
    )
    if naive["median_s"] and chunked["median_s"]:
        print(f"time chunked / naive = {chunked['median_s'] / naive['median_s']:.2f}")
    return dict(chunked=chunked, naive=naive, memory_ratio=ratio)


if __name__ == "__main__":
    main()
