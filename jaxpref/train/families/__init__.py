"""Kinds of training as objects: what each feeds its objective, and what its batches hold.

============  =========================  ==========================================================
family        data layout                objective inputs
============  =========================  ==========================================================
SFT           sft                        none (token-mean NLL of completions)
Pairwise      pairwise                   chosen / rejected log-prob sums, lengths, reference sums
Unpaired      unpaired (+ KL batch)      log-prob sums, labels, KL log-probs (KTO)
Reward        pairwise                   rewards (or GPM embeddings) of chosen and rejected
Listwise      ranked                     ``[B, K]`` log-prob sums, scores, mask, lengths
TokenLevel    pairwise                   ``[B, T]`` token log-probs, masks, per-token KL
============  =========================  ==========================================================

:func:`as_family` maps the shorthands (``"pairwise"``, ...) to these; a new kind of training is one
file with a :class:`Family` subclass and one entry in ``SHORTHANDS``.
"""

from __future__ import annotations

from jaxpref.train.families.base import Family, LogpsFamily, StepParts, metric_fractions
from jaxpref.train.families.listwise import Listwise
from jaxpref.train.families.pairwise import Pairwise
from jaxpref.train.families.reward import Reward
from jaxpref.train.families.sft import SFT
from jaxpref.train.families.token_level import TokenLevel
from jaxpref.train.families.unpaired import Unpaired

SHORTHANDS: dict[str, type[Family]] = {
    cls.name: cls for cls in (SFT, Pairwise, Unpaired, Reward, Listwise, TokenLevel)
}


def as_family(family: str | Family) -> Family:
    """The :class:`Family` for a shorthand or an object."""
    if isinstance(family, Family):
        return family
    if family not in SHORTHANDS:
        raise ValueError(f"`family`={family!r} must be one of {sorted(SHORTHANDS)} or a jaxpref.train.families.Family.")
    return SHORTHANDS[family]()


__all__ = [
    "SFT",
    "Family",
    "Listwise",
    "LogpsFamily",
    "Pairwise",
    "Reward",
    "SHORTHANDS",
    "StepParts",
    "TokenLevel",
    "Unpaired",
    "as_family",
    "metric_fractions",
]
