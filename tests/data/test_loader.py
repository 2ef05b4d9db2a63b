"""grain loaders: fixed shapes, the batch contract per layout, seeds, host shards and resuming."""

import numpy as np
import pytest

from jaxpref.data.builder import prepare_dataset
from jaxpref.data.loader import make_loader, packed_batch
from jaxpref.data.tokenize import TokenizeOptions

from .helpers import CHAR_TOKENIZER, EOS, write_jsonl

NUM_ROWS = 22
OPTIONS = TokenizeOptions(add_bos=True)


def prepare(tmp_path_factory, layout, rows, tokenizer=CHAR_TOKENIZER):
    folder = tmp_path_factory.mktemp(layout)
    return prepare_dataset(
        write_jsonl(folder / "rows.jsonl", rows), layout, folder / "data", tokenizer, options=OPTIONS
    )[0]


@pytest.fixture(scope="module")
def pairwise(tmp_path_factory):
    # Prompts and responses of varied lengths; the prompt identifies the row.
    rows = [
        {"prompt": f"{i}*{i}=", "chosen": str(i * i), "rejected": "x" * (1 + i % 5)} for i in range(NUM_ROWS)
    ]
    return prepare(tmp_path_factory, "pairwise", rows)


@pytest.fixture(scope="module")
def by_prompt(pairwise):
    """The stored rows by prompt ids: ``tuple(prompt_ids) -> (chosen ids, rejected ids)``."""
    records = (pairwise[i] for i in range(len(pairwise)))
    return {tuple(r["prompt_ids"]): np.split(r["response_ids"], r["response_lengths"][:1]) for r in records}


def sequence_tokens(batch, prefix=""):
    """The tokens of each sequence, given by its (row, segment) and the prefix segment it attends."""
    packed = packed_batch(batch, prefix)
    sequences = []
    for row, segment in zip(packed.sequence_rows, packed.sequence_segments):
        in_segment = packed.segment_ids[row] == segment
        if packed.prefix_segment_ids is not None:
            prefix_segment = packed.prefix_segment_ids[row][in_segment][0]
            in_segment |= (packed.segment_ids[row] == prefix_segment) & (prefix_segment > 0)
        sequences.append(packed.input_ids[row][in_segment])
    return sequences


def completion_tokens(batch, prefix=""):
    packed = packed_batch(batch, prefix)
    return [
        packed.input_ids[row][(packed.segment_ids[row] == segment) & (packed.completion_mask[row] == 1)]
        for row, segment in zip(packed.sequence_rows, packed.sequence_segments)
    ]


def batches(loader, state=None):
    iterator = iter(loader)
    if state is not None:
        iterator.set_state(state)
    return list(iterator)


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_prefix_shared_pairs_have_fixed_shapes_and_chosen_then_rejected(pairwise, by_prompt):
    loader = make_loader(pairwise, batch_size=4, seed=0)
    assert (loader.num_batches, loader.dropped_by_batching, loader.dropped_by_sharding) == (5, 2, 0)
    all_batches = batches(loader)
    assert len(all_batches) == 5
    [length] = loader.row_lengths
    for batch in all_batches:
        assert batch["input_ids"].shape == batch["prefix_segment_ids"].shape == (4, length)
        assert batch["sequence_rows"].shape == (8,)
        completions = completion_tokens(batch)
        for b, sequence in enumerate(sequence_tokens(batch)[:4]):
            prompt = tuple(sequence[: len(sequence) - len(completions[b])])
            chosen, rejected = by_prompt[prompt]
            np.testing.assert_array_equal(completions[b], chosen)
            np.testing.assert_array_equal(completions[b + 4], rejected)
            assert completions[b][-1] == EOS and np.sum(completions[b] == EOS) == 1


def test_pairs_without_sharing_use_buckets(pairwise, by_prompt):
    loader = make_loader(pairwise, batch_size=4, prefix_sharing=False, row_length=16, buckets=(8, 12))
    shapes = set()
    for batch in batches(loader):
        shapes.add(batch["input_ids"].shape)
        assert batch["prefix_segment_ids"] is None and batch["sequence_rows"].shape == (8,)
        sequences, completions = sequence_tokens(batch), completion_tokens(batch)
        for b in range(4):
            prompt = tuple(sequences[b][: len(sequences[b]) - len(completions[b])])
            np.testing.assert_array_equal(completions[b], by_prompt[prompt][0])
            np.testing.assert_array_equal(completions[b + 4], by_prompt[prompt][1])
    assert shapes <= {(8, 8), (8, 12), (8, 16)} and len(shapes) > 1


def test_same_seed_same_batches_other_seed_other_order(pairwise):
    first = batches(make_loader(pairwise, batch_size=4, seed=3))
    assert_same_batches(first, batches(make_loader(pairwise, batch_size=4, seed=3)))
    other = batches(make_loader(pairwise, batch_size=4, seed=4))
    assert any(not np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other))


def test_host_shards_are_disjoint_and_equal(pairwise):
    seen = []
    for shard_index in range(3):
        loader = make_loader(pairwise, batch_size=1, shard_index=shard_index, shard_count=3, seed=0)
        assert (loader.num_batches, loader.dropped_by_sharding) == (7, 1)
        seen.append({tuple(batch["input_ids"][0]) for batch in batches(loader)})
        assert len(seen[-1]) == 7
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_resuming_from_iterator_state_gives_the_same_batches(pairwise):
    loader = make_loader(pairwise, batch_size=4, seed=1, num_epochs=3)
    iterator = iter(loader)
    for _ in range(7):  # 28 of the 3 x 22 rows: into the second epoch
        next(iterator)
    state = iterator.get_state()
    rest = list(iterator)
    assert len(rest) == loader.num_batches - 7
    assert_same_batches(rest, batches(make_loader(pairwise, batch_size=4, seed=1, num_epochs=3), state))


def test_unpaired_labels_and_mismatched_kl_completions(tmp_path_factory):
    rows = [
        {"prompt": f"{i}?", "completion": "y" * (1 + i % 4) + str(i), "label": i % 3 > 0} for i in range(8)
    ]
    source = prepare(tmp_path_factory, "unpaired", rows)
    [batch] = batches(make_loader(source, batch_size=8, shuffle=False))
    sequences, completions = sequence_tokens(batch), completion_tokens(batch)
    kl_sequences, kl_completions = sequence_tokens(batch, "kl_"), completion_tokens(batch, "kl_")
    assert batch["labels"].shape == (8,) and batch["labels"].dtype == np.float32
    assert batch["kl_input_ids"].shape[0] == 8
    for b in range(8):
        prompt = sequences[b][: len(sequences[b]) - len(completions[b])]
        np.testing.assert_array_equal(kl_sequences[b][: len(prompt)], prompt)
        np.testing.assert_array_equal(kl_completions[b], completions[b - 1])
    record_labels = sorted(float(source[i]["label"]) for i in range(8))
    assert sorted(batch["labels"].tolist()) == record_labels


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_ranked_scores_mask_and_response_order(tmp_path_factory, prefix_sharing):
    rows = [
        {
            "prompt": f"{i}:",
            "responses": [f"a{i}", f"bb{i}", f"ccc{i}"][: 2 + i % 2],
            "scores": [1.0, 2.0, 3.0][: 2 + i % 2],
        }
        for i in range(6)
    ]
    source = prepare(tmp_path_factory, "ranked", rows)
    [batch] = batches(make_loader(source, batch_size=6, shuffle=False, prefix_sharing=prefix_sharing))
    assert batch["scores"].shape == batch["response_mask"].shape == (6, 3)
    assert batch["sequence_rows"].shape == (18,)
    # Shared: one row per prompt, its K responses after it; else one row per response.
    assert batch["input_ids"].shape[0] == (6 if prefix_sharing else 18)
    completions = completion_tokens(batch)
    for b in range(6):
        count = int(batch["response_mask"][b].sum())
        assert count in (2, 3)
        np.testing.assert_array_equal(batch["scores"][b], [1.0, 2.0, 3.0][:count] + [0.0] * (3 - count))
        lengths = [len(completions[k * 6 + b]) for k in range(3)]
        assert lengths[:count] == sorted(lengths[:count]) and lengths[count:] == [0] * (3 - count)


def test_example_columns_every_row_has_are_batched(tmp_path_factory, caplog):
    rows = [
        {"prompt": f"{i}:", "chosen": "ab", "rejected": "c", "chosen_quality": i / 4, "rejected_quality": 0.0,
         "user_id": i % 2, **({"margin": 1.0} if i < 2 else {})}
        for i in range(4)
    ]  # fmt: skip
    source = prepare(tmp_path_factory, "pairwise", rows)
    [batch] = batches(make_loader(source, batch_size=4, shuffle=False))
    order = np.argsort(batch["example_index"])
    np.testing.assert_array_equal(np.sort(batch["chosen_quality"]), [0.0, 0.25, 0.5, 0.75])
    assert batch["user_id"].dtype == np.int32 and sorted(batch["user_id"][order].tolist()) == [0, 0, 1, 1]
    assert batch["rejected_quality"].dtype == np.float32 and not batch["rejected_quality"].any()
    assert "margin" not in batch  # only 2 of 4 rows have one: reported, not used
    assert "{'margin': 2} of 4 rows" in caplog.text


def test_sft_chat_rows_through_the_template(tmp_path_factory, chat_tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(4)
    ]
    source = prepare(tmp_path_factory, "sft", rows, chat_tokenizer)
    [batch] = batches(make_loader(source, batch_size=4))
    for completion in completion_tokens(batch):
        assert chat_tokenizer.decode(completion).startswith("a") and completion[-1] == EOS


def test_row_length_below_the_data_and_foreign_sources_are_errors(pairwise):
    with pytest.raises(ValueError, match="`row_length`=4 is shorter than the longest row"):
        make_loader(pairwise, batch_size=4, row_length=4)
    with pytest.raises(ValueError, match="no jaxpref metadata"):
        make_loader(list(range(10)), batch_size=4)
    with pytest.raises(ValueError, match="not enough for one batch"):
        make_loader(pairwise, batch_size=NUM_ROWS + 1)
