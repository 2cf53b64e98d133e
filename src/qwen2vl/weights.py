"""Checkpoint I/O: folder or hub id -> safetensors (single or sharded) -> model built on the meta device.

Tensors are mmap'd straight from the files and assigned into the model (never two copies of the
weights); `save_pretrained` streams tensors into hub-layout shards. Imports config, errors, model.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import qwen2vl.config as config_module
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.errors import CheckpointError, ConfigError, MissingDependencyError
from qwen2vl.mapped import MappedPages
from qwen2vl.model import rope
from qwen2vl.model.linear import Linear

logger = logging.getLogger(__name__)

SAFE_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
# checkpoint prefix (hub layout) -> module prefix (transformers-5 tree); the one rename table
_HUB_TO_MODULE = ((re.compile(r"^visual\."), "model.visual."),
                  (re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model."))
_MODULE_TO_HUB = (("model.visual.", "visual."), ("model.language_model.", "model."))


def to_module_key(key: str) -> str:
    """Checkpoint key in either layout -> module path (`visual.x` -> `model.visual.x`, `model.layers.x`
    -> `model.language_model.layers.x`; transformers-5 keys and `lm_head.*` unchanged)."""
    for pattern, repl in _HUB_TO_MODULE:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key


def to_hub_key(name: str) -> str:
    """Module path -> the key the hub files ship."""
    for prefix, repl in _MODULE_TO_HUB:
        if name.startswith(prefix):
            return repl + name[len(prefix):]
    return name


def resolve_checkpoint_dir(path_or_hub_id: str | os.PathLike, revision: str | None = None,
                           cache_dir: str | None = None, local_files_only: bool = False) -> Path:
    """A local folder as is; otherwise a hub snapshot (config + safetensors) via huggingface_hub."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    if path.exists() or str(path_or_hub_id).startswith((".", "/")) or str(path_or_hub_id).count("/") != 1:
        raise CheckpointError(f"{path_or_hub_id}: not a checkpoint folder; pass a folder with config.json and "
                              "*.safetensors, or a hub id 'owner/name'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise MissingDependencyError(f"{path_or_hub_id}: loading a hub id needs huggingface_hub; "
                                     "pip install 'qwen2vl[hub]' or pass a local checkpoint folder") from exc
    try:
        return Path(snapshot_download(str(path_or_hub_id), revision=revision, cache_dir=cache_dir,
                                      local_files_only=local_files_only,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"]))
    except Exception as exc:  # offline, unknown repo, auth: all end here
        raise CheckpointError(f"{path_or_hub_id}: cannot download from the hub ({type(exc).__name__}: {exc}); "
                              "if you are offline, download the checkpoint elsewhere and pass its local folder "
                              "path instead of the hub id") from exc


def checkpoint_files(folder: Path) -> list[Path]:
    """Shards named by the index, else model.safetensors, else every *.safetensors in the folder."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shards that do not exist: {missing}; re-download the checkpoint")
        return [folder / f for f in files]
    if (folder / SAFE_NAME).is_file():
        return [folder / SAFE_NAME]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files; qwen2vl loads safetensors checkpoints only")
    return files


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs backed by a private mmap of the file (pages load on first touch; no copy)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    header.pop("__metadata__", None)
    base = 8 + size
    for key, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key} has dtype {info['dtype']}; supported: {sorted(_DTYPES)}")
        start, end = info["data_offsets"]
        if end == start:
            yield key, torch.empty(info["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(buffer, dtype=torch.uint8, count=end - start, offset=base + start)
        yield key, flat.view(dtype).view(info["shape"])


def _torch_dtype(dtype: Any, config: Qwen2VLConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dtype = config.dtype or "float32"
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"dtype: {dtype!r} is not a torch dtype; use 'auto', 'bfloat16', 'float16' or 'float32'")
    return value


def _device(device_map: Any) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ConfigError(f"device_map: {len(devices)} devices given; qwen2vl places the whole model on one "
                              "device: pass 'auto', 'cpu', 'cuda' or a torch.device")
        device_map = devices.pop()
    return torch.device(device_map if not isinstance(device_map, int) else f"cuda:{device_map}")


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    else:
        module._buffers[attr] = tensor


def _fill(model: nn.Module, folder: Path, dtype: torch.dtype, device: torch.device) -> None:
    """Assign every checkpoint tensor; raise CheckpointError listing missing/unexpected/mis-shaped keys."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    unexpected, misshaped, seen = [], [], set()
    for path in checkpoint_files(folder):
        for key, tensor in read_safetensors(path):
            name = to_module_key(key)
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue  # tied: the embedding is the head
            if name not in expected:
                unexpected.append(key)
                continue
            if tuple(tensor.shape) != tuple(expected[name]):
                misshaped.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(expected[name])}")
                continue
            if tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            _assign(model, name, tensor.to(device) if device.type != "cpu" else tensor)
            seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing or unexpected or misshaped:
        parts = [f"missing {missing}" if missing else "", f"unexpected {sorted(unexpected)}" if unexpected else "",
                 f"mis-shaped {misshaped}" if misshaped else ""]
        raise CheckpointError(f"{folder}: checkpoint does not match the config: " + "; ".join(p for p in parts if p)
                              + "; check that config.json belongs to these weights")


def _materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute the non-persistent buffers that the meta build left empty."""
    text = model.config.text_config
    model.model.language_model.inv_freq = rope.text_inv_freq(text.head_dim, text.rope_theta).to(device)


class _SkipInit(TorchFunctionMode):
    """While a model is built on the meta device, random-init calls return their tensor untouched.

    The values are overwritten by the checkpoint, and init (or arange) on meta tensors runs Python
    reference kernels that import torch._dynamo (~1.3 s per process, most of a CLI call). `arange`
    (rotary buffers, recomputed by _materialize_buffers anyway) runs on the CPU instead. A
    torch-function mode is thread-local and scoped to the `with` block: nothing global is patched.
    """

    _INPLACE = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init" or func in self._INPLACE:
            return args[0] if args else kwargs.get("tensor")
        if func is torch.arange and kwargs.get("device") is None:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


@torch.no_grad()
def prepack_for_cpu(model: nn.Module, only_mapped: bool = False) -> int:
    """Prepack every CPU bf16 `Linear` of the model outside the vision tower (see qwen2vl.model.linear);
    returns how many. The tower is left alone: its calls have one row per patch (hundreds), where the
    packed kernel is not used, so a packed copy would only make every image fault the released pages
    back in from the file (~0.5-2 s on the first 640x480 image of a 2B model, measured).

    A weight mmap'd from the checkpoint has its resident pages released once packed (reads fault them
    back in from the file), so memory does not grow; any other weight keeps its memory and the packed
    copy adds to it, so only_mapped=True skips those (from_pretrained's choice). A lm_head tied to the
    embedding is packed, and its pages released, only after checking the bytes still equal the file."""
    pages = MappedPages()
    shared = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or "visual" in name.split("."):
            continue
        mapped = pages.file_backed(module.weight)
        if only_mapped and not mapped:
            continue
        # evict after a many-row call needs no file check: the pack is used only while the weight's
        # version counter is unchanged, i.e. its bytes are still the ones checked here
        count += module.prepack(release=pages.releaser(in_use=module.weight.data_ptr() in shared),
                                evict=pages.releaser(in_use=False) if mapped else None)
    logger.info("prepack_for_cpu: %d Linear layers prepacked (%.0f MB of mapped pages released)", count,
                pages.released / 1e6)
    return count


def load_pretrained(cls: type, path_or_hub_id: str | os.PathLike, dtype: Any = "auto", device_map: Any = None,
                    attn_implementation: str | None = None, revision: str | None = None,
                    cache_dir: str | None = None, local_files_only: bool = False, cpu_prepack: bool = True,
                    **kwargs: Any) -> nn.Module:
    """Build `cls` on the meta device and fill it from mmap'd safetensors (see module docstring).
    cpu_prepack: on CPU in bf16, prepack the Linear weights mmap'd from the files (faster no-grad
    matmuls, bit-identical outputs, no extra memory; see prepack_for_cpu)."""
    folder = resolve_checkpoint_dir(path_or_hub_id, revision, cache_dir, local_files_only)
    config = kwargs.pop("config", None) or Qwen2VLConfig.from_pretrained(folder)
    if kwargs:
        logger.info("from_pretrained: ignoring unsupported arguments %s", sorted(kwargs))
    config.attn_implementation = attn_implementation or config.attn_implementation or "sdpa"
    torch_dtype, device = _torch_dtype(dtype, config), _device(device_map)
    with torch.device("meta"), _SkipInit():
        model = cls(config)
    _fill(model, folder, torch_dtype, device)
    _materialize_buffers(model, device)
    model.tie_weights()
    model.config.dtype = str(torch_dtype).removeprefix("torch.")
    model.name_or_path = str(path_or_hub_id)
    if cpu_prepack and device.type == "cpu" and torch_dtype == torch.bfloat16:
        prepack_for_cpu(model, only_mapped=True)
    # generation_config.json when shipped, else bos/eos/pad from config.json (what transformers does)
    model.generation_config = (config_module.GenerationConfig.from_pretrained(folder, missing_ok=True)
                               or config_module.GenerationConfig.from_model_config(model.config))
    return model.eval()


def _shard_limit(max_shard_size: int | str | None) -> int | None:
    if max_shard_size is None or isinstance(max_shard_size, int):
        return max_shard_size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(max_shard_size), flags=re.I)
    if not match:
        raise ConfigError(f"max_shard_size: {max_shard_size!r} is not a size; use an int of bytes or e.g. '5GB'")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


def write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """Stream tensors into one safetensors file (one tensor in flight; no whole-file buffer)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in tensors:
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(data.numpy()))


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, max_shard_size: int | str | None = None,
                    **kwargs: Any) -> None:
    """config.json (nested layout transformers 5 reads) + hub-layout safetensors (+ index when sharded)."""
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tied = model.config.tie_word_embeddings
    items = [(to_hub_key(n), t) for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")]
    limit = _shard_limit(max_shard_size)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for key, t in items:
        nbytes = t.numel() * t.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, t))
        size += nbytes
    for old in list(folder.glob("model*.safetensors")) + [folder / INDEX_NAME]:
        old.unlink(missing_ok=True)
    if len(shards) == 1:
        write_safetensors(folder / SAFE_NAME, shards[0])
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / name, shard)
        for key, t in shard:
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
