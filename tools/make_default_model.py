"""Builds the embedded default policy in ``assets/default_model`` (HF format).

The default run (``make run``) needs a policy with no download and no GPU, in the regime
where RL visibly helps: it usually *can* solve a countdown-lite problem (high pass@8 at
temperature 1) but greedy decoding often takes a wrong fork (low greedy accuracy). This
script makes one from scratch, deterministically from ``--seed``:

1. writes the character-level chat tokenizer (``jaxrl.data.tokenizer.build_tokenizer``);
2. initialises a tiny qwen3-type decoder (tied embeddings, q/k-norm);
3. supervised warm-up with AdamW on chat-templated prompt -> solution pairs from the
   ``train`` split (loss on completion tokens and the closing ``<eos>`` only); with
   probability ``--wrong-fork-fraction`` the target is a wrong-fork chain (random order
   and signs, correct arithmetic, misses the target) instead of the reference solution,
   so the policy learns the arithmetic everywhere but stays uncertain at the forks;
4. every ``--eval-every`` steps measures held-out greedy accuracy and pass@8 (8 samples at
   T = 1, unbiased estimator with n = k = 8) on ``--eval-problems`` problems of the
   ``heldout`` split, prints the trajectory, and stops at the first checkpoint with
   greedy accuracy <= ``--max-greedy`` and pass@8 >= ``--min-pass8`` (after ``--min-steps``);
5. saves it with ``jaxrl.models.save_pretrained`` (float32) next to the tokenizer, reloads
   it with ``from_pretrained`` and checks the reloaded logits match.

Usage (the command that produced the committed assets; see assets/README.md)::

    python tools/make_default_model.py --out assets/default_model

Everything runs on CPU in a few minutes; the decode used for evaluation is a small
jitted KV-cache loop over ``decoder_hidden_with_cache``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from jaxrl.data import synthetic  # noqa: E402
from jaxrl.data.tokenizer import (  # noqa: E402
    BOS_ID, EOS_ID, PAD_ID, build_tokenizer, decode_completion, encode_prompt, load_tokenizer,
)
from jaxrl.models import ModelConfig, Transformer, from_pretrained, model_params, save_pretrained  # noqa: E402
from jaxrl.models import transformer as tfm  # noqa: E402
from jaxrl.rewards.tasks import countdown_reward  # noqa: E402

PASS_AT_K = 8


def default_model_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 3) -> ModelConfig:
    """The shipped architecture (~0.15M parameters by default): small enough for RL on 2 CPU cores."""
    return ModelConfig(
        model_type="qwen3",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=hidden_size // 4,
        qk_norm=True,
        tie_word_embeddings=True,
        max_position_embeddings=256,
        rope_theta=10000.0,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def left_pad(rows: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 tokens [B, length] left-padded with <pad>, and the bool mask of real tokens."""
    tokens = np.full((len(rows), length), PAD_ID, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"row of {len(row)} tokens does not fit in {length}")
        tokens[i, length - len(row):] = row
        mask[i, length - len(row):] = True
    return tokens, mask


def wrong_fork_solution(example: dict, rng: np.random.Generator) -> str | None:
    """A chain with correct arithmetic over a random order and signs that misses the target,
    ending with its honest final value; None when the random chain happens to be correct."""
    numbers = [int(n) for n in example["numbers"]]
    order = rng.permutation(len(numbers))
    signs = rng.choice(["+", "-"], size=len(numbers) - 1)
    value, lines = numbers[order[0]], []
    for index, sign in zip(order[1:], signs):
        result = value + numbers[index] if sign == "+" else value - numbers[index]
        lines.append(f"{value}{sign}{numbers[index]}={result}")
        value = result
    if value == int(example["target"]):
        return None
    return "\n".join(lines + [f"{synthetic.ANSWER_PREFIX} {value}"])


def sft_completion(example: dict, rng: np.random.Generator, wrong_fork_fraction: float) -> str:
    """The reference solution, or with probability ``wrong_fork_fraction`` a wrong-fork chain."""
    if wrong_fork_fraction > 0 and rng.random() < wrong_fork_fraction:
        wrong = wrong_fork_solution(example, rng)
        if wrong is not None:
            return wrong
    return synthetic.reference_solution(example)


def build_sft_arrays(tokenizer, problems: list[dict], prompt_length: int, completion_length: int,
                     *, wrong_fork_fraction: float = 0.0, seed: int = 0):
    """Left-padded prompt + right-padded completion per problem, and the completion loss mask.

    Returns tokens [N, P + C] int32, attention mask [N, P + C] bool and loss mask [N, P + C]
    (True where the *target* token, i.e. position t + 1, is a completion token or <eos>).
    """
    prompts = [encode_prompt(tokenizer, p["prompt"]) for p in problems]
    rng = np.random.default_rng(seed)
    completions = [
        list(tokenizer(sft_completion(p, rng, wrong_fork_fraction), add_special_tokens=False)["input_ids"]) + [EOS_ID]
        for p in problems
    ]
    prompt_tokens, prompt_mask = left_pad(prompts, prompt_length)
    total = prompt_length + completion_length
    tokens = np.full((len(problems), total), PAD_ID, np.int32)
    attention = np.zeros((len(problems), total), bool)
    targets_mask = np.zeros((len(problems), total), bool)
    tokens[:, :prompt_length] = prompt_tokens
    attention[:, :prompt_length] = prompt_mask
    for i, completion in enumerate(completions):
        if len(completion) > completion_length:
            raise ValueError(f"completion of {len(completion)} tokens does not fit in {completion_length}")
        end = prompt_length + len(completion)
        tokens[i, prompt_length:end] = completion
        attention[i, prompt_length:end] = True
        # position t predicts token t + 1: the last prompt token predicts the first completion token
        targets_mask[i, prompt_length - 1:end - 1] = True
    return tokens, attention, targets_mask


def sft_loss(params, cfg: ModelConfig, tokens, attention, targets_mask):
    """Mean next-token cross-entropy over completion targets."""
    logits = tfm.forward_params(params, cfg, tokens, attention_mask=attention)
    targets = jnp.roll(tokens, -1, axis=1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    weights = targets_mask.astype(jnp.float32)
    return -(token_logp * weights).sum() / weights.sum()


def make_train_step(cfg: ModelConfig, optimizer):
    @jax.jit
    def train_step(params, opt_state, tokens, attention, targets_mask):
        loss, grads = jax.value_and_grad(sft_loss)(params, cfg, tokens, attention, targets_mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy"))
def decode(params, cfg: ModelConfig, prompt_tokens, prompt_mask, key, *, max_new_tokens: int,
           greedy: bool, temperature: float = 1.0):
    """Greedy or temperature sampling with a KV cache; returns int32 [B, max_new_tokens].

    Positions after a row's <eos> hold <pad>.
    """
    batch, prompt_length = prompt_tokens.shape
    cache = tfm.init_kv_cache(cfg, batch, prompt_length + max_new_tokens)
    valid = jnp.zeros((batch, prompt_length + max_new_tokens), bool).at[:, :prompt_length].set(prompt_mask)
    positions = tfm.positions_from_mask(prompt_mask)
    hidden, cache = tfm.decoder_hidden_with_cache(params, cfg, prompt_tokens, positions, cache,
                                                  jnp.int32(0), valid)
    logits = tfm.logits_from_hidden(params, cfg, hidden[:, -1])

    def step(carry, index):
        cache, valid, logits, position, done, key = carry
        key, sample_key = jax.random.split(key)
        if greedy:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            token = jax.random.categorical(sample_key, logits / temperature, axis=-1).astype(jnp.int32)
        token = jnp.where(done, PAD_ID, token)
        write_index = prompt_length + index
        valid = valid.at[:, write_index].set(True)
        position = position + 1
        hidden, cache = tfm.decoder_hidden_with_cache(params, cfg, token[:, None], position[:, None], cache,
                                                      write_index, valid)
        logits = tfm.logits_from_hidden(params, cfg, hidden[:, 0])
        done = done | (token == EOS_ID)
        return (cache, valid, logits, position, done, key), token

    carry = (cache, valid, logits, positions[:, -1], jnp.zeros((batch,), bool), key)
    _, tokens = jax.lax.scan(step, carry, jnp.arange(max_new_tokens, dtype=jnp.int32))
    return tokens.T


def completion_lengths(tokens: np.ndarray) -> np.ndarray:
    """Tokens up to and including <eos> (the full width when a row never stops)."""
    is_eos = tokens == EOS_ID
    return np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, tokens.shape[1])


def evaluate_policy(params, cfg: ModelConfig, tokenizer, problems: list[dict], key, *,
                    prompt_length: int, max_new_tokens: int, k: int = PASS_AT_K) -> dict[str, float]:
    """Held-out greedy accuracy, pass@k (k samples at T = 1) and mean greedy response length."""
    prompts = [encode_prompt(tokenizer, p["prompt"]) for p in problems]
    prompt_tokens, prompt_mask = left_pad(prompts, prompt_length)

    def rewards(tokens: np.ndarray, rows: list[dict]) -> np.ndarray:
        texts = [decode_completion(tokenizer, row_tokens) for row_tokens in tokens]
        return np.array([countdown_reward(r["prompt"], t, r) for r, t in zip(rows, texts)])

    greedy_tokens = np.asarray(decode(params, cfg, prompt_tokens, prompt_mask, key,
                                      max_new_tokens=max_new_tokens, greedy=True))
    greedy_correct = rewards(greedy_tokens, problems)
    sampled_tokens = np.asarray(decode(params, cfg, np.repeat(prompt_tokens, k, 0), np.repeat(prompt_mask, k, 0),
                                       key, max_new_tokens=max_new_tokens, greedy=False))
    sampled_correct = rewards(sampled_tokens, [p for p in problems for _ in range(k)]).reshape(len(problems), k)
    return {
        "greedy_accuracy": float(greedy_correct.mean()),
        f"pass@{k}": float((sampled_correct.max(axis=1) > 0).mean()),
        "sample_accuracy": float(sampled_correct.mean()),
        "mean_response_length": float(completion_lengths(greedy_tokens).mean()),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="assets/default_model", help="output HF directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", default="easy", choices=sorted(synthetic.DIFFICULTIES))
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=3)
    parser.add_argument("--num-train", type=int, default=40000, help="distinct SFT problems drawn")
    parser.add_argument("--wrong-fork-fraction", type=float, default=0.5,
                        help="share of SFT targets replaced by a wrong-fork chain (right arithmetic, misses the target)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--min-steps", type=int, default=100, help="never stop before this step")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--max-greedy", type=float, default=0.35, help="stop only if greedy accuracy <= this")
    parser.add_argument("--min-pass8", type=float, default=0.60, help="stop only if pass@8 >= this")
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--completion-length", type=int, default=32)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    out_dir = build_tokenizer(args.out)
    tokenizer = load_tokenizer(out_dir)
    cfg = default_model_config(vocab_size=64, hidden_size=args.hidden_size, num_layers=args.num_layers)  # 60 tokens, padded to a multiple of 8
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens > model vocab {cfg.vocab_size}")
    print(f"model: {cfg.num_params():,} parameters; tokenizer: {len(tokenizer)} tokens", flush=True)

    train_problems = synthetic.generate_problems(args.num_train, args.seed, "train", args.difficulty)
    heldout_problems = synthetic.generate_problems(args.eval_problems, args.seed + 1, "heldout", args.difficulty)
    tokens, attention, targets_mask = build_sft_arrays(tokenizer, train_problems, args.prompt_length,
                                                       args.completion_length,
                                                       wrong_fork_fraction=args.wrong_fork_fraction, seed=args.seed)

    key = jax.random.PRNGKey(args.seed)
    init_key, eval_key = jax.random.split(key)
    params = tfm.init_params(cfg, init_key)
    schedule = optax.linear_schedule(0.0, args.learning_rate, args.warmup_steps)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=args.weight_decay))
    opt_state = optimizer.init(params)
    train_step = make_train_step(cfg, optimizer)
    data_rng = np.random.default_rng(args.seed)
    order = data_rng.permutation(len(tokens))
    cursor = 0

    trajectory = []
    chosen = None
    print(f"{'step':>5} {'loss':>7} {'greedy':>7} {'pass@8':>7} {'sample':>7} {'len':>5} {'time':>6}", flush=True)
    for step in range(1, args.max_steps + 1):
        if cursor + args.batch_size > len(order):
            order, cursor = data_rng.permutation(len(tokens)), 0
        batch = order[cursor:cursor + args.batch_size]
        cursor += args.batch_size
        params, opt_state, loss = train_step(params, opt_state, tokens[batch], attention[batch], targets_mask[batch])
        if step % args.eval_every:
            continue
        metrics = evaluate_policy(params, cfg, tokenizer, heldout_problems, eval_key,
                                  prompt_length=args.prompt_length, max_new_tokens=args.completion_length)
        row = {"step": step, "loss": float(loss), **metrics, "seconds": time.time() - start}
        trajectory.append(row)
        print(f"{step:5d} {row['loss']:7.4f} {row['greedy_accuracy']:7.3f} {row['pass@8']:7.3f} "
              f"{row['sample_accuracy']:7.3f} {row['mean_response_length']:5.1f} {row['seconds']:6.0f}s", flush=True)
        if step >= args.min_steps and row["greedy_accuracy"] <= args.max_greedy and row["pass@8"] >= args.min_pass8:
            chosen = row
            break
    if chosen is None:
        raise SystemExit(
            f"no checkpoint met greedy <= {args.max_greedy} and pass@8 >= {args.min_pass8} "
            f"within {args.max_steps} steps; see the trajectory above"
        )

    model = Transformer(cfg, params=params)
    save_pretrained(model, out_dir)
    reloaded, reloaded_cfg = from_pretrained(out_dir)
    probe = jnp.asarray(tokens[:4])
    expected = tfm.forward_params(params, cfg, probe, attention_mask=jnp.asarray(attention[:4]))
    got = tfm.forward_params(model_params(reloaded), reloaded_cfg, probe, attention_mask=jnp.asarray(attention[:4]))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)
    summary = {
        "command": "python tools/make_default_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "difficulty": args.difficulty,
        "chosen": chosen,
        "trajectory": trajectory,
        "wall_seconds": time.time() - start,
    }
    with open(os.path.join(out_dir, "sft_trajectory.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    print(f"saved {out_dir} at step {chosen['step']}: greedy {chosen['greedy_accuracy']:.3f}, "
          f"pass@8 {chosen['pass@8']:.3f} ({summary['wall_seconds']:.0f}s total)", flush=True)
    return summary


if __name__ == "__main__":
    main()
