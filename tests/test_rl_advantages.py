"""Advantage estimators against float64 numpy references and hand-worked examples."""

import jax
import numpy as np
import pytest

from jaxrl.rl import advantages as adv


def _np_groups(group_ids):
    return {g: np.flatnonzero(group_ids == g) for g in np.unique(group_ids)}


def np_grpo(rewards, group_ids, scale, eps=1e-6):
    rewards = rewards.astype(np.float64)
    out = np.zeros_like(rewards)
    batch_std = np.std(rewards, ddof=1) if len(rewards) > 1 else 0.0
    for rows in _np_groups(group_ids).values():
        r = rewards[rows]
        centred = r - r.mean()
        std = np.std(r, ddof=1) if len(r) > 1 else 0.0
        if scale == "group":
            out[rows] = centred / (std + eps)
        elif scale == "batch":
            out[rows] = centred / (batch_std + eps)
        else:
            out[rows] = centred
    return out


def np_rloo(rewards, group_ids):
    rewards = rewards.astype(np.float64)
    out = np.zeros_like(rewards)
    for rows in _np_groups(group_ids).values():
        for i in rows:
            others = [j for j in rows if j != i]
            out[i] = rewards[i] - np.mean(rewards[others]) if others else 0.0
    return out


def _random_batch(rng, num_prompts, group_size, binary):
    group_ids = np.repeat(np.arange(num_prompts), group_size)
    rng.shuffle(group_ids)  # rows of a group need not be contiguous
    if binary:
        rewards = rng.integers(0, 2, size=group_ids.shape).astype(np.float32)
    else:
        rewards = rng.normal(size=group_ids.shape).astype(np.float32)
    return rewards, group_ids


@pytest.mark.parametrize("num_prompts,group_size", [(1, 4), (3, 5), (8, 16), (5, 1)])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("binary", [True, False])
def test_grpo_matches_numpy(num_prompts, group_size, scale, binary):
    rng = np.random.default_rng(num_prompts * 100 + group_size)
    rewards, group_ids = _random_batch(rng, num_prompts, group_size, binary)
    got = jax.jit(adv.grpo_advantages, static_argnames=("num_groups", "scale"))(
        rewards, group_ids, scale=scale
    )
    want = np_grpo(rewards, group_ids, scale)
    # group-std division amplifies float32 rounding of the mean by up to 1/eps for
    # near-constant groups; compare relatively as well.
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("num_prompts,group_size", [(1, 4), (3, 5), (8, 16), (5, 1)])
def test_rloo_and_dr_grpo_match_numpy(num_prompts, group_size):
    rng = np.random.default_rng(7 + num_prompts)
    rewards, group_ids = _random_batch(rng, num_prompts, group_size, binary=False)
    np.testing.assert_allclose(
        np.asarray(jax.jit(adv.rloo_advantages)(rewards, group_ids)),
        np_rloo(rewards, group_ids),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(adv.dr_grpo_advantages(rewards, group_ids)),
        np_grpo(rewards, group_ids, "none"),
        atol=1e-6,
    )


def test_grpo_hand_worked():
    # group 0: rewards 1,0,0,1 → mean 0.5, Bessel std sqrt(1/3) ≈ 0.57735
    # group 1: all 1 → zero advantage.  group 2: singleton → zero advantage.
    rewards = np.array([1, 0, 0, 1, 1, 1, 0.3], np.float32)
    group_ids = np.array([0, 0, 0, 0, 1, 1, 2])
    got = np.asarray(adv.grpo_advantages(rewards, group_ids, eps=0.0))
    a = 0.5 / np.sqrt(1 / 3)  # 0.8660254
    np.testing.assert_allclose(got, [a, -a, -a, a, 0, 0, 0], atol=1e-6)
    # Dr.GRPO: centred only.
    np.testing.assert_allclose(
        np.asarray(adv.dr_grpo_advantages(rewards, group_ids)),
        [0.5, -0.5, -0.5, 0.5, 0, 0, 0],
        atol=1e-7,
    )
    # RLOO, row 0 of group 0: 1 − mean(0, 0, 1) = 2/3.
    np.testing.assert_allclose(
        np.asarray(adv.rloo_advantages(rewards, group_ids)),
        [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0],
        atol=1e-6,
    )


def test_batch_scale_hand_worked():
    # rewards 0,2 | 4,4: group means 1 and 4; batch std (ddof=1) of [0,2,4,4] = sqrt(11/3).
    rewards = np.array([0.0, 2.0, 4.0, 4.0], np.float32)
    got = np.asarray(adv.grpo_advantages(rewards, np.array([0, 0, 1, 1]), scale="batch", eps=0))
    s = np.sqrt(11 / 3)
    np.testing.assert_allclose(got, [-1 / s, 1 / s, 0, 0], atol=1e-6)


def test_negative_sample_family_hand_worked():
    rewards = np.array([1.0, 0.0, 1.0, 0.0, 0.0], np.float32)
    np.testing.assert_array_equal(np.asarray(adv.nsr_advantages(rewards)), [0, -1, 0, -1, -1])
    np.testing.assert_array_equal(np.asarray(adv.psr_advantages(rewards)), [1, 0, 1, 0, 0])
    np.testing.assert_allclose(
        np.asarray(adv.w_reinforce_advantages(rewards, positive_weight=0.1)),
        [0.1, -1, 0.1, -1, -1],
        atol=1e-7,
    )


def test_dispatch_and_errors():
    rewards = np.array([1.0, 0.0, 1.0, 1.0], np.float32)
    gids = np.array([0, 0, 1, 1])
    for name in adv.estimator_names():
        out = adv.compute_advantages(name, rewards, gids)
        assert out.shape == (4,) and out.dtype == np.float32
    np.testing.assert_allclose(
        np.asarray(adv.compute_advantages("w_reinforce", rewards, gids, positive_weight=0.5)),
        [0.5, -1, 0.5, 0.5],
    )
    with pytest.raises(ValueError, match="estimator"):
        adv.compute_advantages("ppo", rewards, gids)
    with pytest.raises(ValueError, match="scale"):
        adv.grpo_advantages(rewards, gids, scale="std")


@pytest.mark.parametrize("value", [0.7, 1.1, 0.1])
def test_equal_non_binary_rewards_give_exactly_zero(value):
    """Sixteen equal rewards whose float32 mean is not the value itself: every group-baseline
    estimator gives exactly 0 (hand-worked: R − mean = 0 when max = min)."""
    rewards = np.array([value] * 16 + [0.0, 1.0, 0.5, 0.5], np.float32)
    group_ids = np.array([0] * 16 + [1] * 4)
    equal = slice(0, 16)
    for eps in (1e-6, 0.0):
        for scale in ("group", "batch", "none"):
            got = np.asarray(adv.grpo_advantages(rewards, group_ids, scale=scale, eps=eps))
            np.testing.assert_array_equal(got[equal], 0.0, err_msg=f"{scale} eps={eps}")
            assert np.abs(got[16:]).max() > 0.1  # the varied group still gets a signal
    np.testing.assert_array_equal(np.asarray(adv.rloo_advantages(rewards, group_ids))[equal], 0.0)
    np.testing.assert_array_equal(np.asarray(adv.dr_grpo_advantages(rewards, group_ids))[equal], 0.0)
    for name in ("grpo", "dr_grpo", "rloo"):
        np.testing.assert_array_equal(np.asarray(adv.compute_advantages(name, rewards, group_ids))[equal], 0.0)
