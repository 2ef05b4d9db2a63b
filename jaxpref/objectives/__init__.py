"""Preference objectives as pure JAX functions: arrays in, (per-example losses, metrics) out.

Families: :mod:`~jaxpref.objectives.pairwise` (``PAIRWISE``), :mod:`~jaxpref.objectives.unpaired`
(``UNPAIRED`` and ``MULTI_RESPONSE``), :mod:`~jaxpref.objectives.reward` (``REWARD``: reward
models), token-to-sequence reductions in :mod:`~jaxpref.objectives.sequence`, and composition in
:mod:`~jaxpref.objectives.compose`.
"""

from jaxpref.objectives.compose import Objective, combine, objective
from jaxpref.objectives.pairwise import PAIRWISE, PairLogps, f_divergence_scores, pair_logps, pairwise_loss
from jaxpref.objectives.reward import REWARD, RewardPair, reward_loss, reward_metrics
from jaxpref.objectives.sequence import (
    ld_pair_logps,
    sequence_logps,
    token_log_sum_squared_probs,
    wpo_weights,
)
from jaxpref.objectives.unpaired import (
    MULTI_RESPONSE,
    UNPAIRED,
    BCOState,
    multi_response_loss,
    unpaired_loss,
)

__all__ = [
    "MULTI_RESPONSE",
    "PAIRWISE",
    "REWARD",
    "UNPAIRED",
    "BCOState",
    "Objective",
    "PairLogps",
    "RewardPair",
    "combine",
    "f_divergence_scores",
    "ld_pair_logps",
    "multi_response_loss",
    "objective",
    "pair_logps",
    "pairwise_loss",
    "reward_loss",
    "reward_metrics",
    "sequence_logps",
    "token_log_sum_squared_probs",
    "unpaired_loss",
    "wpo_weights",
]
