"""Ablation helpers: arm names, the fixed held-out set, mean ± std summaries."""

import json

import pytest

from jaxrl.ablate import arm_mask, format_summary, summarize, write_fixed_heldout
from jaxrl.config import load_config


def test_arm_names_map_to_masks():
    assert arm_mask("full") == ("all", 1.0)
    assert arm_mask("top20") == ("top", 0.2)
    assert arm_mask("bottom80") == ("bottom", 0.2)  # the complement of top20
    assert arm_mask("top50") == ("top", 0.5)
    for bad in ("top", "full20", "top0", "bottom100", "middle20"):
        with pytest.raises(ValueError):
            arm_mask(bad)


def test_fixed_heldout_is_distinct_heldout_problems(tmp_path):
    cfg = load_config("configs/default.py", ["--config.eval.max_examples=64"])
    path = write_fixed_heldout(cfg, str(tmp_path / "heldout.jsonl"))
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 64
    assert len({row["prompt"] for row in rows}) == 64
    assert {row["split"] for row in rows} == {"heldout"}
    assert rows == [json.loads(line) for line in open(write_fixed_heldout(cfg, str(tmp_path / "again.jsonl")))]


def _run(arm, seed, before, after):
    metrics = lambda greedy: {"greedy_accuracy": greedy, "pass_at_k": 0.5, "mean_response_length": 10.0, "k": 8}
    return {"arm": arm, "seed": seed, "before": metrics(before), "after": metrics(after), "train_seconds": 1.0}


def test_summary_mean_and_sample_std():
    runs = [_run("full", 0, 0.3, 0.5), _run("full", 1, 0.3, 0.7), _run("top20", 0, 0.3, 0.6)]
    rows = summarize(runs, ["full", "top20"])
    full, top = rows
    assert full["greedy_after"][0] == pytest.approx(0.6)
    assert full["greedy_after"][1] == pytest.approx(0.1414213, rel=1e-5)  # ddof=1
    assert full["greedy_gain"][0] == pytest.approx(0.3)
    assert top["greedy_after"] == (pytest.approx(0.6), 0.0)
    table = format_summary(rows, k=8)
    assert "| full | 2 |" in table and "+30.0 ± 14.1" in table
