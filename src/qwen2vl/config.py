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
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_theta": 10000.0, "rope_type": "axial"}
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
        d.pop("model_type", None)
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
        out["rope_parameters"] = dict(self.rope_parameters)
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
        d.pop("model_type", None)
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
        d.pop("architectures", None)  # always written by to_dict
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
        return _json_string(self.to_dict())

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        _write_config_json(save_directory, CONFIG_NAME, self.to_dict())

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, **hub_kwargs: Any) -> "Qwen2VLConfig":
        """Read config.json from a folder, a file path, or a hub id (huggingface_hub, lazily)."""
        return cls.from_dict(_read_config_json(path_or_hub_id, CONFIG_NAME, **hub_kwargs))

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

def _json_string(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _write_config_json(save_directory: str | os.PathLike, filename: str, data: dict[str, Any]) -> None:
    path = Path(save_directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / filename).write_text(_json_string(data))


def _read_config_json(path_or_hub_id: str | os.PathLike, filename: str, missing_ok: bool = False,
                      **hub_kwargs: Any) -> dict[str, Any] | None:
    """`filename` from a folder, a file path or a hub id, parsed; None when absent and missing_ok."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        path = path / filename
    elif not path.is_file():
        try:
            path = Path(_hub_file(str(path_or_hub_id), filename, **hub_kwargs))
        except (ConfigError, MissingDependencyError):
            if missing_ok:
                return None
            raise
    if not path.is_file():
        if missing_ok:
            return None
        raise ConfigError(f"{path_or_hub_id}: no {filename} found; pass a checkpoint folder that contains one")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc}); fix or re-download the file") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


GENERATION_CONFIG_NAME = "generation_config.json"

# Values used when neither generate(), a generation_config argument nor the checkpoint's
# generation_config.json sets a field (transformers' `_get_default_generation_params`).
GENERATION_DEFAULTS: dict[str, Any] = {
    "max_length": 20, "min_length": 0, "do_sample": False, "use_cache": True, "num_beams": 1,
    "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0, "num_return_sequences": 1,
    "return_dict_in_generate": False, "output_scores": False, "output_logits": False,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(value: Any) -> list[int] | None:
    """eos_token_id as a list (int -> [int]); None stays None."""
    if value is None:
        return None
    return [value] if _is_int(value) else list(value)


@dataclass(slots=True)
class GenerationConfig:
    """Decoding parameters, named as in transformers' GenerationConfig (generation_config.json keys).

    Every field defaults to None = "not set here": `generate` fills it from the next source down
    (generate kwargs > generation_config= > model.generation_config > GENERATION_DEFAULTS).
    eos/pad: eos_token_id is an id or a list (any of them ends a row); pad_token_id may be one of
    the eos ids (the hub files set pad 151643 = the second eos); unset pad means eos[0].
    """

    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + new tokens (transformers' legacy length knob)
    min_new_tokens: int | None = None
    min_length: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    num_return_sequences: int | None = None
    num_beams: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    use_cache: bool | None = None
    return_dict_in_generate: bool | None = None
    output_scores: bool | None = None
    output_logits: bool | None = None
    extra: dict = field(default_factory=dict)  # unknown keys (transformers_version, ...), kept for to_dict

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "GenerationConfig") -> None:
        """Range-check every field that is set; raises ConfigError naming the field and its allowed range."""

        def bad(name: str, rule: str) -> None:
            raise ConfigError(f"{where}: {name}={getattr(self, name)!r} is out of range; {rule}")

        for name, low in (("max_new_tokens", 1), ("max_length", 1), ("min_new_tokens", 0), ("min_length", 0),
                          ("top_k", 0), ("num_return_sequences", 1), ("num_beams", 1),
                          ("pad_token_id", 0), ("bos_token_id", 0)):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < low):
                bad(name, f"allowed: an integer >= {low}")
        if self.temperature is not None and not self.temperature >= 0:
            bad("temperature", "allowed: a float >= 0 (0 means greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            bad("top_p", "allowed: 0 < top_p <= 1 (1 disables it)")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            bad("min_p", "allowed: 0 <= min_p <= 1")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            bad("repetition_penalty", "allowed: a float > 0 (1.0 disables it)")
        eos = self.eos_token_id
        if eos is not None:
            ids = [eos] if _is_int(eos) else eos
            if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)) or not ids \
                    or not all(_is_int(i) and i >= 0 for i in ids):
                bad("eos_token_id", "allowed: a token id >= 0 or a non-empty list of them")
        stops = self.stop_strings
        if stops is not None:
            items = [stops] if isinstance(stops, str) else stops
            if not isinstance(items, (list, tuple)) or not items or not all(isinstance(s, str) and s for s in items):
                bad("stop_strings", "allowed: a non-empty string or a non-empty list of non-empty strings")

    @property
    def eos_token_ids(self) -> list[int] | None:
        """eos_token_id normalised to a list (None when unset)."""
        return _token_ids(self.eos_token_id)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GenerationConfig":
        d = dict(d)
        names = _field_names(cls) - {"extra"}
        extra = {k: v for k, v in d.items() if k not in names and k != "extra"}
        extra.update(d.get("extra") or {})
        return cls(**{k: v for k, v in d.items() if k in names}, extra=extra)

    @classmethod
    def from_model_config(cls, config: "Qwen2VLConfig") -> "GenerationConfig":
        """bos/eos/pad from the model config: what transformers uses when generation_config.json is absent."""
        text = config.text_config
        pick = {}
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = config.extra.get(name, getattr(text, name, None))
            if value is not None:
                pick[name] = value
        return cls(**pick)

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (None = unset is left out) plus the kept unknown keys."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name != "extra" and getattr(self, f.name) is not None}
        out.update(self.extra)
        return out

    def to_json_string(self) -> str:
        return _json_string(self.to_dict())

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        _write_config_json(save_directory, GENERATION_CONFIG_NAME, self.to_dict())

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, missing_ok: bool = False,
                        **hub_kwargs: Any) -> "GenerationConfig | None":
        """Read generation_config.json from a folder, a file path or a hub id; None if absent and missing_ok."""
        data = _read_config_json(path_or_hub_id, GENERATION_CONFIG_NAME, missing_ok=missing_ok, **hub_kwargs)
        return None if data is None else cls.from_dict(data)

    def update(self, defaults_only: bool = False, **kwargs: Any) -> dict[str, Any]:
        """Set the known fields from kwargs (only unset ones if defaults_only); return the unused kwargs."""
        names = _field_names(type(self)) - {"extra"}
        used = [k for k in kwargs if k in names and (not defaults_only or getattr(self, k) is None)]
        before = {k: getattr(self, k) for k in used}
        for key in used:
            setattr(self, key, kwargs[key])
        try:
            self.validate()
        except ConfigError:
            for key, value in before.items():  # leave the config as it was
                setattr(self, key, value)
            raise
        return {k: v for k, v in kwargs.items() if k not in used}
