"""weights.py: sharded/single safetensors, both key layouts, tied heads, dtype auto, refusals, meta build."""

import json
import shutil

import pytest
import torch
from support.checkpoints import tiny_model

from qwen2vl.config import GenerationConfig
from qwen2vl.errors import CheckpointError, ConfigError
from qwen2vl.model.qwen2vl import Qwen2VLForConditionalGeneration
from qwen2vl.weights import (INDEX_NAME, read_safetensors, resolve_checkpoint_dir, to_hub_key, to_module_key,
                             write_safetensors)


def _keys(folder):
    return sorted(k for f in folder.glob("*.safetensors") for k, _ in read_safetensors(f))


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model(seed=3)
    folder = tmp_path_factory.mktemp("untied")
    model.save_pretrained(folder)
    return model, folder


def test_key_table():
    assert to_module_key("visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"
    assert to_module_key("model.layers.1.mlp.up_proj.weight") == "model.language_model.layers.1.mlp.up_proj.weight"
    assert to_module_key("model.language_model.norm.weight") == "model.language_model.norm.weight"
    assert to_module_key("model.visual.merger.ln_q.bias") == "model.visual.merger.ln_q.bias"
    assert to_module_key("lm_head.weight") == "lm_head.weight"
    assert to_hub_key("model.language_model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert to_hub_key("model.visual.patch_embed.proj.weight") == "visual.patch_embed.proj.weight"


def test_save_writes_the_hub_layout(saved):
    model, folder = saved
    keys = _keys(folder)
    assert "visual.patch_embed.proj.weight" in keys and "lm_head.weight" in keys
    assert "model.layers.0.self_attn.q_proj.bias" in keys and "model.norm.weight" in keys
    assert not any(k.startswith(("model.visual", "model.language_model")) for k in keys)
    assert len(keys) == 12 * 2 + 2 + 12 * 2 + 1 + 6 + 1  # text 12L+2, vision 12*depth+1+6, lm_head
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["text_config"]["model_type"] == "qwen2_vl_text" and cfg["dtype"] == "float32"


def test_single_file_round_trip(saved):
    model, folder = saved
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(folder)
    assert _same_weights(model, loaded)
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu" and not loaded.training
    assert loaded.name_or_path == str(folder)
    # as in transformers: without generation_config.json, bos/eos/pad come from config.json
    assert loaded.generation_config.eos_token_id == model.config.text_config.eos_token_id


def test_generation_config_defaults_from_config_json_when_file_absent(saved, tmp_path):
    model, folder = saved
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in folder.iterdir():
        if f.name != "generation_config.json":
            (bare / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bare / "config.json").read_text())
    cfg["text_config"]["eos_token_id"] = 7
    (bare / "config.json").write_text(json.dumps(cfg))
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(bare)
    assert loaded.generation_config.eos_token_id == 7


def test_sharded_with_index(saved, tmp_path):
    model, _ = saved
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    assert _same_weights(model, Qwen2VLForConditionalGeneration.from_pretrained(tmp_path))


def test_transformers5_key_layout(saved, tmp_path):
    model, folder = saved
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    write_safetensors(tmp_path / "model.safetensors", list(model.state_dict().items()))  # module paths as keys
    assert "model.language_model.norm.weight" in _keys(tmp_path)
    assert _same_weights(model, Qwen2VLForConditionalGeneration.from_pretrained(tmp_path))


def test_tied_embeddings(tmp_path):
    model = tiny_model(seed=4, tied=True)
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in _keys(tmp_path)
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_dtype_auto_and_explicit(saved, tmp_path):
    model, folder = saved
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    model.to(torch.float32)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert Qwen2VLForConditionalGeneration.from_pretrained(tmp_path).dtype == torch.bfloat16  # "auto"
    assert Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32
    assert Qwen2VLForConditionalGeneration.from_pretrained(folder, dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="'int9' is not a torch dtype"):
        Qwen2VLForConditionalGeneration.from_pretrained(folder, dtype="int9")


def _rewrite(folder, dst, edit):
    shutil.copy(folder / "config.json", dst / "config.json")
    items = dict(read_safetensors(folder / "model.safetensors"))
    edit(items)
    write_safetensors(dst / "model.safetensors", list(items.items()))


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.pop("model.norm.weight"), r"missing \['model.language_model.norm.weight'\]"),
    (lambda d: d.update({"visual.extra.weight": torch.zeros(2)}), r"unexpected \['visual.extra.weight'\]"),
    (lambda d: d.update({"lm_head.weight": torch.zeros(3, 64)}), r"lm_head.weight: file \(3, 64\) vs model \(256, 64\)"),
])
def test_mismatches_are_refused_with_the_list(saved, tmp_path, edit, match):
    _, folder = saved
    _rewrite(folder, tmp_path, edit)
    with pytest.raises(CheckpointError, match=match):
        Qwen2VLForConditionalGeneration.from_pretrained(tmp_path)


def test_built_on_meta_and_filled_without_init(saved, monkeypatch):
    _, folder = saved

    def refuse(self):
        raise AssertionError("from_pretrained must not run random init (meta build)")

    monkeypatch.setattr(Qwen2VLForConditionalGeneration, "init_weights", refuse)
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.model.language_model.inv_freq.device.type == "cpu"  # non-persistent buffer rebuilt


def test_generation_config_round_trip(saved, tmp_path):
    model, _ = saved
    model.generation_config = GenerationConfig.from_dict({"temperature": 0.5, "do_sample": True})
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.generation_config = None
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.generation_config.temperature == 0.5 and loaded.generation_config.do_sample is True


def test_not_a_folder_and_offline_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        resolve_checkpoint_dir(tmp_path / "missing" / "deeper")
    with pytest.raises(CheckpointError, match="offline.*local folder"):
        resolve_checkpoint_dir("nobody-xyz/no-such-model", cache_dir=str(tmp_path), local_files_only=True)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        Qwen2VLForConditionalGeneration.from_pretrained(tmp_path)


def test_device_map_auto_and_attn_choice(saved):
    _, folder = saved
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder, device_map="auto", attn_implementation="eager")
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert model.config.attn_implementation == "eager" and model.model.visual.attn_implementation == "eager"
    with pytest.raises(ConfigError, match="unknown"):
        Qwen2VLForConditionalGeneration.from_pretrained(folder, attn_implementation="fast")


def test_loading_runs_no_random_init_and_never_imports_dynamo(saved):
    """The meta build skips random init: init/arange on meta tensors would import torch._dynamo, which
    costs over a second per process (most of a CLI call)."""
    import subprocess
    import sys

    _, folder = saved
    code = ("import sys; from qwen2vl.model.qwen2vl import Qwen2VLForConditionalGeneration as M; "
            f"m = M.from_pretrained({str(folder)!r}); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
