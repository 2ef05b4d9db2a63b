"""Model FLOPs utilisation (MFU) of jaxpref's DPO train step.

The step is jaxpref's own (:func:`jaxpref.train.step.build_step`, reference ``"frozen"``): policy
forward + backward on the chosen and the rejected sequences and a reference forward on both, DPO
sigmoid loss, AdamW. Weights are random; float32 parameters with bfloat16 compute (mixed
precision, as TRL's ``bf16=True``). Each pair is two rows of ``prompt + response`` tokens (one
sequence per row, no prefix sharing, so the FLOP count below is the standard one).

Model FLOPs of one step, counted analytically (no remat recomputation counted, embedding lookups
free), with ``T`` tokens per row and ``R`` response tokens per row:

- per token and layer, the matmuls: ``2 * (q + k + v + o + gate + up + down parameters)``, except
  the last layer's ``o + gate + up + down``, counted only on the ``R`` tokens whose log-probs the LM
  head reads (the other rows' outputs feed nothing, and the step skips them);
- per row and layer, causal attention: ``4 * heads * head_dim * T (T + 1) / 2`` (QK^T and AV over
  the keys at or before each query);
- the LM head on the tokens whose log-prob DPO needs: ``2 * hidden * vocab * R`` per row;
- the policy costs 3x its forward (forward + backward), the reference 1x: 4x forward in all.

MFU = model FLOPs / step time / the device's peak dense bf16 FLOP/s (datasheet figure; the table
is below). The step time is that of ``--steps`` steps dispatched back to back, as
:func:`jaxpref.train.train` runs them (it reads a step's metrics once the next step is queued); the
latency of one step waited for alone is printed beside it. On a CPU the script runs a small config
and prints GFLOP/s only.

    python benchmarks/mfu.py                                  # 1B Llama on GPU/TPU, small on CPU
    python benchmarks/mfu.py --attention xla,cudnn --steps 10 # compare attention kernels in one run
    python benchmarks/mfu.py --config small --pairs 2
    python benchmarks/mfu.py --attention cudnn --profile      # + the step's kernels, by time

Before timing a cuDNN variant on a GPU, the script checks its logits against XLA's attention on
the same weights (relative error, bf16).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import pathlib
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpref.models.decoder import Decoder, DecoderConfig
from jaxpref.models.packing import pack_sequences
from jaxpref.objectives import objective
from jaxpref.sharding import make_mesh
from jaxpref.train.step import build_step

# Llama 3.2 1B's shape (tied embeddings, GQA 32/8, llama3 RoPE scaling).
CONFIGS = {
    "llama-1b": DecoderConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "small": DecoderConfig(
        model_type="llama",
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
}

# Peak dense bf16 FLOP/s by device kind (vendors' datasheets, without sparsity).
PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100": 989.4e12,  # SXM
    "H200": 989.4e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def peak_flops(device) -> float | None:
    kind = device.device_kind
    for name, flops in PEAK_BF16.items():  # first match: "H100 PCIe" before "H100"
        if name in kind:
            return flops
    return None


def step_flops(config: DecoderConfig, rows: int, tokens: int, response: int) -> float:
    """Model FLOPs of one DPO step (policy fwd + bwd, reference fwd) over ``rows`` rows."""
    hidden, head_dim = config.hidden_size, config.resolved_head_dim
    q_k_v = hidden * (config.num_heads + 2 * config.num_kv_heads) * head_dim  # parameters
    o_and_mlp = hidden * config.num_heads * head_dim + 3 * hidden * config.intermediate_size
    # The last layer's output projection and MLP count only on the LM head's rows: elsewhere their
    # outputs feed nothing (and the step skips them).
    layer_matmuls = 2 * (config.num_layers * (q_k_v + o_and_mlp) * tokens - o_and_mlp * (tokens - response))
    attention = config.num_layers * 4 * config.num_heads * head_dim * tokens * (tokens + 1) / 2
    lm_head = 2 * hidden * config.vocab_size * response
    forward = rows * (layer_matmuls + attention + lm_head)
    return 4 * forward


def make_batch(config: DecoderConfig, pairs: int, prompt: int, response: int) -> dict:
    """``pairs`` random pairs, one sequence per row: the chosen rows, then the rejected rows."""
    rng = np.random.default_rng(0)
    tokens = lambda n: rng.integers(3, config.vocab_size, n).tolist()  # noqa: E731
    prompts = [tokens(prompt) for _ in range(pairs)]
    responses = [tokens(response) for _ in range(2 * pairs)]
    sequences = [p + r for p, r in zip(prompts * 2, responses)]
    masks = [[0] * prompt + [1] * response for _ in sequences]
    packed = pack_sequences(sequences, masks, row_length=prompt + response, one_per_row=True)
    batch = {k: v for k, v in packed._asdict().items() if v is not None}
    batch["example_index"] = np.arange(pairs)
    return batch


def check_cudnn(config: DecoderConfig, batch: dict) -> dict[str, float]:
    """Relative error of bf16 logits against float32 XLA-attention logits on the same weights:
    XLA attention, cuDNN from row lengths, and cuDNN with the dense mask (a prefix segment forces
    it; the prefix is the row's own segment, so what each token sees is unchanged)."""
    rows = jnp.asarray(batch["input_ids"][:2, :512])
    small = dataclasses.replace(config, num_layers=2)
    variants = {
        "float32 xla": (dataclasses.replace(small, dtype=jnp.float32, attention_implementation="xla"), {}),
        "bf16 xla": (dataclasses.replace(small, attention_implementation="xla"), {}),
        "bf16 cudnn, lengths": (dataclasses.replace(small, attention_implementation="cudnn"), {}),
        "bf16 cudnn, dense mask": (
            dataclasses.replace(small, attention_implementation="cudnn"),
            dict(prefix_segment_ids=jnp.ones_like(rows)),
        ),
    }
    logits = {}
    for name, (variant, layout) in variants.items():
        model = Decoder(variant, rngs=nnx.Rngs(0))
        logits[name] = np.asarray(model.logits(model(rows, **layout)[:, -64:]), np.float64)
    reference = logits.pop("float32 xla")
    return {
        name: float(np.linalg.norm(x - reference) / np.linalg.norm(reference)) for name, x in logits.items()
    }


def measure(config: DecoderConfig, batch: dict, args, rows: int, flops: float) -> dict:
    model = Decoder(config, rngs=nnx.Rngs(0))
    optimizer = optax.adamw(1e-6, weight_decay=0.0)
    train_step = build_step(
        model,
        objective("sigmoid", beta=0.1),
        optimizer,
        make_mesh(),
        reference="frozen",
        chunk_size=args.chunk_size,
        max_completion_tokens=rows * args.response,
    )
    del model  # the step holds the weights now
    state = train_step.init()
    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    start = time.perf_counter()
    state, metrics = train_step(state, device_batch)
    first_loss = float(metrics["loss"])
    compile_seconds = time.perf_counter() - start
    for _ in range(2):
        state, metrics = train_step(state, device_batch)
    jax.block_until_ready(metrics)
    times = []  # latency: each step waited for before the next is dispatched
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = train_step(state, device_batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    # Throughput as jaxpref's `train` loop runs: the next step is dispatched before the last one's
    # metrics are read, so the device never waits for the host between steps.
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = train_step(state, device_batch)
    jax.block_until_ready(metrics["loss"])
    seconds = (time.perf_counter() - start) / args.steps
    if args.dump_hlo:
        pathlib.Path(args.dump_hlo).write_text(train_step.lower(state, device_batch).compile().as_text())
    if args.profile:
        holder = [state]  # the step donates its state: each call passes on the new one

        def run_step():
            holder[0], step_metrics = train_step(holder[0], device_batch)
            return step_metrics

        print_kernel_times(run_step, steps=3)
        state = holder[0]
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return dict(
        seconds=seconds,
        latency=statistics.median(times),
        spread=(min(times), max(times)),
        compile_seconds=compile_seconds,
        first_loss=first_loss,
        last_loss=float(metrics["loss"]),
        tflops=flops / seconds / 1e12,
        peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
    )


def print_kernel_times(run_step, steps: int, top: int = 30) -> None:
    """Traces ``steps`` calls of ``run_step`` and prints the device kernels' time per step: by kind
    (numbered fusions and GEMMs pooled under one name) and the longest single kernels."""
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(steps):
                jax.block_until_ready(run_step())
        (trace,) = pathlib.Path(folder).rglob("*.trace.json.gz")
        events = json.load(gzip.open(trace))["traceEvents"]
    # Device kernels live on the GPU's own process rows ("/device:GPU:0 ..."); host events elsewhere.
    device_pids = {
        e["pid"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name" and "/device:" in e["args"].get("name", "")
    }
    if not device_pids:
        names = sorted({e["args"].get("name", "") for e in events if e.get("name") == "process_name"})
        print(f"no device rows in the trace (processes: {names})")
        return
    by_kind, by_kernel = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e:
            by_kernel[e["name"]] += e["dur"] / steps / 1e3
            by_kind[re.sub(r"[._]\d+$", "", e["name"])[:60]] += e["dur"] / steps / 1e3
    print(f"device kernels: {sum(by_kernel.values()):.1f} ms per step (summed over streams)")
    for name, ms in by_kind.most_common(top):
        print(f"  {ms:8.2f} ms  {name}")
    print("longest kernels:")
    for name, ms in by_kernel.most_common(top):
        print(f"  {ms:8.2f} ms  {name[:100]}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    on_cpu = jax.default_backend() == "cpu"
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small" if on_cpu else "llama-1b")
    parser.add_argument("--pairs", type=int, default=1 if on_cpu else 4)
    parser.add_argument("--prompt", type=int, default=256 if on_cpu else 1024, help="prompt tokens per row")
    parser.add_argument(
        "--response", type=int, default=256 if on_cpu else 1024, help="response tokens per row"
    )
    parser.add_argument("--steps", type=int, default=3 if on_cpu else 10, help="timed steps (median)")
    parser.add_argument("--attention", default="auto", help="comma-separated: auto, xla, cudnn")
    parser.add_argument("--remat", default="false", help="comma-separated: false, true")
    parser.add_argument("--chunk-size", type=int, default=4096, help="LM-head tokens per chunk")
    parser.add_argument("--profile", action="store_true", help="print the step's device kernels by time")
    parser.add_argument("--dump-hlo", metavar="FILE", help="write the compiled step's HLO text to FILE")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    base = dataclasses.replace(CONFIGS[args.config], dtype=jnp.bfloat16, param_dtype=jnp.float32)
    rows, tokens = 2 * args.pairs, args.prompt + args.response
    batch = make_batch(base, args.pairs, args.prompt, args.response)
    flops = step_flops(base, rows, tokens, args.response)
    peak = peak_flops(device)
    print(
        f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; config {args.config} "
        f"({base.num_layers} layers, hidden {base.hidden_size}, vocab {base.vocab_size}); {args.pairs} pairs x 2 "
        f"rows x {tokens} tokens (response {args.response}); model FLOPs per step {flops / 1e12:.2f} T; "
        f"peak bf16 {'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}",
        flush=True,
    )
    results = []
    for attention in args.attention.split(","):
        for remat in args.remat.split(","):
            config = dataclasses.replace(
                base,
                attention_implementation=None if attention == "auto" else attention,
                remat=remat == "true",
            )
            if attention == "cudnn":
                errors = check_cudnn(config, batch)
                print(
                    "logits vs float32 XLA attention, relative error: "
                    + ", ".join(f"{name} {error:.2e}" for name, error in errors.items()),
                    flush=True,
                )
            try:
                result = dict(attention=attention, remat=remat, **measure(config, batch, args, rows, flops))
            except jax.errors.JaxRuntimeError as error:  # e.g. out of memory: report it, try the next
                print(f"attention {attention:>5} remat {remat:>5}: failed: {str(error)[:300]}", flush=True)
                continue
            result["tokens_per_s"] = rows * tokens / result["seconds"]
            result["mfu"] = None if peak is None else result["tflops"] * 1e12 / peak
            results.append(result)
            mfu = "" if result["mfu"] is None else f"  MFU {100 * result['mfu']:.1f}%"
            print(
                f"attention {attention:>5} remat {remat:>5}: step {1e3 * result['seconds']:.1f} ms "
                f"(steps back to back; one step waited for: median {1e3 * result['latency']:.1f}, min "
                f"{1e3 * result['spread'][0]:.1f}, max {1e3 * result['spread'][1]:.1f}), "
                f"{result['tokens_per_s']:.0f} tok/s, {result['tflops']:.1f} TFLOP/s{mfu}, "
                f"peak memory {result['peak_gib']:.1f} GiB, loss {result['first_loss']:.6f} -> "
                f"{result['last_loss']:.6f}, compile {result['compile_seconds']:.0f} s",
                flush=True,
            )
    return results


if __name__ == "__main__":
    main()
