"""GenerationConfig: generation_config.json round trip, update() like transformers, range checks."""

import json

import pytest
from transformers import GenerationConfig as RefGenerationConfig

from qwen2vl.config import GENERATION_DEFAULTS, GenerationConfig, Qwen2VLConfig
from qwen2vl.errors import ConfigError

# Qwen2-VL-7B-Instruct's generation_config.json (reference-notes §1.5)
INSTRUCT = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
            "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
            "transformers_version": "4.41.2"}


def test_reads_the_hub_file_like_transformers(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(INSTRUCT))
    ours = GenerationConfig.from_pretrained(tmp_path)
    ref = RefGenerationConfig.from_pretrained(tmp_path)
    for key in INSTRUCT:
        if key != "transformers_version":
            assert getattr(ours, key) == getattr(ref, key), key
    assert ours.extra == {"transformers_version": "4.41.2"}
    assert ours.eos_token_ids == [151645, 151643]


def test_missing_file(tmp_path):
    assert GenerationConfig.from_pretrained(tmp_path, missing_ok=True) is None
    with pytest.raises(ConfigError, match="generation_config.json"):
        GenerationConfig.from_pretrained(tmp_path)


def test_bad_json_is_a_config_error(tmp_path):
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        GenerationConfig.from_pretrained(tmp_path)


def test_save_round_trip_keeps_unknown_keys_and_transformers_reads_it(tmp_path):
    cfg = GenerationConfig.from_dict({**INSTRUCT, "custom_knob": 3})
    cfg.save_pretrained(tmp_path)
    again = GenerationConfig.from_pretrained(tmp_path)
    assert again == cfg and again.to_dict() == cfg.to_dict()
    ref = RefGenerationConfig.from_pretrained(tmp_path)
    assert ref.top_k == 1 and ref.repetition_penalty == 1.05 and ref.custom_knob == 3


def test_update_returns_unused_kwargs_like_transformers():
    kwargs = {"top_k": 5, "max_new_tokens": 9, "not_a_field": 1, "attention_mask": None}
    ours = GenerationConfig(top_p=0.5)
    ref = RefGenerationConfig(top_p=0.5)
    assert ours.update(**kwargs) == ref.update(**kwargs)
    assert (ours.top_k, ours.max_new_tokens, ours.top_p) == (ref.top_k, ref.max_new_tokens, ref.top_p)


def test_update_defaults_only_fills_unset_fields():
    cfg = GenerationConfig(top_k=1)
    unused = cfg.update(defaults_only=True, top_k=50, temperature=1.0)
    assert cfg.top_k == 1 and cfg.temperature == 1.0 and unused == {"top_k": 50}


def test_defaults_equal_transformers_global_defaults():
    ref = RefGenerationConfig._get_default_generation_params()
    for key, value in GENERATION_DEFAULTS.items():
        assert ref.get(key, False) == value, key


def test_from_model_config_takes_eos_from_the_text_config():
    cfg = GenerationConfig.from_model_config(Qwen2VLConfig())
    assert cfg.eos_token_id == 151645 and cfg.bos_token_id == 151643 and cfg.pad_token_id is None


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"min_p": 1.2}, "min_p"), ({"min_p": -0.1}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"eos_token_id": []}, "eos_token_id"), ({"eos_token_id": [-1]}, "eos_token_id"),
    ({"pad_token_id": -3}, "pad_token_id"), ({"stop_strings": [""]}, "stop_strings"),
    ({"num_return_sequences": 0}, "num_return_sequences"),
])
def test_out_of_range_values_name_the_field(kwargs, name):
    with pytest.raises(ConfigError, match=rf"{name}=.*allowed"):
        GenerationConfig(**kwargs)
    cfg = GenerationConfig()
    with pytest.raises(ConfigError, match=name):
        cfg.update(**kwargs)
    assert getattr(cfg, name) is None  # a rejected update leaves the config unchanged
