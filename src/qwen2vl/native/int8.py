"""torch-facing wrapper of q8_linear.c: weight-only int8 linear for a few activation rows on CPU."""

from __future__ import annotations

import ctypes

import torch

from qwen2vl.native.build import load

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # x / bias / y dtype -> the kernel's x_bf16 flag


def _kernel():
    lib = load("q8_linear")
    if lib is None:
        return None
    fn = lib.q8_linear
    if fn.argtypes is None:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
    return fn


def available() -> bool:
    """Whether the kernel built and loaded on this machine (builds it on first call)."""
    return _kernel() is not None


def supports(x: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether q8_linear can take these operands (then it never returns None for them)."""
    return (x.device.type == "cpu" and x.dtype in _DTYPES and x.dim() == 2 and q.dtype == torch.int8
            and q.device.type == "cpu" and q.dim() == 2 and x.shape[1] == q.shape[1]
            and (bias is None or (bias.dtype == x.dtype and bias.device.type == "cpu"))
            and not (torch.is_grad_enabled() and x.requires_grad) and _kernel() is not None)


def q8_linear(x: torch.Tensor, q: torch.Tensor, scales_f32: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """(x (M, K) @ q (N, K).T) * scales_f32 (N,) + bias (N,), in x's dtype (fp32 or bf16); sums in fp32.
    Call only when supports(x, q, bias)."""
    x = x.contiguous()
    q = q.contiguous()
    scales_f32 = scales_f32.contiguous()
    bias = None if bias is None else bias.contiguous()
    (m, k), n = x.shape, q.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    rc = _kernel()(x.data_ptr(), _DTYPES[x.dtype], q.data_ptr(), scales_f32.data_ptr(),
                   None if bias is None else bias.data_ptr(), y.data_ptr(), m, n, k)
    if rc != 0:
        raise MemoryError(f"q8_linear: could not allocate {m * k * 4} bytes for the fp32 copy of x")
    return y
