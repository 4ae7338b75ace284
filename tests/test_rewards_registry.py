"""Rewarder and task registries, and rewarder specs (also from a module outside the package)."""

import dataclasses
import sys
import textwrap

import numpy as np
import pytest

from jaxrl.rewards import registry
from jaxrl.rewards.base import RewardExecutor
from jaxrl.rewards.math import math_reward, math_reward_strict
from jaxrl.rewards.registry import (
    Task,
    get_rewarder,
    get_task,
    load_rewarder_spec,
    register_rewarder,
    register_task,
    rewarder_names,
    task_names,
)
from jaxrl.rewards.shaping import format_reward
from jaxrl.rewards.tasks import countdown_format_reward, countdown_reward

OUTSIDE_MODULE = """
from jaxrl.rewards.registry import register_rewarder


@register_rewarder("shout")
def shout_reward(prompt, completion, example):
    return 1.0 if completion.isupper() else 0.0


def plain_reward(prompt, completion, example):
    return float(len(completion))


NOT_CALLABLE = 3
"""


@pytest.fixture(autouse=True)
def isolated_registries(monkeypatch):
    """Each test registers into copies, so nothing leaks into other tests."""
    monkeypatch.setattr(registry, "_REWARDERS", dict(registry._REWARDERS))
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))


@pytest.fixture
def outside_module(tmp_path, monkeypatch, request):
    """A module written to tmp_path (not inside jaxrl) and importable by name."""
    name = f"outside_rewards_{request.node.name.replace('[', '_').replace(']', '').replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(OUTSIDE_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_builtin_tasks_are_the_training_pairs():
    assert task_names() == ["countdown", "math"]
    assert get_task("countdown") == Task(correct=countdown_reward, format=countdown_format_reward)
    assert get_task("math") == Task(correct=math_reward, format=format_reward)
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_task("math").correct = countdown_reward


def test_builtin_rewarders():
    assert rewarder_names() == ["countdown", "countdown_format", "math", "math_format", "math_strict"]
    assert get_rewarder("math") is math_reward and get_rewarder("math_strict") is math_reward_strict
    assert get_rewarder("countdown")("p", "3+4=7\nanswer: 7", {"numbers": [3, 4], "target": 7}) == 1.0


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown rewarder 'nope'; registered: countdown, countdown_format, math"):
        get_rewarder("nope")
    with pytest.raises(ValueError, match=r"unknown task 'nope'; registered: countdown, math"):
        get_task("nope")


def test_register_rewarder_and_task():
    @register_rewarder("double_length")
    def double_length(prompt, completion, example):
        return 2.0 * len(completion)

    assert get_rewarder("double_length") is double_length
    assert "double_length" in rewarder_names()
    task = register_task("lengthy", correct=double_length, format=countdown_format_reward)
    assert get_task("lengthy") is task and task.correct is double_length
    assert task_names() == ["countdown", "lengthy", "math"]


def test_registering_a_taken_name_or_a_bad_name_fails():
    def other(prompt, completion, example):
        return 0.0

    with pytest.raises(ValueError, match="'math' is already registered"):
        register_rewarder("math")(other)
    register_rewarder("math")(math_reward)  # the same definition again: fine
    with pytest.raises(ValueError, match="task name 'math' is already registered"):
        register_task("math", correct=other, format=format_reward)
    for bad in ["", "a:b", "a=1", "two words"]:
        with pytest.raises(ValueError, match="name must be"):
            register_rewarder(bad)
    with pytest.raises(ValueError, match="must be callable"):
        register_rewarder("number")(3)
    with pytest.raises(ValueError, match="format rewarder must be callable"):
        register_task("broken", correct=other, format=None)


def test_spec_of_a_module_outside_the_package_registers_its_rewarders(outside_module):
    assert "shout" not in rewarder_names()
    name, function, weight = load_rewarder_spec(f"{outside_module}:plain_reward=0.25")
    assert (name, weight) == ("plain_reward", 0.25) and function("p", "abc", {}) == 3.0
    # Importing the module ran its @register_rewarder: the name now works on its own ...
    shout = get_rewarder("shout")
    assert load_rewarder_spec("shout=2") == ("shout", shout, 2.0)
    assert shout("p", "HEY", {}) == 1.0 and shout("p", "hey", {}) == 0.0
    # ... and after the module's name, for its function or for a name it registered.
    assert load_rewarder_spec(f"{outside_module}:shout_reward") == ("shout_reward", shout, 1.0)
    assert load_rewarder_spec(f"{outside_module}:shout") == ("shout", shout, 1.0)


def test_spec_weights_default_to_one():
    assert load_rewarder_spec("math") == ("math", math_reward, 1.0)
    assert load_rewarder_spec("jaxrl.rewards.math:math_reward=") == ("math_reward", math_reward, 1.0)
    assert load_rewarder_spec("countdown=-0.5")[2] == -0.5


@pytest.mark.parametrize(
    "spec,message",
    [
        ("", "must look like 'package.module:function=weight' or 'name=weight'"),
        ("=1", "must look like"),
        ("mod:", "must look like"),
        (":fn=1", "must look like"),
        ("math=heavy", "weight 'heavy' is not a number"),
        ("nope=1", r"no registered rewarder 'nope' \(registered: countdown, countdown_format, math"),
        ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz'"),
        ("jaxrl.rewards.tasks:no_such_fn", "jaxrl.rewards.tasks has no function 'no_such_fn'"),
        ("jaxrl.rewards.tasks:MAX_STEPS", "has no function 'MAX_STEPS'"),
        ("jaxrl.rewards.tasks:math", "has no function 'math'"),  # registered, but not by tasks
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        load_rewarder_spec(spec)
    assert str(error.value).startswith(f"rewards.custom entry {spec!r}")


def test_outside_rewarder_runs_in_the_pool(outside_module):
    name, function, _ = load_rewarder_spec(f"{outside_module}:shout_reward")
    with RewardExecutor({name: (function, 1.0)}, num_workers=1) as executor:
        total, _, metrics = executor.score(["p", "p"], ["LOUD", "quiet"], [{}, {}])
    np.testing.assert_allclose(total, [1.0, 0.0])
    assert metrics[f"reward/{name}/failures"] == 0.0
