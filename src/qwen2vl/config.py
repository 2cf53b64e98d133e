"""Qwen2-VL configuration dataclasses: text, vision, root and generation configs.

Reads the flat hub `config.json` layout and the nested layout transformers 5 writes; imports only errors.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from qwen2vl.errors import ConfigError, MissingDependencyError

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "quick_gelu", "relu")
_LAYER_TYPES = ("full_attention", "sliding_attention")
MROPE_TEXT_START_RULES = ("max_thw", "max_hw")


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def _check(cond: bool, where: str, what: str, fix: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {what}; {fix}")


@dataclass(slots=True)
class Qwen2VLVisionConfig:
    """The ViT encoder and patch merger (defaults = every released size)."""

    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 3584  # merger output width = LM hidden size
    hidden_act: str = "quick_gelu"
    mlp_ratio: int = 4
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    initializer_range: float = 0.02
    rope_parameters: dict | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = "vision_config"
        _check(self.embed_dim % self.num_heads == 0, where,
               f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}",
               "choose num_heads dividing embed_dim")
        _check(self.head_dim % 4 == 0, where, f"head_dim {self.head_dim} is not a multiple of 4",
               "the 2-D rotary needs head_dim divisible by 4")
        _check(self.hidden_act in _ACTIVATIONS, where, f"hidden_act {self.hidden_act!r} is unknown",
               f"use one of {list(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_attention_heads(self) -> int:
        return self.num_heads

    @property
    def num_hidden_layers(self) -> int:
        return self.depth

    @property
    def in_chans(self) -> int:
        return self.in_channels

    @property
    def rope_theta(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", 10000.0))

    @property
    def patch_dim(self) -> int:
        """Width of one pixel_values row: C * T * P * P (1176 for the released models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Qwen2VLVisionConfig":
        d = dict(d)
        aliases = {"in_chans": "in_channels", "num_attention_heads": "num_heads", "num_hidden_layers": "depth"}
        for alias, name in aliases.items():
            if alias in d:
                value = d.pop(alias)
                d.setdefault(name, value)
        names = _field_names(cls) - {"extra"}
        extra = {k: v for k, v in d.items() if k not in names}
        extra.update(d.get("extra") or {})
        return cls(**{k: v for k, v in d.items() if k in names}, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out["rope_parameters"] = self.rope_parameters or {"rope_theta": 10000.0, "rope_type": "axial"}
        out.update(self.extra)
        out["in_chans"] = self.in_channels  # what the hub files spell
        out["model_type"] = "qwen2_vl_vision"
        return out


@dataclass(slots=True)
class Qwen2VLTextConfig:
    """The Qwen2 decoder (class defaults are the 72B shape, as in transformers)."""

    vocab_size: int = 152064
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-05
    use_cache: bool = True
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 80
    layer_types: list[str] | None = None
    attention_dropout: float = 0.0
    rope_parameters: dict | None = None
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Fill the derived defaults the way transformers does (None -> derived); given values stay.
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if not self.use_sliding_window:
            self.sliding_window = None
        if self.layer_types is None:
            self.layer_types = [
                "sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
                else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        self.rope_parameters = dict(self.rope_parameters or {})
        self.rope_parameters.setdefault("rope_theta", 1000000.0)
        if self.rope_parameters.get("rope_type", self.rope_parameters.get("type")) in (None, "mrope"):
            self.rope_parameters["rope_type"] = "default"
        self._validate()

    def _validate(self) -> None:
        where = "text_config"
        _check(self.hidden_size % self.num_attention_heads == 0, where,
               f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}",
               "choose a head count dividing hidden_size")
        _check(self.num_attention_heads % self.num_key_value_heads == 0, where,
               f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
               f"{self.num_key_value_heads}", "use a key/value head count dividing the query heads")
        _check(self.hidden_act in _ACTIVATIONS, where, f"hidden_act {self.hidden_act!r} is unknown",
               f"use one of {list(_ACTIVATIONS)}")
        _check(len(self.layer_types) == self.num_hidden_layers, where,
               f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}",
               "give one entry per layer")
        bad = sorted(set(self.layer_types) - set(_LAYER_TYPES))
        _check(not bad, where, f"layer_types contains {bad}", f"use only {list(_LAYER_TYPES)}")
        section = self.mrope_section
        _check(sum(section) * 2 == self.head_dim, where,
               f"rope_parameters.mrope_section {section} sums to {sum(section)} but head_dim/2 is {self.head_dim // 2}",
               "the three sections must cover head_dim/2 frequency slots")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    @property
    def mrope_section(self) -> list[int]:
        return list(self.rope_parameters.get("mrope_section", [16, 24, 24]))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Qwen2VLTextConfig":
        d = dict(d)
        rope = d.pop("rope_scaling", None) or d.get("rope_parameters")
        rope = dict(rope) if rope else {}
        if "rope_theta" in d:
            rope.setdefault("rope_theta", d.pop("rope_theta"))
        d["rope_parameters"] = rope or None
        names = _field_names(cls) - {"extra"}
        extra = {k: v for k, v in d.items() if k not in names}
        extra.update(d.get("extra") or {})
        return cls(**{k: v for k, v in d.items() if k in names}, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out["rope_parameters"] = dict(self.rope_parameters)
        out["layer_types"] = list(self.layer_types)
        out.update(self.extra)
        out["model_type"] = "qwen2_vl_text"
        return out


# Text-config keys a flat (hub) config.json carries at the root.
_TEXT_ROOT_KEYS = frozenset(f.name for f in fields(Qwen2VLTextConfig)) - {"extra"} | {"rope_scaling", "rope_theta"}


@dataclass(slots=True)
class Qwen2VLConfig:
    """Root config: text + vision sub-configs and the multimodal token ids."""

    text_config: Qwen2VLTextConfig | dict | None = None
    vision_config: Qwen2VLVisionConfig | dict | None = None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    dtype: str | None = None  # "bfloat16" etc.; hub files say torch_dtype
    # Text start after a vision block: "max_thw" = start + max(t, h/m, w/m) (Qwen/v4/vLLM, our
    # default); "max_hw" = start + max(h, w)/m (transformers 5.24). None means the default.
    mrope_text_start_rule: str | None = None
    attn_implementation: str | None = None  # runtime choice, never written to config.json
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.text_config is None:
            self.text_config = Qwen2VLTextConfig()
        elif isinstance(self.text_config, Mapping):
            self.text_config = Qwen2VLTextConfig.from_dict(self.text_config)
        if self.vision_config is None:
            self.vision_config = Qwen2VLVisionConfig()
        elif isinstance(self.vision_config, Mapping):
            self.vision_config = Qwen2VLVisionConfig.from_dict(self.vision_config)
        rule = self.mrope_text_start_rule
        _check(rule is None or rule in MROPE_TEXT_START_RULES, "mrope_text_start_rule",
               f"{rule!r} is unknown", f"use one of {list(MROPE_TEXT_START_RULES)}")

    @property
    def text_start_rule(self) -> str:
        return self.mrope_text_start_rule or "max_thw"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Qwen2VLConfig":
        """Build from a config.json dict: flat hub layout or nested transformers-5 layout."""
        d = dict(d)
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected a dict, got {type(d).__name__}; pass the parsed config.json")
        dtype = d.pop("torch_dtype", None) or d.pop("dtype", None)
        text = d.pop("text_config", None)
        if text is None:  # flat hub layout: text fields sit at the root
            text = {k: d.pop(k) for k in list(d) if k in _TEXT_ROOT_KEYS}
        else:
            text = dict(text)
            text.pop("dtype", None)
            text.pop("torch_dtype", None)
        vision = dict(d.pop("vision_config", None) or {})
        tie = d.pop("tie_word_embeddings", None)
        if tie is None:
            tie = bool(text.get("tie_word_embeddings", False))
        elif not tie and text.get("tie_word_embeddings"):
            tie = True  # an older nested save put the flag inside text_config
        text.pop("tie_word_embeddings", None)
        d.pop("model_type", None)
        names = _field_names(cls) - {"extra", "text_config", "vision_config", "tie_word_embeddings", "dtype",
                                     "attn_implementation"}
        extra = {k: v for k, v in d.items() if k not in names}
        extra.update(d.get("extra") or {})
        known = {k: v for k, v in d.items() if k in names}
        return cls(text_config=Qwen2VLTextConfig.from_dict(text), vision_config=Qwen2VLVisionConfig.from_dict(vision),
                   tie_word_embeddings=bool(tie), dtype=_dtype_name(dtype), extra=extra, **known)

    def to_dict(self) -> dict[str, Any]:
        """The nested layout transformers 5 writes (and reads)."""
        text = self.text_config.to_dict()
        if self.dtype is not None:
            text["dtype"] = self.dtype
        out: dict[str, Any] = {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "text_config": text,
            "vision_config": self.vision_config.to_dict(),
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.mrope_text_start_rule is not None:
            out["mrope_text_start_rule"] = self.mrope_text_start_rule
        out.update(self.extra)
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(self.to_json_string())

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, **hub_kwargs: Any) -> "Qwen2VLConfig":
        """Read config.json from a folder, a file path, or a hub id (huggingface_hub, lazily)."""
        path = Path(path_or_hub_id)
        if path.is_dir():
            path = path / CONFIG_NAME
        elif not path.is_file():
            path = Path(_hub_file(str(path_or_hub_id), CONFIG_NAME, **hub_kwargs))
        if not path.is_file():
            raise ConfigError(f"{path_or_hub_id}: no {CONFIG_NAME} found; pass a checkpoint folder that contains one")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON ({exc}); fix or re-download the file") from exc
        return cls.from_dict(data)

    @classmethod
    def preset(cls, name: str) -> "Qwen2VLConfig":
        """Architecture of a released checkpoint: "2b", "7b" or "72b" (reference-notes §1.4)."""
        key = name.lower().removeprefix("qwen2-vl-").removesuffix("-instruct")
        if key not in _PRESETS:
            raise ConfigError(f"preset: {name!r} is unknown; use one of {sorted(_PRESETS)}")
        hidden, layers, heads, kv, inter, vocab, tie = _PRESETS[key]
        text = Qwen2VLTextConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=1e-6, sliding_window=32768,
            max_window_layers=layers, rope_parameters={"rope_theta": 1000000.0, "rope_type": "default",
                                                       "mrope_section": [16, 24, 24]})
        return cls(text_config=text, vision_config=Qwen2VLVisionConfig(hidden_size=hidden),
                   tie_word_embeddings=tie, dtype="bfloat16")


# name -> hidden, layers, heads, kv heads, intermediate, vocab, tied
_PRESETS = {
    "2b": (1536, 28, 12, 2, 8960, 151936, True),
    "7b": (3584, 28, 28, 4, 18944, 152064, False),
    "72b": (8192, 80, 64, 8, 29568, 152064, False),
}


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")


def _hub_file(repo_id: str, filename: str, **hub_kwargs: Any) -> str:
    """Download (or find in the local cache) one file of a hub repository."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise MissingDependencyError(
            f"{repo_id}: not a local folder and huggingface_hub is not installed; "
            "pip install 'qwen2vl[hub]' or pass a local checkpoint folder") from exc
    kwargs = {k: v for k, v in hub_kwargs.items() if k in ("revision", "cache_dir", "local_files_only", "token")}
    try:
        return hf_hub_download(repo_id, filename, **kwargs)
    except Exception as exc:  # offline, unknown repo, missing file: all end here
        raise ConfigError(
            f"{repo_id}: cannot fetch {filename} from the hub ({type(exc).__name__}: {exc}); "
            "if you are offline, pass the path of a local checkpoint folder instead") from exc


# ---- generation config (owner: GENERATION) ----
