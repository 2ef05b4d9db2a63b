"""What data preparation kept, skipped (counted by reason) and truncated.

Every row read is either kept or skipped for one named reason; nothing is dropped silently. The
report travels with the prepared dataset (in its TFDS metadata), so a cached dataset reports the
same counts as the build that wrote it.

>>> report = PreparationReport(layout="pairwise", files=("prefs.jsonl",))
>>> report.rows_read, report.rows_kept = 3, 2
>>> report.skip(IDENTICAL_RESPONSES, "prefs.jsonl:2", "chosen == rejected")
>>> print(report)
pairwise from 1 file(s): read 3 rows, kept 2, skipped 1
  identical_responses: 1 (e.g. prefs.jsonl:2: chosen == rejected)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

logger = logging.getLogger(__name__)

# Reasons a row is skipped. Each is a key of `PreparationReport.skipped`.
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_PROMPT = "empty_prompt"
EMPTY_RESPONSE = "empty_response"
IDENTICAL_RESPONSES = "identical_responses"
IDENTICAL_AFTER_TRUNCATION = "identical_after_truncation"
NO_SHARED_PROMPT = "no_shared_prompt"
TOO_FEW_RESPONSES = "too_few_responses"
SCORES_MISMATCH = "scores_mismatch"
TEMPLATE_MISMATCH = "template_mismatch"
TEMPLATE_ERROR = "template_error"  # the chat template raised for the row's messages
TOO_LONG = "too_long"

EXAMPLES_PER_REASON = 3  # sources kept per reason, to find the offending rows


class BadRow(Exception):
    """Raised while parsing or tokenising one row; the row is skipped and counted under ``reason``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class PreparationReport:
    """Counts of one preparation: ``rows_read == rows_kept + rows_skipped`` always holds."""

    layout: str
    files: tuple[str, ...]
    rows_read: int = 0
    rows_kept: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    # Up to EXAMPLES_PER_REASON "file:line: detail" strings per reason.
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    prompts_truncated: int = 0  # kept rows whose prompt lost its start
    responses_truncated: int = 0  # kept rows with at least one response that lost its end

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, source: str, detail: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"{source}: {detail}")

    def __str__(self) -> str:
        lines = [
            f"{self.layout} from {len(self.files)} file(s): read {self.rows_read} rows, "
            f"kept {self.rows_kept}, skipped {self.rows_skipped}"
        ]
        for reason, count in sorted(self.skipped.items(), key=lambda item: -item[1]):
            lines.append(f"  {reason}: {count} (e.g. {'; '.join(self.examples.get(reason, []))})")
        if self.prompts_truncated or self.responses_truncated:
            lines.append(
                f"  truncated (kept): {self.prompts_truncated} prompts, "
                f"{self.responses_truncated} rows' responses"
            )
        return "\n".join(lines)

    def log(self) -> None:
        """Logs the summary, as a warning when rows were skipped."""
        logger.log(logging.WARNING if self.rows_skipped else logging.INFO, "Data preparation: %s", self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"files": list(self.files)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreparationReport:
        return cls(**values | {"files": tuple(values["files"])})
