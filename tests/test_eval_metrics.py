"""pass@k estimator against brute-force enumeration; plot files from a metrics.jsonl."""

import itertools
import json
import os

import pytest

from jaxrl.eval.evaluate import pass_at_k, pass_k_values
from jaxrl.train.metrics import plot_run


@pytest.mark.parametrize("n, c", [(4, 0), (4, 1), (5, 2), (6, 6), (8, 3)])
def test_pass_at_k_matches_enumeration_of_k_subsets(n, c):
    outcomes = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(outcomes, k))
        expected = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    assert pass_k_values(8) == [1, 2, 4, 8] and pass_k_values(6) == [1, 2, 4, 6]


def test_plot_run_writes_pngs(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as handle:
        for step in range(1, 6):
            handle.write(json.dumps({"step": step, "reward/mean": step / 10, "accuracy": step / 20,
                                     "loss": 1.0 / step, "time/sample": 0.5}) + "\n")
        handle.write('{"step": 6, "rew')  # a line cut by a crash is ignored
    paths = plot_run(str(tmp_path))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["loss.png", "reward.png", "time.png"]
    assert all(os.path.getsize(p) > 1000 for p in paths)


def test_maj_at_k_hand_worked():
    from jaxrl.eval.evaluate import final_answer, majority_correct

    # answers 5, 5, 7, None -> 5 is the majority; the samples answering 5 are correct
    assert majority_correct(["5", "5", "7", None], [True, True, False, False]) is True
    # tie 5 vs 7: the first seen (7) decides
    assert majority_correct(["7", "5", "5", "7"], [False, True, True, False]) is False
    assert majority_correct([None, None], [False, False]) is False
    assert final_answer("math", "so \\boxed{\\frac{1}{2}}") == final_answer("math", "\\boxed{\\dfrac12}")
    assert final_answer("countdown", "1+2=3\nanswer: 3") == "3"


def test_report_skipped_without_heldout_set():
    from jaxrl.config import base_config
    from jaxrl.eval.report import SKIPPED, heldout_before_after

    cfg = base_config()
    cfg.data.source = "files"
    assert heldout_before_after(cfg, params_after=None) == ({}, {}, SKIPPED)
