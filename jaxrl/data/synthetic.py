"""Synthetic verifiable task for the embedded default run: "countdown-lite".

A problem gives a few small positive integers and a target::

    prompt:      "make 9 from 3 5 7"
    completion:  "5+7=12\\n12-3=9\\nanswer: 9"

A worked solution combines the numbers one at a time with ``+`` or ``-``: the first step
uses two of the numbers, each later step combines the previous result with one unused
number, and after every number has been used exactly once the running value must equal
the target. The last line is ``answer: <target>``. For example ``make 9 from 3 5 7`` is
solved by::

    5+7=12
    12-3=9
    answer: 9

Any valid chain is accepted; the reference solution is the chain the problem was
generated from.

Why this suits RL on a 2-core CPU with a tiny model:

- The tokenizer (``jaxrl.data.tokenizer``) has 60 tokens; with it, prompts are <= 27
  tokens (chat template included) and completions <= 23 tokens for "medium" (<= 32 for
  "hard"), eos included, so one bucket of 32 covers both on a CPU.
- Every step has a fork (which sign, which number next) whose correct choice needs
  look-ahead to the target, so a warmed-up model is uncertain there: greedy decoding
  often takes a wrong branch while a handful of samples usually contains a right one
  (low greedy accuracy, high pass@8), which is exactly the regime where RL helps.
- The arithmetic inside a step is deterministic and easy to learn from SFT data, so
  the reward signal is mostly about the fork decisions.
- The verifier (``jaxrl.rewards.tasks``) checks the whole chain exactly, so copying the
  target into the answer line earns nothing.

Problems are assigned to the ``train`` or ``heldout`` split by a hash of the problem
itself (numbers + target), so the two splits never share a problem whatever the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import random
from typing import Iterable, Mapping, Sequence

from jaxrl.rewards.tasks import countdown_reward

TASK_NAME = "countdown"
ANSWER_PREFIX = "answer:"
# Fraction of the problem space hashed into the held-out split.
HELDOUT_FRACTION = 0.1
SPLITS = ("train", "heldout")


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """Shape of a countdown problem.

    num_count: how many numbers the prompt gives (every one must be used).
    max_number: numbers are drawn uniformly from 1..max_number.
    nonnegative_chain: the generating (reference) chain keeps every running value >= 0.
    """

    num_count: int
    max_number: int
    nonnegative_chain: bool = True

    def __post_init__(self):
        if not 2 <= self.num_count <= 6:
            raise ValueError(f"Difficulty.num_count must be in 2..6, got {self.num_count}")
        if not 1 <= self.max_number <= 999:
            raise ValueError(f"Difficulty.max_number must be in 1..999, got {self.max_number}")


DIFFICULTIES: dict[str, Difficulty] = {
    # 3 one-digit numbers: ~2k distinct problems, completions <= 20 tokens.
    "easy": Difficulty(num_count=3, max_number=9),
    # 3 numbers up to 20: tens of thousands of problems, completions <= 23 tokens.
    "medium": Difficulty(num_count=3, max_number=20),
    # 4 numbers up to 20: three forks per problem, completions <= 32 tokens.
    "hard": Difficulty(num_count=4, max_number=20),
}


def resolve_difficulty(difficulty: str | Difficulty) -> Difficulty:
    """Returns the ``Difficulty`` for a preset name or passes an instance through."""
    if isinstance(difficulty, Difficulty):
        return difficulty
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; expected one of {sorted(DIFFICULTIES)}")
    return DIFFICULTIES[difficulty]


def format_prompt(numbers: Sequence[int], target: int) -> str:
    """The prompt text for a problem: ``make <target> from <n1> <n2> ...``."""
    return f"make {target} from " + " ".join(str(n) for n in numbers)


def problem_split(numbers: Sequence[int], target: int) -> str:
    """``"heldout"`` or ``"train"``, decided by a hash of the problem (stable across runs)."""
    key = f"{TASK_NAME}|{','.join(str(n) for n in numbers)}|{target}".encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2.0**64
    return "heldout" if bucket < HELDOUT_FRACTION else "train"


def _chain_steps(numbers: Sequence[int], order: Sequence[int], signs: Sequence[str]) -> list[tuple[int, str, int, int]]:
    """Steps ``(left, sign, right, result)`` combining ``numbers`` in ``order`` with ``signs``."""
    value = numbers[order[0]]
    steps = []
    for index, sign in zip(order[1:], signs):
        right = numbers[index]
        result = value + right if sign == "+" else value - right
        steps.append((value, sign, right, result))
        value = result
    return steps


def _sample_problem(rng: random.Random, difficulty: Difficulty) -> dict:
    """Draws numbers, an order and signs; the chain they define fixes the target."""
    while True:
        numbers = [rng.randint(1, difficulty.max_number) for _ in range(difficulty.num_count)]
        order = list(range(difficulty.num_count))
        rng.shuffle(order)
        signs = [rng.choice("+-") for _ in range(difficulty.num_count - 1)]
        steps = _chain_steps(numbers, order, signs)
        if difficulty.nonnegative_chain and any(result < 0 for _, _, _, result in steps):
            continue
        target = steps[-1][3]
        return {"numbers": numbers, "target": target, "solution_order": order, "solution_signs": "".join(signs)}


def generate_problems(
    n: int, seed: int, split: str = "train", difficulty: str | Difficulty = "medium", *,
    distinct: bool = False,
) -> list[dict]:
    """Generates ``n`` countdown problems of one split, deterministically from ``seed``.

    Each row has ``prompt``, ``answer`` (the target as a string), ``task``, ``numbers``,
    ``target``, ``split``, ``difficulty`` and the generating chain (``solution_order``,
    ``solution_signs``) used by ``reference_solution``. Problems can repeat when ``n`` is
    large relative to the problem space of the difficulty, unless ``distinct`` (then the
    rows are the first ``n`` distinct prompts of the same stream; for evaluation sets, where
    a repeated problem would count twice).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    level = resolve_difficulty(difficulty)
    level_name = difficulty if isinstance(difficulty, str) else "custom"
    # The split name is mixed into the stream so train and heldout draws are independent.
    rng = random.Random(f"{TASK_NAME}|{seed}|{split}|{level}")
    rows: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 1000 * (n + 10):
            kind = "distinct " if distinct else ""
            raise RuntimeError(f"could not draw {n} {kind}{split} problems at difficulty {level} "
                               f"(found {len(rows)})")
        problem = _sample_problem(rng, level)
        if problem_split(problem["numbers"], problem["target"]) != split:
            continue
        if distinct:
            prompt = format_prompt(problem["numbers"], problem["target"])
            if prompt in seen:
                continue
            seen.add(prompt)
        rows.append(
            {
                "prompt": format_prompt(problem["numbers"], problem["target"]),
                "answer": str(problem["target"]),
                "task": TASK_NAME,
                "split": split,
                "difficulty": level_name,
                **problem,
            }
        )
    return rows


def _format_steps(steps: Iterable[tuple[int, str, int, int]]) -> list[str]:
    return [f"{left}{sign}{right}={result}" for left, sign, right, result in steps]


def reference_solution(example: Mapping) -> str:
    """A correct worked completion for ``example``: one step per line, then ``answer: <target>``.

    Uses the generating chain when the row carries it, otherwise searches for one.
    """
    numbers = [int(n) for n in example["numbers"]]
    target = int(example["target"])
    if "solution_order" in example and "solution_signs" in example:
        steps = _chain_steps(numbers, list(example["solution_order"]), list(example["solution_signs"]))
    else:
        steps = _search_chain(numbers, target)
    if steps[-1][3] != target:
        raise ValueError(f"stored solution of {example.get('prompt')!r} does not reach {target}")
    return "\n".join(_format_steps(steps) + [f"{ANSWER_PREFIX} {target}"])


def _search_chain(numbers: Sequence[int], target: int) -> list[tuple[int, str, int, int]]:
    """Exhaustive search (numbers are few) for a chain reaching ``target``."""
    for order in itertools.permutations(range(len(numbers))):
        for signs in itertools.product("+-", repeat=len(numbers) - 1):
            steps = _chain_steps(numbers, order, signs)
            if steps[-1][3] == target:
                return steps
    raise ValueError(f"no chain of {list(numbers)} reaches {target}")


def corrupted_solution(example: Mapping, rng: random.Random) -> str:
    """A well-formed but wrong completion for noisy SFT; it never verifies as correct.

    The corruption is one of: a wrong fork (valid arithmetic on other signs, so the chain
    misses the target, with the honest final value as the answer), an arithmetic slip in
    one step, or a wrong final answer after a correct chain.
    """
    numbers = [int(n) for n in example["numbers"]]
    target = int(example["target"])
    reference = reference_solution(example)
    lines = reference.split("\n")
    kinds = ["wrong_fork", "arithmetic_slip", "wrong_answer"]
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "wrong_fork":
            order = list(range(len(numbers)))
            rng.shuffle(order)
            signs = [rng.choice("+-") for _ in range(len(numbers) - 1)]
            steps = _chain_steps(numbers, order, signs)
            candidate = "\n".join(_format_steps(steps) + [f"{ANSWER_PREFIX} {steps[-1][3]}"])
        elif kind == "arithmetic_slip":
            slip_line = rng.randrange(len(lines) - 1)
            left_side, result = lines[slip_line].rsplit("=", 1)
            wrong = int(result) + rng.choice([-2, -1, 1, 2])
            candidate_lines = list(lines)
            candidate_lines[slip_line] = f"{left_side}={wrong}"
            candidate = "\n".join(candidate_lines)
        else:
            wrong_target = target + rng.choice([-3, -2, -1, 1, 2, 3])
            candidate = "\n".join(lines[:-1] + [f"{ANSWER_PREFIX} {wrong_target}"])
        if countdown_reward(example["prompt"], candidate, example) == 0.0:
            return candidate
    # A wrong final answer after a correct chain is always rejected, so this is reachable
    # only when every random pick above happened to be a valid alternative solution.
    return "\n".join(lines[:-1] + [f"{ANSWER_PREFIX} {target + 1}"])


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping]) -> int:
    """Writes ``rows`` as one JSON object per line (parent dirs created); returns the count."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
            count += 1
    return count


def dump_splits(
    out_dir: str | os.PathLike,
    *,
    num_train: int = 20000,
    num_heldout: int = 500,
    seed: int = 0,
    difficulty: str | Difficulty = "medium",
    with_reference: bool = True,
) -> dict[str, str]:
    """Writes ``train.jsonl`` and ``heldout.jsonl`` (distinct problems) under ``out_dir``;
    returns split -> path.

    With ``with_reference`` every row also carries ``reference`` (its worked solution),
    which SFT warm-up uses as the target completion.
    """
    paths = {}
    for split, count in (("train", num_train), ("heldout", num_heldout)):
        rows = generate_problems(count, seed, split=split, difficulty=difficulty, distinct=split == "heldout")
        if with_reference:
            for row in rows:
                row["reference"] = reference_solution(row)
        paths[split] = os.path.join(os.fspath(out_dir), f"{split}.jsonl")
        write_jsonl(paths[split], rows)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m jaxrl.data.synthetic --out DIR [--train N --heldout N --seed S --difficulty D]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory for train/heldout jsonl")
    parser.add_argument("--train", type=int, default=20000, help="number of train problems")
    parser.add_argument("--heldout", type=int, default=500, help="number of held-out problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", default="medium", choices=sorted(DIFFICULTIES))
    args = parser.parse_args(argv)
    paths = dump_splits(args.out, num_train=args.train, num_heldout=args.heldout, seed=args.seed, difficulty=args.difficulty)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
