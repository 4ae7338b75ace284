"""One-step off-policy RL (``rl.rollout_staleness=1``): which params each step samples with,
the order in which sampling and updates are dispatched, exact resume, and mode changes."""

from __future__ import annotations

import hashlib

import jax
import numpy as np
import pytest

from jaxrl.config import ConfigError, base_config, validate
from jaxrl.models import from_pretrained, model_params
from jaxrl.sampling.backend import StaticBackend, register_backend
from jaxrl.train import loop
from jaxrl.train.checkpoint import Checkpointer
from tests.test_train_loop import comparable, tiny_config, tiny_model_dir  # noqa: F401  (fixture)

EVENTS: list[tuple[str, str]] = []  # ("generate", params digest) | ("update", params digest)


def params_digest(params) -> str:
    """sha256 over every leaf's bytes in tree order (host copies)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()


@register_backend("test_recording")
class RecordingBackend(StaticBackend):
    """The static backend, recording the digest of the params of every ``generate`` call."""

    def generate(self, params, *args, **kwargs):
        EVENTS.append(("generate", params_digest(params)))
        return super().generate(params, *args, **kwargs)


def recording_optimise(monkeypatch):
    original = loop.optimise

    def optimise(updater, state, *args, **kwargs):
        EVENTS.append(("update", params_digest(state.params)))
        return original(updater, state, *args, **kwargs)

    monkeypatch.setattr(loop, "optimise", optimise)


@pytest.mark.parametrize("staleness", [0, 1])
def test_each_step_samples_with_the_params_the_staleness_says(tiny_model_dir, tmp_path, monkeypatch, staleness):
    """Step k samples with θ_{k-1} (staleness 0) or θ_{k-2} (staleness 1, θ_0 for steps 1 and 2),
    θ_j being the params saved after step j; under staleness 1 the next step's sampling is
    dispatched before this step's update."""
    recording_optimise(monkeypatch)
    EVENTS.clear()
    cfg = tiny_config(tiny_model_dir, str(tmp_path), "grpo", train__num_steps=4, checkpoint__every_steps=1,
                      checkpoint__keep=10, checkpoint__async_save=False, eval__every_steps=0,
                      sampling__backend="test_recording", rl__rollout_staleness=staleness)
    result = loop.train(cfg)
    thetas = [params_digest(model_params(from_pretrained(tiny_model_dir)))]
    checkpoints = Checkpointer(f"{result.run_dir}/checkpoints", keep=10, async_save=False)
    thetas += [params_digest(checkpoints.restore(step, result.state)[0].params) for step in (1, 2, 3)]
    checkpoints.close()
    sampled = [digest for kind, digest in EVENTS if kind == "generate"]
    updated = [digest for kind, digest in EVENTS if kind == "update"]
    assert updated == thetas  # step k updates θ_{k-1}
    if staleness == 0:
        assert sampled == thetas
        assert [kind for kind, _ in EVENTS] == ["generate", "update"] * 4
    else:
        assert sampled == [thetas[0], thetas[0], thetas[1], thetas[2]]
        assert [kind for kind, _ in EVENTS] == ["generate", "generate", "update", "generate", "update",
                                                 "generate", "update", "update"]
    assert [m["rollout/policy_lag"] for m in result.metrics] == ([0.0] * 4 if staleness == 0 else [0.0, 1, 1, 1])


def test_staleness_one_resumes_exactly_and_is_deterministic(tiny_model_dir, tmp_path):
    """A run stopped after step 2 and resumed equals an uninterrupted run, bit for bit (the
    pending rollout of step 3 is re-dispatched from the saved sampler params and data state)."""
    common = dict(train__num_steps=4, checkpoint__every_steps=2, rl__rollout_staleness=1)
    straight = loop.train(tiny_config(tiny_model_dir, str(tmp_path), "dapo_forking", name="straight", **common))
    first = loop.train(tiny_config(tiny_model_dir, str(tmp_path), "dapo_forking", name="resumed", **common),
                       max_steps=2)
    assert first.stop_reason == "max_steps"
    resumed = loop.train(tiny_config(tiny_model_dir, str(tmp_path), "dapo_forking", name="resumed", **common))
    assert len(resumed.metrics) == 2
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [comparable(m) for m in straight.metrics[2:]] == [comparable(m) for m in resumed.metrics]
    assert [comparable(m) for m in straight.metrics[:2]] == [comparable(m) for m in first.metrics]
    # Off-policy for real: from step 2 on the sampler's log-probs come from older params.
    assert straight.metrics[0]["logprob_gap/abs_mean"] < 1e-5 < straight.metrics[1]["logprob_gap/abs_mean"]


def test_a_staleness_zero_checkpoint_resumes_under_staleness_one(tiny_model_dir, tmp_path):
    """Turning overlap on for a resumed run (an allowed config change): the first resumed step
    samples with the restored params (no older params were saved), later ones lag by one."""
    root = str(tmp_path)
    loop.train(tiny_config(tiny_model_dir, root, "grpo", name="r", train__num_steps=4), max_steps=2)
    resumed = loop.train(tiny_config(tiny_model_dir, root, "grpo", name="r", train__num_steps=4,
                                     rl__rollout_staleness=1), allow_config_change=("rl.rollout_staleness",))
    assert [m["rollout/policy_lag"] for m in resumed.metrics] == [0.0, 1.0]
    assert int(resumed.state.step) == 4


def test_staleness_values_are_checked():
    cfg = base_config()
    cfg.rl.rollout_staleness = 2
    with pytest.raises(ConfigError, match=r"rl\.rollout_staleness must be one of \[0, 1\], got 2"):
        validate(cfg, check_files=False)
    cfg.rl.rollout_staleness = 1
    cfg.rl.old_logp_source = "sampler"
    with pytest.raises(ConfigError, match="rl.rollout_staleness=1 needs rl.old_logp_source='trainer'"):
        validate(cfg, check_files=False)
