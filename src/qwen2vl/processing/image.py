"""Qwen2-VL image preprocessing: `smart_resize` (pure), PIL bicubic resize, rescale + normalise
through a per-channel lookup table, patchify -> `pixel_values` (N, 1176) and `image_grid_thw` (n, 3).

Imports errors and processing.{media, tokenizer (BatchFeature)}. Numerically equal to transformers 5.24's
`Qwen2VLImageProcessorPil` (our default backend; see reference-notes "Our decisions").

    >>> proc = Qwen2VLImageProcessor.from_pretrained("ckpt_dir", max_pixels=1280 * 28 * 28)
    >>> out = proc([img_a, "b.jpg"], sizes=[None, {"resized_height": 280, "resized_width": 420}])
    >>> out["pixel_values"].shape, out["image_grid_thw"]        # (N, 1176), [[1, gh, gw], ...]
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from qwen2vl.errors import ConfigError, MediaError
from qwen2vl.processing.media import convert_rgb, load_image
from qwen2vl.processing.tokenizer import BatchFeature

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_RATIO = 200
SIZE_KEYS = ("resized_height", "resized_width", "min_pixels", "max_pixels")


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
    *,
    where: str | None = None,
) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect
    kept as closely as possible (transformers' version, reference-notes §5.2).

    Steps: round each side to the nearest multiple with Python's round (half to even: 70 -> 56,
    98 -> 112); if the area exceeds max_pixels, scale by beta = sqrt(h*w/max_pixels) and floor each
    side to a multiple (at least `factor`); if below min_pixels, scale up by sqrt(min_pixels/(h*w))
    and ceil. Sides below factor/2 may round to 0 before the min_pixels step lifts them.

    Worked example, 480x640 with min 3136 / max 1003520: round -> 476x644 (17*28, 23*28), area
    306544 is within bounds, so (476, 644): grid 34x46 = 1564 patches = 391 tokens.
    1080x1920 with max 1003520: round -> 1092x1932 = 2109744 > max; beta = 1.4310; 1080/beta/28
    = 26.95 -> 26*28 = 728, 1920/beta/28 = 47.9 -> 47*28 = 1316, giving (728, 1316).

    Raises MediaError when a side is 0 or the aspect ratio exceeds 200.
    """
    prefix = f"{where}: " if where else ""
    if height <= 0 or width <= 0:
        raise MediaError(f"{prefix}image is {width}x{height} px; both sides must be at least 1 px")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise MediaError(
            f"{prefix}image is {width}x{height} px (aspect {ratio:.1f}:1); "
            f"absolute aspect ratio must be at most {MAX_RATIO}:1"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def normalize_lut(
    mean: Sequence[float], std: Sequence[float], rescale_factor: float, do_rescale: bool, do_normalize: bool,
    *, prescaled: bool = False,
) -> np.ndarray:
    """(3, 256) float32 table: value of each uint8 level after rescale + normalise, computed with the
    PIL reference's exact numerics (rescale in float64 then cast to float32; normalise in float32).
    `prescaled` reproduces the reference for float [0, 1] arrays, which it rescales twice."""
    levels = np.arange(256, dtype=np.float64)[None, :].repeat(3, 0)  # (3, 256)
    values = levels.astype(np.float32)
    if prescaled:
        values = (levels * (1 / 255)).astype(np.float32)
    if do_rescale:
        values = (values.astype(np.float64) * rescale_factor).astype(np.float32)
    if do_normalize:
        values = (values - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    return np.ascontiguousarray(values, dtype=np.float32)


def _arithmetic(chw: np.ndarray, divisor: np.float32, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """In place on float32 (C, ...): x / divisor, then (x - mean[c]) / std[c] per channel (scalars,
    so numpy runs on contiguous rows; broadcasting over a last axis of 3 is ~10x slower)."""
    for c in range(chw.shape[0]):
        if divisor != 1:
            chw[c] /= divisor
        chw[c] -= mean[c]
        chw[c] /= std[c]
    return chw


def rescale_normalize(hwc: np.ndarray, lut: np.ndarray, plan: tuple | None) -> np.ndarray:
    """uint8 (H, W, C) -> float32 (C, H, W). With a `plan` (divisor, mean, std) verified equal to
    `lut` on all 256 levels the arithmetic route is used (bit-identical, ~3x faster than a gather)."""
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1), dtype=np.float32)  # (C, H, W)
    if plan is not None:
        return _arithmetic(chw, *plan)
    return np.stack([lut[c][hwc[..., c]] for c in range(hwc.shape[-1])])


def arithmetic_plan(lut: np.ndarray, opts: Mapping[str, Any]) -> tuple | None:
    """(divisor, mean, std) float32 whose in-place arithmetic reproduces `lut` exactly, else None."""
    divisor = np.float32(1 / opts["rescale_factor"]) if opts["do_rescale"] else np.float32(1)
    zero, one = np.zeros(3, np.float32), np.ones(3, np.float32)
    mean = np.asarray(opts["image_mean"], np.float32) if opts["do_normalize"] else zero
    std = np.asarray(opts["image_std"], np.float32) if opts["do_normalize"] else one
    levels = np.broadcast_to(np.arange(256, dtype=np.float32), (3, 256)).copy()
    plan = (divisor, mean, std)
    return plan if np.array_equal(_arithmetic(levels, *plan), lut) else None


def patchify(
    chw: np.ndarray, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2
) -> np.ndarray:
    """float32 (C, H, W) -> (gh*gw, C*T*p*p) rows, H and W multiples of patch_size*merge_size.

    Row order: merge blocks row-major, inside a block (0,0),(0,1),(1,0),(1,1); columns (C, T, ph, pw)
    with the frame duplicated T times (an image is a clip of identical frames, reference §5.4).
    """
    channels, height, width = chw.shape
    gh, gw, m, p = height // patch_size, width // patch_size, merge_size, patch_size
    # (C, gh/m, m, p, gw/m, m, p) -> (gh/m, gw/m, mh, mw, C, ph, pw)
    blocks = chw.reshape(channels, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    blocks = np.broadcast_to(blocks[:, :, :, :, :, None], blocks.shape[:5] + (temporal_patch_size, p, p))
    return blocks.reshape(gh * gw, channels * temporal_patch_size * p * p)  # the one full copy


def _array_to_rgb_hwc(array: Any, input_data_format: str | None, where: str | None) -> np.ndarray:
    """numpy/torch image (HW, HWC or CHW; 1, 3 or 4 channels) -> (H, W, 3) in its own dtype. One
    channel is repeated, four are composited on white, as the reference's numpy `convert_to_rgb`."""
    arr = array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)
    prefix = f"{where}: " if where else ""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise MediaError(f"{prefix}image array has shape {arr.shape}; expected (H, W), (H, W, C) or (C, H, W)")
    first = input_data_format in ("channels_first", "first") or (
        input_data_format is None and arr.shape[0] in (1, 3, 4)  # ambiguous shapes count as CHW, as the reference
    )
    if first:
        arr = np.moveaxis(arr, 0, -1)
    channels = arr.shape[-1]
    if channels == 1:
        return np.repeat(arr, 3, axis=-1)
    if channels == 4:
        is_int = np.issubdtype(arr.dtype, np.integer)
        white = 255 if is_int else 1.0
        if not is_int and (arr.min() < 0.0 or arr.max() > 1.0):
            raise MediaError(f"{prefix}RGBA float image has values in [{arr.min()}, {arr.max()}]; expected [0, 1]")
        alpha = arr[..., 3:4] / white
        composite = alpha * arr[..., :3] + (1 - alpha) * white  # onto white, in float64
        return (np.round(composite) if is_int else composite).astype(arr.dtype)
    if channels != 3:
        raise MediaError(f"{prefix}image array has {channels} channels (shape {arr.shape}); 1, 3 or 4 are allowed")
    return arr


def _array_to_uint8(hwc: np.ndarray, where: str | None) -> tuple[np.ndarray, bool]:
    """(uint8 HWC, prescaled): integral values in 0..255 are cast; floats in [0, 1] are scaled by 255 and
    truncated (the reference's `to_pil_image`), and flagged so the output matches its double rescale."""
    if hwc.dtype == np.uint8:
        return hwc, False
    if np.allclose(hwc, hwc.astype(int)):
        if hwc.min() >= 0 and hwc.max() <= 255:
            return hwc.astype(np.uint8), False
    elif hwc.min() >= 0 and hwc.max() <= 1:
        return (hwc.astype(np.float64) * 255).astype(np.float32).astype(np.uint8), True
    prefix = f"{where}: " if where else ""
    raise MediaError(
        f"{prefix}image array values lie in [{hwc.min()}, {hwc.max()}]; "
        "allowed: uint8, integers in 0..255, or floats in [0, 1]"
    )


class VisualProcessorBase:
    """Config handling shared by the image and video processors: the transformers fields, the
    min_pixels/max_pixels aliases of size, from_dict/from_pretrained/to_dict/save_pretrained."""

    config_files: tuple[str, ...] = ("preprocessor_config.json",)
    type_key, type_name = "image_processor_type", "Qwen2VLImageProcessor"
    _FIELDS: dict[str, Any] = {
        "do_resize": True, "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    }
    _IGNORED = ("image_processor_type", "video_processor_type", "processor_class", "auto_map", "backend")

    def __init__(self, **kwargs: Any):
        self.extra: dict[str, Any] = {}
        for key, default in self._FIELDS.items():
            value = kwargs.pop(key, None)
            setattr(self, key, copy.deepcopy(default) if value is None else value)
        self.size = dict(self.size)
        if (min_pixels := kwargs.pop("min_pixels", None)) is not None:
            self.size["shortest_edge"] = int(min_pixels)
        if (max_pixels := kwargs.pop("max_pixels", None)) is not None:
            self.size["longest_edge"] = int(max_pixels)
        self.extra = {k: v for k, v in kwargs.items() if k not in self._IGNORED}
        self._check_size(self.size)

    # ---- configuration -------------------------------------------------------------------------
    @staticmethod
    def _check_size(size: Mapping[str, int]) -> None:
        low, high = size.get("shortest_edge"), size.get("longest_edge")
        if not low or not high or low < 0 or high < 0:  # low > high is allowed: the max bound wins
            raise ConfigError(
                f"processor size={dict(size)}; needs positive 'shortest_edge' (min_pixels) and "
                "'longest_edge' (max_pixels)"
            )

    @property
    def min_pixels(self) -> int:
        return self.size["shortest_edge"]

    @property
    def max_pixels(self) -> int:
        return self.size["longest_edge"]

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], **overrides: Any):
        """Build from a preprocessor_config.json dict; `overrides` (e.g. min_pixels) win over it."""
        merged = dict(config)
        if ("min_pixels" in overrides or "max_pixels" in overrides) and "size" in merged:
            merged["size"] = dict(merged["size"])
        merged.update(overrides)
        return cls(**merged)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any):
        """Read the first of `config_files` in the folder `path` (or the json file `path` itself)."""
        folder = Path(path)
        candidates = [folder / name for name in cls.config_files] if folder.is_dir() else [folder]
        file = next((c for c in candidates if c.is_file()), candidates[0])
        try:
            config = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{file}: cannot read the processor config ({exc}); expected a checkpoint "
                              f"folder with one of {list(cls.config_files)}") from exc
        return cls.from_dict(config, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """preprocessor_config.json content (transformers' keys, plus the min/max_pixels aliases)."""
        out = {key: getattr(self, key) for key in self._FIELDS}
        out["size"] = dict(self.size)
        out.update(min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        out[self.type_key] = self.type_name
        return {**out, **self.extra}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `<directory>/<config_files[0]>`; returns its path."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        file = Path(directory) / self.config_files[0]
        file.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return file

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.to_dict(), sort_keys=True)})"

    def target_size(
        self, height: int, width: int, item: Mapping[str, Any] | None = None, *,
        options: Mapping[str, Any] | None = None, where: str | None = None,
    ) -> tuple[int, int]:
        """Resized (height, width) of one image under this processor's bounds, the call `options`
        and the per-image qwen-vl-utils keys in `item` (resized_height/width take priority)."""
        opts = self.resolve_options(options or {})
        factor = opts["patch_size"] * opts["merge_size"]
        low, high = opts["size"]["shortest_edge"], opts["size"]["longest_edge"]
        item = item or {}
        low, high = item.get("min_pixels") or low, item.get("max_pixels") or high
        if item.get("resized_height") and item.get("resized_width"):
            height, width = int(item["resized_height"]), int(item["resized_width"])
        if not opts["do_resize"] and not any(item.get(key) for key in SIZE_KEYS):
            return height, width
        return smart_resize(height, width, factor, low, high, where=where)

    def resolve_options(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """This processor's fields with call-time `overrides` applied (min/max_pixels map to size)."""
        allowed = set(self._FIELDS) | {"min_pixels", "max_pixels"}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise ConfigError(f"{type(self).__name__} got unknown options {unknown}; allowed: {sorted(allowed)}")
        opts = {key: getattr(self, key) for key in self._FIELDS}
        opts.update({k: v for k, v in overrides.items() if v is not None and k not in ("min_pixels", "max_pixels")})
        opts["size"] = dict(opts["size"])
        if overrides.get("min_pixels") is not None:
            opts["size"]["shortest_edge"] = int(overrides["min_pixels"])
        if overrides.get("max_pixels") is not None:
            opts["size"]["longest_edge"] = int(overrides["max_pixels"])
        self._check_size(opts["size"])
        return opts


class Qwen2VLImageProcessor(VisualProcessorBase):
    """transformers-compatible Qwen2-VL image processor (PIL bicubic backend).

    Pixel bounds come from `size={"shortest_edge", "longest_edge"}` or the aliases `min_pixels` /
    `max_pixels` (constructor, `from_pretrained` overrides, or call arguments); `sizes` gives one
    optional dict per image with qwen-vl-utils' keys `resized_height`/`resized_width`/`min_pixels`/
    `max_pixels`, which then decide that image's target size alone.
    Shapes: pixel_values (sum of gh*gw, 3*T*14*14 = 1176) float32; image_grid_thw (n, 3) int64.
    """

    model_input_names = ["pixel_values", "image_grid_thw"]

    # ---- sizes -------------------------------------------------------------------------------
    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Rows of pixel_values for an image of this size (tokens = rows / merge_size**2)."""
        h, w = self.target_size(height, width, options=images_kwargs)
        patch = (images_kwargs or {}).get("patch_size", self.patch_size)
        return (h // patch) * (w // patch)

    # ---- processing --------------------------------------------------------------------------
    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def preprocess(
        self,
        images: Any,
        return_tensors: str | None = "pt",
        *,
        sizes: Sequence[Mapping[str, Any] | None] | None = None,
        where: str | Sequence[str] | None = None,
        input_data_format: str | None = None,
        **options: Any,
    ) -> BatchFeature:
        """Images (one, a list, or a nested per-sample list of PIL / numpy / torch / path / URL /
        content item) -> {"pixel_values", "image_grid_thw"} as torch ("pt") or numpy ("np"/None).
        `sizes` holds one optional qwen-vl-utils size dict per image; `where` one label per image
        (or a prefix) for error messages. Other keyword options override the constructor's."""
        opts = self.resolve_options(options)
        check_return_tensors(return_tensors)
        flat = flatten_images(images)
        if not flat:
            raise MediaError("images: got no image; pass a PIL image, an array, a path or a list of them")
        labels = [where] * len(flat) if where is None or isinstance(where, str) else list(where)
        sizes = list(sizes) if sizes is not None else [None] * len(flat)
        if len(sizes) != len(flat) or len(labels) != len(flat):
            raise MediaError(f"images: {len(flat)} images but {len(sizes)} sizes / {len(labels)} labels; "
                             "give one entry per image")
        rows, grids = [], []
        for i, image in enumerate(flat):
            label = labels[i] if not isinstance(where, str) else where if len(flat) == 1 else f"{where}[{i}]"
            patches, (gh, gw) = self._process_one(image, opts, sizes[i], input_data_format, label or f"images[{i}]")
            rows.append(patches)
            grids.append([1, gh, gw])
        pixel_values = rows[0] if len(rows) == 1 else np.concatenate(rows, axis=0)
        grid = np.asarray(grids, dtype=np.int64)
        if return_tensors in ("pt", "torch"):
            import torch

            return BatchFeature(pixel_values=torch.from_numpy(pixel_values), image_grid_thw=torch.from_numpy(grid))
        return BatchFeature(pixel_values=pixel_values, image_grid_thw=grid)

    def _process_one(
        self, image: Any, opts: Mapping[str, Any], item: Mapping[str, Any] | None,
        input_data_format: str | None, where: str,
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """One image -> ((gh*gw, 1176) float32 rows, (gh, gw))."""
        if isinstance(image, (str, Path, bytes, Mapping)):
            image = load_image(image, where=where)
        prescaled, values = False, None
        if isinstance(image, Image.Image):
            pil = convert_rgb(image) if opts["do_convert_rgb"] else image
        else:
            hwc = _array_to_rgb_hwc(image, input_data_format, where)
            if not opts["do_resize"] and hwc.dtype != np.uint8:
                values = hwc.astype(np.float64)  # the reference rescales float arrays directly
            else:
                hwc, prescaled = _array_to_uint8(hwc, where)
                pil = Image.fromarray(np.ascontiguousarray(hwc))
        height, width = values.shape[:2] if values is not None else (pil.height, pil.width)
        th, tw = self.target_size(height, width, item, options=opts, where=where)
        factor = opts["patch_size"] * opts["merge_size"]
        if th % factor or tw % factor:
            raise MediaError(f"{where}: image is {width}x{height} px and do_resize=False; "
                             f"both sides must be multiples of {factor} when resizing is off")
        if values is None:
            if (th, tw) != (pil.height, pil.width):
                pil = pil.resize((tw, th), resample=opts["resample"])
            lut = normalize_lut(opts["image_mean"], opts["image_std"], opts["rescale_factor"],
                                opts["do_rescale"], opts["do_normalize"], prescaled=prescaled)
            plan = None if prescaled else arithmetic_plan(lut, opts)
            values = rescale_normalize(np.asarray(pil), lut, plan)  # (3, H, W) float32
        else:
            values = _normalize_float(values, opts).transpose(2, 0, 1)  # (3, H, W)
        grid = (th // opts["patch_size"], tw // opts["patch_size"])
        return patchify(values, opts["patch_size"], opts["merge_size"], opts["temporal_patch_size"]), grid


def _normalize_float(values: np.ndarray, opts: Mapping[str, Any]) -> np.ndarray:
    """Float HWC (float64) -> float32 with the reference's numerics (no lookup table possible)."""
    out = (values * opts["rescale_factor"]).astype(np.float32) if opts["do_rescale"] else values.astype(np.float32)
    if opts["do_normalize"]:
        out = (out - np.asarray(opts["image_mean"], np.float32)) / np.asarray(opts["image_std"], np.float32)
    return out


def check_return_tensors(return_tensors: Any) -> None:
    """Raise ConfigError unless return_tensors is "pt" (torch), "np" or None (numpy)."""
    if return_tensors not in ("pt", "torch", "np", None):
        raise ConfigError(f"return_tensors={return_tensors!r} is not supported; use 'pt', 'np' or None")


def flatten_images(images: Any) -> list[Any]:
    """One image, a list, or a nested (per-sample) list -> flat list of images."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [leaf for entry in images for leaf in flatten_images(entry)]
    if hasattr(images, "ndim") and images.ndim == 4:  # (B, H, W, C) / (B, C, H, W) batch
        return list(images)
    return [images]


Qwen2VLImageProcessorPil = Qwen2VLImageProcessor  # PIL is our default (and only) image backend
