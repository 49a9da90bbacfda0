"""Byte-level BPE tokenizers trained offline on local text, saved the way HF checkpoints ship them."""

from __future__ import annotations

import sysconfig
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def stdlib_files(limit: int | None = None) -> list[Path]:
    """Python sources of the running interpreter's standard library, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)
    return files[:limit] if limit else files


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, added_tokens: list[str] | None = None, split_digits: bool = False
) -> PreTrainedTokenizerFast:
    """A ChatML byte-level BPE tokenizer; `<|im_end|>` ends a turn and is the EOS token.

    added_tokens: kept whole and shown in decoded text (unlike the chat's special tokens).
    split_digits: every digit its own token (arithmetic is learnable digit by digit).
    """
    special = SPECIAL_TOKENS
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    if added_tokens:
        fast.add_tokens(added_tokens)
    return fast
