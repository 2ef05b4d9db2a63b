"""Token ids of parsed rows with a local Hugging Face tokenizer: templates, BOS/EOS, truncation.

- Chat rows go through the tokenizer's chat template when it has one: the prompt is rendered with
  the generation prompt, each response is what ``prompt + response`` adds to it (a row whose
  rendering does not extend the prompt's is skipped as ``template_mismatch``). Without a template,
  messages are rendered as ``"role: content"`` lines and the prompt ends in ``"assistant: "``.
- Text is tokenised without the tokenizer's own special tokens. BOS is then put in front of the
  prompt once, when asked for (by default when the tokenizer adds one itself) and not already
  there, e.g. from a template. EOS is appended to each response once, unless a chat template
  rendered it (the template ends the turn its own way).
- Truncation keeps the END of the prompt (its last ``max_prompt_length`` tokens, with BOS kept in
  front) and the START of each response (up to ``max_length`` tokens for prompt + response).
  Rows whose responses become identical are skipped; with ``truncate=False`` rows over the limits
  are skipped (``too_long``) instead of truncated.

>>> from jaxpref.data.rows import Row
>>> from jaxpref.data.report import PreparationReport
>>> report = PreparationReport(layout="sft", files=())
>>> [row] = tokenize_rows([Row("ab", ("cd",))], "jaxpref/recipes/assets/char_tokenizer", report,
...                       TokenizeOptions(add_bos=True))
>>> row.prompt_ids.tolist(), [ids.tolist() for ids in row.response_ids]  # bos=1, eos=2
([1, 15, 16], [[17, 18, 2]])
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from jaxpref.data.report import (
    EMPTY_PROMPT,
    EMPTY_RESPONSE,
    IDENTICAL_AFTER_TRUNCATION,
    TEMPLATE_ERROR,
    TEMPLATE_MISMATCH,
    TOO_LONG,
    BadRow,
    PreparationReport,
)
from jaxpref.data.rows import ASSISTANT, Message, Row

TokenizerLike = str | os.PathLike | PreTrainedTokenizerBase
CHUNK_ROWS = 512  # rows rendered, then tokenised in one batched call


@dataclasses.dataclass(frozen=True)
class TokenizeOptions:
    """How rows become token ids."""

    max_length: int | None = 1024  # prompt + one response, in tokens; None: no limit
    max_prompt_length: int | None = None  # prompt alone, keeping its end; None: max_length // 2
    add_bos: bool | None = None  # None: when the tokenizer adds BOS by itself
    add_eos: bool = True  # to responses not rendered by a chat template
    truncate: bool = True  # False: skip rows over the limits (as too_long) instead of truncating them

    def __post_init__(self):
        for name in ("max_length", "max_prompt_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive int or None, got {value!r}.")
        if self.max_length is not None:
            if self.max_prompt_length is None:
                # A frozen dataclass: derived defaults are set through object.__setattr__.
                object.__setattr__(self, "max_prompt_length", max(self.max_length // 2, 1))
            if self.max_prompt_length >= self.max_length:
                raise ValueError(
                    f"`max_prompt_length`={self.max_prompt_length} leaves no room for a response within "
                    f"`max_length`={self.max_length}; make it smaller than `max_length`."
                )


@dataclasses.dataclass(frozen=True)
class TokenizedRow:
    prompt_ids: np.ndarray  # [prompt_len] int32, BOS first when added
    response_ids: tuple[np.ndarray, ...]  # each [response_len] int32, in the row's response order
    prompt: str  # the prompt text as rendered (template applied), before truncation
    label: bool | None = None
    scores: tuple[float, ...] | None = None
    source: str = ""
    ratings: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # pairwise: as Row.ratings
    columns: tuple[tuple[str, float], ...] = ()  # as Row.columns


def load_tokenizer(tokenizer: TokenizerLike) -> PreTrainedTokenizerBase:
    """A tokenizer as given, or loaded from a local directory (never downloaded)."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if not pathlib.Path(tokenizer).is_dir():
        raise ValueError(
            f"`tokenizer` must be a tokenizer or a local directory holding one, got {str(tokenizer)!r}, "
            "which is not a directory."
        )
    return AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer puts BOS in front of text by itself (Llama does, GPT-2 does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything about the tokenizer that changes token ids, template included."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = (
        backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    )
    parts = (
        type(tokenizer).__name__,
        vocabulary,
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        json.dumps(tokenizer.chat_template, sort_keys=True),
        str(adds_bos(tokenizer)),
    )
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def tokenize_rows(
    rows: Iterable[Row],
    tokenizer: TokenizerLike,
    report: PreparationReport,
    options: TokenizeOptions = TokenizeOptions(),
) -> Iterator[TokenizedRow]:
    """Token ids of ``rows``, counting each kept row in ``report.rows_kept`` (and its truncation)
    and each unusable one in ``report.skipped``."""
    encoder = _Encoder(load_tokenizer(tokenizer), options)
    rows = iter(rows)
    while chunk := list(itertools.islice(rows, CHUNK_ROWS)):
        rendered = []
        for row in chunk:
            try:
                rendered.append((row, *encoder.render(row)))
            except BadRow as bad:
                report.skip(bad.reason, row.source, bad.detail)
        texts = [text for _, prompt, responses, _ in rendered for text in (prompt, *responses)]
        ids = iter(encoder.tokenize(texts))
        for row, prompt, responses, templated in rendered:
            prompt_ids, response_ids = next(ids), [next(ids) for _ in responses]
            try:
                tokenized, prompt_cut, response_cut = encoder.assemble(
                    row, prompt, prompt_ids, response_ids, templated
                )
            except BadRow as bad:
                report.skip(bad.reason, row.source, bad.detail)
                continue
            report.rows_kept += 1
            report.prompts_truncated += prompt_cut
            report.responses_truncated += response_cut
            yield tokenized


class _Encoder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, options: TokenizeOptions):
        self.tokenizer = tokenizer
        self.options = options
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.add_bos = adds_bos(tokenizer) if options.add_bos is None else options.add_bos
        if self.add_bos and self.bos_id is None:
            raise ValueError("`add_bos=True` but the tokenizer has no BOS token; pass `add_bos=False`.")
        if options.add_eos and self.eos_id is None:
            raise ValueError("`add_eos=True` but the tokenizer has no EOS token; pass `add_eos=False`.")

    def render(self, row: Row) -> tuple[str, list[str], bool]:
        """``(prompt text, response texts, whether a chat template rendered them)``."""
        if not row.is_chat:
            return row.prompt, list(row.responses), False
        templated = bool(self.tokenizer.chat_template)
        if templated and not row.prompt:  # chat templates refuse to render no messages
            raise BadRow(EMPTY_PROMPT, "the prompt has no messages; give the row a prompt")
        render = self._template if templated else _plain_chat
        prompt = render(list(row.prompt), True)
        responses = []
        for response in row.responses:
            whole = render([*row.prompt, *response], False)
            if not whole.startswith(prompt):
                raise BadRow(
                    TEMPLATE_MISMATCH,
                    "the chat template renders the prompt differently once a response follows it",
                )
            responses.append(whole[len(prompt) :])
        return prompt, responses, templated

    def _template(self, messages: list[Message], add_generation_prompt: bool) -> str:
        import jinja2  # as apply_chat_template does: only chat templates need it

        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        # Templates reject some rows on purpose ("Conversation roles must alternate user/assistant").
        except jinja2.TemplateError as error:
            raise BadRow(TEMPLATE_ERROR, f"the chat template rejects the messages: {error}") from None

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]

    def assemble(
        self, row: Row, prompt: str, prompt_ids: list[int], response_ids: list[list[int]], templated: bool
    ) -> tuple[TokenizedRow, bool, bool]:
        """The row's ids with BOS/EOS added once and truncation applied, and whether the prompt and
        any response were truncated."""
        prompt_ids = list(prompt_ids)
        if self.add_bos and prompt_ids[:1] != [self.bos_id]:
            prompt_ids.insert(0, self.bos_id)
        if not prompt_ids:
            raise BadRow(
                EMPTY_PROMPT,
                "the prompt has no tokens to predict the first response token from; "
                "pass TokenizeOptions(add_bos=True) or give the row a prompt",
            )
        if self.options.add_eos and not templated:
            response_ids = [ids if ids[-1:] == [self.eos_id] else [*ids, self.eos_id] for ids in response_ids]
        if any(not ids for ids in response_ids):
            raise BadRow(EMPTY_RESPONSE, "a response has no tokens")

        # `max_prompt_length < max_length`, so every response keeps at least one token.
        truncated = self._truncate_prompt(prompt_ids)
        max_length = self.options.max_length
        budget = None if max_length is None else max_length - len(truncated)
        kept = [ids[:budget] for ids in response_ids]
        prompt_cut = len(truncated) < len(prompt_ids)
        response_cut = any(len(ids) < len(full) for ids, full in zip(kept, response_ids))
        if (prompt_cut or response_cut) and not self.options.truncate:
            raise BadRow(
                TOO_LONG,
                f"{len(prompt_ids)} prompt tokens and responses of {[len(ids) for ids in response_ids]} exceed "
                f"`max_prompt_length`={self.options.max_prompt_length} or `max_length`={max_length}",
            )
        if len(kept) > 1 and all(ids == kept[0] for ids in kept):
            raise BadRow(IDENTICAL_AFTER_TRUNCATION, f"responses are the same in their first {budget} tokens")
        tokenized = TokenizedRow(
            prompt_ids=np.asarray(truncated, np.int32),
            response_ids=tuple(np.asarray(ids, np.int32) for ids in kept),
            prompt=prompt,
            label=row.label,
            scores=row.scores,
            source=row.source,
            ratings=row.ratings,
            columns=row.columns,
        )
        return tokenized, prompt_cut, response_cut

    def _truncate_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        """The last ``max_prompt_length`` tokens, keeping a leading BOS in front."""
        limit = self.options.max_prompt_length
        if limit is None or len(prompt_ids) <= limit:
            return list(prompt_ids)
        if prompt_ids[0] == self.bos_id:  # added, or rendered by a chat template
            return [self.bos_id, *prompt_ids[len(prompt_ids) - (limit - 1) :]]
        return list(prompt_ids[len(prompt_ids) - limit :])


def _plain_chat(messages: list[Message], add_generation_prompt: bool) -> str:
    """Fallback rendering without a chat template: ``"role: content"`` lines."""
    lines = [f"{message['role']}: {message['content']}" for message in messages]
    if add_generation_prompt:
        lines.append(f"{ASSISTANT}: ")
    return "\n".join(lines)
