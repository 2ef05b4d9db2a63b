"""Tokenisation: truncation keeps the prompt's end and the response's start; BOS/EOS once; chat."""

import pytest

from jaxpref.data import report as reasons
from jaxpref.data.report import PreparationReport
from jaxpref.data.rows import Row
from jaxpref.data.tokenize import TokenizeOptions, adds_bos, load_tokenizer, tokenize_rows

from .helpers import BOS, CHAR_TOKENIZER, EOS


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize(rows, tokenizer, **options):
    report = PreparationReport(layout="test", files=())
    return list(tokenize_rows(rows, tokenizer, report, TokenizeOptions(**options))), report


def test_truncation_keeps_prompt_end_and_response_start(char_tokenizer):
    row = Row("abcdefgh", ("0123456789",))
    [kept], report = tokenize([row], char_tokenizer, max_length=10, max_prompt_length=4, add_bos=False)
    assert kept.prompt_ids.tolist() == ids(char_tokenizer, "efgh")
    assert kept.response_ids[0].tolist() == ids(char_tokenizer, "012345")  # EOS cut with the end
    assert (report.prompts_truncated, report.responses_truncated, report.rows_kept) == (1, 1, 1)


def test_prompt_truncation_keeps_bos_in_front(char_tokenizer):
    [kept], _ = tokenize([Row("abcdefgh", ("x",))], char_tokenizer, max_prompt_length=4, add_bos=True)
    assert kept.prompt_ids.tolist() == [BOS, *ids(char_tokenizer, "fgh")]


def test_bos_and_eos_are_added_once(char_tokenizer):
    # The char tokenizer adds no special tokens itself, so BOS is only added when asked for.
    assert not adds_bos(char_tokenizer)
    rows = [Row("ab", ("cd",)), Row("<s>ab", ("cd</s>",))]
    [plain, marked], _ = tokenize(rows, char_tokenizer, add_bos=True)
    for kept in (plain, marked):
        assert kept.prompt_ids.tolist() == [BOS, *ids(char_tokenizer, "ab")]
        assert kept.response_ids[0].tolist() == [*ids(char_tokenizer, "cd"), EOS]
    [default], _ = tokenize(rows[:1], char_tokenizer)
    assert default.prompt_ids.tolist() == ids(char_tokenizer, "ab")


def test_chat_template_renders_prompt_and_responses(chat_tokenizer):
    prompt = ({"role": "user", "content": "hi"},)
    row = Row(prompt, (({"role": "assistant", "content": "yo"},), ({"role": "assistant", "content": "no"},)))
    [kept], _ = tokenize([row], chat_tokenizer, add_bos=True)
    assert kept.prompt == "<s>user: hi;assistant: "
    # The template's BOS is not doubled, and its EOS ends each response once.
    assert kept.prompt_ids.tolist() == [BOS, *ids(chat_tokenizer, "user: hi;assistant: ")]
    assert [r.tolist() for r in kept.response_ids] == [
        [*ids(chat_tokenizer, "yo"), EOS],
        [*ids(chat_tokenizer, "no"), EOS],
    ]


def test_chat_rows_without_template_use_role_lines(char_tokenizer):
    row = Row(({"role": "user", "content": "hi"},), (({"role": "assistant", "content": "yo"},),))
    [kept], _ = tokenize([row], char_tokenizer)
    assert kept.prompt == "user: hi\nassistant: "
    assert kept.response_ids[0].tolist() == [*ids(char_tokenizer, "yo"), EOS]


def test_template_that_does_not_extend_the_prompt_is_counted():
    broken = load_tokenizer(CHAR_TOKENIZER)
    broken.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    row = Row(({"role": "user", "content": "hi"},), (({"role": "assistant", "content": "yo"},),))
    kept, report = tokenize([row], broken)
    assert kept == [] and report.skipped == {reasons.TEMPLATE_MISMATCH: 1}


def test_rows_a_chat_template_refuses_are_counted():
    strict = load_tokenizer(CHAR_TOKENIZER)
    strict.chat_template = (  # as Llama 2's: roles must alternate, starting with the user
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "{{ m['content'] }};{% endfor %}"
    )
    user, assistant = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
    rows = [
        Row((user,), ((assistant,),), source="f:1"),  # kept
        Row((assistant,), ((assistant,),), source="f:2"),  # template_error
        Row((), ((assistant,),), source="f:3"),  # no prompt messages to render: empty_prompt
    ]
    kept, report = tokenize(rows, strict)
    assert [row.source for row in kept] == ["f:1"]
    assert report.skipped == {reasons.TEMPLATE_ERROR: 1, reasons.EMPTY_PROMPT: 1}
    assert "Conversation roles must alternate" in report.examples[reasons.TEMPLATE_ERROR][0]


def test_unusable_rows_after_tokenisation_are_counted(char_tokenizer):
    rows = [
        Row("q", ("abcx", "abcy"), source="f:1"),  # same first tokens: identical_after_truncation
        Row("", ("b",), source="f:2"),  # no prompt token, no BOS: empty_prompt
        Row("q", ("ok",), source="f:3"),  # kept
    ]
    kept, report = tokenize(rows, char_tokenizer, max_length=4, max_prompt_length=1)
    assert [row.source for row in kept] == ["f:3"]
    assert report.skipped == {reasons.IDENTICAL_AFTER_TRUNCATION: 1, reasons.EMPTY_PROMPT: 1}
    assert report.rows_kept == 1


def test_rows_over_the_limits_are_skipped_when_truncation_is_off(char_tokenizer):
    rows = [
        Row("abcdef", ("x",), source="f:1"),
        Row("ab", ("xyz",), source="f:2"),
        Row("ab", ("x",), source="f:3"),
    ]
    kept, report = tokenize(rows, char_tokenizer, max_length=4, max_prompt_length=2, truncate=False)
    assert [row.source for row in kept] == ["f:3"]  # "x" + EOS fits; "xyz" + EOS does not
    assert report.skipped == {reasons.TOO_LONG: 2}


def test_max_prompt_length_defaults_to_half_of_max_length():
    assert TokenizeOptions(max_length=64).max_prompt_length == 32
    assert TokenizeOptions(max_length=None).max_prompt_length is None


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(max_length=0), "`max_length` must be a positive int"),
        (dict(max_length=8, max_prompt_length=8), "`max_prompt_length`=8 leaves no room"),
    ],
)
def test_bad_options_are_errors(options, match):
    with pytest.raises(ValueError, match=match):
        TokenizeOptions(**options)


def test_tokenizer_must_be_a_local_directory(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
