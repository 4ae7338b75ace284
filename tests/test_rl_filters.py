"""DAPO filters: dynamic sampling keep mask, accumulator bookkeeping, overlong filter."""

import jax
import numpy as np
import pytest

from jaxrl.config import base_config
from jaxrl.rl.advantages import AdvantageConfig
from jaxrl.rl.filters import DynamicSamplingAccumulator, overlong_filter, reward_variance_keep_mask
from jaxrl.rl.losses import LossConfig, policy_loss
from jaxrl.train import rollouts
from jaxrl.types import FINISH_LENGTH, FINISH_STOP, Scored


def np_keep(rewards, group_ids):
    keep = np.zeros(len(rewards), bool)
    for g in np.unique(group_ids):
        rows = group_ids == g
        keep[rows] = np.ptp(rewards[rows].astype(np.float64)) > 0
    return keep


@pytest.mark.parametrize("num_prompts,group_size", [(1, 1), (4, 3), (16, 8)])
def test_keep_mask_matches_numpy(num_prompts, group_size):
    rng = np.random.default_rng(num_prompts)
    group_ids = np.repeat(np.arange(num_prompts), group_size)
    rng.shuffle(group_ids)
    rewards = rng.integers(0, 2, size=group_ids.shape).astype(np.float32)
    keep, kept, dropped = jax.jit(reward_variance_keep_mask)(rewards, group_ids)
    want = np_keep(rewards, group_ids)
    np.testing.assert_array_equal(np.asarray(keep), want)
    n_kept = len({g for g, k in zip(group_ids, want) if k})
    assert (int(kept), int(dropped)) == (n_kept, num_prompts - n_kept)


def test_keep_mask_hand_worked():
    # group 0: 1,1,1 (drop); group 2: 0,1,0 (keep); group 5: 0.5 (singleton, drop);
    # group 1: 0.2,0.2+1e-3 (keep with atol=0, drop with atol=1e-2).
    rewards = np.array([1, 0, 1, 1, 0.5, 0.2, 0.201, 0], np.float32)
    group_ids = np.array([0, 2, 2, 0, 5, 1, 1, 2])
    rewards[0] = 1.0
    keep, kept, dropped = reward_variance_keep_mask(rewards, group_ids, num_groups=8)
    np.testing.assert_array_equal(np.asarray(keep), [0, 1, 1, 0, 0, 1, 1, 1])
    assert (int(kept), int(dropped)) == (2, 2)
    keep, kept, dropped = reward_variance_keep_mask(rewards, group_ids, num_groups=8, atol=1e-2)
    np.testing.assert_array_equal(np.asarray(keep), [0, 1, 1, 0, 0, 0, 0, 1])
    assert (int(kept), int(dropped)) == (1, 3)


def test_accumulator_refills_to_target_across_rounds():
    acc = DynamicSamplingAccumulator(target_groups=3, max_rounds=4)
    # Round 1: prompts 10 (varied), 11 (all 0) → keeps 1 group.
    r1 = {"tokens": np.arange(4)[:, None] * np.ones((1, 2), int), "tag": np.array([1, 1, 1, 1])}
    assert acc.add(r1, np.array([1, 0, 0, 0.0]), np.array([10, 10, 11, 11])) == 1
    assert not acc.is_full
    # Round 2: prompts 7, 3, 9 all varied but only 2 fit; prompt 3 appears first.
    r2 = {"tokens": 100 + np.arange(6)[:, None] * np.ones((1, 2), int), "tag": np.full(6, 2)}
    assert acc.add(r2, np.array([0, 1, 1, 0, 1, 0.0]), np.array([3, 3, 7, 7, 9, 9])) == 2
    assert acc.is_full and acc.rounds == 2
    rows, rewards, group_ids = acc.result()
    np.testing.assert_array_equal(rows["tokens"][:, 0], [0, 1, 100, 101, 102, 103])
    np.testing.assert_array_equal(rows["tag"], [1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(rewards, [1, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(group_ids, [0, 0, 1, 1, 2, 2])
    assert acc.stats == {
        "dynamic_sampling/rounds": 2.0, "dynamic_sampling/groups_seen": 5.0,
        "dynamic_sampling/groups_dropped": 1.0, "dynamic_sampling/groups_kept": 3.0,
        "dynamic_sampling/groups_surplus": 1.0,
    }
    # Further rounds add nothing once full.
    assert acc.add(r1, np.array([1, 0, 1, 0.0]), np.array([0, 0, 1, 1])) == 0


def test_accumulator_gives_up_after_max_rounds():
    acc = DynamicSamplingAccumulator(target_groups=3, max_rounds=2)
    for _ in range(2):
        acc.add({"x": np.zeros(4)}, np.array([1, 1, 0, 1.0]), np.array([0, 0, 1, 1]))
    assert acc.out_of_rounds and not acc.is_full
    with pytest.raises(ValueError, match="2/3 groups"):
        acc.result()
    rows, rewards, gids = acc.result(allow_partial=True)
    assert rows["x"].shape == (4,) and list(gids) == [0, 0, 1, 1]
    empty = DynamicSamplingAccumulator(target_groups=1)
    empty.add({"x": np.zeros(2)}, np.ones(2), np.zeros(2, int))
    with pytest.raises(ValueError, match="no group"):
        empty.result(allow_partial=True)
    with pytest.raises(ValueError, match="target_groups"):
        DynamicSamplingAccumulator(target_groups=0)


def test_overlong_filter_hand_worked_and_in_loss():
    mask = np.array([[1, 1, 1], [1, 1, 1], [1, 0, 0]], np.float32)
    finish = np.array([FINISH_STOP, FINISH_LENGTH, FINISH_STOP])
    filtered = np.asarray(overlong_filter(mask, finish))
    np.testing.assert_array_equal(filtered, [[1, 1, 1], [0, 0, 0], [1, 0, 0]])
    # In the loss the truncated row no longer counts: token-mean over 4 tokens, seq-mean over 2.
    logp = np.zeros((3, 3), np.float32)
    adv = np.array([1.0, 5.0, 2.0], np.float32)
    loss, _ = policy_loss(logp, logp, adv, filtered, LossConfig())
    assert float(loss) == pytest.approx(-(3 * 1 + 2) / 4)
    loss, _ = policy_loss(logp, logp, adv, filtered, LossConfig(aggregation="seq-mean-token-mean"))
    assert float(loss) == pytest.approx(-(1 + 2) / 2)


def _scored(rewards, correct, group_ids):
    n = len(rewards)
    return Scored(rollout=None, rewards=np.asarray(rewards, np.float32), correct=np.asarray(correct, np.float32),
                  components={"correct": np.asarray(correct, np.float32)}, lengths=np.ones(n, np.int32),
                  finish_reason=np.zeros(n, np.int32), group_ids=np.asarray(group_ids, np.int32))


def test_dynamic_sampling_filters_on_accuracy_by_default():
    """DAPO filters on correctness: a group whose 4 answers are all correct but one of which
    lost 0.25 to the overlong penalty has no accuracy spread and is dropped; with
    rl.dynamic_sampling_metric='reward' it is kept (hand-worked)."""
    cfg = base_config()
    assert cfg.rl.dynamic_sampling_metric == "acc"
    # group 0: all correct, one overlong-penalised; group 1: 2 of 4 correct; group 2: all wrong.
    scored = _scored([1, 1, 1, 0.75, 1, 0, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0],
                     [0] * 4 + [1] * 4 + [2] * 4)
    kept = {}
    for metric in ("acc", "reward"):
        cfg.rl.dynamic_sampling_metric = metric
        acc = DynamicSamplingAccumulator(target_groups=3)
        acc.add({"row": np.arange(12)}, scored.rewards, scored.group_ids,
                filter_values=rollouts.filter_metric(cfg, scored))
        rows, rewards, _ = acc.result(allow_partial=True)
        kept[metric] = list(rows["row"])
        assert list(rewards) == list(scored.rewards[rows["row"]])  # advantages still see total rewards
    assert kept["acc"] == [4, 5, 6, 7]
    assert kept["reward"] == [0, 1, 2, 3, 4, 5, 6, 7]


def test_partial_batch_advantages_ignore_padding_rows():
    """A short dynamic-sampling batch (2 of 3 groups): advantages equal the float64 GRPO of the
    real rows alone; the batch-scale std does not count the padding rows' zero rewards."""
    cfg = base_config()
    cfg.rl.prompts_per_step, cfg.rl.samples_per_prompt = 3, 4
    collector = rollouts.Collector(backend=None, data=None, rewards=None, tokenizer=None, cfg=cfg,
                                   row_sharding=None)
    rewards = np.array([2.0, 3.0, 2.5, 2.0, 4.0, 3.0, 3.0, 3.5], np.float32)
    kept = _scored(rewards, np.zeros(8), [0] * 4 + [1] * 4)
    captured = {}

    def build(rollout, index, live, advantages, group_ids):
        captured.update(index=index, live=live, advantages=advantages, group_ids=group_ids)
        return None, None

    _, _, real = rollouts.make_train_batch(collector, AdvantageConfig(grpo_scale="batch", eps=0.0), build, kept)
    assert real == 8
    r = rewards.astype(np.float64)
    means = np.repeat([r[:4].mean(), r[4:].mean()], 4)
    want = (r - means) / np.std(r, ddof=1)
    np.testing.assert_allclose(captured["advantages"][:8], want, rtol=1e-5)
    np.testing.assert_array_equal(captured["advantages"][8:], 0.0)
    np.testing.assert_array_equal(captured["live"], [True] * 8 + [False] * 4)
    np.testing.assert_array_equal(captured["group_ids"][8:], 3)
