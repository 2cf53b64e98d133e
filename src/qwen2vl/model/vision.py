"""The ViT encoder: PatchEmbed, VisionBlock, PatchMerger, Qwen2VisionTransformerPretrainedModel.

Input rows are patches in 2x2-block-major order (C, T, P, P flattened); attention is block-diagonal
per image / per temporal slice (cu_seqlens) and never materialises an N x N mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl.config import Qwen2VLVisionConfig
from qwen2vl.errors import InputError
from qwen2vl.model import rope
from qwen2vl.model.attention import check_backend, varlen_attention
from qwen2vl.model.linear import Linear
from qwen2vl.model.text import ModelOutput, activation
from qwen2vl.native import rotary as native_rotary


class BaseModelOutputWithPooling(ModelOutput):
    _fields = ("last_hidden_state", "pooler_output", "hidden_states", "attentions")


class PatchProj(nn.Module):
    """Holds the Conv3d-shaped weight (E, C, T, P, P) so checkpoints load unchanged."""

    def __init__(self, embed_dim: int, in_channels: int, temporal: int, patch: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(embed_dim, in_channels, temporal, patch, patch))


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = one whole row (each pixel_values row is one (C, T, P, P) window).

    Mathematically one matmul (N, C*T*P*P) @ W^T, but computed with conv3d as the reference does: in
    bf16 the matmul rounds differently, which flipped greedy tokens of a 2B-shape model after ~20 steps.
    """

    def __init__(self, config: Qwen2VLVisionConfig) -> None:
        super().__init__()
        self.embed_dim = config.embed_dim
        self.proj = PatchProj(config.embed_dim, config.in_channels, config.temporal_patch_size, config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight  # (E, C, T, P, P)
        x = pixel_values.to(weight.dtype).view(-1, *weight.shape[1:])  # (N, C, T, P, P)
        return F.conv3d(x, weight, stride=weight.shape[2:]).view(-1, self.embed_dim)  # (N, E)


class VisionAttention(nn.Module):
    def __init__(self, config: Qwen2VLVisionConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.qkv = Linear(config.embed_dim, 3 * config.embed_dim, bias=True)
        self.proj = Linear(config.embed_dim, config.embed_dim, bias=True)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backend: str) -> torch.Tensor:
        n = x.shape[0]
        # qkv features are [q | k | v], each head-major: (N, 3E) -> (N, 3, H, D)
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        # rotary in fp32, then back to the activation dtype (fix for fp16/bf16 garbage, transformers #33294);
        # on CPU in bf16 one fused pass gives the same bits (native/rotary.c: ~8 torch ops per tensor)
        if native_rotary.supports(q, cos, sin):
            q, k = native_rotary.rotary_bf16(q, cos, sin), native_rotary.rotary_bf16(k, cos, sin)
        else:
            q = rope.apply_rotary(q.float(), cos[:, None], sin[:, None]).to(x.dtype)  # cos/sin (N, 1, D)
            k = rope.apply_rotary(k.float(), cos[:, None], sin[:, None]).to(x.dtype)
        out = varlen_attention(q, k, v, cu_seqlens, scale=self.scaling, backend=backend)
        return self.proj(out.reshape(n, -1))


class VisionMlp(nn.Module):
    def __init__(self, config: Qwen2VLVisionConfig) -> None:
        super().__init__()
        hidden = int(config.embed_dim * config.mlp_ratio)
        self.fc1 = Linear(config.embed_dim, hidden)
        self.fc2 = Linear(hidden, config.embed_dim)
        self.act = activation(config.hidden_act)  # quick_gelu in the released models

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: Qwen2VLVisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMlp(config)

    def forward(self, x, cu_seqlens, cos, sin, backend):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin, backend)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm per patch, then each m*m consecutive rows (one merge block) -> one LM token."""

    def __init__(self, config: Qwen2VLVisionConfig) -> None:
        super().__init__()
        self.hidden_size = config.embed_dim * config.spatial_merge_size ** 2
        self.ln_q = nn.LayerNorm(config.embed_dim, eps=1e-6)
        # mlp.1 is the parameter-free exact GELU (keys mlp.0 / mlp.2 as in checkpoints)
        self.mlp = nn.Sequential(Linear(self.hidden_size, self.hidden_size), nn.GELU(),
                                 Linear(self.hidden_size, config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, E) -> (N/m^2, m^2 E): [patch(0,0) | patch(0,1) | patch(1,0) | patch(1,1)]
        return self.mlp(self.ln_q(x).view(-1, self.hidden_size))


class Qwen2VisionTransformerPretrainedModel(nn.Module):
    """pixel_values (N, C*T*P*P) + grid_thw (n, 3) -> pooler_output (N/m^2, LM hidden)."""

    def __init__(self, config: Qwen2VLVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.spatial_merge_size = config.spatial_merge_size
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)
        self.attn_implementation = "sdpa"

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def check_inputs(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, name: str = "pixel_values") -> None:
        """Raise InputError unless rows have the patch width and grids account for every row."""
        width = self.config.patch_dim
        if pixel_values.ndim != 2 or pixel_values.shape[1] != width:
            raise InputError(f"{name}: has shape {tuple(pixel_values.shape)} but rows must be {width} wide "
                             f"(channels*temporal_patch*patch^2); pass the processor's flattened patches")
        if grid_thw is None or grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
            got = None if grid_thw is None else tuple(grid_thw.shape)
            raise InputError(f"{name}: grid_thw has shape {got}; pass one (t, h, w) row per image/video")
        rows = int(grid_thw.prod(-1).sum())
        if rows != pixel_values.shape[0]:
            raise InputError(f"{name}: grid_thw implies {rows} patch rows but {pixel_values.shape[0]} were given; "
                             "pass the grid_thw the processor returned with these pixels")
        m = self.spatial_merge_size
        if bool(((grid_thw[:, 1] % m) != 0).any() or ((grid_thw[:, 2] % m) != 0).any()):
            raise InputError(f"{name}: grid_thw {grid_thw.tolist()} has h or w not divisible by "
                             f"spatial_merge_size {m}; resize images to multiples of {m * self.config.patch_size} px")

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor,
                output_hidden_states: bool = False, **kwargs) -> BaseModelOutputWithPooling:
        self.check_inputs(hidden_states, grid_thw)
        backend = check_backend(self.attn_implementation)
        grid_thw = grid_thw.to(torch.long)
        ids = rope.vision_rotary_ids(grid_thw.cpu(), self.spatial_merge_size).to(hidden_states.device)
        cos, sin = rope.vision_cos_sin(ids, self.config.head_dim, self.config.rope_theta)  # fp32 (N, D)
        cu_seqlens = rope.vision_cu_seqlens(grid_thw.cpu())
        x = self.patch_embed(hidden_states)
        states = []
        for block in self.blocks:
            if output_hidden_states:
                states.append(x)
            x = block(x, cu_seqlens, cos, sin, backend)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=self.merger(x),
                                          hidden_states=tuple(states + [x]) if output_hidden_states else None)
