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
    """Per-row check that the generated text ends with one of the stop strings.

    Each check decodes only a short tail window of the row's generated ids (enough tokens to hold
    the longest stop string: every token carries at least one byte, a character at most four), so
    the cost per step does not grow with the prompt or the output. The match is on the generated
    text only (a stop string that starts inside the prompt is not seen; transformers also looks
    into the prompt's last tokens).
    """

    def __init__(self, stop_strings: str | Sequence[str], decode: DecodeFn):
        self.stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        self.decode = decode
        longest = max(len(s.encode("utf-8")) for s in self.stop_strings)
        self.window = longest + 1  # +1: the window may start inside a multi-byte character

    def matches(self, generated: Sequence[int]) -> bool:
        """True when decode(generated) ends with a stop string (checked on the tail window)."""
        tail = self.decode(list(generated[-self.window:]))
        return any(tail.endswith(s) for s in self.stop_strings)


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
