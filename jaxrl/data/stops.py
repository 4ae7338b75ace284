"""Stop strings: where a sampled completion ends when a stop string is matched in text.

The sampler stops on token ids only (the model's eos ids, ``sampling.stop_token_ids`` and the
id of each single-token ``sampling.stop_strings`` entry). A stop string of several tokens can
only be seen in text, so it is found on the host after sampling:

* a completion's *cut length* is the smallest m such that the text of its first m tokens
  (``tokenizer.decode_completion``: special tokens dropped) contains one of the stop strings;
* the row's length becomes ``min(sampled length, m)`` and its finish reason ``FINISH_STOP``;
  the tokens after the cut leave the response mask, so the loss, the rewards (which read the
  text of exactly the kept tokens, stop string included) and the length metrics agree.

The token that completes the stop string is kept, as a stop token is (``Rollout.lengths``
counts the stop token). Its text may run past the stop string when one token spans the end
of the stop string and more text (``"</answer>\\n"`` as one token); the kept text is exactly
what the kept tokens decode to, so that is what rewarders see. The search assumes that the
text of a prefix is a prefix of the text (true of HF decoders up to a trailing partial UTF-8
character, which never completes a match) and bisects: O(log T) decodes per row that
contains a stop string, one decode per row that does not.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxrl.data.tokenizer import decode_completion
from jaxrl.types import FINISH_STOP


def _contains(text: str, stop_strings: Sequence[str]) -> bool:
    return any(stop in text for stop in stop_strings)


def stop_cut_length(token_ids: Sequence[int], tokenizer, stop_strings: Sequence[str]) -> int | None:
    """Token count to keep of one completion (ids [L], already ended at its sampled length):
    the smallest m in 1..L whose decoded text contains a stop string; None when the whole
    completion contains none (or ``stop_strings`` is empty)."""
    ids = [int(i) for i in token_ids]
    stops = [s for s in stop_strings if s]
    if not stops or not ids or not _contains(decode_completion(tokenizer, ids), stops):
        return None
    low, high = 1, len(ids)  # decode(ids[:high]) contains a stop string; ids[:low - 1] does not
    while low < high:
        middle = (low + high) // 2
        if _contains(decode_completion(tokenizer, ids[:middle]), stops):
            high = middle
        else:
            low = middle + 1
    return high


def cut_at_stop_strings(tokens: np.ndarray, lengths: np.ndarray, finish_reason: np.ndarray, tokenizer,
                        stop_strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a rollout on the host → (lengths int32 [B], finish_reason int32 [B]) after the
    stop-string cut: tokens int [B, T] right-padded, lengths [B] (sampled, stop token
    included), finish_reason [B]. A row containing a stop string gets its cut length and
    ``FINISH_STOP``; other rows are unchanged. With no stop strings the inputs come back."""
    lengths = np.asarray(lengths, np.int32).copy()
    finish_reason = np.asarray(finish_reason, np.int32).copy()
    if not any(stop_strings):
        return lengths, finish_reason
    for row in range(len(lengths)):
        cut = stop_cut_length(tokens[row, : lengths[row]], tokenizer, stop_strings)
        if cut is not None:
            lengths[row], finish_reason[row] = cut, FINISH_STOP
    return lengths, finish_reason
