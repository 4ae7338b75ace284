"""Registries of rewarders and tasks, and the parser of rewarder specs.

Every rewarder has one signature, ``(prompt: str, completion: str, example: Mapping[str,
Any]) -> float`` (``base.Rewarder``), and is a module-level function so that the executor's
worker processes can import it.

* Rewarders by name: ``@register_rewarder("name")`` on a function, ``get_rewarder(name)``,
  ``rewarder_names()``. Built in: ``countdown``, ``countdown_format``, ``math``,
  ``math_strict``, ``math_format``.
* Tasks by name: a ``Task`` is the pair of rewarders a training run uses for a dataset, the
  correctness reward and the format reward. Built in: ``countdown`` (``countdown_reward``,
  ``countdown_format_reward``) and ``math`` (``math_reward``, ``shaping.format_reward``).
* ``load_rewarder_spec("package.module:function=weight")`` imports the module and returns
  ``(name, rewarder, weight)``; ``"name=weight"`` takes a registered rewarder. Importing the
  module lets it run ``@register_rewarder(...)`` itself, which is how code outside the
  package adds rewarders: ``"mypkg.rewards:my_name"`` may name a function of the module or a
  rewarder that the module registered.

Unknown names and malformed specs raise ValueError naming the culprit.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from jaxrl.rewards.base import Rewarder
from jaxrl.rewards.math import math_reward, math_reward_strict
from jaxrl.rewards.shaping import format_reward
from jaxrl.rewards.tasks import countdown_format_reward, countdown_reward

__all__ = [
    "Task",
    "get_rewarder",
    "get_task",
    "load_rewarder_spec",
    "register_rewarder",
    "register_task",
    "rewarder_names",
    "task_names",
]

_REWARDERS: dict[str, Rewarder] = {}
_TASKS: dict[str, Task] = {}
_SPEC_FORMS = "'package.module:function=weight' or 'name=weight'"


@dataclasses.dataclass(frozen=True)
class Task:
    """The rewarders of a task: ``correct`` (the task reward) and ``format`` (a shaping term)."""

    correct: Rewarder
    format: Rewarder


def _check_name(name: str, kind: str) -> None:
    if not isinstance(name, str) or not name or any(c in name for c in ":= \t\n"):
        raise ValueError(f"{kind} name must be a non-empty string without ':', '=' or spaces, got {name!r}")


def _lookup(table: dict, name: str, kind: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; registered: {', '.join(sorted(table)) or 'none'}")
    return table[name]


def _same_definition(a: Callable, b: Callable) -> bool:
    """Whether two callables are one definition (the same object, or one function of a module
    that was imported again)."""
    if a is b:
        return True
    names = [(getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)) for fn in (a, b)]
    return None not in names[0] and names[0] == names[1]


def register_rewarder(name: str) -> Callable[[Rewarder], Rewarder]:
    """Decorator: register a module-level rewarder under ``name`` and return it unchanged.

    Registering another function under a taken name raises ValueError; registering the same
    definition again (a re-imported module) replaces the entry.
    """
    _check_name(name, "rewarder")

    def register(fn: Rewarder) -> Rewarder:
        if not callable(fn):
            raise ValueError(f"rewarder {name!r} must be callable, got {fn!r}")
        known = _REWARDERS.get(name)
        if known is not None and not _same_definition(known, fn):
            raise ValueError(f"rewarder name {name!r} is already registered ({known.__module__}.{known.__qualname__})")
        _REWARDERS[name] = fn
        return fn

    return register


def rewarder_names() -> list[str]:
    """Names of the registered rewarders, sorted."""
    return sorted(_REWARDERS)


def get_rewarder(name: str) -> Rewarder:
    """The rewarder registered under ``name``; ValueError listing the known names otherwise."""
    return _lookup(_REWARDERS, name, "rewarder")


def register_task(name: str, *, correct: Rewarder, format: Rewarder) -> Task:
    """Register the rewarder pair of task ``name`` and return it as a ``Task``.

    A taken name raises ValueError unless both rewarders are the same definitions.
    """
    _check_name(name, "task")
    for role, fn in (("correct", correct), ("format", format)):
        if not callable(fn):
            raise ValueError(f"task {name!r}: {role} rewarder must be callable, got {fn!r}")
    task = Task(correct=correct, format=format)
    known = _TASKS.get(name)
    if known is not None and not (
        _same_definition(known.correct, correct) and _same_definition(known.format, format)
    ):
        raise ValueError(f"task name {name!r} is already registered")
    _TASKS[name] = task
    return task


def task_names() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    """The ``Task`` registered under ``name``; ValueError listing the known names otherwise."""
    return _lookup(_TASKS, name, "task")


def load_rewarder_spec(spec: str) -> tuple[str, Rewarder, float]:
    """``"package.module:function=weight"`` or ``"name=weight"`` -> (name, rewarder, weight).

    The weight is optional (default 1.0). With a module, the name is ``function`` and the
    rewarder is the module's function of that name, or else a rewarder defined in that module
    and registered under that name. Without one, ``name`` must be registered. Raises ValueError
    whose message starts with ``rewards.custom entry <spec>``.
    """
    target, _, weight_text = spec.partition("=")
    module_name, colon, function_name = target.partition(":")
    if not target or (colon and (not module_name or not function_name)):
        raise ValueError(f"rewards.custom entry {spec!r} must look like {_SPEC_FORMS}")
    try:
        weight = float(weight_text) if weight_text else 1.0
    except ValueError:
        raise ValueError(f"rewards.custom entry {spec!r}: weight {weight_text!r} is not a number") from None
    if not colon:
        if target not in _REWARDERS:
            raise ValueError(
                f"rewards.custom entry {spec!r}: no registered rewarder {target!r} "
                f"(registered: {', '.join(rewarder_names())}); a module's function is written "
                "'package.module:function=weight'"
            )
        return target, _REWARDERS[target], weight
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"rewards.custom entry {spec!r}: cannot import {module_name!r} ({error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):  # else a rewarder that this module registered under that name
        function = _REWARDERS.get(function_name)
        if getattr(function, "__module__", None) != module.__name__:
            function = None
    if function is None:
        raise ValueError(f"rewards.custom entry {spec!r}: {module_name} has no function {function_name!r}")
    return function_name, function, weight


for _name, _fn in (
    ("countdown", countdown_reward),
    ("countdown_format", countdown_format_reward),
    ("math", math_reward),
    ("math_strict", math_reward_strict),
    ("math_format", format_reward),
):
    register_rewarder(_name)(_fn)
register_task("countdown", correct=countdown_reward, format=countdown_format_reward)
register_task("math", correct=math_reward, format=format_reward)
