"""Countdown-lite generator and verifier."""

import json
import pickle
import random

import pytest

from jaxrl.data import synthetic
from jaxrl.rewards import tasks


def test_generation_is_deterministic_and_seed_dependent():
    first = synthetic.generate_problems(50, seed=3)
    assert first == synthetic.generate_problems(50, seed=3)
    assert first != synthetic.generate_problems(50, seed=4)
    row = first[0]
    assert row["prompt"] == synthetic.format_prompt(row["numbers"], row["target"])
    assert row["answer"] == str(row["target"])
    assert len(row["numbers"]) == 3 and all(1 <= n <= 20 for n in row["numbers"])


def test_heldout_is_disjoint_from_train():
    def key(row):
        return (tuple(row["numbers"]), row["target"])

    train = {key(r) for r in synthetic.generate_problems(3000, seed=0, split="train", difficulty="easy")}
    heldout = {key(r) for r in synthetic.generate_problems(300, seed=0, split="heldout", difficulty="easy")}
    heldout_other_seed = {key(r) for r in synthetic.generate_problems(300, seed=9, split="heldout", difficulty="easy")}
    assert train and heldout
    assert not train & heldout
    assert not train & heldout_other_seed
    assert all(synthetic.problem_split(list(k[0]), k[1]) == "heldout" for k in heldout)


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
def test_reference_solutions_verify(difficulty):
    rows = synthetic.generate_problems(200, seed=1, difficulty=difficulty)
    for row in rows:
        completion = synthetic.reference_solution(row)
        assert tasks.countdown_reward(row["prompt"], completion, row) == 1.0, (row, completion)
        assert tasks.countdown_format_reward(row["prompt"], completion, row) == 1.0
        assert completion.endswith(f"answer: {row['target']}")
    longest = max(len(synthetic.reference_solution(r)) for r in rows)
    assert longest <= 48  # characters == tokens for the char-level tokenizer


def test_reference_solution_searches_without_stored_chain():
    row = {"prompt": "make 9 from 3 5 7", "numbers": [3, 5, 7], "target": 9}
    completion = synthetic.reference_solution(row)
    assert tasks.countdown_reward(row["prompt"], completion, row) == 1.0


def test_corrupted_solutions_never_verify_but_keep_the_format():
    rng = random.Random(0)
    rows = synthetic.generate_problems(300, seed=2)
    format_ok = 0
    for row in rows:
        completion = synthetic.corrupted_solution(row, rng)
        assert tasks.countdown_reward(row["prompt"], completion, row) == 0.0, (row, completion)
        format_ok += tasks.countdown_format_reward(row["prompt"], completion, row)
    assert format_ok == len(rows)


ROW = {"prompt": "make 9 from 3 5 7", "numbers": [3, 5, 7], "target": 9, "answer": "9"}


@pytest.mark.parametrize(
    "completion",
    [
        "answer: 9",  # copies the target without any work
        "5+7=12\n12-3=9",  # no answer line
        "5+7=12\n12-3=9\nanswer: 8",  # answer disagrees with the chain
        "5+7=13\n13-4=9\nanswer: 9",  # arithmetic slip and a number not given
        "5+7=12\n12-3=9\nanswer: 9\n1+1=2",  # text after the answer
        "5+5=10\n10-1=9\nanswer: 9",  # reuses a number
        "5+7=12\nanswer: 12",  # leaves a number unused
        "5+7=12\n11-2=9\nanswer: 9",  # left operand is not the running value
        "5*7=35\n35-3=32\nanswer: 9",  # operator outside the grammar
        "__import__('os').system('true')\nanswer: 9",  # code is never run
        "5+7=12\n12-3=9\nanswer: 9" + " " * 3000,  # over the length bound
        "5+7=12\n12-3=9\nanswer: ９",  # non-ASCII digit
        "5+7=12\n12-3=9\nanswer: 99999999999",  # number over the digit bound
        "",
    ],
)
def test_verifier_rejects_malformed_and_attack_strings(completion):
    assert tasks.countdown_reward(ROW["prompt"], completion, ROW) == 0.0


def test_verifier_accepts_any_valid_chain_and_spacing():
    for completion in ["5+7=12\n12-3=9\nanswer: 9", "7-3=4\n4+5=9\nanswer: 9", " 5 + 7 = 12\n12-3=9\nanswer:9\n"]:
        assert tasks.countdown_reward(ROW["prompt"], completion, ROW) == 1.0, completion
    negative_running_value = {"numbers": [3, 5, 7], "target": 5}
    assert tasks.countdown_reward("", "3-5=-2\n-2+7=5\nanswer: 5", negative_running_value) == 1.0


def test_format_reward_ignores_arithmetic_but_needs_step_count():
    assert tasks.countdown_format_reward("", "1+1=7\n7-2=0\nanswer: 3", ROW) == 1.0
    assert tasks.countdown_format_reward("", "1+1=7\nanswer: 3", ROW) == 0.0


def test_bad_example_names_the_field():
    with pytest.raises(KeyError, match="target"):
        tasks.countdown_reward("", "answer: 1", {"numbers": [1, 2]})
    with pytest.raises(ValueError, match="numbers"):
        tasks.countdown_reward("", "answer: 1", {"numbers": "ab", "target": 3})


def test_rewarders_pickle():
    for fn in (tasks.countdown_reward, tasks.countdown_format_reward):
        assert pickle.loads(pickle.dumps(fn)) is fn


def test_dump_splits_writes_jsonl(tmp_path):
    paths = synthetic.dump_splits(tmp_path, num_train=20, num_heldout=5, seed=0, difficulty="easy")
    train = [json.loads(line) for line in open(paths["train"])]
    heldout = [json.loads(line) for line in open(paths["heldout"])]
    assert len(train) == 20 and len(heldout) == 5
    assert all(tasks.countdown_reward(r["prompt"], r["reference"], r) == 1.0 for r in train + heldout)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split"):
        synthetic.generate_problems(1, seed=0, split="test")
    with pytest.raises(ValueError, match="difficulty"):
        synthetic.generate_problems(1, seed=0, difficulty="extreme")


def test_cli_writes_both_splits(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path), "--train", "7", "--heldout", "3", "--difficulty", "hard"])
    assert "train:" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(tmp_path / "heldout.jsonl")]
    assert len(rows) == 3 and all(len(r["numbers"]) == 4 and r["split"] == "heldout" for r in rows)
