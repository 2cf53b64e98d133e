"""Our logits processing equals transformers' logits processors on the same logits; seeded RNG repeats."""

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen2vl.errors import InputError
from qwen2vl.generation import sampling as S

V = 40


def _logits(seed=0, batch=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, V, generator=g) * 3
    x[:, 5] = x[:, 6]  # a tie, so boundary handling is exercised
    return x


def _ids(batch=3, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (batch, length), generator=g)


def _reference(processors, ids, logits):
    return LogitsProcessorList(processors)(ids, logits.clone())


@pytest.mark.parametrize("k", [1, 3, 7, V + 5])
def test_top_k_matches_reference(k):
    x = _logits()
    assert torch.equal(S.apply_top_k(x, k), _reference([TopKLogitsWarper(k)], _ids(), x))


@pytest.mark.parametrize("p", [0.001, 0.3, 0.9, 1.0])
def test_top_p_matches_reference(p):
    x = _logits(2)
    assert torch.equal(S.apply_top_p(x, p), _reference([TopPLogitsWarper(p)], _ids(), x))


@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 1.0])
def test_min_p_matches_reference(p):
    x = _logits(3)
    assert torch.equal(S.apply_min_p(x, p), _reference([MinPLogitsWarper(p)], _ids(), x))


@pytest.mark.parametrize("t", [0.1, 0.7, 1.5])
def test_temperature_matches_reference(t):
    x = _logits(4)
    assert torch.equal(S.apply_temperature(x, t), _reference([TemperatureLogitsWarper(t)], _ids(), x))


def test_min_tokens_to_keep_matches_reference():
    x = _logits(5)
    assert torch.equal(S.apply_top_k(x, 1, 3), _reference([TopKLogitsWarper(1, min_tokens_to_keep=3)], _ids(), x))
    assert torch.equal(S.apply_top_p(x, 0.01, 3), _reference([TopPLogitsWarper(0.01, min_tokens_to_keep=3)], _ids(), x))
    assert torch.equal(S.apply_min_p(x, 0.9, 4), _reference([MinPLogitsWarper(0.9, min_tokens_to_keep=4)], _ids(), x))


@pytest.mark.parametrize("penalty", [0.5, 1.05, 2.0])
def test_repetition_penalty_matches_reference_and_skips_left_pads(penalty):
    x, ids = _logits(6), _ids()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 is left-padded by 4
    mask[2, :1] = 0
    pads = (mask != 0).int().argmax(dim=1)
    expected = _reference([RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=pads)], ids, x)
    seen = S.seen_token_mask(ids, mask, V)
    assert torch.equal(S.apply_repetition_penalty(x, seen, penalty), expected)
    # from first principles: a pad-only id in row 1 is not penalised
    only_in_pads = set(ids[1, :4].tolist()) - set(ids[1, 4:].tolist())
    for tok in only_in_pads:
        assert not seen[1, tok]


def test_running_seen_mask_equals_rescanning_the_sequence():
    ids = _ids()
    seen = S.seen_token_mask(ids, None, V)
    new = torch.tensor([3, 39, 0])
    S.mark_seen(seen, new)
    assert torch.equal(seen, S.seen_token_mask(torch.cat([ids, new[:, None]], 1), None, V))


def test_ids_past_the_vocabulary_are_ignored():
    ids = torch.tensor([[1, V + 3, 2]])
    seen = S.seen_token_mask(ids, None, V)
    assert seen.shape == (1, V) and seen[0].nonzero().flatten().tolist() == [1, 2]


@pytest.mark.parametrize("do_sample", [False, True])
def test_full_chain_matches_reference_order(do_sample):
    x, ids = _logits(7), _ids()
    eos = torch.tensor([2, 9])
    params = S.SamplingParams(do_sample=do_sample, temperature=0.7, top_k=10, top_p=0.8, min_p=0.05,
                              repetition_penalty=1.3)
    procs = [RepetitionPenaltyLogitsProcessor(1.3), MinNewTokensLengthLogitsProcessor(ids.shape[1], 2, eos)]
    if do_sample:
        procs += [TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8), MinPLogitsWarper(0.05)]
    expected = _reference(procs, ids, x)
    ours = S.process_logits(x, params, S.seen_token_mask(ids, None, V), banned=eos)
    assert torch.equal(ours, expected)


def test_process_logits_upcasts_to_fp32_and_leaves_input_alone():
    x = _logits(8).to(torch.bfloat16)
    before = x.clone()
    out = S.process_logits(x, S.SamplingParams(repetition_penalty=1.2), torch.ones(3, V, dtype=torch.bool))
    assert out.dtype == torch.float32 and torch.equal(x, before)


def test_min_new_tokens_ban_applies_only_to_selected_rows():
    x = _logits(9)
    rows = torch.tensor([True, False, True])
    out = S.suppress_tokens(x, torch.tensor([4, V + 10]), rows)
    assert torch.isinf(out[0, 4]) and torch.isinf(out[2, 4]) and out[1, 4] == x[1, 4]
    assert torch.equal(out[:, :4], x[:, :4])


def test_greedy_is_argmax_and_temperature_zero_is_greedy():
    x = _logits(10)
    assert torch.equal(S.select_tokens(x, S.SamplingParams()), x.argmax(-1))
    params = S.SamplingParams(do_sample=True, temperature=0.0)
    assert params.greedy and torch.equal(S.select_tokens(S.process_logits(x, params), params), x.argmax(-1))


def test_fixed_seed_gives_the_same_tokens_twice():
    x = _logits(11, batch=8)
    params = S.SamplingParams(do_sample=True, temperature=1.3)
    scores = S.process_logits(x, params)
    a = S.select_tokens(scores, params, S.make_generator(seed=123))
    b = S.select_tokens(scores, params, S.make_generator(seed=123))
    c = [S.select_tokens(scores, params, S.make_generator(seed=s)) for s in range(5)]
    assert torch.equal(a, b)
    assert any(not torch.equal(a, t) for t in c)


def test_global_rng_draw_equals_transformers_multinomial_draw():
    # with no generator we draw exactly as transformers' _sample does: softmax -> multinomial(1)
    x = _logits(12, batch=4)
    params = S.SamplingParams(do_sample=True)
    torch.manual_seed(7)
    ours = S.select_tokens(x, params)
    torch.manual_seed(7)
    ref = torch.multinomial(torch.softmax(x, dim=-1), num_samples=1).squeeze(1)
    assert torch.equal(ours, ref)


def test_seed_and_generator_together_is_an_error():
    with pytest.raises(InputError, match="seed"):
        S.make_generator(seed=1, generator=torch.Generator())
    with pytest.raises(InputError, match="seed"):
        S.make_generator(seed=-1)


def test_per_row_knobs_equal_the_reference_row_by_row():
    x, ids = _logits(13, batch=4), _ids(batch=4)
    seen = S.seen_token_mask(ids, None, V)
    temperature = torch.tensor([0.5, 1.0, 1.7, 0.9])
    top_k = torch.tensor([3, 0, 10, V + 4])
    top_p = torch.tensor([0.5, 0.95, 0.2, 0.7])
    min_p = torch.tensor([0.1, 0.0, 0.3, 0.05])
    penalty = torch.tensor([1.3, 1.0, 0.8, 2.0])
    ours = S.apply_repetition_penalty(x, seen, penalty)
    ours = S.apply_temperature(ours, temperature)
    ours = S.apply_top_k(ours, top_k)
    ours = S.apply_top_p(ours, top_p)
    ours = S.apply_min_p(ours, min_p)
    for row in range(4):
        procs = [RepetitionPenaltyLogitsProcessor(float(penalty[row])),
                 TemperatureLogitsWarper(float(temperature[row]))]
        if top_k[row] != 0:
            procs.append(TopKLogitsWarper(int(top_k[row])))
        procs += [TopPLogitsWarper(float(top_p[row])), MinPLogitsWarper(float(min_p[row]))]
        expected = _reference(procs, ids[row:row + 1], x[row:row + 1])
        assert torch.equal(ours[row:row + 1], expected), row
