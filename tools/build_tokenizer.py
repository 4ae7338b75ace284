"""Writes the character-level tokenizer of the synthetic task in HF format.

Usage: python tools/build_tokenizer.py --out assets/tiny-countdown
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxrl.data.tokenizer import build_tokenizer, load_tokenizer  # noqa: E402


def main() -> None:
    """Builds the tokenizer, reloads it with AutoTokenizer and prints its special token ids."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--model-max-length", type=int, default=512)
    args = parser.parse_args()
    out_dir = build_tokenizer(args.out, model_max_length=args.model_max_length)
    tokenizer = load_tokenizer(out_dir)
    print(f"wrote {out_dir}: vocab size {len(tokenizer)}")
    for token in tokenizer.all_special_tokens:
        print(f"  {token!r}: {tokenizer.convert_tokens_to_ids(token)}")


if __name__ == "__main__":
    main()
