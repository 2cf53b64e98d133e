"""generate(): argument checks, stop strings per row, streaming equals the plain call, one cache per call."""

import threading

import pytest
import torch

from generation.oracle_models import IM_END, batch_inputs, models, prompt_ids, tokenizer, user
from qwen2vl.errors import ConfigError, InputError
from qwen2vl.generation import generate as G
from qwen2vl.generation.streaming import TextIteratorStreamer


def _ours():
    return models()[1]


def _text_inputs(*texts):
    rows = [prompt_ids([{"role": "user", "content": t}], []) for t in texts]
    return batch_inputs(rows, [])


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"max_new_tokens": 0}, ConfigError, r"max_new_tokens=0 .*>= 1"),
    ({"max_new_tokens": 10_000}, InputError, r"max_new_tokens=10000 .*max_position_embeddings is 512"),
    ({"temperature": -1.0, "do_sample": True}, ConfigError, r"temperature=-1.0 .*>= 0"),
    ({"top_p": 0.0}, ConfigError, r"top_p=0.0 .*0 < top_p <= 1"),
    ({"top_p": 1.5}, ConfigError, r"top_p=1.5"),
    ({"top_k": -2}, ConfigError, r"top_k=-2 .*>= 0"),
    ({"min_p": 1.5}, ConfigError, r"min_p=1.5 .*0 <= min_p <= 1"),
    ({"repetition_penalty": 0.0}, ConfigError, r"repetition_penalty=0.0 .*> 0"),
    ({"eos_token_id": [-1]}, ConfigError, r"eos_token_id"),
    ({"eos_token_id": []}, ConfigError, r"eos_token_id"),
    ({"pad_token_id": -1}, ConfigError, r"pad_token_id"),
    ({"stop_strings": ["x"]}, InputError, r"stop_strings need the tokenizer"),
    ({"stop_strings": "x", "eos_token_id": None, "pad_token_id": None, "tokenizer": "tok"}, InputError,
     r"pad_token_id"),
    ({"num_return_sequences": 2, "do_sample": False}, ConfigError, r"num_return_sequences=2 needs do_sample"),
    ({"num_beams": 4}, ConfigError, r"num_beams=4 is not supported"),
    ({"max_tokens": 5}, InputError, r"unknown argument\(s\) \['max_tokens'\]"),
    ({"stopping_criteria": [lambda ids, scores: True]}, InputError, r"\['stopping_criteria'\] are not supported"),
    ({"seed": 1, "generator": torch.Generator(), "do_sample": True}, InputError, r"seed"),
])
def test_bad_arguments_name_the_argument_and_range(kwargs, error, pattern):
    ours = _ours()
    if kwargs.get("tokenizer") == "tok":
        kwargs = {**kwargs, "tokenizer": tokenizer()}
    with pytest.raises(error, match=pattern):
        ours.generate(**_text_inputs("hi"), **kwargs)


def test_missing_or_malformed_inputs():
    ours = _ours()
    with pytest.raises(InputError, match="neither input_ids nor inputs_embeds"):
        ours.generate(attention_mask=torch.ones(1, 3, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(InputError, match=r"input_ids: expected integer ids of shape \(B, L\)"):
        ours.generate(input_ids=torch.tensor([1, 2, 3]), max_new_tokens=2)
    with pytest.raises(InputError, match="attention_mask: shape"):
        ours.generate(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 2), max_new_tokens=2)
    with pytest.raises(InputError, match="past_key_values / position_ids"):
        ours.generate(input_ids=torch.tensor([[1, 2, 3]]), position_ids=torch.zeros(3, 1, 3), max_new_tokens=2)


def test_pad_equal_to_an_eos_id_is_allowed():
    # the hub Instruct files set pad 151643, which is also the second eos id: not a conflict
    out = _ours().generate(**_text_inputs("hi", "a longer prompt here"), max_new_tokens=4,
                           eos_token_id=[IM_END, 151643], pad_token_id=151643)
    assert out.shape[0] == 2


def test_a_stop_string_ends_only_its_own_row():
    ours, tok = _ours(), tokenizer()
    inputs = _text_inputs("Say hi", "Tell me a story")
    width = inputs["input_ids"].shape[1]
    free = ours.generate(**inputs, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    # row 0's text up to its 5th new token ends with this string; row 1 never produces it
    stop = tok.decode(free[0, width:width + 5].tolist())[-4:]
    assert stop not in tok.decode(free[1, width:].tolist())
    out = ours.generate(**inputs, max_new_tokens=20, min_new_tokens=20, do_sample=False, stop_strings=[stop],
                        tokenizer=tok, pad_token_id=0)
    assert tok.decode(out[0, width:width + 5].tolist()).endswith(stop)
    assert torch.equal(out[0, width:width + 5], free[0, width:width + 5])
    assert (out[0, width + 5:] == 0).all()  # finished row padded
    assert torch.equal(out[1], free[1])  # the other row ran on unchanged


def test_stream_generate_yields_the_text_of_the_plain_call():
    ours, tok = _ours(), tokenizer()
    inputs = _text_inputs("Write something")
    kwargs = {"max_new_tokens": 40, "min_new_tokens": 40, "do_sample": False}
    ids = ours.generate(**inputs, **kwargs)[0, inputs["input_ids"].shape[1]:].tolist()
    text = tok.decode(ids, skip_special_tokens=True)
    assert any(ord(ch) > 0x7F for ch in text)  # multi-byte characters are in play
    pieces = list(G.stream_generate(ours, **inputs, tokenizer=tok, **kwargs))
    assert "".join(pieces) == text and len(pieces) > 5
    assert all("\ufffd" not in p for p in pieces)
    steps = list(G.stream_generate(ours, **inputs, **kwargs))  # no tokenizer: ids per step
    assert [int(s[0]) for s in steps] == ids


def test_text_iterator_streamer_in_a_thread_matches_the_plain_call():
    ours, tok = _ours(), tokenizer()
    inputs = _text_inputs("Write something else")
    kwargs = {"max_new_tokens": 32, "min_new_tokens": 32, "do_sample": False}
    out = ours.generate(**inputs, **kwargs)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=60, skip_special_tokens=True)
    worker = threading.Thread(target=ours.generate, kwargs={**inputs, **kwargs, "streamer": streamer})
    worker.start()
    text = "".join(streamer)
    worker.join()
    assert text == tok.decode(out[0, inputs["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)


def test_one_static_cache_per_call_sized_for_the_final_length(monkeypatch):
    made, storages = [], set()

    class Counting(G.StaticCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def update(self, key, value, layer_idx):
            storages.add(self.key_cache[layer_idx].untyped_storage().data_ptr())
            return super().update(key, value, layer_idx)

    monkeypatch.setattr(G, "StaticCache", Counting)
    inputs = _text_inputs("a", "bb bb", "ccc ccc ccc")
    ours = _ours()
    free = ours.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=[IM_END])
    width = inputs["input_ids"].shape[1]
    eos = int(free[1, width + 3])  # row 1 finishes early, so the batch is compacted mid-call
    out = ours.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=[eos])
    assert len(made) == 2 and made[-1].max_cache_len == width + 12
    # 2 calls x one key buffer per layer: no buffer was reallocated while decoding (compaction included)
    assert len(storages) == 2 * ours.config.text_config.num_hidden_layers
    assert made[-1].batch_size < 3  # finished rows were dropped from the running batch
    assert out.shape[1] <= width + 12


def test_return_dict_in_generate_with_scores_matches_transformers():
    reference, ours = models()
    grids = [("image", (1, 4, 4))]
    inputs = batch_inputs([prompt_ids([user("image")], grids), prompt_ids([{"role": "user", "content": "x"}], [])],
                          grids)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "return_dict_in_generate": True, "output_scores": True,
              "output_logits": True, "repetition_penalty": 1.2}
    free = reference.generate(**inputs, **kwargs).sequences[:, inputs["input_ids"].shape[1]:]
    kwargs.update(eos_token_id=[int(free[0, 2])], pad_token_id=0)  # row 0 finishes at step 3, row 1 runs on
    expected, got = reference.generate(**inputs, **kwargs), ours.generate(**inputs, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert (got.sequences[0, -5:] == 0).all()
    assert len(got.scores) == len(expected.scores)
    for a, b in zip(got.scores + got.logits, expected.scores + expected.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_bf16_model_generates_from_fp32_upcast_scores():
    from generation.oracle_models import checkpoint
    from qwen2vl.model.qwen2vl import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint(), dtype=torch.bfloat16)
    inputs = _text_inputs("hi there")
    out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                         return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape == (1, inputs["input_ids"].shape[1] + 6)
    assert all(s.dtype == torch.float32 for s in out.scores)
    # greedy picks the argmax of the fp32-upcast scores at every step
    new = out.sequences[0, inputs["input_ids"].shape[1]:]
    assert [int(s.argmax()) for s in out.scores] == new.tolist()
