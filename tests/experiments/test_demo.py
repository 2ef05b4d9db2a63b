"""The main job end to end at a small size: SFT -> sampled pairs -> cached reference -> DPO -> eval."""

import json

from jaxpref.overrides import apply_overrides
from jaxpref.recipes.configs import DemoConfig
from jaxpref.recipes.demo import run_demo

SMALL = [
    "sft_examples=1500",
    "sft.train.steps=150",
    "pair_prompts=1536",
    "dpo.train.steps=120",
    "eval_prompts=128",
    "samples_per_eval_prompt=2",
    "sft.train.progress=false",
    "dpo.train.progress=false",
]


def test_dpo_beats_sft_on_the_hidden_reward(tmp_path):
    results = run_demo(apply_overrides(DemoConfig(), [*SMALL, f"runs_dir={tmp_path}"]))
    assert results["dpo_hidden_reward"] > results["sft_hidden_reward"] + 0.03
    assert results["dpo_win_rate"] > 0.5
    assert results["dpo_preference_accuracy"] > 0.7
    run_dir = tmp_path / "demo"
    assert json.loads((run_dir / "results.json").read_text()) == results
    for stage in ("sft", "dpo"):
        assert (run_dir / stage / "hf" / "model.safetensors").exists()
        assert (run_dir / stage / "metrics" / "curves.png").exists()
        assert (run_dir / stage / "config.json").exists()
    assert list((run_dir / "dpo" / "reference_cache").glob("*.npz"))
