"""Qwen2VLModel (embed, scatter vision features, M-RoPE positions, decoder) and the LM-head model.

Per-request rope_deltas live on the cache object, never on the model.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl.config import GenerationConfig, Qwen2VLConfig
from qwen2vl.errors import InputError
from qwen2vl.model import rope
from qwen2vl.model.attention import check_backend
from qwen2vl.model.cache import DynamicCache
from qwen2vl.model.linear import Linear
from qwen2vl.model.text import ModelOutput, Qwen2VLTextModel, RMSNorm
from qwen2vl.model.vision import BaseModelOutputWithPooling, Qwen2VisionTransformerPretrainedModel, PatchProj


class Qwen2VLModelOutputWithPast(ModelOutput):
    _fields = ("last_hidden_state", "past_key_values", "hidden_states", "attentions", "rope_deltas")


class Qwen2VLCausalLMOutputWithPast(ModelOutput):
    _fields = ("loss", "logits", "past_key_values", "hidden_states", "attentions", "rope_deltas")


class Qwen2VLModel(nn.Module):
    """Vision tower + text decoder; `visual` and `language_model` match transformers-5 key paths."""

    def __init__(self, config: Qwen2VLConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = Qwen2VisionTransformerPretrainedModel(config.vision_config)
        self.language_model = Qwen2VLTextModel(config.text_config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def _features(self, pixels: torch.Tensor, grid_thw: torch.Tensor, name: str) -> BaseModelOutputWithPooling:
        self.visual.check_inputs(pixels, grid_thw, name)
        out = self.visual(pixels.to(self.visual.dtype), grid_thw)
        sizes = (grid_thw.prod(-1) // self.visual.spatial_merge_size ** 2).tolist()
        out["pooler_output"] = torch.split(out.pooler_output, sizes)  # one (tokens, H) tensor per item
        return out

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                           **kwargs) -> BaseModelOutputWithPooling:
        """ViT outputs; `pooler_output` is a tuple with one (t*h*w/m^2, H) tensor per image."""
        return self._features(pixel_values, image_grid_thw, "pixel_values")

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor,
                           **kwargs) -> BaseModelOutputWithPooling:
        """As get_image_features, for videos."""
        return self._features(pixel_values_videos, video_grid_thw, "pixel_values_videos")

    def get_rope_index(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None = None,
                       image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None, rule: str | None = None,
                       **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE position ids (3, B, L) and rope_deltas (B, 1); see `rope.mrope_position_ids`.
        `rule` defaults to config.mrope_text_start_rule ("max_thw"); "max_hw" reproduces transformers 5.24."""
        if mm_token_type_ids is None:
            mm_token_type_ids = rope.mm_token_type_ids_from_input_ids(
                input_ids, self.config.image_token_id, self.config.video_token_id)
        return rope.batch_mrope_position_ids(
            mm_token_type_ids, attention_mask, image_grid_thw, video_grid_thw,
            merge_size=self.config.vision_config.spatial_merge_size, rule=rule or self.config.text_start_rule)

    def _placeholder_mask(self, embeds: torch.Tensor, token_id: int) -> torch.Tensor:
        """(B, L) bool: rows of inputs_embeds equal to the placeholder's embedding (transformers' rule)."""
        ref = self.get_input_embeddings()(torch.tensor(token_id, device=embeds.device))
        return (embeds == ref.to(embeds.dtype)).all(-1)

    def _types_from_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        types = torch.zeros(embeds.shape[:2], dtype=torch.int32, device=embeds.device)
        types[self._placeholder_mask(embeds, self.config.image_token_id)] = rope.IMAGE
        types[self._placeholder_mask(embeds, self.config.video_token_id)] = rope.VIDEO
        return types

    def _scatter(self, embeds: torch.Tensor, input_ids: torch.Tensor | None, features: tuple[torch.Tensor, ...],
                 token_id: int, kind: str) -> torch.Tensor:
        feats = torch.cat(features).to(embeds.device, embeds.dtype)
        if input_ids is not None:
            where = input_ids == token_id
        else:  # find placeholders by their embedding, as transformers does
            where = self._placeholder_mask(embeds, token_id)
        count = int(where.sum())
        if count != feats.shape[0]:
            raise InputError(f"{kind}: the prompt has {count} placeholder tokens (id {token_id}) but the grids imply "
                             f"{feats.shape[0]} features; Image/Video features and tokens do not match: expand each "
                             f"placeholder to grid_thw.prod()/merge_size^2 tokens (the processor does this)")
        return embeds.masked_scatter(where[..., None], feats)

    def _positions(self, input_ids, inputs_embeds, attention_mask, cache, past: int, image_grid_thw,
                   video_grid_thw, rope_deltas, mm_token_type_ids) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if past == 0 and (input_ids is not None or mm_token_type_ids is not None):
            mask = attention_mask[:, -length:] if attention_mask is not None else None
            positions, deltas = self.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw,
                                                    video_grid_thw, mask)
            return positions.to(device), deltas.to(device)
        deltas = rope_deltas if rope_deltas is not None else getattr(cache, "rope_deltas", None)
        if deltas is None:
            deltas = torch.zeros(batch, 1, dtype=torch.long, device=device)
        new = (attention_mask[:, -length:].long().to(device) if attention_mask is not None
               else torch.ones(batch, length, dtype=torch.long, device=device))
        if attention_mask is not None and attention_mask.shape[-1] == past + length:
            before = attention_mask[:, :past].long().sum(-1).to(device)
        else:
            real = cache.real_lengths() if cache is not None else None
            before = real.to(device) if real is not None else torch.full((batch,), past, device=device)
        count = before[:, None] + new.cumsum(-1) - 1  # real tokens before each new token
        deltas = deltas.to(device).reshape(-1, 1).expand(batch, 1)
        return rope.decode_position_ids(deltas, count.clamp(min=0)), deltas

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                pixel_values: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                rope_deltas: torch.Tensor | None = None, mm_token_type_ids: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                **kwargs) -> Qwen2VLModelOutputWithPast:
        cache = past_key_values if past_key_values is not None else kwargs.get("cache")
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("Qwen2VLModel: got both or neither of input_ids and inputs_embeds; pass exactly one")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        elif mm_token_type_ids is None and position_ids is None and (pixel_values is not None
                                                                     or pixel_values_videos is not None):
            mm_token_type_ids = self._types_from_embeds(inputs_embeds)
        if pixel_values is not None:
            feats = self.get_image_features(pixel_values, image_grid_thw).pooler_output
            inputs_embeds = self._scatter(inputs_embeds, input_ids, feats, self.config.image_token_id, "images")
        if pixel_values_videos is not None:
            feats = self.get_video_features(pixel_values_videos, video_grid_thw).pooler_output
            inputs_embeds = self._scatter(inputs_embeds, input_ids, feats, self.config.video_token_id, "videos")
        use_cache = self.config.text_config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        limit = self.config.text_config.max_position_embeddings
        if past + inputs_embeds.shape[1] > limit:
            raise InputError(f"input_ids: {past} cached + {inputs_embeds.shape[1]} new tokens exceed "
                             f"max_position_embeddings {limit}; shorten the prompt or lower max_new_tokens")
        deltas = rope_deltas
        if position_ids is None:
            position_ids, deltas = self._positions(input_ids, inputs_embeds, attention_mask, cache, past,
                                                   image_grid_thw, video_grid_thw, rope_deltas, mm_token_type_ids)
            if cache is not None and past == 0:
                cache.rope_deltas = deltas
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=cache, use_cache=use_cache,
                                  output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        return Qwen2VLModelOutputWithPast(last_hidden_state=out.last_hidden_state, past_key_values=out.past_key_values,
                                          hidden_states=out.hidden_states, attentions=out.attentions,
                                          rope_deltas=deltas)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | None = None) -> torch.Tensor:
    """Token t predicts labels[t+1]; -100 is ignored; mean over counted tokens (or sum / num_items_in_batch)."""
    shifted = F.pad(labels.to(logits.device), (0, 1), value=-100)[..., 1:]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100,
                           reduction="sum" if num_items_in_batch is not None else "mean")
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


class Qwen2VLForConditionalGeneration(nn.Module):
    """Qwen2VLModel + lm_head; forward/generate/from_pretrained/save_pretrained like transformers."""

    def __init__(self, config: Qwen2VLConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2VLModel(config)
        text = config.text_config
        self.lm_head = Linear(text.hidden_size, text.vocab_size, bias=False)
        # decoding defaults: from_pretrained replaces these with generation_config.json when shipped
        self.generation_config = GenerationConfig.from_model_config(config)
        self.name_or_path = ""
        self.set_attn_implementation(config.attn_implementation or "sdpa")
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()
        self.tie_weights()

    # ---- properties and small helpers -------------------------------------------------------
    # read from the embedding: quantize.py may swap lm_head for a module without a float .weight
    @property
    def device(self) -> torch.device:
        return self.model.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.embed_tokens.weight.dtype

    @property
    def visual(self) -> Qwen2VisionTransformerPretrainedModel:
        return self.model.visual

    @property
    def language_model(self) -> Qwen2VLTextModel:
        return self.model.language_model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_attn_implementation(self, name: str) -> None:
        """Select "sdpa" | "eager" | "flash_attention_2" for both the ViT and the decoder."""
        name = check_backend(name)
        self.config.attn_implementation = name
        self.model.visual.attn_implementation = name
        self.model.language_model.attn_implementation = name

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init as transformers does: normal(0, initializer_range) weights, zero biases, unit norms."""
        std_text = self.config.text_config.initializer_range
        std_vision = self.config.vision_config.initializer_range
        for name, module in self.named_modules():
            std = std_vision if name.startswith("model.visual") else std_text
            if isinstance(module, (nn.Linear, nn.Embedding, PatchProj)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, **kwargs):
        return self.model.get_image_features(pixel_values, image_grid_thw, **kwargs)

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor, **kwargs):
        return self.model.get_video_features(pixel_values_videos, video_grid_thw, **kwargs)

    def get_rope_index(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.get_rope_index(*args, **kwargs)

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, pixel_values: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                video_grid_thw: torch.Tensor | None = None, rope_deltas: torch.Tensor | None = None,
                mm_token_type_ids: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                **kwargs) -> Qwen2VLCausalLMOutputWithPast:
        """Logits (B, kept, V) in the model dtype; loss (fp32) when labels (B, L) are given."""
        if labels is not None:
            ref = input_ids if input_ids is not None else (inputs_embeds[..., 0] if inputs_embeds is not None else None)
            if ref is not None and tuple(labels.shape) != tuple(ref.shape):
                raise InputError(f"labels: shape {tuple(labels.shape)} differs from input_ids shape "
                                 f"{tuple(ref.shape)}; pass one label per input token (-100 to ignore)")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         pixel_values=pixel_values, pixel_values_videos=pixel_values_videos,
                         image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, rope_deltas=rope_deltas,
                         mm_token_type_ids=mm_token_type_ids, output_hidden_states=output_hidden_states,
                         output_attentions=output_attentions, cache=kwargs.get("cache"))
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:  # 1-D tensor of positions
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise InputError(f"labels: {labels.shape[1]} labels per row but logits were kept for "
                                 f"{logits.shape[1]} positions; use logits_to_keep=0 with labels")
            loss = causal_lm_loss(logits, labels, kwargs.get("num_items_in_batch"))
        return Qwen2VLCausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                             hidden_states=out.hidden_states, attentions=out.attentions,
                                             rope_deltas=out.rope_deltas)

    def generate(self, *args, **kwargs):
        """transformers-compatible generate(); the generation loop lives in qwen2vl.generation (lazy upward import)."""
        from qwen2vl.generation.generate import generate

        return generate(self, *args, **kwargs)

    # ---- checkpoints (implemented in qwen2vl.weights; lazy import, weights sits above model) ----
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype="auto", device_map=None,
                        attn_implementation: str | None = None, **kwargs) -> "Qwen2VLForConditionalGeneration":
        """Load config + safetensors (single or sharded, hub or transformers-5 key layout) onto a meta-built model."""
        from qwen2vl.weights import load_pretrained

        return load_pretrained(cls, path_or_hub_id, dtype=dtype, device_map=device_map,
                               attn_implementation=attn_implementation, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str | None = None,
                        **kwargs) -> None:
        """Write config.json (+ generation_config.json) and hub-layout safetensors, optionally sharded."""
        from qwen2vl.weights import save_pretrained

        save_pretrained(self, save_directory, max_shard_size=max_shard_size, **kwargs)
