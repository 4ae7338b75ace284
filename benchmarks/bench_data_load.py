"""Start-up cost of the prompt pipeline's up-front pass (read, validate, tokenise every row).

Writes N rows in DAPO-Math-17k's layout (a chat-message prompt of DAPO's instruction wrapped
around a ~250-character problem, ``reward_model.ground_truth``, ``extra_info.index``) to a
parquet file, then times ``make_prompt_iterator`` over it with the given tokenizer (default:
the embedded model's character tokenizer, about one token per character) and measures the
Python heap it keeps (tracemalloc, a second pass) and the records' token count.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_data_load.py --rows 17000
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import tempfile
import time
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq

from jaxrl.data import sources
from jaxrl.data.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCTION = ("Solve the following math problem step by step. The last line of your response should be of the "
               "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{}\n\n"
               "Remember to put your answer on its own line after \"Answer:\".")


def write_rows(path: str, rows: int, seed: int = 0) -> None:
    """``rows`` DAPO-layout rows with distinct ~250-character problems."""
    rng = random.Random(seed)
    words = "find the number of positive integers such that sum product of digits is divisible by".split()
    table = {"data_source": [], "prompt": [], "ability": [], "reward_model": [], "extra_info": []}
    for index in range(rows):
        problem = f"({index}) " + " ".join(rng.choice(words) for _ in range(45))
        table["data_source"].append("math_dapo")
        table["prompt"].append([{"role": "user", "content": INSTRUCTION.format(problem)}])
        table["ability"].append("MATH")
        table["reward_model"].append({"ground_truth": str(rng.randrange(1000)), "style": "rule"})
        table["extra_info"].append({"index": f"row-{index}"})
    pq.write_table(pa.table(table), path)


def build(path: str, tokenizer, max_prompt_tokens: int):
    return sources.make_prompt_iterator([path], tokenizer, batch_size=16, seed=0, num_epochs=None,
                                        preset="dapo_math", max_prompt_tokens=max_prompt_tokens)


def main() -> None:
    """Prints rows, tokens, seconds and MiB of the up-front pass."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=17000)
    parser.add_argument("--tokenizer", default=os.path.join(REPO, "assets", "default_model"))
    parser.add_argument("--max-prompt-tokens", type=int, default=2048)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dapo.parquet")
        write_rows(path, args.rows)
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        started = time.perf_counter()
        spec = sources.RowSpec(preset="dapo_math")
        sources._extract_all([path], spec, sources.SourceStats(), False)  # read + validate only
        extract_s = time.perf_counter() - started
        started = time.perf_counter()
        iterator = build(path, tokenizer, args.max_prompt_tokens)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        next(iterator)
        first_batch_s = time.perf_counter() - started
        records, _ = sources.load_prompt_records([path], tokenizer, preset="dapo_math",
                                                 max_prompt_tokens=args.max_prompt_tokens)
        tokens = sum(len(r["prompt_tokens"]) for r in records)
        del records, iterator
        tracemalloc.start()
        iterator = build(path, tokenizer, args.max_prompt_tokens)
        kept, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"file: {os.path.getsize(path) / 2**20:.1f} MiB parquet, rows kept {iterator.stats.rows_kept}")
    print(f"rows {args.rows}  prompt tokens {tokens} ({tokens / args.rows:.0f}/row)")
    print(f"read + validate {extract_s:.2f} s; make_prompt_iterator {build_s:.2f} s ({args.rows / build_s:.0f} rows/s), first batch {first_batch_s:.4f} s")
    print(f"python heap kept {kept / 2**20:.0f} MiB, peak during the pass {peak / 2**20:.0f} MiB; "
          f"max RSS {base_rss:.0f} MiB before the pass, {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
