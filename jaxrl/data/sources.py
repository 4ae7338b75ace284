"""Prompt sources: prompt files in a named layout (``presets``) -> tokenised prompt batches
through grain.

``make_prompt_iterator`` reads every file once (``files.read_rows``), extracts each row by
its preset (prompt or chat messages, normalised gold, id; template and system turn
applied), tokenises the kept rows, then hands them to a grain ``MapDataset`` for the seeded
per-epoch shuffle, the epochs and the batching. Each batch is a list of dicts::

    {"prompt_text": str,          # the user text as rewarders see it (after any truncation)
     "prompt_tokens": list[int],  # what the sampler is conditioned on (template applied)
     "answer": str | None,        # the normalised gold answer (presets.GOLD_KEY in example)
     "id": Any,                   # the row id from the preset's id path (None if absent)
     "example": dict}             # presets.example_of(row, gold): columns + "gold" + "row"

Bad input is never dropped silently: bad rows are skipped and counted by reason
(``presets.BAD_ROW_REASONS``: bad JSON or bytes, not an object, missing / mistyped / empty
fields, unparseable gold, over-long prompts, duplicates when dropped) with the first error
of each reason (file, line, message) kept in ``PromptIterator.stats``. Duplicates (same
prompt and gold) are always counted and dropped only with ``drop_duplicates``. A missing
file, an unknown format or a columnar file without the prompt column is a start-up error
naming it.

``PromptIterator.get_state()`` returns a small JSON-serialisable dict; a new iterator
built with the same arguments and ``set_state(state)`` yields exactly the batches the
original would have yielded next. Multi-host: each process passes its ``shard_index`` of
``shard_count`` and iterates its own disjoint, equally sized slice of the rows.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping, Sequence

import grain

from jaxrl.data.files import read_rows, resolve_files  # noqa: F401  (resolve_files re-exported)
from jaxrl.data.presets import BadRow, Extracted, RowSpec, example_of, extract_row, get_preset
from jaxrl.data.tokenizer import render_messages

OVERLONG_MODES = ("skip", "truncate")
_ENCODE_CHUNK = 4096
_STATE_VERSION = 1
_NOT_MALFORMED = ("overlong_prompt", "duplicate")


@dataclasses.dataclass
class SourceStats:
    """Counters from loading the files (all processes see the same numbers).

    rows_read: rows found in the files (blank jsonl lines are not rows).
    skipped: reason (``presets.BAD_ROW_REASONS``) -> rows skipped for it; ``first_error``:
        reason -> "file:line: message" of the first such row.
    rows_malformed: rows skipped for a reason other than over-long / duplicate;
        ``first_malformed_error`` is the first of them.
    prompts_overlong_skipped / prompts_truncated: rows over ``max_prompt_tokens``.
    duplicates: rows with the same prompt and gold as an earlier row (kept unless dropped).
    rows_kept: rows that entered the dataset (before sharding).
    rows_dropped_for_even_shards: the remainder of ``rows_kept`` modulo ``shard_count``,
        dropped so every process has the same number of rows (and steps).
    rows_in_shard: rows this process iterates over per epoch.
    """

    rows_read: int = 0
    rows_malformed: int = 0
    first_malformed_error: str | None = None
    prompts_overlong_skipped: int = 0
    prompts_truncated: int = 0
    duplicates: int = 0
    rows_kept: int = 0
    rows_dropped_for_even_shards: int = 0
    rows_in_shard: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    first_error: dict[str, str] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The counters as a plain dict (for logging)."""
        return dataclasses.asdict(self)

    def skip(self, reason: str, where: str) -> None:
        """Counts one skipped row under ``reason`` (``where``: "file:line: message")."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.first_error.setdefault(reason, where)
        if reason == "overlong_prompt":
            self.prompts_overlong_skipped += 1
        elif reason != "duplicate":
            self.rows_malformed += 1
            if self.first_malformed_error is None:
                self.first_malformed_error = where

    def summary(self) -> str:
        """One line: rows kept of read, then the skipped rows by reason."""
        reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(self.skipped.items()))
        extra = f"; {self.duplicates} duplicate(s)" if self.duplicates else ""
        extra += f"; {self.prompts_truncated} truncated" if self.prompts_truncated else ""
        return f"{self.rows_kept} rows kept of {self.rows_read}; skipped: {reasons or 'none'}{extra}"


MalformedRow = BadRow  # the former name


def _encode_texts(tokenizer, texts: Sequence[str], use_chat_template: bool) -> list[list[int]]:
    """Batch-encodes rendered prompt texts (the Rust tokenizer is much faster on batches)."""
    # A rendered chat template already holds its special tokens (e.g. bos).
    encoded = tokenizer(list(texts), add_special_tokens=not use_chat_template)["input_ids"]
    return [list(ids) for ids in encoded]


def _with_user_text(messages: Sequence[Mapping[str, str]], text: str) -> list[dict]:
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return [dict(m, content=text) if i == last_user else dict(m) for i, m in enumerate(messages)]


def _truncate_prompt(extracted: Extracted, render, max_prompt_tokens: int) -> tuple[str, list[int]]:
    """Cuts the end of the (last) user turn until the encoded prompt fits in ``max_prompt_tokens``.

    The text is cut (not the token list) so the chat template's framing, e.g. the
    generation prompt, survives. Binary search for the longest prefix that fits.
    """
    prompt = extracted.prompt_text

    def encode(length: int) -> list[int]:
        return render([render.text(_with_user_text(extracted.messages, prompt[:length]))])[0]

    low, high = 0, len(prompt)
    while low < high:
        middle = (low + high + 1) // 2
        if len(encode(middle)) <= max_prompt_tokens:
            low = middle
        else:
            high = middle - 1
    if low == 0:
        raise ValueError(
            f"max_prompt_tokens={max_prompt_tokens} leaves no room for any prompt text after the "
            "chat template and system prompt"
        )
    return prompt[:low], encode(low)


class _Renderer:
    """messages -> rendered text (``text``) and rendered texts -> token lists (call)."""

    def __init__(self, tokenizer, use_chat_template: bool, chat_template_kwargs):
        self.tokenizer, self.use_chat_template = tokenizer, use_chat_template
        self.kwargs = dict(chat_template_kwargs or {})

    def text(self, messages) -> str:
        return render_messages(self.tokenizer, messages, use_chat_template=self.use_chat_template,
                               chat_template_kwargs=self.kwargs)

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        return _encode_texts(self.tokenizer, texts, self.use_chat_template)


def _required_columns(spec: RowSpec) -> list[tuple[str, ...]]:
    """Top-level columns a columnar file must have: the prompt's, one of the gold's, the extras."""
    preset = get_preset(spec.preset)
    groups = [((spec.prompt_field or preset.prompt).split(".")[0],)]
    if spec.answer_field is not None:
        paths = (spec.answer_field,) if spec.answer_field else tuple(path for path, _ in preset.gold)
        groups.append(tuple(path.split(".")[0] for path in paths))
    groups.extend((field.split(".")[0],) for field in preset.required + spec.extra_fields)
    return groups


def _extract_all(files: Sequence[str], spec: RowSpec, stats: SourceStats,
                 drop_duplicates: bool) -> list[tuple[dict, Extracted]]:
    valid: list[tuple[dict, Extracted]] = []
    seen: set[str] = set()
    for path in files:
        for line_number, row, bad in read_rows(path, _required_columns(spec)):
            stats.rows_read += 1
            try:
                if bad is not None:
                    raise bad
                extracted = extract_row(row, spec)
            except BadRow as error:
                stats.skip(error.reason, f"{path}:{line_number}: {error}")
                continue
            key = json.dumps([extracted.messages, extracted.gold], sort_keys=True)
            if key in seen:
                stats.duplicates += 1
                if drop_duplicates:
                    stats.skip("duplicate", f"{path}:{line_number}: same prompt and gold as an earlier row")
                    continue
            seen.add(key)
            valid.append((row, extracted))
    return valid


def load_prompt_records(
    files: Sequence[str],
    tokenizer,
    *,
    preset: str = "generic",
    prompt_field: str = "",
    answer_field: str | None = "",
    id_field: str = "",
    extra_fields: Sequence[str] = (),
    system_prompt: str | None = None,
    prompt_template: str | None = None,
    use_chat_template: bool = True,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    max_prompt_tokens: int | None = None,
    overlong: str = "skip",
    drop_duplicates: bool = False,
) -> tuple[list[dict], SourceStats]:
    """Reads, validates and tokenises every row of ``files`` (in order); returns records + counters.

    A record: {"prompt_text": the user text (template applied, after any truncation),
    "prompt_tokens": list[int], "answer": the normalised gold (str | None), "id",
    "example": ``presets.example_of(row, gold)``}.
    """
    if overlong not in OVERLONG_MODES:
        raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {overlong!r}")
    if max_prompt_tokens is not None and max_prompt_tokens <= 0:
        raise ValueError(f"max_prompt_tokens must be positive or None, got {max_prompt_tokens}")
    spec = RowSpec(preset=preset, prompt_field=prompt_field, answer_field=answer_field, id_field=id_field,
                   system_prompt=system_prompt, prompt_template=prompt_template, extra_fields=tuple(extra_fields))
    stats = SourceStats()
    valid = _extract_all(files, spec, stats, drop_duplicates)
    render = _Renderer(tokenizer, use_chat_template, chat_template_kwargs)
    records: list[dict] = []
    for chunk_start in range(0, len(valid), _ENCODE_CHUNK):
        chunk = valid[chunk_start : chunk_start + _ENCODE_CHUNK]
        texts = [render.text(extracted.messages) for _, extracted in chunk]
        for (row, extracted), tokens in zip(chunk, render(texts)):
            prompt_text = extracted.prompt_text
            if max_prompt_tokens is not None and len(tokens) > max_prompt_tokens:
                if overlong == "skip":
                    stats.skip("overlong_prompt", f"{len(tokens)} prompt tokens > {max_prompt_tokens}")
                    continue
                prompt_text, tokens = _truncate_prompt(extracted, render, max_prompt_tokens)
                stats.prompts_truncated += 1
            records.append({"prompt_text": prompt_text, "prompt_tokens": tokens, "answer": extracted.gold,
                            "id": extracted.id, "example": example_of(row, extracted.gold)})
    stats.rows_kept = len(records)
    return records, stats


def _fingerprint(records: Sequence[dict], settings: Mapping[str, Any]) -> str:
    """Identifies the pipeline a state belongs to, so a mismatched resume fails loudly.

    Built from the kept prompts' tokens (not file paths), so moving the files is fine.
    """
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for record in records:
        digest.update(json.dumps(record["prompt_tokens"]).encode())
    return digest.hexdigest()[:16]


def _copy_record(record: dict) -> dict:
    # Batches get their own dicts so a consumer mutating one cannot corrupt later epochs.
    return {
        "prompt_text": record["prompt_text"],
        "prompt_tokens": list(record["prompt_tokens"]),
        "answer": record["answer"],
        "id": copy.deepcopy(record["id"]),
        "example": copy.deepcopy(record["example"]),
    }


class PromptIterator:
    """Iterates batches (lists of prompt records) with a resumable, JSON-serialisable state."""

    def __init__(self, dataset, stats: SourceStats, fingerprint: str):
        self._iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        self._iterator = iter(self._iter_dataset)
        self.stats = stats
        self.fingerprint = fingerprint

    def __iter__(self) -> "PromptIterator":
        return self

    def __next__(self) -> list[dict]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """The position in the stream as a JSON-serialisable dict (for the checkpoint)."""
        return {"version": _STATE_VERSION, "fingerprint": self.fingerprint, "grain": self._iterator.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Moves to a position saved by ``get_state`` of an iterator over the same pipeline."""
        for key in ("version", "fingerprint", "grain"):
            if key not in state:
                raise KeyError(f"prompt iterator state has no {key!r} (keys: {sorted(state)})")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"prompt iterator state version {state['version']} != {_STATE_VERSION}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                "prompt iterator state was saved for a different pipeline (files, fields, tokenisation, "
                f"seed, batch size or sharding changed): {state['fingerprint']} != {self.fingerprint}"
            )
        self._iterator.set_state(dict(state["grain"]))


def make_prompt_iterator(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    drop_remainder: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
    **row_options: Any,
) -> PromptIterator:
    """Builds the prompt pipeline over ``files`` (paths, glob patterns or save_to_disk dirs).

    ``row_options`` are ``load_prompt_records``' keywords (preset, fields, template, ...);
    rewarders get ``presets.example_of(row, gold)`` as ``example``. ``num_epochs=None``
    repeats forever; each epoch is shuffled differently from ``seed``. Batches may span an
    epoch boundary; with ``drop_remainder`` the last partial batch of the whole stream is dropped.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    if shard_count <= 0 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got shard_index={shard_index}, shard_count={shard_count}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    paths = resolve_files(files)
    row_options["extra_fields"] = tuple(row_options.get("extra_fields") or ())
    records, stats = load_prompt_records(paths, tokenizer, **row_options)
    if not records:
        raise ValueError(f"no usable prompts in {paths}: {stats.as_dict()}")
    even_count = len(records) // shard_count * shard_count
    stats.rows_dropped_for_even_shards = len(records) - even_count
    shard = records[:even_count][shard_index::shard_count]
    stats.rows_in_shard = len(shard)
    if not shard:
        raise ValueError(f"{len(records)} usable prompts cannot fill {shard_count} shards")

    dataset = grain.MapDataset.source(shard)
    if shuffle:
        dataset = dataset.shuffle(seed)
    dataset = dataset.repeat(num_epochs).map(_copy_record)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder, batch_fn=list)
    settings = {
        **{key: value for key, value in row_options.items()},
        "seed": seed,
        "shuffle": shuffle,
        "num_epochs": num_epochs,
        "batch_size": batch_size,
        "drop_remainder": drop_remainder,
        "shard_index": shard_index,
        "shard_count": shard_count,
    }
    return PromptIterator(dataset, stats, _fingerprint(records, settings))
