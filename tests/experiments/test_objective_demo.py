"""The objective demo trains every objective and DPO beats the reference policy."""

import json
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "experiments"))

import objective_demo  # noqa: E402


def test_demo_improves_hidden_reward(tmp_path):
    results = objective_demo.main(["--steps", "40", "--out", str(tmp_path)])
    assert set(objective_demo.OBJECTIVES) < set(results)
    reference = results["reference policy"]["hidden_reward"]
    assert results["DPO (sigmoid)"]["hidden_reward"] > reference + 0.2
    assert results["DPO (sigmoid)"]["heldout_pair_accuracy"] > 0.6
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["steps"] == 40
