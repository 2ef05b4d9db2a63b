"""The online step: GRPO's, online DPO's and PPO's (on a sharded mesh) updates against hand-written
losses on a fixed rollout; sampled GRPO steps on a tiny model (the policy moves, the reference does
not, nothing recompiles, a sharded mesh gives the single device's results); PPO's policy and value
head training; an interrupted and resumed run; and the checks on options, algorithms and reward
functions."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from jaxpref.models.decoder import Decoder
from jaxpref.models.heads import CausalLMWithValueHead
from jaxpref.models.sampling import SamplingConfig, generate_jit
from jaxpref.sharding import make_mesh
from jaxpref.train import MetricsWriter, make_checkpoint_manager, train
from jaxpref.train.online import GRPO, PPO, OnlineDPO, OnlineStep, Rollout, build_online_step

from .helpers import CONFIG, ListIterator, single_device_mesh

EOS, PAD = 2, 0
G = 4
TEMPERATURE = 0.8
BETA = 0.04
LR = 0.5
# Two prompts (left-padded to 4) and G = 4 completions each (T = 5): ended by EOS, or truncated.
PROMPTS = ([5, 6, 7], [8, 9])
COMPLETIONS = (
    [10, 11, EOS],
    [12, 13, 14, 15, 16],
    [17, EOS],
    [18, 19, 20, 21, EOS],
    [22, 23, 24],
    [25, EOS],
    [26, 27, 28, 29, 30],
    [31],
)
REWARDS = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], np.float32)


def pad(rows, length, left):  # -> ids [rows, length], mask [rows, length]
    ids = np.full((len(rows), length), PAD, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    return ids, mask


def sampling(max_new_tokens=5, temperature=TEMPERATURE):
    return SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=EOS, pad_token_id=PAD
    )


def never_called(**kwargs):
    raise AssertionError("the update must not score anything")


def count_token_seven(completion_ids, completion_mask, **kwargs):
    """A reward on token ids: the share of completion tokens equal to 7."""
    return ((completion_ids == 7) & (completion_mask != 0)).sum(1) / np.maximum(completion_mask.sum(1), 1)


def share_of_odd_tokens(completion_ids, completion_mask, **kwargs):
    return ((completion_ids % 2 == 1) & (completion_mask != 0)).sum(1) / np.maximum(completion_mask.sum(1), 1)


# ------------------------------------------------------------------------------------------------
# The update against a hand-written loss.
# ------------------------------------------------------------------------------------------------


def hand_advantages() -> np.ndarray:  # [8]: GRPO's (r - group mean) / (unbiased group std + 1e-4)
    grouped = REWARDS.astype(np.float64).reshape(-1, G)
    centered = grouped - grouped.mean(1, keepdims=True)
    return (centered / (grouped.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)


def unpadded_outputs(
    model: Decoder | CausalLMWithValueHead, params: nnx.State
) -> tuple[jax.Array, jax.Array | None]:
    """Log-probs [8, 5] of the completion tokens at TEMPERATURE and, with a value head, the values
    [8, 5] of the states before them (both 0 outside the completions), from one right-padded forward
    pass: each sequence starts at position 0, so no left padding is involved."""
    sequences = [PROMPTS[i // G] + list(c) for i, c in enumerate(COMPLETIONS)]
    ids, _ = pad(sequences, 9, left=False)
    completion_ids, mask = pad(COMPLETIONS, 5, left=False)
    rows = np.arange(len(COMPLETIONS))[:, None]
    # Completion token t of row i is predicted at position len(prompt) - 1 + t.
    before = np.array([len(PROMPTS[i // G]) - 1 for i in range(len(COMPLETIONS))])[:, None] + np.arange(5)
    graphdef, _ = nnx.split(model)
    policy = nnx.merge(graphdef, params)
    outputs = policy(jnp.asarray(ids))  # causal: the pads after a sequence are unseen
    hidden, values = outputs if isinstance(policy, CausalLMWithValueHead) else (outputs, None)
    decoder = policy.model if values is not None else policy
    logps = jax.nn.log_softmax(decoder.logits(hidden) / TEMPERATURE, axis=-1)[rows, before, completion_ids]
    in_completion = lambda x: jnp.where(mask != 0, x, 0.0)  # noqa: E731
    return in_completion(logps), None if values is None else in_completion(values[rows, before])


def hand_loss(model, params, old_params, ref_params, mask):
    """DAPO aggregation of PPO's clipped surrogate (eps 0.2) plus BETA * k3 KL, from the formulas."""
    logps, _ = unpadded_outputs(model, params)
    old = jax.lax.stop_gradient(unpadded_outputs(model, old_params)[0])
    ref = jax.lax.stop_gradient(unpadded_outputs(model, ref_params)[0])
    advantages = jnp.asarray(hand_advantages(), jnp.float32)[:, None]
    ratio = jnp.exp(logps - old)
    surrogate = -jnp.minimum(ratio * advantages, jnp.clip(ratio, 0.8, 1.2) * advantages)
    kl = jnp.exp(ref - logps) - (ref - logps) - 1.0
    return jnp.sum((surrogate + BETA * kl) * mask) / jnp.sum(mask)


@pytest.fixture(scope="module")
def rollout():
    prompt_ids, prompt_mask = pad([PROMPTS[i // G] for i in range(len(COMPLETIONS))], 4, left=True)
    completion_ids, completion_mask = pad(COMPLETIONS, 5, left=False)
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, REWARDS)


def test_two_iterations_equal_the_hand_written_loss_and_sgd(rollout):
    """num_iterations=2 with SGD: iteration 1 is on-policy (ratio 1), iteration 2 is importance-
    weighted against the sampling policy and clipped; both add the KL to the frozen reference.
    Completions without EOS are left out of the loss (mask_truncated_completions)."""
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    step = build_online_step(
        model,
        optax.sgd(LR),
        single_device_mesh(),
        reward_fns={"unused": never_called},
        sampling=sampling(),
        algorithm=GRPO(loss_type="dapo", beta=BETA),
        num_generations=G,
        num_iterations=2,
        mask_truncated_completions=True,
    )
    state = step.init()
    initial = jax.device_get(state.params)
    new_state, metrics = step.update(state, rollout)

    terminated = np.array([EOS in completion for completion in COMPLETIONS])  # rows 0, 2, 3, 5
    mask = jnp.asarray(rollout.completion_mask * terminated[:, None], jnp.float32)
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, old: hand_loss(model, p, old, initial, mask)))
    loss_1, grads_1 = loss_and_grad(initial, initial)
    after_1 = jax.tree.map(lambda p, g: p - LR * g, initial, grads_1)
    loss_2, grads_2 = loss_and_grad(after_1, initial)
    expected = jax.tree.map(lambda p, g: p - LR * g, after_1, grads_2)

    jax.tree.map(
        lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6),
        jax.device_get(new_state.params),
        expected,
    )
    np.testing.assert_allclose(float(metrics["loss"]), (loss_1 + loss_2) / 2, rtol=1e-4, atol=1e-6)
    assert 0 < float(metrics["clip_ratio/region_mean"]) < 0.5  # only iteration 2 can clip
    assert float(metrics["kl"]) > 0  # iteration 1 has KL 0 (policy == reference), iteration 2 not
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_state.ref_params), initial)
    assert int(new_state.step) == 1


def test_online_dpo_update_equals_the_hand_written_dpo_loss_and_sgd(rollout):
    """With G = 2 the rollout's rows form four pairs: (0, 1) prefers 0, (2, 3) prefers 3, and the two
    pairs of equal rewards are left out."""
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    beta = 0.5
    step = build_online_step(
        model,
        optax.sgd(LR),
        single_device_mesh(),
        reward_fns={"unused": never_called},
        sampling=sampling(),
        algorithm=OnlineDPO(beta=beta),
        num_generations=2,
    )
    state = step.init()
    initial = jax.device_get(state.params)
    new_state, metrics = step.update(state, rollout)

    mask = jnp.asarray(rollout.completion_mask, jnp.float32)

    def hand_dpo_loss(params):
        sums = jnp.sum(unpadded_outputs(model, params)[0] * mask, axis=1)
        ref = jnp.sum(unpadded_outputs(model, initial)[0] * mask, axis=1)
        margin = lambda c, r: (sums[c] - ref[c]) - (sums[r] - ref[r])  # noqa: E731
        return -(jax.nn.log_sigmoid(beta * margin(0, 1)) + jax.nn.log_sigmoid(beta * margin(3, 2))) / 2

    loss, grads = jax.jit(jax.value_and_grad(hand_dpo_loss))(initial)
    expected = jax.tree.map(lambda p, g: p - LR * g, initial, grads)
    jax.tree.map(
        lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6),
        jax.device_get(new_state.params),
        expected,
    )
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-6)  # log 2: policy == reference
    assert float(metrics["pairs/decided"]) == 0.5


# Every PPO setting off its default and distinct, so a swapped or ignored one changes the result.
PPO_SETTINGS = PPO(kl_coef=0.4, gamma=0.9, gae_lambda=0.8, cliprange=0.1, cliprange_value=0.3, vf_coef=0.2)
PPO_LR = 0.02  # epoch 2 then clips about a third of the ratios and of the values: some, not all


def hand_gae(
    token_rewards: np.ndarray, values: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """GAE (Schulman et al. 2016) row by row over each completion, V = 0 after its last token: returns
    A + V, and A whitened over all completion tokens (TRL's masked_whiten: unbiased variance + 1e-8)."""
    gamma, lam = PPO_SETTINGS.gamma, PPO_SETTINGS.gae_lambda
    advantages = np.zeros_like(values)
    for i, length in enumerate(mask.sum(1)):
        next_value = next_advantage = 0.0
        for t in reversed(range(length)):
            delta = token_rewards[i, t] + gamma * next_value - values[i, t]
            next_advantage = advantages[i, t] = delta + gamma * lam * next_advantage
            next_value = values[i, t]
    returns = (advantages + values) * mask
    tokens = advantages[mask != 0]
    whitened = (advantages - tokens.mean()) / np.sqrt(tokens.var(ddof=1) + 1e-8)
    return whitened * mask, returns


def hand_ppo_loss(
    model: CausalLMWithValueHead,
    params: nnx.State,
    old_logps: jax.Array,
    old_values: jax.Array,
    advantages: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Token means of PPO's clipped surrogate and clipped value loss: (total, (policy, value))."""
    eps, eps_value = PPO_SETTINGS.cliprange, PPO_SETTINGS.cliprange_value
    logps, values = unpadded_outputs(model, params)
    ratio = jnp.exp(logps - old_logps)
    surrogate = -jnp.minimum(ratio * advantages, jnp.clip(ratio, 1 - eps, 1 + eps) * advantages)
    clipped_values = jnp.clip(values, old_values - eps_value, old_values + eps_value)
    value_losses = 0.5 * jnp.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    policy, value = (jnp.sum(x * mask) / jnp.sum(mask) for x in (surrogate, value_losses))
    return policy + PPO_SETTINGS.vf_coef * value, (policy, value)


def test_ppo_epochs_equal_the_hand_written_gae_clipped_losses_and_sgd(rollout):
    """Two PPO epochs with SGD on the fixed rollout, against a reference other than the sampling
    policy: rewards are the score on each completion's last token minus kl_coef * k1 KL per token,
    GAE on the sampling-time values, then PPO-clip and the clipped value loss, both token means.
    Epoch 2 is off-policy and its clips bind, for the ratio and for the values. On a (2, 2, 2) mesh,
    so the sharded PPO update is checked too (the GRPO test below compares meshes directly)."""
    model = CausalLMWithValueHead(CONFIG, rngs=nnx.Rngs(0))
    step = build_online_step(
        model,
        optax.sgd(PPO_LR),
        make_mesh(data=2, fsdp=2, tensor=2),
        reward_fns={"unused": never_called},
        sampling=sampling(),
        algorithm=PPO_SETTINGS,
        num_generations=G,
        num_iterations=2,
    )
    state = step.init()
    # On the host: the update donates the state, so its reference must not share buffers with ours.
    reference = jax.device_get(nnx.state(CausalLMWithValueHead(CONFIG, rngs=nnx.Rngs(1)), nnx.Param))
    state = state.replace(ref_params=jax.device_put(reference, step.state_shardings.ref_params))
    initial = jax.device_get(state.params)
    new_state, metrics = step.update(state, rollout)

    mask = rollout.completion_mask.astype(np.float64)
    outputs = jax.jit(lambda params: unpadded_outputs(model, params))
    old_logps, old_values = (np.asarray(x, np.float64) for x in outputs(initial))
    kl = (old_logps - np.asarray(outputs(reference)[0], np.float64)) * mask  # k1
    token_rewards = -PPO_SETTINGS.kl_coef * kl
    token_rewards[np.arange(len(REWARDS)), rollout.completion_mask.sum(1) - 1] += REWARDS
    advantages, returns = hand_gae(token_rewards, old_values, rollout.completion_mask)
    targets = [jnp.asarray(x, jnp.float32) for x in (old_logps, old_values, advantages, returns, mask)]
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p: hand_ppo_loss(model, p, *targets), has_aux=True))
    (loss_1, terms_1), grads_1 = loss_and_grad(initial)
    after_1 = jax.tree.map(lambda p, g: p - PPO_LR * g, initial, grads_1)
    (loss_2, terms_2), grads_2 = loss_and_grad(after_1)
    expected = jax.tree.map(lambda p, g: p - PPO_LR * g, after_1, grads_2)

    jax.tree.map(
        lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6),
        jax.device_get(new_state.params),
        expected,
    )
    for key, epochs in {
        "loss": (loss_1, loss_2),
        "loss/policy": (terms_1[0], terms_2[0]),
        "loss/value": (terms_1[1], terms_2[1]),
    }.items():
        np.testing.assert_allclose(float(metrics[key]), np.mean(epochs), rtol=1e-4, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(float(metrics["objective/kl"]), kl.sum(1).mean(), rtol=1e-5)
    assert 0 < float(metrics["clip_ratio/region_mean"]) < 0.5  # only epoch 2 can clip
    assert 0 < float(metrics["vf_clipfrac"]) < 0.5


# ------------------------------------------------------------------------------------------------
# Sampled steps, compilation, resume.
# ------------------------------------------------------------------------------------------------


def prompt_batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = [rng.integers(3, CONFIG.vocab_size, int(rng.integers(2, 6))).tolist() for _ in range(2)]
    ids, mask = pad(rows, 6, left=True)
    return {"prompt_ids": ids, "prompt_mask": mask}


def grpo_step(mesh: Mesh) -> OnlineStep:
    return build_online_step(
        Decoder(CONFIG, rngs=nnx.Rngs(1)),
        optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
        mesh,
        reward_fns={"sevens": count_token_seven},
        sampling=sampling(max_new_tokens=6, temperature=1.0),
        algorithm=GRPO(loss_type="grpo", beta=0.1),
        num_generations=G,
    )


@pytest.fixture(scope="module")
def grpo():
    return grpo_step(single_device_mesh())


def test_steps_move_the_policy_keep_the_reference_and_compile_once(grpo):
    state = grpo.init()
    initial = jax.device_get(state.params)
    state, metrics = grpo(state, prompt_batch(0))
    compiled = (generate_jit._cache_size(), grpo._update._cache_size())
    for seed in range(1, 4):
        state, metrics = grpo(state, prompt_batch(seed))
    assert (generate_jit._cache_size(), grpo._update._cache_size()) == compiled

    params, reference = jax.device_get((state.params, state.ref_params))
    jax.tree.map(np.testing.assert_array_equal, reference, initial)
    moved = [np.abs(p - q).max() for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(initial))]
    assert min(moved) > 0
    metrics = {k: float(v) for k, v in metrics.items()}
    assert metrics["kl"] > 0 and metrics["learning_rate"] == pytest.approx(1e-2)
    assert 0 <= metrics["frac_reward_zero_std"] <= 1 and metrics["reward"] >= 0
    assert 1 <= metrics["completions/mean_length"] <= 6
    assert (
        metrics["num_tokens"]
        == float(prompt_batch(3)["prompt_mask"].sum()) * G + metrics["completions/mean_length"] * 2 * G
    )
    for key in ("entropy", "grad_norm", "clip_ratio/region_mean", "rewards/sevens/mean", "reward_std"):
        assert np.isfinite(metrics[key]), key


def test_a_sharded_step_equals_the_single_device_step_and_trains_the_weights_in_place(grpo):
    """On a (data, fsdp, tensor) = (2, 2, 2) mesh the sampler draws the same completions and the update
    gives the same metrics and weights as on one device, updating the parameters in their sharding.
    Odd tokens are rewarded: with sevens this batch's rewards are all 0, and so is the gradient."""
    results = []
    for step in (grpo, grpo_step(make_mesh(data=2, fsdp=2, tensor=2))):
        step = dataclasses.replace(step, reward_fns={"odd": share_of_odd_tokens})  # compiled programs kept
        state = step.init()
        samples = step.sample(state, prompt_batch(0))
        state, metrics = step(state, prompt_batch(0))
        results.append((samples, metrics, state.params))
    kernel = results[1][2]["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
    assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
    (samples, metrics, params), (sharded_samples, sharded_metrics, sharded_params) = jax.device_get(results)
    assert metrics["grad_norm"] > 0
    jax.tree.map(np.testing.assert_array_equal, sharded_samples, samples)
    assert sharded_metrics.keys() == metrics.keys()
    for key, value in metrics.items():
        np.testing.assert_allclose(sharded_metrics[key], value, rtol=1e-5, atol=1e-5, err_msg=key)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, atol=1e-5), sharded_params, params)


def test_ppo_steps_train_the_policy_and_the_value_head():
    model = CausalLMWithValueHead(CONFIG, rngs=nnx.Rngs(2))
    step = build_online_step(
        model,
        optax.adam(1e-2),
        single_device_mesh(),
        reward_fns={"sevens": count_token_seven},
        sampling=sampling(max_new_tokens=6, temperature=1.0),
        algorithm=PPO(),
        num_generations=1,
        num_iterations=2,
    )
    state = step.init()
    initial = jax.device_get(state.params)
    state, first = step(state, prompt_batch(0))
    state, second = step(state, prompt_batch(1))
    assert float(first["objective/kl"]) == 0.0  # the sampling policy is still the reference
    assert float(second["objective/kl"]) != 0.0
    params, reference = jax.device_get((state.params, state.ref_params))
    jax.tree.map(np.testing.assert_array_equal, reference, initial)
    for part in ("model", "value_head"):
        moved = [
            np.abs(p - q).max() for p, q in zip(jax.tree.leaves(params[part]), jax.tree.leaves(initial[part]))
        ]
        assert min(moved) > 0, part
    for key in ("loss/policy", "loss/value", "vf_clipfrac", "clip_ratio/region_mean", "entropy", "reward"):
        assert np.isfinite(float(second[key])), key
    assert "frac_reward_zero_std" not in second  # one completion per prompt: no groups


def run(step, folder, num_steps):
    """Trains from a fresh state with a fresh checkpoint manager on ``folder``."""
    manager = make_checkpoint_manager(folder / "checkpoints", save_interval_steps=2)
    with MetricsWriter(folder / "logs", report_to="none") as writer:
        state = train(
            step.init(seed=3),
            step,
            ListIterator([prompt_batch(seed) for seed in range(4)]),
            num_steps=num_steps,
            checkpoint_manager=manager,
            metrics_writer=writer,
            progress=False,
        )
    manager.close()
    return state, writer


def test_resumed_run_equals_uninterrupted_run(grpo, tmp_path):
    full, _ = run(grpo, tmp_path / "full", 4)
    run(grpo, tmp_path / "resumed", 2)
    resumed, _ = run(grpo, tmp_path / "resumed", 4)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(full))

    def logged(folder):
        lines = (folder / "logs" / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        return {r.pop("step"): {k: v for k, v in r.items() if k != "tokens_per_second"} for r in records}

    assert logged(tmp_path / "resumed")[4] == logged(tmp_path / "full")[4]


# ------------------------------------------------------------------------------------------------
# Checks.
# ------------------------------------------------------------------------------------------------


def test_a_reward_function_must_return_one_finite_float_per_completion(grpo):
    state = grpo.init()
    samples = grpo.sample(state, prompt_batch(0))
    assert samples["completion_ids"].shape == (2 * G, 6) and samples["prompt_ids"].shape == (2 * G, 6)
    bad = {
        "short": lambda **kw: [0.0],
        "nan": lambda completion_ids, **kw: np.full(len(completion_ids), np.nan),
    }
    for name, fn in bad.items():
        step = dataclasses.replace(grpo, reward_fns={name: fn})
        with pytest.raises(ValueError, match=f"Reward function '{name}'"):
            step.score(samples, prompt_batch(0))


@pytest.mark.parametrize(
    "options,match",
    [
        ({"num_generations": 1}, "`num_generations`=1 must be >= 2"),
        ({"algorithm": OnlineDPO()}, "online DPO samples a pair"),
        ({"algorithm": PPO()}, "must be a jaxpref.models.heads.CausalLMWithValueHead"),
        ({"sampling": sampling(temperature=0.0)}, "temperature > 0"),
        ({"reward_weights": {"other": 1.0}}, "`reward_weights` names \\['other'\\]"),
        ({"num_iterations": 0}, "`num_iterations`=0"),
    ],
)
def test_bad_step_options_are_refused(options, match):
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    arguments = dict(reward_fns={"r": never_called}, sampling=sampling(), algorithm=GRPO(), num_generations=G)
    with pytest.raises(ValueError, match=match):
        build_online_step(model, optax.sgd(0.1), single_device_mesh(), **arguments | options)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: GRPO(loss_type="ppo2"), "`loss_type`='ppo2'"),
        (lambda: GRPO(loss_hparams={"epsilon": 0.2}), "unexpected hyperparameter"),
        (lambda: GRPO(advantage="rloo", scale_rewards="batch"), "`scale_rewards` applies"),
        (lambda: GRPO(beta=-1.0), "`beta`"),
        (lambda: OnlineDPO(loss_type="wpo"), "`loss_type`='wpo'"),
        (lambda: PPO(cliprange=2.0), "`cliprange`"),
    ],
)
def test_bad_algorithm_settings_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()
