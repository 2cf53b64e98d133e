"""model/rope.py from first principles: the worked examples of reference-notes §4.4, both text-start
rules, decode positions, the mrope_section recomposition and the vision rotary ids/tables."""

import math

import pytest
import torch

from qwen2vl.errors import InputError
from qwen2vl.model import rope

VS, VE = 0, 0  # vision start/end are plain text tokens for positions


def _rows(positions):
    return [row.tolist() for row in positions]


def test_single_image_example():
    modality = [0, 0, 0, 0] + [1] * 6 + [0, 0, 0]  # [10, 11, 12, VS, I x6, VE, 13, 14]
    pos, delta = rope.mrope_position_ids(modality, [(1, 4, 6)], merge_size=2)
    assert _rows(pos) == [[0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8, 9],
                          [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9],
                          [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9]]
    assert delta == -3


def test_two_images_example():
    modality = [0, 0] + [1] * 4 + [0, 0] + [1] * 3 + [0, 0]  # [10, VS, I x4, VE, VS, I x3, VE, 11]
    pos, delta = rope.mrope_position_ids(modality, [(1, 4, 4), (1, 2, 6)], merge_size=2)
    assert _rows(pos) == [[0, 1, 2, 2, 2, 2, 4, 5, 6, 6, 6, 9, 10],
                          [0, 1, 2, 2, 3, 3, 4, 5, 6, 6, 6, 9, 10],
                          [0, 1, 2, 3, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    assert delta == -2


def test_video_rules_differ_when_time_axis_is_longest():
    modality = [0, 0] + [2] * 12 + [0, 0]  # [10, VS, V x12, VE, 13], grid (3, 4, 4) -> 3x2x2 tokens
    old, old_delta = rope.mrope_position_ids(modality, [(3, 4, 4)], 2, rule="max_thw")
    new, new_delta = rope.mrope_position_ids(modality, [(3, 4, 4)], 2, rule="max_hw")
    vision_t = [2] * 4 + [3] * 4 + [4] * 4
    assert _rows(new)[0] == [0, 1] + vision_t + [4, 5]  # 5.24: start + max(h, w)/2 = 2 + 2
    assert _rows(new)[1] == [0, 1, 2, 2, 3, 3, 2, 2, 3, 3, 2, 2, 3, 3, 4, 5]
    assert _rows(new)[2] == [0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 4, 5]
    assert new_delta == -10
    # Qwen/v4/vLLM: one past the block's largest id on any axis = 2 + max(3, 2, 2) = 5
    assert _rows(old)[0] == [0, 1] + vision_t + [5, 6]
    assert old_delta == 7 - 16


def test_rules_agree_for_images():
    modality = [0] + [1] * 6 + [0, 0]
    a, da = rope.mrope_position_ids(modality, [(1, 4, 6)], 2, rule="max_thw")
    b, db = rope.mrope_position_ids(modality, [(1, 4, 6)], 2, rule="max_hw")
    assert torch.equal(a, b) and da == db


def test_left_padded_batch_example():
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1] * 9, [0, 0, 0, 0, 1, 1, 1, 1, 1]])
    pos, delta = rope.batch_mrope_position_ids(types, mask, torch.tensor([[1, 4, 4]]), None, merge_size=2)
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 3, 3, 3, 5, 6]
    for axis in range(3):
        assert pos[axis, 1].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4]  # pads keep 0
    assert delta.tolist() == [[-2], [0]]


def test_grids_are_consumed_in_flattened_batch_order():
    types = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]])
    grids = torch.tensor([[1, 4, 4], [1, 2, 2]])  # row 0's image, then row 1's
    pos, delta = rope.batch_mrope_position_ids(types, None, grids, None, merge_size=2)
    assert pos[2, 0].tolist() == [0, 1, 2, 1, 2, 3]
    assert pos[0, 1].tolist() == [0, 1, 2, 3, 4, 5]
    assert delta.tolist() == [[-2], [0]]


def test_adjacent_items_in_one_run_are_split_by_their_grids():
    pos, _ = rope.mrope_position_ids([1] * 2, [(1, 2, 2), (1, 2, 2)], 2)
    assert _rows(pos) == [[0, 1]] * 3


def test_placeholder_without_grid_is_an_input_error():
    with pytest.raises(InputError, match="no grid left"):
        rope.mrope_position_ids([0, 1, 1, 1, 1, 1], [(1, 4, 4)], 2)
    with pytest.raises(InputError, match="implies 4 placeholder tokens but the run has only 2"):
        rope.mrope_position_ids([0, 1, 1, 0], [(1, 4, 4)], 2)


def test_mm_token_type_ids_from_input_ids():
    ids = torch.tensor([[5, 151655, 151655, 7, 151656]])
    assert rope.mm_token_type_ids_from_input_ids(ids, 151655, 151656).tolist() == [[0, 1, 1, 0, 2]]


def test_decode_positions_are_last_plus_one():
    delta = torch.tensor([[-3], [0]])
    count = torch.tensor([[13], [5]])  # real tokens already seen per row
    pos = rope.decode_position_ids(delta, count)
    assert pos.shape == (3, 2, 1)
    assert pos[:, 0, 0].tolist() == [10] * 3 and pos[:, 1, 0].tolist() == [5] * 3  # 9 + 1 after the image row


def test_mrope_cos_sin_takes_each_slot_from_its_axis():
    inv_freq = rope.text_inv_freq(16, 10000.0)  # 8 slots, sections [2, 3, 3]
    pos = torch.tensor([[[3]], [[5]], [[7]]])  # t=3, h=5, w=7 for one token
    cos, sin = rope.mrope_cos_sin(pos, inv_freq, [2, 3, 3], torch.float32)
    axis = [3, 3, 5, 5, 5, 7, 7, 7]
    expect = [math.cos(axis[j] * 10000.0 ** (-2 * j / 16)) for j in range(8)] * 2
    assert torch.allclose(cos[0, 0], torch.tensor(expect), atol=1e-6)
    assert sin.shape == (1, 1, 16)


def test_text_only_mrope_equals_1d_rope():
    inv_freq = rope.text_inv_freq(16, 1e6)
    pos = torch.arange(6).view(1, 1, 6).expand(3, 1, 6)
    cos, _ = rope.mrope_cos_sin(pos, inv_freq, [2, 3, 3], torch.float32)
    plain = torch.cat([torch.outer(torch.arange(6.0), inv_freq)] * 2, dim=-1).cos()
    assert torch.allclose(cos[0], plain)


def test_vision_rotary_ids_are_block_major_and_repeat_per_frame():
    ids = rope.vision_rotary_ids([(2, 2, 4)], merge_size=2)
    one_frame = [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert ids.tolist() == one_frame * 2


def test_vision_cos_sin_layout():
    cos, sin = rope.vision_cos_sin(torch.tensor([[2, 3]]), head_dim=8)
    inv = [1.0, 10000.0 ** -0.5]  # d/4 = 2 frequencies over d/2 = 4
    angles = [2 * inv[0], 2 * inv[1], 3 * inv[0], 3 * inv[1]] * 2  # [h-freqs | w-freqs] duplicated
    assert cos.dtype == torch.float32
    assert torch.allclose(cos[0], torch.tensor(angles).cos()) and torch.allclose(sin[0], torch.tensor(angles).sin())


def test_vision_cu_seqlens_one_segment_per_frame():
    cu = rope.vision_cu_seqlens(torch.tensor([[1, 4, 6], [3, 2, 2]]))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 24, 28, 32, 36]
