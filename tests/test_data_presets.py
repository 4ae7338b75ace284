"""Dataset presets on small files in the public datasets' real column layouts (written here):
rendered prompt, extracted gold, a right completion scoring 1 and a wrong one 0; the bad-row
table; duplicates; eval-set specs."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxrl.data import presets, sources
from jaxrl.data import tokenizer as tok
from jaxrl.rewards.math import math_reward
from jaxrl.rewards.tasks import countdown_reward


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tok.load_tokenizer(tok.build_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def _load(path, tokenizer, preset, **options):
    return sources.load_prompt_records([str(path)], tokenizer, preset=preset, **options)


def _rendered(tokenizer, record):
    """The hand-written rendered text whose tokens the record holds (the tiny character
    tokenizer maps $ and \\ to <unk>, so compare token ids, not decoded text)."""
    return _Tokens(tokenizer, record["prompt_tokens"])


class _Tokens:
    def __init__(self, tokenizer, ids):
        self.tokenizer, self.ids = tokenizer, ids

    def __eq__(self, text):
        return self.ids == self.tokenizer(text, add_special_tokens=False)["input_ids"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_dapo_math_parquet(tmp_path, tokenizer):
    rows = [{"data_source": "math_dapo",
             "prompt": [{"role": "user", "content": "solve 2+3. answer: $answer"}],
             "ability": "MATH", "reward_model": {"ground_truth": "5", "style": "rule"},
             "extra_info": {"index": "a1b2"}}]
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    (record,), stats = _load(path, tokenizer, "dapo_math", system_prompt="be brief")
    assert _rendered(tokenizer, record) == "<bos><|system|>be brief<|user|>solve 2+3. answer: $answer<|assistant|>"
    assert record["answer"] == "5" and record["example"]["gold"] == "5" and record["id"] == "a1b2"
    assert record["example"]["row"]["reward_model"]["style"] == "rule"
    assert math_reward(record["prompt_text"], "so \\boxed{5}", record["example"]) == 1.0
    assert math_reward(record["prompt_text"], "so \\boxed{6}", record["example"]) == 0.0
    assert stats.skipped == {}


def test_gsm8k_parquet(tmp_path, tokenizer):
    rows = [{"question": "natalia sold 48 clips, then half as many. how many in all?",
             "answer": "she sold 48/2 = <<48/2=24>>24 more.\n48+24 = <<48+24=72>>72\n#### 72"},
            {"question": "a big one?", "answer": "1000 + 200 = 1200\n#### 1,200"}]
    path = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records, _ = _load(path, tokenizer, "gsm8k", prompt_template="{prompt}\nput the answer in a box.")
    assert _rendered(tokenizer, records[0]) == (
        "<bos><|user|>natalia sold 48 clips, then half as many. how many in all?\nput the answer in a box.<|assistant|>")
    assert [r["answer"] for r in records] == ["72", "1200"]
    assert math_reward("", "48 + 24 = \\boxed{72}", records[0]["example"]) == 1.0
    assert math_reward("", "\\boxed{24}", records[0]["example"]) == 0.0
    assert math_reward("", "\\boxed{1200}", records[1]["example"]) == 1.0


def test_math_jsonl_and_math500(tmp_path, tokenizer):
    math_rows = [{"problem": "what is $\\frac{1}{2}+\\frac{1}{2}$?",
                  "solution": "we get $\\frac{1}{2}+\\frac{1}{2}=\\boxed{1}$, not \\boxed{2} first... so $\\boxed{\\frac{2}{2}}$.",
                  "level": "Level 1", "type": "Prealgebra"}]
    math500_rows = [{"problem": "compute $3 \\cdot 4$.", "solution": "it is $\\boxed{12}$.", "answer": "12",
                     "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"}]
    (math_record,), _ = _load(_write_jsonl(tmp_path / "math.jsonl", math_rows), tokenizer, "math")
    (m500,), _ = _load(_write_jsonl(tmp_path / "math500.jsonl", math500_rows), tokenizer, "math")
    assert math_record["answer"] == "\\frac{2}{2}"  # the LAST box of the solution
    assert m500["answer"] == "12" and m500["id"] == "test/prealgebra/1.json"
    assert _rendered(tokenizer, m500) == "<bos><|user|>compute $3 \\cdot 4$.<|assistant|>"
    assert math_reward("", "\\boxed{1}", math_record["example"]) == 1.0
    assert math_reward("", "\\boxed{2}", math_record["example"]) == 0.0
    assert math_reward("", "\\boxed{12}", m500["example"]) == 1.0
    assert math_reward("", "\\boxed{13}", m500["example"]) == 0.0


def test_aime_integers(tmp_path, tokenizer):
    rows = [{"id": 60, "year": 2024, "problem": "find the remainder.", "answer": 33},
            {"id": 61, "year": 2024, "problem": "another.", "answer": "033"}]
    records, _ = _load(_write_jsonl(tmp_path / "aime.jsonl", rows), tokenizer, "aime")
    assert [r["answer"] for r in records] == ["33", "33"] and [r["id"] for r in records] == [60, 61]
    assert _rendered(tokenizer, records[0]) == "<bos><|user|>find the remainder.<|assistant|>"
    assert math_reward("", "\\boxed{33}", records[1]["example"]) == 1.0
    assert math_reward("", "\\boxed{34}", records[1]["example"]) == 0.0


def test_countdown(tmp_path, tokenizer):
    rows = [{"prompt": "make 9 from 3 5 1", "numbers": [3, 5, 1], "target": 9}]
    (record,), _ = _load(_write_jsonl(tmp_path / "cd.jsonl", rows), tokenizer, "countdown")
    assert record["answer"] == "9"
    assert _rendered(tokenizer, record) == "<bos><|user|>make 9 from 3 5 1<|assistant|>"
    assert countdown_reward("", "3+5=8\n8+1=9\nanswer: 9", record["example"]) == 1.0
    assert countdown_reward("", "3+5=8\n8-1=7\nanswer: 7", record["example"]) == 0.0


def test_generic_dotted_paths(tmp_path, tokenizer):
    rows = [{"q": {"text": "what is 2+2?"}, "meta": {"sol": {"final": 4}, "uid": "x7"}}]
    (record,), _ = _load(_write_jsonl(tmp_path / "g.jsonl", rows), tokenizer, "generic",
                         prompt_field="q.text", answer_field="meta.sol.final", id_field="meta.uid")
    assert record["prompt_text"] == "what is 2+2?" and record["answer"] == "4" and record["id"] == "x7"
    assert math_reward("", "\\boxed{4}", record["example"]) == 1.0
    assert math_reward("", "\\boxed{5}", record["example"]) == 0.0


def test_answer_field_reaches_the_rewarder(tmp_path, tokenizer):
    """data.answer_field = "solution": the rewarder grades against it (main read example['answer'])."""
    rows = [{"prompt": "what is 2+2?", "solution": "4"}]
    (record,), _ = _load(_write_jsonl(tmp_path / "s.jsonl", rows), tokenizer, "generic", answer_field="solution")
    assert math_reward("", "\\boxed{4}", record["example"]) == 1.0


GOOD = {"problem": "what is 1+1?", "solution": "so \\boxed{2}."}


def test_every_bad_row_kind_is_skipped_and_counted(tmp_path, tokenizer):
    lines = [
        (json.dumps(GOOD).encode(), None),
        (b"{not json", "invalid_json"),
        (b'{"problem": "caf\xe9", "answer": "1"}', "undecodable_bytes"),
        (b"[1, 2]", "not_an_object"),
        (json.dumps({"solution": "\\boxed{1}"}).encode(), "missing_prompt"),
        (json.dumps({"problem": 7, "answer": "1"}).encode(), "prompt_wrong_type"),
        (json.dumps({"problem": "   ", "answer": "1"}).encode(), "empty_prompt"),
        (json.dumps({"problem": [{"role": "user"}], "answer": "1"}).encode(), "bad_messages"),
        (json.dumps({"problem": "q?"}).encode(), "missing_answer"),
        (json.dumps({"problem": "q?", "answer": True}).encode(), "answer_wrong_type"),
        (json.dumps({"problem": "q?", "answer": " "}).encode(), "empty_answer"),
        (json.dumps({"problem": "q?", "solution": "no box here"}).encode(), "unparseable_gold"),
        (json.dumps({"problem": "q " * 200, "answer": "1"}).encode(), "overlong_prompt"),
        (json.dumps(GOOD).encode(), "duplicate"),
        (json.dumps({"problem": "what is 2+2?", "answer": "4"}).encode(), None),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in lines) + b"\n")
    records, stats = _load(path, tokenizer, "math", max_prompt_tokens=64, drop_duplicates=True)
    expected = {}
    for _, reason in lines:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert stats.skipped == expected and len(expected) >= 10
    assert [r["answer"] for r in records] == ["2", "4"]  # nothing else lost
    assert stats.rows_read == len(lines) and stats.rows_kept == 2
    assert stats.first_error["undecodable_bytes"].startswith(f"{path}:3: not UTF-8")
    assert stats.duplicates == 1
    assert "invalid_json=1" in stats.summary()


def test_missing_extra_field_is_counted(tmp_path, tokenizer):
    rows = [{"prompt": "make 9 from 3 5 1", "target": 9}, {"prompt": "make 9 from 3 5 1", "numbers": [3, 5, 1], "target": 9}]
    records, stats = _load(_write_jsonl(tmp_path / "cd.jsonl", rows), tokenizer, "countdown")
    assert len(records) == 1 and stats.skipped == {"missing_field": 1}


def test_duplicates_counted_but_kept_by_default(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "dup.jsonl", [GOOD, GOOD, GOOD])
    records, stats = _load(path, tokenizer, "math")
    assert len(records) == 3 and stats.duplicates == 2 and stats.skipped == {}


def test_save_to_disk_directory(tmp_path, tokenizer):
    """The layout ``datasets.Dataset.save_to_disk`` writes: state.json + Arrow stream shards."""
    directory = tmp_path / "saved"
    directory.mkdir()
    table = pa.Table.from_pylist([{"question": "q?", "answer": "x\n#### 5"}])
    with pa.OSFile(str(directory / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (directory / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (record,), _ = _load(directory, tokenizer, "gsm8k")
    assert record["answer"] == "5"


def test_json_array_file(tmp_path, tokenizer):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([GOOD, {"problem": "q2?", "answer": "3"}]))
    records, _ = _load(path, tokenizer, "math")
    assert [r["answer"] for r in records] == ["2", "3"]


@pytest.mark.parametrize("spec, expected", [
    ("math500=math:data/math500.jsonl", ("math500", "math", "data/math500.jsonl")),
    ("aime:/abs/aime24.parquet", ("aime24", "aime", "/abs/aime24.parquet")),
    ("heldout=data/x.jsonl", ("heldout", None, "data/x.jsonl")),
    ("c:/odd/path.jsonl", ("path", None, "c:/odd/path.jsonl")),
])
def test_eval_set_specs(spec, expected):
    assert presets.parse_eval_set(spec) == expected


def test_unknown_preset_is_named():
    with pytest.raises(KeyError, match="unknown dataset preset 'gsm9k'.*gsm8k"):
        presets.get_preset("gsm9k")
