"""Extension points from outside the package: a toy policy loss and a toy rewarder, each one
function + one registration in a user module, trained for one step through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.test_train_loop import tiny_model_dir  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOY_MODULE = '''
import jax.numpy as jnp

from jaxrl.rewards.registry import register_rewarder
from jaxrl.rl.losses import LossInputs, TokenLoss, register_loss


@register_loss("toy_reinforce")
def toy_reinforce(inputs: LossInputs, cfg) -> TokenLoss:
    """Plain REINFORCE: -A * logp on every token (no ratio, no clip)."""
    none = jnp.zeros_like(inputs.valid)
    return TokenLoss(loss=-inputs.advantages * inputs.logp, ratio=jnp.exp(inputs.log_ratio),
                     clip_low=none, clip_high=none, clip_dual=none)


@register_rewarder("toy_digits")
def toy_digits(prompt: str, completion: str, example) -> float:
    """Fraction of digit characters: varies between samples of a random policy."""
    return sum(ch.isdigit() for ch in completion) / len(completion) if completion else 0.0
'''

TOY_CONFIG = '''
import toy_ext  # registers the toy loss and rewarder

from jaxrl.config import base_config


def get_config():
    cfg = base_config()
    cfg.model.path = {model!r}
    cfg.run.root = {root!r}
    cfg.run.name = "toy"
    cfg.data.synthetic_num_train = 32
    cfg.data.synthetic_num_heldout = 4
    cfg.data.max_prompt_tokens = 32
    cfg.sampling.max_new_tokens = 8
    cfg.rl.prompts_per_step = 2
    cfg.rl.samples_per_prompt = 4
    cfg.rl.mini_batch_prompts = 2
    cfg.rl.micro_batch_rows = 4
    cfg.rl.lr = 1e-3
    cfg.rl.loss.loss_type = "toy_reinforce"
    cfg.rewards.custom = ("toy_digits=1.0",)
    cfg.train.num_steps = 1
    cfg.eval.max_examples = 2
    cfg.eval.num_samples = 2
    cfg.logging.progress_bar = False
    cfg.logging.tensorboard = "off"
    cfg.checkpoint.save_final_model = False
    return cfg
'''


def test_toy_loss_and_rewarder_registered_outside_the_package_train_through_the_cli(tiny_model_dir, tmp_path):
    (tmp_path / "toy_ext.py").write_text(TOY_MODULE)
    root = tmp_path / "runs"
    config = tmp_path / "toy_config.py"
    config.write_text(TOY_CONFIG.format(model=tiny_model_dir, root=str(root)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "jaxrl.cli", "train", "--config", str(config)], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in open(root / "toy" / "metrics.jsonl")]
    assert [line["step"] for line in lines] == [1]
    metrics = lines[0]
    assert 0.0 <= metrics["reward/toy_digits/mean"] <= 1.0  # the registered rewarder scored the rows
    assert metrics["rows_trained"] == 8 and metrics["update_skipped"] == 0.0
    assert metrics["grad_norm"] > 0.0  # the toy loss moved the policy
    saved = json.load(open(root / "toy" / "config.json"))
    assert saved["rl"]["loss"]["loss_type"] == "toy_reinforce"
    assert saved["rewards"]["custom"] == ["toy_digits=1.0"]
