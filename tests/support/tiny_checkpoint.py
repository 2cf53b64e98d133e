"""Tiny random-weight checkpoint folders (our save_pretrained + tokenizer + processor + generation files).

For CLI and batch tests that must not depend on the trained built-in model. Built once per process.
"""

import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from support.tokenizer import FILES as TOKENIZER_FILES
from support.tokenizer import tokenizer_dir

# 28 px per merged token side: images of (28a x 28b) px are not resized within these bounds
MIN_PIXELS = 28 * 28
MAX_PIXELS = 112 * 112
PREPROCESSOR = {
    "min_pixels": MIN_PIXELS,
    "max_pixels": MAX_PIXELS,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}
# greedy, stops on <|im_end|> or <|endoftext|> (the hub Instruct files' ids)
GENERATION = {"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": False}


def tiny_config():
    """hidden 32, 2 layers, head_dim 16 (mrope_section 2+3+3 = 8 pairs), vision depth 2."""
    from qwen2vl.config import Qwen2VLConfig

    return Qwen2VLConfig.from_dict({
        "model_type": "qwen2_vl",
        "vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": True, "torch_dtype": "float32",
        "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                          "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    })


@lru_cache(maxsize=None)
def tiny_checkpoint(kind: str = "random") -> Path:
    """A checkpoint folder. kind="random": seeded random weights. kind="constant": the final norm's
    weight is zero, so every logit is 0 and greedy decoding picks id 0 ('!') at every step."""
    import torch

    from qwen2vl.model.qwen2vl import Qwen2VLForConditionalGeneration

    if kind not in ("random", "constant"):
        raise ValueError(f"tiny_checkpoint: kind {kind!r} is unknown; use 'random' or 'constant'")
    folder = Path(tempfile.mkdtemp(prefix=f"qwen2vl-tiny-{kind}-"))
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(tiny_config()).float().eval()
    if kind == "constant":
        with torch.no_grad():
            model.model.language_model.norm.weight.zero_()
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir() / name, folder / name)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(GENERATION, indent=2))
    return folder


def write_image(path: Path, width: int = 84, height: int = 56, seed: int = 0) -> Path:
    """A seeded noise RGB PNG (sizes that are multiples of 28 are not resized by the tiny processor)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path
