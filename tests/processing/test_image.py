"""qwen2vl.processing.image: smart_resize, patch layout, normalisation numerics, config handling.

Expected values come from first principles or the worked examples of reference-notes §5.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl.errors import ConfigError, MediaError
from qwen2vl.processing.image import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Qwen2VLImageProcessor,
    Qwen2VLImageProcessorPil,
    arithmetic_plan,
    normalize_lut,
    smart_resize,
)

HUB = {"min_pixels": 3136, "max_pixels": 12845056}


@pytest.mark.parametrize(
    ("hw", "max_pixels", "expected"),
    [
        ((480, 640), 1003520, (476, 644)),
        ((1080, 1920), 1003520, (728, 1316)),
        ((1080, 1920), 12845056, (1092, 1932)),
        ((4000, 3000), 1003520, (1148, 840)),
        ((4000, 3000), 12845056, (4004, 2996)),
        ((720, 1280), 1003520, (728, 1288)),
        ((1, 1), 1003520, (56, 56)),
        ((10, 500), 1003520, (28, 420)),
        ((27, 332), 1003520, (28, 336)),
        ((70, 112), 1003520, (56, 112)),  # round(2.5) = 2: half to even
        ((98, 112), 1003520, (112, 112)),  # round(3.5) = 4
    ],
)
def test_smart_resize_worked_examples(hw, max_pixels, expected):
    assert smart_resize(*hw, factor=28, min_pixels=3136, max_pixels=max_pixels) == expected


def test_smart_resize_bounds_hold_for_many_sizes():
    rng = np.random.default_rng(0)
    for h, w in rng.integers(20, 3000, size=(200, 2)):
        if max(h, w) / min(h, w) > 200:
            continue
        rh, rw = smart_resize(int(h), int(w), 28, 3136, 1003520)
        assert rh % 28 == 0 and rw % 28 == 0
        assert 3136 <= rh * rw <= 1003520


def test_smart_resize_rejects_extreme_aspect_and_zero():
    assert smart_resize(10, 2000, 28, 3136, 1003520)[0] == 28  # exactly 200:1 is allowed
    with pytest.raises(MediaError, match=r"conv\[1\]: image is 2010x10 px \(aspect 201.0:1\).*200:1"):
        smart_resize(10, 2010, where="conv[1]")
    with pytest.raises(MediaError, match="0x5 px"):
        smart_resize(5, 0)


def _position_image(height, width):
    """uint8 RGB image whose R = row % 256, G = col % 256, B = 7: every pixel says where it is."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([y % 256, x % 256, np.full_like(y, 7)], axis=-1).astype(np.uint8)


def test_patch_layout_merge_order_and_temporal_copy():
    proc = Qwen2VLImageProcessor(do_rescale=False, do_normalize=False, **HUB)
    image = _position_image(56, 84)  # already multiples of 28: no resize; grid 4 x 6
    out = proc(Image.fromarray(image))
    rows = out["pixel_values"].numpy().reshape(-1, 3, 2, 14, 14)  # (N, C, T, ph, pw)
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert rows.shape[0] == 24
    # merge blocks row-major; inside a block (0,0),(0,1),(1,0),(1,1); block (0,1) starts at row 4
    order = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3)]
    for row, (gy, gx) in enumerate(order):
        assert rows[row, 0, 0, 0, 0] == gy * 14 and rows[row, 1, 0, 0, 0] == gx * 14
    np.testing.assert_array_equal(rows[:, :, 0], rows[:, :, 1])  # the two temporal copies agree
    np.testing.assert_array_equal(rows[5, 1, 0, 3], np.arange(42, 56))  # pw runs along columns
    assert (rows[:, 2] == 7).all()


def test_normalisation_matches_first_principles():
    proc = Qwen2VLImageProcessor(**HUB)
    image = _position_image(56, 56)  # at the min_pixels bound: no resize
    values = proc(image, return_tensors="np")["pixel_values"].reshape(-1, 3, 2, 14, 14)
    mean, std = np.asarray(OPENAI_CLIP_MEAN), np.asarray(OPENAI_CLIP_STD)
    expected = (image[:14, :14].transpose(2, 0, 1) / 255.0 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(values[0, :, 0], expected, atol=1e-6)


def test_arithmetic_plan_is_exact_or_absent():
    opts = Qwen2VLImageProcessor().resolve_options({})
    lut = normalize_lut(opts["image_mean"], opts["image_std"], opts["rescale_factor"], True, True)
    assert arithmetic_plan(lut, opts) is not None  # default constants: the fast route is bit-exact
    odd = {**opts, "rescale_factor": 1 / 254.7}
    lut_odd = normalize_lut(odd["image_mean"], odd["image_std"], odd["rescale_factor"], True, True)
    plan = arithmetic_plan(lut_odd, odd)
    if plan is None:  # falls back to the table, which must still be right
        image = np.full((28, 28, 3), 200, np.uint8)
        got = Qwen2VLImageProcessor(rescale_factor=1 / 254.7)(image, return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(got[0, 0], (200 / 254.7 - OPENAI_CLIP_MEAN[0]) / OPENAI_CLIP_STD[0], atol=1e-6)


@pytest.mark.parametrize("layout", ["hwc", "chw", "torch", "float01", "gray2d", "rgba"])
def test_array_inputs_agree_with_pil(layout):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    proc = Qwen2VLImageProcessor(**HUB)
    if layout == "gray2d":
        reference = proc(Image.fromarray(image[..., 0]).convert("RGB"))["pixel_values"]
        got = proc(image[..., 0])["pixel_values"]
    elif layout == "rgba":
        rgba = np.concatenate([image, np.full((40, 30, 1), 255, np.uint8)], axis=-1)
        reference, got = proc(Image.fromarray(image))["pixel_values"], proc(rgba)["pixel_values"]
    else:
        inputs = {"hwc": image, "chw": image.transpose(2, 0, 1).copy(),
                  "torch": torch.from_numpy(image.transpose(2, 0, 1).copy()),
                  "float01": image.astype(np.float64) / 255.0}[layout]
        reference, got = proc(Image.fromarray(image))["pixel_values"], proc(inputs)["pixel_values"]
        if layout == "float01":  # the reference rescales [0, 1] floats a second time (kept for parity)
            reference = (reference * torch.tensor(OPENAI_CLIP_STD).repeat_interleave(392)
                         + torch.tensor(OPENAI_CLIP_MEAN).repeat_interleave(392)) / 255
            reference = (reference - torch.tensor(OPENAI_CLIP_MEAN).repeat_interleave(392)) \
                / torch.tensor(OPENAI_CLIP_STD).repeat_interleave(392)
    torch.testing.assert_close(got, reference, atol=2e-5, rtol=0)


def test_batch_nesting_sizes_override_and_outputs():
    proc = Qwen2VLImageProcessor(**HUB)
    a, b = Image.new("RGB", (100, 60), "red"), Image.new("RGB", (56, 56), "blue")
    out = proc([[a], [b, a]], sizes=[None, {"resized_height": 280, "resized_width": 420}, {"max_pixels": 3136}])
    assert out["image_grid_thw"].tolist() == [[1, 4, 8], [1, 20, 30], [1, 2, 4]]  # 60x100 -> 28x56
    assert out["pixel_values"].shape == (32 + 600 + 8, 1176)
    assert out["pixel_values"].dtype == torch.float32 and out["image_grid_thw"].dtype == torch.int64
    np_out = proc(a, return_tensors="np", max_pixels=28 * 28 * 2)
    assert isinstance(np_out["pixel_values"], np.ndarray) and np_out["image_grid_thw"].tolist() == [[1, 2, 2]]
    assert proc.get_number_of_image_patches(60, 100) == 32
    assert out.pixel_values is out["pixel_values"]  # BatchFeature: attribute access
    with pytest.raises(ConfigError, match="return_tensors='tf'"):
        proc(a, return_tensors="tf")


def test_do_resize_false_needs_aligned_sides():
    proc = Qwen2VLImageProcessor(do_resize=False, **HUB)
    assert proc(Image.new("RGB", (56, 28)))["image_grid_thw"].tolist() == [[1, 2, 4]]
    with pytest.raises(MediaError, match="multiples of 28"):
        proc(Image.new("RGB", (50, 28)), where="messages[0].content[1]")


def test_config_round_trip_and_overrides(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {**HUB, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
         "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
         "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}))
    proc = Qwen2VLImageProcessor.from_pretrained(tmp_path)
    assert proc.size == {"shortest_edge": 3136, "longest_edge": 12845056}
    assert (proc.min_pixels, proc.max_pixels) == (3136, 12845056)
    small = Qwen2VLImageProcessor.from_pretrained(tmp_path, max_pixels=50176)
    assert small.max_pixels == 50176
    saved = small.save_pretrained(tmp_path / "out")
    again = Qwen2VLImageProcessorPil.from_pretrained(saved.parent)
    assert again.to_dict() == small.to_dict()
    assert Qwen2VLImageProcessor.from_dict({"size": {"shortest_edge": 10, "longest_edge": 20}}).max_pixels == 20
    with pytest.raises(ConfigError, match="unknown options"):
        proc(Image.new("RGB", (28, 28)), max_pixelz=5)
    with pytest.raises(ConfigError, match="shortest_edge"):
        Qwen2VLImageProcessor(min_pixels=0, max_pixels=10)
    with pytest.raises(ConfigError, match="cannot read"):
        Qwen2VLImageProcessor.from_pretrained(tmp_path / "missing")


def test_errors_name_the_item():
    proc = Qwen2VLImageProcessor()
    with pytest.raises(MediaError, match=r"^conv\[0\]\.content\[2\]: .*not_here\.png.*file not found"):
        proc("not_here.png", where="conv[0].content[2]")
    with pytest.raises(MediaError, match=r"images\[1\]: .*aspect"):
        proc([Image.new("RGB", (28, 28)), Image.new("RGB", (3000, 10))])
    with pytest.raises(MediaError, match="values lie in"):
        proc(np.full((28, 28, 3), 300.5))
    with pytest.raises(MediaError, match="got no image"):
        proc([])
