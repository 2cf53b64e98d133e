"""Every attention kernel call (eager, sdpa, flash_attention_2); a leaf module.

`attention` serves padded batches (decoder), `varlen_attention` the vision tower's per-segment
(block-diagonal) attention without building an N x N mask. Eager is the numerical reference.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from qwen2vl.errors import ConfigError

BACKENDS = ("sdpa", "eager", "flash_attention_2")
# torch >= 2.5: SDPA reads each kv head for its query group itself; repeating k/v first copies the
# whole cache (x groups) every layer and step, which dominated batched CPU decode (7 ms of 7.3 per layer
# at batch 8 x 467 keys, 2B shapes). Same kernel, same arithmetic: outputs are bit-identical.
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def check_backend(name: str | None) -> str:
    """Validate a backend name (None -> "sdpa"); raise ConfigError if unknown or not installed."""
    name = name or "sdpa"
    if name not in BACKENDS:
        raise ConfigError(f"attn_implementation: {name!r} is unknown; use one of {list(BACKENDS)}")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("attn_implementation: 'flash_attention_2' needs the flash_attn package, which is not "
                          "installed; pip install 'qwen2vl[flash]' (flash-attn) or use 'sdpa' or 'eager'")
    return name


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv*groups, L, D), each kv head repeated for its query group."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def _eager(q, k, v, mask, scale, dropout, training):
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # softmax in fp32
    weights = F.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, v), weights


def _flash(q, k, v, mask, scale, dropout, causal):
    """flash_attn_func on (B, H, L, D) inputs; only masks equal to the bottom-right causal pattern
    (no padding) can be expressed, anything else is refused."""
    from flash_attn import flash_attn_func  # lazy: optional extra

    lq, lk = q.shape[2], k.shape[2]
    if mask is not None:
        pattern = torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril(lk - lq)
        if not bool((mask == pattern).all()):
            raise ConfigError("attention: flash_attention_2 cannot apply a padding / per-slot mask "
                              "(left-padded batch or StaticCache); use attn_implementation='sdpa'")
        causal = True
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout,
                          softmax_scale=scale, causal=causal and lq > 1)
    return out  # (B, L, H, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None, scale: float,
              backend: str = "sdpa", causal: bool = False, dropout: float = 0.0,
              training: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention; returns (out (B, L, H, D), weights (B, H, L, K) for eager else None).

    Shapes: q (B, H, L, D); k, v (B, Hkv, K, D); mask bool, broadcastable to (B, 1, L, K), True = attend.
    `causal` is used only when mask is None (query i sees keys <= i + K - L).
    """
    groups = q.shape[1] // k.shape[1]
    if backend == "flash_attention_2":
        return _flash(q, k, v, mask, scale, dropout if training else 0.0, causal), None
    if mask is None and causal and q.shape[2] > 1 and (backend == "eager" or q.shape[2] != k.shape[2]):
        lq, lk = q.shape[2], k.shape[2]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)[None, None]
    if backend == "eager":
        out, weights = _eager(q, repeat_kv(k, groups), repeat_kv(v, groups), mask, scale, dropout, training)
        return out.transpose(1, 2), weights
    is_causal = mask is None and causal and q.shape[2] > 1
    gqa = {"enable_gqa": True} if groups > 1 and _SDPA_GQA else {}
    if groups > 1 and not gqa:
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout if training else 0.0,
                                         is_causal=is_causal, scale=scale, **gqa)
    return out.transpose(1, 2), None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                     scale: float, backend: str = "sdpa") -> torch.Tensor:
    """Non-causal attention within each segment [cu[i], cu[i+1]) of a packed sequence.

    Shapes: q, k, v (N, H, D) -> (N, H, D). Segments of equal length are stacked into one batched
    call (images of one size, frames of one video); other lengths loop. No N x N mask is built.
    """
    if backend == "flash_attention_2":
        from flash_attn import flash_attn_varlen_func  # lazy: optional extra

        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        max_len = int(lengths.max())
        cu = cu_seqlens.to(torch.int32)
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=False)
    bounds = cu_seqlens.tolist()
    out = torch.empty_like(q)
    by_len: dict[int, list[int]] = {}
    for i in range(len(bounds) - 1):
        by_len.setdefault(bounds[i + 1] - bounds[i], []).append(bounds[i])
    for length, starts in by_len.items():
        lo, count = starts[0], len(starts)
        if starts == list(range(lo, lo + count * length, length)):  # back to back: views, no gather
            qs, ks, vs = (x[lo:lo + count * length].view(count, length, *x.shape[1:]).transpose(1, 2)
                          for x in (q, k, v))
            seg, _ = attention(qs, ks, vs, mask=None, scale=scale, backend=backend)  # (S, len, H, D)
            if count * length == q.shape[0]:
                return seg.reshape(q.shape)  # one image / one video: the whole sequence
            out[lo:lo + count * length] = seg.reshape(-1, *q.shape[1:])
            continue
        index = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)).reshape(-1)
        # (S*len, H, D) -> (S, H, len, D)
        qs, ks, vs = (x.index_select(0, index).view(count, length, *x.shape[1:]).transpose(1, 2)
                      for x in (q, k, v))
        seg, _ = attention(qs, ks, vs, mask=None, scale=scale, backend=backend)  # (S, len, H, D)
        out.index_copy_(0, index, seg.reshape(-1, *q.shape[1:]))
    return out
