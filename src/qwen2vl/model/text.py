"""The Qwen2 text decoder with M-RoPE: RMSNorm, MLP, Attention, DecoderLayer, Qwen2VLTextModel.

Attribute paths equal the transformers-5 checkpoint keys (`layers.N.self_attn.q_proj`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl.config import Qwen2VLTextConfig
from qwen2vl.errors import InputError
from qwen2vl.model import rope
from qwen2vl.model.attention import attention, check_backend
from qwen2vl.model.cache import DynamicCache
from qwen2vl.model.linear import Linear


class ModelOutput(dict):
    """Dict of the non-None outputs with attribute access (None for absent declared fields), like transformers."""

    _fields: tuple[str, ...] = ()

    def __init__(self, **values) -> None:
        super().__init__((k, v) for k, v in values.items() if v is not None)

    def __getattr__(self, name: str):
        if name == "cache" and "past_key_values" in type(self)._fields:  # transformers-5 name
            name = "past_key_values"
        if name in self:
            return self[name]
        if name in type(self)._fields:
            return None
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        self[name] = value

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self.values())


class BaseModelOutputWithPast(ModelOutput):
    _fields = ("last_hidden_state", "past_key_values", "hidden_states", "attentions", "rope_deltas")


def activation(name: str):
    """Activation by config name; quick_gelu is x * sigmoid(1.702 x) (ViT MLP), gelu is exact erf."""
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[name]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, cast back to the input dtype BEFORE the weight multiply (reference order)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    def __init__(self, config: Qwen2VLTextConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, config: Qwen2VLTextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache, backend: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, _ = x.shape
        # (B, L, H*D) -> (B, H, L, D)
        q = self.q_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)  # cos/sin (B, 1, L, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out, weights = attention(q, k, v, mask=mask, scale=self.scaling, backend=backend, causal=True,
                                 dropout=self.attention_dropout, training=self.training)
        return self.o_proj(out.reshape(b, n, -1)), weights


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2VLTextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attention_type = config.layer_types[layer_idx]

    def forward(self, h, cos, sin, mask, cache, backend):
        attn, weights = self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, backend)
        h = h + attn
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, weights


def _sliding(mask: torch.Tensor | None, q_slots: torch.Tensor, key_len: int, window: int) -> torch.Tensor:
    """Restrict a (B, 1, L, K) mask (None = causal) to keys with q_slot - k_slot < window."""
    keys = torch.arange(key_len, device=q_slots.device)
    near = (q_slots[:, :, None] - keys[None, None]) < window  # (B, L, K)
    if mask is None:
        mask = keys[None, None] <= q_slots[:, :, None]
        mask = mask[:, None]
    return mask & near[:, None]


class Qwen2VLTextModel(nn.Module):
    """Embedding + decoder layers + final norm; positions are (3, B, L) M-RoPE ids."""

    def __init__(self, config: Qwen2VLTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.register_buffer("inv_freq", rope.text_inv_freq(config.head_dim, config.rope_theta), persistent=False)
        self.attn_implementation = "sdpa"

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        """Shapes: input_ids (B, L) or inputs_embeds (B, L, H); attention_mask (B, past + L);
        position_ids (3, B, L), (B, L) or (4, B, L) (the leading text row is dropped)."""
        cache = past_key_values if past_key_values is not None else kwargs.get("cache")
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("Qwen2VLTextModel: got both or neither of input_ids and inputs_embeds; pass exactly one")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = DynamicCache()
        batch, length = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(length, device=inputs_embeds.device) + past).view(1, 1, -1)
            position_ids = position_ids.expand(3, batch, -1)
        elif position_ids.ndim == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        elif position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        backend = check_backend(self.attn_implementation)
        if output_attentions and backend != "eager":
            raise InputError(f"output_attentions: the {backend!r} backend returns no attention weights; "
                             "load the model with attn_implementation='eager'")
        work = cache if cache is not None else DynamicCache()  # throwaway: only builds the mask
        mask, q_slots = work.begin(length, attention_mask, inputs_embeds.device, batch)
        cos, sin = rope.mrope_cos_sin(position_ids.to(inputs_embeds.device), self.inv_freq,
                                      self.config.mrope_section, inputs_embeds.dtype)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, L, D): broadcast over heads
        sliding = None
        if "sliding_attention" in self.config.layer_types:
            key_len = past + length
            sliding = _sliding(mask, q_slots, key_len, self.config.sliding_window)
        hidden, all_hidden, all_attn = inputs_embeds, [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden)
            layer_mask = sliding if layer.attention_type == "sliding_attention" else mask
            hidden, weights = layer(hidden, cos, sin, layer_mask, cache, backend)
            if output_attentions:
                all_attn.append(weights)
        work.end(length)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden, past_key_values=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None)
