"""Shared by the generation tests: one tiny random checkpoint written by transformers, loaded by both
transformers (the oracle) and qwen2vl, plus chat prompts with hand-expanded vision placeholders.

Import as `from generation.oracle_models import ...` (tests/ is on pythonpath).
"""

import json
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

IMAGE, VIDEO, PAD = 151655, 151656, 151643
IM_END, ENDOFTEXT = 151645, 151643
MERGE = 2
TINY = {
    "vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6, "max_position_embeddings": 512,
    "rope_theta": 100.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": False,
    "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                      "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
}
# Qwen2-VL-7B-Instruct's generation_config.json (reference-notes §1.5)
INSTRUCT_GENERATION = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                       "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.1,
                       "top_p": 0.001, "top_k": 1}


@lru_cache(maxsize=None)
def checkpoint(generation: str | None = None) -> Path:
    """Folder saved by transformers (seeded random weights, fp32); generation = JSON text of
    generation_config.json to write instead of the one transformers saves ("" = no such file)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(1234)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**TINY)).float().eval()
    with torch.no_grad():
        # Untied, sharp head: varied tokens, no near-ties. Large q/k weights and a small rope_theta
        # make attention peaked and position-dependent, so a wrong position changes the tokens.
        model.lm_head.weight.normal_(0.0, 0.5)
        for name, param in model.model.language_model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.normal_(0.0, 0.4)
    folder = Path(tempfile.mkdtemp(prefix="qwen2vl-gen-oracle-"))
    model.save_pretrained(folder)
    gen_file = folder / "generation_config.json"
    if generation == "":
        gen_file.unlink(missing_ok=True)
    elif generation is not None:
        gen_file.write_text(generation)
    return folder


@lru_cache(maxsize=None)
def models(generation: str | None = None, rule: str | None = None):
    """(transformers model, our model) from the same folder, eval mode, fp32 on CPU."""
    from transformers import Qwen2VLForConditionalGeneration as Reference

    from qwen2vl.model.qwen2vl import Qwen2VLForConditionalGeneration

    folder = checkpoint(generation)
    reference = Reference.from_pretrained(folder, dtype=torch.float32).eval()
    ours = Qwen2VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    if rule is not None:
        ours.config.mrope_text_start_rule = rule
    return reference, ours.eval()


def instruct_models(**overrides):
    """Models whose checkpoint ships the Instruct generation_config.json (with optional changes)."""
    return models(json.dumps({**INSTRUCT_GENERATION, **overrides}, sort_keys=True))


def tokenizer():
    from support.tokenizer import tokenizer as build

    return build()


def prompt_ids(conversation, grids: list[tuple[str, tuple[int, int, int]]]) -> list[int]:
    """Chat-template ids with each <|image_pad|>/<|video_pad|> expanded to t*h*w/4 copies, in order."""
    tok = tokenizer()
    text = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text)
    out, items = [], iter(grids)
    for i in ids:
        if i in (IMAGE, VIDEO):
            kind, (t, h, w) = next(items)
            assert (kind == "image") == (i == IMAGE), "grid kinds must follow the placeholders' order"
            out.extend([i] * (t * h * w // MERGE ** 2))
        else:
            out.append(i)
    return out


def batch_inputs(rows: list[list[int]], grids: list[tuple[str, tuple[int, int, int]]], seed: int = 0) -> dict:
    """Left-padded batch dict like the processor's: ids, mask, mm_token_type_ids, pixels, grids."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = {"input_ids": ids, "attention_mask": mask,
           "mm_token_type_ids": ((ids == IMAGE).int() + 2 * (ids == VIDEO).int()) * mask}
    g = torch.Generator().manual_seed(seed)
    for kind, pix, key in (("image", "pixel_values", "image_grid_thw"),
                           ("video", "pixel_values_videos", "video_grid_thw")):
        chosen = [grid for k, grid in grids if k == kind]
        if chosen:
            patches = sum(t * h * w for t, h, w in chosen)
            out[pix] = torch.randn(patches, 3 * 2 * 14 * 14, generator=g)
            out[key] = torch.tensor(chosen)
    return out


def user(*content, text="Describe this."):
    parts = [{"type": kind} for kind in content] + [{"type": "text", "text": text}]
    return {"role": "user", "content": parts}
