"""Stop strings longer than one token (jaxrl/data/stops.py): the cut length on hand-worked
completions of the character tokenizer, and the hooks in training (``rollouts.score``: the
device lengths, the rewards' text and the loss mask agree) and in eval."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl import wiring
from jaxrl.config import base_config
from jaxrl.data import tokenizer as tok
from jaxrl.data.batching import assemble_train_batch
from jaxrl.data.stops import cut_at_stop_strings, stop_cut_length
from jaxrl.eval import evaluate
from jaxrl.rewards.base import RewardExecutor
from jaxrl.train import rollouts
from jaxrl.types import FINISH_LENGTH, FINISH_STOP, Rollout

VOCAB = tok.tokenizer_vocab()
PAD, EOS = tok.PAD_ID, tok.EOS_ID


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tok.load_tokenizer(tok.build_tokenizer(tmp_path_factory.mktemp("tok")))


def ids(*pieces: str) -> list[int]:
    """Token ids of the character tokenizer written out by hand: one id per piece."""
    return [VOCAB[p] for p in pieces]


# "3 * 3 = 9 then": one token per character; "= 9" (3 tokens) is complete after token 9.
THREE_TIMES = ids(*"3 * 3 = 9 then")
# "so answer: 42": s, o, ' ', "answer:" (one token), ' ', 4, 2.
SO_ANSWER = ids("s", "o", " ", "answer:", " ", "4", "2")


@pytest.mark.parametrize("completion, stops, expected", [
    (THREE_TIMES, ("= 9",), 9),
    (THREE_TIMES, ("zz", "= 9"), 9),  # the one that completes first wins, whatever its list position
    (THREE_TIMES, ("then", "* 3"), 5),  # "3 * 3" ends at token 5, before "then" (token 14)
    (THREE_TIMES, ("then",), 14),  # the last token completes it: the whole completion is kept
    (THREE_TIMES, ("= 8",), None),
    (SO_ANSWER, ("wer: 4",), 6),  # starts inside the "answer:" token, completed by "4"
    (SO_ANSWER, ("ans",), 4),  # ends inside "answer:": that whole token is kept
    (ids(*"ab") + [EOS], ("b",), 2),  # eos is not text: cut before it
    (ids(*"ab") + [EOS], ("b<eos>",), None),  # special tokens are dropped before matching
    ([], ("a",), None),
    (THREE_TIMES, (), None),
])
def test_stop_cut_length_hand_worked(tokenizer, completion, stops, expected):
    assert stop_cut_length(completion, tokenizer, stops) == expected


def test_cut_rows_only_within_the_sampled_length(tokenizer):
    width = len(THREE_TIMES)
    tokens = np.full((3, width), PAD, np.int32)
    tokens[0] = THREE_TIMES
    tokens[1] = THREE_TIMES  # sampled length 6 ("3 * 3 "): "= 9" lies in the discarded tail
    tokens[2, :3] = ids("9", "=", "9")
    lengths = np.array([width, 6, 3], np.int32)
    finish = np.array([FINISH_LENGTH, FINISH_STOP, FINISH_LENGTH], np.int32)
    new_lengths, new_finish = cut_at_stop_strings(tokens, lengths, finish, tokenizer, ("= 9",))
    np.testing.assert_array_equal(new_lengths, [9, 6, 3])
    np.testing.assert_array_equal(new_finish, [FINISH_STOP, FINISH_STOP, FINISH_LENGTH])
    np.testing.assert_array_equal(lengths, [width, 6, 3])  # inputs untouched


def _rollout(rows: list[list[int]], finish: list[int]) -> Rollout:
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), PAD, np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    batch = len(rows)
    return Rollout(prompt_tokens=jnp.full((batch, 2), VOCAB["a"], jnp.int32),
                   prompt_lengths=jnp.full((batch,), 2, jnp.int32), tokens=jnp.asarray(tokens),
                   logprobs=jnp.full(tokens.shape, -0.5, jnp.float32), entropies=jnp.ones(tokens.shape, jnp.float32),
                   lengths=jnp.asarray([len(r) for r in rows], jnp.int32), finish_reason=jnp.asarray(finish, jnp.int32),
                   group_ids=jnp.arange(batch, dtype=jnp.int32))


def says_nine(prompt, completion, example):
    """1 when the completion text ends with '9' (the rewarder sees the cut text)."""
    return float(completion.endswith("9"))


def test_score_cuts_lengths_rewards_and_loss_mask_together(tokenizer):
    cfg = base_config()
    cfg.sampling.stop_strings = ("= 9",)
    rollout = _rollout([THREE_TIMES, ids(*"3 + 6 = 9") + [EOS], ids(*"1 2 3")],
                       [FINISH_LENGTH, FINISH_STOP, FINISH_LENGTH])
    records = [{"prompt_text": f"p{i}", "example": {"gold": "9"}} for i in range(3)]
    executor = RewardExecutor({wiring.CORRECT_COMPONENT: (says_nine, 1.0)}, num_workers=0, timeout_s=5.0)
    collector = rollouts.Collector(backend=None, data=None, rewards=executor, tokenizer=tokenizer, cfg=cfg,
                                   row_sharding=None)
    try:
        scored, samples, _, _ = rollouts.score(collector, records, rollout)
    finally:
        executor.close()
    # Row 0 "3 * 3 = 9 then" -> 9 tokens; row 1 "3 + 6 = 9" completes at its 9th token (its eos
    # is dropped with the cut); row 2 has no stop string and keeps its length and finish reason.
    np.testing.assert_array_equal(scored.lengths, [9, 9, 5])
    np.testing.assert_array_equal(scored.finish_reason, [FINISH_STOP, FINISH_STOP, FINISH_LENGTH])
    np.testing.assert_array_equal(np.asarray(scored.rollout.lengths), [9, 9, 5])
    np.testing.assert_array_equal(np.asarray(scored.rollout.finish_reason), scored.finish_reason)
    assert [s["completion"] for s in samples] == ["3 * 3 = 9", "3 + 6 = 9", "1 2 3"]
    np.testing.assert_array_equal(scored.rewards, [1.0, 1.0, 0.0])
    batch, truncated = assemble_train_batch(scored.rollout, jnp.ones(3, bool), jnp.ones(3), jnp.arange(3),
                                            overlong_filter=True)
    # Loss tokens: the cut rows keep 9 each; row 2 is truncated (no stop) and the overlong filter drops it.
    np.testing.assert_array_equal(np.asarray(batch.loss_mask).sum(axis=1), [9, 9, 0])
    np.testing.assert_array_equal(np.asarray(truncated), [False, False, True])


class _FixedBackend:
    """A rollout backend that returns the same completions whatever it is asked."""

    pad_id = PAD
    stop_token_ids = (EOS,)

    def __init__(self, rows):
        self.rows = rows

    def generate(self, params, prompt_tokens, prompt_lengths, n, key, *, temperature=None, top_p=None):
        rows = [row for row in self.rows for _ in range(n)]
        return _rollout(rows, [FINISH_LENGTH] * len(rows))

    def wait(self, rollout):
        return rollout


def test_eval_cuts_at_stop_strings(tokenizer, monkeypatch):
    cfg = base_config()
    cfg.sampling.stop_strings = ("= 9",)
    cfg.eval.num_samples = 2
    cfg.data.max_prompt_tokens = 4
    monkeypatch.setattr(wiring, "rollout_backend", lambda *a, **k: _FixedBackend([THREE_TIMES, ids(*"1 = 9 9")]))
    records = [{"prompt_text": f"p{i}", "prompt_tokens": ids("a"), "answer": "9", "example": {"gold": "9"}}
               for i in range(2)]
    executor = RewardExecutor({wiring.CORRECT_COMPONENT: (says_nine, 1.0)}, num_workers=0, timeout_s=5.0)
    try:
        report = evaluate.evaluate_records(None, None, tokenizer, records, cfg, key=np.zeros(2, np.uint32),
                                           rewards=executor)
    finally:
        executor.close()
    # Uncut, "3 * 3 = 9 then" would score 0; cut, both rows end in "= 9" and score 1.
    assert [p["greedy_completion"] for p in report["problems"]] == ["3 * 3 = 9", "1 = 9"]
    assert report["summary"]["greedy_accuracy"] == 1.0 and report["summary"]["avg_at_k"] == 1.0
