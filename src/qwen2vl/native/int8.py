"""torch-facing wrappers of q8_linear.c (CPU, weight-only int8): q8_linear for a few activation rows
(decode), dequantize for many (prefill: dequantise, then one dense GEMM)."""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

from qwen2vl.native.build import function, load

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # x / bias / y dtype -> the kernel's x_bf16 flag
# (library, function, argtypes[, restype]) for build.function
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_Q8_LINEAR = ("q8_linear", "q8_linear", [_P, ctypes.c_int, _P, _P, _P, _P, _I64, _I64, _I64], ctypes.c_int)
_Q8_DEQUANTIZE = ("q8_linear", "q8_dequantize", [_P, _P, _P, ctypes.c_int, _I64, _I64])


def fast_few_rows() -> bool:
    """Whether q8_linear is the hand-vectorised build (AVX-512 / AVX2): only then is it faster than
    torch's int8 kernel for decode; dequantize is worth it either way."""
    lib = load("q8_linear")
    return lib is not None and _vectorised(lib)


@functools.cache
def _vectorised(lib: ctypes.CDLL) -> bool:
    return bool(lib.q8_linear_vectorised())


def available() -> bool:
    """Whether the kernel built and loaded on this machine (builds it on first call)."""
    return function(*_Q8_LINEAR) is not None


def supports(x: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the kernels built on this machine and can take these operands (no autograd: they are
    inference-only)."""
    return (x.device.type == "cpu" and x.dtype in _DTYPES and x.dim() == 2 and q.dtype == torch.int8
            and q.device.type == "cpu" and q.dim() == 2 and x.shape[1] == q.shape[1]
            and (bias is None or (bias.dtype == x.dtype and bias.device.type == "cpu"))
            and not (torch.is_grad_enabled() and x.requires_grad) and function(*_Q8_LINEAR) is not None)


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
    rc = function(*_Q8_LINEAR)(x.data_ptr(), _DTYPES[x.dtype], q.data_ptr(), scales_f32.data_ptr(),
                   None if bias is None else bias.data_ptr(), y.data_ptr(), m, n, k)
    if rc != 0:
        raise MemoryError(f"q8_linear: could not allocate {m * k * 4} bytes for the fp32 copy of x")
    return y


# dequantize() writes into one reused buffer per thread: a fresh 100+ MB tensor per layer costs more
# in page faults (the kernel zeroes every new page) than the conversion itself (measured on 7B shapes at
# 400 rows: 0.94 s vs 0.53 s per 4 layers, the GEMM alone 0.41 s). Requests above the cap (a full
# vocabulary matrix) get their own tensor, so the buffer stays at one projection's size.
_SCRATCH_MAX_BYTES = 512 << 20
_scratch = threading.local()


def _buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    if numel * dtype.itemsize > _SCRATCH_MAX_BYTES:
        return torch.empty(numel, dtype=dtype)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        buf = _scratch.buf = None  # free the old one before allocating its successor
        buf = _scratch.buf = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def dequantize(q: torch.Tensor, scales_f32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q (N, K) int8 * scales_f32 (N,) as a dense (N, K) tensor of dtype (bf16: rounded to nearest-even).
    The result lives in this thread's reused buffer: use it before the next call. Call only when
    available() and dtype is fp32 or bf16."""
    q, scales_f32 = q.contiguous(), scales_f32.contiguous()
    w = _buffer(q.numel(), dtype).view(q.shape)
    function(*_Q8_DEQUANTIZE)(q.data_ptr(), scales_f32.data_ptr(), w.data_ptr(), _DTYPES[dtype], *q.shape)
    return w
