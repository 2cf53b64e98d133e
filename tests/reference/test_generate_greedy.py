"""Greedy generate is token-identical to transformers' generate (fp32, CPU, tiny random checkpoint).

Each case compares >= 32 new tokens: min_new_tokens keeps eos away (on both sides alike).
"""

import pytest
import torch

from generation.oracle_models import IM_END, ENDOFTEXT, batch_inputs, models, prompt_ids, user

NEW = 36
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def _compare(inputs, rule=None, **kwargs):
    reference, ours = models(rule=rule)
    kwargs = {"max_new_tokens": NEW, "min_new_tokens": 32, "do_sample": False, **kwargs}
    expected = reference.generate(**inputs, **kwargs)
    got = ours.generate(**inputs, **kwargs)
    assert got.shape == expected.shape
    assert got.shape[1] - inputs["input_ids"].shape[1] >= 32
    assert torch.equal(got, expected), (got[:, -NEW:], expected[:, -NEW:])
    return got


CASES = {
    "text": ([SYSTEM, {"role": "user", "content": "Who are you?"}], []),
    "one_image": ([user("image")], [("image", (1, 4, 6))]),
    "several_images": ([user("image", "image", "image", text="Compare them.")],
                       [("image", (1, 4, 6)), ("image", (1, 6, 4)), ("image", (1, 2, 2))]),
    # grid_t <= max(h, w)/2: the 5.24 and Qwen text-start rules agree (reference-notes §4.4)
    "video": ([user("video", text="What happens?")], [("video", (2, 4, 6))]),
    "images_and_video": ([user("image", "video", "image", text="Common elements?")],
                         [("image", (1, 4, 4)), ("video", (2, 4, 4)), ("image", (1, 2, 4))]),
    "multi_turn": ([SYSTEM, user("image"), {"role": "assistant", "content": "A noisy picture."},
                    user("image", text="And this one?")], [("image", (1, 4, 6)), ("image", (1, 4, 4))]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_single_conversation_matches_transformers(name):
    conversation, grids = CASES[name]
    _compare(batch_inputs([prompt_ids(conversation, grids)], grids))


def test_video_with_long_time_axis_matches_5_24_under_its_rule():
    # grid_t > max(h, w)/2: only the "max_hw" rule (transformers 5.24) gives the reference's positions
    grids = [("video", (4, 4, 4))]
    _compare(batch_inputs([prompt_ids([user("video")], grids)], grids), rule="max_hw")


def _doc_batch():
    """The doc page's four mixed conversations, left-padded into one batch."""
    convs = [
        ([user("image", text="Describe this image.")], [("image", (1, 4, 6))]),
        ([user("image", "image", text="What is written in the pictures?")],
         [("image", (1, 4, 4)), ("image", (1, 6, 4))]),
        ([{"role": "user", "content": "who are you?"}], []),
        ([user("image", "image", "video", text="What are the common elements in these medias?")],
         [("image", (1, 6, 4)), ("image", (1, 2, 2)), ("video", (2, 4, 4))]),
    ]
    rows = [prompt_ids(c, g) for c, g in convs]
    return batch_inputs(rows, [grid for _, g in convs for grid in g])


def test_left_padded_mixed_batch_matches_transformers_and_doc_trimming_works():
    inputs = _doc_batch()
    out = _compare(inputs, eos_token_id=[IM_END, ENDOFTEXT], pad_token_id=ENDOFTEXT)
    trimmed = [o[len(i):] for i, o in zip(inputs["input_ids"], out)]  # the doc page's trimming code
    assert all(len(t) == out.shape[1] - inputs["input_ids"].shape[1] for t in trimmed)


def test_rows_finish_at_different_steps_like_transformers():
    inputs = _doc_batch()
    reference, ours = models()
    free = reference.generate(**inputs, max_new_tokens=NEW, do_sample=False, eos_token_id=[IM_END])
    new = free[:, inputs["input_ids"].shape[1]:]
    # make one row's 6th token and another row's 20th token the eos: those rows stop early, the rest run on
    stop_a, stop_b = int(new[1, 5]), int(new[3, 19])
    kwargs = {"max_new_tokens": NEW, "do_sample": False, "eos_token_id": [stop_a, stop_b], "pad_token_id": 7}
    expected = reference.generate(**inputs, **kwargs)
    got = ours.generate(**inputs, **kwargs)
    assert torch.equal(got, expected)
    assert (got[:, inputs["input_ids"].shape[1]:] == 7).any()  # some finished row was padded


def test_batch_equals_each_row_alone():
    inputs = _doc_batch()
    _, ours = models()
    batch = ours.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    width = inputs["input_ids"].shape[1]
    rows = [prompt_ids(c, g) for c, g in [([user("image", text="Describe this image.")], [("image", (1, 4, 6))]),
                                          ([{"role": "user", "content": "who are you?"}], [])]]
    for row, index, grids in ((rows[0], 0, [("image", (1, 4, 6))]), (rows[1], 2, [])):
        alone_inputs = batch_inputs([row], grids)
        if grids:  # the same pixels as the batch's first image
            alone_inputs["pixel_values"] = inputs["pixel_values"][:24]
        alone = ours.generate(**alone_inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        assert torch.equal(alone[0, len(row):], batch[index, width:])


def test_mm_token_type_ids_are_derived_when_absent():
    conversation, grids = CASES["images_and_video"]
    inputs = batch_inputs([prompt_ids(conversation, grids)], grids)
    reference, ours = models()
    kwargs = {"max_new_tokens": 32, "min_new_tokens": 32, "do_sample": False}
    expected = reference.generate(**inputs, **kwargs)
    inputs.pop("mm_token_type_ids")
    assert torch.equal(ours.generate(**inputs, **kwargs), expected)


def test_inputs_embeds_without_ids_matches_transformers():
    # transformers returns only the new tokens in this case; so do we
    reference, ours = models()
    inputs = batch_inputs([prompt_ids([SYSTEM, {"role": "user", "content": "Say hi"}], [])], [])
    embeds = ours.get_input_embeddings()(inputs["input_ids"]).detach()
    kwargs = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"], "max_new_tokens": 32,
              "min_new_tokens": 32, "do_sample": False}
    expected = reference.generate(**kwargs)
    got = ours.generate(**kwargs)
    assert got.shape == (1, 32) and torch.equal(got, expected)
