"""Checkpoints we write load in transformers (and ours) with equal logits; attention weights and the
sdpa backend agree with transformers' eager path."""

import pytest
import torch
from support.checkpoints import build_inputs, checkpoint, load_hf, rel_diff, tiny_model

from qwen2vl.model.qwen2vl import Qwen2VLForConditionalGeneration

INPUTS = [1, 2, ("image", (1, 4, 6)), 3, ("video", (2, 4, 4)), 4]


@pytest.mark.parametrize("tied, shard", [(False, None), (True, "150KB")])
def test_our_save_loads_in_transformers(tmp_path, tied, shard):
    original = tiny_model(seed=7, tied=tied)
    original.save_pretrained(tmp_path, max_shard_size=shard)
    ours = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path)
    hf = load_hf(tmp_path)
    assert hf.config.tie_word_embeddings is tied
    inputs = build_inputs(INPUTS, seed=2)
    with torch.no_grad():
        a, b, c = original(**inputs).logits, ours(**inputs).logits, hf(**inputs).logits
    assert torch.equal(a, b)
    assert rel_diff(b, c) < 1e-5


def test_transformers_checkpoint_survives_our_round_trip(tmp_path):
    ours = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint("gqa_untied"))
    ours.save_pretrained(tmp_path)
    hf_direct, hf_round = load_hf(checkpoint("gqa_untied")), load_hf(tmp_path)
    inputs = build_inputs(INPUTS, seed=3)
    with torch.no_grad():
        assert torch.equal(hf_direct(**inputs).logits, hf_round(**inputs).logits)


def test_eager_attention_weights_match_transformers():
    folder = checkpoint("gqa_untied")
    ours = Qwen2VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager")
    hf = load_hf(folder, attn="eager")
    inputs = build_inputs([1, 2, ("image", (1, 4, 4)), 3], seed=4)
    with torch.no_grad():
        got = ours(**inputs, output_attentions=True).attentions
        expected = hf(**inputs, output_attentions=True).attentions
    assert len(got) == len(expected) == 2
    for mine, theirs in zip(got, expected):
        assert mine.shape == theirs.shape and (mine - theirs).abs().max() < 1e-6


@pytest.mark.parametrize("name", ["gqa_untied", "mha_tied"])
def test_sdpa_backend_matches_transformers_eager(name):
    folder = checkpoint(name)
    ours = Qwen2VLForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa")
    hf = load_hf(folder, attn="eager")
    inputs = build_inputs(INPUTS, seed=5)
    with torch.no_grad():
        assert rel_diff(ours(**inputs).logits, hf(**inputs).logits) < 1e-5
