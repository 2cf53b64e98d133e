"""Qwen2Tokenizer API: ids from first principles (reference-notes §7.1), padding, tensors, save/load, errors."""

import json

import numpy as np
import pytest
import torch
from support.tokenizer import tokenizer, tokenizer_dir

from qwen2vl.errors import CheckpointError, InputError
from qwen2vl.processing.tokenizer import AutoTokenizer, BatchFeature, Qwen2Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def test_known_ids():
    tok = tokenizer()
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]


def test_special_tokens_and_sizes():
    tok = tokenizer()
    assert tok.convert_tokens_to_ids(SPECIALS) == list(range(151643, 151657))
    assert tok.convert_ids_to_tokens(151655) == "<|image_pad|>"
    assert len(tok) == 151657 and tok.vocab_size == 151643
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 151645,
                                                                                  "<|endoftext|>", 151643)
    assert tok.bos_token is None and tok.bos_token_id is None
    assert sorted(tok.all_special_ids) == list(range(151643, 151657))
    assert tok.convert_tokens_to_ids("not-a-token") is None


def test_special_tokens_written_in_text_are_matched():
    assert tokenizer().encode("<|vision_start|><|image_pad|><|vision_end|>") == [151652, 151655, 151653]


def test_convert_ids_to_tokens_byte_level_and_skip():
    tok = tokenizer()
    assert tok.convert_ids_to_tokens([9707, 1879, 151645]) == ["Hello", "\u0120world", "<|im_end|>"]
    assert tok.convert_ids_to_tokens([9707, 151645], skip_special_tokens=True) == ["Hello"]


def test_padding_is_left_with_endoftext_by_default():
    out = tokenizer()(["Hello, world!", "Hi"], padding=True)
    assert out["input_ids"][1][:2] == [151643, 151643] and out["attention_mask"][1] == [0, 0, 0, 1]  # "Hi" is one token
    right = tokenizer()(["Hello, world!", "Hi"], padding=True, padding_side="right")
    assert right["attention_mask"][1] == [1, 0, 0, 0]


def test_truncation_only_when_asked():
    text = "one two three four five six"
    assert len(tokenizer()(text, max_length=2)["input_ids"]) == 6
    assert len(tokenizer()(text, max_length=2, truncation=True)["input_ids"]) == 2


def test_return_tensors_types():
    pt = tokenizer()(["a b", "c"], padding=True, return_tensors="pt")
    assert isinstance(pt, BatchFeature) and pt.input_ids.dtype == torch.int64 and pt.input_ids.shape == (2, 2)
    assert isinstance(tokenizer()("a", return_tensors="np")["input_ids"], np.ndarray)
    assert tokenizer()("a b", return_tensors="pt")["input_ids"].shape == (1, 2)
    with pytest.raises(InputError, match="padding=True"):
        tokenizer()(["a b", "c"], return_tensors="pt")
    with pytest.raises(InputError, match="'tf'"):
        tokenizer()("a", return_tensors="tf")


def test_decode_forms_and_flags():
    tok = tokenizer()
    ids = [151644, 9707, 11, 1879, 0, 151645]
    assert tok.decode(ids) == "<|im_start|>Hello, world!<|im_end|>"
    assert tok.decode(torch.tensor(ids), skip_special_tokens=True) == "Hello, world!"
    assert tok.decode(9707) == "Hello"
    assert tok.batch_decode(torch.tensor([ids, ids]), skip_special_tokens=True) == ["Hello, world!"] * 2
    assert tok.decode([[9707], [1879]]) == ["Hello", " world"]
    assert tok.decode([151900]) == ""  # embedding padding rows have no token


def test_batch_feature_to_casts_only_floating_tensors():
    feats = BatchFeature(input_ids=torch.ones(1, 2, dtype=torch.long), pixel_values=torch.ones(2, 3), n=3)
    feats.to(torch.float16)
    assert feats.input_ids.dtype == torch.int64 and feats.pixel_values.dtype == torch.float16 and feats.n == 3
    assert feats.to("cpu").pixel_values.device.type == "cpu" and feats.pixel_values is feats["pixel_values"]
    with pytest.raises(AttributeError):
        feats.missing


def test_save_and_reload_round_trip(tmp_path):
    tok = tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(again, Qwen2Tokenizer)
    assert again.encode("Zürich 你好 <|im_end|>") == tok.encode("Zürich 你好 <|im_end|>")
    assert (again.eos_token_id, again.pad_token_id, again.padding_side) == (151645, 151643, "left")
    assert again.chat_template == tok.chat_template


def test_template_sources_and_overrides(tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tokenizer_dir() / name).read_bytes())
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}!"}))
    tok = Qwen2Tokenizer.from_pretrained(tmp_path, padding_side="right")
    assert tok.padding_side == "right"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "x!"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="[{{ 1 }}]",
                                   tokenize=False) == "[1]"


def test_apply_chat_template_tokenizes_by_default():
    ids = tokenizer().apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert ids[0] == 151644 and ids[-3:] == tokenizer().encode("<|im_start|>assistant\n")


def test_missing_files_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        Qwen2Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        Qwen2Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(InputError, match=r"text\[1\]"):
        tokenizer()(["a", 3])


def test_padding_and_truncation_stored_in_tokenizer_json_are_ignored(tmp_path):
    doc = json.loads((tokenizer_dir() / "tokenizer.json").read_text())
    doc["padding"] = {"strategy": {"Fixed": 16}, "direction": "Left", "pad_to_multiple_of": None, "pad_id": 151643,
                      "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    doc["truncation"] = {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    tok = Qwen2Tokenizer.from_pretrained(tmp_path)
    assert tok(["Hello, world!", "Hi"])["input_ids"] == [[9707, 11, 1879, 0], [13048]]
