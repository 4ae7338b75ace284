"""Tokenizers: the tiny character-level one for the synthetic task, and prompt encoding.

``build_tokenizer(out_dir)`` writes an HF-format tokenizer (``tokenizer.json``,
``tokenizer_config.json`` with a Jinja ``chat_template``, ``special_tokens_map.json``) that
``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads offline. Its vocabulary is
one token per character (digits, lowercase letters, a little punctuation, space, newline)
plus the whole word ``answer:`` (the answer marker of the synthetic task) and the special
tokens below, whose ids are fixed so checkpoints and configs can rely on them.

Encoding never changes the text: characters outside the vocabulary (e.g. uppercase) map
to ``<unk>`` rather than being normalised away.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers import models as tokenizer_models

from jaxrl.models.hf_io import load_tokenizer  # noqa: F401  (its one home; re-exported for data users)

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<bos>", "<eos>", "<unk>"
SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
PAD_ID, BOS_ID, EOS_ID, UNK_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID = range(len(SPECIAL_TOKENS))
WORD_TOKENS = ("answer:",)
CHARACTERS = "0123456789abcdefghijklmnopqrstuvwxyz +-*/=:,.()?!'_\n"

# <bos> starts every sequence; each turn is its role token then its content; an assistant
# turn ends with <eos>. Unknown roles fail loudly instead of being dropped.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}{% endif %}"
    "{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def tokenizer_vocab() -> dict[str, int]:
    """Token -> id for the synthetic-task tokenizer (specials first, then words, then characters)."""
    tokens = list(SPECIAL_TOKENS) + list(WORD_TOKENS) + list(CHARACTERS)
    if len(set(tokens)) != len(tokens):
        raise AssertionError("duplicate token in the synthetic vocabulary")
    return {token: index for index, token in enumerate(tokens)}


def _build_backend():
    """The ``tokenizers.Tokenizer`` behind the HF wrapper."""
    backend = Tokenizer(tokenizer_models.WordLevel(vocab=tokenizer_vocab(), unk_token=UNK_TOKEN))
    word_alternatives = "|".join(w.replace(":", r"\:") for w in WORD_TOKENS)
    # Each match becomes one piece: a whole word token or else a single character.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(rf"{word_alternatives}|[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, BOS_ID)]
    )
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return backend


def build_tokenizer(out_dir: str | os.PathLike, *, model_max_length: int = 512) -> str:
    """Writes the synthetic-task tokenizer in HF format to ``out_dir``; returns the directory."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    backend = _build_backend()
    backend.save(os.path.join(out_dir, "tokenizer.json"))
    special_map = {"pad_token": PAD_TOKEN, "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN}
    role_tokens = [SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "additional_special_tokens": role_tokens,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as handle:
        json.dump({**special_map, "additional_special_tokens": role_tokens}, handle, indent=2)
    return out_dir


def render_messages(tokenizer, messages: Sequence[Mapping[str, str]], *, use_chat_template: bool = True,
                    chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The exact text the model is conditioned on for chat ``messages`` (before tokenisation).

    With the chat template: the turns and the generation prompt, rendered by the tokenizer's
    template with ``chat_template_kwargs`` (e.g. Qwen3's ``enable_thinking``). Without it: the
    contents joined by newlines, to which ``encode_prompt`` lets the tokenizer add its own
    special tokens (e.g. ``<bos>``).
    """
    if use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "use_chat_template=True but the tokenizer has no chat_template "
                f"({getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)})"
            )
        return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=True,
                                             **dict(chat_template_kwargs or {}))
    return "\n".join(m["content"] for m in messages)


def build_prompt_text(tokenizer, prompt: str, *, system_prompt: str | None = None, use_chat_template: bool = True,
                      chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The exact text the model is conditioned on for the user text ``prompt``: a system turn
    (if given), the user turn and the generation prompt (see ``render_messages``)."""
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": prompt})
    return render_messages(tokenizer, messages, use_chat_template=use_chat_template,
                           chat_template_kwargs=chat_template_kwargs)


def encode_prompt(
    tokenizer, prompt: str, *, system_prompt: str | None = None, use_chat_template: bool = True
) -> list[int]:
    """Token ids of ``prompt`` ready for generation (chat template applied when asked)."""
    text = build_prompt_text(tokenizer, prompt, system_prompt=system_prompt, use_chat_template=use_chat_template)
    # A rendered chat template already holds its special tokens (e.g. bos); adding them
    # again would duplicate them.
    return list(tokenizer(text, add_special_tokens=not use_chat_template)["input_ids"])


def decode_completion(tokenizer, token_ids: Sequence[int]) -> str:
    """Completion text for rewarders: special tokens (eos, pad) dropped, nothing else changed."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
