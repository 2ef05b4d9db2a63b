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


def write_saved_dataset(folder: pathlib.Path, table, shards: int = 1) -> pathlib.Path:
    """``folder`` laid out as ``datasets``' ``Dataset.save_to_disk`` writes it (version 5.2, checked
    against the library): Arrow stream shards ``data-0000i-of-0000n.arrow``, ``state.json`` listing
    them in order and ``dataset_info.json``. ``table`` is a pyarrow Table."""
    import pyarrow as pa

    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    size = -(-table.num_rows // shards)
    for i, name in enumerate(names):
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(i * size, size))
    state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": "0", "_split": None}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": {}}))
    return folder
