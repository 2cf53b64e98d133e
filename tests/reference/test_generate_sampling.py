"""Sampling and generation_config.json defaults agree with transformers' generate on the same checkpoint."""

import pytest
import torch

from generation.oracle_models import batch_inputs, instruct_models, models, prompt_ids, user

GRIDS = [("image", (1, 4, 6))]


def _inputs(rows=1):
    conversation = [user("image", text="What is in the picture?")]
    ids = prompt_ids(conversation, GRIDS)
    inputs = batch_inputs([ids] * rows, GRIDS * rows)
    return inputs


@pytest.mark.parametrize("penalty", [None, 3.0])
def test_generation_config_json_defaults_are_honoured(penalty):
    # the Instruct file: do_sample, top_k=1, top_p=0.001, temperature=0.1, repetition_penalty=1.05;
    # the variant with penalty 3.0 must change the argmax, so its effect is visible
    overrides = {} if penalty is None else {"repetition_penalty": penalty}
    reference, ours = instruct_models(**overrides)
    assert ours.generation_config.top_k == 1
    assert ours.generation_config.repetition_penalty == (penalty or 1.05)
    inputs = _inputs()
    plain_kwargs = {"max_new_tokens": 40, "min_new_tokens": 32, "do_sample": False, "repetition_penalty": 1.0}
    if penalty is not None:
        # put the token plain greedy picks first into the prompt, so the penalty hits it
        first = int(ours.generate(**inputs, **plain_kwargs)[0, inputs["input_ids"].shape[1]])
        inputs["input_ids"][0, 0] = first
    expected = reference.generate(**inputs, max_new_tokens=40, min_new_tokens=32)
    got = ours.generate(**inputs, max_new_tokens=40, min_new_tokens=32)
    assert torch.equal(got, expected)
    if penalty is not None:
        assert not torch.equal(ours.generate(**inputs, **plain_kwargs), got)


def test_generate_kwargs_override_the_file_and_generation_config_argument_sits_between():
    from qwen2vl.config import GenerationConfig

    reference, ours = instruct_models()
    inputs = _inputs()
    kwargs = {"max_new_tokens": 32, "min_new_tokens": 32, "do_sample": False, "repetition_penalty": 1.3}
    assert torch.equal(ours.generate(**inputs, **kwargs), reference.generate(**inputs, **kwargs))
    # generation_config= overrides model.generation_config; unset fields still come from the file
    cfg = GenerationConfig(max_new_tokens=32, min_new_tokens=32, repetition_penalty=1.3)
    from transformers import GenerationConfig as RefGenerationConfig

    ref_cfg = RefGenerationConfig(max_new_tokens=32, min_new_tokens=32, repetition_penalty=1.3)
    assert torch.equal(ours.generate(**inputs, generation_config=cfg),
                       reference.generate(**inputs, generation_config=ref_cfg))
    # a transformers GenerationConfig object is accepted too (drop-in code)
    assert torch.equal(ours.generate(**inputs, generation_config=ref_cfg),
                       reference.generate(**inputs, generation_config=ref_cfg))


def test_without_generation_config_json_eos_and_defaults_come_from_config_json():
    reference, ours = models("")
    # as in transformers, the loaded generation_config then carries config.json's eos
    assert ours.generation_config.eos_token_id == reference.generation_config.eos_token_id
    inputs = _inputs()
    # nothing set: 20 new tokens (transformers' default max_length), greedy, eos from config.json
    expected = reference.generate(**inputs)
    assert torch.equal(ours.generate(**inputs), expected)
    assert expected.shape[1] == inputs["input_ids"].shape[1] + 20


@pytest.mark.parametrize("knobs", [
    {"temperature": 0.7},
    {"top_k": 20},
    {"top_p": 0.9},
    {"min_p": 0.05},
    {"temperature": 1.3, "top_k": 50, "top_p": 0.95, "min_p": 0.01, "repetition_penalty": 1.2},
])
def test_sampling_with_the_global_seed_draws_the_same_tokens_as_transformers(knobs):
    reference, ours = models()
    inputs = _inputs(rows=2)
    kwargs = {"do_sample": True, "max_new_tokens": 32, "min_new_tokens": 32, **knobs}
    torch.manual_seed(11)
    expected = reference.generate(**inputs, **kwargs)
    torch.manual_seed(11)
    got = ours.generate(**inputs, **kwargs)
    assert torch.equal(got, expected)


def test_seed_argument_repeats_and_differs_across_seeds():
    _, ours = models()
    inputs = _inputs(rows=2)
    kwargs = {"do_sample": True, "max_new_tokens": 24, "min_new_tokens": 24, "temperature": 1.5}
    a = ours.generate(**inputs, seed=5, **kwargs)
    b = ours.generate(**inputs, seed=5, **kwargs)
    c = ours.generate(**inputs, seed=6, **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)
    gen = torch.Generator().manual_seed(5)
    assert torch.equal(ours.generate(**inputs, generator=gen, **kwargs), a)


def test_num_return_sequences_repeats_each_prompt_with_its_media():
    reference, ours = models()
    conversation = [user("image", "image", text="Compare.")]
    grids = [("image", (1, 4, 6)), ("image", (1, 2, 2))]
    rows = [prompt_ids(conversation, grids), prompt_ids([user("image")], [("image", (1, 4, 4))])]
    inputs = batch_inputs(rows, grids + [("image", (1, 4, 4))])
    kwargs = {"do_sample": True, "num_return_sequences": 3, "max_new_tokens": 32, "min_new_tokens": 32,
              "top_k": 5}
    torch.manual_seed(3)
    expected = reference.generate(**inputs, **kwargs)
    torch.manual_seed(3)
    got = ours.generate(**inputs, **kwargs)
    assert got.shape[0] == 6 and torch.equal(got, expected)


def test_sampling_with_rows_finishing_early_keeps_the_reference_random_stream():
    # finished rows leave our running batch; the draws must still follow transformers' RNG stream
    from generation.oracle_models import IM_END

    reference, ours = models()
    rows = [prompt_ids([user("image")], GRIDS), prompt_ids([{"role": "user", "content": "hello"}], []),
            prompt_ids([{"role": "user", "content": "tell me more"}], [])]
    inputs = batch_inputs(rows, GRIDS)
    width = inputs["input_ids"].shape[1]
    kwargs = {"do_sample": True, "top_k": 50, "temperature": 1.2, "max_new_tokens": 30, "eos_token_id": [IM_END]}
    torch.manual_seed(5)
    free = reference.generate(**inputs, **kwargs)[:, width:]
    kwargs.update(eos_token_id=[int(free[0, 4]), int(free[2, 12])], pad_token_id=0)
    torch.manual_seed(5)
    expected = reference.generate(**inputs, **kwargs)
    torch.manual_seed(5)
    got = ours.generate(**inputs, **kwargs)
    assert torch.equal(got, expected)
    assert (got[:, width:] == 0).any()  # rows did finish early
