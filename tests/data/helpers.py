"""Constants and file writers shared by the data tests."""

import json
import pathlib

CHAR_TOKENIZER = (
    pathlib.Path(__file__).resolve().parents[2] / "jaxpref" / "recipes" / "assets" / "char_tokenizer"
)
PAD, BOS, EOS = 0, 1, 2
# Turns end in ";" (users) or EOS (the assistant); the generation prompt is "assistant: ".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %};{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def write_jsonl(path: pathlib.Path, rows: list) -> pathlib.Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
