"""The synthetic-task tokenizer: HF format, round trip, chat template, prompt encoding."""

import json
import os

import pytest

from jaxrl.data import synthetic
from jaxrl.data import tokenizer as tok


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tok.build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return tok.load_tokenizer(tokenizer_dir)


def test_files_and_special_ids(tokenizer_dir, tokenizer):
    assert sorted(os.listdir(tokenizer_dir)) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.load(open(os.path.join(tokenizer_dir, "tokenizer_config.json")))
    assert config["chat_template"] == tok.CHAT_TEMPLATE
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        tok.PAD_ID, tok.BOS_ID, tok.EOS_ID, tok.UNK_ID) == (0, 1, 2, 3)
    for token, expected in [(tok.SYSTEM_TOKEN, 4), (tok.USER_TOKEN, 5), (tok.ASSISTANT_TOKEN, 6)]:
        assert tokenizer.convert_tokens_to_ids(token) == expected
    assert len(tokenizer) == len(tok.tokenizer_vocab()) < 64


def test_round_trip_of_task_text(tokenizer):
    rows = synthetic.generate_problems(50, seed=0, difficulty="hard")
    for row in rows:
        for text in (row["prompt"], synthetic.reference_solution(row)):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tok.UNK_ID not in ids
            assert tok.decode_completion(tokenizer, ids + [tok.EOS_ID, tok.PAD_ID]) == text
    ids = tokenizer("12-3=9\nanswer: 9", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("12-3=9\n") + 1 + len(" 9")  # "answer:" is a single token
    assert tokenizer.convert_ids_to_tokens(ids).count("answer:") == 1


def test_unknown_characters_map_to_unk(tokenizer):
    ids = tokenizer("Hi", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.UNK_ID and ids[1] != tok.UNK_ID


def test_chat_template_and_prompt_encoding(tokenizer):
    text = tok.build_prompt_text(tokenizer, "make 9 from 3 5 7", system_prompt="be brief")
    assert text == "<bos><|system|>be brief<|user|>make 9 from 3 5 7<|assistant|>"
    ids = tok.encode_prompt(tokenizer, "make 9 from 3 5 7", system_prompt="be brief")
    assert ids[:2] == [tok.BOS_ID, tok.SYSTEM_ID] and ids[-1] == tok.ASSISTANT_ID
    assert ids.count(tok.BOS_ID) == 1
    assert tokenizer.decode(ids) == text
    plain = tok.encode_prompt(tokenizer, "make 9 from 3 5 7", use_chat_template=False)
    assert plain[0] == tok.BOS_ID and plain.count(tok.BOS_ID) == 1
    assert tokenizer.decode(plain[1:]) == "make 9 from 3 5 7"
    conversation = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == "<bos><|user|>x<|assistant|>y<eos>"
    with pytest.raises(Exception, match="unknown chat role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_missing_tokenizer_is_named(tmp_path, tokenizer):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        tok.load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        tok.load_tokenizer(tmp_path)


def test_chat_template_required_when_asked(tokenizer_dir):
    no_template = tok.load_tokenizer(tokenizer_dir)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        tok.encode_prompt(no_template, "make 1 from 1 2")
