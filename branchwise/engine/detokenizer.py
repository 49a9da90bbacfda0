"""Incremental detokenisation and stop strings."""

from __future__ import annotations

from branchwise.engine.sequence import Sequence


def init_offsets(seq: Sequence) -> None:
    # decode the first output tokens with a few prompt tokens before them, so leading spaces survive
    seq.prefix_offset = max(seq.num_prompt_tokens - 5, 0)
    seq.read_offset = seq.num_prompt_tokens


def detokenize_step(tokenizer, seq: Sequence) -> str:
    """Text of the tokens appended since the last call; holds back an incomplete UTF-8 character."""
    ids, skip = seq.token_ids, seq.params.skip_special_tokens
    before = tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=skip)
    after = tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=skip)
    if len(after) > len(before) and not after.endswith("\ufffd"):
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        return after[len(before) :]
    return ""


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
