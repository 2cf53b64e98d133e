"""eos detection, stop strings on a tail window, and transformers' length rules."""

import pytest
import torch

from qwen2vl.errors import InputError
from qwen2vl.generation.stopping import StopStringMatcher, eos_hit, new_token_budget


def _bytes_decode(ids):
    """A byte-level 'tokenizer': token id = one byte (what BPE decoding reduces to)."""
    return bytes(ids).decode("utf-8", errors="replace")


def _ids(text):
    return list(text.encode("utf-8"))


def test_eos_hit_with_several_ids_and_none():
    tokens = torch.tensor([5, 7, 9])
    assert eos_hit(tokens, torch.tensor([7, 9])).tolist() == [False, True, True]
    assert eos_hit(tokens, None).tolist() == [False, False, False]


@pytest.mark.parametrize("stop", ["END", "世界", "🎉", "\n\n"])
def test_stop_string_found_only_when_the_text_ends_with_it(stop):
    matcher = StopStringMatcher([stop, "never-there"], _bytes_decode)
    text = "héllo " + stop
    ids = _ids(text)
    hits = [matcher.matches(ids[:i]) for i in range(1, len(ids) + 1)]
    assert hits[-1] is True
    assert not any(hits[:-1])


class WordTokenizer:
    """Token id = index into a list of strings; decode concatenates them."""

    def __init__(self, vocab):
        self.vocab = vocab

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


@pytest.mark.parametrize("tokens, hit", [
    # transformers' StopStringCriteria examples for "stop": the match must overlap the last token
    (["st", "op"], True), (["stop"], True), (["st", "opera"], True), (["sto", "pper"], True),
    (["las", "topper"], True), (["s", "to", "pped"], True),
    (["stop", "at"], False), (["st", "op", "at"], False), (["st", "opera", "tion"], False),
])
def test_stop_string_must_overlap_the_newest_token(tokens, hit):
    vocab = sorted(set(tokens))
    matcher = StopStringMatcher("stop", WordTokenizer(vocab).decode)
    assert matcher.matches([vocab.index(t) for t in tokens]) is hit


def test_stop_string_seen_after_a_long_generation():
    matcher = StopStringMatcher("stop", _bytes_decode)
    ids = _ids("x" * 5000 + "stop")
    assert matcher.matches(ids) and not matcher.matches(ids[:-1])


def test_budget_follows_transformers_rules():
    # explicit max_new_tokens wins
    assert new_token_budget(7, 100, prompt_len=10, context_window=1000, has_default_max_length=False) == 7
    # nothing set: 20 new tokens, clipped to the context window
    assert new_token_budget(None, 20, prompt_len=10, context_window=1000, has_default_max_length=True) == 20
    assert new_token_budget(None, 20, prompt_len=990, context_window=1000, has_default_max_length=True) == 10
    # an explicit max_length counts prompt + new tokens
    assert new_token_budget(None, 30, prompt_len=10, context_window=1000, has_default_max_length=False) == 20


def test_budget_errors_name_the_argument_and_range():
    with pytest.raises(InputError, match=r"max_new_tokens=50 .*max_position_embeddings is 40.*<= 30"):
        new_token_budget(50, None, prompt_len=10, context_window=40, has_default_max_length=False)
    with pytest.raises(InputError, match="max_length"):
        new_token_budget(None, 10, prompt_len=10, context_window=40, has_default_max_length=False)
    with pytest.raises(InputError, match="context window"):
        new_token_budget(None, 20, prompt_len=40, context_window=40, has_default_max_length=True)
