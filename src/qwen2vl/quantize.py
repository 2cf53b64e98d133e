"""Inference-only weight transforms applied as module swaps after a model is built and loaded.

`quantize_int8(model)`: weight-only int8 (per-output-channel symmetric scales) for the text decoder's
Linear layers (+ lm_head). `pack_for_cpu(model)`: bf16 Linear layers -> oneDNN-prepacked weights
(bit-identical outputs, faster CPU matmuls). Both drop gradients: use them for inference only.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys

import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl.errors import ConfigError

logger = logging.getLogger(__name__)

# torch's CPU int8 weight-only GEMM reads one int8 weight row per output channel and is fastest for
# a few activation rows; its cost grows linearly with rows (no reuse), so larger inputs dequantise.
_KERNEL_MAX_ROWS = 2
_KERNEL_K_MULTIPLE = 32  # the kernel misbehaves for other in_features (crashes at K=100, 1540)


def _int8_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """y = (x @ q.T) * scales + bias, with q int8 (N, K) and scales (N,) in the activation dtype."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 keep_weight: nn.Parameter | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        if keep_weight is not None:
            # see _keeps_weight: `.weight` stays reachable (dtype/device lookups, state_dict) at no
            # the embedding holds it anyway), so code reading lm_head.weight.dtype/.device still works
            self.weight = keep_weight

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep_weight: bool = False, release=None) -> "Int8Linear":
        q, scales = quantize_weight_int8(linear.weight.detach(), linear.weight.dtype, release=release)
        return cls(q, scales, linear.bias, linear.weight if keep_weight else None)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (N, K) weight the int8 values stand for, in `dtype` (default: the scales' dtype)."""
        dtype = dtype or self.scales.dtype
        return self.weight_int8.to(dtype) * self.scales.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self._use_kernel(x2):
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scales)
        else:  # portable path: int8 -> activation dtype on the fly, then scale the output channels
            y = F.linear(x2, self.weight_int8.to(x2.dtype)) * self.scales.to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _use_kernel(self, x2: torch.Tensor) -> bool:
        return (x2.device.type == "cpu" and _int8_kernel_available() and x2.dtype == self.scales.dtype
                and x2.dtype in (torch.bfloat16, torch.float16, torch.float32)
                and x2.shape[0] <= _KERNEL_MAX_ROWS and self.in_features % _KERNEL_K_MULTIPLE == 0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_weight_int8(weight: torch.Tensor, scale_dtype: torch.dtype, chunk_rows: int = 4096,
                         release=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: scale = max|w_row| / 127 (rounded to scale_dtype first, so the stored
    scale is the one used), q = round(w / scale) clamped to [-127, 127]. Returns (q (N, K), scales (N,)).
    Works chunk_rows rows at a time, so the fp32 temporaries stay small (the 2B vocabulary is 151,936 rows);
    release(rows) is called with each finished block of source rows (to drop its mmap'd pages)."""
    n = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n, dtype=scale_dtype, device=weight.device)
    for lo in range(0, n, chunk_rows):
        w = weight[lo:lo + chunk_rows].float()
        s = (w.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny).to(scale_dtype)
        scales[lo:lo + chunk_rows] = s
        q[lo:lo + chunk_rows] = torch.round(w / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        if release is not None:
            release(weight[lo:lo + chunk_rows])
    return q, scales


class PackedLinear(nn.Module):
    """A Linear whose weight is reordered once into oneDNN's blocked layout (CPU, inference only).

    torch's plain bf16 CPU linear re-lays the weight out on every call; that costs as much as the
    matmul itself at decode (1 row). The packed matmul gives bit-identical results."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 1, keep_weight: bool = False, release=None,
                 chunk_rows: int = 32768) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, bias = linear.weight.detach(), linear.bias
        # blocks of output rows (the 151,936-row vocabulary -> 5), so that packing holds at most one
        # block of the source resident before release(rows) drops its mmap'd pages
        self.packed, self.bias = [], []
        for lo in range(0, self.out_features, chunk_rows):
            self.packed.append(torch.ops.mkldnn._reorder_linear_weight(weight[lo:lo + chunk_rows], batch_hint))
            self.bias.append(None if bias is None else bias.detach()[lo:lo + chunk_rows])
            if release is not None:
                release(weight[lo:lo + chunk_rows])
        if keep_weight:  # see _keeps_weight
            self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).contiguous()
        parts = [torch.ops.mkldnn._linear_pointwise(x2, w, b, "none", [], "") for w, b in zip(self.packed, self.bias)]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _text_linears(model: nn.Module, include_lm_head: bool) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of the decoder's Linear layers: everything outside the vision tower."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or "visual" in name.split("."):
            continue
        if name.split(".")[-1] == "lm_head" and not include_lm_head:
            continue
        found.append((name, module))
    return found


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class _PageReleaser:
    """Drops the resident pages of weights that are mmap'd from .safetensors files (Linux only).

    Our loader maps checkpoint files privately and assigns views of them as parameters. Once a layer
    is packed or quantised its old pages would stay resident (counted in RSS) until the file's mapping
    closes; madvise(MADV_DONTNEED) on the pages wholly inside the tensor returns them, and any later
    read faults them back in from the file. A tensor still in use (a tied embedding) is released only
    after checking that its bytes equal the file's (in-place edits would otherwise be lost).
    Anonymous memory is never touched."""

    _MADV_DONTNEED = 4
    _CHUNK = 8 << 20

    def __init__(self) -> None:
        self.maps: list[tuple[int, int, int, str]] = []  # (start, end, file offset, path)
        self.libc = None
        self.released = 0  # bytes
        if not sys.platform.startswith("linux"):
            return
        try:
            self.libc = ctypes.CDLL(None, use_errno=True)
            with open("/proc/self/maps") as maps:
                for line in maps:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].strip().endswith(".safetensors"):
                        lo, hi = (int(x, 16) for x in parts[0].split("-"))
                        self.maps.append((lo, hi, int(parts[2], 16), parts[5].strip()))
        except OSError:
            self.libc, self.maps = None, []

    def _mapping(self, tensor: torch.Tensor) -> tuple[int, int, int, str] | None:
        if self.libc is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
            return None
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        return next((m for m in self.maps if m[0] <= start and end <= m[1]), None)

    def file_backed(self, tensor: torch.Tensor) -> bool:
        return self._mapping(tensor) is not None

    def _equals_file(self, tensor: torch.Tensor, mapping: tuple[int, int, int, str]) -> bool:
        flat = tensor.detach().reshape(-1).view(torch.uint8)
        offset = tensor.data_ptr() - mapping[0] + mapping[2]
        buffer = bytearray(min(self._CHUNK, flat.numel()))
        disk = torch.frombuffer(buffer, dtype=torch.uint8)
        with open(mapping[3], "rb") as f:
            f.seek(offset)
            for i in range(0, flat.numel(), self._CHUNK):
                n = min(self._CHUNK, flat.numel() - i)
                if f.readinto(memoryview(buffer)[:n]) != n or not torch.equal(disk[:n], flat[i:i + n]):
                    return False
        return True

    def release(self, tensor: torch.Tensor, in_use: bool = False) -> int:
        """Release the tensor's whole pages if it lies in a safetensors mapping; returns bytes released.
        in_use=True: only when its bytes still equal the file (so reads after the release are correct)."""
        mapping = self._mapping(tensor)
        if mapping is None or (in_use and not self._equals_file(tensor, mapping)):
            return 0
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, end // page * page  # pages wholly inside [start, end)
        if hi <= lo or self.libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), self._MADV_DONTNEED):
            return 0
        self.released += hi - lo
        return hi - lo

    def releaser(self, in_use: bool):
        """release() with in_use fixed, for the row-block callbacks of the swaps."""
        return lambda rows: self.release(rows, in_use=in_use)


@torch.no_grad()
def quantize_int8(model: nn.Module, include_lm_head: bool = True) -> nn.Module:
    """Swap the text decoder's Linear layers (and lm_head unless include_lm_head=False) for Int8Linear,
    in place, one layer at a time (peak memory = model + one layer). The embedding and the vision
    tower stay in their dtype; a tied lm_head gets its own int8 copy, and then the embedding's mmap'd
    pages are released (lookups read the few rows they need from the file). Returns the model."""
    targets = _text_linears(model, include_lm_head)
    if not targets:
        raise ConfigError("quantize_int8: the model has no text Linear layers to quantise; "
                          "pass a Qwen2VLForConditionalGeneration or a text model")
    shared = _embedding_ptrs(model)
    pages = _PageReleaser()
    for name, linear in targets:
        if not linear.weight.dtype.is_floating_point:
            raise ConfigError(f"quantize_int8: {name} has dtype {linear.weight.dtype}; "
                              "quantise a floating-point (bf16/fp16/fp32) model once")
        tied = linear.weight.data_ptr() in shared
        _swap(model, name, Int8Linear.from_linear(linear, keep_weight=_keeps_weight(linear, tied, pages),
                                                  release=pages.releaser(in_use=tied)))
    logger.info("quantize_int8: %d Linear layers -> int8 (%.0f MB of mapped pages released)",
                len(targets), pages.released / 1e6)
    return model


def _keeps_weight(linear: nn.Linear, tied: bool, pages: _PageReleaser) -> bool:
    """Whether the swapped layer keeps the old matrix as `.weight`: when that is free, i.e. it is the
    embedding's (tied) or mmap'd from the checkpoint (its pages are released; reads fault them back).
    Code that reads lm_head.weight.dtype/.device, and state_dict, then keep working."""
    return tied or pages.file_backed(linear.weight)


def _embedding_ptrs(model: nn.Module) -> set[int]:
    """data_ptr of every embedding weight: a tied lm_head shares it and must not be released."""
    return {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}


def can_pack_for_cpu() -> bool:
    """True where oneDNN weight prepacking is available (x86/aarch64 CPU builds of torch)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@torch.no_grad()
def pack_for_cpu(model: nn.Module, include_vision: bool = True,
                 include_tied_lm_head: bool | str = "auto") -> nn.Module:
    """Swap CPU bf16 Linear layers for PackedLinear, in place (inference only; state_dict no longer
    holds those weights). A lm_head tied to the embedding needs a packed copy of the vocabulary
    matrix: "auto" packs it only when the shared matrix is mmap'd from the checkpoint, whose pages
    are then released (embedding lookups read their rows from the file), so memory does not grow.
    Returns the model."""
    if not can_pack_for_cpu():
        raise ConfigError("pack_for_cpu: this torch build has no oneDNN (mkldnn) prepacking; "
                          "run unpacked or use quantize_int8")
    embed_ptrs = _embedding_ptrs(model)
    pages = _PageReleaser()
    count = 0
    if include_tied_lm_head == "auto":
        include_tied_lm_head = all(pages.file_backed(m.weight) for m in model.modules()
                                   if isinstance(m, nn.Embedding))
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or module.weight.device.type != "cpu":
            continue
        if module.weight.dtype != torch.bfloat16:
            continue
        if not include_vision and "visual" in name.split("."):
            continue
        if module.weight.data_ptr() in embed_ptrs and not include_tied_lm_head:
            continue
        tied = module.weight.data_ptr() in embed_ptrs
        _swap(model, name, PackedLinear(module, keep_weight=_keeps_weight(module, tied, pages),
                                        release=pages.releaser(in_use=tied)))
        count += 1
    logger.info("pack_for_cpu: %d Linear layers prepacked (%.0f MB of mapped pages released)", count,
                pages.released / 1e6)
    return model
