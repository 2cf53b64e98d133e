"""Offline jobs: JSONL requests (or a folder of images) -> JSONL results, batched and resumable.

Imports config, errors, model, weights, generation, processing; never cli. Logs, never prints.

Request schema, one JSON object per line of the input file (blank lines are skipped):
    {"id": "cat-1", "prompt": "Describe this image.", "images": ["cat.png"], "videos": [],
     "max_new_tokens": 32}
  or the chat format (the same content blocks as `processor.apply_chat_template`):
    {"id": "q2", "messages": [{"role": "user", "content": [{"type": "image", "path": "cat.png"},
                                                           {"type": "text", "text": "What is it?"}]}]}
  Exactly one of "prompt" / "messages". Optional: "id" (any JSON scalar), "system" (prompt form only),
  "images" / "videos" (a path or a list of paths; prompt form only), and the sampling fields
  "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "do_sample".
  Relative media paths are resolved against the folder of the input file; URLs and data URIs pass
  through to the processor.
Result schema, one line per request, in the order requests finish:
    {"line": 3, "id": "cat-1", "text": "...", "prompt_tokens": 80, "completion_tokens": 12,
     "finish_reason": "stop" | "length"}
    {"line": 4, "id": "q2", "error": "images[0]: file not found: '/data/missing.png'; ..."}
  "line" is the 1-based line number in the input file (the image's position in sorted order for a
  folder job). On restart, lines already present in the output are skipped (a truncated last line
  is cut off first); pass retry_errors=True to redo lines whose result is an error.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from qwen2vl.errors import CheckpointError, ConfigError, Qwen2VLError, RequestError

logger = logging.getLogger(__name__)

SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "do_sample")
REQUEST_FIELDS = ("id", "prompt", "messages", "system", "images", "videos") + SAMPLING_FIELDS
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_REMOTE = ("http://", "https://", "data:", "file://")


@dataclass(slots=True)
class Request:
    """One parsed request: its 1-based line, the user's id, the conversation and its sampling overrides."""

    line: int
    id: Any
    messages: list[dict]
    generate_kwargs: dict = field(default_factory=dict)


@dataclass(slots=True)
class Failed:
    """A request line that could not be parsed or validated; it is written out as an error line."""

    line: int
    id: Any
    error: Exception


@dataclass(slots=True)
class Result:
    """One generated answer (the fields of a result line, without line/id)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


# --------------------------------------------------------------------------- model + processor


def resolve_model(model: str) -> str:
    """A local checkpoint folder or a hub id (returned as given); CheckpointError otherwise."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"--model: folder '{path}' has no config.json; pass a Qwen2-VL checkpoint folder")
        return str(path)
    if path.exists():
        raise CheckpointError(f"--model: '{model}' is a file; pass a checkpoint folder or a hub id")
    if _HUB_ID.match(model) and not model.startswith((".", "~")):
        return model  # hub id, downloaded by from_pretrained
    raise CheckpointError(f"--model: folder '{model}' not found; pass an existing checkpoint folder or a hub id (owner/name)")


def load_pipeline(
    model: str,
    *,
    dtype: Any = "auto",
    device: str = "cpu",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    attn_implementation: str | None = None,
    quantize: str | None = None,
) -> tuple[Any, Any]:
    """Load (model, processor) from a folder or hub id; processor pixel bounds override the file's.
    quantize="int8": weight-only int8 text decoder (qwen2vl.quantize.quantize_int8)."""
    from qwen2vl.model.qwen2vl import Qwen2VLForConditionalGeneration
    from qwen2vl.processing.processor import Qwen2VLProcessor

    if quantize not in (None, "int8"):
        raise ConfigError(f"quantize: {quantize!r} is not a mode; use 'int8' or leave it unset")
    model_kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device}
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation
    net = Qwen2VLForConditionalGeneration.from_pretrained(model, **model_kwargs)  # first: its errors are clearer
    net.eval()
    if quantize == "int8":
        from qwen2vl.quantize import quantize_int8

        quantize_int8(net)
    proc_kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    processor = Qwen2VLProcessor.from_pretrained(model, **proc_kwargs)
    return net, processor


def eos_token_ids(model: Any) -> set[int]:
    """Ids that end a reply: generation_config's eos (int or list), else the config's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        text_config = getattr(model.config, "text_config", model.config)
        eos = getattr(text_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in ([eos] if isinstance(eos, int) else eos)}


def prepare_inputs(processor: Any, conversations: Sequence[list[dict]], processor_kwargs: Mapping | None = None) -> Any:
    """Render and tokenize conversations (with their media) into a left-padded BatchFeature."""
    batched = len(conversations) > 1
    return processor.apply_chat_template(
        list(conversations) if batched else conversations[0],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        **({"padding": True} if batched else {}),
        **dict(processor_kwargs or {}),
    )


def generate(
    model: Any,
    processor: Any,
    conversations: Sequence[list[dict]],
    generate_kwargs: Mapping | None = None,
    processor_kwargs: Mapping | None = None,
) -> list[Result]:
    """Greedy-or-sampled answers for a batch of conversations (one Result per conversation)."""
    import torch

    inputs = prepare_inputs(processor, conversations, processor_kwargs).to(model.device)
    with torch.inference_mode():
        out = model.generate(**inputs, **dict(generate_kwargs or {}))
    return decode_results(model, processor, inputs, out)


def decode_results(model: Any, processor: Any, inputs: Mapping, out: Any) -> list[Result]:
    """Split generate()'s (B, prompt_len + new) ids into per-row texts and token counts."""
    prompt_len = inputs["input_ids"].shape[1]
    new_ids = out[:, prompt_len:]  # (B, new); finished rows are padded after their eos
    eos = eos_token_ids(model)
    results = []
    for row, ids in enumerate(new_ids.tolist()):
        count, reason = len(ids), "length"
        for i, tok in enumerate(ids):
            if tok in eos:
                count, reason = i + 1, "stop"
                break
        text = processor.batch_decode([ids[:count]], skip_special_tokens=True)[0]
        prompt_tokens = int(inputs["attention_mask"][row].sum())
        results.append(Result(text, prompt_tokens, count, reason))
    return results


# --------------------------------------------------------------------------- requests


def _media_path(value: Any, where: str, base_dir: Path) -> str:
    """A checked absolute path (local files) or the URL / data URI unchanged."""
    if not isinstance(value, str) or not value:
        raise RequestError(f"{where}: expected a path or URL string; got {value!r}")
    if value.startswith(_REMOTE):
        return value
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise RequestError(f"{where}: file not found: '{path}'; relative paths are resolved against '{base_dir}'")
    return str(path)


def _as_list(value: Any, where: str) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    raise RequestError(f"{where}: expected a path or a list of paths; got {type(value).__name__}")


def prompt_messages(prompt: str, images: Sequence[str] = (), videos: Sequence[str] = (), system: str | None = None) -> list[dict]:
    """A one-turn conversation: media blocks first (as the model card does), then the text."""
    content = [{"type": "image", "path": p} for p in images]
    content += [{"type": "video", "path": p} for p in videos]
    content.append({"type": "text", "text": prompt})
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


def _resolve_messages(messages: Any, base_dir: Path) -> list[dict]:
    """Validate chat-format messages and resolve their local media paths."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: expected a non-empty list of {'role', 'content'} objects")
    resolved = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise RequestError(f"messages[{i}]: expected an object with 'role' and 'content'; got {msg!r:.80}")
        content = msg["content"]
        if isinstance(content, list):
            blocks = []
            for j, block in enumerate(content):
                block = dict(block) if isinstance(block, dict) else block
                if isinstance(block, dict) and block.get("type") in ("image", "video"):
                    for key in ("path", "image", "video", "url"):
                        if isinstance(block.get(key), str):
                            block[key] = _media_path(block[key], f"messages[{i}].content[{j}].{key}", base_dir)
                blocks.append(block)
            content = blocks
        resolved.append({**msg, "content": content})
    return resolved


def parse_request(obj: Any, line: int, base_dir: Path) -> Request:
    """Validate one decoded JSON request (see the module docstring) into a Request."""
    if not isinstance(obj, dict):
        raise RequestError(f"line {line}: expected a JSON object; got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(f"line {line}: unknown field(s) {unknown}; allowed: {list(REQUEST_FIELDS)}")
    if ("prompt" in obj) == ("messages" in obj):
        raise RequestError(f"line {line}: give exactly one of 'prompt' or 'messages'")
    if "messages" in obj:
        if "images" in obj or "videos" in obj or "system" in obj:
            raise RequestError(f"line {line}: 'images'/'videos'/'system' go inside 'messages' in the chat format")
        messages = _resolve_messages(obj["messages"], base_dir)
    else:
        if not isinstance(obj["prompt"], str):
            raise RequestError(f"line {line}: 'prompt' must be a string; got {type(obj['prompt']).__name__}")
        images = [_media_path(p, f"images[{i}]", base_dir) for i, p in enumerate(_as_list(obj.get("images"), "images"))]
        videos = [_media_path(p, f"videos[{i}]", base_dir) for i, p in enumerate(_as_list(obj.get("videos"), "videos"))]
        messages = prompt_messages(obj["prompt"], images, videos, obj.get("system"))
    kwargs = {k: obj[k] for k in SAMPLING_FIELDS if k in obj and obj[k] is not None}
    return Request(line=line, id=obj.get("id"), messages=messages, generate_kwargs=kwargs)


def read_requests(path: str | os.PathLike) -> Iterator[Request | Failed]:
    """A Request per non-blank line of a JSONL file, or a Failed for a line that is invalid."""
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise RequestError(f"--input: cannot read '{path}': {exc.strerror}; pass an existing JSONL file") from exc
    base_dir = path.resolve().parent
    with handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield Failed(number, None, RequestError(f"line {number}: invalid JSON ({exc.msg} at column {exc.colno})"))
                continue
            try:
                yield parse_request(obj, number, base_dir)
            except RequestError as exc:
                yield Failed(number, obj.get("id") if isinstance(obj, dict) else None, exc)


def folder_requests(folder: str | os.PathLike, prompt: str, **sampling: Any) -> Iterator[Request]:
    """One request per image file in a folder (sorted by name); id = the file name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RequestError(f"--images-dir: folder '{folder}' not found; pass a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RequestError(f"--images-dir: no images in '{folder}'; allowed suffixes: {', '.join(IMAGE_SUFFIXES)}")
    kwargs = {k: v for k, v in sampling.items() if v is not None}
    for number, file in enumerate(files, start=1):
        yield Request(number, file.name, prompt_messages(prompt, [str(file.resolve())]), dict(kwargs))


# --------------------------------------------------------------------------- resume + run


def read_finished(output: str | os.PathLike, retry_errors: bool = False) -> set[int]:
    """Lines already answered in an output file; cuts off a truncated last line so appends stay valid."""
    path = Path(output)
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        logger.warning("%s: dropping a truncated last line (%d bytes) before resuming", path, len(data) - end)
        with path.open("r+b") as handle:
            handle.truncate(end)
    done: dict[int, bool] = {}
    for number, raw in enumerate(data[:end].decode("utf-8", "replace").splitlines(), start=1):
        try:
            record = json.loads(raw)
            done[int(record["line"])] = "error" not in record
        except (ValueError, KeyError, TypeError):
            logger.warning("%s:%d: not a result line; ignored", path, number)
    return {line for line, ok in done.items() if ok or not retry_errors}


def _record(request_line: int, request_id: Any, result: Result | Exception) -> dict:
    record: dict[str, Any] = {"line": request_line, "id": request_id}
    if isinstance(result, Exception):
        message = str(result) if isinstance(result, Qwen2VLError) else f"{type(result).__name__}: {result}"
        record["error"] = message
    else:
        record.update(text=result.text, prompt_tokens=result.prompt_tokens,
                      completion_tokens=result.completion_tokens, finish_reason=result.finish_reason)
    return record


def _run_group(model: Any, processor: Any, group: list[Request], defaults: Mapping, processor_kwargs: Mapping) -> list[Result | Exception]:
    """Answer requests that share sampling settings; on a batch failure, retry one by one to blame the right line."""
    kwargs = {**defaults, **group[0].generate_kwargs}
    try:
        return list(generate(model, processor, [r.messages for r in group], kwargs, processor_kwargs))
    except Exception as exc:  # noqa: BLE001 - any failure is reported on its line, the job goes on
        if len(group) == 1:
            logger.debug("line %d failed", group[0].line, exc_info=True)
            return [exc]
    return [_run_group(model, processor, [r], defaults, processor_kwargs)[0] for r in group]


def run_job(
    model: Any,
    processor: Any,
    requests: Iterable[Request | Failed],
    out: TextIO,
    *,
    batch_size: int = 4,
    finished: set[int] | None = None,
    defaults: Mapping | None = None,
    processor_kwargs: Mapping | None = None,
    on_result: Callable[[dict], None] | None = None,
) -> dict[str, int]:
    """Answer every request whose line is not in `finished`, appending one JSON line each to `out`."""
    if batch_size < 1:
        raise RequestError(f"--batch-size: must be >= 1; got {batch_size}")
    finished, defaults = finished or set(), dict(defaults or {})
    counts = {"ok": 0, "error": 0, "skipped": 0}

    def emit(line: int, rid: Any, result: Result | Exception) -> None:
        record = _record(line, rid, result)
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()  # each finished line survives an interruption
        counts["error" if "error" in record else "ok"] += 1
        if on_result is not None:
            on_result(record)

    pending: list[Request | Failed] = []  # results are written in input order
    for item in requests:
        if item.line in finished:
            counts["skipped"] += 1
            continue
        pending.append(item)
        if sum(isinstance(p, Request) for p in pending) == batch_size:
            _flush(model, processor, pending, defaults, dict(processor_kwargs or {}), emit)
            pending = []
    if pending:
        _flush(model, processor, pending, defaults, dict(processor_kwargs or {}), emit)
    return counts


def _flush(model: Any, processor: Any, pending: list[Request | Failed], defaults: dict, processor_kwargs: dict,
           emit: Callable) -> None:
    """Run pending requests grouped by identical sampling settings; emit results in input order."""
    groups: dict[str, list[Request]] = {}
    answers: dict[int, Result | Exception] = {}
    for request in pending:
        if isinstance(request, Failed):
            answers[request.line] = request.error
        else:
            groups.setdefault(json.dumps(request.generate_kwargs, sort_keys=True), []).append(request)
    for group in groups.values():
        for request, result in zip(group, _run_group(model, processor, group, defaults, processor_kwargs)):
            answers[request.line] = result
    for request in pending:
        emit(request.line, request.id, answers[request.line])
