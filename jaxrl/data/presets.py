"""Dataset presets: the column layouts researchers download, registered by name.

A preset says where a row keeps its prompt (text, or a list of chat messages), its gold
answer (tried in order; the first present path wins) and its id, and how the gold answer is
normalised. Paths are dotted (``reward_model.ground_truth``) and walk nested objects.
``extract_row(row, spec)`` turns one raw row into an ``Extracted`` (messages, gold, id) or
raises ``BadRow`` with one of the ``BAD_ROW_REASONS``. The gold is normalised once, here, and
reaches every rewarder as ``example[GOLD_KEY]`` with the raw row beside it as
``example[ROW_KEY]`` (its top-level columns are also copied into ``example``).

Built in (sample rows as the public files hold them):

``dapo_math`` (BytedTsinghua-SIA/DAPO-Math-17k)::

    {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "Solve ... \\boxed{}"}],
     "ability": "MATH", "reward_model": {"ground_truth": "34", "style": "rule"},
     "extra_info": {"index": "9a9b..."}}                      gold "34", id extra_info.index

``gsm8k`` (openai/gsm8k)::

    {"question": "Natalia sold clips ...", "answer": "... 48+24 = <<48+24=72>>72\\n#### 72"}
                                                              gold "72" (text after "####", commas dropped)

``math`` (hendrycks MATH; MATH-500 adds ``answer``, ``subject``, ``unique_id``)::

    {"problem": "What is $1+1$?", "solution": "... so $\\boxed{2}$.", "level": "Level 1",
     "type": "Algebra"}                                       gold "2" (``answer`` if present,
                                                              else the last \\boxed{} of ``solution``)

``aime``::  {"id": 60, "year": 2024, "problem": "...", "answer": 33}   gold "33" (must be an integer)

``countdown`` (``jaxrl.data.synthetic``)::

    {"prompt": "make 9 from 3 5 7", "numbers": [3, 5, 7], "target": 9, ...}   gold "9"

``generic``: ``data.prompt_field`` (text or messages), ``data.answer_field``,
``data.id_field``, all dotted paths; the gold is the field as text, stripped.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Mapping, Sequence

GOLD_KEY = "gold"  # example[GOLD_KEY]: the normalised gold answer (str) rewarders grade against
ROW_KEY = "row"  # example[ROW_KEY]: the raw row as read from the file

BAD_ROW_REASONS = (
    "invalid_json",  # a jsonl line that does not parse
    "undecodable_bytes",  # a jsonl line that is not UTF-8
    "not_an_object",  # a row that is a list / number / string
    "missing_prompt",  # the prompt path is absent (or null)
    "prompt_wrong_type",  # the prompt is neither text nor a list of messages
    "empty_prompt",  # the prompt text is empty or only whitespace
    "bad_messages",  # a message without a string role / content, or no user turn
    "missing_answer",  # no gold path present
    "answer_wrong_type",  # the gold is not text or a number (bools count as wrong)
    "empty_answer",  # the gold is empty text
    "unparseable_gold",  # the preset cannot find the answer in the gold (no ####, no \\boxed{})
    "missing_field",  # a column the preset (or data.extra_fields) requires is absent / mistyped
    "overlong_prompt",  # over data.max_prompt_tokens with data.overlong_prompts = skip
    "duplicate",  # the same prompt and gold as an earlier row (dropped with data.drop_duplicates)
)


class BadRow(ValueError):
    """A row that cannot be used: ``reason`` is one of ``BAD_ROW_REASONS``."""

    def __init__(self, reason: str, message: str):
        if reason not in BAD_ROW_REASONS:
            raise ValueError(f"unknown bad-row reason {reason!r}")
        super().__init__(message)
        self.reason = reason


_MISSING = object()


def get_path(row: Mapping[str, Any], path: str) -> Any:
    """The value at dotted ``path`` in nested mappings (``_MISSING`` when a step is absent or null)."""
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, Mapping) or value.get(part) is None:
            return _MISSING
        value = value[part]
    return value


# --------------------------------------------------------------------------- gold normalisers
def _as_text(value: Any, path: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRow("answer_wrong_type", f"gold field {path!r} must be text or a number, got {value!r:.80}")
    text = str(value).strip()
    if not text:
        raise BadRow("empty_answer", f"gold field {path!r} is empty")
    return text


def plain_gold(value: Any, path: str) -> str:
    """The gold as text, stripped (numbers via ``str``)."""
    return _as_text(value, path)


def gsm8k_gold(value: Any, path: str) -> str:
    """The text after the last ``####`` with thousands commas removed: ``"... #### 1,200"`` -> ``"1200"``."""
    text = _as_text(value, path)
    if "####" not in text:
        raise BadRow("unparseable_gold", f"gold field {path!r} has no '#### <answer>' line")
    answer = text.rsplit("####", 1)[1].strip().replace(",", "")
    if not answer:
        raise BadRow("unparseable_gold", f"gold field {path!r} has nothing after '####'")
    return answer


_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces (None if none)."""
    starts = [match.end() for match in _BOX_RE.finditer(text)]
    for start in reversed(starts):
        depth, index = 1, start
        while index < len(text):
            char = text[index]
            if char == "\\":
                index += 2
                continue
            depth += (char == "{") - (char == "}")
            if depth == 0:
                return text[start:index].strip()
            index += 1
    return None


def boxed_gold(value: Any, path: str) -> str:
    """The last ``\\boxed{}`` of a worked solution (MATH's ``solution``)."""
    text = _as_text(value, path)
    answer = last_boxed(text)
    if not answer:
        raise BadRow("unparseable_gold", f"gold field {path!r} has no \\boxed{{...}} answer")
    return answer


def integer_gold(value: Any, path: str) -> str:
    """An integer answer (AIME, countdown): ``33``, ``"033"`` and ``33.0`` all give ``"33"``."""
    text = _as_text(value, path)
    try:
        number = float(text)
    except ValueError:
        raise BadRow("unparseable_gold", f"gold field {path!r} must be an integer, got {text!r:.40}") from None
    if not number.is_integer():
        raise BadRow("unparseable_gold", f"gold field {path!r} must be an integer, got {text!r:.40}")
    return str(int(number))


# --------------------------------------------------------------------------- presets
@dataclasses.dataclass(frozen=True)
class Preset:
    """A dataset layout: prompt path, gold paths with their normalisers (first present wins),
    id path, and columns every row must have."""

    name: str
    prompt: str
    gold: tuple[tuple[str, Callable[[Any, str], str]], ...]
    id: str | None = None
    required: tuple[str, ...] = ()


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    """Adds ``preset`` under its name (a legal value of ``data.preset`` / an eval set)."""
    if preset.name in PRESETS and PRESETS[preset.name] != preset:
        raise ValueError(f"dataset preset {preset.name!r} is already registered")
    PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> Preset:
    """The registered preset ``name``; KeyError listing the registered names."""
    if name not in PRESETS:
        raise KeyError(f"unknown dataset preset {name!r}; registered: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


register_preset(Preset("generic", prompt="prompt", gold=(("answer", plain_gold),)))
register_preset(Preset("dapo_math", prompt="prompt", gold=(("reward_model.ground_truth", plain_gold),),
                       id="extra_info.index"))
register_preset(Preset("gsm8k", prompt="question", gold=(("answer", gsm8k_gold),)))
register_preset(Preset("math", prompt="problem", gold=(("answer", plain_gold), ("solution", boxed_gold)),
                       id="unique_id"))
register_preset(Preset("aime", prompt="problem", gold=(("answer", integer_gold),), id="id"))
register_preset(Preset("countdown", prompt="prompt", gold=(("target", integer_gold),), required=("numbers",)))


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """How rows become prompts: a preset plus the config's overrides.

    prompt_field / answer_field / id_field: dotted paths replacing the preset's ("" = the
    preset's; answer_field None = no gold at all). prompt_template: ``str.format`` text with
    ``{prompt}``, applied to the (last) user turn. extra_fields: columns every row must have.
    """

    preset: str = "generic"
    prompt_field: str = ""
    answer_field: str | None = ""
    id_field: str = ""
    system_prompt: str | None = None
    prompt_template: str | None = None
    extra_fields: tuple[str, ...] = ()

    def __post_init__(self):
        get_preset(self.preset)
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{prompt}}', got {self.prompt_template!r}")


@dataclasses.dataclass(frozen=True)
class Extracted:
    """One usable row: chat messages (template and system turn applied), the user text rewarders
    see as ``prompt``, the normalised gold (None when the spec asks for none) and the id."""

    messages: tuple[Mapping[str, str], ...]
    prompt_text: str
    gold: str | None
    id: Any


def _messages_of(value: Any, path: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise BadRow("empty_prompt", f"prompt field {path!r} is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, Sequence) or isinstance(value, (bytes, bytearray)):
        raise BadRow("prompt_wrong_type", f"prompt field {path!r} must be text or a list of messages, "
                                          f"got {type(value).__name__}")
    messages = []
    for message in value:
        if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise BadRow("bad_messages", f"prompt field {path!r}: each message needs string 'role' and "
                                         f"'content', got {message!r:.80}")
        messages.append({"role": message["role"], "content": message["content"]})
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise BadRow("bad_messages", f"prompt field {path!r} has no user message")
    if not users[-1]["content"].strip():
        raise BadRow("empty_prompt", f"prompt field {path!r}: the user message is empty")
    return messages


def extract_row(row: Any, spec: RowSpec) -> Extracted:
    """One raw row -> ``Extracted``; ``BadRow`` (with its reason) when the row cannot be used."""
    if not isinstance(row, Mapping):
        raise BadRow("not_an_object", f"row is a {type(row).__name__}, not an object")
    preset = get_preset(spec.preset)
    for field in preset.required + tuple(spec.extra_fields):
        if get_path(row, field) is _MISSING:
            raise BadRow("missing_field", f"missing field {field!r}")
    prompt_path = spec.prompt_field or preset.prompt
    value = get_path(row, prompt_path)
    if value is _MISSING:
        raise BadRow("missing_prompt", f"missing prompt field {prompt_path!r}")
    messages = _messages_of(value, prompt_path)
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    if spec.prompt_template is not None:
        messages[last_user] = {"role": "user", "content": spec.prompt_template.format(prompt=messages[last_user]["content"])}
    user_text = messages[last_user]["content"]
    if spec.system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": spec.system_prompt})
    gold = None
    if spec.answer_field is not None:
        candidates = ((spec.answer_field, plain_gold),) if spec.answer_field else preset.gold
        for path, normalise in candidates:
            if (found := get_path(row, path)) is not _MISSING:
                gold = normalise(found, path)
                break
        else:
            raise BadRow("missing_answer", f"missing answer field {' or '.join(repr(p) for p, _ in candidates)}")
    id_path = spec.id_field or preset.id
    identifier = None if id_path is None else get_path(row, id_path)
    return Extracted(tuple(messages), user_text, gold,
                     None if identifier is _MISSING else identifier)


def example_of(row: Mapping[str, Any], gold: str | None) -> dict[str, Any]:
    """What a rewarder receives as ``example``: the row's columns, ``GOLD_KEY`` and ``ROW_KEY``."""
    return {**row, GOLD_KEY: gold, ROW_KEY: row}


_SET_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")


def parse_eval_set(spec: str) -> tuple[str, str | None, str]:
    """``"name=preset:path"`` -> (name, preset, path). ``preset:`` is optional (None: the
    caller's default) and recognised only when it names a registered preset; ``name=`` is
    optional too (default: the file name without its extension). ValueError on an empty path."""
    name, rest = None, spec.strip()
    head, sep, tail = rest.partition("=")
    if sep and _SET_NAME_RE.fullmatch(head):
        name, rest = head, tail
    preset = None
    head, sep, tail = rest.partition(":")
    if sep and head in PRESETS:
        preset, rest = head, tail
    if not rest:
        raise ValueError(f"{spec!r} names no file (expected 'name=preset:path')")
    if name is None:
        name = os.path.splitext(os.path.basename(rest.rstrip("/")))[0] or rest
    return name, preset, rest
