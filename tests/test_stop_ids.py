"""Stop ids: config.json + generation_config.json eos ids merged, plus sampling.stop_token_ids
and single-token sampling.stop_strings (longer ones: tests/test_data_stops.py); a rewarder failing on a whole first batch stops the run."""

import json

import pytest

from jaxrl import wiring
from jaxrl.config import ConfigError, base_config
from jaxrl.data import tokenizer as tok
from jaxrl.models.config import ModelConfig

HF = {"model_type": "qwen2", "vocab_size": 100, "hidden_size": 8, "intermediate_size": 16,
      "num_hidden_layers": 1, "num_attention_heads": 2, "eos_token_id": 2}


def test_generation_config_eos_ids_are_merged(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF))
    assert ModelConfig.from_hf(str(tmp_path)).stop_token_ids == (2,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 9]}))
    assert ModelConfig.from_hf(str(tmp_path)).stop_token_ids == (2, 7, 9)


def test_stop_token_ids_and_stop_strings(tmp_path):
    model_dir = tok.build_tokenizer(tmp_path)
    cfg = base_config()
    cfg.model.path = model_dir
    cfg.sampling.stop_token_ids = (5,)
    cfg.sampling.stop_strings = ("\n",)
    model_cfg = ModelConfig.from_hf(HF)
    newline = tok.tokenizer_vocab()["\n"]
    assert wiring.stop_token_ids(cfg, model_cfg) == (2, 5, newline)
    cfg.sampling.stop_strings = ("answer: 1",)  # 2 tokens: matched in text after sampling (data/stops.py)
    assert wiring.stop_token_ids(cfg, model_cfg) == (2, 5)
    cfg.sampling.stop_strings = ("",)
    with pytest.raises(ConfigError, match="sampling.stop_strings: each entry must be non-empty"):
        wiring.stop_token_ids(cfg, model_cfg)


def _needs_gold(prompt, completion, example):
    return float(example["solution_text"] == completion)


def test_rewarder_failing_on_every_row_of_first_batch_stops_the_run():
    executor = wiring._FirstBatchCheck({"correct": (_needs_gold, 1.0)}, num_workers=0, timeout_s=5.0,
                                       failure_reward=0.0)
    with pytest.raises(ConfigError, match="rewarder 'correct' failed on every row.*solution_text"):
        executor.score(["p", "q"], ["a", "b"], [{"gold": "1"}, {"gold": "2"}])
    executor.close()
