"""LoRA and QLoRA (jaxpref.models.lora) in the train step: DPO starts at exactly ln 2 against the
base, only adapters are trained and held by the optimizer, the base stays bit-identical, the
reference (in the step and cached) is the base, adapters round-trip alone and through `peft` (with our
adapted logits over the base in `transformers`), the merged export loads in `transformers` with our
merged model's logits, a (2, 2, 2) mesh gives the single-device step, int8 stays close to the float
base, and `jaxpref dpo --set lora.rank=...` writes adapters and merged weights."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec

from jaxpref.cli import main
from jaxpref.data.synthetic import SortingTask, sft_rows, write_jsonl
from jaxpref.models import Decoder, RewardModel, from_pretrained, save_pretrained
from jaxpref.models.lora import (
    DEFAULT_TARGETS,
    LoRALinear,
    LoRAParam,
    adapter_parameter_count,
    apply_lora,
    base_view,
    load_adapters,
    lora_layers,
    merge_lora,
    save_adapters,
    train_view,
    trainable_filter,
)
from jaxpref.models.sampling import SamplingConfig, generate_jit
from jaxpref.objectives import objective
from jaxpref.sharding import make_mesh
from jaxpref.train import build_step, compute_reference_logps
from jaxpref.train.checkpoint import make_checkpoint_manager, restore_checkpoint, save_checkpoint
from jaxpref.train.online import GRPO, build_online_step
from jaxpref.train.reference import reference_cache_key

from .helpers import CONFIG, pair_batch, single_device_mesh

DPO = objective("sigmoid", beta=0.1)
# SGD with momentum: the first update is exactly -gradient, and the trace is an adapter-shaped
# optimizer state whose sharding can be checked.
OPTIMIZER = optax.sgd(learning_rate=1.0, momentum=0.9)
RANK, ALPHA = 4, 8.0
IDS = (np.arange(16).reshape(2, 8) * 7 + 3) % CONFIG.vocab_size  # [2, 8], no padding


def lora_model(quantize=None, seed=0, **options):
    options = {"targets": "q_proj|v_proj", **options}
    return apply_lora(
        Decoder(CONFIG, rngs=nnx.Rngs(0)), rank=RANK, alpha=ALPHA, quantize=quantize, seed=seed, **options
    )


_logits = nnx.jit(lambda model, ids: model.logits(model(ids)))  # one compilation per model structure


def logits(model) -> np.ndarray:
    return np.asarray(_logits(model, jnp.asarray(IDS)))


def base_weights(model) -> dict:
    """The model's weights other than the adapters, as host arrays by path."""
    frozen = nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(frozen)}


def train(step, steps=3):
    """(first metrics, last metrics, first params, state) after `steps` DPO updates from the init."""
    state, metrics = step(step.init(), pair_batch(0))
    first, first_params = jax.device_get((metrics, state.params))
    for seed in range(1, steps):
        state, metrics = step(state, pair_batch(seed))
    return first, jax.device_get(metrics), first_params, state


@pytest.fixture(scope="module")
def qlora_run():
    """A QLoRA DPO run of 3 steps on one device (adapters on q_proj and v_proj; every projection
    int8): (model with the trained adapters, step, first metrics, last metrics, first params, state)."""
    model = lora_model("int8")
    step = build_step(model, DPO, OPTIMIZER, single_device_mesh())
    first, last, first_params, state = train(step)
    nnx.update(model, state.params)
    return model, step, first, last, first_params, state


def test_dpo_starts_at_ln2_against_the_base_and_trains_only_the_adapters(qlora_run):
    model, step, first, last, _, state = qlora_run
    assert first["loss"] == np.float32(math.log(2.0))  # policy == base (B = 0)
    assert abs(first["rewards/margins"]) < 1e-7 and first["grad_norm"] > 0
    assert last["rewards/margins"] != 0.0  # the adapters moved the policy away from the base
    # No reference copy, and only the adapters in the params and the optimizer state.
    assert state.ref_params is None
    trained = nnx.to_flat_state(state.params)
    assert {type(v) for _, v in trained} == {LoRAParam}
    assert sum(v[...].size for _, v in trained) == adapter_parameter_count(model) == 2 * 112 * RANK
    assert jax.tree.structure(state.opt_state[0].trace) == jax.tree.structure(state.params)


def test_base_weights_are_bit_identical_after_training(qlora_run):
    model, *_ = qlora_run
    untouched = base_weights(lora_model("int8"))
    after = base_weights(model)
    assert after.keys() == untouched.keys()
    for path, value in after.items():
        np.testing.assert_array_equal(value, untouched[path], err_msg=str(path))
    assert np.abs(model.layers[0].self_attn.q_proj.lora_b[...]).max() > 0  # the adapters did train
    # A float base with its adapters off is the plain decoder, exactly.
    np.testing.assert_array_equal(logits(base_view(lora_model())), logits(Decoder(CONFIG, rngs=nnx.Rngs(0))))


def test_the_reference_is_the_base_in_the_step_and_in_the_cache(qlora_run):
    """After training, the step's reference (read back from its metrics) and the cached reference
    log-probs of the LoRA model both equal the base's log-probs (its adapters off)."""
    model, step, _, last, _, _ = qlora_run
    batch = pair_batch(2)  # the last step's batch
    cached = compute_reference_logps(model, [batch], mesh=single_device_mesh())
    base = compute_reference_logps(lora_model("int8"), [batch], mesh=single_device_mesh())
    for key, values in base.values.items():
        np.testing.assert_allclose(cached.values[key], values, atol=1e-5, err_msg=key)
    # Its cache key ignores the adapters: it is the base's.
    assert reference_cache_key("data", model, "pairwise") == reference_cache_key(
        "data", lora_model("int8"), "pairwise"
    )
    # rewards/chosen = beta (policy - reference): the step's mean reference log-prob of the chosen.
    in_step = last["logps/chosen"] - last["rewards/chosen"] / 0.1
    np.testing.assert_allclose(in_step, cached.values["ref_chosen_logps"].mean(), rtol=1e-5)


def test_adapter_only_checkpoints_round_trip(qlora_run, tmp_path):
    model, step, *_, state = qlora_run
    # The orbax checkpoint of the TrainState holds the adapters (and their optimizer state) only.
    manager = make_checkpoint_manager(tmp_path / "checkpoints", async_save=False)
    save_checkpoint(manager, 3, state, force=True)
    restored, _ = restore_checkpoint(manager, step.init())
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
    manager.close()
    # Adapter files: a fresh LoRA model (other random A) with them loaded is the trained model.
    save_adapters(model, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["r"] == RANK and written["lora_alpha"] == ALPHA
    assert written["target_modules"] == ["q_proj", "v_proj"]
    fresh = lora_model("int8", seed=1)
    assert not np.allclose(logits(fresh), logits(model))
    np.testing.assert_array_equal(logits(load_adapters(fresh, tmp_path / "adapter")), logits(model))
    with pytest.raises(ValueError, match="has r=4 but `model` has 2"):
        load_adapters(
            apply_lora(Decoder(CONFIG, rngs=nnx.Rngs(0)), rank=2, targets="q_proj|v_proj"),
            tmp_path / "adapter",
        )


def test_adapters_load_in_peft_with_our_logits_and_back(tmp_path):
    """save_adapters' files, loaded by peft.PeftModel.from_pretrained over the base exported to
    `transformers`, give our adapted logits; the files PEFT then writes load back with load_adapters."""
    model = lora_model(targets=DEFAULT_TARGETS)  # every projection: each PEFT module name is checked
    rng = np.random.default_rng(0)
    for _, layer in lora_layers(model):  # random B (apply_lora starts at B = 0), so adapters matter
        layer.lora_b[...] = jnp.asarray(rng.normal(0.0, 0.1, layer.lora_b.shape), jnp.float32)
    ours = logits(model)
    save_pretrained(Decoder(CONFIG, rngs=nnx.Rngs(0)), tmp_path / "base")  # lora_model's base weights
    save_adapters(model, tmp_path / "adapter")
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path / "adapter").eval()
    ids = torch.from_numpy(IDS).long()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits.float().numpy()
        with peft_model.disable_adapter():
            their_base = peft_model(input_ids=ids).logits.float().numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # PEFT applied the adapters: they move the logits by 1000x the tolerance (0.42 measured).
    assert np.abs(theirs - their_base).max() > 0.1
    peft_model.save_pretrained(tmp_path / "peft")
    reloaded = load_adapters(lora_model(targets=DEFAULT_TARGETS, seed=1), tmp_path / "peft")
    np.testing.assert_array_equal(logits(reloaded), ours)


def test_merged_export_loads_in_transformers_with_our_merged_logits(qlora_run, tmp_path):
    model, *_ = qlora_run
    merged = merge_lora(model)  # dequantised base + alpha / rank * A B
    assert not any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(merged))
    np.testing.assert_allclose(logits(merged), logits(model), atol=1e-4)
    save_pretrained(model, tmp_path)  # a LoRA model is written merged
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.from_numpy(IDS).long()).logits.float().numpy()
    np.testing.assert_allclose(theirs, logits(merged), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(logits(from_pretrained(tmp_path)), logits(merged))


def test_sharded_qlora_step_equals_single_device(qlora_run):
    _, _, expected_metrics, _, expected_params, _ = qlora_run
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    step = build_step(lora_model("int8"), DPO, OPTIMIZER, mesh)
    metrics, _, params, state = train(step, steps=1)
    for key, value in expected_metrics.items():
        np.testing.assert_allclose(metrics[key], value, atol=1e-6, err_msg=key)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, atol=1e-6), params, expected_params)
    # Adapters follow their base kernel's axes (the rank is replicated); so does the optimizer state.
    q_proj = state.params["layers"][0]["self_attn"]["q_proj"]
    assert q_proj["lora_a"][...].sharding.spec == PartitionSpec("fsdp", None)
    assert q_proj["lora_b"][...].sharding.spec == PartitionSpec(None, "tensor")
    trace = state.opt_state[0].trace["layers"][0]["self_attn"]["q_proj"]
    assert trace["lora_b"][...].sharding.spec == PartitionSpec(None, "tensor")
    frozen = step.frozen["layers"][0]["self_attn"]["q_proj"]
    assert frozen["kernel"][...].dtype == jnp.int8
    assert frozen["kernel"][...].sharding.spec == PartitionSpec("fsdp", "tensor")
    assert frozen["kernel_scale"][...].sharding.spec == PartitionSpec("tensor")


def test_int8_base_is_close_to_the_float_base():
    float_model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    quantized = lora_model("int8")
    layer = quantized.layers[0].mlp.up_proj  # not targeted: quantised, without adapters
    assert isinstance(layer, LoRALinear) and layer.rank == 0 and layer.kernel[...].dtype == jnp.int8
    kernel = np.asarray(float_model.layers[0].mlp.up_proj.kernel[...])
    dequantized = np.asarray(layer.kernel[...], np.float32) * np.asarray(layer.kernel_scale[...])
    # Per-channel absmax: every entry within half a quantisation step of its column's scale.
    assert np.all(np.abs(dequantized - kernel) <= 0.5 * np.abs(kernel).max(axis=0) / 127 + 1e-7)
    expected = logits(float_model)
    assert np.abs(logits(quantized) - expected).max() < 0.02 * np.abs(expected).max()


def test_filters_views_dropout_and_errors():
    reward_model = apply_lora(RewardModel(CONFIG, rngs=nnx.Rngs(0)), rank=2)
    trained = {
        "/".join(map(str, p))
        for p, _ in nnx.to_flat_state(nnx.state(reward_model, trainable_filter(reward_model)))
    }
    assert "score/kernel" in trained and "model/layers/0/self_attn/q_proj/lora_a" in trained
    assert not any(path.endswith("/kernel") and path.startswith("model/") for path in trained)
    # Dropout: off by default (sampling, scoring), on in train_view with masks from the key.
    model = lora_model(dropout=0.5)
    model.layers[0].self_attn.q_proj.lora_b[...] = jnp.ones((RANK, 32))
    np.testing.assert_array_equal(logits(model), logits(model))
    first, again, other = (logits(train_view(model, jax.random.key(k))) for k in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other) and not np.allclose(first, logits(model))
    with pytest.raises(ValueError, match="`rank`=0 must be a positive int"):
        apply_lora(Decoder(CONFIG, rngs=nnx.Rngs(0)), rank=0)
    with pytest.raises(ValueError, match="`targets`='lm_head' matches none"):
        apply_lora(Decoder(CONFIG, rngs=nnx.Rngs(0)), rank=2, targets="lm_head")
    with pytest.raises(ValueError, match="`quantize`='int4' must be one of"):
        apply_lora(Decoder(CONFIG, rngs=nnx.Rngs(0)), rank=2, quantize="int4")
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model, rank=2)


def test_dropout_masks_differ_per_step_key_in_the_train_step():
    """LoRA dropout inside the jitted step (its masks drawn from the state's key, in the gradient
    trace): two steps from one state with different keys give different adapter gradients."""
    model = lora_model(dropout=0.5)
    model.layers[0].self_attn.q_proj.lora_b[...] = jnp.full((RANK, 32), 0.1)  # adapters active
    step = build_step(model, DPO, optax.sgd(1.0), single_device_mesh())
    updated = []
    for seed in (0, 1):
        state, metrics = step(step.init(seed=seed), pair_batch(0))
        assert np.isfinite(float(metrics["loss"]))
        updated.append(jax.device_get(state.params))
    a_first, a_second = (u["layers"][0]["self_attn"]["q_proj"]["lora_a"][...] for u in updated)
    assert not np.allclose(a_first, a_second)


def test_grpo_with_lora_samples_and_trains_the_adapters_against_the_base():
    """GRPO with a KL term: the reference is the base (KL 0 on the first update), the sampler reads
    the adapted policy, and repeated steps recompile nothing."""
    model = lora_model("int8")
    step = build_online_step(
        model,
        OPTIMIZER,
        single_device_mesh(),
        algorithm=GRPO(loss_type="grpo", beta=0.1),
        reward_fns={"tokens": lambda completion_ids, **kwargs: completion_ids.sum(axis=1) % 7},
        sampling=SamplingConfig(max_new_tokens=4, temperature=1.0, eos_token_id=2, pad_token_id=0),
        num_generations=2,
    )
    prompts = {
        "prompt_ids": np.array([[0, 5, 6], [7, 8, 9]], np.int32),
        "prompt_mask": np.array([[0, 1, 1], [1, 1, 1]], np.int32),
    }
    state = step.init()
    assert state.ref_params is None
    state, metrics = step(state, prompts)
    assert float(metrics["kl"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    compiled = (generate_jit._cache_size(), step._update._cache_size())
    state, metrics = step(state, prompts)
    assert (generate_jit._cache_size(), step._update._cache_size()) == compiled
    assert float(metrics["kl"]) > 0  # the adapters moved the policy away from the base
    assert {type(v) for _, v in nnx.to_flat_state(state.params)} == {LoRAParam}
    nnx.update(model, state.params)
    untouched = base_weights(lora_model("int8"))
    for path, value in base_weights(model).items():
        np.testing.assert_array_equal(value, untouched[path], err_msg=str(path))


def test_dpo_subcommand_with_lora_writes_adapters_and_merged_weights(tmp_path, capsys):
    rows = sft_rows(SortingTask(corruption_rate=0.0), 32, seed=0)
    pairs = [
        {"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"][::-1] + "0"}
        for r in rows
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    argv = [
        "dpo",
        f"--data={data}",
        "--steps=2",
        f"--set=runs_dir={tmp_path}",
        "--set=data.batch_size=8",
        "--set=data.max_length=32",
        "--set=train.progress=false",
        "--set=train.reference=cached",
        "--set=lora.rank=4",
        "--set=lora.targets=q_proj|v_proj",
    ]
    assert main(argv) == 0
    run_dir = tmp_path / "dpo"
    assert json.loads((run_dir / "config.json").read_text())["lora"]["targets"] == "q_proj|v_proj"
    first = json.loads((run_dir / "metrics" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == 4
    merged = from_pretrained(run_dir / "hf")  # a plain decoder with the merged weights
    assert isinstance(merged.layers[0].self_attn.q_proj, nnx.Linear)
    assert "dpo finished" in capsys.readouterr().out
