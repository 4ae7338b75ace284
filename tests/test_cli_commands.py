"""`jaxrl export | eval | sample | plot` on a real (1-step) run of a tiny model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxrl import cli
from jaxrl.models import forward, from_pretrained
from jaxrl.train import loop
from tests.hf_models import hf_logits, left_padded_batch
from tests.test_cli_errors import write_experiment
from tests.test_train_loop import tiny_config, tiny_model_dir  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    cfg = tiny_config(tiny_model_dir, root, "dapo_forking", name="cli", train__num_steps=1)
    result = loop.train(cfg)
    return result


def test_export_writes_the_trained_policy_as_hf(trained_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "exported")
    assert cli.main(["export", trained_run.run_dir, "--out", out]) == 0
    model, cfg = from_pretrained(out)
    trained = jax_params_as_numpy(trained_run.state.params)
    exported = jax_params_as_numpy(model_params_of(model))
    for path, value in trained.items():
        np.testing.assert_array_equal(exported[path], value, err_msg=path)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens, mask, positions = left_padded_batch(cfg.vocab_size, [5, 9], 9, seed=0)
    ours = np.asarray(forward(model, tokens, attention_mask=mask))
    assert np.abs(ours - hf_logits(hf, tokens, mask, positions))[mask.astype(bool)].max() < 1e-4
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_eval_writes_a_json_report(trained_run, tiny_model_dir, tmp_path):
    config = write_experiment(tmp_path / "exp.py", tiny_model_dir, str(tmp_path / "runs"),
                              "    cfg.data.max_prompt_tokens = 32\n    cfg.sampling.max_new_tokens = 8\n"
                              "    cfg.eval.max_examples = 4\n    cfg.eval.num_samples = 2\n")
    out = str(tmp_path / "report.json")
    assert cli.main(["eval", "--config", config, "--model", tiny_model_dir, "--out", out]) == 0
    sets = json.load(open(out))["sets"]
    assert list(sets) == ["heldout"]  # the synthetic task's held-out split
    summary = sets["heldout"]["summary"]
    assert summary["num_problems"] == 4 and summary["k"] == 2
    for key in ("greedy_accuracy", "avg_at_k", "pass_at_1", "pass_at_2"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["pass_at_1"] == pytest.approx(summary["avg_at_k"])  # unbiased pass@1 = avg@k


def test_sample_and_plot(trained_run, tiny_model_dir, capsys):
    assert cli.main(["sample", "--model", tiny_model_dir, "--prompt", "make 9 from 3 5 7", "--n", "2",
                     "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("--- sample") == 2
    assert cli.main(["plot", trained_run.run_dir]) == 0
    pngs = [line for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]
    assert pngs and all(os.path.getsize(p) > 1000 for p in pngs)


def model_params_of(model):
    from jaxrl.models import model_params

    return model_params(model)


def jax_params_as_numpy(params) -> dict[str, np.ndarray]:
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {jax.tree_util.keystr(path): np.asarray(value) for path, value in flat}
