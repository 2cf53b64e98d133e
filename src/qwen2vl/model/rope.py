"""M-RoPE and vision 2-D rotary as pure functions (plain inputs in, tensors out); a leaf module.

Text positions are (3, L) rows t/h/w; vision ids are (N, 2) rows h/w in merger (2x2-block-major) order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwen2vl.errors import InputError

TEXT, IMAGE, VIDEO = 0, 1, 2
TEXT_START_RULES = ("max_thw", "max_hw")


def _runs(modality: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal modality as (modality, start, end)."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(modality) + 1):
        if i == len(modality) or modality[i] != modality[start]:
            runs.append((int(modality[start]), start, i))
            start = i
    return runs


def vision_block_positions(start: int, grid_thw: Sequence[int], merge_size: int) -> torch.Tensor:
    """(3, t*h/m*w/m) ids of one image/video: meshgrid over (t, h/m, w/m) row-major, offset by start."""
    t, h, w = (int(x) for x in grid_thw)
    gh, gw = h // merge_size, w // merge_size
    tt = torch.arange(t).view(t, 1, 1).expand(t, gh, gw)
    hh = torch.arange(gh).view(1, gh, 1).expand(t, gh, gw)
    ww = torch.arange(gw).view(1, 1, gw).expand(t, gh, gw)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def _next_start(start: int, grid_thw: Sequence[int], merge_size: int, rule: str) -> int:
    t, h, w = (int(x) for x in grid_thw)
    if rule == "max_hw":  # transformers 5.24: temporal extent ignored
        return start + max(h, w) // merge_size
    return start + max(t, h // merge_size, w // merge_size)  # one past the block's largest id (Qwen/v4/vLLM)


def mrope_position_ids(modality: Sequence[int], grid_thw: Sequence[Sequence[int]], merge_size: int,
                       rule: str = "max_thw") -> tuple[torch.Tensor, int]:
    """M-RoPE ids of one unpadded sequence.

    `modality` is per token (0 text, 1 image pad, 2 video pad); `grid_thw` lists the grids of the
    vision items in order of appearance. Text runs count up by one on all rows; a vision item gets
    `vision_block_positions(start, grid)`; the text after it starts at `_next_start` (see `rule`).
    Returns ((3, L) int64, rope_delta = max + 1 - L).

    Example (merge 2): [a, b, c, VS, I x6, VE, d, e] with image grid (1, 4, 6) gives
    t = [0,1,2,3, 4,4,4,4,4,4, 7,8,9], h = [0,1,2,3, 4,4,4,5,5,5, 7,8,9],
    w = [0,1,2,3, 4,5,6,4,5,6, 7,8,9] and delta 10 - 13 = -3.
    """
    if rule not in TEXT_START_RULES:
        raise InputError(f"mrope_position_ids: rule {rule!r} is unknown; use one of {list(TEXT_START_RULES)}")
    pieces: list[torch.Tensor] = []
    grids = iter(grid_thw)
    pos = 0
    for kind, begin, end in _runs(modality):
        if kind == TEXT:
            pieces.append(torch.arange(pos, pos + end - begin).expand(3, -1))
            pos += end - begin
            continue
        left = end - begin  # a run may hold several items placed back to back
        while left > 0:
            grid = next(grids, None)
            if grid is None:
                raise InputError(f"mrope_position_ids: {left} vision placeholder tokens have no grid left; "
                                 "pass one grid_thw row per image/video, in order of appearance")
            block = vision_block_positions(pos, grid, merge_size)
            if block.shape[1] > left:
                raise InputError(f"mrope_position_ids: grid {list(map(int, grid))} implies {block.shape[1]} "
                                 f"placeholder tokens but the run has only {left}; fix the grid or the placeholders")
            pieces.append(block)
            left -= block.shape[1]
            pos = _next_start(pos, grid, merge_size, rule)
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    delta = int(positions.max()) + 1 - positions.shape[1] if positions.numel() else 0
    return positions.long(), delta


def mm_token_type_ids_from_input_ids(input_ids: torch.Tensor, image_token_id: int,
                                     video_token_id: int) -> torch.Tensor:
    """Per-token modality (0 text, 1 image pad, 2 video pad) derived from the placeholder ids."""
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == image_token_id] = IMAGE
    types[input_ids == video_token_id] = VIDEO
    return types


def batch_mrope_position_ids(mm_token_type_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                             image_grid_thw: torch.Tensor | None, video_grid_thw: torch.Tensor | None, *,
                             merge_size: int, rule: str = "max_thw") -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (3, B, L) and rope_deltas (B, 1) for a (left-)padded batch.

    Padding (mask 0) is skipped and its slots keep 0, as transformers 5 does. Grids are consumed in
    flattened batch order: row 0's images first, then row 1's (one iterator per modality).
    """
    batch, length = mm_token_type_ids.shape
    device = mm_token_type_ids.device
    types = mm_token_type_ids.tolist()
    keep = attention_mask.bool().tolist() if attention_mask is not None else None
    grid_lists = {IMAGE: [] if image_grid_thw is None else image_grid_thw.tolist(),
                  VIDEO: [] if video_grid_thw is None else video_grid_thw.tolist()}
    cursor = {IMAGE: 0, VIDEO: 0}
    out = torch.zeros(3, batch, length, dtype=torch.long)
    deltas = []
    for b in range(batch):
        idx = [i for i in range(length) if keep is None or keep[b][i]]
        row = [types[b][i] for i in idx]
        grids = []  # this row's grids in order of appearance
        for kind, begin, end in _runs(row):
            if kind == TEXT:
                continue
            need = end - begin
            while need > 0 and cursor[kind] < len(grid_lists[kind]):
                g = grid_lists[kind][cursor[kind]]
                cursor[kind] += 1
                grids.append(g)
                need -= g[0] * (g[1] // merge_size) * (g[2] // merge_size)
        positions, delta = mrope_position_ids(row, grids, merge_size, rule)
        out[:, b, idx] = positions
        deltas.append(delta)
    return out.to(device), torch.tensor(deltas, dtype=torch.long, device=device).unsqueeze(1)


def decode_position_ids(rope_deltas: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """(3, B, L) positions for tokens after a cached prefix: `cache_position` (B, L) counts the row's
    real tokens before each new token; every axis gets count + rope_delta (= last assigned + 1)."""
    return (cache_position + rope_deltas.to(cache_position.device)).unsqueeze(0).expand(3, -1, -1)


def text_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """(head_dim/2,) fp32 inverse frequencies 1 / theta^(2j/head_dim)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


def mrope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section: Sequence[int],
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (B, L, head_dim) from (3, B, L) ids.

    Frequencies are computed in fp32 per axis, (3, B, L, D/2); slot chunks [0:s0) come from the t row,
    [s0:s0+s1) from h, the rest from w; the D/2 result is duplicated (rotate_half pairs j, j+D/2)
    and cast to the activation dtype (as the reference does).
    """
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device, torch.float)
    chunks = freqs.split(list(mrope_section), dim=-1)
    sel = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)  # (B, L, D/2)
    emb = torch.cat([sel, sel], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin (cos/sin already broadcastable to x)."""
    return x * cos + rotate_half(x) * sin


def vision_rotary_ids(grid_thw: torch.Tensor | Sequence[Sequence[int]], merge_size: int) -> torch.Tensor:
    """(N, 2) [h, w] patch coordinates in merger order: for each m x m block (row-major over blocks)
    its patches row-major; repeated for each temporal slice; items concatenated."""
    out = []
    for t, h, w in (grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw):
        hpos = torch.arange(h).view(h // merge_size, merge_size, 1, 1).expand(-1, -1, w // merge_size, merge_size)
        wpos = torch.arange(w).view(1, 1, w // merge_size, merge_size).expand(h // merge_size, merge_size, -1, -1)
        # (h/m, m, w/m, m) -> (h/m, w/m, m, m): block-major
        ids = torch.stack([hpos.permute(0, 2, 1, 3).reshape(-1), wpos.permute(0, 2, 1, 3).reshape(-1)], dim=1)
        out.append(ids.repeat(int(t), 1))
    return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.long)


def vision_cos_sin(rotary_ids: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin (N, head_dim): d/4 frequencies over d/2, [h-freqs | w-freqs] duplicated."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float, device=rotary_ids.device) / spatial))
    freqs = rotary_ids[..., None].float() * inv_freq  # (N, 2, d/4)
    hw = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)  # (N, d/2)
    emb = torch.cat([hw, hw], dim=-1)
    return emb.cos(), emb.sin()


def vision_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """int32 (S+1,) boundaries: one attention segment of h*w patches per temporal slice."""
    seg = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return torch.nn.functional.pad(seg.cumsum(0, dtype=torch.int32), (1, 0))
