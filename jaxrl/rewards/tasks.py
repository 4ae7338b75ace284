"""Verifiers for the synthetic tasks in ``jaxrl.data.synthetic``.

Rewarders follow the project signature ``(prompt, completion, example) -> float`` and are
module-level functions so a process pool can pickle them. They never evaluate code: a
completion is parsed by two anchored regular expressions over bounded input (at most
``MAX_COMPLETION_CHARS`` characters, ``MAX_STEPS`` steps, 6-digit numbers), so the work
per call is bounded whatever the model writes.

Countdown completion grammar (spaces inside a line are ignored; one trailing newline ok)::

    completion := step ("\\n" step)* "\\n" "answer:" " "? integer
    step       := integer ("+" | "-") digits "=" integer
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

MAX_COMPLETION_CHARS = 2000
MAX_STEPS = 8
_STEP_RE = re.compile(r"(-?[0-9]{1,6})([+-])([0-9]{1,6})=(-?[0-9]{1,6})")
_ANSWER_RE = re.compile(r"answer: ?(-?[0-9]{1,6})")


@dataclasses.dataclass(frozen=True)
class CountdownParse:
    """A syntactically valid countdown completion: its steps and the stated answer."""

    steps: tuple[tuple[int, str, int, int], ...]
    answer: int


def parse_countdown(completion: str) -> CountdownParse | None:
    """Parses a completion into steps (left, sign, right, result) and the answer; ``None`` when
    it breaks the grammar or is longer than ``MAX_COMPLETION_CHARS`` characters."""
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return None
    text = completion.strip()
    lines = text.split("\n")
    if not 2 <= len(lines) <= MAX_STEPS + 1:
        return None
    answer_match = _ANSWER_RE.fullmatch(lines[-1].strip())
    if answer_match is None:
        return None
    steps = []
    for line in lines[:-1]:
        step_match = _STEP_RE.fullmatch(line.replace(" ", ""))
        if step_match is None:
            return None
        left, sign, right, result = step_match.groups()
        steps.append((int(left), sign, int(right), int(result)))
    return CountdownParse(steps=tuple(steps), answer=int(answer_match.group(1)))


def _example_problem(example: Mapping) -> tuple[list[int], int]:
    """Reads ``numbers`` and ``target`` from a dataset row (``example["row"]`` when the data
    layer wrapped it, else ``example`` itself), naming the key that is wrong."""
    example = example.get("row") or example
    for key in ("numbers", "target"):
        if key not in example:
            raise KeyError(f"countdown example is missing the field {key!r} (has {sorted(example)})")
    try:
        numbers = [int(n) for n in example["numbers"]]
    except (TypeError, ValueError) as error:
        raise ValueError(f"countdown example field 'numbers' must be a list of ints, got {example['numbers']!r}") from error
    try:
        target = int(example["target"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"countdown example field 'target' must be an int, got {example['target']!r}") from error
    return numbers, target


def check_countdown_chain(parsed: CountdownParse, numbers: list[int], target: int) -> bool:
    """True when the steps use every number exactly once, chain correctly and reach ``target``."""
    if len(parsed.steps) != len(numbers) - 1:
        return False
    unused = list(numbers)
    running = None
    for index, (left, sign, right, result) in enumerate(parsed.steps):
        if index == 0:
            if left not in unused:
                return False
            unused.remove(left)
        elif left != running:
            return False
        if right not in unused:
            return False
        unused.remove(right)
        if result != (left + right if sign == "+" else left - right):
            return False
        running = result
    return not unused and running == target and parsed.answer == target


def countdown_reward(prompt: str, completion: str, example: Mapping) -> float:
    """1.0 when the completion is a valid chain over the example's numbers reaching its target
    and ends with ``answer: <target>``; 0.0 otherwise."""
    del prompt  # the example carries the problem
    numbers, target = _example_problem(example)
    parsed = parse_countdown(completion)
    if parsed is None:
        return 0.0
    return 1.0 if check_countdown_chain(parsed, numbers, target) else 0.0


def countdown_format_reward(prompt: str, completion: str, example: Mapping) -> float:
    """1.0 when the completion follows the grammar with the right number of steps, whatever
    its arithmetic; 0.0 otherwise. Meant as a small shaping term next to ``countdown_reward``."""
    del prompt
    numbers, _ = _example_problem(example)
    parsed = parse_countdown(completion)
    if parsed is None:
        return 0.0
    return 1.0 if len(parsed.steps) == len(numbers) - 1 else 0.0
