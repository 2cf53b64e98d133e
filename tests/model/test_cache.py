"""model/cache.py: cached decoding equals the uncached forward; StaticCache slots, validity, no realloc."""

import pytest
import torch
from support.checkpoints import build_inputs, left_pad_batch, rel_diff, tiny_model

from qwen2vl.errors import InputError
from qwen2vl.model.cache import DynamicCache, StaticCache


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def batch():
    return left_pad_batch([build_inputs([3, 4, ("image", (1, 4, 6)), 5, 6], seed=1), build_inputs([7, 8, 9], seed=2)])


NEW = torch.tensor([[11, 12, 13], [14, 15, 16]])


def _full_logits(model, batch):
    ids = torch.cat([batch["input_ids"], NEW], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(NEW)], 1)
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **extra).logits[:, -3:]


def _decode(model, batch, cache, full_mask=True):
    with torch.no_grad():
        model(**batch, past_key_values=cache, use_cache=True, logits_to_keep=1)
        mask, steps = batch["attention_mask"], []
        for i in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            out = model(input_ids=NEW[:, i:i + 1], attention_mask=mask if full_mask else None,
                        past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    return torch.cat(steps, 1)


@pytest.mark.parametrize("kind", ["dynamic", "static", "dynamic_nomask", "static_nomask"])
def test_cached_decode_equals_full_forward(model, batch, kind):
    cache = DynamicCache() if kind.startswith("dynamic") else StaticCache(model.config, 2, 32)
    got = _decode(model, batch, cache, full_mask=not kind.endswith("nomask"))
    assert rel_diff(got, _full_logits(model, batch)) < 1e-5
    assert cache.rope_deltas.tolist() == [[-3], [0]]  # per-row deltas live on the cache
    assert not hasattr(model.model, "rope_deltas")


def test_dynamic_cache_lengths(model, batch):
    cache = DynamicCache()
    assert cache.get_seq_length() == 0 and cache.rope_deltas is None
    with torch.no_grad():
        out = model(**batch, use_cache=True, past_key_values=cache)
    assert out.past_key_values is cache
    assert cache.get_seq_length() == batch["input_ids"].shape[1]
    assert cache.real_lengths().tolist() == batch["attention_mask"].sum(1).tolist()


def test_static_cache_is_allocated_once(model, batch):
    cache = StaticCache(model.config, batch_size=2, max_cache_len=32, dtype=torch.float32)
    assert cache.key_cache[0].shape == (2, 2, 32, 16)
    pointers = [t.data_ptr() for t in cache.key_cache + cache.value_cache]
    _decode(model, batch, cache)
    assert [t.data_ptr() for t in cache.key_cache + cache.value_cache] == pointers
    length = batch["input_ids"].shape[1] + 3
    assert cache.lengths.tolist() == [length, length] and cache.get_seq_length() == length
    assert cache.valid.sum(1).tolist() == (batch["attention_mask"].sum(1) + 3).tolist()


def test_static_cache_slots_and_mask():
    cache = StaticCache(tiny_model().config, batch_size=2, max_cache_len=6)
    mask, slots = cache.begin(3, torch.tensor([[0, 1, 1], [1, 1, 1]]), torch.device("cpu"), 2)
    assert slots.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert cache.valid.tolist() == [[False, True, True, False, False, False], [True, True, True, False, False, False]]
    # keys are the filled slots 0..2 only; row 0, query slot 2 sees slots 1..2; the pad query sees itself
    assert mask[0, 0, 2].tolist() == [False, True, True]
    assert mask[0, 0, 0].tolist() == [True, False, False]
    cache.end(3)
    cache.reset_rows([1])  # continuous batching: row 1 restarts while row 0 continues
    assert cache.lengths.tolist() == [3, 0]
    mask, slots = cache.begin(1, None, torch.device("cpu"), 2)
    assert slots.tolist() == [[3], [0]]
    assert mask[1, 0, 0].tolist() == [True, False, False, False]
    assert mask[0, 0, 0].tolist() == [False, True, True, True]


def test_static_cache_aligned_rows_attend_over_filled_slots_without_a_mask():
    """Rows at one length with no padding: no mask (plain causal), and update() hands back only the
    filled slots, so the attention call is the one a growing cache (transformers') makes."""
    cache = StaticCache(tiny_model().config, batch_size=2, max_cache_len=8)
    mask, _ = cache.begin(3, None, torch.device("cpu"), 2)
    assert mask is None
    k = torch.randn(2, cache.key_cache[0].shape[1], 3, cache.key_cache[0].shape[3])
    keys, values = cache.update(k, k + 1, 0)
    assert keys.shape[2] == 3 and torch.equal(keys, k) and torch.equal(values, k + 1)
    assert keys.data_ptr() == cache.key_cache[0].data_ptr()  # a view: nothing copied
    cache.end(3)
    mask, slots = cache.begin(1, None, torch.device("cpu"), 2)
    assert mask is None and slots.tolist() == [[3], [3]]
    assert cache.update(k[:, :, :1], k[:, :, :1], 0)[0].shape[2] == 4


def test_static_cache_overflow_and_batch_mismatch(model):
    cache = StaticCache(model.config, batch_size=1, max_cache_len=4)
    with pytest.raises(InputError, match="5 slots needed but max_cache_len is 4"):
        model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]), past_key_values=cache)
    with pytest.raises(InputError, match="batch has 2 rows but the cache was built for 1"):
        model(input_ids=torch.tensor([[1], [2]]), past_key_values=cache)


def test_dynamic_cache_rejects_a_mask_of_the_wrong_width(model):
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=cache)
        with pytest.raises(InputError, match="pass a mask of 5 columns"):
            model(input_ids=torch.tensor([[4, 5]]), attention_mask=torch.ones(1, 3), past_key_values=cache)


def test_static_cache_select_rows_keeps_decoding_the_kept_row(model, batch):
    """Dropping row 0 after the prefill: row 1 decodes exactly as in the full batch, on the same buffers."""
    expected = _full_logits(model, batch)[1:]
    cache = StaticCache(model.config, batch_size=2, max_cache_len=32)
    pointers = [t.data_ptr() for t in cache.key_cache]
    with torch.no_grad():
        model(**batch, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.select_rows(torch.tensor([1]))
        assert cache.batch_size == 1 and cache.rope_deltas.tolist() == [[0]]
        mask, steps = batch["attention_mask"][1:], []
        for i in range(3):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
            steps.append(model(input_ids=NEW[1:, i:i + 1], attention_mask=mask, past_key_values=cache,
                               use_cache=True).logits)
    assert rel_diff(torch.cat(steps, 1), expected) < 1e-5
    assert [t.data_ptr() for t in cache.key_cache] == pointers  # views of the original allocation
