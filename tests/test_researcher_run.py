"""The researcher's own run, end to end: a tiny random Qwen2 saved with transformers, a 64-row
GSM8K-layout parquet file and a MATH-layout jsonl held-out set, ``jaxrl train`` for 3 steps from
a directory outside the repository, final_model/ loadable by transformers, a report per set."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxrl.data import tokenizer as tok
from tests.hf_models import make_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPERIMENT = '''
from jaxrl.config import base_config

def get_config():
    cfg = base_config()
    cfg.run.root = "runs"
    cfg.run.name = "mine"
    cfg.model.path = {model!r}
    cfg.data.source = "files"
    cfg.data.preset = "gsm8k"
    cfg.data.train_files = ({train!r},)
    cfg.data.max_prompt_tokens = 48
    cfg.sampling.max_new_tokens = 8
    cfg.rewards.task = "math"
    cfg.rl.prompts_per_step = 2
    cfg.rl.samples_per_prompt = 4
    cfg.rl.mini_batch_prompts = 1
    cfg.rl.micro_batch_rows = 4
    cfg.rl.logprob_chunk_size = 8
    cfg.train.num_steps = 3
    cfg.checkpoint.every_steps = 3
    cfg.logging.progress_bar = False
    cfg.logging.tensorboard = "off"
    cfg.eval.sets = ("gsm=gsm8k:{train}", "mathset=math:{heldout}")
    cfg.eval.max_examples = 4
    cfg.eval.num_samples = 2
    cfg.eval.batch_prompts = 4
    return cfg
'''


@pytest.mark.slow
def test_train_on_my_model_and_my_files_from_anywhere(tmp_path):
    model_dir = str(tmp_path / "my_qwen2")
    make_hf_model("qwen2", model_dir)
    tok.build_tokenizer(model_dir)
    rows = [{"question": f"what is {a} plus {a + 1}?", "answer": f"{a}+{a + 1} = <<{a}+{a + 1}={2 * a + 1}>>{2 * a + 1}\n#### {2 * a + 1}"}
            for a in range(64)]
    train = str(tmp_path / "gsm8k_train.parquet")
    pq.write_table(pa.Table.from_pylist(rows), train)
    heldout = str(tmp_path / "math_test.jsonl")
    with open(heldout, "w") as handle:
        for a in range(4):
            handle.write(json.dumps({"problem": f"compute {a} times 2.", "solution": f"it is \\\\boxed{{{2 * a}}}.",
                                     "level": "Level 1", "type": "Prealgebra"}) + "\n")
    (tmp_path / "experiment.py").write_text(EXPERIMENT.format(model=model_dir, train=train, heldout=heldout))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "jaxrl.cli", "train", "--config", str(tmp_path / "experiment.py")],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data: 64 rows kept of 64; skipped: none" in done.stdout
    assert "gsm (4 problems)" in done.stdout and "mathset (4 problems)" in done.stdout, done.stdout
    from transformers import AutoModelForCausalLM

    final = elsewhere / "runs" / "mine" / "final_model"
    model = AutoModelForCausalLM.from_pretrained(str(final))
    assert model.config.model_type == "qwen2"
