"""Incremental detokenisation and stop strings."""

from __future__ import annotations

import logging
from collections.abc import Callable

from tokenizers.decoders import DecodeStream

from branchwise.engine.sequence import Sequence

log = logging.getLogger(__name__)

Decode = Callable[[list[int], bool], str]


def rust_tokenizer(tokenizer):
    """The Rust tokenizer under `tokenizer` when its decode gives the same text as the wrapper's (no
    clean-up of spaces), else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return backend
    return None


def decoder_for(tokenizer) -> Decode:
    """`decode(ids, skip_special_tokens)`: the Rust tokenizer's own where it may (no per-call Python
    conversions of the wrapper), else the wrapper's."""
    if (backend := rust_tokenizer(tokenizer)) is not None:
        return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


def init_offsets(seq: Sequence, backend=None) -> None:
    """Start detokenising `seq`'s output; with a Rust tokenizer, in tokenizers' own incremental decoder
    (DecodeStream, as vLLM does: one call per token, the state kept in Rust)."""
    # decode the first output tokens with a few prompt tokens before them, so leading spaces survive
    seq.prefix_offset = max(seq.num_prompt_tokens - 5, 0)
    seq.read_offset = seq.num_prompt_tokens
    # nothing reads the text before the end (no stop strings, nobody streams): one decode when it ends
    seq.text_at_end = backend is not None and seq.params.output_kind == "final_only" and not seq.params.stop
    if backend is not None and not seq.text_at_end:
        seq.decode_stream = DecodeStream(skip_special_tokens=seq.params.skip_special_tokens)
        seq.decode_stream.step(backend, seq.token_ids[seq.prefix_offset : seq.read_offset])


def detokenize_step(decode: Decode, seq: Sequence, backend=None) -> str:
    """Text of the tokens appended since the last call (with a stream: the one appended last); holds back
    an incomplete UTF-8 character."""
    ids, skip = seq.token_ids, seq.params.skip_special_tokens
    if seq.decode_stream is not None:
        try:
            return seq.decode_stream.step(backend, ids[-1]) or ""
        except Exception as e:  # e.g. tokenizers' "invalid prefix" (vllm#17448): on with the offsets
            log.warning("incremental detokenizing failed (%s); decoding by offsets from here", e)
            seq.decode_stream = None
            seq.prefix_offset, seq.read_offset = max(len(ids) - 6, 0), len(ids) - 1
    before = decode(ids[seq.prefix_offset : seq.read_offset], skip)
    after = decode(ids[seq.prefix_offset :], skip)
    if len(after) > len(before) and not after.endswith("\ufffd"):
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        return after[len(before) :]
    return ""


def whole_text(decode: Decode, seq: Sequence, end: int) -> str:
    """The text of output tokens up to `end` in one decode: what `detokenize_step`, called token by token,
    would have given in all (the same prompt tokens before them; an incomplete last character held back)."""
    ids, skip = seq.token_ids, seq.params.skip_special_tokens
    before = decode(ids[seq.prefix_offset : seq.read_offset], skip)
    after = decode(ids[seq.prefix_offset : end], skip)
    text = after[len(before) :] if after.startswith(before) else decode(ids[seq.read_offset : end], skip)
    return text.rstrip("\ufffd")


def find_stop(seq: Sequence, num_new_chars: int) -> int | None:
    """Where the output text must end if a stop string completed within the last num_new_chars chars."""
    text, params = seq.output_text, seq.params
    found = []
    for stop in params.stop:
        at = text.find(stop, max(0, len(text) - num_new_chars - len(stop) + 1))
        if at >= 0:
            found.append(at + len(stop) if params.include_stop_str_in_output else at)
    return min(found, default=None)


def sendable_text(seq: Sequence) -> str:
    """New text safe to stream: while running, hold back what could be the start of a stop string."""
    end = len(seq.output_text)
    if not seq.finished and seq.params.stop:
        end -= max(len(s) for s in seq.params.stop) - 1
    if end <= seq.num_text_sent:
        return ""
    text = seq.output_text[seq.num_text_sent : end]
    seq.num_text_sent = end
    return text
