"""Qwen2-VL video preprocessing: frame-index sampling (pure), per-video smart resize with torch's
antialiased bicubic on uint8 (the kernel torchvision uses on CPU), fused rescale/normalise, temporal
patchify -> `pixel_values_videos` (N, 1176) and `video_grid_thw` (n, 3).

Imports errors and processing.{media, image, tokenizer (BatchFeature)}; equal to transformers 5.24's Qwen2VLVideoProcessor.

    >>> proc = Qwen2VLVideoProcessor.from_pretrained("ckpt_dir")
    >>> out = proc("clip.mp4", fps=2.0, return_metadata=True)
    >>> out["video_grid_thw"], out["video_metadata"][0].timestamps      # [[t, gh, gw]], seconds
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwen2vl.errors import MediaError
from qwen2vl.processing.image import VisualProcessorBase, check_return_tensors
from qwen2vl.processing.media import VideoMetadata, load_frames, load_video
from qwen2vl.processing.tokenizer import BatchFeature

FRAME_KEYS = ("fps", "num_frames", "nframes", "min_frames", "max_frames")


def sample_frame_indices(
    total_frames: int,
    video_fps: float | None,
    *,
    fps: float | None = None,
    num_frames: int | None = None,
    min_frames: int = 4,
    max_frames: int = 768,
    temporal_patch_size: int = 2,
    where: str | None = None,
) -> list[int]:
    """Indices of the frames to keep, as transformers' `Qwen2VLVideoProcessor.sample_frames` (§6.1).

    num_frames: n = round(num_frames / tps) * tps. fps: n = total / video_fps * fps, clamped to
    [min_frames, floor(min(max_frames, total) / tps) * tps] and to total, then floored to a multiple
    of tps. Neither: every frame. Indices are float32 `arange(0, total, total / n)` truncated, i.e.
    floor(i * total / n). Example: 300 frames at 30 fps with fps=2 -> n = 20 -> [0, 15, 30, ..., 285];
    num_frames=7 -> n = 8 -> [0, 37, 75, 112, 150, 187, 225, 262]; 9 frames at 30 fps, fps=2 -> n =
    max(0.6, 4) = 4 -> [0, 2, 4, 6].
    """
    prefix = f"{where}: " if where else ""
    if fps is not None and num_frames is not None:
        raise MediaError(f"{prefix}got fps={fps} and num_frames={num_frames}; pass only one of them")
    if total_frames <= 0:
        raise MediaError(f"{prefix}video has {total_frames} frames; at least one is needed")
    if num_frames is not None:
        n = round(num_frames / temporal_patch_size) * temporal_patch_size
    elif fps is not None:
        if not video_fps:
            raise MediaError(f"{prefix}fps={fps} sampling needs the video's frame rate, which is unknown; "
                             "pass num_frames instead, or video_metadata={'fps': ...} for arrays")
        cap = math.floor(min(max_frames, total_frames) / temporal_patch_size) * temporal_patch_size
        n = min(max(total_frames / video_fps * fps, min_frames), cap, total_frames)
        n = math.floor(n / temporal_patch_size) * temporal_patch_size
    else:
        return list(range(total_frames))
    if n <= 0 or n > total_frames:
        raise MediaError(
            f"{prefix}sampling asks for {n} frames of a {total_frames}-frame video (fps={fps}, "
            f"num_frames={num_frames}); the count must lie in 1..{total_frames}"
        )
    # torch's float32 arange reproduces the reference's indices bit for bit (its rounding included)
    return torch.arange(0, total_frames, total_frames / n).int().tolist()


def _to_tchw(video: Any, where: str) -> torch.Tensor:
    """(T, H, W, C) or (T, C, H, W) numpy/torch video -> uint8 torch (T, 3, H, W)."""
    tensor = video if isinstance(video, torch.Tensor) else torch.from_numpy(np.asarray(video))
    if tensor.ndim != 4:
        raise MediaError(f"{where}: video array has shape {tuple(tensor.shape)}; expected (T, H, W, C) or (T, C, H, W)")
    if tensor.shape[1] not in (1, 3, 4) and tensor.shape[-1] in (1, 3, 4):
        tensor = tensor.permute(0, 3, 1, 2)  # THWC -> TCHW
    if tensor.shape[1] == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    elif tensor.shape[1] == 4:  # composite on white, as the reference's video convert_to_rgb
        alpha = tensor[:, 3:4] / 255.0
        tensor = tensor[:, :3] if bool((tensor[:, 3] == 255).all()) else (1 - alpha) * 255 + alpha * tensor[:, :3]
    elif tensor.shape[1] != 3:
        raise MediaError(f"{where}: video frames have shape {tuple(tensor.shape[1:])}; 1, 3 or 4 channels are allowed")
    if tensor.dtype != torch.uint8:
        tensor = tensor.round().clamp(0, 255).to(torch.uint8) if tensor.is_floating_point() else tensor.to(torch.uint8)
    if 0 in tensor.shape:
        raise MediaError(f"{where}: video array has shape {tuple(tensor.shape)}; it has no pixels")
    return tensor.contiguous()


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (T, 3, H, W) -> uint8 (T, 3, height, width) with antialiased bicubic; the same kernel and
    rounding torchvision's `resize` uses on CPU for uint8 (no-op when the size already matches)."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    return torch.nn.functional.interpolate(frames, size=(height, width), mode="bicubic", align_corners=False,
                                           antialias=True)


def patchify_video(values: torch.Tensor, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2
                   ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """float32 (T, C, H, W) -> ((t*gh*gw, C*tps*p*p), (t, gh, gw)); odd T repeats the last frame.

    Row order (t, gh/m, gw/m, mh, mw); columns (C, tps, ph, pw): each row holds tps consecutive frames.
    """
    if pad := -values.shape[0] % temporal_patch_size:
        values = torch.cat([values, values[-1:].expand(pad, -1, -1, -1)])
    frames, channels, height, width = values.shape
    t, gh, gw, m, p = frames // temporal_patch_size, height // patch_size, width // patch_size, merge_size, patch_size
    # (t, tps, C, gh/m, m, p, gw/m, m, p) -> (t, gh/m, gw/m, mh, mw, C, tps, ph, pw)
    blocks = values.reshape(t, temporal_patch_size, channels, gh // m, m, p, gw // m, m, p)
    blocks = blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return blocks.reshape(t * gh * gw, channels * temporal_patch_size * p * p), (t, gh, gw)


class Qwen2VLVideoProcessor(VisualProcessorBase):
    """transformers-compatible Qwen2-VL video processor.

    Frames are sampled when `do_sample_frames` is set or when `fps`/`num_frames` is passed to the call
    (transformers ignores fps/num_frames unless do_sample_frames=True; its chat template turns it on).
    `sizes` gives one optional dict per video with qwen-vl-utils keys (resized_height, resized_width,
    min_pixels, max_pixels, fps, nframes/num_frames, min_frames, max_frames). With
    `return_metadata=True` the output holds `video_metadata`: per video, the frame indices used, their
    timestamps in seconds and the effective fps.
    Shapes: pixel_values_videos (sum of t*gh*gw, 1176) float32; video_grid_thw (n, 3) int64.
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw"]
    config_files = ("video_preprocessor_config.json", "preprocessor_config.json")
    type_key, type_name = "video_processor_type", "Qwen2VLVideoProcessor"
    _FIELDS: dict[str, Any] = {
        **VisualProcessorBase._FIELDS,
        "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28},
        "min_frames": 4, "max_frames": 768, "do_sample_frames": False, "fps": None, "num_frames": None,
        "cap_pixels_per_frame": False, "max_video_tokens": 128000,
    }

    def __call__(self, videos: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(videos, **kwargs)

    def preprocess(
        self,
        videos: Any,
        return_tensors: str | None = "pt",
        *,
        sizes: Sequence[Mapping[str, Any] | None] | None = None,
        where: str | Sequence[str] | None = None,
        video_metadata: Any = None,
        return_metadata: bool = False,
        **options: Any,
    ) -> BatchFeature:
        """Videos (one or a list of: path/URL/content item, (T,H,W,C)/(T,C,H,W) array, list of frames)
        -> {"pixel_values_videos", "video_grid_thw"[, "video_metadata"]}."""
        if (options.get("fps") is not None or options.get("num_frames") is not None) \
                and options.get("do_sample_frames") is None:
            options["do_sample_frames"] = True
        opts = self.resolve_options(options)
        check_return_tensors(return_tensors)
        flat = flatten_videos(videos)
        if not flat:
            raise MediaError("videos: got no video; pass a path, URL, (T, H, W, C) array or a list of frames")
        count = len(flat)
        labels = [where] * count if where is None or isinstance(where, str) else list(where)
        sizes = list(sizes) if sizes is not None else [None] * count
        metas = video_metadata if isinstance(video_metadata, (list, tuple)) else [video_metadata] * count
        if not len(labels) == len(sizes) == len(metas) == count:
            raise MediaError(f"videos: {count} videos but {len(sizes)} sizes / {len(labels)} labels / "
                             f"{len(metas)} metadata entries; give one entry per video")
        rows, grids, used = [], [], []
        for i, video in enumerate(flat):
            label = labels[i] if not isinstance(where, str) else where if count == 1 else f"{where}[{i}]"
            label = label or f"videos[{i}]"
            frames, meta = self._decode(video, opts, sizes[i] or {}, metas[i], label)
            patches, grid = self._pixels(frames, opts, sizes[i] or {}, label)
            rows.append(patches)
            grids.append(grid)
            used.append(meta)
        pixel_values = rows[0] if count == 1 else torch.cat(rows)
        out = BatchFeature(pixel_values_videos=pixel_values, video_grid_thw=torch.tensor(grids, dtype=torch.int64))
        if return_tensors not in ("pt", "torch"):
            out = BatchFeature({key: value.numpy() for key, value in out.items()})
        if return_metadata:
            out["video_metadata"] = used
        return out

    def _decode(self, video: Any, opts: Mapping[str, Any], item: Mapping[str, Any], meta_in: Any, where: str
                ) -> tuple[torch.Tensor, VideoMetadata]:
        """One video -> (uint8 (T, 3, H, W) sampled frames, metadata of the frames used)."""
        own = any(item.get(key) is not None for key in ("fps", "nframes", "num_frames"))
        sample = opts["do_sample_frames"] or own
        fps = item.get("fps") if own else opts["fps"]
        num_frames = (item.get("nframes") or item.get("num_frames")) if own else opts["num_frames"]
        bounds = {"min_frames": item.get("min_frames", opts["min_frames"]),
                  "max_frames": item.get("max_frames", opts["max_frames"]),
                  "temporal_patch_size": opts["temporal_patch_size"]}

        def indices_fn(total: int, video_fps: float | None) -> list[int]:
            return sample_frame_indices(total, video_fps, fps=fps, num_frames=num_frames, where=where, **bounds)

        if isinstance(video, (str, Path, bytes, Mapping)):
            frames, meta = load_video(video, indices_fn if sample else None, where=where)
            return torch.from_numpy(frames).permute(0, 3, 1, 2), meta
        if isinstance(video, (list, tuple)):
            if sample:
                raise MediaError(f"{where}: a video given as a list of frames cannot be sampled (fps={fps}, "
                                 f"num_frames={num_frames}); pass the frames you want, or a video file")
            tensor = _to_tchw(load_frames(video, where=where), where)
        else:
            tensor = _to_tchw(video, where)
        given = dict(meta_in.to_dict() if isinstance(meta_in, VideoMetadata) else meta_in or {})
        total = tensor.shape[0]
        indices = indices_fn(total, given.get("fps")) if sample else list(range(total))
        meta = VideoMetadata(total_num_frames=total, fps=given.get("fps"), width=tensor.shape[-1],
                             height=tensor.shape[-2], duration=total / given["fps"] if given.get("fps") else None,
                             video_backend="array", frames_indices=indices)
        return (tensor[indices] if sample else tensor), meta

    def _pixels(self, frames: torch.Tensor, opts: Mapping[str, Any], item: Mapping[str, Any], where: str
                ) -> tuple[torch.Tensor, list[int]]:
        """uint8 (T, 3, H, W) -> ((t*gh*gw, 1176) float32 rows, [t, gh, gw])."""
        size = dict(opts["size"])
        if opts["cap_pixels_per_frame"]:  # bound the whole video's pixels as qwen-vl-utils does (§6.1)
            factor = opts["patch_size"] * opts["merge_size"]
            total = int(opts["max_video_tokens"] * factor * factor * 0.9)
            size["longest_edge"] = max(min(size["longest_edge"], total * opts["temporal_patch_size"] // frames.shape[0]),
                                       int(size["shortest_edge"] * 1.05))
        height, width = self.target_size(frames.shape[-2], frames.shape[-1], item, options={**opts, "size": size},
                                         where=where)
        factor = opts["patch_size"] * opts["merge_size"]
        if height % factor or width % factor:
            raise MediaError(f"{where}: frames are {width}x{height} px and do_resize=False; "
                             f"both sides must be multiples of {factor} when resizing is off")
        values = resize_frames(frames, height, width).to(torch.float32)
        if opts["do_normalize"]:  # fused rescale + normalise in float32, as the reference's torchvision path
            scale = 1.0 / opts["rescale_factor"] if opts["do_rescale"] else 1.0
            mean = torch.tensor(opts["image_mean"]) * scale
            std = torch.tensor(opts["image_std"]) * scale
            values.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
        elif opts["do_rescale"]:
            values = values * opts["rescale_factor"]
        patches, grid = patchify_video(values, opts["patch_size"], opts["merge_size"], opts["temporal_patch_size"])
        return patches, list(grid)


def flatten_videos(videos: Any) -> list[Any]:
    """One video or a list of videos -> list. A video is a path/URL/bytes/content item, a 4-D array,
    or a list of frames (PIL images / 3-D arrays, or nested lists of frame paths)."""
    if videos is None:
        return []
    if isinstance(videos, (list, tuple)):
        if videos and all(_is_frame(v) for v in videos):
            return [list(videos)]  # one video given as frames
        return [v for entry in videos for v in (flatten_videos(entry) if _is_batch(entry) else [entry])]
    if getattr(videos, "ndim", 0) == 5:  # (B, T, ...) batch
        return list(videos)
    return [videos]


def _is_frame(value: Any) -> bool:
    return hasattr(value, "getbands") or getattr(value, "ndim", 0) == 3


def _is_batch(value: Any) -> bool:
    """A nested list holding several videos (not the frames of one)."""
    return isinstance(value, (list, tuple)) and bool(value) and not all(
        _is_frame(v) or isinstance(v, (str, Path)) for v in value)
