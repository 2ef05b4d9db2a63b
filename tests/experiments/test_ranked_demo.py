"""The ranked-preferences study at a toy size: its lists, pairs and table are what it says."""

import json

from experiments.ranked_demo import RankedDemoConfig, best_and_worst, ranked_rows, run_ranked_demo
from jaxpref.data.synthetic import hidden_reward
from jaxpref.overrides import apply_overrides

TOY = [
    "sft_examples=200",
    "sft.train.steps=10",
    "list_prompts=64",
    "eval_prompts=16",
    "samples_per_eval_prompt=2",
    *(f"{run}.{key}" for run in ("sft", "dpo", "listwise") for key in ("data.batch_size=16", "train.progress=false")),
    "dpo.train.steps=3",
    "listwise.train.steps=3",
]


def test_lists_skip_empty_samples_and_ties_and_give_best_and_worst_pairs():
    prompt = "312>"
    samples = [["123"], ["132"], [""], ["321"]]
    rows, skipped = ranked_rows([prompt], samples)
    assert skipped == 0 and rows[0]["responses"] == ["123", "132", "321"]
    assert rows[0]["scores"] == [hidden_reward(prompt, r) for r in ("123", "132", "321")]
    [pair] = best_and_worst(rows)
    best = max(rows[0]["responses"], key=lambda r: hidden_reward(prompt, r))
    worst = min(rows[0]["responses"], key=lambda r: hidden_reward(prompt, r))
    assert (pair["chosen"], pair["rejected"]) == (best, worst)
    assert ranked_rows([prompt], [["123"], ["123"]]) == ([], 1)  # no preference in the list


def test_both_runs_train_and_report(tmp_path):
    results = run_ranked_demo(apply_overrides(RankedDemoConfig(), [*TOY, f"runs_dir={tmp_path}"]))
    run_dir = tmp_path / "ranked_demo"
    assert json.loads((run_dir / "results.json").read_text()) == results
    for name in ("dpo", "listwise"):
        assert 0.0 <= results[name]["win_rate_over_sft"] <= 1.0
        lines = (run_dir / name / "metrics" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert results["listwise"]["objective"] == "lipo_lambda"
    ranked = [json.loads(line) for line in (run_dir / "ranked.jsonl").read_text().splitlines()]
    assert len(ranked) == results["train_lists"] and all(2 <= len(r["responses"]) <= 4 for r in ranked)
