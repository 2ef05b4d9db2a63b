"""From token log-probs to the per-sequence quantities the objectives consume.

Conventions: ``token_logps`` is ``[batch, seq]`` with the log-prob of each token under the model,
``mask`` is ``[batch, seq]`` with 1 on completion tokens and 0 elsewhere (prompt, padding). Masked
positions never contribute, whatever value they hold (even NaN or -inf from padding).

>>> import jax.numpy as jnp
>>> token_logps = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
>>> mask = jnp.array([[1, 1, 1], [1, 1, 0]])
>>> sequence_logps(token_logps, mask)
Array([-6., -1.], dtype=float32)
>>> sequence_logps(token_logps, mask, reduction="mean")
Array([-2. , -0.5], dtype=float32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpref.objectives.common import Array, as_float, check_range, check_same_shape, clamp_lengths

REDUCTIONS = ("sum", "mean", "ld_dpo")


def sequence_logps(
    token_logps: Array,  # [batch, seq]
    mask: Array,  # [batch, seq]
    reduction: str = "sum",
    *,
    ld_alpha: float | None = None,
    shared_lengths: Array | None = None,  # [batch]
) -> Array:  # [batch]
    r"""Reduces token log-probs over completion tokens.

    - ``"sum"``: :math:`\log\pi(y|x) = \sum_t m_t \log\pi(y_t|x, y_{<t})`.
    - ``"mean"``: the sum divided by the completion length (clamped to 1, so an empty completion
      gives 0).
    - ``"ld_dpo"``: length-desensitised log-prob of LD-DPO, which keeps the first ``l_s`` completion
      tokens (the length both responses of a pair share) at weight 1 and down-weights the rest by
      :math:`\alpha`: :math:`\sum_{t \le l_s} \log\pi_t + \alpha \sum_{t > l_s} \log\pi_t`.
      ``shared_lengths`` is :math:`l_s = \min(|y_w|, |y_l|)`; :func:`ld_pair_logps` computes it
      for a pair. With :math:`\alpha = 1` this is the plain sum.

    Reference: Liu et al., "Length Desensitization in Direct Preference Optimization",
    arXiv:2409.06411 (for ``"ld_dpo"``).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction`={reduction!r} must be one of {REDUCTIONS}.")
    token_logps = as_float("token_logps", token_logps, ndim=2)
    mask = jnp.asarray(mask)
    check_same_shape("token_logps", token_logps, mask=mask)
    mask = mask.astype(bool)
    masked = jnp.where(mask, token_logps, 0.0)
    if reduction == "sum":
        return masked.sum(axis=-1)
    if reduction == "mean":
        return masked.sum(axis=-1) / clamp_lengths(mask.sum(axis=-1).astype(masked.dtype))
    if ld_alpha is None or shared_lengths is None:
        raise ValueError("reduction='ld_dpo' needs `ld_alpha` and `shared_lengths`.")
    check_range("ld_alpha", ld_alpha, 0.0, 1.0)
    position = jnp.cumsum(mask, axis=-1)  # 1-based index among completion tokens
    in_shared = mask & (position <= jnp.asarray(shared_lengths)[:, None])
    shared = jnp.where(in_shared, masked, 0.0).sum(axis=-1)
    tail = jnp.where(in_shared, 0.0, masked).sum(axis=-1)
    return shared + ld_alpha * tail


def ld_pair_logps(
    chosen_token_logps: Array,  # [batch, seq_c]
    chosen_mask: Array,  # [batch, seq_c]
    rejected_token_logps: Array,  # [batch, seq_r]
    rejected_mask: Array,  # [batch, seq_r]
    ld_alpha: float,
) -> tuple[Array, Array]:  # ([batch], [batch])
    """LD-DPO log-probs of both responses of each pair, sharing ``min(|y_w|, |y_l|)``.

    Apply it to policy and reference token log-probs alike, then feed the results to any pairwise
    objective (``pairwise_loss("ld_dpo", ...)`` does this for you from token-level inputs).
    """
    shared_lengths = jnp.minimum(jnp.asarray(chosen_mask).sum(-1), jnp.asarray(rejected_mask).sum(-1))
    chosen = sequence_logps(
        chosen_token_logps, chosen_mask, "ld_dpo", ld_alpha=ld_alpha, shared_lengths=shared_lengths
    )
    rejected = sequence_logps(
        rejected_token_logps, rejected_mask, "ld_dpo", ld_alpha=ld_alpha, shared_lengths=shared_lengths
    )
    return chosen, rejected


def token_log_sum_squared_probs(logits: Array) -> Array:  # [..., vocab] -> [...]
    r""":math:`\log \sum_v \pi_v^2` per position, the normaliser of WPO's aligned token probabilities.

    Computed as ``logsumexp(2 z) - 2 logsumexp(z)`` from logits ``z``; a model computes it chunk by
    chunk alongside the token log-probs so the full logits need not be kept.
    """
    logits = as_float("logits", logits)
    return jax.nn.logsumexp(2.0 * logits, axis=-1) - 2.0 * jax.nn.logsumexp(logits, axis=-1)


def wpo_weights(
    token_logps: Array,  # [batch, seq]
    token_log_sum_squared_probs: Array,  # [batch, seq]
    mask: Array,  # [batch, seq]
) -> Array:  # [batch]
    r"""Per-sequence weights of Weighted Preference Optimization (WPO), without gradient.

    .. math:: w(y) = \exp\Big(\frac{1}{|y|}\sum_t \big[\log\pi_t - \log\textstyle\sum_v \pi_v^2\big]\Big)

    the geometric mean over completion tokens of the token probability renormalised by
    :math:`\sum_v \pi_v^2`, which makes a greedy-decoded (on-policy) sequence weigh close to 1.
    A pair's loss is multiplied by :math:`w(y_w)\,w(y_l)`: pass the results as ``chosen_weights``
    and ``rejected_weights`` to ``pairwise_loss``.

    Reference: Zhou et al., "WPO: Enhancing RLHF with Weighted Preference Optimization",
    arXiv:2406.11827, Eq. (2) with the aligned probabilities of Sec. 3.
    """
    token_logps = as_float("token_logps", token_logps, ndim=2)
    normaliser = as_float("token_log_sum_squared_probs", token_log_sum_squared_probs, ndim=2)
    check_same_shape("token_logps", token_logps, token_log_sum_squared_probs=normaliser)
    aligned = sequence_logps(token_logps - normaliser, mask, "mean")
    return jax.lax.stop_gradient(jnp.exp(aligned))
