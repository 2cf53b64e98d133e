"""Inference-only weight transforms applied as module swaps after a model is built and loaded.

`quantize_int8(model)`: weight-only int8 (per-output-channel symmetric scales) for the text decoder's
Linear layers (+ lm_head); gradients are dropped, so use it for inference only. On CPU the layers run
our C kernels (qwen2vl.native.int8) where a compiler built them, else torch's int8 kernel or a
dequantising path. (CPU bf16 prepacking, which keeps outputs bit-identical, is not a swap: see
qwen2vl.model.linear and weights.prepack_for_cpu.)
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl.errors import ConfigError
from qwen2vl.mapped import MappedPages
from qwen2vl.native import int8 as native_int8

logger = logging.getLogger(__name__)

# Our kernel (native/q8_linear.c: streams the int8 rows with prefetching, ~25 GB/s on 2 cores against
# ~14 GB/s for torch's) serves up to _NATIVE_MAX_ROWS activation rows; its cost grows with the rows
# (fp32 FMAs per weight), and at 16 rows dequantising (native q8_dequantize into a reused buffer) +
# one dense F.linear is faster. Without a C compiler,
# torch's CPU int8 weight-only GEMM takes up to _KERNEL_MAX_ROWS rows (same growth, slower start).
_NATIVE_MAX_ROWS = 8
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
            # see _keeps_weight: `.weight` stays reachable at no cost (its pages are released, or the
            # embedding holds it anyway), so code reading lm_head.weight.dtype/.device still works
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
        if native_int8.supports(x2, self.weight_int8, self.bias):
            if x2.shape[0] > _NATIVE_MAX_ROWS:  # prefill: dequantise into a reused buffer, one dense GEMM
                w = native_int8.dequantize(self.weight_int8, self._scales_f32(), x2.dtype)
                return F.linear(x2, w, self.bias).reshape(*shape[:-1], self.out_features)
            if native_int8.fast_few_rows():
                y = native_int8.q8_linear(x2, self.weight_int8, self._scales_f32(), self.bias)
                return y.reshape(*shape[:-1], self.out_features)
        if self._use_kernel(x2):
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scales)
        else:  # portable path: int8 -> activation dtype on the fly, then scale the output channels
            y = F.linear(x2, self.weight_int8.to(x2.dtype)) * self.scales.to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _scales_f32(self) -> torch.Tensor:
        """fp32 copy of the scales for the native kernel, remade when the buffer changes or moves."""
        key = (self.scales.data_ptr(), self.scales._version, self.scales.dtype)
        if getattr(self, "_scales_key", None) != key:
            self._scales_f32_cache = self.scales.float().contiguous()
            self._scales_key = key
        return self._scales_f32_cache

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
    pages = MappedPages()
    for name, linear in targets:
        if hasattr(linear, "unpack"):  # a prepacked copy would stay alive (targets holds it) until the end
            linear.unpack()
        if not linear.weight.dtype.is_floating_point:
            raise ConfigError(f"quantize_int8: {name} has dtype {linear.weight.dtype}; "
                              "quantise a floating-point (bf16/fp16/fp32) model once")
        tied = linear.weight.data_ptr() in shared
        _swap(model, name, Int8Linear.from_linear(linear, keep_weight=_keeps_weight(linear, tied, pages),
                                                  release=pages.releaser(in_use=tied)))
    logger.info("quantize_int8: %d Linear layers -> int8 (%.0f MB of mapped pages released)",
                len(targets), pages.released / 1e6)
    return model


def _keeps_weight(linear: nn.Linear, tied: bool, pages: MappedPages) -> bool:
    """Whether the swapped layer keeps the old matrix as `.weight`: when that is free, i.e. it is the
    embedding's (tied) or mmap'd from the checkpoint (its pages are released; reads fault them back).
    Code that reads lm_head.weight.dtype/.device, and state_dict, then keep working."""
    return tied or pages.file_backed(linear.weight)


def _embedding_ptrs(model: nn.Module) -> set[int]:
    """data_ptr of every embedding weight: a tied lm_head shares it and must not be released."""
    return {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
