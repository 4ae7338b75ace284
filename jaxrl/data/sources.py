"""Prompt sources: jsonl / parquet files -> tokenised prompt batches through grain.

``make_prompt_iterator`` reads every file once, validates and tokenises each row (chat
template and system prompt applied), then hands the kept rows to a grain ``MapDataset``
for the seeded per-epoch shuffle, the epochs and the batching. Each batch is a list of
dicts::

    {"prompt_text": str,          # the prompt as rewarders see it (after any truncation)
     "prompt_tokens": list[int],  # what the sampler is conditioned on (template applied)
     "answer": str | None,        # the gold answer, from ``answer_field``
     "example": dict}             # the whole row, for rewarders (extra columns included)

Bad input is never dropped silently: malformed rows (bad JSON, not an object, missing or
mistyped fields) are skipped and counted with the first error (file, line, reason) kept in
``PromptIterator.stats``; over-long prompts are skipped or truncated, by config, and
counted. A missing file, an unknown extension or a parquet file without a required column
is a start-up error naming it.

``PromptIterator.get_state()`` returns a small JSON-serialisable dict; a new iterator
built with the same arguments and ``set_state(state)`` yields exactly the batches the
original would have yielded next. Multi-host: each process passes its ``shard_index`` of
``shard_count`` and iterates its own disjoint, equally sized slice of the rows.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import hashlib
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import grain
import pyarrow.parquet as pq

from jaxrl.data.tokenizer import build_prompt_text

OVERLONG_MODES = ("skip", "truncate")
_ENCODE_CHUNK = 4096
_STATE_VERSION = 1


@dataclasses.dataclass
class SourceStats:
    """Counters from loading the files (all processes see the same numbers).

    rows_read: rows found in the files (blank jsonl lines are not rows).
    rows_malformed: rows skipped because they could not be used; ``first_malformed_error``
        says where and why for the first of them.
    prompts_overlong_skipped / prompts_truncated: rows over ``max_prompt_tokens``.
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
    rows_kept: int = 0
    rows_dropped_for_even_shards: int = 0
    rows_in_shard: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The counters as a plain dict (for logging)."""
        return dataclasses.asdict(self)


class MalformedRow(ValueError):
    """A row that cannot be used; the message names the field and the reason."""


def resolve_files(files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expands glob patterns and checks every file exists; the error names the missing path."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    resolved: list[str] = []
    for entry in files:
        entry = os.fspath(entry)
        if any(char in entry for char in "*?["):
            matches = sorted(glob.glob(entry))
            if not matches:
                raise FileNotFoundError(f"prompt file pattern matched nothing: {entry}")
            resolved.extend(matches)
        elif not os.path.isfile(entry):
            raise FileNotFoundError(f"prompt file not found: {entry}")
        else:
            resolved.append(entry)
    if not resolved:
        raise ValueError("no prompt files given")
    for path in resolved:
        if _file_format(path) is None:
            raise ValueError(f"unsupported prompt file extension (expected .jsonl, .json or .parquet): {path}")
    return resolved


def _file_format(path: str) -> str | None:
    lowered = path.lower()
    if lowered.endswith((".jsonl", ".json")):
        return "jsonl"
    if lowered.endswith(".parquet"):
        return "parquet"
    return None


def _read_rows(path: str, required_columns: Sequence[str]) -> Iterator[tuple[int, Any, str | None]]:
    """Yields ``(line_number, row, parse_error)`` for every row of one file."""
    if _file_format(path) == "parquet":
        table = pq.read_table(path)
        missing = [column for column in required_columns if column not in table.column_names]
        if missing:
            raise KeyError(f"{path}: parquet file has no column(s) {missing}; columns are {table.column_names}")
        for index, row in enumerate(table.to_pylist()):
            yield index + 1, row, None
        return
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line), None
            except json.JSONDecodeError as error:
                yield line_number, None, f"invalid JSON ({error.msg} at column {error.colno})"


def _validate_row(
    row: Any, prompt_field: str, answer_field: str | None, extra_fields: Sequence[str]
) -> tuple[str, str | None]:
    """Returns ``(prompt, answer)`` or raises ``MalformedRow`` naming the field."""
    if not isinstance(row, dict):
        raise MalformedRow(f"row is a {type(row).__name__}, not an object")
    if prompt_field not in row:
        raise MalformedRow(f"missing prompt field {prompt_field!r}")
    prompt = row[prompt_field]
    if not isinstance(prompt, str) or not prompt.strip():
        raise MalformedRow(f"prompt field {prompt_field!r} must be a non-empty string, got {prompt!r:.80}")
    answer = None
    if answer_field is not None:
        if answer_field not in row:
            raise MalformedRow(f"missing answer field {answer_field!r}")
        answer = row[answer_field]
        # bool is an int subclass; a True/False "answer" is almost surely a data bug.
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise MalformedRow(f"answer field {answer_field!r} must be a string or number, got {answer!r:.80}")
        answer = str(answer)
    for field in extra_fields:
        if field not in row:
            raise MalformedRow(f"missing extra field {field!r}")
    return prompt, answer


def _encode_texts(tokenizer, texts: Sequence[str], use_chat_template: bool) -> list[list[int]]:
    """Batch-encodes rendered prompt texts (the Rust tokenizer is much faster on batches)."""
    # A rendered chat template already holds its special tokens (e.g. bos).
    encoded = tokenizer(list(texts), add_special_tokens=not use_chat_template)["input_ids"]
    return [list(ids) for ids in encoded]


def _encode(tokenizer, prompt: str, system_prompt, use_chat_template) -> list[int]:
    text = build_prompt_text(tokenizer, prompt, system_prompt=system_prompt, use_chat_template=use_chat_template)
    return _encode_texts(tokenizer, [text], use_chat_template)[0]


def _truncate_prompt(tokenizer, prompt: str, *, system_prompt, use_chat_template, max_prompt_tokens) -> tuple[str, list[int]]:
    """Cuts the end of ``prompt`` until the encoded prompt fits in ``max_prompt_tokens``.

    The text is cut (not the token list) so the chat template's framing, e.g. the
    generation prompt, survives. Binary search for the longest prefix that fits.
    """
    low, high = 0, len(prompt)
    while low < high:
        middle = (low + high + 1) // 2
        if len(_encode(tokenizer, prompt[:middle], system_prompt, use_chat_template)) <= max_prompt_tokens:
            low = middle
        else:
            high = middle - 1
    if low == 0:
        raise ValueError(
            f"max_prompt_tokens={max_prompt_tokens} leaves no room for any prompt text after the "
            "chat template and system prompt"
        )
    cut = prompt[:low]
    return cut, _encode(tokenizer, cut, system_prompt, use_chat_template)


def load_prompt_records(
    files: Sequence[str],
    tokenizer,
    *,
    prompt_field: str = "prompt",
    answer_field: str | None = "answer",
    extra_fields: Sequence[str] = (),
    system_prompt: str | None = None,
    use_chat_template: bool = True,
    max_prompt_tokens: int | None = None,
    overlong: str = "skip",
) -> tuple[list[dict], SourceStats]:
    """Reads, validates and tokenises every row of ``files`` (in order); returns records + counters."""
    if overlong not in OVERLONG_MODES:
        raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {overlong!r}")
    if max_prompt_tokens is not None and max_prompt_tokens <= 0:
        raise ValueError(f"max_prompt_tokens must be positive or None, got {max_prompt_tokens}")
    required = [prompt_field] + ([answer_field] if answer_field is not None else []) + list(extra_fields)
    stats = SourceStats()
    valid: list[tuple[dict, str, str | None]] = []
    for path in files:
        for line_number, row, parse_error in _read_rows(path, required):
            stats.rows_read += 1
            try:
                if parse_error is not None:
                    raise MalformedRow(parse_error)
                prompt, answer = _validate_row(row, prompt_field, answer_field, extra_fields)
            except MalformedRow as error:
                stats.rows_malformed += 1
                if stats.first_malformed_error is None:
                    stats.first_malformed_error = f"{path}:{line_number}: {error}"
                continue
            valid.append((row, prompt, answer))

    records: list[dict] = []
    for chunk_start in range(0, len(valid), _ENCODE_CHUNK):
        chunk = valid[chunk_start : chunk_start + _ENCODE_CHUNK]
        texts = [
            build_prompt_text(tokenizer, prompt, system_prompt=system_prompt, use_chat_template=use_chat_template)
            for _, prompt, _ in chunk
        ]
        for (row, prompt, answer), tokens in zip(chunk, _encode_texts(tokenizer, texts, use_chat_template)):
            prompt_text = prompt
            if max_prompt_tokens is not None and len(tokens) > max_prompt_tokens:
                if overlong == "skip":
                    stats.prompts_overlong_skipped += 1
                    continue
                prompt_text, tokens = _truncate_prompt(
                    tokenizer,
                    prompt,
                    system_prompt=system_prompt,
                    use_chat_template=use_chat_template,
                    max_prompt_tokens=max_prompt_tokens,
                )
                stats.prompts_truncated += 1
            records.append({"prompt_text": prompt_text, "prompt_tokens": tokens, "answer": answer, "example": row})
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
    prompt_field: str = "prompt",
    answer_field: str | None = "answer",
    extra_fields: Sequence[str] | None = None,
    system_prompt: str | None = None,
    use_chat_template: bool = True,
    max_prompt_tokens: int | None = None,
    overlong: str = "skip",
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    drop_remainder: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
) -> PromptIterator:
    """Builds the prompt pipeline over jsonl/parquet ``files`` (paths or glob patterns).

    ``extra_fields`` are columns every row must have (rows lacking one are malformed);
    rewarders always get the whole row as ``example``. ``num_epochs=None`` repeats forever;
    each epoch is shuffled differently from ``seed``. Batches may span an epoch boundary;
    with ``drop_remainder`` the last partial batch of the whole stream is dropped.
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
    extra_fields = tuple(extra_fields or ())
    records, stats = load_prompt_records(
        paths,
        tokenizer,
        prompt_field=prompt_field,
        answer_field=answer_field,
        extra_fields=extra_fields,
        system_prompt=system_prompt,
        use_chat_template=use_chat_template,
        max_prompt_tokens=max_prompt_tokens,
        overlong=overlong,
    )
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
        "prompt_field": prompt_field,
        "answer_field": answer_field,
        "extra_fields": extra_fields,
        "system_prompt": system_prompt,
        "use_chat_template": use_chat_template,
        "max_prompt_tokens": max_prompt_tokens,
        "overlong": overlong,
        "seed": seed,
        "shuffle": shuffle,
        "num_epochs": num_epochs,
        "batch_size": batch_size,
        "drop_remainder": drop_remainder,
        "shard_index": shard_index,
        "shard_count": shard_count,
    }
    return PromptIterator(dataset, stats, _fingerprint(records, settings))
