"""model/qwen2vl.py: output object, logits_to_keep, derived mm_token_type_ids, inputs_embeds, bad input."""

import pytest
import torch
from support.checkpoints import build_inputs, tiny_model

from qwen2vl.errors import InputError


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=5)


@pytest.fixture(scope="module")
def inputs():
    return build_inputs([1, 2, ("image", (1, 4, 4)), 3, ("video", (2, 2, 4)), 4], seed=1)


def test_output_fields(model, inputs):
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"], output_hidden_states=True)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], 256)
    assert out.loss.ndim == 0 and out.loss.dtype == torch.float32
    assert out.past_key_values.get_seq_length() == inputs["input_ids"].shape[1]
    assert out.cache is out.past_key_values  # transformers-5 spelling
    assert len(out.hidden_states) == 3 and out.attentions is None
    assert out.rope_deltas.shape == (1, 1)
    assert out["logits"] is out.logits and "attentions" not in out  # dict of the non-None fields


def test_loss_is_shifted_mean_cross_entropy(model, inputs):
    labels = inputs["input_ids"].clone()
    labels[0, :4] = -100
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    logits, target = out.logits[0, :-1], labels[0, 1:]
    keep = target != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_logits_to_keep(model, inputs):
    with torch.no_grad():
        full = model(**inputs).logits
        last = model(**inputs, logits_to_keep=1).logits
        picked = model(**inputs, logits_to_keep=torch.tensor([0, 3])).logits
    assert last.shape[1] == 1 and torch.allclose(last, full[:, -1:], atol=1e-6)
    assert torch.allclose(picked, full[:, [0, 3]], atol=1e-6)


def test_mm_token_type_ids_derived_when_absent(model, inputs):
    without = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model(**without).logits)


def test_inputs_embeds_path_finds_placeholders_by_embedding(model, inputs):
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        by_ids = model(**inputs).logits
        out = model(inputs_embeds=embeds, **rest).logits
    assert torch.allclose(by_ids, out, atol=1e-5)


def test_too_few_placeholders(model, inputs):
    bad = dict(inputs, input_ids=inputs["input_ids"].clone())
    bad["input_ids"][0, 3] = 5  # one image placeholder replaced by text
    with pytest.raises(InputError, match="has 3 placeholder tokens .* imply 4 features"):
        model(**bad)


def test_grid_inconsistent_with_pixel_rows(model, inputs):
    with pytest.raises(InputError, match="grid_thw implies 16 patch rows but 15 were given"):
        model(**dict(inputs, pixel_values=inputs["pixel_values"][:15]))


def test_pixel_rows_of_wrong_width(model, inputs):
    with pytest.raises(InputError, match=r"shape \(16, 1000\) but rows must be 1176 wide"):
        model(**dict(inputs, pixel_values=torch.zeros(16, 1000)))


def test_labels_of_wrong_shape(model, inputs):
    with pytest.raises(InputError, match=r"labels: shape \(1, 3\) differs from input_ids shape \(1, 16\)"):
        model(**inputs, labels=torch.zeros(1, 3, dtype=torch.long))


def test_sequence_longer_than_max_positions():
    small = tiny_model(max_position_embeddings=8)
    with pytest.raises(InputError, match="0 cached \\+ 9 new tokens exceed max_position_embeddings 8"):
        small(input_ids=torch.ones(1, 9, dtype=torch.long))


def test_attentions_need_eager(model):
    with pytest.raises(InputError, match="attn_implementation='eager'"):
        model(input_ids=torch.tensor([[1, 2]]), output_attentions=True)


def test_generate_delegates_lazily(model, monkeypatch):
    import qwen2vl.generation.generate as gen

    monkeypatch.setattr(gen, "generate", lambda m, *a, **k: ("called", m, a, k))
    assert model.generate(1, x=2) == ("called", model, (1,), {"x": 2})
