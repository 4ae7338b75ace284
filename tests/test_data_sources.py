"""Prompt sources: jsonl/parquet -> grain batches, counters, resumable state, sharding."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxrl.data import sources, synthetic
from jaxrl.data import tokenizer as tok


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tok.load_tokenizer(tok.build_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def _rows(n, seed=0):
    return synthetic.generate_problems(n, seed=seed, difficulty="easy")


@pytest.fixture()
def jsonl_file(tmp_path):
    path = tmp_path / "train.jsonl"
    synthetic.write_jsonl(path, _rows(23))
    return str(path)


def _prompts(batches):
    return [record["prompt_text"] for batch in batches for record in batch]


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_jsonl_batches_with_field_mapping(tmp_path, tokenizer):
    rows = [{"question": r["prompt"], "gold": int(r["answer"]), "numbers": r["numbers"], "target": r["target"]} for r in _rows(8)]
    path = tmp_path / "mapped.jsonl"
    synthetic.write_jsonl(path, rows)
    iterator = sources.make_prompt_iterator(
        str(path), tokenizer, batch_size=4, prompt_field="question", answer_field="gold",
        extra_fields=["numbers", "target"], system_prompt="be brief", shuffle=False,
    )
    batches = list(iterator)
    assert [len(b) for b in batches] == [4, 4]
    first = batches[0][0]
    assert first["prompt_text"] == rows[0]["question"]
    assert first["answer"] == str(rows[0]["gold"])
    assert first["example"]["row"] == rows[0] and first["example"]["gold"] == str(rows[0]["gold"])
    assert first["prompt_tokens"] == tok.encode_prompt(tokenizer, rows[0]["question"], system_prompt="be brief")
    assert iterator.stats.rows_read == 8 and iterator.stats.rows_malformed == 0 and iterator.stats.rows_kept == 8


def test_parquet_matches_jsonl(tmp_path, tokenizer, jsonl_file):
    rows = _rows(23)
    parquet_path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet_path)
    from_parquet = list(sources.make_prompt_iterator(str(parquet_path), tokenizer, batch_size=5, seed=7))
    from_jsonl = list(sources.make_prompt_iterator(jsonl_file, tokenizer, batch_size=5, seed=7))
    assert len(from_parquet) == 4  # 23 rows, remainder dropped
    assert from_parquet == from_jsonl


def test_parquet_without_required_column_is_named(tmp_path, tokenizer):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "make 1 from 1 2"}]), path)
    with pytest.raises(KeyError, match=r"bad.parquet.*answer"):
        sources.make_prompt_iterator(str(path), tokenizer, batch_size=1)


def test_malformed_rows_are_counted_with_the_first_error(tmp_path, tokenizer):
    good = [json.dumps(r) for r in _rows(4)]
    lines = [
        good[0],
        "{not json",
        "[1, 2]",
        "",
        json.dumps({"answer": "3"}),
        json.dumps({"prompt": "make 3 from 1 2"}),
        json.dumps({"prompt": "make 3 from 1 2", "answer": True}),
        json.dumps({"prompt": "   ", "answer": "3"}),
        json.dumps({"prompt": "make 3 from 1 2", "answer": "3"}),  # lacks the extra field
        *good[1:],
    ]
    path = tmp_path / "messy.jsonl"
    path.write_text("\n".join(lines) + "\n")
    iterator = sources.make_prompt_iterator(str(path), tokenizer, batch_size=1, extra_fields=["numbers"], shuffle=False)
    stats = iterator.stats
    assert stats.rows_read == 11  # the blank line is not a row
    assert stats.rows_malformed == 7
    assert stats.rows_kept == 4
    assert stats.first_malformed_error.startswith(f"{path}:2: invalid JSON")
    assert len(list(iterator)) == 4


def test_all_rows_malformed_is_an_error(tmp_path, tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match="no usable prompts.*missing prompt field 'prompt'"):
        sources.make_prompt_iterator(str(path), tokenizer, batch_size=1)


def test_overlong_prompts_skip_or_truncate(tmp_path, tokenizer):
    short = {"prompt": "make 3 from 1 2", "answer": "3"}
    long = {"prompt": "make 3 from " + " ".join(["1"] * 40), "answer": "3"}
    path = tmp_path / "lengths.jsonl"
    synthetic.write_jsonl(path, [short, long, short, long])
    limit = 24
    skipped = sources.make_prompt_iterator(str(path), tokenizer, batch_size=1, max_prompt_tokens=limit, shuffle=False)
    assert skipped.stats.prompts_overlong_skipped == 2 and skipped.stats.prompts_truncated == 0
    assert _prompts(skipped) == [short["prompt"], short["prompt"]]

    truncated = sources.make_prompt_iterator(
        str(path), tokenizer, batch_size=1, max_prompt_tokens=limit, overlong="truncate", shuffle=False
    )
    assert truncated.stats.prompts_truncated == 2 and truncated.stats.prompts_overlong_skipped == 0
    records = [batch[0] for batch in truncated]
    cut = records[1]
    assert long["prompt"].startswith(cut["prompt_text"]) and cut["prompt_text"] != long["prompt"]
    assert len(cut["prompt_tokens"]) == limit  # the longest prefix that fits
    assert cut["prompt_tokens"][-1] == tok.ASSISTANT_ID  # the template's generation prompt survives
    assert cut["example"]["row"] == long  # rewarders still see the original row
    with pytest.raises(ValueError, match="overlong"):
        sources.make_prompt_iterator(str(path), tokenizer, batch_size=1, overlong="wrap")
    with pytest.raises(ValueError, match="no room"):
        sources.make_prompt_iterator(
            str(path), tokenizer, batch_size=1, max_prompt_tokens=4, overlong="truncate", system_prompt="be brief"
        )


@pytest.mark.parametrize("stop_after", [0, 3, 5, 9])
def test_resume_from_state_is_exact(jsonl_file, tokenizer, stop_after):
    kwargs = dict(batch_size=4, seed=11, num_epochs=3, drop_remainder=False)
    uninterrupted = list(sources.make_prompt_iterator(jsonl_file, tokenizer, **kwargs))
    assert len(uninterrupted) == 18  # ceil(69 / 4): batches run across epoch boundaries

    first = sources.make_prompt_iterator(jsonl_file, tokenizer, **kwargs)
    assert _take(first, stop_after) == uninterrupted[:stop_after]
    state = json.loads(json.dumps(first.get_state()))
    resumed = sources.make_prompt_iterator(jsonl_file, tokenizer, **kwargs)
    resumed.set_state(state)
    assert list(resumed) == uninterrupted[stop_after:]


def test_state_from_another_pipeline_is_refused(jsonl_file, tokenizer):
    state = sources.make_prompt_iterator(jsonl_file, tokenizer, batch_size=4, seed=1).get_state()
    other = sources.make_prompt_iterator(jsonl_file, tokenizer, batch_size=4, seed=2)
    with pytest.raises(ValueError, match="different pipeline"):
        other.set_state(state)
    with pytest.raises(KeyError, match="fingerprint"):
        other.set_state({"version": 1, "grain": {}})


def test_epochs_and_shuffle_are_seeded(jsonl_file, tokenizer):
    def order(**kwargs):
        return _prompts(sources.make_prompt_iterator(jsonl_file, tokenizer, batch_size=1, **kwargs))

    file_order = [r["prompt"] for r in _rows(23)]
    assert order(shuffle=False) == file_order
    two_epochs = order(seed=5, num_epochs=2)
    epoch_one, epoch_two = two_epochs[:23], two_epochs[23:]
    assert sorted(epoch_one) == sorted(epoch_two) == sorted(file_order)
    assert epoch_one != epoch_two != file_order  # each epoch is its own permutation
    assert two_epochs == order(seed=5, num_epochs=2)
    assert epoch_one != order(seed=6)


def test_infinite_epochs(jsonl_file, tokenizer):
    iterator = sources.make_prompt_iterator(jsonl_file, tokenizer, batch_size=10, num_epochs=None)
    batches = _take(iterator, 10)  # 100 prompts from 23 rows
    assert all(len(b) == 10 for b in batches)


def test_shards_are_disjoint_and_even(jsonl_file, tokenizer):
    shards = [
        sources.make_prompt_iterator(jsonl_file, tokenizer, batch_size=1, shard_index=i, shard_count=3, shuffle=False)
        for i in range(3)
    ]
    contents = [_prompts(s) for s in shards]
    assert [len(c) for c in contents] == [7, 7, 7]
    assert shards[0].stats.rows_dropped_for_even_shards == 2
    file_order = [r["prompt"] for r in _rows(23)]
    assert sorted(sum(contents, [])) == sorted(file_order[:21])
    with pytest.raises(ValueError, match="shard_index"):
        sources.make_prompt_iterator(jsonl_file, tokenizer, batch_size=1, shard_index=3, shard_count=3)


def test_batches_do_not_share_mutable_rows(jsonl_file, tokenizer):
    iterator = sources.make_prompt_iterator(jsonl_file, tokenizer, batch_size=23, num_epochs=2, shuffle=False)
    first = next(iterator)
    first[0]["example"]["prompt"] = "changed"
    first[0]["prompt_tokens"].append(0)
    first[0]["example"]["numbers"].append(99)
    second = next(iterator)
    assert second[0]["example"]["prompt"] != "changed"
    assert 99 not in second[0]["example"]["numbers"]
    assert second[0]["prompt_tokens"] == tok.encode_prompt(tokenizer, second[0]["prompt_text"])


def test_missing_files_are_named(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        sources.make_prompt_iterator(str(tmp_path / "nope.jsonl"), tokenizer, batch_size=1)
    with pytest.raises(FileNotFoundError, match=r"\*.parquet"):
        sources.make_prompt_iterator(str(tmp_path / "*.parquet"), tokenizer, batch_size=1)
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,answer\n")
    with pytest.raises(ValueError, match="data.csv"):
        sources.make_prompt_iterator(str(csv), tokenizer, batch_size=1)


def test_rows_reach_rewarders_intact(jsonl_file, tokenizer):
    from jaxrl.rewards.tasks import countdown_reward

    batch = next(sources.make_prompt_iterator(jsonl_file, tokenizer, batch_size=8, extra_fields=["numbers", "target"]))
    for record in batch:
        completion = synthetic.reference_solution(record["example"])
        assert countdown_reward(record["prompt_text"], completion, record["example"]) == 1.0
        assert record["answer"] == str(record["example"]["target"])
