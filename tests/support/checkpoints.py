"""Tiny random-weight Qwen2-VL checkpoints built with transformers (the oracle), plus input builders.

`checkpoint(name)` builds once per test session (cached) and returns the folder; `flat=True` rewrites
config.json into the flat hub layout. Token ids are small so the vocabulary stays tiny.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch

IDS = dict(image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253)
VS, VE, IMG, VID = 252, 253, 250, 251
PATCH_DIM = 3 * 2 * 14 * 14  # 1176

# name -> (text kwargs, vision kwargs, tied); covers GQA/MHA, tied/untied, vision head_dim 8/24/16
SPECS = {
    "gqa_untied": (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
                   dict(embed_dim=32, num_heads=4), False),
    "mha_tied": (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2]}),
                 dict(embed_dim=48, num_heads=2), True),
    "gqa1_tied": (dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, intermediate_size=64,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}),
                  dict(embed_dim=64, num_heads=4), True),
}

_ROOT = Path(tempfile.mkdtemp(prefix="qwen2vl-ckpt-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def hf_config(name: str):
    from transformers import Qwen2VLConfig

    text, vision, tied = SPECS[name]
    text = dict(vocab_size=256, num_hidden_layers=2, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6, initializer_range=0.05, **text)
    vision = dict(depth=2, mlp_ratio=2, hidden_size=text["hidden_size"], initializer_range=0.05, **vision)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied, **IDS)


@functools.lru_cache(maxsize=None)
def checkpoint(name: str, flat: bool = False, seed: int = 0) -> Path:
    """Folder with config.json + model.safetensors of a seeded random transformers model (fp32)."""
    from transformers import Qwen2VLForConditionalGeneration

    folder = _ROOT / f"{name}-{'flat' if flat else 'nested'}-{seed}"
    if flat:
        shutil.copytree(checkpoint(name, False, seed), folder)
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(flatten_config(cfg), indent=2))
        return folder
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(hf_config(name)).eval()
    model.save_pretrained(folder)
    return folder


def flatten_config(cfg: dict) -> dict:
    """Nested transformers-5 config.json -> the flat layout the hub ships (text fields at the root)."""
    cfg = dict(cfg)
    text = dict(cfg.pop("text_config"))
    for key in ("model_type", "layer_types", "dtype", "tie_word_embeddings"):
        text.pop(key, None)
    rope_params = text.pop("rope_parameters")
    text["rope_theta"] = rope_params["rope_theta"]
    text["rope_scaling"] = {"type": "mrope", "mrope_section": rope_params["mrope_section"]}
    vision = dict(cfg.pop("vision_config"))
    vision["in_chans"] = vision.pop("in_channels", 3)
    vision.pop("rope_parameters", None)
    dtype = cfg.pop("dtype", None) or "float32"
    return {**cfg, **text, "vision_config": vision, "torch_dtype": dtype, "model_type": "qwen2_vl"}


def load_hf(folder: Path, dtype=torch.float32, attn: str = "eager"):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation=attn).eval()


# ---- inputs -----------------------------------------------------------------------------------------
def vision_tokens(grid: tuple[int, int, int], merge: int = 2) -> int:
    t, h, w = grid
    return t * (h // merge) * (w // merge)


def build_inputs(segments: list, seed: int = 0, pad_to: int | None = None) -> dict:
    """One row from segments: ints are text ids, ("image", (t,h,w)) / ("video", (t,h,w)) add
    VS + placeholders + VE. Returns input_ids (1, L), attention_mask, pixels, grids, mm_token_type_ids."""
    gen = torch.Generator().manual_seed(seed)
    ids, types, grids = [], [], {"image": [], "video": []}
    for seg in segments:
        if isinstance(seg, int):
            ids.append(seg)
            types.append(0)
            continue
        kind, grid = seg
        n = vision_tokens(grid)
        ids += [VS] + [IMG if kind == "image" else VID] * n + [VE]
        types += [0] + [1 if kind == "image" else 2] * n + [0]
        grids[kind].append(grid)
    out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
           "mm_token_type_ids": torch.tensor([types])}
    for kind, key, gkey in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos",
                                                                           "video_grid_thw")):
        if grids[kind]:
            rows = sum(t * h * w for t, h, w in grids[kind])
            out[key] = torch.randn(rows, PATCH_DIM, generator=gen)
            out[gkey] = torch.tensor(grids[kind])
    return out


def left_pad_batch(rows: list[dict], pad_id: int = 0) -> dict:
    """Stack single-row inputs into a left-padded batch; pixels/grids concatenated in row order."""
    length = max(r["input_ids"].shape[1] for r in rows)
    out: dict = {}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.cat([torch.nn.functional.pad(r[key], (length - r[key].shape[1], 0), value=fill)
                              for r in rows])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [r[key] for r in rows if key in r]
        if parts:
            out[key] = torch.cat(parts)
    return out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (float64)."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def tiny_config(tied: bool = False, **text_overrides):
    """Our own Qwen2VLConfig at test scale (no transformers involved)."""
    from qwen2vl.config import Qwen2VLConfig

    text = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    text.update(text_overrides)
    vision = dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2, hidden_size=text["hidden_size"])
    return Qwen2VLConfig.from_dict({"text_config": text, "vision_config": vision, "tie_word_embeddings": tied, **IDS})


def tiny_model(seed: int = 0, **kwargs):
    from qwen2vl.model.qwen2vl import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(tiny_config(**kwargs)).eval()
