"""Preference objectives as pure JAX functions: arrays in, (per-example losses, metrics) out.

One module per family:

- :mod:`~jaxpref.objectives.pairwise`: DPO and its descendants on (chosen, rejected) pairs (``PAIRWISE``).
- :mod:`~jaxpref.objectives.unpaired`: KTO-style single responses (``UNPAIRED``) and K scored
  responses (``MULTI_RESPONSE``: NCA, InfoNCA).
- :mod:`~jaxpref.objectives.listwise`: rankings of K responses (``LISTWISE``: Plackett-Luce, LiPO,
  RankDPO, MPO), PRO, mDPO/mIPO and Curry-DPO pair curricula.
- :mod:`~jaxpref.objectives.reward`: reward models (``REWARD``: Bradley-Terry, Thurstone), the
  General Preference Model, outside option, ordinal ratings, multi-objective heads, ensembles,
  PAL mixtures and LSC reward transforms.
- :mod:`~jaxpref.objectives.policy_gradient`: advantages (GRPO, RLOO, GDPO, REINFORCE++, GAE),
  per-token policy losses (``POLICY``: PPO, GSPO, CISPO, SAPO), KL estimators, aggregation modes
  and the PPO value loss.
- :mod:`~jaxpref.objectives.nash`: P3O, Nash-MD, DNO, online IPO, extragradient (EGPO).
- :mod:`~jaxpref.objectives.token_level`: TDPO, TGDPO, AlignDistil.
- :mod:`~jaxpref.objectives.diffusion`: Diffusion-DPO, Diffusion-KTO, Flow-DPO, Flow-RWR, SPO, PRDP.
- :mod:`~jaxpref.objectives.sequence`: token-to-sequence reductions;
  :mod:`~jaxpref.objectives.compose`: ``objective(name) + 0.1 * objective(other)``, or
  ``parse_objective("name + 0.1*other")`` from a command line.

Evaluation metrics (accuracies, calibration, Kendall tau, exploitability) are in :mod:`jaxpref.metrics`.
"""

from jaxpref.objectives.compose import Objective, combine, objective, parse_objective
from jaxpref.objectives.diffusion import (
    denoising_errors,
    diffusion_dpo_loss,
    diffusion_kto_loss,
    flow_dpo_loss,
    flow_rwr_loss,
    flow_velocity_target,
    gaussian_step_logratios,
    prdp_loss,
    spo_step_loss,
)
from jaxpref.objectives.listwise import (
    LISTWISE,
    CurriculumPairs,
    ListwiseInputs,
    curriculum_pairs,
    infonca_loss,
    listwise_loss,
    mdpo_loss,
    mipo_loss,
    nca_loss,
    pro_loss,
)
from jaxpref.objectives.nash import (
    ExtragradientState,
    dno_loss,
    extragradient,
    geometric_mixture_logps,
    nash_md_loss,
    online_ipo_loss,
    p3o_loss,
)
from jaxpref.objectives.pairwise import PAIRWISE, PairLogps, f_divergence_scores, pair_logps, pairwise_loss
from jaxpref.objectives.policy_gradient import (
    AGGREGATIONS,
    POLICY,
    PolicyTokens,
    aggregate_loss,
    dr_grpo_advantages,
    gae_advantages,
    gdpo_advantages,
    group_win_rates,
    grpo_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
    policy_loss,
    pref_grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    value_loss,
)
from jaxpref.objectives.reward import (
    OUTSIDE_OPTION,
    REWARD,
    RewardPair,
    ensemble_rewards,
    gating_weights,
    gpm_loss,
    gpm_preference_score,
    lsc_combine,
    lsc_transform,
    multi_objective_loss,
    multi_objective_rewards,
    ordered_thresholds,
    ordinal_loss,
    outside_option_loss,
    outside_option_ranking_loss,
    pal_ideal_points,
    pal_loss,
    pal_rewards,
    rating_regression_loss,
    reward_loss,
    reward_metrics,
)
from jaxpref.objectives.sequence import (
    ld_pair_logps,
    sequence_logps,
    token_log_sum_squared_probs,
    wpo_weights,
)
from jaxpref.objectives.token_level import (
    aligndistil_adaptive_alpha,
    aligndistil_loss,
    aligndistil_teacher_logits,
    dpo_token_rewards,
    tdpo1_loss,
    tdpo2_loss,
    tdpo_token_kl,
    tgdpo_loss,
)
from jaxpref.objectives.unpaired import (
    MULTI_RESPONSE,
    UNPAIRED,
    BCOState,
    multi_response_loss,
    unpaired_loss,
)

__all__ = [
    "AGGREGATIONS",
    "LISTWISE",
    "MULTI_RESPONSE",
    "OUTSIDE_OPTION",
    "PAIRWISE",
    "POLICY",
    "REWARD",
    "UNPAIRED",
    "aggregate_loss",
    "aligndistil_adaptive_alpha",
    "aligndistil_loss",
    "aligndistil_teacher_logits",
    "BCOState",
    "combine",
    "curriculum_pairs",
    "CurriculumPairs",
    "denoising_errors",
    "diffusion_dpo_loss",
    "diffusion_kto_loss",
    "dno_loss",
    "dpo_token_rewards",
    "dr_grpo_advantages",
    "ensemble_rewards",
    "extragradient",
    "ExtragradientState",
    "f_divergence_scores",
    "flow_dpo_loss",
    "flow_rwr_loss",
    "flow_velocity_target",
    "gae_advantages",
    "gating_weights",
    "gaussian_step_logratios",
    "gdpo_advantages",
    "geometric_mixture_logps",
    "gpm_loss",
    "gpm_preference_score",
    "group_win_rates",
    "grpo_advantages",
    "infonca_loss",
    "kl_estimate",
    "ld_pair_logps",
    "listwise_loss",
    "ListwiseInputs",
    "lsc_combine",
    "lsc_transform",
    "masked_mean",
    "masked_whiten",
    "mdpo_loss",
    "mipo_loss",
    "multi_objective_loss",
    "multi_objective_rewards",
    "multi_response_loss",
    "nash_md_loss",
    "nca_loss",
    "Objective",
    "objective",
    "online_ipo_loss",
    "ordered_thresholds",
    "ordinal_loss",
    "outside_option_loss",
    "outside_option_ranking_loss",
    "p3o_loss",
    "pair_logps",
    "PairLogps",
    "pairwise_loss",
    "pal_ideal_points",
    "pal_loss",
    "pal_rewards",
    "parse_objective",
    "policy_loss",
    "PolicyTokens",
    "prdp_loss",
    "pref_grpo_advantages",
    "pro_loss",
    "rating_regression_loss",
    "reinforce_pp_advantages",
    "reward_loss",
    "reward_metrics",
    "RewardPair",
    "rloo_advantages",
    "sequence_logps",
    "spo_step_loss",
    "tdpo1_loss",
    "tdpo2_loss",
    "tdpo_token_kl",
    "tgdpo_loss",
    "token_log_sum_squared_probs",
    "unpaired_loss",
    "value_loss",
    "wpo_weights",
]
