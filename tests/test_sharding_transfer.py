"""Per-process blocks and row transfers (sharding/transfer.py), and the completion keys the
multi-process health check decides on (train/rollouts.py), in one process on CPU."""

import jax
import numpy as np
import pytest

from jaxrl.sharding.transfer import block_bounds, gather_blocks, process_block, process_rows
from jaxrl.train import health
from jaxrl.train.rollouts import _completion_digest, _key_text


def test_block_bounds_hand_worked():
    assert [block_bounds(4, i, 2) for i in range(2)] == [(0, 2), (2, 4)]
    assert [block_bounds(5, i, 2) for i in range(2)] == [(0, 2), (2, 5)]
    assert [block_bounds(2, i, 4) for i in range(4)] == [(0, 0), (0, 1), (1, 1), (1, 2)]  # some empty
    assert process_block(7) == (0, 7)  # one process: everything
    with pytest.raises(ValueError, match="index"):
        block_bounds(4, 2, 2)


def test_process_rows_and_gather_blocks_in_one_process():
    x = np.arange(24, dtype=np.int32).reshape(6, 4)
    np.testing.assert_array_equal(process_rows(jax.numpy.asarray(x), 2, 5), x[2:5])
    np.testing.assert_array_equal(gather_blocks(x, 6), x)


@pytest.mark.parametrize("texts", [["12", "3+4", "", "x"], ["", " ", "\n"], ["aaaa"] * 8, ["a", "b"], ["a", " a"],
                                   ["é", "é"], [""]])
def test_completion_keys_give_the_health_check_the_answer_the_texts_give(texts):
    lively = {"reward/mean": 0.5, "rollout/entropy_mean": 1.0}
    keys = [_key_text(np.array(_completion_digest(t), np.uint32)) for t in texts]
    assert health.collapse_reasons(keys, lively) == health.collapse_reasons(texts, lively)
    assert (keys[0] == "") == (not texts[0].strip())
