"""Which objectives each kind of run trains: the names ``objective.name`` may use.

Apart from the configs and runners, which import the engine, so that ``jaxpref --help`` imports
no more than the objectives to list them.
"""

from __future__ import annotations

from jaxpref.objectives import LISTWISE, MULTI_RESPONSE, PAIRWISE, REWARD, UNPAIRED

GPM = "gpm"  # `objective.name` of a General Preference Model run (jaxpref reward --objective gpm)

# Inputs the train step gives an objective besides the policy's log-probs.
_STEP_INPUTS = {"ref_chosen_logps", "ref_rejected_logps", "chosen_lengths", "rejected_lengths", "ref_logps"}
_REGISTRIES = {"pairwise": PAIRWISE, "unpaired": UNPAIRED, "reward": REWARD, "listwise": {**LISTWISE, **MULTI_RESPONSE}}
# Objectives by name outside the registries (jaxpref.objectives.compose.NAMED_FUNCTIONS), and the
# token-level pairwise ones, which read [batch, seq] log-probs only the token-level step gives.
_MORE = {"listwise": ("mdpo", "mipo", "pro"), "token_level": ("ld_dpo", "tdpo1", "tdpo2")}


def family_objectives(family: str) -> tuple[str, ...]:
    """The registered objectives a run of the train-step ``family`` can train: those of its kind
    the step can feed from a batch of sequences (not those needing token-level inputs or per-pair
    extras, such as ld_dpo and wpo, nor BCO's running state across steps); none for SFT.

    >>> family_objectives("reward")
    ('bradley_terry', 'bradley_terry_soft', 'thurstone')
    """
    registry = _REGISTRIES.get(family, {})
    fed = [name for name, spec in registry.items() if set(spec.requires) <= _STEP_INPUTS]
    return tuple(sorted(name for name in fed + list(_MORE.get(family, ())) if name != "bco"))
