"""DAPO soft overlong punishment and the format reward."""

import pickle

import pytest

from jaxrl.rewards.shaping import (
    format_reward,
    make_overlong_rewarder,
    overlong_reward,
    soft_overlong_penalty,
)


@pytest.mark.parametrize(
    "length,expected",
    [
        (0, 0.0),
        (100, 0.0),
        (16_384, 0.0),  # = L_max - L_cache
        (16_385, -1 / 4096),
        (18_432, -0.5),
        (20_479, -4095 / 4096),
        (20_480, -1.0),  # = L_max
        (20_481, -1.0),
        (100_000, -1.0),
    ],
)
def test_soft_overlong_penalty_dapo_recipe(length, expected):
    assert soft_overlong_penalty(length, 20_480, 4_096) == pytest.approx(expected)


def test_soft_overlong_penalty_is_monotone_and_bounded():
    values = [soft_overlong_penalty(n, 100, 30) for n in range(0, 150)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert max(values) == 0.0 and min(values) == -1.0


@pytest.mark.parametrize("max_length,cache_length", [(100, 0), (100, 101), (100, -5)])
def test_soft_overlong_penalty_rejects_bad_config(max_length, cache_length):
    with pytest.raises(ValueError):
        soft_overlong_penalty(10, max_length, cache_length)
    with pytest.raises(ValueError):
        make_overlong_rewarder(max_length, cache_length)


def test_overlong_rewarder_reads_length_from_example():
    rewarder = pickle.loads(pickle.dumps(make_overlong_rewarder(100, 20)))
    assert rewarder("p", "text", {"completion_tokens": 90}) == pytest.approx(-0.5)
    assert rewarder("p", "text", {"completion_tokens": 10}) == 0.0
    custom = make_overlong_rewarder(100, 20, length_field="n_tokens")
    assert custom("p", "text", {"n_tokens": 200}) == -1.0
    with pytest.raises(KeyError, match="completion_tokens"):
        rewarder("p", "text", {})
    assert overlong_reward("p", "t", {"completion_tokens": 85}, max_length=100, cache_length=20) == -0.25


REASONING = "First we note that 2 + 2 = 4, then we double it. "


@pytest.mark.parametrize(
    "completion,expected",
    [
        (REASONING + "So the answer is \\boxed{8}.", 1.0),
        ("<think>" + REASONING + "</think> The answer is \\boxed{8}.", 1.0),
        ("\\boxed{8}", 0.0),  # no reasoning
        ("short \\boxed{8}", 0.0),
        (REASONING + "Answer: 8", 0.0),  # no box
        (REASONING + "\\boxed{8} " + "and then more text " * 10, 0.0),  # box not final
        (REASONING + "\\boxed{7} or \\boxed{8}", 0.0),  # several answers
        ("<think>" + REASONING + "\\boxed{8}</think>", 0.0),  # box inside the thinking
        ("<think>" + REASONING + " The answer is \\boxed{8}.", 0.0),  # unclosed think
        (REASONING + "\\boxed{8", 0.0),  # unbalanced
        (REASONING + "\\boxed{8} The answer above is correct.", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward("p", completion, {}) == expected
