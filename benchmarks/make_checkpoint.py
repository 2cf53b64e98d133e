"""Write a random-weight Qwen2-VL checkpoint (hub layout, bf16) for the benchmarks.

    python benchmarks/make_checkpoint.py --shape 2b --out .bench/qwen2vl-2b-random-bf16

Tensors are generated one at a time from the known name/shape list (reference-notes §2.1) and written
shard by shard, so at most one shard (~2 GB) is in memory: the model is never held twice. Adds the
tokenizer files from our builder and the hub preprocessor_config.json; no generation_config.json,
so both implementations decode plain greedy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# name -> (hidden, layers, heads, kv heads, intermediate, vocab, tied, vision depth, vision embed, vision heads)
SHAPES = {
    "2b": (1536, 28, 12, 2, 8960, 151936, True, 32, 1280, 16),
    "7b": (3584, 28, 28, 4, 18944, 152064, False, 32, 1280, 16),
    "tiny": (256, 2, 2, 1, 512, 151936, False, 2, 64, 4),  # smoke tests only (head_dim 128 for M-RoPE)
    "mini": (1536, 2, 12, 2, 8960, 151936, True, 2, 1280, 16),  # 2B widths, 2 + 2 layers: memory checks
    "overhead": (256, 28, 2, 1, 512, 151936, True, 2, 64, 4),  # 2B depth, tiny widths: per-step overhead
}
SHARD_BYTES = 2 * 1024**3
STD = 0.02  # initializer_range of the released configs


def hub_config(shape: str) -> dict:
    """The flat hub config.json of a released checkpoint (reference-notes §1.3–1.4)."""
    hidden, layers, heads, kv, inter, vocab, tied, vdepth, vembed, vheads = SHAPES[shape]
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
        "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
        "hidden_size": hidden, "initializer_range": STD, "intermediate_size": inter,
        "max_position_embeddings": 32768, "max_window_layers": layers, "num_attention_heads": heads,
        "num_hidden_layers": layers, "num_key_value_heads": kv, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
        "vision_config": {"depth": vdepth, "embed_dim": vembed, "mlp_ratio": 4, "num_heads": vheads,
                          "in_chans": 3, "hidden_size": hidden, "patch_size": 14,
                          "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": vocab,
    }


def tensor_specs(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """(hub name, shape) of every tensor, in the order they are written (reference-notes §2.1)."""
    hidden, layers, heads, kv, inter, vocab, tied, vdepth, e, _ = SHAPES[shape]
    kvw = kv * (hidden // heads)
    specs = [("visual.patch_embed.proj.weight", (e, 3, 2, 14, 14))]
    for i in range(vdepth):
        p = f"visual.blocks.{i}."
        specs += [(p + "norm1.weight", (e,)), (p + "norm1.bias", (e,)),
                  (p + "norm2.weight", (e,)), (p + "norm2.bias", (e,)),
                  (p + "attn.qkv.weight", (3 * e, e)), (p + "attn.qkv.bias", (3 * e,)),
                  (p + "attn.proj.weight", (e, e)), (p + "attn.proj.bias", (e,)),
                  (p + "mlp.fc1.weight", (4 * e, e)), (p + "mlp.fc1.bias", (4 * e,)),
                  (p + "mlp.fc2.weight", (e, 4 * e)), (p + "mlp.fc2.bias", (e,))]
    m = 4 * e  # merger input: 2x2 patches concatenated
    specs += [("visual.merger.ln_q.weight", (e,)), ("visual.merger.ln_q.bias", (e,)),
              ("visual.merger.mlp.0.weight", (m, m)), ("visual.merger.mlp.0.bias", (m,)),
              ("visual.merger.mlp.2.weight", (hidden, m)), ("visual.merger.mlp.2.bias", (hidden,))]
    specs.append(("model.embed_tokens.weight", (vocab, hidden)))
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
                  (p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.q_proj.bias", (hidden,)),
                  (p + "self_attn.k_proj.weight", (kvw, hidden)), (p + "self_attn.k_proj.bias", (kvw,)),
                  (p + "self_attn.v_proj.weight", (kvw, hidden)), (p + "self_attn.v_proj.bias", (kvw,)),
                  (p + "self_attn.o_proj.weight", (hidden, hidden)),
                  (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                  (p + "mlp.down_proj.weight", (hidden, inter))]
    specs.append(("model.norm.weight", (hidden,)))
    if not tied:
        specs.append(("lm_head.weight", (vocab, hidden)))
    return specs


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Norm weights 1, norm biases 0, other biases and all matrices N(0, 0.02), in bf16."""
    if "norm" in name or "ln_q" in name:
        fill = 1.0 if name.endswith("weight") else 0.0
        return torch.full(shape, fill, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen) * STD).to(torch.bfloat16)


def write_weights(shape: str, out: Path, seed: int) -> int:
    """Generate and save tensors shard by shard; returns the total byte count."""
    from safetensors.torch import save_file

    specs = tensor_specs(shape)
    gen = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]
    sizes = [0]
    for name, shp in specs:  # plan the shards first so file names know the total count
        nbytes = 2 * torch.Size(shp).numel()
        if sizes[-1] and sizes[-1] + nbytes > SHARD_BYTES:
            shards.append([])
            sizes.append(0)
        shards[-1].append(name)
        sizes[-1] += nbytes
    shapes = dict(specs)
    weight_map = {}
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: random_tensor(n, shapes[n], gen) for n in names}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
        weight_map.update({n: fname for n in names})
        print(f"[make_checkpoint] wrote {fname} ({sizes[k] / 1e9:.2f} GB)", flush=True)
    total = sum(sizes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def write_processing_files(out: Path) -> None:
    """Tokenizer files from our builder and the hub preprocessor_config.json (reference-notes §1.5)."""
    from qwen2vl.processing.tokenizer_builder import write_tokenizer_files

    write_tokenizer_files(out)
    pre = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
           "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
           "image_std": [0.26862954, 0.26130258, 0.27577711],
           "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model.safetensors.index.json").unlink(missing_ok=True)  # marks "complete" last
    (args.out / "config.json").write_text(json.dumps(hub_config(args.shape), indent=2))
    write_processing_files(args.out)
    total = write_weights(args.shape, args.out, args.seed)
    print(f"[make_checkpoint] {args.shape}: {total / 1e9:.2f} GB in {args.out}")


if __name__ == "__main__":
    main()
