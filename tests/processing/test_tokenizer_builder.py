"""tokenizer_builder: byte map, merge derivation from ranks (first principles), files it writes."""

import base64
import json

import pytest

from qwen2vl.errors import CheckpointError
from qwen2vl.processing import tokenizer_builder as tb
from qwen2vl.processing.tokenizer import Qwen2Tokenizer


def test_bytes_to_unicode_is_gpt2s_bijection():
    table = tb.bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord("!")] == "!"
    assert table[ord(" ")] == "\u0120" and table[ord("\n")] == "\u010a"  # 'Ġ', 'Ċ'
    assert all(not ch.isspace() for ch in table.values())


def test_merge_is_the_last_step_of_bpe_below_the_tokens_rank():
    # 'bc' (rank 3) is merged before 'ab' (rank 4), so 'abc' is built as a + bc, not ab + c
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"bc": 3, b"ab": 4, b"abc": 5}
    assert tb.derive_merges(ranks) == [(b"b", b"c"), (b"a", b"b"), (b"a", b"bc")]
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5}
    assert tb.derive_merges(ranks)[-1] == (b"ab", b"c")


def test_unbuildable_token_is_reported():
    with pytest.raises(CheckpointError, match="rank 3"):
        tb.derive_merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})


def write_toy_ranks(path, extra):
    table = [bytes([b]) for b in range(256)] + extra
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(table)))


def test_toy_ranks_build_a_working_tokenizer(tmp_path):
    ranks_file = tmp_path / "toy.tiktoken"
    write_toy_ranks(ranks_file, [b"he", b"ll", b"llo", b"hello", b" w"])
    out = tb.write_tokenizer_files(tmp_path / "tok", tiktoken_path=ranks_file)
    doc = json.loads((out / "tokenizer.json").read_text())
    assert doc["model"]["merges"] == ["h e", "l l", "ll o", "he llo", "Ġ w"]
    assert doc["normalizer"] == {"type": "NFC"}
    assert doc["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == tb.PRETOKENIZE_PATTERN
    tok = Qwen2Tokenizer.from_pretrained(out)
    assert tok.encode("hello wo") == [256 + 3, 256 + 4, ord("o")]
    # specials follow the ranked tokens (at 151643.. for the real table): 261 ranked + 12
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 273 and len(tok) == 261 + 14


def test_written_config_and_template(tmp_path):
    from support.tokenizer import tokenizer_dir

    folder = tokenizer_dir()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert (config["eos_token"], config["pad_token"], config["bos_token"]) == ("<|im_end|>", "<|endoftext|>", None)
    assert config["padding_side"] == "left" and config["model_max_length"] == 32768
    ids = {int(k): v["content"] for k, v in config["added_tokens_decoder"].items()}
    assert ids[151643] == "<|endoftext|>" and ids[151656] == "<|video_pad|>" and len(ids) == 14
    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    assert template == config["chat_template"]
