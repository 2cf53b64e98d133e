"""Stop strings end the same rows at the same step as transformers' StopStringCriteria."""

import pytest
import torch
from transformers import AutoTokenizer

from generation.oracle_models import batch_inputs, models, prompt_ids, tokenizer
from support.tokenizer import tokenizer_dir

PROMPTS = ("Say hi", "Tell me a story", "Another one")


@pytest.fixture(scope="module")
def setup():
    reference, ours = models()
    inputs = batch_inputs([prompt_ids([{"role": "user", "content": t}], []) for t in PROMPTS], [])
    width = inputs["input_ids"].shape[1]
    free = ours.generate(**inputs, max_new_tokens=20, min_new_tokens=20, do_sample=False)[:, width:]
    return reference, ours, inputs, free


def _compare(setup, stops):
    reference, ours, inputs, _ = setup
    kwargs = {"max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False, "stop_strings": stops,
              "pad_token_id": 0}
    expected = reference.generate(**inputs, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir()), **kwargs)
    got = ours.generate(**inputs, tokenizer=tokenizer(), **kwargs)
    assert torch.equal(got, expected)
    return got[:, inputs["input_ids"].shape[1]:]


def test_stop_strings_at_token_ends_stop_their_rows_only(setup):
    free, tok = setup[3], tokenizer()
    stop_a = tok.decode(free[0, :5].tolist())[-3:]  # ends exactly with row 0's 5th token
    stop_b = tok.decode(free[2, :9].tolist())[-2:]
    new = _compare(setup, [stop_a, stop_b])
    assert (new == 0).any(dim=1).tolist().count(True) >= 1  # at least one row stopped early and was padded


def test_stop_string_inside_the_last_token_also_stops(setup):
    # the 7th token runs past the stop string (an "overhang"): transformers still stops there
    free, tok = setup[3], tokenizer()
    before, upto = tok.decode(free[1, :6].tolist()), tok.decode(free[1, :7].tolist())
    last = upto[len(before):]
    assert len(last) >= 2, "pick a prompt whose 7th token has at least two characters"
    stop = upto[len(before) - 1:len(before) + 1]  # straddles tokens 6 and 7 and leaves an overhang
    new = _compare(setup, [stop])
    assert (new[1, 7:] == 0).all() and not (new[1, :7] == 0).any()
