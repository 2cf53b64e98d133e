"""Text streaming: an incremental detokeniser that only emits whole characters, and TextIteratorStreamer.

The tokenizer is duck-typed (anything with `.decode(ids, **kwargs)`); nothing here imports processing.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"  # what a byte-level decode yields for an unfinished UTF-8 sequence


class Decoder(Protocol):
    def decode(self, token_ids: list[int], **kwargs: Any) -> str: ...


def _as_id_list(value: torch.Tensor | Iterable[int] | int) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError(f"streamer: got a batch of {value.shape[0]} rows; streaming supports batch size 1")
            value = value[0]
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces that never split a character.

    Keeps two offsets into the ids (the vLLM scheme): `prefix` marks where the text last stood on
    a character boundary and `read` marks what has been emitted. Each push decodes only ids[prefix:],
    so the cost per token stays bounded. A piece is held back while the decoded text ends with
    U+FFFD (the bytes of a character are still arriving). `flush` decodes everything once and
    emits what is left, so the pieces joined equal tokenizer.decode(all ids, **decode_kwargs).
    """

    def __init__(self, tokenizer: Decoder, **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.decode_kwargs = decode_kwargs
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **self.decode_kwargs)

    def push(self, token_ids: torch.Tensor | Iterable[int] | int) -> str:
        """Add ids; return the new whole-character text ("" while a character is incomplete)."""
        self.ids.extend(_as_id_list(token_ids))
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT_CHAR) or not after.startswith(before):
            return ""
        piece = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece

    def flush(self) -> str:
        """The text not yet emitted (the whole decode's tail; may end in U+FFFD for truly broken bytes)."""
        final = self._decode(self.ids)
        if final.startswith(self.text):
            piece = final[len(self.text):]
        else:  # a tokenizer whose decode is not prefix-stable (e.g. clean-up rules); cannot un-emit
            logger.warning("streamer: decoded text changed after it was emitted; the streamed text may differ")
            piece = self._decode(self.ids[self._prefix:])[len(self._decode(self.ids[self._prefix:self._read])):]
        self.text += piece
        self._prefix = self._read = len(self.ids)
        return piece


class TextIteratorStreamer:
    """Iterator of text pieces, fed by generate() through put()/end() (transformers' streamer protocol).

    Run generate in a thread and iterate in the caller's thread:
    `Thread(target=model.generate, kwargs={**inputs, "streamer": s}).start(); text = "".join(s)`.
    Pieces are whole characters only; their concatenation equals the non-streaming decode of the
    same ids (with the same decode kwargs, e.g. skip_special_tokens=True). Batch size 1 only.
    """

    def __init__(self, tokenizer: Decoder, skip_prompt: bool = False, timeout: float | None = None,
                 **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.timeout = timeout
        self.decode_kwargs = decode_kwargs
        self.text_queue: queue.Queue = queue.Queue()
        self.stop_signal = None
        self._detok = IncrementalDetokenizer(tokenizer, **decode_kwargs)
        self._next_is_prompt = True

    def put(self, value: torch.Tensor | Iterable[int] | int) -> None:
        """Receive ids: the first call carries the prompt (dropped if skip_prompt), later ones new tokens."""
        ids = _as_id_list(value)
        if self.skip_prompt and self._next_is_prompt:
            self._next_is_prompt = False
            return
        self._next_is_prompt = False
        piece = self._detok.push(ids)
        if piece:
            self.on_finalized_text(piece)

    def end(self) -> None:
        """Flush the remaining text and close the iterator."""
        piece = self._detok.flush()
        self.on_finalized_text(piece, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)  # raises queue.Empty after `timeout` seconds
        if value is self.stop_signal:
            raise StopIteration()
        return value
