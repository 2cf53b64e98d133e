"""Qwen2VLProcessor: text + images + videos -> BatchFeature, expanding each vision placeholder to its grid's
token count (reference-notes §7.3); chat-template entry point; token budgeting without pixel work.

Imports only errors and sibling processing modules.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qwen2vl.errors import ChatTemplateError, CheckpointError, InputError, MediaError
from qwen2vl.processing import chat, media
from qwen2vl.processing.budget import (FRAME_ITEM_KEYS, IMAGE_SOURCE_KEYS, SIZE_KEYS, VIDEO_ONLY_OPTIONS,
                                       VIDEO_SOURCE_KEYS, VISION_OPTIONS, VisualTokenCount,
                                       count_conversation_tokens, count_visual_tokens)
from qwen2vl.processing.image import Qwen2VLImageProcessor, flatten_images
from qwen2vl.processing.tokenizer import BatchFeature, Qwen2Tokenizer, as_tensor, resolve_directory, to_list
from qwen2vl.processing.video import Qwen2VLVideoProcessor, flatten_videos

__all__ = ["AutoProcessor", "BatchFeature", "Qwen2VLProcessor", "VisualTokenCount"]

logger = logging.getLogger(__name__)

TEXT_KWARGS = ("padding", "truncation", "max_length", "padding_side", "pad_to_multiple_of", "return_attention_mask")

class Qwen2VLProcessor:
    """transformers-compatible processor wrapping Qwen2Tokenizer, the image and the video processor."""

    image_token = "<|image_pad|>"
    video_token = "<|video_pad|>"

    def __init__(self, image_processor: Any = None, tokenizer: Qwen2Tokenizer | None = None,
                 video_processor: Any = None, chat_template: str | None = None, **kwargs: Any):
        if tokenizer is None:
            raise InputError("Qwen2VLProcessor: tokenizer is required; pass Qwen2Tokenizer.from_pretrained(dir)")
        self.tokenizer = tokenizer
        self.image_processor = image_processor if image_processor is not None else Qwen2VLImageProcessor()
        self.video_processor = video_processor if video_processor is not None else Qwen2VLVideoProcessor()
        self.chat_template = chat_template if chat_template is not None else tokenizer.chat_template
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    # ---- loading and saving ----
    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> Qwen2VLProcessor:
        """Tokenizer files + preprocessor_config.json (+ video_preprocessor_config.json) of a checkpoint.

        `min_pixels` / `max_pixels` (and other processor options) override both the image and the video
        processor, as the reference does; without a video config the video processor reads
        preprocessor_config.json too.
        """
        folder = resolve_directory(path)
        template = kwargs.pop("chat_template", None)
        tokenizer_keys = {k: kwargs.pop(k) for k in ("padding_side", "model_max_length") if k in kwargs}
        tokenizer = Qwen2Tokenizer.from_pretrained(folder, **tokenizer_keys)
        image_opts, video_opts = _route_options(kwargs, warn=False)
        nested = _read_json(folder / "processor_config.json")  # transformers 5's save layout
        image_config = _read_json(folder / "preprocessor_config.json") or nested.get("image_processor") or {}
        video_config = (_read_json(folder / "video_preprocessor_config.json") or nested.get("video_processor")
                        or image_config)
        image_processor = Qwen2VLImageProcessor.from_dict(image_config, **image_opts)
        video_processor = Qwen2VLVideoProcessor.from_dict(video_config, **video_opts)
        return cls(image_processor, tokenizer, video_processor, chat_template=template or tokenizer.chat_template)

    def save_pretrained(self, directory: str | Path) -> list[str]:
        """preprocessor_config.json, video_preprocessor_config.json, tokenizer files and chat_template.json."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        image_file = Path(self.image_processor.save_pretrained(out))
        config = json.loads(image_file.read_text(encoding="utf-8"))
        config["processor_class"] = "Qwen2VLProcessor"  # lets transformers' AutoProcessor pick the processor
        image_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        files = [str(image_file)]
        if hasattr(self.video_processor, "save_pretrained"):
            files.append(str(self.video_processor.save_pretrained(out)))
        files.extend(self.tokenizer.save_pretrained(out))
        if self.chat_template is not None:
            path = out / "chat_template.json"
            path.write_text(json.dumps({"chat_template": self.chat_template}, ensure_ascii=False, indent=2),
                            encoding="utf-8")
            files.append(str(path))
        return files

    # ---- main call ----
    def __call__(self, images: Any = None, text: str | Sequence[str] | None = None, videos: Any = None,
                 return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        """Tokenize `text` with each `<|image_pad|>` / `<|video_pad|>` expanded to its grid's token count.

        The k-th placeholder over the flattened batch takes the k-th image (video). Keyword options:
        tokenizer ones (padding, truncation, max_length, padding_side, ...), image/video processor ones
        (min_pixels, max_pixels, fps, num_frames, do_sample_frames, ...), `image_sizes` / `video_sizes`
        (one qwen-vl-utils size dict per item) and `image_where` / `video_where` (labels for errors).
        """
        if images is None and text is None and videos is None:
            raise InputError("Qwen2VLProcessor: got no input; pass text=, images= and/or videos=")
        text_kwargs = {k: kwargs.pop(k) for k in TEXT_KWARGS if k in kwargs}
        return_mm = kwargs.pop("return_mm_token_type_ids", True)
        image_opts, video_opts = _route_options(kwargs)
        texts = _as_text_list(text)
        self._check_counts(texts, images, videos)
        data: dict[str, Any] = {}
        image_tokens: list[int] = []
        video_tokens: list[int] = []
        if images is not None:
            data.update(self.image_processor(flatten_images(images), return_tensors="pt", **image_opts))
            merge = self.image_processor.merge_size ** 2
            image_tokens = [int(g[0] * g[1] * g[2]) // merge for g in to_list(data["image_grid_thw"])]
        if videos is not None:
            data.update(self.video_processor(videos, return_tensors="pt", **video_opts))
            merge = self.video_processor.merge_size ** 2
            video_tokens = [int(g[0] * g[1] * g[2]) // merge for g in to_list(data["video_grid_thw"])]
        if texts is not None:
            expanded = self.expand_placeholders(texts, image_tokens, video_tokens)
            encoded = self.tokenizer(expanded, **text_kwargs)
            self._check_truncation(expanded, encoded["input_ids"])
            data = {**dict(encoded), **data}
            if return_mm:
                data["mm_token_type_ids"] = self.create_mm_token_type_ids(encoded["input_ids"])
        return _finalize(data, return_tensors)

    def expand_placeholders(self, texts: list[str], image_tokens: Sequence[int],
                            video_tokens: Sequence[int]) -> list[str]:
        """Replace the k-th placeholder (scanning rows in order) by image_tokens[k] / video_tokens[k] copies."""
        counters = {self.image_token: iter(image_tokens), self.video_token: iter(video_tokens)}
        active = [t for t, n in ((self.image_token, image_tokens), (self.video_token, video_tokens)) if n]
        if not active:
            return list(texts)
        pattern = re.compile("|".join(re.escape(t) for t in active))
        return [pattern.sub(lambda m: m.group(0) * next(counters[m.group(0)]), row) for row in texts]

    def create_mm_token_type_ids(self, input_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """Per token: 1 for <|image_pad|>, 2 for <|video_pad|>, 0 otherwise (padding included)."""
        kinds = {self.image_token_id: 1, self.video_token_id: 2}
        return [[kinds.get(int(i), 0) for i in row] for row in to_list(input_ids)]

    def _check_counts(self, texts: list[str] | None, images: Any, videos: Any) -> None:
        if texts is None:
            return
        for token, items, kind in ((self.image_token, images, "images"), (self.video_token, videos, "videos")):
            per_row = [row.count(token) for row in texts]
            if items is None:
                if any(per_row):
                    raise InputError(f"text: found {sum(per_row)} {token} placeholders (per prompt: {per_row}) "
                                     f"but no {kind} were passed; pass {kind}= or remove the placeholders")
                continue
            given = len(flatten_images(items) if kind == "images" else flatten_videos(items))
            if sum(per_row) != given:
                raise InputError(f"text: found {sum(per_row)} {token} placeholders (per prompt: {per_row}) but "
                                 f"{given} {kind} were passed{_first_mismatch(per_row, items, kind)}; "
                                 f"give one {kind[:-1]} per placeholder")

    def _check_truncation(self, texts: list[str], input_ids: Any) -> None:
        for token, token_id in ((self.image_token, self.image_token_id), (self.video_token, self.video_token_id)):
            for i, (row, ids) in enumerate(zip(texts, to_list(input_ids))):
                if row.count(token) != list(ids).count(token_id):
                    raise InputError(f"text[{i}]: truncation cut {token} placeholders ({row.count(token)} in the "
                                     f"text, {list(ids).count(token_id)} after tokenizing); raise max_length or "
                                     "turn truncation off")

    # ---- chat ----
    def apply_chat_template(self, conversation: Any, chat_template: str | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = False,
                            return_dict: bool = False, return_tensors: str | None = "auto",
                            processor_kwargs: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """Render conversation(s); with tokenize=True also load their media and run the processor.

        Media come from content blocks of type "image" (keys image/url/path/image_url/base64) and
        "video" (keys video/url/path); per-block min_pixels/max_pixels/resized_height/resized_width are
        honoured. `fps` / `num_frames` switch frame sampling on. Keyword arguments that the template
        does not use go to the processor (padding, fps, min_pixels, ...).
        """
        template = chat_template if chat_template is not None else self.chat_template
        template = template if template is not None else chat.QWEN2_VL_CHAT_TEMPLATE
        batched = chat.is_batched(conversation)
        conversations = [chat.normalize_conversation(c, i)
                         for i, c in enumerate(conversation if batched else [conversation])]
        used = chat.template_variables(template)
        proc_kwargs = dict(processor_kwargs or {})
        proc_kwargs.update({k: v for k, v in kwargs.items() if k not in used})
        template_kwargs = {**self.tokenizer.special_tokens_map, **{k: v for k, v in kwargs.items() if k in used}}
        prompts = chat.render_conversations(conversations, template, add_generation_prompt, **template_kwargs)
        if not tokenize:
            return prompts if batched else prompts[0]
        images, image_sizes, image_where, videos, video_sizes, video_where = collect_media(conversations)
        if ("fps" in proc_kwargs or "num_frames" in proc_kwargs) and "do_sample_frames" not in proc_kwargs:
            proc_kwargs["do_sample_frames"] = True
        if images:
            proc_kwargs.update(image_sizes=image_sizes, image_where=image_where)
        if videos:
            proc_kwargs.update(video_sizes=video_sizes, video_where=video_where)
        if not videos:
            for key in ("fps", "num_frames", "do_sample_frames"):
                proc_kwargs.pop(key, None)
        out = self(text=prompts, images=images or None, videos=videos or None,
                   return_tensors=None if return_tensors == "auto" else return_tensors, **proc_kwargs)
        return out if return_dict else out["input_ids"]

    # ---- decoding ----
    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str | list[str]:
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs: Any, skip_special_tokens: bool = True,
                                        clean_up_tokenization_spaces: bool = False, **kwargs: Any) -> list[str]:
        """batch_decode with the reference's defaults for generated ids."""
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens,
                                           clean_up_tokenization_spaces=clean_up_tokenization_spaces)

    # ---- budgeting ----
    def count_visual_tokens(self, image_sizes: Sequence[Sequence[int]] | None = None,
                            video_sizes: Sequence[Sequence[int]] | None = None, **options: Any) -> VisualTokenCount:
        """Visual tokens per item and in total from (h, w) image sizes and (t, h, w) video sizes alone."""
        return count_visual_tokens(self.image_processor, self.video_processor, image_sizes, video_sizes, **options)

    def count_conversation_tokens(self, conversation: Any, **options: Any) -> VisualTokenCount:
        """Visual tokens of conversation(s) from image headers and video container metadata (no decoding)."""
        batched = chat.is_batched(conversation)
        conversations = [chat.normalize_conversation(c, i)
                         for i, c in enumerate(conversation if batched else [conversation])]
        return count_conversation_tokens(self.image_processor, self.video_processor, conversations, **options)

    def _get_num_multimodal_tokens(self, image_sizes: Any = None, video_sizes: Any = None,
                                   **kwargs: Any) -> VisualTokenCount:
        """transformers' name for count_visual_tokens."""
        return self.count_visual_tokens(image_sizes, video_sizes, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                "pixel_values_videos", "video_grid_thw", "mm_token_type_ids"]


class AutoProcessor:
    """transformers-style entry point: `AutoProcessor.from_pretrained(path, min_pixels=..., max_pixels=...)`."""

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> Qwen2VLProcessor:
        return Qwen2VLProcessor.from_pretrained(path, **kwargs)


def collect_media(conversations: Sequence[Sequence[Mapping]]) -> tuple[list, list, list, list, list, list]:
    """Images and videos of each conversation, in order, with their size dicts and error labels.

    Images are loaded here (so errors name `conversations[i].messages[m].content[j]`); video sources are
    passed on and decoded by the video processor, which knows which frames it needs.
    """
    images, image_sizes, image_where, videos, video_sizes, video_where = [], [], [], [], [], []
    for i, messages in enumerate(conversations):
        for m, message in enumerate(messages):
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for j, block in enumerate(content):
                if not isinstance(block, Mapping):
                    raise ChatTemplateError(f"conversations[{i}].messages[{m}].content[{j}]: expected a dict "
                                            f"block, got {type(block).__name__}")
                where = f"conversations[{i}].messages[{m}].content[{j}]"
                sizes = {k: block[k] for k in SIZE_KEYS if block.get(k) is not None} or None
                frame_keys = {k: block[k] for k in FRAME_ITEM_KEYS if block.get(k) is not None}
                if block.get("type") == "image":
                    for key in IMAGE_SOURCE_KEYS:
                        if block.get(key) is not None:
                            images.append(_load_image(block[key], key, where))
                            image_sizes.append(sizes)
                            image_where.append(where)
                elif block.get("type") == "video":
                    for key in VIDEO_SOURCE_KEYS:
                        if block.get(key) is not None:
                            videos.append(block[key])
                            video_sizes.append({**(sizes or {}), **frame_keys} or None)
                            video_where.append(where)
    return images, image_sizes, image_where, videos, video_sizes, video_where


def _load_image(source: Any, key: str, where: str) -> Any:
    if isinstance(source, Mapping):  # {"image_url": {"url": ...}}
        source = source.get("url")
    if key == "base64" and isinstance(source, str) and not source.startswith("data:"):
        source = "data:;base64," + source
    try:
        return media.load_image(source, where=where)
    except MediaError:
        raise
    except (OSError, ValueError) as exc:
        raise MediaError(f"{where}: image {str(source)[:80]!r} cannot be loaded ({exc}); "
                         "pass a path, URL, data URI or PIL image") from exc


def _as_text_list(text: Any) -> list[str] | None:
    if text is None:
        return None
    texts = [text] if isinstance(text, str) else list(text)
    for i, row in enumerate(texts):
        if not isinstance(row, str):
            raise InputError(f"text[{i}]: expected a string, got {type(row).__name__}; pass a string or list of strings")
    return texts


def _first_mismatch(per_row: list[int], items: Any, kind: str) -> str:
    """' (conversation i: a placeholders, b images)' when `items` is nested one list per prompt."""
    if not isinstance(items, (list, tuple)) or len(items) != len(per_row):
        return ""
    if not all(isinstance(x, (list, tuple)) for x in items) or (kind == "videos" and len(flatten_videos(items)) == 1):
        return ""  # flat, or a single video given as a list of frames
    flatten = flatten_images if kind == "images" else flatten_videos
    for i, (wanted, sample) in enumerate(zip(per_row, items)):
        if wanted != len(flatten(sample)):
            return f" (conversation {i}: {wanted} placeholders, {len(flatten(sample))} {kind})"
    return ""


def _route_options(kwargs: Mapping[str, Any], warn: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split processor keyword options into image-processor and video-processor ones."""
    image_opts = {k: kwargs[k] for k in VISION_OPTIONS if k in kwargs}
    video_opts = {k: kwargs[k] for k in VISION_OPTIONS + VIDEO_ONLY_OPTIONS if k in kwargs}
    for ours, theirs, target in (("image_sizes", "sizes", image_opts), ("image_where", "where", image_opts),
                                 ("video_sizes", "sizes", video_opts), ("video_where", "where", video_opts)):
        if ours in kwargs:
            target[theirs] = kwargs[ours]
    known = set(VISION_OPTIONS + VIDEO_ONLY_OPTIONS) | {"image_sizes", "image_where", "video_sizes", "video_where"}
    ignored = sorted(set(kwargs) - known - {"add_special_tokens", "return_tensors"})
    if ignored and warn:
        logger.warning("Qwen2VLProcessor: ignoring unknown options %s", ignored)
    return image_opts, video_opts


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc}); fix or remove the file") from None


def _finalize(data: dict[str, Any], return_tensors: str | None) -> BatchFeature:
    """Text keys follow return_tensors; pixel/grids stay torch unless "np" is asked for."""
    out = BatchFeature()
    for key, value in data.items():
        if isinstance(value, list):
            out[key] = as_tensor(value, return_tensors)
        elif return_tensors == "np" and hasattr(value, "numpy"):
            out[key] = value.numpy()
        elif return_tensors == "pt" and not hasattr(value, "numpy"):
            import torch

            out[key] = torch.as_tensor(value)
        else:
            out[key] = value
    return out
