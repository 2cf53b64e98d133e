"""Our image processor against transformers 5.24's `Qwen2VLImageProcessorPil` (the oracle):
identical grids and pixel values within 1e-6 for many sizes, PIL modes and input types."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import image_utils as hf_image_utils
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as HFPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from qwen2vl.processing.image import Qwen2VLImageProcessor, smart_resize
from qwen2vl.processing.media import load_image

HUB = {"min_pixels": 3136, "max_pixels": 12845056}
SMALL = {"min_pixels": 3136, "max_pixels": 28 * 28 * 64}
RNG = np.random.default_rng(1234)


def _photo(width: int, height: int) -> Image.Image:
    """Photo-like content: smooth gradients plus noise (both kernels' weak spots)."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width, 1), y * 255 / max(height, 1), (x + y) % 256], axis=-1)
    noisy = base + RNG.normal(0, 25, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _compare(inputs, bounds, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = HFPil(**bounds)(inputs, return_tensors="pt", **kwargs)
    got = Qwen2VLImageProcessor(**bounds)(inputs, return_tensors="pt", **kwargs)
    assert got["image_grid_thw"].tolist() == expected["image_grid_thw"].tolist()
    assert got["pixel_values"].shape == expected["pixel_values"].shape
    assert got["pixel_values"].dtype == torch.float32
    torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("bounds", [HUB, SMALL], ids=["hub", "small_max"])
@pytest.mark.parametrize("size", [(40, 30), (1500, 90), (200, 900), (333, 517), (90, 1500)])
def test_sizes(size, bounds):
    _compare(_photo(*size), bounds)


def test_large_photo():
    _compare(_photo(2000, 1500), HUB)
    _compare(_photo(2000, 1500), SMALL)


def _rgba() -> Image.Image:
    rgba = np.concatenate([np.asarray(_photo(70, 50)), RNG.integers(0, 256, (50, 70, 1), dtype=np.uint8)], -1)
    return Image.fromarray(rgba, "RGBA")


MODES = {
    "L": lambda: _photo(70, 50).convert("L"),
    "LA": lambda: _rgba().convert("LA"),
    "P": lambda: _photo(70, 50).convert("P"),
    "P_transparency": lambda: _palette_with_transparency(),
    "RGBA": _rgba,
    "CMYK": lambda: _photo(70, 50).convert("CMYK"),
    "I;16": lambda: Image.fromarray(RNG.integers(0, 65535, (50, 70)).astype(np.uint16)),
    "I;16_low": lambda: Image.fromarray(RNG.integers(0, 256, (50, 70)).astype(np.uint16)),
    "1": lambda: _photo(70, 50).convert("1"),
    "F": lambda: _photo(70, 50).convert("F"),
}


def _palette_with_transparency() -> Image.Image:
    image = _photo(70, 50).convert("P")
    image.info["transparency"] = 5
    return image


@pytest.mark.parametrize("mode", sorted(MODES))
def test_modes(mode):
    _compare(MODES[mode](), HUB)


@pytest.mark.parametrize("kind", ["hwc", "chw", "torch_chw", "float01", "float255", "rgba_array", "batch"])
def test_array_inputs(kind):
    hwc = np.asarray(_photo(45, 38))
    inputs = {
        "hwc": hwc, "chw": hwc.transpose(2, 0, 1).copy(), "torch_chw": torch.from_numpy(hwc.transpose(2, 0, 1).copy()),
        "float01": hwc / 255.0, "float255": hwc.astype(np.float32),
        "rgba_array": np.concatenate([hwc, RNG.integers(0, 256, (38, 45, 1), dtype=np.uint8)], -1),
        "batch": [hwc, _photo(100, 60), _photo(60, 100)],
    }[kind]
    _compare(inputs, HUB)


def test_call_overrides_and_no_resize():
    image = _photo(300, 200)
    _compare(image, HUB, max_pixels=28 * 28 * 20)
    _compare(image, HUB, size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 30})
    _compare(_photo(84, 56), HUB, do_resize=False)
    _compare(image, HUB, do_normalize=False)
    _compare(image, HUB, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def test_exif_rotated_jpeg(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise for display
    path = tmp_path / "rotated.jpg"
    _photo(80, 50).save(path, exif=exif, quality=90)
    ours = load_image(str(path))
    theirs = hf_image_utils.load_image(str(path))  # also applies EXIF orientation for paths
    assert ours.size == theirs.size == (50, 80)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    _compare(ours, HUB)


def test_base64_and_url_forms_decode_like_the_reference(tmp_path):
    buffer = io.BytesIO()
    _photo(64, 48).save(buffer, format="PNG")
    import base64

    text = base64.b64encode(buffer.getvalue()).decode()
    for source in (text, f"data:image/png;base64,{text}"):
        np.testing.assert_array_equal(np.asarray(load_image(source)), np.asarray(hf_image_utils.load_image(source)))


def test_smart_resize_equals_reference_on_a_grid():
    for h in list(range(1, 60, 3)) + [97, 98, 99, 500, 1079, 1080, 4000]:
        for w in (1, 13, 14, 15, 27, 28, 29, 70, 98, 640, 1920, 3000):
            if max(h, w) / min(h, w) > 200:
                continue
            for low, high in ((3136, 12845056), (3136, 1003520), (100352, 602112), (3136, 784 * 4)):
                assert smart_resize(h, w, 28, low, high) == hf_smart_resize(h, w, 28, low, high), (h, w, low, high)
