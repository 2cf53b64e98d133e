"""The incremental detokeniser never splits a character and ends with the full decode."""

import threading

import pytest
import torch

from qwen2vl.generation.streaming import IncrementalDetokenizer, TextIteratorStreamer

TEXT = "héllo 世界 🎉"


class ByteTokenizer:
    """Token id = one UTF-8 byte; decode replaces broken sequences with U+FFFD like byte-level BPE."""

    def decode(self, ids, skip_special_tokens=False, **kwargs):
        return bytes(ids).decode("utf-8", errors="replace")


def test_pieces_are_whole_characters_and_join_to_the_text():
    detok = IncrementalDetokenizer(ByteTokenizer())
    pieces = [detok.push(b) for b in TEXT.encode("utf-8")]
    pieces.append(detok.flush())
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)
    # each non-empty piece is exactly one character here (one byte-token at a time)
    assert [p for p in pieces if p] == list(TEXT)


def test_broken_trailing_bytes_come_out_at_flush_like_the_full_decode():
    ids = list("ok".encode()) + list("界".encode())[:2]
    detok = IncrementalDetokenizer(ByteTokenizer())
    text = "".join(detok.push(i) for i in ids) + detok.flush()
    assert text == ByteTokenizer().decode(ids)


def test_real_tokenizer_stream_equals_decode():
    from support.tokenizer import tokenizer

    tok = tokenizer()
    ids = tok.encode(TEXT + " and more 😀 ünïcödé <|im_end|>")
    assert any(tok.decode([i]) == "\ufffd" for i in ids)  # 🎉 is split into byte-fragment tokens
    detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
    pieces = [detok.push([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


def test_text_iterator_streamer_threads_and_skip_prompt():
    streamer = TextIteratorStreamer(ByteTokenizer(), skip_prompt=True, timeout=10)
    prompt = torch.tensor([list(b"prompt: ")])

    def produce():
        streamer.put(prompt)
        for b in TEXT.encode("utf-8"):
            streamer.put(torch.tensor([b]))
        streamer.end()

    thread = threading.Thread(target=produce)
    thread.start()
    out = list(streamer)
    thread.join()
    assert "".join(out) == TEXT


def test_streamer_keeps_the_prompt_when_asked_and_rejects_batches():
    streamer = TextIteratorStreamer(ByteTokenizer())
    streamer.put(torch.tensor([list(b"hi ")]))
    streamer.put(torch.tensor([ord("x")]))
    streamer.end()
    assert "".join(streamer) == "hi x"
    with pytest.raises(ValueError, match="batch size 1"):
        TextIteratorStreamer(ByteTokenizer()).put(torch.zeros(2, 3, dtype=torch.long))
