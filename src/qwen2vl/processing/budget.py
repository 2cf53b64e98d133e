"""Token budgeting without pixel work: visual tokens per image/video from sizes, image headers and video
container metadata alone, so a caller knows a request's cost before running it.

Also holds the content-block keys the processor and the budget share. Imports errors and processing siblings.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qwen2vl.errors import MediaError, MissingDependencyError
from qwen2vl.processing import media
from qwen2vl.processing.video import sample_frame_indices

# options both vision processors accept (transformers passes common kwargs to both)
VISION_OPTIONS = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                  "image_std", "do_convert_rgb", "patch_size", "temporal_patch_size", "merge_size",
                  "min_pixels", "max_pixels")
VIDEO_ONLY_OPTIONS = ("fps", "num_frames", "do_sample_frames", "min_frames", "max_frames", "video_metadata",
                      "return_metadata")
SIZE_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")  # qwen-vl-utils per-item keys
FRAME_ITEM_KEYS = ("fps", "nframes", "num_frames", "min_frames", "max_frames")  # per-video, qwen-vl-utils
IMAGE_SOURCE_KEYS = ("image", "url", "path", "image_url", "base64")
VIDEO_SOURCE_KEYS = ("video", "url", "path")


@dataclass
class VisualTokenCount:
    """Visual tokens (and ViT patches = 4x tokens) per image and per video, as the processor would make them."""

    num_image_tokens: list[int] = field(default_factory=list)
    num_image_patches: list[int] = field(default_factory=list)
    num_video_tokens: list[int] = field(default_factory=list)
    num_video_patches: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.num_image_tokens) + sum(self.num_video_tokens)

    def __getitem__(self, key: str) -> Any:  # dict-style access, like transformers' MultiModalData
        return getattr(self, key)


def count_visual_tokens(image_processor: Any, video_processor: Any,
                        image_sizes: Sequence[Sequence[int]] | None = None,
                        video_sizes: Sequence[Sequence[int]] | None = None, *,
                        image_items: Sequence[Mapping | None] | None = None,
                        video_items: Sequence[Mapping | None] | None = None, **options: Any) -> VisualTokenCount:
    """Tokens from (h, w) image sizes and (t, h, w) video sizes (t = frames the processor will use).

    `options` are processor options (min_pixels, max_pixels, patch_size, merge_size, ...); `*_items` give one
    optional qwen-vl-utils size dict per item (resized_height/width, min/max_pixels).
    """
    count = VisualTokenCount()
    for k, (h, w) in enumerate(image_sizes or []):
        item = image_items[k] if image_items else None
        opts = {key: v for key, v in options.items() if key in VISION_OPTIONS}
        th, tw = image_processor.target_size(int(h), int(w), item, options=opts, where=f"image_sizes[{k}]")
        patch = opts.get("patch_size") or image_processor.patch_size
        merge = opts.get("merge_size") or image_processor.merge_size
        patches = (th // patch) * (tw // patch)
        count.num_image_patches.append(patches)
        count.num_image_tokens.append(patches // merge**2)
    for k, (t, h, w) in enumerate(video_sizes or []):
        item = video_items[k] if video_items else None
        patch = options.get("patch_size") or video_processor.patch_size
        merge = options.get("merge_size") or video_processor.merge_size
        tps = options.get("temporal_patch_size") or video_processor.temporal_patch_size
        opts = {key: v for key, v in options.items() if key in VISION_OPTIONS}
        th, tw = video_processor.target_size(int(h), int(w), item, options=opts, where=f"video_sizes[{k}]")
        patches = -(-int(t) // tps) * (th // patch) * (tw // patch)  # frames padded up to a multiple of tps
        count.num_video_patches.append(patches)
        count.num_video_tokens.append(patches // merge**2)
    return count


def count_conversation_tokens(image_processor: Any, video_processor: Any,
                              conversations: Sequence[Sequence[Mapping]], **options: Any) -> VisualTokenCount:
    """Tokens of the conversations' media from image headers and video container metadata only.

    With `fps` / `num_frames` the video frame count is the sampled one, as apply_chat_template would use.
    """
    image_sizes, image_items, video_sizes, video_items = [], [], [], []
    for i, messages in enumerate(conversations):
        for m, message in enumerate(messages):
            content = message.get("content")
            for j, block in enumerate(content if isinstance(content, list) else []):
                where = f"conversations[{i}].messages[{m}].content[{j}]"
                items = {k: block[k] for k in SIZE_KEYS if block.get(k) is not None} or None
                keys = IMAGE_SOURCE_KEYS if block.get("type") == "image" else VIDEO_SOURCE_KEYS
                for key in keys if block.get("type") in ("image", "video") else ():
                    if block.get(key) is None:
                        continue
                    if block["type"] == "image":
                        image_sizes.append(_image_header_size(block[key], key, where))
                        image_items.append(items)
                    else:
                        frame_opts = _item_frame_options(block, options)
                        video_sizes.append(_video_header_size(block[key], where, frame_opts, video_processor))
                        video_items.append(items)
    return count_visual_tokens(image_processor, video_processor, image_sizes, video_sizes,
                               image_items=image_items, video_items=video_items, **options)


def _item_frame_options(block: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """Frame-sampling options for one video: its own qwen-vl-utils keys win over the call's (as in video.py)."""
    own = {k: block[k] for k in FRAME_ITEM_KEYS if block.get(k) is not None}
    if not any(k in own for k in ("fps", "nframes", "num_frames")):
        return dict(options)
    merged = {k: v for k, v in options.items() if k not in ("fps", "num_frames")}
    merged.update(fps=own.get("fps"), num_frames=own.get("nframes") or own.get("num_frames"))
    merged.update({k: own[k] for k in ("min_frames", "max_frames") if k in own})
    return merged


def _image_header_size(source: Any, key: str, where: str) -> tuple[int, int]:
    """(height, width) after EXIF orientation, read from the file header (no pixel decoding)."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.height, source.width
    if hasattr(source, "shape"):  # array: HWC or CHW
        shape = source.shape
        return (shape[1], shape[2]) if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4) \
            else (shape[0], shape[1])
    if isinstance(source, Mapping):
        source = source.get("url")
    if key == "base64" and isinstance(source, str) and not source.startswith("data:"):
        source = "data:;base64," + source
    data = media.read_source(source, where=where)
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)  # EXIF orientation 5..8 swap the sides
    except OSError as exc:
        raise MediaError(f"{where}: {str(source)[:80]!r} is not a readable image ({exc}); "
                         "pass a JPEG/PNG/WebP/... file, URL or data URI") from exc
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def _video_header_size(source: Any, where: str, options: Mapping[str, Any], video_processor: Any) -> tuple[int, int, int]:
    """(frames used, height, width) from the container's stream metadata (frames are not decoded)."""
    if hasattr(source, "shape"):  # (T, H, W, C) array
        total, height, width, rate = source.shape[0], source.shape[1], source.shape[2], None
    else:
        try:
            import av
        except ImportError as exc:
            raise MissingDependencyError("video metadata needs PyAV; pip install 'qwen2vl[video]'") from exc
        data = media.read_source(source, where=where)
        try:
            with av.open(io.BytesIO(data) if isinstance(data, bytes) else str(data)) as container:
                stream = container.streams.video[0]
                total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
                rate = stream.average_rate or stream.guessed_rate
                height, width = stream.height, stream.width
        except (av.FFmpegError, OSError, IndexError) as exc:
            raise MediaError(f"{where}: {str(source)[:80]!r} cannot be read as a video ({exc}); "
                             "pass an mp4/webm/mkv/... file, URL or data URI") from exc
    if options.get("fps") is not None or options.get("num_frames") is not None:
        tps = options.get("temporal_patch_size") or video_processor.temporal_patch_size
        frame_opts = {k: options[k] for k in ("min_frames", "max_frames") if options.get(k) is not None}
        total = len(sample_frame_indices(total, float(rate) if rate else None, fps=options.get("fps"),
                                         num_frames=options.get("num_frames"), temporal_patch_size=tps,
                                         where=where, **frame_opts))
    return int(total), int(height), int(width)
