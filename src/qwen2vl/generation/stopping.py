"""When a row stops: eos ids, stop strings (through a decode callable), and the new-token budget.

Works on ids only; the caller supplies `decode` (a tokenizer's), so nothing here imports processing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from qwen2vl.errors import InputError

DecodeFn = Callable[[list[int]], str]


def eos_hit(tokens: torch.Tensor, eos_ids: torch.Tensor | None) -> torch.Tensor:
    """(B,) bool: which of this step's tokens (B,) are an end-of-sequence id."""
    if eos_ids is None or eos_ids.numel() == 0:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return torch.isin(tokens, eos_ids)


class StopStringMatcher:
    """Per-row check that a stop string occurs in the text and overlaps the newest token.

    transformers' StopStringCriteria rule: the stop string must end inside the last token's text
    (the token may run past it: ["st", "opera"] matches "stop") but not lie wholly before it
    (["stop", "at"] does not match). Each check decodes only a tail window of the row's ids
    (every token carries at least one byte of the stop string), so the cost per step does not grow
    with the prompt or the output. Seed `ids` with the prompt's last tokens to let a stop string
    start inside the prompt, as the reference does.
    """

    def __init__(self, stop_strings: str | Sequence[str], decode: DecodeFn):
        self.stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        self.decode = decode
        self.window = max(len(s.encode("utf-8")) for s in self.stop_strings) + 2

    def matches(self, ids: Sequence[int]) -> bool:
        """True when a stop string overlaps the last id's text (ids: the row so far, newest last)."""
        window = list(ids[-self.window:])
        text = self.decode(window)
        before = self.decode(window[:-1])
        shared = 0  # where the newest token's text starts (common prefix; robust to U+FFFD fragments)
        for a, b in zip(before, text):
            if a != b:
                break
            shared += 1
        return any(s in text[max(0, shared - len(s) + 1):] for s in self.stop_strings)


def new_token_budget(max_new_tokens: int | None, max_length: int | None, prompt_len: int,
                     context_window: int | None, has_default_max_length: bool) -> int:
    """How many tokens generate may add: transformers' max_new_tokens / max_length rules.

    max_new_tokens wins over max_length (a total length). With no length set anywhere, 20 new
    tokens, clipped to the context window as the reference does. An explicit request that does not
    fit into the context window (prompt + new > max_position_embeddings) raises InputError.
    """
    if max_new_tokens is not None:
        budget = max_new_tokens
    elif has_default_max_length:
        total = max_length + prompt_len
        if context_window is not None:
            total = min(total, context_window)
        budget = total - prompt_len
    else:
        budget = max_length - prompt_len
        if budget < 1:
            raise InputError(f"generate: the prompt has {prompt_len} tokens but max_length is {max_length}; "
                             "max_length counts prompt + new tokens: raise it, or set max_new_tokens >= 1")
    if budget < 1:
        raise InputError(f"generate: the prompt has {prompt_len} tokens, which fills the context window of "
                         f"{context_window}; nothing can be generated. Shorten the prompt")
    if context_window is not None and prompt_len + budget > context_window:
        raise InputError(f"generate: max_new_tokens={budget} with a {prompt_len}-token prompt needs "
                         f"{prompt_len + budget} positions but max_position_embeddings is {context_window}; "
                         f"allowed: 1 <= max_new_tokens <= {max(context_window - prompt_len, 0)}")
    return budget
