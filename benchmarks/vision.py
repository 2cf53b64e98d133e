"""Vision-tower benchmark: images/s of get_image_features, qwen2vl vs transformers, fresh processes.

    python benchmarks/vision.py --shape 2b --sizes 448 896 --runs 3 --modes bf16

Both implementations get the same pixel rows (transformers' processor output for a seeded noise
image of each size, saved once under .bench/) and the same checkpoint. Each child loads the model,
warms up once at the smallest size, then times `model.model.get_image_features(pixel_values, grid)`
(one image per call, `--iters` calls per size, median). Outputs must match within bf16 tolerance
before a timing is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TOLERANCE = 0.05  # max |ours - hf| / max |hf| over the merged features (bf16 through 32 blocks)


def make_pixels(ckpt: Path, size: int) -> Path:
    import numpy as np
    import torch
    from PIL import Image

    path = common.BENCH_DIR / f"pixels-{size}x{size}.pt"
    if path.exists():
        return path
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(ckpt))
    image = Image.fromarray(np.random.RandomState(size).randint(0, 256, (size, size, 3), dtype=np.uint8))
    out = processor.image_processor(images=[image], return_tensors="pt")
    torch.save({"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}, path)
    return path


def features(model, pixels: dict):
    """Merged image features (tokens, hidden) from either implementation's get_image_features."""
    import torch

    out = model.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"])
    out = getattr(out, "pooler_output", out)
    if isinstance(out, (tuple, list)):
        out = torch.cat(list(out), dim=0)
    return out


def child(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generation import load_model

    model = load_model(args.impl, args.ckpt, args.mode)
    data = {size: torch.load(path) for size, path in zip(args.sizes, args.pixels)}
    result = {"impl": args.impl, "mode": args.mode}
    with torch.no_grad():
        features(model, data[min(args.sizes)])  # warm-up
        for size in args.sizes:
            times = []
            for _ in range(args.iters):
                start = time.perf_counter()
                out = features(model, data[size])
                times.append(time.perf_counter() - start)
            result[f"img_s_{size}"] = 1.0 / statistics.median(times)
            torch.save(out.float(), common.BENCH_DIR / f"vision-out-{args.impl}-{args.mode}-{size}.pt")
    result["peak_rss_mb"] = common.peak_rss_mb()
    common.emit(result)


def compare_outputs(sizes: list[int], variant: str) -> dict[int, float]:
    import torch

    impl, _, mode = variant.partition("-")
    errors = {}
    for size in sizes:
        ref = torch.load(common.BENCH_DIR / f"vision-out-hf-bf16-{size}.pt")
        got = torch.load(common.BENCH_DIR / f"vision-out-{impl}-{mode or 'bf16'}-{size}.pt")
        if got.shape != ref.shape:
            raise SystemExit(f"vision features differ in shape at {size}: {variant} {tuple(got.shape)} vs hf "
                             f"{tuple(ref.shape)}; no timing reported")
        errors[size] = ((got - ref).abs().max() / ref.abs().max()).item()
        if errors[size] > TOLERANCE:
            raise SystemExit(f"vision features differ at {size}: {variant} relative max error {errors[size]:.3g} > "
                             f"{TOLERANCE}; no timing reported")
    return errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=common.IMPLS)
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--pixels", type=Path, nargs="+")
    parser.add_argument("--shape", default="2b", help="2b | 7b | mini | tiny (the last two: smoke tests)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 896])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--iters", type=int, default=1, help="timed calls per size in each process")
    parser.add_argument("--mode", choices=("bf16", "unpacked"), default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--modes", nargs="+", choices=("bf16", "unpacked"), default=["bf16"],
                        help="our variants: bf16 = from_pretrained as is (CPU-prepacked), unpacked = cpu_prepack=False")
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    ckpt = common.checkpoint_dir(args.shape)
    pixels = [str(make_pixels(ckpt, s)) for s in args.sizes]
    variants = ["hf"] + [f"ours-{m}" if m != "bf16" else "ours" for m in args.modes]

    def measure(variant: str) -> dict:
        impl, _, mode = variant.partition("-")
        return common.run_child("vision.py", ["--impl", impl, "--mode", mode or "bf16", "--ckpt", str(ckpt),
                                              "--iters", str(args.iters), "--sizes", *map(str, args.sizes),
                                              "--pixels", *pixels])
    results = common.interleaved(args.runs, measure, variants)
    rows = []
    for variant in variants[1:]:
        errors = compare_outputs(args.sizes, variant)
        for size in args.sizes:
            ours, hf = (common.median(results[v], f"img_s_{size}") for v in (variant, "hf"))
            rows.append([variant, f"{size}x{size}", f"{ours:.3f}", f"{hf:.3f}", f"{ours / hf:.2f}x",
                         f"{errors[size]:.2g}"])
    print(f"\n## vision tower, {args.shape}, median of {args.runs} runs")
    print(common.table(rows, ["variant", "image", "ours img/s", "hf img/s", "ours/hf", "max rel. diff"]))


if __name__ == "__main__":
    main()
