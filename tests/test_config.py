"""config.py: flat hub layout, nested transformers-5 layout, presets, round trip, validation."""

import json

import pytest

from qwen2vl.config import Qwen2VLConfig, Qwen2VLTextConfig, Qwen2VLVisionConfig
from qwen2vl.errors import ConfigError

# The flat config.json Qwen/Qwen2-VL-2B-Instruct ships (reference-notes §1.4)
HUB_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "qwen2_vl", "num_attention_heads": 12, "num_hidden_layers": 28,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
}


def test_defaults_equal_the_doc_page():
    text, vision, root = Qwen2VLTextConfig(), Qwen2VLVisionConfig(), Qwen2VLConfig()
    assert (text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (152064, 8192, 29568, 80)
    assert (text.num_attention_heads, text.num_key_value_heads, text.rms_norm_eps) == (64, 8, 1e-5)
    assert text.sliding_window is None and text.layer_types == ["full_attention"] * 80  # use_sliding_window False
    assert text.rope_parameters == {"rope_theta": 1e6, "rope_type": "default"} and text.mrope_section == [16, 24, 24]
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (151643, 151645, None)
    assert (vision.depth, vision.embed_dim, vision.hidden_size, vision.num_heads, vision.mlp_ratio) == (32, 1280, 3584, 16, 4)
    assert (vision.hidden_act, vision.in_channels, vision.patch_size, vision.spatial_merge_size) == ("quick_gelu", 3, 14, 2)
    assert vision.temporal_patch_size == 2 and vision.head_dim == 80 and vision.patch_dim == 1176
    assert (root.image_token_id, root.video_token_id, root.vision_start_token_id, root.vision_end_token_id) == (
        151655, 151656, 151652, 151653)
    assert root.tie_word_embeddings is False


def test_flat_hub_layout():
    cfg = Qwen2VLConfig.from_dict(HUB_2B)
    text = cfg.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.vocab_size) == (1536, 28, 2, 151936)
    assert text.rms_norm_eps == 1e-6 and text.rope_theta == 1e6 and text.mrope_section == [16, 24, 24]
    assert text.rope_parameters["rope_type"] == "default"  # "mrope" means default frequencies + sections
    assert text.sliding_window is None and len(text.layer_types) == 28
    assert cfg.tie_word_embeddings is True and cfg.dtype == "bfloat16"
    assert cfg.vision_config.in_channels == 3 and cfg.vision_config.hidden_size == 1536
    assert cfg.vision_config.extra == {"spatial_patch_size": 14}
    assert cfg.extra["vision_token_id"] == 151654


def test_nested_layout_matches_flat_and_round_trips():
    flat = Qwen2VLConfig.from_dict(HUB_2B)
    nested = flat.to_dict()
    assert "text_config" in nested and "hidden_size" not in nested
    assert nested["text_config"]["model_type"] == "qwen2_vl_text" and nested["vision_config"]["in_chans"] == 3
    again = Qwen2VLConfig.from_dict(json.loads(json.dumps(nested)))
    assert again == flat
    assert again.to_dict() == nested


def test_transformers_reads_our_layout_and_we_read_theirs(tmp_path):
    from transformers import Qwen2VLConfig as HFConfig

    ours = Qwen2VLConfig.from_dict(HUB_2B)
    ours.save_pretrained(tmp_path)
    theirs = HFConfig.from_pretrained(tmp_path)
    assert theirs.text_config.hidden_size == 1536 and theirs.text_config.rms_norm_eps == 1e-6
    assert theirs.tie_word_embeddings is True and theirs.vision_config.hidden_size == 1536
    assert theirs.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    theirs.save_pretrained(tmp_path / "hf")
    back = Qwen2VLConfig.from_pretrained(tmp_path / "hf")
    assert back.text_config.to_dict()["rope_parameters"]["rope_theta"] == 1e6
    assert back.text_config.num_key_value_heads == 2 and back.tie_word_embeddings is True


def test_old_nested_save_with_tie_inside_text_config():
    cfg = Qwen2VLConfig.from_dict({"text_config": {"tie_word_embeddings": True}, "tie_word_embeddings": False})
    assert cfg.tie_word_embeddings is True


@pytest.mark.parametrize("name, hidden, layers, heads, kv, tied", [
    ("2b", 1536, 28, 12, 2, True), ("7b", 3584, 28, 28, 4, False), ("72B", 8192, 80, 64, 8, False)])
def test_presets(name, hidden, layers, heads, kv, tied):
    cfg = Qwen2VLConfig.preset(name)
    text = cfg.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        hidden, layers, heads, kv)
    assert text.head_dim == 128 and cfg.vision_config.hidden_size == hidden and cfg.tie_word_embeddings is tied
    assert Qwen2VLConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_preset():
    with pytest.raises(ConfigError, match="'3b' is unknown; use one of"):
        Qwen2VLConfig.preset("3b")


def test_text_start_rule_is_kept_out_of_to_dict_unless_set():
    cfg = Qwen2VLConfig()
    assert cfg.text_start_rule == "max_thw" and "mrope_text_start_rule" not in cfg.to_dict()
    cfg = Qwen2VLConfig.from_dict({"mrope_text_start_rule": "max_hw"})
    assert cfg.to_dict()["mrope_text_start_rule"] == "max_hw"
    with pytest.raises(ConfigError, match="mrope_text_start_rule"):
        Qwen2VLConfig(mrope_text_start_rule="bogus")


@pytest.mark.parametrize("text, match", [
    ({"hidden_size": 100, "num_attention_heads": 3}, "not divisible by num_attention_heads"),
    ({"num_attention_heads": 64, "num_key_value_heads": 5}, "not a multiple of num_key_value_heads"),
    ({"rope_scaling": {"type": "mrope", "mrope_section": [8, 8, 8]}}, "mrope_section"),
    ({"num_hidden_layers": 2, "layer_types": ["full_attention"]}, "layer_types has 1 entries"),
    ({"hidden_act": "swish2"}, "hidden_act 'swish2' is unknown"),
])
def test_invalid_values_raise_config_error(text, match):
    with pytest.raises(ConfigError, match=match):
        Qwen2VLConfig.from_dict({"text_config": text})


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        Qwen2VLConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="invalid JSON"):
        Qwen2VLConfig.from_pretrained(tmp_path)
