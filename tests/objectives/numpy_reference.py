"""Independent float64 NumPy references for :mod:`jaxpref.objectives`, written from the formulas.

These are deliberately written from the math (the papers, TRL 1.x and the conventions the library's
docstrings state), not by translating the JAX code: per-row loops where that is the clearest reading
of a definition, totals instead of incremental updates, and so on.

Every loss reference takes ``inputs``, a dict of float64 arrays keyed by the library's argument
names (``policy_chosen_logps``, ``ref_logps``, ``chosen_mask``, ...), plus hyperparameters under the
library's names and defaults, and returns per-example losses.

Notation: ``h = log pi(y) - log pi_ref(y)`` (log-ratio), ``s(h)`` the f-divergence score,
``|y|`` the completion length clamped to at least 1 where it divides.
"""

from __future__ import annotations

import numpy as np

LN2 = np.log(2.0)
EXP_CLAMP = 40.0  # documented clamp of exponents in f-divergence scores and AlphaPO rewards


def log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def logistic(x):
    return np.exp(log_sigmoid(x))


def log1mexp(x):
    """log(1 - e^x) for x < 0; float64 is accurate enough without branch splitting here."""
    return np.log(-np.expm1(x))


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


# ------------------------------------------------------------------------------------------------
# Token-to-sequence reductions and weights.
# ------------------------------------------------------------------------------------------------


def _completion_tokens(token_logps, mask):
    """Each row's completion-token log-probs, in order (masked positions never read)."""
    mask = np.asarray(mask, bool)
    return [np.asarray(row, np.float64)[keep] for row, keep in zip(token_logps, mask)]


def sequence_logps(token_logps, mask, reduction="sum", ld_alpha=None, shared_lengths=None):
    rows = _completion_tokens(token_logps, mask)
    if reduction == "sum":
        return np.array([row.sum() for row in rows])
    if reduction == "mean":
        return np.array([row.sum() / max(len(row), 1) for row in rows])
    assert reduction == "ld_dpo"
    # First l_s completion tokens at weight 1, the rest at weight alpha.
    return np.array([row[:k].sum() + ld_alpha * row[k:].sum() for row, k in zip(rows, shared_lengths)])


def ld_pair_logps(chosen_tokens, chosen_mask, rejected_tokens, rejected_mask, ld_alpha):
    shared = np.minimum(np.sum(chosen_mask, -1), np.sum(rejected_mask, -1)).astype(int)
    return (
        sequence_logps(chosen_tokens, chosen_mask, "ld_dpo", ld_alpha, shared),
        sequence_logps(rejected_tokens, rejected_mask, "ld_dpo", ld_alpha, shared),
    )


def token_log_sum_squared_probs(logits):
    """log sum_v p_v^2 per position, from the probabilities themselves."""
    logits = np.asarray(logits, np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.log(np.sum(probs**2, -1))


def wpo_weights(token_logps, log_sum_squared_probs, mask):
    """Geometric mean over completion tokens of p_t / sum_v p_v^2 (1 for an empty completion)."""
    aligned = np.asarray(token_logps, np.float64) - np.asarray(log_sum_squared_probs, np.float64)
    return np.exp(sequence_logps(aligned, mask, "mean"))


def f_divergence_scores(logratios, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """f'(e^h) for the four divergences, TRL 1.x constants (log 2 in js, -1 in forward/alpha)."""
    h = np.asarray(logratios, np.float64)
    if f_divergence_type == "reverse_kl":
        return h
    if f_divergence_type == "forward_kl":
        return 1.0 - np.exp(np.minimum(-h, EXP_CLAMP))
    if f_divergence_type == "js_divergence":
        return LN2 + log_sigmoid(h)
    assert f_divergence_type == "alpha_divergence"
    a = f_alpha_divergence_coef
    if abs(a - 1.0) < 1e-6:
        return h
    return (np.exp(np.minimum((a - 1.0) * h, EXP_CLAMP)) - 1.0) / (a - 1.0)


# ------------------------------------------------------------------------------------------------
# Pairwise objectives.
# ------------------------------------------------------------------------------------------------

PAIRWISE = {}


def _pairwise(fn):
    PAIRWISE[fn.__name__] = fn
    return fn


def _logratios(x):
    return (
        x["policy_chosen_logps"] - x["ref_chosen_logps"],
        x["policy_rejected_logps"] - x["ref_rejected_logps"],
    )


def _lengths(x):
    return np.maximum(x["chosen_lengths"], 1.0), np.maximum(x["rejected_lengths"], 1.0)


def _avg_logps(x):
    chosen_len, rejected_len = _lengths(x)
    return x["policy_chosen_logps"] / chosen_len, x["policy_rejected_logps"] / rejected_len


def _score_pair(x, f_divergence_type, f_alpha_divergence_coef):
    h_w, h_l = _logratios(x)
    return (
        f_divergence_scores(h_w, f_divergence_type, f_alpha_divergence_coef),
        f_divergence_scores(h_l, f_divergence_type, f_alpha_divergence_coef),
    )


def _score_margin(x, f_divergence_type, f_alpha_divergence_coef):
    s_w, s_l = _score_pair(x, f_divergence_type, f_alpha_divergence_coef)
    return s_w - s_l


def _label_smoothed(z, eps):
    return -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


def _batch_nll(x):
    """The batch token-mean NLL of chosen responses, -sum lp / sum |y|, repeated for every pair (TRL)."""
    total_tokens = max(float(np.sum(x["chosen_lengths"])), 1.0)
    return np.full(len(x["policy_chosen_logps"]), -np.sum(x["policy_chosen_logps"]) / total_tokens)


@_pairwise
def sigmoid(x, beta=0.1, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    return -log_sigmoid(beta * _score_margin(x, f_divergence_type, f_alpha_divergence_coef))


@_pairwise
def hinge(x, beta=0.1, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    return np.maximum(0.0, 1.0 - beta * _score_margin(x, f_divergence_type, f_alpha_divergence_coef))


@_pairwise
def ipo(x, beta=0.1, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    s_w, s_l = _score_pair(x, f_divergence_type, f_alpha_divergence_coef)
    chosen_len, rejected_len = _lengths(x)
    return (s_w / chosen_len - s_l / rejected_len - 1.0 / (2.0 * beta)) ** 2


@_pairwise
def exo_pair(x, beta=0.1, label_smoothing=1e-3, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    # KL(p_theta || p_eps) over the two orderings, p_theta = logistic(+-z), p_eps = (1 - eps, eps).
    z = beta * _score_margin(x, f_divergence_type, f_alpha_divergence_coef)
    p_right, p_wrong = logistic(z), logistic(-z)
    return p_right * (np.log(p_right) - np.log(1.0 - label_smoothing)) + p_wrong * (
        np.log(p_wrong) - np.log(label_smoothing)
    )


@_pairwise
def nca_pair(x, beta=0.1):
    r_w, r_l = (beta * h for h in _logratios(x))
    return -log_sigmoid(r_w) - 0.5 * log_sigmoid(-r_w) - 0.5 * log_sigmoid(-r_l)


@_pairwise
def robust(x, beta=0.1, label_smoothing=0.0, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    z = beta * _score_margin(x, f_divergence_type, f_alpha_divergence_coef)
    clean, flipped = -log_sigmoid(z), -log_sigmoid(-z)
    eps = label_smoothing
    return ((1.0 - eps) * clean - eps * flipped) / (1.0 - 2.0 * eps)


@_pairwise
def bco_pair(x, beta=0.1):
    h_w, h_l = _logratios(x)
    return -log_sigmoid(beta * h_w) - log_sigmoid(-beta * h_l)


@_pairwise
def sppo_hard(x, beta=0.1):
    h_w, h_l = _logratios(x)
    eta_half = 1.0 / (2.0 * beta)
    return (h_w - eta_half) ** 2 + (h_l + eta_half) ** 2


@_pairwise
def aot(x, beta=0.1, label_smoothing=0.0):
    policy_margin = np.sort(x["policy_chosen_logps"] - x["policy_rejected_logps"])
    ref_margin = np.sort(x["ref_chosen_logps"] - x["ref_rejected_logps"])
    return _label_smoothed(beta * (policy_margin - ref_margin), label_smoothing)


@_pairwise
def aot_unpaired(x, beta=0.1, label_smoothing=0.0):
    h_w, h_l = _logratios(x)
    return _label_smoothed(beta * (np.sort(h_w) - np.sort(h_l)), label_smoothing)


@_pairwise
def apo_zero(x, beta=0.1):
    h_w, h_l = _logratios(x)
    return (1.0 - logistic(beta * h_w)) + logistic(beta * h_l)


@_pairwise
def apo_down(x, beta=0.1):
    h_w, h_l = _logratios(x)
    return logistic(beta * h_w) + (1.0 - logistic(beta * (h_w - h_l)))


@_pairwise
def discopop(x, beta=0.1, discopop_tau=0.05, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    rho = beta * _score_margin(x, f_divergence_type, f_alpha_divergence_coef)
    mix = logistic(rho / discopop_tau)
    return (1.0 - mix) * -log_sigmoid(rho) + mix * np.exp(-rho)


@_pairwise
def sft(x):
    return _batch_nll(x)


@_pairwise
def sigmoid_norm(x, beta=0.1, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    s_w, s_l = _score_pair(x, f_divergence_type, f_alpha_divergence_coef)
    chosen_len, rejected_len = _lengths(x)
    return -log_sigmoid(beta * (s_w / chosen_len - s_l / rejected_len))


@_pairwise
def cdpo(x, beta=0.1, label_smoothing=0.1, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    return _label_smoothed(
        beta * _score_margin(x, f_divergence_type, f_alpha_divergence_coef), label_smoothing
    )


@_pairwise
def simpo(x, beta=2.0, gamma=1.0, label_smoothing=0.0):
    avg_w, avg_l = _avg_logps(x)
    return _label_smoothed(beta * avg_w - beta * avg_l - gamma, label_smoothing)


@_pairwise
def cpo(x, beta=0.1, cpo_alpha=1.0, label_smoothing=0.0):
    z = beta * (x["policy_chosen_logps"] - x["policy_rejected_logps"])
    return _label_smoothed(z, label_smoothing) + cpo_alpha * _batch_nll(x)


def alphapo_reward(avg_logps, alpha):
    """(1 - p_bar^-alpha) / alpha with p_bar = exp(avg logp); the SimPO reward at alpha = 0."""
    if alpha == 0:
        return avg_logps
    return (1.0 - np.exp(np.minimum(-alpha * avg_logps, EXP_CLAMP))) / alpha


@_pairwise
def alphapo(x, beta=2.0, gamma=1.0, alpha=0.25):
    avg_w, avg_l = _avg_logps(x)
    return -log_sigmoid(beta * (alphapo_reward(avg_w, alpha) - alphapo_reward(avg_l, alpha)) - gamma)


@_pairwise
def orpo(x, beta=0.1):
    avg_w, avg_l = _avg_logps(x)  # per-token log-probs, all well below -1e-6 in these tests

    def log_odds(avg):
        return avg - log1mexp(avg)

    return _batch_nll(x) - beta * log_sigmoid(log_odds(avg_w) - log_odds(avg_l))


@_pairwise
def rdpo(x, beta=0.1, alpha=0.01):
    h_w, h_l = _logratios(x)
    return -log_sigmoid(beta * (h_w - h_l) + alpha * (x["chosen_lengths"] - x["rejected_lengths"]))


@_pairwise
def dpop(x, beta=0.1, dpop_lambda=50.0):
    h_w, h_l = _logratios(x)
    penalty = np.maximum(0.0, x["ref_chosen_logps"] - x["policy_chosen_logps"])
    return -log_sigmoid(beta * (h_w - h_l - dpop_lambda * penalty))


@_pairwise
def focal(x, beta=0.1, gamma=0.05):
    h_w, h_l = _logratios(x)
    p = logistic(beta * (h_w - h_l))
    return -(p**gamma) * np.log(p)


@_pairwise
def mmpo(x, beta=0.1, gamma=1.0):
    target = logistic(gamma * (x["chosen_quality"] - x["rejected_quality"]))
    h_w, h_l = _logratios(x)
    z = beta * (h_w - h_l)
    return -target * log_sigmoid(z) - (1.0 - target) * log_sigmoid(-z)


@_pairwise
def slic(x, delta=1.0, nll_weight=0.1):
    rank = np.maximum(0.0, delta - x["policy_chosen_logps"] + x["policy_rejected_logps"])
    return rank + nll_weight * _batch_nll(x)


@_pairwise
def ld_dpo(x, beta=0.1, ld_alpha=0.5):
    """Token-level inputs: ``policy_chosen_logps`` etc. are [batch, seq], with the two masks."""

    def desensitised(prefix):
        return ld_pair_logps(
            x[f"{prefix}_chosen_logps"],
            x["chosen_mask"],
            x[f"{prefix}_rejected_logps"],
            x["rejected_mask"],
            ld_alpha,
        )

    policy_w, policy_l = desensitised("policy")
    ref_w, ref_l = desensitised("ref")
    return -log_sigmoid(beta * ((policy_w - ref_w) - (policy_l - ref_l)))


@_pairwise
def wpo(x, beta=0.1):
    h_w, h_l = _logratios(x)
    return -x["chosen_weights"] * x["rejected_weights"] * log_sigmoid(beta * (h_w - h_l))


# How each objective's logged rewards are formed (TRL's DPO/CPO/ORPO conventions, as documented).
REFERENCE_FREE_SUM = {"sft", "cpo", "slic"}  # beta * summed log-probs (beta = 1 when there is none)
REFERENCE_FREE_AVG = {"simpo", "alphapo", "orpo"}  # beta * per-token log-probs


def pairwise_rewards(name, x, beta):
    if name in REFERENCE_FREE_SUM:
        chosen, rejected = x["policy_chosen_logps"], x["policy_rejected_logps"]
    elif name in REFERENCE_FREE_AVG:
        chosen, rejected = _avg_logps(x)
    else:
        chosen, rejected = _logratios(x)
    return beta * chosen, beta * rejected


def pairwise_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps):
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(np.float64),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": policy_chosen_logps,
        "logps/rejected": policy_rejected_logps,
    }


# ------------------------------------------------------------------------------------------------
# Unpaired objectives: one response per example, labels in [0, 1] (1 = desirable).
# ------------------------------------------------------------------------------------------------

UNPAIRED = {}


def _unpaired(fn):
    UNPAIRED[fn.__name__] = fn
    return fn


def _prospect(x, desirable_loss, undesirable_loss, desirable_weight, undesirable_weight):
    desirable = np.asarray(x["labels"]) > 0.5
    return np.where(desirable, desirable_weight * desirable_loss, undesirable_weight * undesirable_loss)


def kto_reference_point(x):
    """z_0 = max(0, mean over mismatched pairs of the policy/reference log-ratio)."""
    return max(0.0, float(np.mean(x["policy_kl_logps"] - x["ref_kl_logps"])))


@_unpaired
def kto(x, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    h, z0 = x["policy_logps"] - x["ref_logps"], kto_reference_point(x)
    return _prospect(
        x,
        1.0 - logistic(beta * (h - z0)),
        1.0 - logistic(beta * (z0 - h)),
        desirable_weight,
        undesirable_weight,
    )


@_unpaired
def apo_zero_unpaired(x, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    h = x["policy_logps"] - x["ref_logps"]
    return _prospect(x, 1.0 - logistic(beta * h), logistic(beta * h), desirable_weight, undesirable_weight)


def bco_running_moments(rewards, bco_state=None):
    """(mean, count) of every reward seen so far: the previous total plus this batch, per sample."""
    previous_mean, previous_count = (0.0, 0.0) if bco_state is None else map(float, bco_state)
    count = previous_count + len(rewards)
    return (previous_mean * previous_count + float(np.sum(rewards))) / count, count


def bco_shift(x, beta=0.1, bco_state=None):
    """delta: the running mean after this batch's rewards have been added."""
    return bco_running_moments(beta * (x["policy_logps"] - x["ref_logps"]), bco_state)[0]


@_unpaired
def bco(x, beta=0.1, bco_state=None, delta=None):
    """``delta`` overrides the shift (the library treats it as a constant, e.g. for finite differences)."""
    delta = bco_shift(x, beta, bco_state) if delta is None else delta
    rho = beta * (x["policy_logps"] - x["ref_logps"])
    desirable = np.asarray(x["labels"]) > 0.5
    return np.where(desirable, -log_sigmoid(rho - delta), -log_sigmoid(-(rho - delta)))


@_unpaired
def pointwise_dpo(x, beta=0.1):
    rho, z = beta * (x["policy_logps"] - x["ref_logps"]), x["labels"]
    return -z * log_sigmoid(rho) - (1.0 - z) * log_sigmoid(-rho)


@_unpaired
def ulma(x, beta=0.1):
    rho, z = beta * (x["policy_logps"] - x["ref_logps"]), x["labels"]
    return -z * x["policy_logps"] - (1.0 - z) * log_sigmoid(-rho)


def unpaired_metrics(x, beta):
    """Per-example rewards and log-probs, then TRL's class means (0 for an absent class)."""
    rewards = beta * (x["policy_logps"] - x["ref_logps"])
    desirable = np.asarray(x["labels"]) > 0.5

    def class_mean(values, selected):
        return float(values[selected].mean()) if selected.any() else 0.0

    metrics = {"rewards": rewards, "logps": x["policy_logps"]}
    for suffix, selected in (("chosen", desirable), ("rejected", ~desirable)):
        metrics[f"rewards/{suffix}"] = class_mean(rewards, selected)
        metrics[f"logps/{suffix}"] = class_mean(x["policy_logps"], selected)
        metrics[f"count/{suffix}"] = float(selected.sum())
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


# ------------------------------------------------------------------------------------------------
# Multi-response objectives: [batch, K] with a mask of valid responses.
# ------------------------------------------------------------------------------------------------

MULTI_RESPONSE = {}


def _multi(fn):
    MULTI_RESPONSE[fn.__name__] = fn
    return fn


def _valid_rows(x, beta, alpha):
    """Per prompt: (rho, q) over the valid responses, rho = beta h, q = softmax(scores / alpha)."""
    mask = x.get("mask")
    for i in range(len(x["policy_logps"])):
        keep = np.ones(x["policy_logps"].shape[1], bool) if mask is None else np.asarray(mask[i], bool)
        rho = beta * (x["policy_logps"][i][keep] - x["ref_logps"][i][keep])
        yield rho, softmax(x["scores"][i][keep] / alpha)


@_multi
def infonca(x, beta=0.1, alpha=1.0):
    return np.array([-np.sum(q * np.log(softmax(rho))) for rho, q in _valid_rows(x, beta, alpha)])


@_multi
def nca(x, beta=0.1, alpha=1.0):
    return np.array(
        [-np.sum(q * log_sigmoid(rho)) - np.mean(log_sigmoid(-rho)) for rho, q in _valid_rows(x, beta, alpha)]
    )


def multi_response_metrics(x, beta):
    """Implicit rewards (0 where masked) and whether the top-rewarded valid response is the top-scored one."""
    mask = np.asarray(x["mask"], bool)
    rewards = np.where(mask, beta * (x["policy_logps"] - x["ref_logps"]), 0.0)
    accuracies = [
        float(np.flatnonzero(keep)[np.argmax(r[keep])] == np.flatnonzero(keep)[np.argmax(s[keep])])
        for r, s, keep in zip(rewards, x["scores"], mask)
    ]
    return {"rewards": rewards, "rewards/accuracies": np.array(accuracies)}


ALL = {**PAIRWISE, **UNPAIRED, **MULTI_RESPONSE}
