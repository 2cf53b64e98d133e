"""torch-facing wrapper of rotary.c: the vision tower's rotary embedding in one pass (CPU, bf16)."""

from __future__ import annotations

import ctypes

import torch

from qwen2vl.native.build import function


_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_ROTARY = ("rotary", "rotary_bf16", [_P, _I64, _I64, _P, _P, _P, _I64, _I64, _I64])


def supports(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """x (N, H, D) bf16 with a contiguous last dim; cos/sin (N, D) fp32; CPU; no autograd."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 3 and x.stride(2) == 1
            and x.shape[2] % 2 == 0 and cos.dtype == sin.dtype == torch.float32
            and cos.shape == sin.shape == (x.shape[0], x.shape[2])
            and cos.device.type == sin.device.type == "cpu"
            and not (torch.is_grad_enabled() and x.requires_grad) and function(*_ROTARY) is not None)


def rotary_bf16(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """bf16(fp32(x) * cos + rotate_half(fp32(x)) * sin) as a contiguous (N, H, D) tensor, bit-identical
    to those torch ops. Call only when supports(x, cos, sin)."""
    cos, sin = cos.contiguous(), sin.contiguous()
    n, h, d = x.shape
    out = torch.empty(n, h, d, dtype=torch.bfloat16)
    function(*_ROTARY)(x.data_ptr(), x.stride(0), x.stride(1), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), n, h, d)
    return out
