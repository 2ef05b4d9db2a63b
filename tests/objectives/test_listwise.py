"""Listwise objectives against float64 NumPy references written from the papers' formulas.

Also: jit/vmap against eager, gradients against finite differences, masks (padding is invisible),
deterministic ties, the K = 2 reductions to DPO / IPO / SimPO and input errors.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.objectives import multi_response_loss, pairwise_loss
from jaxpref.objectives.listwise import (
    LISTWISE,
    curriculum_pairs,
    infonca_loss,
    listwise_loss,
    mdpo_loss,
    mipo_loss,
    nca_loss,
    pro_loss,
)

from .helpers import as_f32_exact, assert_close, assert_grads_close, numerical_grad, stack, to_jax

BATCH, K = 5, 4


# ------------------------------------------------------------------------------------------------
# float64 references, one prompt at a time, from the formulas in the papers.
# ------------------------------------------------------------------------------------------------


def ranking(values, valid):
    """Slots of the valid responses, best first; ties keep slot order (a stable descending sort)."""
    return sorted((i for i in range(len(values)) if valid[i]), key=lambda i: (-values[i], i))


def logsumexp(values):
    return float(np.logaddexp.reduce(np.asarray(values, np.float64)))


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def implicit_rewards(inputs, beta):
    policy = inputs["policy_logps"]
    return beta * (policy - inputs["ref_logps"] if "ref_logps" in inputs else policy)


def per_prompt(fn):
    """Applies ``fn(row_inputs) -> float`` to every prompt of a [batch, K] input dict."""

    def batched(inputs, **hparams):
        batch = inputs["policy_logps"].shape[0]
        return np.array([fn({k: v[b] for k, v in inputs.items()}, **hparams) for b in range(batch)])

    return batched


@per_prompt
def ref_plackett_luce(row, beta=0.1, top_k=None):
    u = implicit_rewards(row, beta)
    order = ranking(row["scores"], row["mask"])
    positions = len(order) if top_k is None else min(top_k, len(order))
    return -sum(u[order[k]] - logsumexp(u[order[k:]]) for k in range(positions))


def _dcg_weighted_pairs(row, beta, weighted, rank_by):
    u, psi, valid = implicit_rewards(row, beta), row["scores"], row["mask"]
    order = ranking(u if rank_by == "policy" else psi, valid)
    tau = {slot: position + 1 for position, slot in enumerate(order)}
    loss = 0.0
    for i in order:
        for j in order:
            if psi[i] > psi[j]:
                weight = 1.0
                if weighted:
                    gains = abs((2.0 ** psi[i] - 1.0) - (2.0 ** psi[j] - 1.0))
                    weight = gains * abs(1.0 / math.log2(1 + tau[i]) - 1.0 / math.log2(1 + tau[j]))
                loss += weight * np.logaddexp(0.0, -(u[i] - u[j]))
    return loss


@per_prompt
def ref_lipo_lambda(row, beta=0.1, lambda_weighting=True):
    return _dcg_weighted_pairs(row, beta, lambda_weighting, "policy")


@per_prompt
def ref_rank_dpo(row, beta=0.1, rank_by="policy"):
    return _dcg_weighted_pairs(row, beta, True, rank_by)


@per_prompt
def ref_mpo(row, beta=0.1, alpha=1.0):
    u, psi = implicit_rewards(row, beta), row["scores"]
    slots = [i for i in range(len(psi)) if row["mask"][i]]
    mean = np.mean([psi[i] for i in slots]) if slots else 0.0
    positives = [i for i in slots if psi[i] > mean]
    negatives = [i for i in slots if psi[i] <= mean]
    if not positives or not negatives:
        return 0.0
    weighted = {i: math.exp(alpha * abs(psi[i] - mean)) * math.exp(u[i]) for i in slots}
    top = sum(weighted[i] for i in positives)
    return -math.log(top / (top + sum(weighted[j] for j in negatives)))


@per_prompt
def ref_pro(row, sft_weight=0.05, scale_sft_by_list_size=True, score_temperature=True):
    r = row["policy_logps"] / np.maximum(row["lengths"], 1.0)
    psi = row["scores"]
    order = ranking(psi, row["mask"])
    loss = 0.0
    for k in range(len(order) - 1):
        anchor, rest = order[k], order[k + 1 :]
        if score_temperature:
            inverse_t = {i: psi[anchor] - psi[i] for i in rest}  # 1 / T_k^i
            inverse_t[anchor] = max(inverse_t.values())  # T_k^k = min_i T_k^i
        else:
            inverse_t = dict.fromkeys(order[k:], 1.0)
        numerator = r[anchor] * inverse_t[anchor]
        loss += logsumexp([r[i] * inverse_t[i] for i in order[k:]]) - numerator
    if order:
        weight = sft_weight * (len(order) - 1) ** 2 if scale_sft_by_list_size else sft_weight
        loss += weight * -row["policy_logps"][order[0]]
    return loss


def _group_means(row, lengths):
    h = row["policy_logps"] - row["ref_logps"] if "ref_logps" in row else row["policy_logps"]
    if lengths:
        h = h / np.maximum(row["lengths"], 1.0)
    chosen = [h[i] for i in range(len(h)) if row["mask"][i] and row["chosen"][i]]
    rejected = [h[i] for i in range(len(h)) if row["mask"][i] and not row["chosen"][i]]
    return (np.mean(chosen), np.mean(rejected)) if chosen and rejected else None


@per_prompt
def ref_mdpo(row, beta=0.1):
    means = _group_means(row, lengths=False)
    return 0.0 if means is None else -log_sigmoid(beta * (means[0] - means[1]))


@per_prompt
def ref_mipo(row, beta=0.1):
    means = _group_means(row, lengths="lengths" in row)
    return 0.0 if means is None else (means[0] - means[1] - 1.0 / (2.0 * beta)) ** 2


def _targets_and_rewards(row, beta, alpha):
    slots = [i for i in range(len(row["scores"])) if row["mask"][i]]
    psi = np.array([row["scores"][i] for i in slots]) / alpha
    targets = np.exp(psi - logsumexp(psi))
    return targets, implicit_rewards(row, beta)[slots]


@per_prompt
def ref_infonca(row, beta=0.1, alpha=1.0):
    targets, u = _targets_and_rewards(row, beta, alpha)
    return -np.sum(targets * (u - logsumexp(u)))


@per_prompt
def ref_nca(row, beta=0.1, alpha=1.0):
    targets, u = _targets_and_rewards(row, beta, alpha)
    return -np.sum(targets * log_sigmoid(u)) - np.mean(log_sigmoid(-u))


def ref_curriculum_pairs(scores, mask, pairing):
    """Lists of (chosen, rejected, gap) per prompt, sorted as the docstring says."""
    out = []
    for psi, valid in zip(scores, mask):
        slots = [i for i in range(len(psi)) if valid[i]]
        if pairing == "best_vs_rest":
            best = ranking(psi, valid)[0] if slots else None
            candidates = [(best, j) for j in slots if j != best]
        else:
            candidates = [(a, b) if psi[a] >= psi[b] else (b, a) for a in slots for b in slots if a < b]
        pairs = [(c, r, psi[c] - psi[r]) for c, r in candidates if psi[c] > psi[r]]
        out.append(sorted(pairs, key=lambda pair: -pair[2]))  # sorted() is stable
    return out


# ------------------------------------------------------------------------------------------------
# Inputs and calls.
# ------------------------------------------------------------------------------------------------


def make_inputs(kind, seed=0, *, batch=BATCH, num=K, ref=True, lengths=False, ragged=True):
    """Ragged [batch, num] lists with NaN in masked slots, integer-valued ratings (ties included)."""
    rng = np.random.default_rng([seed, batch, num, sum(map(ord, kind))])
    mask = (rng.random((batch, num)) < 0.75) | (not ragged)
    mask[:, :2] = True  # at least two real responses per prompt
    if ragged and batch > 2:
        mask[-1, 1:] = False  # and one prompt with a single response
    policy = rng.uniform(-60.0, -1.0, (batch, num))
    inputs = {"policy_logps": policy, "mask": mask}
    if ref and kind != "pro":
        inputs["ref_logps"] = np.minimum(policy + rng.uniform(-3.0, 3.0, policy.shape), -0.1)
    if kind in ("mdpo", "mipo"):
        inputs["chosen"] = rng.random((batch, num)) < 0.5
        inputs["chosen"][:, 0], inputs["chosen"][:, 1] = True, False
    else:
        # Ratings 1..6 with a fractional part on half the prompts: ties occur, as in real ratings.
        scores = rng.integers(1, 7, (batch, num)).astype(np.float64)
        scores[::2] += rng.uniform(0.0, 0.9, scores[::2].shape)
        inputs["scores"] = scores
    if kind == "pro" or lengths:
        inputs["lengths"] = rng.integers(1, 40, (batch, num)).astype(np.float64)
    for key, value in inputs.items():
        if value.dtype == np.float64:
            inputs[key] = np.where(mask, as_f32_exact(value), np.nan)  # padding is garbage
    return inputs


ENTRY_POINTS = {
    "pro": pro_loss,
    "mdpo": mdpo_loss,
    "mipo": mipo_loss,
    "infonca": infonca_loss,
    "nca": nca_loss,
}
REFERENCES = {
    "plackett_luce": ref_plackett_luce,
    "lipo_lambda": ref_lipo_lambda,
    "rank_dpo": ref_rank_dpo,
    "mpo": ref_mpo,
    "pro": ref_pro,
    "mdpo": ref_mdpo,
    "mipo": ref_mipo,
    "infonca": ref_infonca,
    "nca": ref_nca,
}


def call(name, inputs, **hparams):
    if name in LISTWISE:
        return listwise_loss(name, **inputs, **hparams)
    return ENTRY_POINTS[name](**inputs, **hparams)


def reference(name, inputs, **hparams):
    valid_inputs = {
        k: np.where(inputs["mask"], v, 0.0) if v.dtype == np.float64 else v for k, v in inputs.items()
    }
    return REFERENCES[name](valid_inputs, **hparams)


# (name, hyperparameters, input options)
CASES = [
    ("plackett_luce", {}, {}),
    ("plackett_luce", {"beta": 0.5, "top_k": 2}, {}),
    ("plackett_luce", {"beta": 0.05}, {"ref": False}),
    ("lipo_lambda", {}, {}),
    ("lipo_lambda", {"beta": 0.3, "lambda_weighting": False}, {}),
    ("rank_dpo", {}, {}),
    ("rank_dpo", {"beta": 0.3, "rank_by": "scores"}, {"ref": False}),
    ("mpo", {}, {}),
    ("mpo", {"beta": 0.3, "alpha": 0.0}, {}),
    ("pro", {}, {}),
    ("pro", {"sft_weight": 0.5, "scale_sft_by_list_size": False, "score_temperature": False}, {}),
    ("mdpo", {}, {}),
    ("mdpo", {"beta": 0.5}, {"ref": False}),
    ("mipo", {}, {}),
    ("mipo", {"beta": 0.5}, {"lengths": True}),
    ("infonca", {}, {}),
    ("nca", {"beta": 0.3, "alpha": 0.5}, {}),
]


def case_id(case):
    name, hparams, options = case
    return "-".join([name, *(f"{k}={v}" for k, v in {**hparams, **options}.items())])


CASE_IDS = [case_id(case) for case in CASES]
CASES_BY_ID = dict(zip(CASE_IDS, CASES))


def call_case(cid, inputs):
    name, hparams, _ = CASES_BY_ID[cid]
    return call(name, inputs, **hparams)


def grad_case(cid, inputs):
    """d(sum of losses) / d(policy_logps, ref_logps)."""
    keys = [key for key in ("policy_logps", "ref_logps") if key in inputs]
    return jax.grad(lambda logps: call_case(cid, {**inputs, **logps})[0].sum())({k: inputs[k] for k in keys})


def compiled(fn):
    """One XLA program evaluating ``fn(case_id, inputs)`` for every case of a dict: XLA compiles
    dominate this file's run time, so each input shape is compiled once for all cases."""
    return jax.jit(lambda all_inputs: {cid: fn(cid, inputs) for cid, inputs in all_inputs.items()})


@pytest.fixture(scope="module")
def batches():
    """Two input batches per case (seeds 0 and 1), as NumPy."""
    return {
        cid: [make_inputs(name, seed, **options) for seed in (0, 1)]
        for cid, (name, _, options) in CASES_BY_ID.items()
    }


@pytest.fixture(scope="module")
def vmapped_results(batches):
    """jit(vmap(loss)) over the two stacked batches of every case: ``{cid: (losses, metrics)}``."""
    stacked = {cid: to_jax(stack(pair)) for cid, pair in batches.items()}
    return compiled(jax.vmap(call_case, in_axes=(None, 0)))(stacked)


@pytest.fixture(scope="module")
def compiled_grads(batches):
    return compiled(grad_case)({cid: to_jax(pair[0]) for cid, pair in batches.items()})


# ------------------------------------------------------------------------------------------------
# Values, gradients, transforms.
# ------------------------------------------------------------------------------------------------


def test_every_listwise_objective_has_a_case():
    assert set(LISTWISE) == {"plackett_luce", "lipo_lambda", "rank_dpo", "mpo"}
    assert set(REFERENCES) == {name for name, _, _ in CASES}


@pytest.mark.parametrize("cid", CASE_IDS)
def test_losses_match_reference(cid, batches, vmapped_results):
    name, hparams, _ = CASES_BY_ID[cid]
    losses, metrics = vmapped_results[cid]
    assert losses.shape == (2, BATCH) and losses.dtype == jnp.float32
    assert all(np.all(np.isfinite(np.asarray(v))) for v in (losses, *metrics.values()))
    for i, inputs in enumerate(batches[cid]):
        assert_close(losses[i], reference(name, inputs, **hparams))


@pytest.mark.parametrize("cid", CASE_IDS)
def test_eager_matches_jit_of_vmap(cid, batches, vmapped_results):
    eager = call_case(cid, batches[cid][1])
    jax.tree.map(lambda e, m: assert_close(e, m[1]), eager, vmapped_results[cid])


@pytest.mark.parametrize("cid", CASE_IDS)
def test_grad_matches_finite_differences(cid, batches, compiled_grads):
    """jax.grad (float32) against central differences of the float64 reference; padding gets 0."""
    name, hparams, _ = CASES_BY_ID[cid]
    inputs = batches[cid][0]
    grads = {key: np.asarray(value, np.float64) for key, value in compiled_grads[cid].items()}
    expected = numerical_grad(lambda x: reference(name, x, **hparams), inputs, list(grads))
    for key, grad in grads.items():
        assert np.all(grad[~inputs["mask"]] == 0.0), key  # NaN padding: exactly no gradient
    assert_grads_close(grads, expected)


def test_metrics_match_reference_and_carry_no_gradient(batches):
    inputs = batches[case_id(("lipo_lambda", {}, {}))][0]
    jax_inputs = to_jax(inputs)
    _, metrics = listwise_loss("lipo_lambda", **inputs, beta=0.2)
    rewards = np.where(inputs["mask"], 0.2 * (inputs["policy_logps"] - inputs["ref_logps"]), 0.0)
    assert_close(metrics["rewards"], rewards)
    for b in range(BATCH):
        valid, psi = inputs["mask"][b], inputs["scores"][b]
        pairs = [(i, j) for i in range(K) for j in range(K) if valid[i] and valid[j] and psi[i] > psi[j]]
        agree = sum(rewards[b, i] > rewards[b, j] for i, j in pairs)
        assert metrics["rewards/pair_accuracies"][b] == pytest.approx(agree / max(len(pairs), 1))
        best_by_score = ranking(psi, valid)[0]
        best_by_model = ranking(rewards[b], valid)[0]
        assert metrics["rewards/accuracies"][b] == float(best_by_score == best_by_model)

    def metric_total(policy):
        _, metrics = listwise_loss("lipo_lambda", **{**jax_inputs, "policy_logps": policy})
        return sum(value.sum() for value in metrics.values())

    assert not np.any(np.asarray(jax.grad(metric_total)(jax_inputs["policy_logps"])))


def test_pro_metrics_split_the_loss_and_match_unnormalised_plackett_luce(batches):
    inputs = batches[case_id(("pro", {}, {}))][0]
    losses, metrics = pro_loss(**inputs)
    assert_close(metrics["loss/rank"] + metrics["loss/sft"], losses)
    # With T = 1 and no SFT term, PRO is reference-free Plackett-Luce on length-normalised log-probs.
    losses, _ = pro_loss(**inputs, sft_weight=0.0, score_temperature=False)
    normalised = inputs["policy_logps"] / np.maximum(inputs["lengths"], 1.0)
    pl_losses, _ = listwise_loss(
        "plackett_luce", policy_logps=normalised, scores=inputs["scores"], mask=inputs["mask"], beta=1.0
    )
    assert_close(losses, pl_losses)


def test_wrappers_are_the_multi_response_objectives(batches):
    inputs = batches[case_id(("infonca", {}, {}))][0]
    for name, wrapper in (("infonca", infonca_loss), ("nca", nca_loss)):
        expected = multi_response_loss(name, **inputs, beta=0.2, alpha=0.7)
        jax.tree.map(assert_close, wrapper(**inputs, beta=0.2, alpha=0.7), expected)


def test_bfloat16_inputs_are_upcast(batches):
    inputs = batches[case_id(("plackett_luce", {}, {}))][0]
    bf16 = to_jax(inputs, jnp.bfloat16)
    losses, _ = listwise_loss("plackett_luce", **bf16)
    assert losses.dtype == jnp.float32
    rounded = {
        k: np.asarray(v, np.float64) if v.dtype == jnp.bfloat16 else inputs[k] for k, v in bf16.items()
    }
    assert_close(losses, reference("plackett_luce", rounded))


# ------------------------------------------------------------------------------------------------
# Reductions, masks and ties.
# ------------------------------------------------------------------------------------------------

BETA = 0.3
# (name, hyperparameters) of K = 2 lists that must equal DPO, possibly times LiPO's weight.
DPO_REDUCTIONS = [
    ("plackett_luce", {}),
    ("plackett_luce", {"top_k": 1}),
    ("lipo_lambda", {"lambda_weighting": False}),
    ("lipo_lambda", {}),
    ("rank_dpo", {}),
    ("rank_dpo", {"rank_by": "scores"}),
    ("mpo", {"alpha": 0.0}),
    ("mpo", {"alpha": 2.0}),
]


@pytest.fixture(scope="module")
def two_responses():
    """K = 2 lists (slot 0 strictly better), the same data as pairs, and every loss in one program."""
    rng = np.random.default_rng(7)
    policy = as_f32_exact(rng.uniform(-60.0, -1.0, (BATCH, 2)))
    ref = as_f32_exact(np.minimum(policy + rng.uniform(-3.0, 3.0, policy.shape), -0.1))
    scores = as_f32_exact(np.stack([rng.uniform(3.0, 6.0, BATCH), rng.uniform(0.0, 2.9, BATCH)], axis=1))
    lengths = rng.integers(1, 40, (BATCH, 2)).astype(np.float64)
    one_each = np.tile([True, False], (BATCH, 1))
    listwise = {"policy_logps": policy, "ref_logps": ref, "scores": scores}
    pairwise = {
        "policy_chosen_logps": policy[:, 0],
        "policy_rejected_logps": policy[:, 1],
        "ref_chosen_logps": ref[:, 0],
        "ref_rejected_logps": ref[:, 1],
        "chosen_lengths": lengths[:, 0],
        "rejected_lengths": lengths[:, 1],
    }

    @jax.jit
    def losses(listwise, pairwise, lengths):
        group = {
            "policy_logps": listwise["policy_logps"],
            "ref_logps": listwise["ref_logps"],
            "chosen": one_each,
        }
        pro_inputs = {"policy_logps": listwise["policy_logps"], "lengths": lengths, "scores": listwise["scores"]}
        # PRO's score temperature for K = 2 is 1/T = score gap on both terms: DPO's logits times the gap.
        gap = listwise["scores"][:, 0] - listwise["scores"][:, 1]
        gap_scaled = {
            **pairwise,
            "policy_chosen_logps": gap * pairwise["policy_chosen_logps"],
            "policy_rejected_logps": gap * pairwise["policy_rejected_logps"],
        }
        return {
            "listwise": [listwise_loss(name, **listwise, beta=BETA, **hp)[0] for name, hp in DPO_REDUCTIONS],
            "dpo": pairwise_loss("sigmoid", **pairwise, beta=BETA)[0],
            "ipo": pairwise_loss("ipo", **pairwise, beta=BETA)[0],
            "mdpo": mdpo_loss(**group, beta=BETA)[0],
            "mipo": mipo_loss(**group, lengths=lengths, beta=BETA)[0],
            "pro": pro_loss(**pro_inputs, sft_weight=0.0, score_temperature=False)[0],
            "pro_tempered": pro_loss(**pro_inputs, sft_weight=0.0)[0],
            "simpo": pairwise_loss("simpo", **pairwise, beta=1.0, gamma=0.0)[0],
            "simpo_gap_scaled": pairwise_loss("simpo", **gap_scaled, beta=1.0, gamma=0.0)[0],
        }

    return scores, losses(to_jax(listwise), to_jax(pairwise), jnp.asarray(lengths, jnp.float32))


def test_two_responses_reduce_to_dpo(two_responses):
    scores, losses = two_responses
    lambda_weight = np.abs(2.0 ** scores[:, 0] - 2.0 ** scores[:, 1]) * (1.0 - 1.0 / math.log2(3.0))
    for (name, hparams), listwise in zip(DPO_REDUCTIONS, losses["listwise"]):
        weighted = name in ("lipo_lambda", "rank_dpo") and hparams.get("lambda_weighting", True)
        expected = (lambda_weight if weighted else 1.0) * np.asarray(losses["dpo"])
        assert_close(listwise, expected, err_msg=f"{name} {hparams}")
    assert_close(losses["mdpo"], losses["dpo"])  # one chosen, one rejected


def test_pro_of_two_responses_is_reference_free_simpo(two_responses):
    """PRO has no reference model: K = 2 gives SimPO (beta = 1, gamma = 0), not DPO."""
    _, losses = two_responses
    assert_close(losses["pro"], losses["simpo"])
    assert_close(losses["pro_tempered"], losses["simpo_gap_scaled"])


def test_one_chosen_and_one_rejected_reduce_to_ipo(two_responses):
    _, losses = two_responses
    assert_close(losses["mipo"], losses["ipo"])


def test_rank_dpo_ranked_by_the_policy_is_lipo_lambda(batches):
    inputs = batches[case_id(("lipo_lambda", {}, {}))][0]
    assert_close(listwise_loss("rank_dpo", **inputs)[0], listwise_loss("lipo_lambda", **inputs)[0])


def test_top_k_covering_the_list_is_the_full_likelihood(batches):
    inputs = batches[case_id(("plackett_luce", {}, {}))][0]
    full, _ = listwise_loss("plackett_luce", **inputs)
    assert_close(listwise_loss("plackett_luce", **inputs, top_k=K)[0], full)
    assert_close(listwise_loss("plackett_luce", **inputs, top_k=100)[0], full)


@pytest.fixture(scope="module")
def padded_and_short():
    """Full K = 4 lists with slot 2 padded (NaN, masked), and the K = 3 lists without slot 2."""
    padded, short = {}, {}
    for cid, (name, _, options) in CASES_BY_ID.items():
        inputs = make_inputs(name, seed=11, ragged=False, **options)
        short[cid] = {k: np.delete(v, 2, axis=1) for k, v in inputs.items() if k != "mask"}
        padded[cid] = {k: v.copy() for k, v in inputs.items()}
        padded[cid]["mask"][:, 2] = False
        for value in padded[cid].values():
            if value.dtype == np.float64:
                value[:, 2] = np.nan
    return compiled(lambda cid, pair: [call_case(cid, inputs)[0] for inputs in pair])(
        {cid: (to_jax(padded[cid]), to_jax(short[cid])) for cid in CASE_IDS}
    )


@pytest.mark.parametrize("cid", CASE_IDS)
def test_padded_list_equals_the_shorter_list(cid, padded_and_short):
    padded_losses, short_losses = padded_and_short[cid]
    assert np.all(np.isfinite(np.asarray(padded_losses)))
    assert_close(padded_losses, short_losses)  # gradients at padding: test_grad_matches_finite_differences


def lists(*rows):
    """[BATCH, K] arrays from rows of up to K values; missing slots are NaN and masked."""
    rows = [list(row) + [np.nan] * (K - len(row)) for row in rows]
    values = np.array([rows[min(b, len(rows) - 1)] for b in range(BATCH)], np.float64)
    return values, ~np.isnan(values)


def test_prompts_without_a_preference_cost_nothing():
    # All tied, a single response, no response at all (all padding), then ordinary lists.
    policy, mask = lists([-5.0, -7.0, -9.0], [-5.0], [], [-5.0, -7.0, -9.0])
    scores, _ = lists([2.0, 2.0, 2.0], [4.0], [], [3.0, 1.0, 2.0])
    for name in ("lipo_lambda", "rank_dpo", "mpo", "plackett_luce"):
        losses, _ = listwise_loss(name, policy_logps=policy, scores=scores, mask=mask)
        assert float(losses[1]) == 0.0 and float(losses[2]) == 0.0 and float(losses[3]) > 0.0, name
        assert (float(losses[0]) == 0.0) == (name != "plackett_luce"), name  # PL still ranks ties
    losses, _ = pro_loss(policy_logps=policy, lengths=np.ones_like(policy), scores=scores, mask=mask)
    assert float(losses[1]) == float(losses[2]) == 0.0  # SFT weight 0.05 (n - 1)^2 vanishes for n <= 1
    chosen_only = np.ones(policy.shape, bool)  # no rejected set
    assert not np.any(np.asarray(mdpo_loss(policy_logps=policy, chosen=chosen_only, mask=mask)[0]))


def test_ties_are_ranked_in_slot_order():
    """Equal scores: the earlier slot ranks first, for Plackett-Luce and PRO alike."""
    (policy, mask), (lengths, _) = lists([-5.0, -4.0, -9.0]), lists([2.0, 3.0, 4.0])
    tied, ordered, swapped = (lists(row)[0] for row in ([3.0, 3.0, 1.0], [3.0, 2.0, 1.0], [2.0, 3.0, 1.0]))

    def pl(scores):
        return float(
            listwise_loss("plackett_luce", policy_logps=policy, scores=scores, mask=mask, beta=1.0)[0][0]
        )

    def pro(scores):
        inputs = {"policy_logps": policy, "lengths": lengths, "scores": scores, "mask": mask}
        return float(pro_loss(**inputs, score_temperature=False)[0][0])

    assert pl(tied) == pl(ordered) != pl(swapped)
    assert pro(tied) == pro(ordered) != pro(swapped)
    # Pairwise objectives skip the tied pair: only (0, 2) and (1, 2) count.
    lipo, _ = listwise_loss(
        "lipo_lambda", policy_logps=policy, scores=tied, mask=mask, beta=1.0, lambda_weighting=False
    )
    assert lipo[0] == pytest.approx(np.logaddexp(0.0, -4.0) + np.logaddexp(0.0, -5.0), rel=1e-6)


def test_permuting_responses_with_distinct_scores_changes_nothing(batches):
    permutation = np.array([2, 0, 3, 1])
    for cid in CASE_IDS:
        inputs = dict(batches[cid][0])
        if "scores" in inputs:  # distinct scores: the ranking does not depend on slot order
            inputs["scores"] = np.where(inputs["mask"], inputs["scores"] + np.arange(K) * 1e-2, np.nan)
        permuted = {k: v[:, permutation] for k, v in inputs.items()}
        assert_close(call_case(cid, permuted)[0], call_case(cid, inputs)[0], err_msg=cid)


# ------------------------------------------------------------------------------------------------
# Curry-DPO pairs.
# ------------------------------------------------------------------------------------------------


PAIRINGS = ("best_vs_rest", "all")


@pytest.fixture(scope="module")
def curry_inputs_and_pairs():
    inputs = make_inputs("curry", seed=4)
    scores, mask = inputs["scores"], inputs["mask"]
    scores[0] = [5.0, 2.0, 5.0, 3.0]  # tie for best: the earlier slot is chosen, the tie is no pair
    mask[0] = True
    compiled_pairs = jax.jit(lambda s, m: {p: curriculum_pairs(s, m, pairing=p) for p in PAIRINGS})(
        scores, mask
    )
    return scores, mask, compiled_pairs


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_curriculum_pairs_match_reference(pairing, curry_inputs_and_pairs):
    scores, mask, compiled_pairs = curry_inputs_and_pairs
    result = compiled_pairs[pairing]
    num_pairs = K - 1 if pairing == "best_vs_rest" else K * (K - 1) // 2
    assert all(x.shape == (BATCH, num_pairs) for x in result)
    eager = curriculum_pairs(scores, mask, pairing=pairing)
    jax.tree.map(lambda a, e: np.testing.assert_array_equal(np.asarray(a), np.asarray(e)), result, eager)
    for b, expected in enumerate(ref_curriculum_pairs(np.nan_to_num(scores), mask, pairing)):
        count = len(expected)
        assert np.asarray(result.valid[b]).tolist() == [True] * count + [False] * (num_pairs - count)
        assert np.asarray(result.chosen_index[b, :count]).tolist() == [c for c, _, _ in expected]
        assert np.asarray(result.rejected_index[b, :count]).tolist() == [r for _, r, _ in expected]
        assert_close(result.score_gap[b, :count], [g for _, _, g in expected])
        assert np.all(np.asarray(result.chosen_index[b, count:]) == -1)
        assert np.all(np.asarray(result.score_gap[b, count:]) == 0.0)
    if pairing == "best_vs_rest":
        assert np.asarray(result.chosen_index[0]).tolist() == [0, 0, -1]  # slot 2 ties slot 0
        assert np.asarray(result.rejected_index[0]).tolist() == [1, 3, -1]  # gap 3 then gap 2


# ------------------------------------------------------------------------------------------------
# Errors.
# ------------------------------------------------------------------------------------------------

GOOD = make_inputs("plackett_luce")


@pytest.mark.parametrize(
    "name, changes, match",
    [
        ("plackett", {}, "`name`='plackett'"),
        ("mpo", {"gamma": 1.0}, "gamma"),
        ("mpo", {"policy_logps": np.zeros(2)}, "`policy_logps` must have 2"),
        ("mpo", {"scores": np.zeros((2, 3))}, "`scores` has shape"),
        ("mpo", {"ref_logps": np.zeros((3, 4))}, "`ref_logps` has shape"),
        ("mpo", {"mask": np.ones((2, 3), bool)}, "`mask` has shape"),
        ("mpo", {"scores": np.full((BATCH, K), np.nan)}, "`scores` holds NaN"),
        ("mpo", {"scores": None}, "`scores` is required"),
        ("mpo", {"beta": 0.0}, "`beta`"),
        ("mpo", {"alpha": -1.0}, "`alpha`"),
        ("plackett_luce", {"top_k": 0}, "`top_k`"),
        ("plackett_luce", {"top_k": 1.5}, "`top_k`"),
        ("rank_dpo", {"rank_by": "reward"}, "`rank_by`"),
    ],
)
def test_listwise_errors_name_the_argument(name, changes, match):
    with pytest.raises(ValueError, match=match):
        listwise_loss(name, **{**GOOD, **changes})


@pytest.mark.parametrize(
    "fn, changes, match",
    [
        (pro_loss, {"lengths": np.ones((2, 3))}, "`lengths` has shape"),
        (pro_loss, {"lengths": None}, "`lengths` is required"),
        (pro_loss, {"sft_weight": -0.1}, "`sft_weight`"),
        (mdpo_loss, {"chosen": np.full((BATCH, K), 0.5)}, "`chosen` must be booleans"),
        (mdpo_loss, {"chosen": None}, "`chosen` is required"),
        (mipo_loss, {"chosen": np.ones((2, 3), bool)}, "`chosen` has shape"),
        (mipo_loss, {"beta": -1.0}, "`beta`"),
        (infonca_loss, {"alpha": 0.0}, "`alpha`"),
    ],
)
def test_other_errors_name_the_argument(fn, changes, match):
    inputs = {"policy_logps": GOOD["policy_logps"], "mask": GOOD["mask"]}
    if fn is pro_loss:
        inputs |= {"scores": GOOD["scores"], "lengths": np.ones((BATCH, K))}
    elif fn is infonca_loss:
        inputs |= {"scores": GOOD["scores"], "ref_logps": GOOD["ref_logps"]}
    else:
        inputs |= {"chosen": np.tile([True, False, True, False], (BATCH, 1))}
    with pytest.raises(ValueError, match=match):
        fn(**{**inputs, **changes})


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((GOOD["scores"],), {"pairing": "adjacent"}, "`pairing`"),
        ((np.zeros(4),), {}, "`scores` must have 2"),
        ((GOOD["scores"], np.ones((2, 3), bool)), {}, "`mask` has shape"),
    ],
)
def test_curriculum_pairs_errors_name_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        curriculum_pairs(*args, **kwargs)
