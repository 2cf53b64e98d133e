"""Contiguous KV caches for the transformers-compatible path: DynamicCache (grows) and StaticCache.

API used by the text model (and by generation code), per forward of L new tokens:
  mask, q_slots = cache.begin(L, attention_mask, device, B)
      # mask: bool (B, 1, L, K), True = attend (None = plain causal); q_slots (B, L) query slot ids;
      # K = past + L (the static cache attends over its filled slots only, as the growing one does)
  k, v = cache.update(k_new, v_new, layer_idx)    # per layer; returns the keys/values to attend over
  cache.end(L)                                    # after the last layer: commit the step
  cache.real_lengths()                            # (B,) real (non-pad) tokens held per row
Both expose `get_seq_length()` and `rope_deltas` ((B, 1) or None until the model's prefill sets it).

StaticCache(config, batch_size, max_cache_len, dtype=None, device=None) allocates once per layer
k/v (B, Hkv, max_cache_len, D), `lengths` (B,) filled slots per row and `valid` (B, max_cache_len)
slots holding real tokens. Row b's L new tokens go to slots lengths[b]..lengths[b]+L-1; their
validity comes from the last L columns of the 2-D attention_mask (all valid without one); a query
in slot s attends to slots that are valid and <= s. Rows may sit at different lengths (continuous
batching: `reset_rows` empties rows, `select_rows` drops finished ones). Decoding never reallocates.
"""

from __future__ import annotations

import torch

from qwen2vl.errors import InputError


class DynamicCache:
    """Per-layer k/v concatenated along the sequence; the 2-D attention_mask (B, past + L) gives padding."""

    def __init__(self) -> None:
        self.key_cache: list[torch.Tensor] = []
        self.value_cache: list[torch.Tensor] = []
        self.rope_deltas: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None  # (B, past) bool validity of cached slots

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.key_cache[layer_idx].shape[2] if len(self.key_cache) > layer_idx else 0

    def __len__(self) -> int:
        return len(self.key_cache)

    def real_lengths(self) -> torch.Tensor | None:
        """(B,) real tokens cached per row (None before the first forward)."""
        return None if self._mask is None else self._mask.sum(-1)

    def begin(self, new_len: int, attention_mask: torch.Tensor | None, device: torch.device,
              batch_size: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        past = self.get_seq_length()
        total = past + new_len
        if attention_mask is None:
            valid = torch.ones(batch_size, total, dtype=torch.bool, device=device)
            if self._mask is not None:
                valid[:, :past] = self._mask
        elif attention_mask.shape[-1] == total:
            valid = attention_mask.bool().to(device)
        elif attention_mask.shape[-1] == new_len and self._mask is not None:
            valid = torch.cat([self._mask, attention_mask.bool().to(device)], dim=-1)
        else:
            raise InputError(f"attention_mask: has {attention_mask.shape[-1]} columns but the cache holds {past} "
                             f"tokens and {new_len} are new; pass a mask of {total} columns (past + new)")
        self._pending = valid
        query_slot = torch.arange(past, total, device=device)
        q_slots = query_slot[None].expand(batch_size, -1)
        if past == 0 and bool(valid.all()):
            return None, q_slots  # no padding, nothing cached: plain causal attention
        keys = torch.arange(total, device=device)[None, :]
        causal = keys <= query_slot[:, None]  # (L, K)
        own = keys == query_slot[:, None]  # a pad query sees itself, so no row is fully masked (no NaN)
        return ((valid[:, None, :] & causal[None]) | own[None])[:, None], q_slots

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.key_cache) <= layer_idx:
            self.key_cache.append(key)
            self.value_cache.append(value)
        else:
            self.key_cache[layer_idx] = torch.cat([self.key_cache[layer_idx], key], dim=2)
            self.value_cache[layer_idx] = torch.cat([self.value_cache[layer_idx], value], dim=2)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def end(self, new_len: int) -> None:
        self._mask = self._pending


class StaticCache:
    """Preallocated per-row KV cache with per-slot validity (see the module docstring)."""

    def __init__(self, config, batch_size: int, max_cache_len: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        text = getattr(config, "text_config", config)
        dtype = dtype or torch.float32
        shape = (batch_size, text.num_key_value_heads, max_cache_len, text.head_dim)
        self.key_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(text.num_hidden_layers)]
        self.value_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(text.num_hidden_layers)]
        self.batch_size, self.max_cache_len = batch_size, max_cache_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, max_cache_len, dtype=torch.bool, device=device)
        self.rope_deltas: torch.Tensor | None = None
        self._index: torch.Tensor | None = None
        self._where: tuple[torch.Tensor, ...] = ()
        self._end = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Largest fill over the rows (slots used so far)."""
        return int(self.lengths.max()) if self.batch_size else 0

    def real_lengths(self) -> torch.Tensor:
        return self.valid.sum(-1)

    def reset(self) -> None:
        self.reset_rows(torch.arange(self.batch_size, device=self.lengths.device))
        self.rope_deltas = None

    def reset_rows(self, rows: torch.Tensor | list[int]) -> None:
        """Empty the given rows (their slots become free; k/v memory is reused, not zeroed)."""
        rows = torch.as_tensor(rows, device=self.lengths.device)
        self.lengths[rows] = 0
        self.valid[rows] = False

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep only rows `keep` (sorted indices), moved to the front; the cache continues on views of the
        first n rows of the same buffers, so dropping finished rows never allocates k/v memory."""
        keep = torch.as_tensor(keep, device=self.lengths.device)
        n = int(keep.numel())
        for store in (self.key_cache, self.value_cache):
            for layer, buf in enumerate(store):
                buf[:n] = buf.index_select(0, keep.to(buf.device))  # gather first: rows may move down
                store[layer] = buf[:n]
        self.lengths = self.lengths.index_select(0, keep)
        self.valid = self.valid.index_select(0, keep)
        if self.rope_deltas is not None:
            self.rope_deltas = self.rope_deltas.index_select(0, keep.to(self.rope_deltas.device))
        self.batch_size = n

    def begin(self, new_len: int, attention_mask: torch.Tensor | None, device: torch.device,
              batch_size: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        if batch_size != self.batch_size:
            raise InputError(f"StaticCache: batch has {batch_size} rows but the cache was built for "
                             f"{self.batch_size}; build a StaticCache with batch_size={batch_size}")
        past = int(self.lengths.max())
        end = past + new_len
        if end > self.max_cache_len:
            raise InputError(f"StaticCache: {end} slots needed but max_cache_len is {self.max_cache_len}; "
                             "build the cache with a larger max_cache_len")
        self._end = end  # attention reads slots [0, end) only, like a cache that grows (same kernel calls)
        self._index = self.lengths[:, None] + torch.arange(new_len, device=self.lengths.device)  # (B, L)
        # (row, head, slot) index tensors broadcasting to (B, Hkv, L): where update() writes (all cache
        # tensors live on the device given at construction)
        self._where = (torch.arange(batch_size, device=self.lengths.device)[:, None, None],
                       torch.arange(self.key_cache[0].shape[1], device=self.lengths.device)[None, :, None],
                       self._index[:, None, :])
        new_valid = (torch.ones(batch_size, new_len, dtype=torch.bool, device=self.valid.device)
                     if attention_mask is None else attention_mask[:, -new_len:].bool().to(self.valid.device))
        self.valid.scatter_(1, self._index, new_valid)
        valid = self.valid[:, :end]
        if (new_len == 1 or past == 0) and bool(valid.all()) and bool((self.lengths == past).all()):
            return None, self._index.to(device)  # rows aligned, no padding: plain causal attention
        slots = torch.arange(end, device=self.valid.device)[None, None, :]
        index = self._index[:, :, None]
        mask = (valid[:, None, :] & (slots <= index)) | (slots == index)  # (B, L, K); own slot avoids NaN
        return mask[:, None].to(device), self._index.to(device)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        # index_put_ writes only the new (B, Hkv, L, D) entries; scatter_ on CPU copied the whole cache
        # twice per call (0.2 ms per layer at 8 x 459 slots, more than the step's attention)
        keys, values = self.key_cache[layer_idx], self.value_cache[layer_idx]
        keys.index_put_(self._where, key.to(keys.dtype))
        values.index_put_(self._where, value.to(values.dtype))
        return keys[:, :, :self._end], values[:, :, :self._end]  # (B, Hkv, K, D) views

    def end(self, new_len: int) -> None:
        self.lengths += new_len
        self._index, self._where = None, ()
