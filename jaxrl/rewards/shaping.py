"""Reward shaping: DAPO soft overlong punishment and a format reward.

Soft overlong punishment (DAPO), lengths in tokens, ``L_max`` the maximum response length
and ``L_cache`` the buffer before it::

    R_len(L) = 0                                  if L <= L_max - L_cache
             = ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
             = -1                                 if L > L_max

It is added to the task reward by composing rewarders (weight 1) in ``RewardExecutor``.
The rewarder adapter ``overlong_reward`` reads the completion length in tokens from
``example[length_field]`` (default ``"completion_tokens"``); the training loop puts the
sampler's ``Rollout.lengths`` there, because a rewarder only sees the decoded text. Build a
picklable instance with ``make_overlong_rewarder(max_length, cache_length)``.

Format reward ``format_reward``: 1.0 when the completion is some reasoning followed by one
final boxed answer (``extract_answer`` succeeds without the answer-line fallback, at least
``min_reasoning_chars`` non-space characters before the box, at most
``max_trailing_chars`` after it, and a ``<think>`` block, if opened, is closed once before
the box), else 0.0.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

from jaxrl.rewards.math_extract import STRICT_POLICY, extract_answer
from jaxrl.rewards.math_normalize import top_level_boxes

__all__ = ["soft_overlong_penalty", "overlong_reward", "make_overlong_rewarder", "format_reward"]

DEFAULT_LENGTH_FIELD = "completion_tokens"


def soft_overlong_penalty(length: int, max_length: int, cache_length: int) -> float:
    """DAPO soft overlong punishment in [-1, 0] for a response of ``length`` tokens (formula
    above; all lengths in tokens)."""
    if cache_length <= 0 or cache_length > max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length}, {max_length}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    threshold = max_length - cache_length
    if length <= threshold:
        return 0.0
    if length <= max_length:
        return (threshold - length) / cache_length
    return -1.0


def overlong_reward(
    prompt: str,
    completion: str,
    example: Mapping[str, Any],
    *,
    max_length: int,
    cache_length: int,
    length_field: str = DEFAULT_LENGTH_FIELD,
) -> float:
    """Rewarder adapter: the soft overlong penalty in [-1, 0] of ``example[length_field]``
    tokens (lengths in tokens)."""
    if length_field not in example:
        raise KeyError(f"overlong reward needs the completion length in tokens in example[{length_field!r}]")
    return soft_overlong_penalty(int(example[length_field]), max_length, cache_length)


def make_overlong_rewarder(
    max_length: int, cache_length: int, length_field: str = DEFAULT_LENGTH_FIELD
) -> functools.partial:
    """A picklable ``(prompt, completion, example) -> float`` overlong rewarder (lengths in
    tokens; ValueError now for a bad ``max_length``/``cache_length``)."""
    soft_overlong_penalty(0, max_length, cache_length)  # validate the configuration now
    return functools.partial(
        overlong_reward, max_length=max_length, cache_length=cache_length, length_field=length_field
    )


_THINK_OPEN = re.compile(r"<think>")
_THINK_CLOSE = re.compile(r"</think>")
_LAST_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def format_reward(
    prompt: str,
    completion: str,
    example: Mapping[str, Any],
    *,
    min_reasoning_chars: int = 20,
    max_trailing_chars: int = 64,
) -> float:
    """1.0 for reasoning followed by one final boxed answer, else 0.0 (see module doc)."""
    if extract_answer(completion, STRICT_POLICY) is None:
        return 0.0
    box_starts = [m.start() for m in _LAST_BOX.finditer(completion)]
    boxes = top_level_boxes(completion)
    if not box_starts or not boxes:
        return 0.0
    last_end = boxes[1][-1]
    first_start = box_starts[0]
    if len("".join(completion[last_end:].split())) > max_trailing_chars:
        return 0.0
    opens, closes = _THINK_OPEN.findall(completion), list(_THINK_CLOSE.finditer(completion))
    if opens or closes:
        if len(opens) != 1 or len(closes) != 1 or closes[0].end() > first_start:
            return 0.0
        reasoning = completion[completion.index("<think>") + len("<think>") : closes[0].start()]
    else:
        reasoning = completion[:first_start]
    if len("".join(reasoning.split())) < min_reasoning_chars:
        return 0.0
    return 1.0
